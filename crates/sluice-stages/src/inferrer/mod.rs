//! The model stage: one stage for every model kind. It answers the batches
//! the runtime cuts (size, or deadline from the oldest message) from the
//! prediction cache where it can, and runs its model on the rest while the
//! runtime accumulates the next batch. Identical inputs in a batch share one
//! model row. An answer that is not finite or outside its output's declared
//! range is a dead letter. A `model_version` override loads the new version
//! beside the serving one, warms it up, and swaps it in between two batches.
//! With a backlog, the next batch is prepared (decoded, looked up, its first
//! call laid out) while the model runs the current one ([`Prepared`]).
//!
//! While the model's rollout runs, its candidate version ([`served`]) also
//! runs on a share of batches (shadow: its answers go to the shadow topic)
//! and on the rows whose key is in the canary share (it answers those, each
//! answer naming the candidate's version), and every answer both gave is
//! compared ([`Task::compare`]) into the rollout's tally ([`trial`]).
//!
//! What differs between kinds is a [`Task`]: how a payload becomes a row, its
//! cache key and length, how rows are laid out as one call's input, and what
//! the answer is. [`stock::StockTask`] serves normalised windows (one call per
//! batch, unless the row cap splits it); [`query::QueryTask`] serves token
//! ids, padded per call to the call's longest sequence, calls capped by rows
//! and by padded tokens. A third kind is one more `Task`.
//!
//! - [`plan`]: cutting what the cache did not answer into model calls.
//! - [`calls`]: running a call, split in halves where it fails, with the row cap.
//! - [`served`]: the serving version, and switching to another.
//! - [`answers`]: the cache's part, the same for every kind.
//! - [`trial`]: a rollout's candidate on a batch, and the comparison.

mod answers;
mod calls;
mod plan;
pub mod query;
mod served;
pub mod stock;
mod trial;

use std::marker::PhantomData;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use sluice_control::Settings;
use sluice_control::cache::{CacheKey, PredictionCache};
use sluice_control::rollout::{RolloutLink, Tally};
use sluice_core::{BatchFailure, Incoming, Output, Stage};
use sluice_messages::dead_letter::Reason;
use sluice_messages::envelope::{Header, Payload};
use sluice_model::{Batch, ModelConfig, ModelError, ModelKind, ModelLoader, ModelMetadata, ModelRunner};
use tokio::sync::watch;

use self::answers::Answers;
pub use self::calls::Answer;
use self::calls::Calls;
use self::served::ServedModel;
use crate::common::{Cut, dead_letter, dead_letter_of, decode_or_dead, forward};
use crate::{StageError, telemetry};

/// Counts for reports and tests.
#[derive(Debug, Default)]
pub struct InferrerStats {
    /// Rows the model computed (cache hits and coalesced duplicates excluded).
    pub model_rows: AtomicU64,
    /// Events answered from the cache.
    pub cache_hits: AtomicU64,
    /// Cache entries that were not valid answers, ignored and recomputed.
    pub invalid_cache_entries: AtomicU64,
    /// Model versions swapped in.
    pub switches: AtomicU64,
    /// The version answering now (which may lag the requested one while it
    /// loads, or stay behind if it failed to load).
    pub serving_version: std::sync::Mutex<String>,
}

impl InferrerStats {
    pub fn serving_version(&self) -> String {
        self.serving_version.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_serving(&self, version: &str) {
        *self.serving_version.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = version.to_string();
    }
}

/// What one model kind does in the model stage.
pub trait Task: Send + Sync + 'static {
    /// The stage's name: its consumer group, metrics and logs.
    const STAGE: &'static str;
    /// The `kind` its models declare in `metadata.json`.
    const KIND: ModelKind;
    /// The dead-letter reasons the stage gives (docs/instrumentation.md).
    const DEAD_LETTER_REASONS: &'static [Reason];
    /// One input the model can take.
    type Row: Send + Sync;

    /// Whether a model (the one given at start, or a version switched to)
    /// can serve this task: the outputs it must have, its tokenizer.
    fn check(metadata: &ModelMetadata, dir: &Path) -> Result<(), ModelError>;

    /// Whether version `new` reads the same input as `serving`: the stages
    /// upstream prepare inputs for the serving one, so a different input is a
    /// new model, not a version.
    fn same_input(
        config: &ModelConfig,
        serving: (&ModelMetadata, &str),
        new: (&ModelMetadata, &str),
    ) -> Result<(), ModelError>;

    /// The rows of one input, each under its event's header (several for an
    /// input that carries several events: a backfill's series), or why the
    /// model cannot take any of it.
    fn accept(
        header: &Header,
        payload: Payload,
        metadata: &ModelMetadata,
    ) -> Result<Vec<(Header, Self::Row)>, StageError>;

    /// Whether the model, run as `config` says, may take `row` (a stock
    /// window of another shape, or in a lower precision than the model
    /// computes in, may not).
    fn check_input(_row: &Self::Row, _metadata: &ModelMetadata, _config: &ModelConfig) -> Result<(), StageError> {
        Ok(())
    }

    /// What a dead letter of `row` keeps to replay, where its input carries
    /// other events too (a step of a series: its own window); `None`: the input.
    fn original(_row: &Self::Row) -> Option<Payload> {
        None
    }

    /// The cache key of a row under a model's name and version.
    fn cache_key(row: &Self::Row, model: &str, version: &str) -> CacheKey;

    /// The row's length in tokens (1 for a window): a call's cost is its rows
    /// times its longest row.
    fn length(row: &Self::Row) -> usize;

    /// A call's token budget under `settings` (unbounded for windows).
    fn max_tokens(settings: &Settings) -> usize;

    /// Lays `rows` out as one call's input, reusing `recycled`'s buffers.
    fn assemble(rows: &[&Self::Row], metadata: &ModelMetadata, recycled: Option<Batch>) -> Batch;

    /// What is sent on for a row and its answer (finite and within range).
    fn answer(
        row: &Self::Row,
        answer: &Answer,
        metadata: &ModelMetadata,
        version: &str,
        inferred_at_ms: i64,
    ) -> Payload;

    /// What decides whether a row is in a rollout's canary share: a stable
    /// key of what is asked (a stock's symbol, a query's event id).
    fn canary_key<'a>(header: &'a Header, row: &'a Self::Row) -> &'a [u8];

    /// Counts one row both versions answered (each answer valid for its own
    /// model's metadata) into a rollout's tally.
    fn compare(tally: &mut Tally, serving: (&ModelMetadata, &[f32]), candidate: (&ModelMetadata, &[f32]));
}

/// The stock model's stage (`inferrer`).
pub type Inferrer<L> = ModelStage<stock::StockTask, L>;
/// The query model's stage (`query-inferrer`).
pub type QueryInferrer<L> = ModelStage<query::QueryTask, L>;

/// The model stage for task `T`, with versions loaded by `L`.
pub struct ModelStage<T: Task, L: ModelLoader> {
    served: ServedModel<L>,
    calls: Calls,
    cache: Option<Arc<PredictionCache>>,
    output: Arc<str>,
    /// The last call's input buffers, reused by the next batch's first call.
    spare: Option<Batch>,
    /// The next batch, prepared while the model ran the last one.
    ahead: Option<Prepared<T>>,
    decode_threads: usize,
    /// A rollout's candidate: its calls, its spare buffers, and where its
    /// answers go.
    trial: trial::TrialCalls,
    task: PhantomData<T>,
}

impl<T: Task, L: ModelLoader> std::fmt::Debug for ModelStage<T, L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelStage")
            .field("stage", &T::STAGE)
            .field("serving", &self.served.runner().version())
            .finish_non_exhaustive()
    }
}

impl<T: Task, L: ModelLoader> ModelStage<T, L> {
    /// Takes a loaded (warmed-up) version of the model, the configuration it
    /// was loaded from, the loader for other versions, the live settings, and
    /// the prediction cache if there is one.
    pub fn new(
        loader: L,
        runner: L::Runner,
        model: ModelConfig,
        settings: watch::Receiver<Settings>,
        cache: Option<Arc<PredictionCache>>,
        output_topic: &str,
        stats: Arc<InferrerStats>,
    ) -> Result<Self, ModelError> {
        let metadata = runner.metadata();
        if metadata.kind != T::KIND {
            return Err(ModelError::Metadata {
                path: model.version_dir(runner.version()).join("metadata.json"),
                message: format!(
                    "the {} stage serves {} models, not {}",
                    T::STAGE,
                    T::KIND.as_str(),
                    metadata.kind.as_str()
                ),
            });
        }
        T::check(metadata, &model.version_dir(runner.version()))?;
        let calls = Calls::new(&metadata.name, model.memory_budget_bytes);
        let trial = trial::TrialCalls::new(&metadata.name, model.memory_budget_bytes);
        Ok(Self {
            served: ServedModel::new(loader, runner, model, settings, checked::<T>, stats),
            calls,
            cache,
            output: output_topic.into(),
            spare: None,
            ahead: None,
            decode_threads: 1,
            trial,
            task: PhantomData,
        })
    }

    /// Follows the model's rollout (`sluice rollout`): the candidate's
    /// shadow answers go to `shadow_topic`.
    #[must_use]
    pub fn with_rollout(mut self, link: RolloutLink, shadow_topic: &str) -> Self {
        self.served.follow_rollout_of(link);
        self.trial.shadow_topic = shadow_topic.into();
        self
    }

    /// Decodes a batch of at least twice [`DECODED_APART`] inputs in up to
    /// `threads` parts at once (for machines with cores to spare beside the
    /// model's; 1, the default, decodes on the stage's thread alone).
    #[must_use]
    pub fn with_decode_threads(mut self, threads: usize) -> Self {
        self.decode_threads = threads.max(1);
        self
    }
}

/// [`Task::check`] and [`Task::same_input`] of a version to switch to.
fn checked<T: Task>(
    config: &ModelConfig,
    serving: (&ModelMetadata, &str),
    new: (&ModelMetadata, &str),
) -> Result<(), ModelError> {
    T::check(new.0, &config.version_dir(new.1))?;
    T::same_input(config, serving, new)
}

impl<T: Task, L: ModelLoader> Stage for ModelStage<T, L> {
    fn name(&self) -> &'static str {
        T::STAGE
    }

    fn dead_letter_reasons(&self) -> &'static [Reason] {
        T::DEAD_LETTER_REASONS
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        self.process_before(batch, None).await
    }

    /// Answers `batch`; while its first call runs on the model thread,
    /// prepares `next` (decoded, looked up in the cache, cut into calls, its
    /// first call laid out), so that the model is given `next` as soon as it
    /// is free (the next call of this method).
    async fn process_before(
        &mut self,
        batch: &[Incoming],
        next: Option<&[Incoming]>,
    ) -> Result<Vec<Output>, BatchFailure> {
        let settings = self.served.follow_settings().await;
        let Self { served, calls, cache, output, spare, ahead, decode_threads, trial, .. } = self;
        let runner = served.runner();
        let metadata = runner.metadata();
        let at = Serving {
            metadata,
            version: runner.version(),
            config: served.config(),
            settings: &settings,
            cache: cache.as_deref().filter(|_| settings.cache_enabled),
            stats: served.stats(),
            row_cap: calls.row_cap(),
            decode_threads: *decode_threads,
        };
        // Prepared while the last batch ran, unless what it was prepared
        // with has changed since (settings, version, row cap).
        let prepared = match ahead.take() {
            Some(prepared) if prepared.fits(batch, &at) => prepared,
            _ => prepare::<T>(batch, &at, spare).await,
        };
        let Prepared { mut outputs, rows, answers, calls: planned, first, .. } = prepared;
        let Some(mut answers) = answers else {
            return Ok(outputs);
        };

        // The model on what the cache did not answer, in the planned calls;
        // a call that fails is split until only what fails alone is left.
        let width = metadata.output_width();
        let valid = |values: &[f32]| valid_answer(metadata, values);
        let groups = &answers.to_compute;
        let row_of = |group: usize| &rows[groups[group].rows[0]].2;
        let compute = async {
            let mut computed: Vec<Option<Result<Answer, ModelError>>> = vec![None; groups.len()];
            let (mut first, mut recycled, mut assembling) = (first, None, Duration::ZERO);
            for call in &planned {
                let results = calls
                    .run(runner, call.len(), width, &mut recycled, first.take(), |range, recycled| {
                        let started = Instant::now();
                        let members: Vec<&T::Row> = call[range].iter().map(|g| row_of(*g)).collect();
                        let input = T::assemble(&members, metadata, recycled);
                        assembling += started.elapsed();
                        input
                    })
                    .await
                    .map_err(|e| BatchFailure::fatal(StageError::from(e)))?;
                for (group, result) in call.iter().zip(results) {
                    computed[*group] = Some(result);
                }
            }
            let computed: Vec<_> = computed.into_iter().map(|c| c.expect("every group is in one call")).collect();
            Ok::<_, BatchFailure>((computed, assembling, recycled))
        };
        // Biased: the first call is handed to the model thread before the
        // next batch's preparation takes this thread.
        let mut buffer = spare.take();
        let preparing = async {
            match next {
                Some(next) => Some(prepare::<T>(next, &at, &mut buffer).await),
                None => None,
            }
        };
        let started = Instant::now();
        let (computed, prepared) = tokio::join!(biased; compute, preparing);
        let waited = started.elapsed();
        let prepared_for = prepared.as_ref().map_or(Duration::ZERO, |p| p.took);
        *ahead = prepared;
        let (computed, assembling, recycled) = computed?;
        *spare = recycled.or(buffer);
        // Waiting for the model, less what this thread did meanwhile.
        let modelling = waited.saturating_sub(assembling + prepared_for);

        let mut lap = stopwatch();
        let (version, ttl) = (at.version, Duration::from_secs(settings.cache_ttl_s));
        let serving_time = calls.take_model_time();
        answers.fill(at.cache, &metadata.name, version, computed, valid, ttl, at.stats).await;
        let filling = lap();

        // The rollout's candidate, on what it runs on in this batch.
        let candidate = match served.trial() {
            Some((rollout, candidate)) => {
                let all_computed = answers.to_compute.len() == rows.len();
                let (link, served_rows) = (served.rollout(), &answers.rows);
                trial
                    .run::<T, _>(
                        &rollout,
                        candidate,
                        link,
                        &rows,
                        served_rows,
                        metadata,
                        &settings,
                        all_computed,
                        serving_time,
                    )
                    .await
            }
            None => None,
        };
        let trying = lap();

        let inferred_at_ms = sluice_messages::now_ms();
        for (r, ((i, header, row), answer)) in rows.into_iter().zip(answers.rows).enumerate() {
            if let Some(candidate) = &candidate {
                if let Some(shadow) = candidate.shadow(r, &row, inferred_at_ms) {
                    outputs.push(forward(i, &batch[i], &trial.shadow_topic, &header, shadow));
                }
                if let Some(canary) = candidate.canary(r, &row, inferred_at_ms) {
                    outputs.push(forward(i, &batch[i], output, &header, canary));
                    continue;
                }
            }
            let answer = match answer.expect("every row is answered or failed") {
                Ok(answer) => answer,
                Err(e) => {
                    outputs.push(dead_letter_of(i, &StageError::Model(e), &header, T::original(&row)));
                    continue;
                }
            };
            if let Some((output, value, min, max)) = metadata.invalid_value(&answer.values) {
                let e = if value.is_finite() {
                    StageError::OutOfRange { output: output.to_string(), value, min, max }
                } else {
                    StageError::NonFinitePrediction { output: output.to_string(), value }
                };
                outputs.push(dead_letter_of(i, &e, &header, T::original(&row)));
                continue;
            }
            let payload = T::answer(&row, &answer, metadata, version, inferred_at_ms);
            outputs.push(forward(i, &batch[i], output, &header, payload));
        }
        let phases = [
            ("assemble", assembling),
            ("model", modelling),
            ("cache", filling),
            ("candidate", trying),
            ("answer", lap()),
        ];
        telemetry::model_stage_phases(&metadata.name, &phases);
        Ok(outputs)
    }
}

/// What preparing a batch reads from the stage.
struct Serving<'a> {
    metadata: &'a ModelMetadata,
    version: &'a str,
    config: &'a ModelConfig,
    settings: &'a Settings,
    /// The prediction cache, when it is enabled.
    cache: Option<&'a PredictionCache>,
    stats: &'a Arc<InferrerStats>,
    row_cap: Option<usize>,
    /// Threads that decode a large batch (at least 1).
    decode_threads: usize,
}

/// A batch made ready for the model: its inputs decoded (dead letters for
/// those the model cannot take), looked up in the cache, what is left cut
/// into calls, and the first call's input laid out.
struct Prepared<T: Task> {
    /// The batch it was made from.
    of: Vec<(Arc<str>, i32, i64)>,
    /// What it was made with.
    settings: Settings,
    version: String,
    row_cap: Option<usize>,
    outputs: Vec<Output>,
    rows: Vec<(usize, Header, T::Row)>,
    /// None when no row is left for the model or the cache.
    answers: Option<Answers>,
    /// Each call's groups (indices into `answers.to_compute`).
    calls: Vec<Vec<usize>>,
    /// The first call's input, and the rows of that call it holds.
    first: Option<(Range<usize>, Batch)>,
    /// This thread's time on it.
    took: Duration,
}

impl<T: Task> Prepared<T> {
    /// Whether this is `batch`'s, made with what is in force now. (The cache
    /// may since have learnt answers it missed: computing them again costs
    /// time, not correctness.)
    fn fits(&self, batch: &[Incoming], at: &Serving<'_>) -> bool {
        self.of.len() == batch.len()
            && self.of.iter().zip(batch).all(|((t, p, o), i)| *t == i.topic && *p == i.partition && *o == i.offset)
            && self.settings == *at.settings
            && self.version == at.version
            && self.row_cap == at.row_cap
    }
}

/// Prepares `batch` for the model (see [`Prepared`]), its first call's input
/// laid out in `buffer`'s memory where there is one.
async fn prepare<T: Task>(batch: &[Incoming], at: &Serving<'_>, buffer: &mut Option<Batch>) -> Prepared<T> {
    let (metadata, version) = (at.metadata, at.version);
    // Where the batch's time goes outside the model (telemetry::model_stage_phases).
    let mut lap = stopwatch();
    let mut prepared = Prepared {
        of: batch.iter().map(|i| (i.topic.clone(), i.partition, i.offset)).collect(),
        settings: at.settings.clone(),
        version: version.to_string(),
        row_cap: at.row_cap,
        outputs: Vec::with_capacity(batch.len()),
        rows: Vec::with_capacity(batch.len()),
        answers: None,
        calls: Vec::new(),
        first: None,
        took: Duration::ZERO,
    };
    // Events past their deadline (their own, or the live max_age_ms) are not computed.
    let cut = Cut::now(at.settings.max_age_ms);
    decode_all::<T>(batch, at, cut, &mut prepared.outputs, &mut prepared.rows);
    let rows = &prepared.rows;
    let decoding = lap();
    if rows.is_empty() {
        prepared.took = decoding;
        telemetry::model_stage_phases(&metadata.name, &[("decode", decoding)]);
        return prepared;
    }

    let valid = |values: &[f32]| valid_answer(metadata, values);
    let key = |row: usize| T::cache_key(&rows[row].2, &metadata.name, version);
    let ttl = Duration::from_secs(at.settings.cache_ttl_s);
    let answers = Answers::look_up(at.cache, &metadata.name, version, rows.len(), key, valid, ttl, at.stats).await;
    let looking_up = lap();

    let groups = &answers.to_compute;
    let row_of = |group: usize| &rows[groups[group].rows[0]].2;
    let lengths: Vec<usize> = (0..groups.len()).map(|g| T::length(row_of(g))).collect();
    let calls = plan::calls(&lengths, at.settings.max_batch_size, T::max_tokens(at.settings));
    // The rows of the first call that `Calls::run` makes first.
    if let Some(call) = calls.first() {
        let range = 0..call.len().min(at.row_cap.unwrap_or(usize::MAX));
        let members: Vec<&T::Row> = call[range.clone()].iter().map(|g| row_of(*g)).collect();
        prepared.first = Some((range, T::assemble(&members, metadata, buffer.take())));
    }
    let assembling = lap();
    prepared.calls = calls;
    prepared.answers = Some(answers);
    prepared.took = decoding + looking_up + assembling;
    let phases = [("decode", decoding), ("cache", looking_up), ("assemble", assembling)];
    telemetry::model_stage_phases(&metadata.name, &phases);
    prepared
}

/// A batch is decoded in parts on several threads only where each part has
/// at least this many inputs: below, starting the threads costs more than
/// they save.
const DECODED_APART: usize = 128;

/// Decodes `batch` into the rows the model can take, and a dead letter for
/// each of the others, in the batch's order; in up to `at.decode_threads`
/// parts at once on a large batch.
fn decode_all<T: Task>(
    batch: &[Incoming],
    at: &Serving<'_>,
    cut: Cut,
    outputs: &mut Vec<Output>,
    rows: &mut Vec<(usize, Header, T::Row)>,
) {
    let parts = at.decode_threads.min(batch.len() / DECODED_APART).max(1);
    if parts == 1 {
        return decode_part::<T>(batch, 0, at, cut, outputs, rows);
    }
    let size = batch.len().div_ceil(parts);
    std::thread::scope(|scope| {
        let decoding: Vec<_> = batch
            .chunks(size)
            .enumerate()
            .skip(1)
            .map(|(n, part)| {
                scope.spawn(move || {
                    let (mut outputs, mut rows) = (Vec::new(), Vec::with_capacity(part.len()));
                    decode_part::<T>(part, n * size, at, cut, &mut outputs, &mut rows);
                    (outputs, rows)
                })
            })
            .collect();
        // The first part on this thread, while the others decode theirs.
        decode_part::<T>(&batch[..size], 0, at, cut, outputs, rows);
        for part in decoding {
            let (more_outputs, more_rows) = part.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            outputs.extend(more_outputs);
            rows.extend(more_rows);
        }
    });
}

/// [`decode_all`] of `part`, the inputs of a batch from `offset` on.
fn decode_part<T: Task>(
    part: &[Incoming],
    offset: usize,
    at: &Serving<'_>,
    cut: Cut,
    outputs: &mut Vec<Output>,
    rows: &mut Vec<(usize, Header, T::Row)>,
) {
    for (i, input) in part.iter().enumerate() {
        let i = offset + i;
        let Some((header, payload)) = decode_or_dead(i, input, outputs, T::STAGE, cut) else { continue };
        let accepted = match T::accept(&header, payload, at.metadata) {
            Ok(accepted) => accepted,
            Err(e) => {
                outputs.push(dead_letter(i, &e, Some(header.event_id)));
                continue;
            }
        };
        for (header, row) in accepted {
            match T::check_input(&row, at.metadata, at.config) {
                Ok(()) => rows.push((i, header, row)),
                Err(e) => outputs.push(dead_letter_of(i, &e, &header, T::original(&row))),
            }
        }
    }
}

/// Whether `values` can be an answer of `metadata`'s model: its width, each
/// output within its declared range.
fn valid_answer(metadata: &ModelMetadata, values: &[f32]) -> bool {
    values.len() == metadata.output_width() && metadata.invalid_value(values).is_none()
}

/// A lap timer: each call returns the time since the last call (the first,
/// since it was made).
fn stopwatch() -> impl FnMut() -> Duration {
    let mut clock = Instant::now();
    move || {
        let now = Instant::now();
        now.duration_since(std::mem::replace(&mut clock, now))
    }
}

#[cfg(test)]
mod tests;
