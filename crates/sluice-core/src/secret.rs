//! A secret is a type (Vector's `SensitiveString`): its `Debug` and its
//! serialised form show at most a URL's host (never its credentials), else
//! `<redacted>`, so no log line, `/status` page or `sluice config` can show it
//! by mistake. Deserialising reads the value.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a secret prints as.
pub const REDACTED: &str = "<redacted>";

/// A value that must never be shown: a DSN with a password, a Redis URL with
/// AUTH, a librdkafka `sasl.password`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that uses it (a client's config).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }

    /// What may be shown of it: a URL without its credentials
    /// (`redis://***@host:6379`, or the whole URL when it has none), so that
    /// an operator still sees where it points; anything else `<redacted>`.
    pub fn shown(&self) -> String {
        let value = self.0.as_str();
        let Some(scheme) = value.find("://") else { return REDACTED.into() };
        if value.to_ascii_lowercase().contains("password") {
            return REDACTED.into();
        }
        match value.rfind('@') {
            Some(at) if at > scheme => format!("{}***{}", &value[..scheme + 3], &value[at..]),
            _ => value.to_string(),
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.shown())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_its_value() {
        let secret = Secret::new("host=db password=hunter2");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(serde_json::to_string(&secret).expect("json"), "\"<redacted>\"");
        let read: Secret = serde_json::from_str("\"password=hunter2\"").expect("json");
        assert_eq!(read.expose(), "password=hunter2");
        assert_eq!(Secret::new("redis://:hunter2@cache:6379").shown(), "redis://***@cache:6379");
        assert_eq!(Secret::new("redis://cache:6379").shown(), "redis://cache:6379", "nothing secret in it");
        assert_eq!(Secret::new("postgres://u@db/x?password=hunter2").shown(), "<redacted>");
    }
}
