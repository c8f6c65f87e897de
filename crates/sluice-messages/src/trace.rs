//! W3C trace context (`traceparent`) as it travels in Kafka record headers.
//!
//! The runtime reads the header of every input and gives each output a child
//! of it (same trace id and flags, a new parent id for this hop), or starts a
//! new trace when the input had none, so that one event can be followed
//! through every topic. Only version `00` is written; a later version is read
//! as the specification asks (its first four fields), and anything malformed
//! is treated as absent.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// The Kafka header that carries the trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Length of a version-00 `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`.
pub const TRACEPARENT_LEN: usize = 55;

/// One `traceparent`: the trace, the span that sent the record, and the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// Never zero.
    pub trace_id: u128,
    /// The span (here: the stage hop) that produced the record; never zero.
    pub parent_id: u64,
    /// Trace flags (bit 0: sampled), passed on unchanged.
    pub flags: u8,
}

impl TraceParent {
    /// Parses a header value; `None` for anything the specification says to
    /// ignore (wrong length or separators, upper-case or non-hex digits,
    /// version `ff`, an all-zero trace or parent id).
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() < TRACEPARENT_LEN {
            return None;
        }
        let version = hex(&value[0..2])?;
        // Version 00 is exactly 55 bytes; a later one may append fields after a dash.
        let length_ok = match version {
            0xff => false,
            0 => value.len() == TRACEPARENT_LEN,
            _ => value.len() == TRACEPARENT_LEN || value[TRACEPARENT_LEN] == b'-',
        };
        if !length_ok || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let trace_id = hex(&value[3..35])?;
        let parent_id = hex(&value[36..52])? as u64;
        let flags = hex(&value[53..55])? as u8;
        (trace_id != 0 && parent_id != 0).then_some(Self { trace_id, parent_id, flags })
    }

    /// A new trace, for a record that came without one. The flags are 00: we
    /// record nothing, so we do not claim the trace was sampled.
    pub fn root() -> Self {
        let trace_id = (u128::from(random_id()) << 64) | u128::from(random_id());
        Self { trace_id, parent_id: random_id(), flags: 0 }
    }

    /// The context of the next hop: same trace and flags, a new parent id.
    pub fn child(&self) -> Self {
        Self { parent_id: random_id(), ..*self }
    }

    /// The header value, version 00.
    pub fn encode(&self) -> [u8; TRACEPARENT_LEN] {
        let mut out = [b'-'; TRACEPARENT_LEN];
        put_hex(&mut out[0..2], 0);
        put_hex(&mut out[3..35], self.trace_id);
        put_hex(&mut out[36..52], u128::from(self.parent_id));
        put_hex(&mut out[53..55], u128::from(self.flags));
        out
    }

    /// The trace id as 32 lower-case hex digits, for logs.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let encoded = self.encode();
        f.write_str(std::str::from_utf8(&encoded).map_err(|_| fmt::Error)?)
    }
}

/// Lower-case hex only (the specification's `HEXDIGLC`), at most 32 digits.
fn hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |acc, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some((acc << 4) | u128::from(v))
    })
}

fn put_hex(out: &mut [u8], mut value: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// A non-zero random 64-bit id. std's `RandomState` takes its keys from the
/// operating system (once per thread, then varied per call), and SipHash of a
/// counter under those keys is as good as random for ids that need only be
/// unique, not secret, without a random-number crate for it.
fn random_id() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    loop {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
        let id = hasher.finish();
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_writes_back_the_specification_example() {
        let t = TraceParent::parse(EXAMPLE.as_bytes()).expect("valid");
        assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(t.parent_id, 0x00f067aa0ba902b7);
        assert_eq!(t.flags, 1);
        assert_eq!(t.to_string(), EXAMPLE);
        assert_eq!(&t.encode()[..], EXAMPLE.as_bytes());
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn malformed_values_are_absent() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields_and_written_as_00() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        let t = TraceParent::parse(later.as_bytes()).expect("valid");
        assert_eq!(t.to_string(), EXAMPLE);
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_parent() {
        let parent = TraceParent::parse(EXAMPLE.as_bytes()).expect("valid");
        let child = parent.child();
        assert_eq!((child.trace_id, child.flags), (parent.trace_id, parent.flags));
        assert_ne!(child.parent_id, parent.parent_id);
        assert_ne!(child.parent_id, 0);
        assert_eq!(TraceParent::parse(&child.encode()), Some(child));
    }

    #[test]
    fn new_traces_are_valid_and_distinct() {
        let roots: Vec<TraceParent> = (0..1000).map(|_| TraceParent::root()).collect();
        assert!(roots.iter().all(|r| TraceParent::parse(&r.encode()) == Some(*r) && r.flags == 0));
        assert_eq!(roots.iter().map(|r| r.trace_id).collect::<HashSet<_>>().len(), roots.len());
        assert_eq!(roots.iter().map(|r| r.parent_id).collect::<HashSet<_>>().len(), roots.len());
        // Both halves of a trace id are random, not a counter.
        assert!(roots.iter().all(|r| (r.trace_id >> 64) != 0 && (r.trace_id as u64) != 0));
    }
}
