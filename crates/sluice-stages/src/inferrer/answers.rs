//! The cache's part of answering a batch, the same for every model: rows with
//! equal inputs are grouped (computed once), groups the cache holds are
//! answered from it, and fresh model outputs are cached.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_control::cache::{CacheKey, PredictionCache, Tier};
use sluice_model::ModelError;

use super::{Answer, InferrerStats};
use crate::telemetry;

/// Rows of a batch with the same input: computed once.
pub(crate) struct Group {
    pub(crate) key: Option<CacheKey>,
    pub(crate) rows: Vec<usize>,
}

/// One model's view of a batch: what is answered, and what is left to compute.
pub(crate) struct Answers {
    /// Per row: its answer, or the model error it failed with alone.
    pub(crate) rows: Vec<Option<Result<Answer, ModelError>>>,
    /// Groups the model must compute, in the order their outputs are given to [`Self::fill`].
    pub(crate) to_compute: Vec<Group>,
    hits_by_tier: [u64; 2],
}

impl Answers {
    /// Groups `rows` rows by `key` when there is a cache (otherwise one group
    /// per row) and answers the groups the cache holds. A cached value that is
    /// not a valid answer (another width, a non-finite value, or one outside
    /// its output's declared range: corrupt, or written by someone else) is
    /// not trusted: it is a miss, recomputed, and counted.
    #[allow(clippy::too_many_arguments, reason = "one call per batch, each argument distinct")]
    pub(crate) async fn look_up(
        cache: Option<&PredictionCache>,
        model: &str,
        version: &str,
        rows: usize,
        key: impl Fn(usize) -> CacheKey,
        valid: impl Fn(&[f32]) -> bool,
        ttl: Duration,
        stats: &InferrerStats,
    ) -> Self {
        let mut answers = Self { rows: vec![None; rows], to_compute: Vec::new(), hits_by_tier: [0; 2] };
        let Some(cache) = cache else {
            answers.to_compute = (0..rows).map(|row| Group { key: None, rows: vec![row] }).collect();
            return answers;
        };
        let mut groups: Vec<Group> = Vec::with_capacity(rows);
        let mut by_key: HashMap<CacheKey, usize> = HashMap::with_capacity(rows);
        for row in 0..rows {
            let k = key(row);
            let g = *by_key.entry(k).or_insert_with(|| {
                groups.push(Group { key: Some(k), rows: Vec::new() });
                groups.len() - 1
            });
            groups[g].rows.push(row);
        }
        let keys: Vec<CacheKey> = groups.iter().filter_map(|g| g.key).collect();
        let found = cache.get_many(model, version, &keys, ttl).await;
        let mut invalid = 0;
        for (group, found) in groups.into_iter().zip(found) {
            match found {
                Some((values, tier)) if valid(&values) => {
                    answers.hits_by_tier[usize::from(tier == Tier::Redis)] += group.rows.len() as u64;
                    for row in group.rows {
                        let answer = Answer { values: values.clone(), cached: true, call_rows: 0, padded_length: 0 };
                        answers.rows[row] = Some(Ok(answer));
                    }
                }
                Some(_) => {
                    invalid += 1;
                    answers.to_compute.push(group);
                }
                None => answers.to_compute.push(group),
            }
        }
        if invalid > 0 {
            stats.invalid_cache_entries.fetch_add(invalid, Ordering::Relaxed);
            telemetry::invalid_cache_entries(model, invalid);
        }
        answers
    }

    /// Takes the model's answers for [`Self::to_compute`] (one per group, in
    /// order), caches the valid ones, and records the counts.
    #[allow(clippy::too_many_arguments, reason = "one call per batch, each argument distinct")]
    pub(crate) async fn fill(
        &mut self,
        cache: Option<&PredictionCache>,
        model: &str,
        version: &str,
        computed: Vec<Result<Answer, ModelError>>,
        valid: impl Fn(&[f32]) -> bool,
        ttl: Duration,
        stats: &Arc<InferrerStats>,
    ) {
        let mut fresh = Vec::new();
        let mut model_rows = 0;
        for (group, result) in self.to_compute.iter().zip(computed) {
            let answer = result.inspect(|a| {
                model_rows += 1;
                if let Some(key) = group.key
                    && valid(&a.values)
                {
                    fresh.push((key, a.values.clone()));
                }
            });
            for row in &group.rows {
                self.rows[*row] = Some(answer.clone());
            }
        }
        stats.model_rows.fetch_add(model_rows, Ordering::Relaxed);
        let hits: u64 = self.hits_by_tier.iter().sum();
        stats.cache_hits.fetch_add(hits, Ordering::Relaxed);
        if let Some(cache) = cache {
            if !fresh.is_empty() {
                cache.put_many(model, version, fresh, ttl).await;
            }
            let misses = self.to_compute.iter().map(|g| g.rows.len() as u64).sum();
            let counts = [
                ("hits_lru", self.hits_by_tier[0]),
                ("hits_redis", self.hits_by_tier[1]),
                ("misses", misses),
                ("model_rows", model_rows),
            ];
            cache.record_shared_stats(&counts).await;
        }
    }
}
