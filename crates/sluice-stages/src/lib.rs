//! Sluice's four stages. Each implements [`sluice_core::Stage`]: it gets a
//! batch of consumed messages and returns what to publish, dead letters
//! included. None of them touches rdkafka or libtorch: the Kafka runtime
//! drives them, and the model stage runs any backend that implements
//! `sluice_model`'s traits.
//!
//! ```text
//! requests ─► fetcher ─► fetched ─► normalizer ─► normalized ─► inferrer ───────┐
//!                                              └─► tokenized ─► query-inferrer ─┴─► inferred ─► writer ─► predictions (JSON) + file + PostgreSQL
//! ```

mod common;
mod error;
pub mod fetcher;
pub mod generate;
pub mod inferrer;
pub mod normalizer;
mod telemetry;
pub mod writer;

pub use error::StageError;
pub use fetcher::Fetcher;
pub use inferrer::{Inferrer, InferrerStats, ModelStage, QueryInferrer, Task};
pub use normalizer::Normalizer;
pub use writer::{PredictionSink, SinkError, Writer, WriterStats};

/// What the crate's unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use sluice_control::Settings;

    /// Live settings for a stage under test: batch 64, no cache, one thread.
    pub(crate) fn settings() -> Settings {
        Settings {
            max_batch_size: 64,
            max_batch_tokens: 512,
            max_wait_ms: 0,
            min_confidence: 0.0,
            model_version: "1".into(),
            cache_enabled: false,
            cache_ttl_s: 60,
            intra_op_threads: 1,
            max_age_ms: 0,
            latency_target_ms: 0,
            bulk_share: 8,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use sluice_messages::dead_letter::Reason;

    use super::inferrer::query::QueryTask;
    use super::inferrer::stock::StockTask;
    use super::*;

    /// docs/instrumentation.md's dead-letter table: reason -> the stages named
    /// for it ("any" for the runtime's own).
    fn documented_reasons() -> BTreeMap<String, BTreeSet<String>> {
        let doc = include_str!("../../../docs/instrumentation.md");
        let table = doc.split("## Dead-letter reasons").nth(1).expect("the dead-letter section");
        let mut reasons = BTreeMap::new();
        for line in table.lines().skip_while(|l| !l.starts_with("| `")).take_while(|l| l.starts_with('|')) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let stages: BTreeSet<String> = cells[2].split(',').map(|s| s.trim().to_string()).collect();
            for reason in cells[1].split(',') {
                reasons.insert(reason.trim().trim_matches('`').to_string(), stages.clone());
            }
        }
        reasons
    }

    fn documented_for(stage: &str) -> BTreeSet<String> {
        documented_reasons().into_iter().filter(|(_, stages)| stages.contains(stage)).map(|(r, _)| r).collect()
    }

    fn set(reasons: &[Reason]) -> BTreeSet<String> {
        reasons.iter().map(|r| r.to_string()).collect()
    }

    /// The reasons each stage declares (their counters start at 0) are those the
    /// documentation lists for it; the two model stages share the "inferrer" rows.
    #[test]
    fn each_stage_declares_the_dead_letter_reasons_documented_for_it() {
        assert!(documented_reasons().len() >= 15, "the table was not read: {:?}", documented_reasons());
        assert_eq!(set(Fetcher::DEAD_LETTER_REASONS), documented_for("fetcher"));
        assert_eq!(set(Normalizer::DEAD_LETTER_REASONS), documented_for("normalizer"));
        assert_eq!(set(Writer::DEAD_LETTER_REASONS), documented_for("writer"));
        let inferrers: BTreeSet<_> =
            set(StockTask::DEAD_LETTER_REASONS).union(&set(QueryTask::DEAD_LETTER_REASONS)).cloned().collect();
        assert_eq!(inferrers, documented_for("inferrer"));
        assert_eq!(documented_reasons().get("output_too_large").map(|s| s.contains("any")), Some(true));
    }

    /// Every reason of the enum is documented, and the documentation names no other.
    #[test]
    fn the_documented_reasons_are_the_enums() {
        let documented: BTreeSet<String> = documented_reasons().into_keys().collect();
        assert_eq!(documented, set(&Reason::ALL));
    }
}
