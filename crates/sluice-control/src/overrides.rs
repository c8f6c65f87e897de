//! The live settings, each declared once (name, type, bounds, who follows it),
//! from which the typed [`Settings`] and [`Overrides`], override parsing, the
//! configuration's own checks and the gauges all follow.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::RawHash;

/// What values a setting takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bounds {
    /// A whole number in `min..=max`.
    Count { min: u64, max: u64 },
    /// A number in `0..=1`.
    Ratio,
    /// `true`/`false` (also 1/0, on/off, yes/no).
    Switch,
    /// An installed model version.
    Version,
}

impl Bounds {
    /// The bounds in words, for refusals and `sluice overrides`.
    pub fn describe(&self) -> String {
        match self {
            Self::Count { min, max } => format!("a whole number in {min}..={max}"),
            Self::Ratio => "a number in 0..=1".into(),
            Self::Switch => "true or false".into(),
            Self::Version => "an installed model version".into(),
        }
    }

    /// Checks a configured count (the configuration holds numbers, not text).
    pub fn check_count(&self, n: u64) -> Result<(), String> {
        match self {
            Self::Count { min, max } if !(*min..=*max).contains(&n) => Err(format!("{n} is outside {min}..={max}")),
            _ => Ok(()),
        }
    }

    /// Checks a configured ratio.
    pub fn check_ratio(&self, x: f32) -> Result<(), String> {
        if x.is_finite() && (0.0..=1.0).contains(&x) { Ok(()) } else { Err(format!("{x} is outside 0..=1")) }
    }
}

/// Who follows a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follower {
    /// The model stages (settable for all models or for one).
    Models,
    /// The writer (settable for all or in the writer's own scope).
    Writer,
}

/// One live setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Field {
    pub name: &'static str,
    pub bounds: Bounds,
    pub follower: Follower,
    /// What it changes, for `sluice overrides` and the documentation.
    pub doc: &'static str,
}

/// A type a setting can have: parsed from an override's text within its
/// bounds, and shown as a gauge (a version has none).
trait Value: Sized {
    fn parse(text: &str, bounds: Bounds, version_exists: &dyn Fn(&str) -> bool) -> Result<Self, String>;
    fn gauge(&self) -> Option<f64>;
}

fn count(text: &str, bounds: Bounds) -> Result<u64, String> {
    let n: u64 = text.trim().parse().map_err(|_| format!("not {}", bounds.describe()))?;
    bounds
        .check_count(n)
        .map(|()| n)
        .map_err(|_| format!("outside {}", bounds.describe().trim_start_matches("a whole number in ")))
}

impl Value for usize {
    fn parse(text: &str, bounds: Bounds, _: &dyn Fn(&str) -> bool) -> Result<Self, String> {
        count(text, bounds).map(|n| n as usize)
    }

    fn gauge(&self) -> Option<f64> {
        Some(*self as f64)
    }
}

impl Value for u64 {
    fn parse(text: &str, bounds: Bounds, _: &dyn Fn(&str) -> bool) -> Result<Self, String> {
        count(text, bounds)
    }

    fn gauge(&self) -> Option<f64> {
        Some(*self as f64)
    }
}

impl Value for f32 {
    fn parse(text: &str, bounds: Bounds, _: &dyn Fn(&str) -> bool) -> Result<Self, String> {
        let x: f32 = text.trim().parse().map_err(|_| "not a number".to_string())?;
        bounds.check_ratio(x).map(|()| x).map_err(|_| "outside 0..=1".into())
    }

    fn gauge(&self) -> Option<f64> {
        Some(f64::from(*self))
    }
}

impl Value for bool {
    fn parse(text: &str, _: Bounds, _: &dyn Fn(&str) -> bool) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err("not a boolean (true/false)".into()),
        }
    }

    fn gauge(&self) -> Option<f64> {
        Some(if *self { 1.0 } else { 0.0 })
    }
}

impl Value for String {
    fn parse(text: &str, _: Bounds, version_exists: &dyn Fn(&str) -> bool) -> Result<Self, String> {
        let version = text.trim();
        check_version_name(version)?;
        if !version_exists(version) {
            return Err("no such model version is installed".into());
        }
        Ok(version.to_string())
    }

    fn gauge(&self) -> Option<f64> {
        None
    }
}

/// Declares the settings: the two structs and everything derived from the list.
macro_rules! settings {
    ($( $(#[doc = $doc:literal])* $name:ident: $ty:ty = $bounds:expr, $follower:ident; )*) => {
        /// The settings a running pipeline can change without a restart, with
        /// the values in force. Built from the configuration, then overridden.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub struct Settings {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        /// Overrides read from one scope: `None` means not overridden.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        pub struct Overrides {
            $( pub $name: Option<$ty>, )*
        }

        /// Every live setting, in declaration order.
        pub const FIELDS: &[Field] = &[
            $( Field { name: stringify!($name), bounds: $bounds, follower: Follower::$follower, doc: concat!($($doc),*) }, )*
        ];

        impl Overrides {
            /// Checks one field's value and sets it. `version_exists` says
            /// whether a model version can be served.
            pub fn check(&mut self, field: &str, value: &str, version_exists: &dyn Fn(&str) -> bool) -> Result<(), String> {
                match field {
                    $( stringify!($name) => self.$name = Some(<$ty as Value>::parse(value, $bounds, version_exists)?), )*
                    _ => return Err(format!("unknown field (known: {})", names().collect::<Vec<_>>().join(", "))),
                }
                Ok(())
            }

            /// Takes `field`'s value from `previous` (the last good one).
            fn keep(&mut self, field: &str, previous: &Self) {
                match field {
                    $( stringify!($name) => self.$name.clone_from(&previous.$name), )*
                    _ => {}
                }
            }

            /// `self` with `more` on top (a per-model scope over the global one).
            pub fn then(&self, more: &Self) -> Self {
                Self { $( $name: more.$name.clone().or_else(|| self.$name.clone()), )* }
            }
        }

        impl Settings {
            /// The settings in force: these, with `overrides` on top.
            pub fn with(&self, o: &Overrides) -> Self {
                Self { $( $name: o.$name.clone().unwrap_or_else(|| self.$name.clone()), )* }
            }

            /// The fields whose values differ, with the new value, for logs and metrics.
            pub fn changed_fields(&self, other: &Self) -> Vec<(&'static str, String)> {
                let mut changed = Vec::new();
                $( if self.$name != other.$name { changed.push((stringify!($name), format!("{:?}", other.$name))); } )*
                changed
            }

            /// Each field a gauge can show, with its value.
            pub fn gauges(&self) -> Vec<(&'static str, f64)> {
                let mut gauges = Vec::new();
                $( if let Some(v) = Value::gauge(&self.$name) { gauges.push((stringify!($name), v)); } )*
                gauges
            }
        }
    };
}

settings! {
    /// The model stage's batch cap (the next batch cut uses it; the query stage: also the rows of one model call).
    max_batch_size: usize = Bounds::Count { min: 1, max: 65_536 }, Models;
    /// The query stage's cap on a model call's padded tokens (rows x longest sequence).
    max_batch_tokens: usize = Bounds::Count { min: 1, max: 16_777_216 }, Models;
    /// The model stage's deadline from the oldest waiting event (ms).
    max_wait_ms: u64 = Bounds::Count { min: 0, max: 60_000 }, Models;
    /// The writer drops predictions and intents under this confidence.
    min_confidence: f32 = Bounds::Ratio, Writer;
    /// The model version the model stage serves (loaded, warmed up, then swapped in).
    model_version: String = Bounds::Version, Models;
    /// Whether the model stage uses the prediction cache.
    cache_enabled: bool = Bounds::Switch, Models;
    /// Time to live of cache entries written from now on (s).
    cache_ttl_s: u64 = Bounds::Count { min: 1, max: 30 * 24 * 3600 }, Models;
    /// The model backend's CPU threads, from the next call.
    intra_op_threads: usize = Bounds::Count { min: 1, max: 256 }, Models;
    /// The model stage does not compute an event older than this on its first pass, from its request (ms; 0: no limit).
    max_age_ms: u64 = Bounds::Count { min: 0, max: 604_800_000 }, Models;
    /// A p99 target from an event's arrival at the model stage to its answer (ms; 0: off): the stage then moves its batch size and wait within max_batch_size and max_wait_ms to hold it.
    latency_target_ms: u64 = Bounds::Count { min: 0, max: 60_000 }, Models;
    /// With lanes on, while both lanes wait, the model stage takes one bulk batch in this many.
    bulk_share: u64 = Bounds::Count { min: 2, max: 1_000 }, Models;
}

/// The setting named `name`.
pub fn field(name: &str) -> Option<&'static Field> {
    FIELDS.iter().find(|f| f.name == name)
}

/// Every setting's name.
pub fn names() -> impl Iterator<Item = &'static str> {
    FIELDS.iter().map(|f| f.name)
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

impl Overrides {
    /// Reads a scope's hash. Each field is judged on its own: a refused one
    /// (unknown, out of bounds, not UTF-8, or not followed in this scope:
    /// `follows` says which fields are) keeps its value from `previous` (the
    /// last good one) and is reported, and the others apply. A key that is
    /// not a hash keeps every value of `previous` and is reported once as
    /// field `*`.
    pub fn parse(
        key: &str,
        fields: &RawHash,
        previous: &Self,
        follows: Option<Follower>,
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
        for (name, value) in sorted {
            let (Ok(name), Ok(text)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
                let lossy = String::from_utf8_lossy(name);
                out.keep(&lossy, previous);
                let which = if std::str::from_utf8(name).is_err() { "field name" } else { "value" };
                let reason = format!("the {which} is not UTF-8");
                refusals.push(refusal(shown(&lossy), shown(&String::from_utf8_lossy(value)), reason));
                continue;
            };
            let checked = match (field(name), follows) {
                (Some(f), Some(follower)) if f.follower != follower => Err(match f.follower {
                    Follower::Writer => "set for the writer, not a model: use the writer's scope or all".to_string(),
                    Follower::Models => "set for the models, not the writer: use a model's scope or all".to_string(),
                }),
                _ => out.check(name, text, version_exists),
            };
            if let Err(reason) = checked {
                out.keep(name, previous);
                refusals.push(refusal(shown(name), shown(text), reason));
            }
        }
        (out, refusals)
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

    fn parse(key: &str, fields: &RawHash, previous: &Overrides) -> (Overrides, Vec<Refusal>) {
        Overrides::parse(key, fields, previous, None, &any_version)
    }

    #[test]
    fn parses_good_values() {
        let (o, refused) = parse(
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
            let (o, refused) = parse("sluice:p:overrides", &hash(&[(field, value)]), &previous);
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
        let (o, refused) = parse("k", &fields, &previous);
        assert_eq!(o.max_wait_ms, Some(7), "a good field applies beside bad ones");
        assert_eq!(o.max_batch_size, Some(16), "a non-UTF-8 value keeps the last good one");
        assert_eq!(refused.len(), 3, "{refused:?}");
        assert!(refused.iter().any(|r| r.reason == "the value is not UTF-8" && r.field == "max_batch_size"));
        assert!(refused.iter().any(|r| r.reason == "the field name is not UTF-8"));
        let long = refused.iter().find(|r| r.field == "min_confidence").expect("the long value");
        assert!(long.value.len() < 100 && long.value.ends_with("(1048576 bytes)"), "{}", long.value);

        let (o, refused) = parse("k", &Err("WRONGTYPE".into()), &previous);
        assert_eq!(o, previous, "a key that is not a hash keeps every last good value");
        assert_eq!((refused.len(), refused[0].field.as_str(), refused[0].key.as_str()), (1, "*", "k"));
    }

    #[test]
    fn a_scope_takes_only_the_fields_its_follower_reads() {
        let fields = hash(&[("min_confidence", "0.5"), ("max_batch_size", "8")]);
        let (model, refused) =
            Overrides::parse("m", &fields, &Overrides::default(), Some(Follower::Models), &any_version);
        assert_eq!((model.max_batch_size, model.min_confidence), (Some(8), None));
        assert_eq!(refused.iter().map(|r| r.field.as_str()).collect::<Vec<_>>(), ["min_confidence"]);
        let (writer, refused) =
            Overrides::parse("w", &fields, &Overrides::default(), Some(Follower::Writer), &any_version);
        assert_eq!((writer.max_batch_size, writer.min_confidence), (None, Some(0.5)));
        assert_eq!(refused.iter().map(|r| r.field.as_str()).collect::<Vec<_>>(), ["max_batch_size"]);
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
            max_age_ms: 0,
            latency_target_ms: 0,
            bulk_share: 8,
        };
        let effective = base.with(&global.then(&model));
        assert_eq!((effective.max_batch_size, effective.max_wait_ms, effective.cache_ttl_s), (128, 5, 3600));
        let changed: Vec<&str> = base.changed_fields(&effective).into_iter().map(|(f, _)| f).collect();
        assert_eq!(changed, vec!["max_batch_size", "max_wait_ms"]);
    }

    #[test]
    fn every_field_is_declared_once_with_its_bounds() {
        assert_eq!(names().collect::<Vec<_>>().len(), 11);
        assert_eq!(field("max_batch_size").map(|f| f.bounds), Some(Bounds::Count { min: 1, max: 65_536 }));
        assert_eq!(field("bulk_share").map(|f| f.bounds), Some(Bounds::Count { min: 2, max: 1000 }));
        assert!(FIELDS.iter().all(|f| !f.doc.is_empty()), "each has its documentation");
        assert_eq!(Bounds::Count { min: 1, max: 4 }.check_count(5), Err("5 is outside 1..=4".into()));
    }
}
