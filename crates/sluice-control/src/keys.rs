//! The Redis key layout, in one place (documented in docs/operations.md).
//!
//! ```text
//! {prefix}:{pipeline}:overrides                 hash: overrides for every stage and model
//! {prefix}:{pipeline}:overrides:{model}         hash: overrides for one model (wins)
//! {prefix}:{pipeline}:writer-overrides          hash: overrides for the writer (wins)
//! {prefix}:{pipeline}:control                   pub/sub channel: "overrides" or "cache:clear"
//! {prefix}:{pipeline}:cache:{model}:{version}:{hash}   string: a cached prediction (with a TTL)
//! {prefix}:{pipeline}:cache-stats               hash: cache counters summed over all replicas
//! {prefix}:{pipeline}:cache-epoch               integer: how many times the cache was cleared
//! {prefix}:{pipeline}:rollout:{model}           string: the model's rollout (JSON), running or decided
//! {prefix}:{pipeline}:rollout:{model}:tally:{id}  hash: that rollout's tally, summed over all replicas
//! ```

/// Builds every key from a prefix and a pipeline name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    base: String,
}

impl KeyLayout {
    pub fn new(prefix: &str, pipeline: &str) -> Self {
        Self { base: format!("{prefix}:{pipeline}") }
    }

    pub fn overrides(&self) -> String {
        format!("{}:overrides", self.base)
    }

    pub fn model_overrides(&self, model: &str) -> String {
        format!("{}:overrides:{model}", self.base)
    }

    pub fn writer_overrides(&self) -> String {
        format!("{}:writer-overrides", self.base)
    }

    pub fn channel(&self) -> String {
        format!("{}:control", self.base)
    }

    pub fn cache_entry(&self, model: &str, version: &str, hash: u128) -> String {
        format!("{}:cache:{model}:{version}:{hash:032x}", self.base)
    }

    /// A `SCAN MATCH` pattern for every cache entry of the pipeline.
    pub fn cache_pattern(&self) -> String {
        format!("{}:cache:*", self.base)
    }

    /// Incremented by every `sluice cache clear`: a process that missed the
    /// notification still sees the clear at its next reconcile.
    pub fn cache_epoch(&self) -> String {
        format!("{}:cache-epoch", self.base)
    }

    pub fn rollout(&self, model: &str) -> String {
        format!("{}:rollout:{model}", self.base)
    }

    pub fn rollout_tally(&self, model: &str, id: &str) -> String {
        format!("{}:rollout:{model}:tally:{id}", self.base)
    }

    pub fn cache_stats(&self) -> String {
        format!("{}:cache-stats", self.base)
    }
}

/// Messages on the control channel.
pub const NOTIFY_OVERRIDES: &str = "overrides";
pub const NOTIFY_CACHE_CLEAR: &str = "cache:clear";
