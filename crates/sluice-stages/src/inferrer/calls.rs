//! Running one planned call on the model: split in halves where it fails, so
//! that only rows that fail alone get an error; split, and the rows per call
//! capped from then on, where it runs out of memory.

use std::ops::Range;

use sluice_model::{Batch, ModelError, ModelRunner};

use crate::telemetry;

/// One row's answer: computed by a model call or found in the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The model's output row.
    pub values: Vec<f32>,
    pub cached: bool,
    /// Rows in the model call that computed it (0 when cached).
    pub call_rows: u32,
    /// Tokens per row in that call (token batches; 0 for windows or cached).
    pub padded_length: u32,
}

/// A model's calls: the row cap learnt from out-of-memory errors, and the
/// memory budget.
#[derive(Debug)]
pub(crate) struct Calls {
    model: String,
    /// A call whose input is larger is treated as out of memory before it is
    /// made (0: no budget).
    budget_bytes: u64,
    /// Rows per call at most, once a call ran out of memory.
    row_cap: Option<usize>,
    /// The model's own time in calls since [`Calls::take_model_time`].
    model_time: std::time::Duration,
}

impl Calls {
    pub(crate) fn new(model: &str, budget_bytes: u64) -> Self {
        telemetry::model_failures_at_zero(model);
        Self { model: model.to_string(), budget_bytes, row_cap: None, model_time: std::time::Duration::ZERO }
    }

    /// The model's own time in the calls made since the last time this was asked.
    pub(crate) fn take_model_time(&mut self) -> std::time::Duration {
        std::mem::take(&mut self.model_time)
    }

    /// Rows per call at most, once lowered.
    pub(crate) fn row_cap(&self) -> Option<usize> {
        self.row_cap
    }

    /// Runs `rows` rows through the model, in calls of at most the row cap,
    /// each built by `build` from the rows it holds and the last call's
    /// buffers (from `spare` for the first, given back there at the end),
    /// except that `first`, an input built beforehand for the rows it names,
    /// is used as it is if those are the first call's rows. A
    /// call that fails is split in halves and retried, down to single rows. A
    /// call that runs out of memory (the runner says so, or its input is over
    /// the memory budget) is split too and lowers the row cap for every later
    /// call. Only a dead model fails the whole call.
    pub(crate) async fn run<R: ModelRunner>(
        &mut self,
        runner: &R,
        rows: usize,
        width: usize,
        spare: &mut Option<Batch>,
        mut first: Option<(Range<usize>, Batch)>,
        mut build: impl FnMut(Range<usize>, Option<Batch>) -> Batch,
    ) -> Result<Vec<Result<Answer, ModelError>>, ModelError> {
        let mut answers: Vec<Option<Result<Answer, ModelError>>> = vec![None; rows];
        // Ranges still to run, as a stack: a split pushes its second half first.
        let mut pending = Vec::with_capacity(8);
        pending.push(0..rows);
        while let Some(range) = pending.pop() {
            let n = range.len();
            if n == 0 {
                continue;
            }
            if let Some(cap) = self.row_cap
                && n > cap
            {
                // Later chunks first: the stack pops them in order.
                let starts: Vec<usize> = range.clone().step_by(cap).collect();
                pending.extend(starts.into_iter().rev().map(|s| s..(s + cap).min(range.end)));
                continue;
            }
            let batch = match first.take() {
                Some((rows, built)) if rows == range => built,
                // Built for a cap since lowered: its buffers serve again.
                Some((_, stale)) => build(range.clone(), Some(stale)),
                None => build(range.clone(), spare.take()),
            };
            let padded_length = batch.padded_length() as u32;
            let result = if self.budget_bytes > 0 && n > 1 && batch.bytes() as u64 > self.budget_bytes {
                Err(ModelError::OutOfMemory(format!(
                    "the input of {} bytes is over the memory budget of {} bytes",
                    batch.bytes(),
                    self.budget_bytes
                )))
            } else {
                runner.infer(batch, n).await
            };
            match result {
                Ok(inference) => {
                    self.model_time += inference.elapsed;
                    telemetry::model_call(&self.model, n, padded_length as usize, inference.elapsed);
                    for (row, values) in range.zip(inference.outputs.chunks_exact(width)) {
                        let answer =
                            Answer { values: values.to_vec(), cached: false, call_rows: n as u32, padded_length };
                        answers[row] = Some(Ok(answer));
                    }
                    *spare = Some(inference.input);
                }
                Err(ModelError::WorkerGone) => return Err(ModelError::WorkerGone),
                Err(e) if n == 1 => {
                    telemetry::row_failed_alone(&self.model, &e);
                    answers[range.start] = Some(Err(e));
                }
                Err(e) => {
                    if matches!(e, ModelError::OutOfMemory(_)) {
                        let cap = (n / 2).max(1);
                        let lowered = self.row_cap.is_none_or(|c| cap < c);
                        if lowered {
                            self.row_cap = Some(cap);
                        }
                        telemetry::out_of_memory(&self.model, n, lowered.then_some(cap), &e);
                    } else {
                        telemetry::bisected(&self.model, n, &e);
                    }
                    let mid = range.start + n / 2;
                    pending.push(mid..range.end);
                    pending.push(range.start..mid);
                }
            }
        }
        Ok(answers.into_iter().map(|a| a.expect("every row is answered or failed")).collect())
    }
}
