use sluice_core::ConfigError;
use thiserror::Error;

/// What can go wrong in the control plane.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum ControlError {
    /// Redis is unreachable or answered with an error: retryable. Stages keep
    /// their last good settings and treat the cache as missing.
    #[error("redis: {0}")]
    Redis(String),
    /// A rollout that cannot be read or written as asked (what it holds is
    /// not a rollout, or a person's request does not fit its state).
    #[error("rollout: {0}")]
    Rollout(String),
    /// A bad `control.*` setting.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl From<redis::RedisError> for ControlError {
    fn from(e: redis::RedisError) -> Self {
        Self::Redis(e.to_string())
    }
}
