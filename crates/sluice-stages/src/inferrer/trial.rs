//! A rollout's candidate on one batch: which rows it runs on (every row of a
//! shadow-sampled batch; the rows whose key is in the canary share), the
//! calls it makes (cut as the serving version's are, split where they fail,
//! never through the prediction cache, so that no version's answers are
//! mixed with another's), and what its answers count for in the tally.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use sluice_control::Settings;
use sluice_control::rollout::{Rollout, RolloutLink, in_canary};
use sluice_messages::envelope::{Header, Payload};
use sluice_model::{Batch, ModelError, ModelMetadata, ModelRunner};

use super::calls::Calls;
use super::{Answer, Task, plan, valid_answer};
use crate::telemetry;

/// The candidate's calls, beside the serving version's.
pub(crate) struct TrialCalls {
    calls: Calls,
    spare: Option<Batch>,
    /// Shadow batches owed: each batch adds the shadow share and a batch is
    /// shadowed when a whole one is owed, so that 20% is one batch in five,
    /// on every replica, from the first batch on.
    credit: f64,
    /// The rollout whose candidate failed here (not run again).
    failed: Option<String>,
    pub(crate) shadow_topic: Arc<str>,
}

/// What the candidate answered in one batch.
pub(crate) struct Tried<T: Task> {
    metadata: Arc<ModelMetadata>,
    version: String,
    shadowed: bool,
    /// Per row: whether its key is in the canary share.
    canary: Vec<bool>,
    /// Per row: the candidate's answer, where it ran and gave a valid one.
    answers: Vec<Option<Answer>>,
    task: PhantomData<T>,
}

impl<T: Task> Tried<T> {
    fn payload(&self, r: usize, row: &T::Row, at_ms: i64) -> Option<Payload> {
        let answer = self.answers[r].as_ref()?;
        Some(T::answer(row, answer, &self.metadata, &self.version, at_ms))
    }

    /// Row `r`'s shadow answer, on a shadow-sampled batch.
    pub(crate) fn shadow(&self, r: usize, row: &T::Row, at_ms: i64) -> Option<Payload> {
        self.shadowed.then(|| self.payload(r, row, at_ms)).flatten()
    }

    /// Row `r`'s answer for its user, when its key is in the canary share and
    /// the candidate's answer is valid (otherwise the serving version's stands).
    pub(crate) fn canary(&self, r: usize, row: &T::Row, at_ms: i64) -> Option<Payload> {
        self.canary[r].then(|| self.payload(r, row, at_ms)).flatten()
    }
}

impl TrialCalls {
    /// The candidate's calls are counted under `{model}:candidate`, apart
    /// from the serving version's (its latency, rows and failures).
    pub(crate) fn new(model: &str, budget_bytes: u64) -> Self {
        let calls = Calls::new(&format!("{model}:candidate"), budget_bytes);
        Self { calls, spare: None, credit: 0.0, failed: None, shadow_topic: "".into() }
    }

    /// Runs `runner`, `rollout`'s candidate, on the rows of this batch it
    /// takes, compares its answers with `serving`'s (the serving version's,
    /// row by row, valid for `serving_metadata`) into the rollout's tally,
    /// and returns them. Model times are compared only on batches where both
    /// versions computed the very same rows in the very same calls (a shadow
    /// batch the cache answered nothing of: `all_computed`).
    #[allow(clippy::too_many_arguments, reason = "one call per batch, each argument distinct")]
    pub(crate) async fn run<T: Task, R: ModelRunner>(
        &mut self,
        rollout: &Rollout,
        runner: &R,
        link: &RolloutLink,
        rows: &[(usize, Header, T::Row)],
        serving: &[Option<Result<Answer, ModelError>>],
        serving_metadata: &ModelMetadata,
        settings: &Settings,
        all_computed: bool,
        serving_time: Duration,
    ) -> Option<Tried<T>> {
        if self.failed.as_deref() == Some(rollout.id.as_str()) {
            return None;
        }
        self.credit += rollout.shadow;
        let shadowed = self.credit >= 1.0;
        if shadowed {
            self.credit -= 1.0;
        }
        let canary: Vec<bool> = rows
            .iter()
            .map(|(_, header, row)| in_canary(&rollout.id, T::canary_key(header, row), rollout.canary))
            .collect();
        let chosen: Vec<usize> = (0..rows.len()).filter(|r| shadowed || canary[*r]).collect();
        if chosen.is_empty() {
            return None;
        }
        let metadata = runner.metadata().clone();
        let lengths: Vec<usize> = chosen.iter().map(|r| T::length(&rows[*r].2)).collect();
        let planned = plan::calls(&lengths, settings.max_batch_size, T::max_tokens(settings));
        let mut answers: Vec<Option<Result<Answer, ModelError>>> = vec![None; rows.len()];
        for call in &planned {
            let results = self
                .calls
                .run(runner, call.len(), metadata.output_width(), &mut self.spare, None, |range, recycled| {
                    let members: Vec<&T::Row> = call[range].iter().map(|i| &rows[chosen[*i]].2).collect();
                    T::assemble(&members, &metadata, recycled)
                })
                .await;
            let results = match results {
                Ok(results) => results,
                Err(e) => {
                    let reason = format!("candidate version {} failed: {e}", rollout.candidate);
                    telemetry::candidate_failed(&metadata.name, &rollout.candidate, &reason);
                    link.fail(&rollout.id, &reason);
                    self.failed = Some(rollout.id.clone());
                    return None;
                }
            };
            for (i, result) in call.iter().zip(results) {
                answers[chosen[*i]] = Some(result);
            }
        }
        let candidate_time = self.calls.take_model_time();
        let valid = |a: &Option<Result<Answer, ModelError>>, m: &ModelMetadata| {
            a.as_ref().and_then(|a| a.as_ref().ok()).filter(|a| valid_answer(m, &a.values)).cloned()
        };
        let answers: Vec<Option<Answer>> = answers.iter().map(|a| valid(a, &metadata)).collect();
        link.record(&rollout.id, |tally| {
            for r in &chosen {
                let Some(serving) = valid(&serving[*r], serving_metadata) else { continue };
                match &answers[*r] {
                    Some(candidate) => {
                        T::compare(tally, (serving_metadata, &serving.values), (&metadata, &candidate.values));
                    }
                    None => tally.error(),
                }
            }
            if shadowed && all_computed {
                tally.timed(serving_time.as_secs_f64(), candidate_time.as_secs_f64());
            }
        });
        let version = rollout.candidate.clone();
        Some(Tried { metadata, version, shadowed, canary, answers, task: PhantomData })
    }
}
