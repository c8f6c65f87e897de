use thiserror::Error;

/// A bad configuration or override value: fatal at start, refused at run
/// time. The key is the dotted path a user writes (`inferrer.model.version`,
/// `postgres.dsn`), never the value when it may be secret.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("configuration key `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into() }
    }
}
