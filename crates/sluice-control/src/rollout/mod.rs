//! Safe model rollout (issue 18): a candidate version runs beside the serving
//! one, on a share of batches (shadow: its answers go to a shadow topic only)
//! and a stable share of keys (canary: it answers them), is compared with the
//! serving version on the same inputs, and is promoted or rolled back by
//! itself once the figures say so.
//!
//! - [`judge`]: the gates, the tally every replica adds to, and the verdict.
//! - [`store`]: the rollout's state and tally, in Redis (one rollout for every
//!   replica, decided once by compare-and-set) or in process.
//! - [`follow`]: what a model stage runs: it follows the state, adds its
//!   tally, judges the sum and takes the decision.

pub mod follow;
pub mod judge;
pub mod store;

pub use follow::RolloutLink;
pub use judge::{Gates, Tally, Verdict, judge};
pub use store::{Phase, Rollout, RolloutStore};

/// Whether a key (a symbol, or a query's event id) is in a rollout's canary
/// share: stable for one rollout (the same keys go to the candidate on every
/// replica and after a restart), different from one rollout to the next.
pub fn in_canary(rollout_id: &str, key: &[u8], share: f64) -> bool {
    if share <= 0.0 {
        return false;
    }
    let seed = xxhash_rust::xxh3::xxh3_64(rollout_id.as_bytes());
    let slot = xxhash_rust::xxh3::xxh3_64_with_seed(key, seed) % 10_000;
    (slot as f64) < share * 10_000.0
}

#[cfg(test)]
mod tests {
    use super::in_canary;

    #[test]
    fn the_canary_takes_a_stable_share_of_keys() {
        let keys: Vec<String> = (0..20_000).map(|i| format!("SYM{i}")).collect();
        let share = |id: &str, s: f64| keys.iter().filter(|k| in_canary(id, k.as_bytes(), s)).count();
        let five = share("r1", 0.05);
        assert!((800..1200).contains(&five), "{five} of 20000 at 5%");
        assert_eq!(share("r1", 0.05), five, "stable");
        assert_eq!(share("r1", 0.0), 0);
        assert_eq!(share("r1", 1.0), keys.len());
        // A key in at 5% stays in at 25% (a step only adds keys).
        assert!(keys.iter().all(|k| !in_canary("r1", k.as_bytes(), 0.05) || in_canary("r1", k.as_bytes(), 0.25)));
        let other: Vec<bool> = keys.iter().map(|k| in_canary("r2", k.as_bytes(), 0.05)).collect();
        let same: Vec<bool> = keys.iter().map(|k| in_canary("r1", k.as_bytes(), 0.05)).collect();
        assert_ne!(other, same, "another rollout, other keys");
    }
}
