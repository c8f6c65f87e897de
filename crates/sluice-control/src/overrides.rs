//! Override fields: typed, bounded, and applied over the configuration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::RawHash;

/// Every field an override may set.
pub const FIELDS: [&str; 8] = [
    "max_batch_size",
    "max_batch_tokens",
    "max_wait_ms",
    "min_confidence",
    "model_version",
    "cache_enabled",
    "cache_ttl_s",
    "intra_op_threads",
];

/// The settings a running pipeline can change without a restart, with the
/// values in force. Built from the configuration, then overridden.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The inferrer's batch cap (the next batch cut uses it).
    pub max_batch_size: usize,
    /// The query inferrer's cap on a model call's padded tokens (rows x longest).
    pub max_batch_tokens: usize,
    /// The inferrer's deadline from the oldest waiting event (ms).
    pub max_wait_ms: u64,
    /// The writer drops predictions under this confidence.
    pub min_confidence: f32,
    /// The model version the inferrer serves.
    pub model_version: String,
    pub cache_enabled: bool,
    /// Time to live of cache entries, in seconds.
    pub cache_ttl_s: u64,
    /// libtorch CPU threads of the model thread.
    pub intra_op_threads: usize,
}

/// Overrides read from one scope (all models, or one model): `None` means not
/// overridden.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Overrides {
    pub max_batch_size: Option<usize>,
    pub max_batch_tokens: Option<usize>,
    pub max_wait_ms: Option<u64>,
    pub min_confidence: Option<f32>,
    pub model_version: Option<String>,
    pub cache_enabled: Option<bool>,
    pub cache_ttl_s: Option<u64>,
    pub intra_op_threads: Option<usize>,
}

/// Whether `version` can name a model version (a directory): 1 to 64 of
/// A-Z a-z 0-9 . _ -. The configuration and the override share this rule.
pub fn check_version_name(version: &str) -> Result<(), String> {
    let ok = !version.is_empty()
        && version.len() <= 64
        && version.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok { Ok(()) } else { Err("not a version name (1 to 64 of A-Z a-z 0-9 . _ -)".into()) }
}

/// A refused value or field name as logged and shown: cut to a sane length
/// (a megabyte value must not make megabyte log lines), with its size.
pub fn shown(text: &str) -> String {
    const MAX: usize = 64;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

/// An override value that was refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Refusal {
    /// The Redis key (hash) it was read from.
    pub key: String,
    pub field: String,
    pub value: String,
    pub reason: String,
}

fn parse_int<T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy>(
    value: &str,
    min: T,
    max: T,
) -> Result<T, String> {
    let n: T = value.trim().parse().map_err(|_| format!("not a whole number in {min}..={max}"))?;
    if n < min || n > max {
        return Err(format!("outside {min}..={max}"));
    }
    Ok(n)
}

impl Overrides {
    /// Checks one field's value. `version_exists` says whether a model version
    /// can be served.
    pub fn check(&mut self, field: &str, value: &str, version_exists: &dyn Fn(&str) -> bool) -> Result<(), String> {
        match field {
            "max_batch_size" => self.max_batch_size = Some(parse_int(value, 1usize, 65_536)?),
            "max_batch_tokens" => self.max_batch_tokens = Some(parse_int(value, 1usize, 16_777_216)?),
            "max_wait_ms" => self.max_wait_ms = Some(parse_int(value, 0u64, 60_000)?),
            "min_confidence" => {
                let c: f32 = value.trim().parse().map_err(|_| "not a number".to_string())?;
                if !(c.is_finite() && (0.0..=1.0).contains(&c)) {
                    return Err("outside 0..=1".into());
                }
                self.min_confidence = Some(c);
            }
            "model_version" => {
                let v = value.trim();
                check_version_name(v)?;
                if !version_exists(v) {
                    return Err("no such model version is installed".into());
                }
                self.model_version = Some(v.to_string());
            }
            "cache_enabled" => {
                self.cache_enabled = Some(match value.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => true,
                    "false" | "0" | "no" | "off" => false,
                    _ => return Err("not a boolean (true/false)".into()),
                });
            }
            "cache_ttl_s" => self.cache_ttl_s = Some(parse_int(value, 1u64, 30 * 24 * 3600)?),
            "intra_op_threads" => self.intra_op_threads = Some(parse_int(value, 1usize, 256)?),
            _ => return Err(format!("unknown field (known: {})", FIELDS.join(", "))),
        }
        Ok(())
    }

    /// Reads a scope's hash. Each field is judged on its own: a refused one
    /// (unknown, out of bounds, not UTF-8) keeps its value from `previous`
    /// (the last good one) and is reported, and the others apply. A key that
    /// is not a hash keeps every value of `previous` and is reported once as
    /// field `*`.
    pub fn parse(
        key: &str,
        fields: &RawHash,
        previous: &Self,
        version_exists: &dyn Fn(&str) -> bool,
    ) -> (Self, Vec<Refusal>) {
        let refusal = |field: String, value: String, reason: String| Refusal { key: key.into(), field, value, reason };
        let fields = match fields {
            Ok(fields) => fields,
            Err(why) => {
                return (previous.clone(), vec![refusal("*".into(), String::new(), format!("not a hash: {why}"))]);
            }
        };
        let mut out = Self::default();
        let mut refusals = Vec::new();
        let sorted: BTreeMap<&[u8], &[u8]> = fields.iter().map(|(f, v)| (f.as_slice(), v.as_slice())).collect();
        for (field, value) in sorted {
            let (Ok(name), Ok(text)) = (std::str::from_utf8(field), std::str::from_utf8(value)) else {
                let name = String::from_utf8_lossy(field);
                out.keep(&name, previous);
                let which = if std::str::from_utf8(field).is_err() { "field name" } else { "value" };
                refusals.push(refusal(
                    shown(&name),
                    shown(&String::from_utf8_lossy(value)),
                    format!("the {which} is not UTF-8"),
                ));
                continue;
            };
            if let Err(reason) = out.check(name, text, version_exists) {
                out.keep(name, previous);
                refusals.push(refusal(shown(name), shown(text), reason));
            }
        }
        (out, refusals)
    }

    fn keep(&mut self, field: &str, previous: &Self) {
        match field {
            "max_batch_size" => self.max_batch_size = previous.max_batch_size,
            "max_batch_tokens" => self.max_batch_tokens = previous.max_batch_tokens,
            "max_wait_ms" => self.max_wait_ms = previous.max_wait_ms,
            "min_confidence" => self.min_confidence = previous.min_confidence,
            "model_version" => self.model_version.clone_from(&previous.model_version),
            "cache_enabled" => self.cache_enabled = previous.cache_enabled,
            "cache_ttl_s" => self.cache_ttl_s = previous.cache_ttl_s,
            "intra_op_threads" => self.intra_op_threads = previous.intra_op_threads,
            _ => {}
        }
    }

    /// `self` with `more` on top (a per-model scope over the global one).
    pub fn then(&self, more: &Self) -> Self {
        Self {
            max_batch_size: more.max_batch_size.or(self.max_batch_size),
            max_batch_tokens: more.max_batch_tokens.or(self.max_batch_tokens),
            max_wait_ms: more.max_wait_ms.or(self.max_wait_ms),
            min_confidence: more.min_confidence.or(self.min_confidence),
            model_version: more.model_version.clone().or_else(|| self.model_version.clone()),
            cache_enabled: more.cache_enabled.or(self.cache_enabled),
            cache_ttl_s: more.cache_ttl_s.or(self.cache_ttl_s),
            intra_op_threads: more.intra_op_threads.or(self.intra_op_threads),
        }
    }
}

impl Settings {
    /// The settings in force: these, with `overrides` on top.
    pub fn with(&self, o: &Overrides) -> Self {
        Self {
            max_batch_size: o.max_batch_size.unwrap_or(self.max_batch_size),
            max_batch_tokens: o.max_batch_tokens.unwrap_or(self.max_batch_tokens),
            max_wait_ms: o.max_wait_ms.unwrap_or(self.max_wait_ms),
            min_confidence: o.min_confidence.unwrap_or(self.min_confidence),
            model_version: o.model_version.clone().unwrap_or_else(|| self.model_version.clone()),
            cache_enabled: o.cache_enabled.unwrap_or(self.cache_enabled),
            cache_ttl_s: o.cache_ttl_s.unwrap_or(self.cache_ttl_s),
            intra_op_threads: o.intra_op_threads.unwrap_or(self.intra_op_threads),
        }
    }

    /// The fields whose values differ, for logs and metrics.
    pub fn changed_fields(&self, other: &Self) -> Vec<(&'static str, String)> {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(other).unwrap_or_default();
        FIELDS
            .iter()
            .filter(|f| a.get(**f) != b.get(**f))
            .map(|f| (*f, b.get(*f).map(ToString::to_string).unwrap_or_default()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any_version(v: &str) -> bool {
        v == "1" || v == "2"
    }

    fn hash(pairs: &[(&str, &str)]) -> RawHash {
        Ok(pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect())
    }

    #[test]
    fn parses_good_values() {
        let (o, refused) = Overrides::parse(
            "k",
            &hash(&[
                ("max_batch_size", "32"),
                ("max_wait_ms", "0"),
                ("min_confidence", "0.7"),
                ("model_version", "2"),
                ("cache_enabled", "off"),
                ("cache_ttl_s", "60"),
                ("intra_op_threads", "2"),
            ]),
            &Overrides::default(),
            &any_version,
        );
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(o.max_batch_size, Some(32));
        assert_eq!(o.min_confidence, Some(0.7));
        assert_eq!(o.model_version.as_deref(), Some("2"));
        assert_eq!(o.cache_enabled, Some(false));
    }

    #[test]
    fn refuses_bad_values_and_keeps_the_last_good_one() {
        let previous = Overrides { max_batch_size: Some(16), min_confidence: Some(0.5), ..Overrides::default() };
        for (field, value) in [
            ("max_batch_size", "0"),
            ("max_batch_size", "-3"),
            ("max_batch_size", "big"),
            ("max_batch_size", "1e9"),
            ("min_confidence", "NaN"),
            ("min_confidence", "1.5"),
            ("model_version", "7"),
            ("model_version", "../etc"),
            ("cache_enabled", "maybe"),
            ("cache_ttl_s", "0"),
            ("bogus", "1"),
        ] {
            let (o, refused) =
                Overrides::parse("sluice:p:overrides", &hash(&[(field, value)]), &previous, &any_version);
            assert_eq!(refused.len(), 1, "{field}={value} should be refused");
            assert_eq!((refused[0].field.as_str(), refused[0].value.as_str()), (field, value));
            assert_eq!(refused[0].key, "sluice:p:overrides");
            if field == "max_batch_size" {
                assert_eq!(o.max_batch_size, Some(16), "the last good value is kept");
            }
        }
    }

    #[test]
    fn each_field_is_judged_alone_and_garbage_never_freezes_the_rest() {
        let previous = Overrides { max_batch_size: Some(16), max_wait_ms: Some(3), ..Overrides::default() };
        let fields: RawHash = Ok(vec![
            (b"max_batch_size".to_vec(), vec![0xff, 0xfe]),
            (vec![0xc3, 0x28], b"1".to_vec()),
            (b"max_wait_ms".to_vec(), b"7".to_vec()),
            (b"min_confidence".to_vec(), "x".repeat(1 << 20).into_bytes()),
        ]);
        let (o, refused) = Overrides::parse("k", &fields, &previous, &any_version);
        assert_eq!(o.max_wait_ms, Some(7), "a good field applies beside bad ones");
        assert_eq!(o.max_batch_size, Some(16), "a non-UTF-8 value keeps the last good one");
        assert_eq!(refused.len(), 3, "{refused:?}");
        assert!(refused.iter().any(|r| r.reason == "the value is not UTF-8" && r.field == "max_batch_size"));
        assert!(refused.iter().any(|r| r.reason == "the field name is not UTF-8"));
        let long = refused.iter().find(|r| r.field == "min_confidence").expect("the long value");
        assert!(long.value.len() < 100 && long.value.ends_with("(1048576 bytes)"), "{}", long.value);

        let (o, refused) = Overrides::parse("k", &Err("WRONGTYPE".into()), &previous, &any_version);
        assert_eq!(o, previous, "a key that is not a hash keeps every last good value");
        assert_eq!((refused.len(), refused[0].field.as_str(), refused[0].key.as_str()), (1, "*", "k"));
    }

    #[test]
    fn model_scope_wins_and_settings_apply_on_top() {
        let global = Overrides { max_batch_size: Some(8), max_wait_ms: Some(5), ..Overrides::default() };
        let model = Overrides { max_batch_size: Some(128), ..Overrides::default() };
        let base = Settings {
            max_batch_size: 64,
            max_batch_tokens: 8192,
            max_wait_ms: 20,
            min_confidence: 0.0,
            model_version: "1".into(),
            cache_enabled: true,
            cache_ttl_s: 3600,
            intra_op_threads: 1,
        };
        let effective = base.with(&global.then(&model));
        assert_eq!((effective.max_batch_size, effective.max_wait_ms, effective.cache_ttl_s), (128, 5, 3600));
        let changed: Vec<&str> = base.changed_fields(&effective).into_iter().map(|(f, _)| f).collect();
        assert_eq!(changed, vec!["max_batch_size", "max_wait_ms"]);
    }
}
