//! The model stage against a fake backend (no libtorch): bisection of a
//! failing call, the out-of-memory split and row cap, the memory budget, and
//! version switching (a good version, one that fails to load, one naming
//! another model, one reading another input).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::NaiveDate;
use sluice_control::Settings;
use sluice_core::{Incoming, Output, Stage};
use sluice_messages::codec;
use sluice_messages::dead_letter::Reason;
use sluice_messages::envelope::{Envelope, Payload, StockPrediction, StockWindow, WindowPrecision};
use sluice_model::metadata::{Normalization, OutputSpec};
use sluice_model::{
    Batch, Inference, ModelConfig, ModelError, ModelKind, ModelLoader, ModelMetadata, ModelRunner, Precision,
};
use tokio::sync::watch;

use super::{Inferrer, InferrerStats};
use crate::testing::settings;

/// Days and features of the fake model's windows.
const DAYS: usize = 2;
const FEATURES: usize = 3;
/// A window starting with this value makes the fake model fail its call.
const POISON: f32 = 999.0;

fn metadata(name: &str, version: &str, days: usize) -> Arc<ModelMetadata> {
    let output = |name: &str, min: f32, max: f32| OutputSpec {
        name: name.into(),
        meaning: String::new(),
        min: Some(min),
        max: Some(max),
    };
    Arc::new(ModelMetadata {
        name: name.into(),
        version: version.into(),
        kind: ModelKind::Stock,
        input_shape: vec![days, FEATURES],
        normalization: Some(Normalization { mean: vec![0.0; FEATURES], std: vec![1.0; FEATURES] }),
        tokenizer: None,
        labels: Vec::new(),
        outputs: vec![output("predicted_return", -10.0, 10.0), output("confidence", 0.0, 1.0)],
        reference: None,
        reference_phrases: None,
    })
}

/// A fake model: answers (first value of the window / 100 + version, 0.5),
/// fails a call holding a window that starts with [`POISON`], and runs out of
/// memory on calls of more than `oom_above` rows. Records each call's rows.
struct FakeRunner {
    metadata: Arc<ModelMetadata>,
    version: String,
    offset: f32,
    oom_above: usize,
    calls: Arc<Mutex<Vec<usize>>>,
}

impl ModelRunner for FakeRunner {
    fn metadata(&self) -> &Arc<ModelMetadata> {
        &self.metadata
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn device(&self) -> &str {
        "cpu"
    }

    async fn infer(&self, input: Batch, rows: usize) -> Result<Inference, ModelError> {
        self.calls.lock().expect("lock").push(rows);
        if rows > self.oom_above {
            return Err(ModelError::OutOfMemory(format!("{rows} rows do not fit")));
        }
        let Batch::Windows(values) = &input else { return Err(ModelError::Torch("not windows".into())) };
        let len = values.len() / rows;
        if values.chunks(len).any(|w| w[0] == POISON) {
            return Err(ModelError::Torch("a poison window in the call".into()));
        }
        let outputs = values.chunks(len).flat_map(|w| [w[0] / 100.0 + self.offset, 0.5]).collect();
        Ok(Inference { outputs, elapsed: Duration::from_micros(10), input })
    }

    async fn set_threads(&self, _: usize) -> Result<(), ModelError> {
        Ok(())
    }
}

/// Versions the fake loader knows: version -> (model name, days, answer offset).
#[derive(Clone)]
struct FakeLoader {
    versions: Arc<HashMap<&'static str, (&'static str, usize, f32)>>,
    oom_above: usize,
    calls: Arc<Mutex<Vec<usize>>>,
    loads: Arc<AtomicUsize>,
}

impl FakeLoader {
    fn new(oom_above: usize) -> Self {
        let versions = HashMap::from([
            ("1", ("fake", DAYS, 0.0)),
            ("2", ("fake", DAYS, 1.0)),
            ("renamed", ("other-model", DAYS, 2.0)),
            ("longer", ("fake", DAYS + 1, 3.0)),
        ]);
        Self { versions: Arc::new(versions), oom_above, calls: Arc::default(), loads: Arc::default() }
    }
}

impl ModelLoader for FakeLoader {
    type Runner = FakeRunner;

    fn load(&self, config: ModelConfig) -> impl Future<Output = Result<FakeRunner, ModelError>> + Send + 'static {
        let this = self.clone();
        async move {
            this.loads.fetch_add(1, Ordering::Relaxed);
            let Some((name, days, offset)) = this.versions.get(config.version.as_str()).copied() else {
                return Err(ModelError::Read {
                    path: config.version_dir(&config.version),
                    message: "no such version".into(),
                });
            };
            Ok(FakeRunner {
                metadata: metadata(name, &config.version, days),
                version: config.version.clone(),
                offset,
                oom_above: this.oom_above,
                calls: this.calls.clone(),
            })
        }
    }
}

fn config() -> ModelConfig {
    ModelConfig { dir: "/nonexistent/fake".into(), version: "1".into(), ..ModelConfig::default() }
}

async fn stage(
    loader: &FakeLoader,
    budget: u64,
) -> (Inferrer<FakeLoader>, watch::Sender<Settings>, Arc<InferrerStats>) {
    let runner = loader.load(config()).await.expect("version 1");
    let (tx, rx) = watch::channel(settings());
    let stats = Arc::new(InferrerStats::default());
    let model = ModelConfig { memory_budget_bytes: budget, ..config() };
    let stage = Inferrer::new(loader.clone(), runner, model, rx, None, "out", stats.clone()).expect("stage");
    (stage, tx, stats)
}

/// `n` windows whose first values are `0, 1, ..`; those in `poisoned` start with [`POISON`].
fn batch(n: usize, poisoned: &[usize]) -> Vec<Incoming> {
    (0..n)
        .map(|i| {
            let mut values = vec![0.25; DAYS * FEATURES];
            values[0] = if poisoned.contains(&i) { POISON } else { i as f32 };
            let window = StockWindow::new(
                &format!("S{i:04}"),
                NaiveDate::from_ymd_opt(2024, 5, 31).expect("date"),
                DAYS as u32,
                FEATURES as u32,
                values,
            );
            let envelope = Envelope::new(&format!("e{i}"), Payload::Normalized(window));
            Incoming::new("in", 0, i as i64, codec::encode(&envelope))
        })
        .collect()
}

/// What became of a batch: (input index, prediction) of each answer, and
/// (input index, reason) of each dead letter.
type Outcome = (Vec<(usize, StockPrediction)>, Vec<(usize, Reason)>);

fn outcome(outputs: &[Output]) -> Outcome {
    let (mut answers, mut dead) = (Vec::new(), Vec::new());
    for output in outputs {
        match output {
            Output::Send { source, payload, .. } => match codec::decode(payload).expect("envelope").payload {
                Payload::Prediction(p) => answers.push((*source, p)),
                other => panic!("not a prediction: {other:?}"),
            },
            Output::DeadLetter { source, reason, .. } => dead.push((*source, *reason)),
        }
    }
    answers.sort_by_key(|a| a.0);
    dead.sort_unstable();
    (answers, dead)
}

#[tokio::test]
async fn a_failing_call_is_bisected_until_only_the_rows_that_fail_alone_are_left() {
    let loader = FakeLoader::new(usize::MAX);
    let (mut stage, _tx, _) = stage(&loader, 0).await;
    let outputs = stage.process(&batch(10, &[3, 7])).await.expect("the batch succeeds");
    let (answers, dead) = outcome(&outputs);
    assert_eq!(dead, vec![(3, Reason::ModelError), (7, Reason::ModelError)]);
    assert_eq!(answers.iter().map(|a| a.0).collect::<Vec<_>>(), vec![0, 1, 2, 4, 5, 6, 8, 9]);
    for (i, p) in &answers {
        assert_eq!(p.predicted_return, *i as f32 / 100.0, "each answer is its own row's");
    }
    let calls = loader.calls.lock().expect("lock").clone();
    assert_eq!(calls[0], 10, "one call first: {calls:?}");
    assert!(calls.iter().filter(|n| **n == 1).count() >= 2, "the poisoned rows were tried alone: {calls:?}");
}

#[tokio::test]
async fn a_large_batch_decoded_in_parts_is_answered_as_when_decoded_whole() {
    let mut inputs = batch(600, &[450]);
    for i in [5, 300, 599] {
        inputs[i].payload = b"not an envelope".to_vec();
    }
    let mut seen = Vec::new();
    for threads in [1, 3] {
        let loader = FakeLoader::new(usize::MAX);
        let mut stage = stage(&loader, 0).await.0.with_decode_threads(threads);
        let outputs = stage.process(&inputs).await.expect("the batch succeeds");
        // Sources in the order the outputs came: the runtime publishes in it.
        let order: Vec<usize> = outputs
            .iter()
            .map(|o| match o {
                Output::Send { source, .. } | Output::DeadLetter { source, .. } => *source,
            })
            .collect();
        let (answers, dead) = outcome(&outputs);
        // What an answer says but when it was made.
        let answers: Vec<_> =
            answers.into_iter().map(|(i, p)| (i, p.symbol, p.predicted_return, p.batch_size)).collect();
        seen.push((order, answers, dead));
    }
    assert!(seen[0] == seen[1], "decoded in three parts, the batch was answered otherwise");
    let (_, answers, dead) = &seen[1];
    assert_eq!(dead.iter().map(|d| d.0).collect::<Vec<_>>(), vec![5, 300, 450, 599]);
    assert_eq!(dead[2].1, Reason::ModelError);
    assert_eq!(answers.len(), 596);
    for (i, _, predicted, _) in answers {
        assert_eq!(*predicted, *i as f32 / 100.0, "each answer is its own row's");
    }
}

#[tokio::test]
async fn events_past_their_deadline_are_not_computed_unless_replayed() {
    let now = sluice_messages::now_ms();
    // (requested ago, own deadline, attempt) of each input.
    let events = [
        (60_000, None, 0),           // older than max_age_ms: not computed
        (60_000, None, 1),           // as old, but a replay: computed
        (10, None, 0),               // young: computed
        (10, Some(now - 5), 0),      // its own deadline has passed: not computed
        (10, Some(now + 60_000), 0), // its own deadline is ahead: computed
    ];
    let mut inputs = batch(events.len(), &[]);
    for (input, (ago, deadline, attempt)) in inputs.iter_mut().zip(events) {
        let mut envelope = codec::decode(&input.payload).expect("envelope");
        (envelope.requested_at_ms, envelope.deadline_ms, envelope.attempt) = (now - ago, deadline, attempt);
        input.payload = codec::encode(&envelope);
    }
    let loader = FakeLoader::new(usize::MAX);
    let (mut stage, tx, _) = stage(&loader, 0).await;
    tx.send_modify(|s| s.max_age_ms = 30_000);
    let (answers, dead) = outcome(&stage.process(&inputs).await.expect("the batch succeeds"));
    assert_eq!(dead, vec![(0, Reason::DeadlineExceeded), (3, Reason::DeadlineExceeded)]);
    assert_eq!(answers.iter().map(|a| a.0).collect::<Vec<_>>(), vec![1, 2, 4]);
    assert_eq!(loader.calls.lock().expect("lock").clone(), vec![3], "only the three in time reached the model");
    // With no limit, only the event past its own deadline is refused.
    tx.send_modify(|s| s.max_age_ms = 0);
    let (_, dead) = outcome(&stage.process(&inputs).await.expect("the batch succeeds"));
    assert_eq!(dead, vec![(3, Reason::DeadlineExceeded)]);
}

#[tokio::test]
async fn out_of_memory_splits_the_call_and_caps_every_later_one() {
    let loader = FakeLoader::new(3);
    let (mut stage, _tx, _) = stage(&loader, 0).await;
    let outputs = stage.process(&batch(10, &[])).await.expect("the batch succeeds");
    let (answers, dead) = outcome(&outputs);
    assert!(dead.is_empty(), "{dead:?}");
    assert_eq!(answers.len(), 10, "nothing lost to the split");
    assert!(answers.iter().all(|(_, p)| p.batch_size <= 3));
    let cap = stage.calls.row_cap().expect("the cap was lowered");
    assert!(cap <= 3, "cap {cap}");
    // The next batch goes straight to calls within the cap.
    loader.calls.lock().expect("lock").clear();
    stage.process(&batch(10, &[])).await.expect("the next batch");
    let calls = loader.calls.lock().expect("lock").clone();
    assert!(calls.iter().all(|n| *n <= cap), "{calls:?} over the cap {cap}");
}

#[tokio::test]
async fn a_call_over_the_memory_budget_is_split_before_it_is_made() {
    let loader = FakeLoader::new(usize::MAX);
    // Four windows of 6 floats fit in 96 bytes; ten do not.
    let (mut stage, _tx, _) = stage(&loader, 96).await;
    let (answers, dead) = outcome(&stage.process(&batch(10, &[])).await.expect("the batch succeeds"));
    assert!(dead.is_empty() && answers.len() == 10);
    let calls = loader.calls.lock().expect("lock").clone();
    assert!(calls.iter().all(|n| *n <= 4), "no call over the budget reached the model: {calls:?}");
}

/// Serves single-row batches until the serving version is `want` (or gives
/// up); returns the versions that answered.
async fn serve_until(stage: &mut Inferrer<FakeLoader>, want: &str, batches: usize) -> Vec<String> {
    let mut versions = Vec::new();
    for _ in 0..batches {
        let (answers, _) = outcome(&stage.process(&batch(1, &[])).await.expect("process"));
        versions.extend(answers.into_iter().map(|(_, p)| p.model_version));
        if versions.last().is_some_and(|v| v == want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    versions
}

#[tokio::test]
async fn a_new_version_is_switched_in_and_bad_ones_are_refused() {
    let loader = FakeLoader::new(usize::MAX);
    let (mut stage, tx, stats) = stage(&loader, 0).await;
    for refused in ["no-such-version", "renamed", "longer"] {
        tx.send_modify(|s| s.model_version = refused.into());
        let served = serve_until(&mut stage, refused, 40).await;
        assert!(served.iter().all(|v| v == "1"), "{refused} was switched in: {served:?}");
    }
    assert_eq!(stats.switches.load(Ordering::Relaxed), 0);
    let loads = loader.loads.load(Ordering::Relaxed);
    assert_eq!(loads, 4, "each refused version was tried once, not again and again");

    tx.send_modify(|s| s.model_version = "2".into());
    let served = serve_until(&mut stage, "2", 200).await;
    assert_eq!(served.last().map(String::as_str), Some("2"), "{served:?}");
    assert_eq!((stats.switches.load(Ordering::Relaxed), stats.serving_version()), (1, "2".to_string()));
    let (answers, _) = outcome(&stage.process(&batch(1, &[])).await.expect("process"));
    assert_eq!(answers[0].1.predicted_return, 1.0, "version 2 answers");
}

#[tokio::test]
async fn windows_in_a_lower_precision_than_the_model_are_refused_unless_accepted() {
    let bf16_batch = |n: usize| -> Vec<Incoming> {
        (0..n)
            .map(|i| {
                let mut window = StockWindow::new(
                    &format!("S{i:04}"),
                    NaiveDate::from_ymd_opt(2024, 5, 31).expect("date"),
                    DAYS as u32,
                    FEATURES as u32,
                    vec![0.25; DAYS * FEATURES],
                );
                window.precision = WindowPrecision::Bf16;
                Incoming::new(
                    "in",
                    0,
                    i as i64,
                    codec::encode(&Envelope::new(&format!("e{i}"), Payload::Normalized(window))),
                )
            })
            .collect()
    };
    let cases = [
        (Precision::Fp32, false, Some(Reason::LossyInput)),
        (Precision::Fp16, false, Some(Reason::LossyInput)),
        (Precision::Fp32, true, None),
        (Precision::Bf16, false, None),
    ];
    for (precision, accept_lossy_inputs, refused) in cases {
        let loader = FakeLoader::new(usize::MAX);
        let runner = loader.load(config()).await.expect("version 1");
        let model = ModelConfig { precision, accept_lossy_inputs, ..config() };
        let stats = Arc::new(InferrerStats::default());
        let mut stage = Inferrer::new(loader.clone(), runner, model, watch::channel(settings()).1, None, "out", stats)
            .expect("stage");
        let (answers, dead) = outcome(&stage.process(&bf16_batch(3)).await.expect("the batch succeeds"));
        let case = format!("{precision:?} model, accept_lossy_inputs {accept_lossy_inputs}");
        match refused {
            Some(reason) => {
                assert_eq!(dead, vec![(0, reason), (1, reason), (2, reason)], "{case}");
                assert!(answers.is_empty() && loader.calls.lock().expect("lock").is_empty(), "{case}: the model ran");
            }
            None => assert!(dead.is_empty() && answers.len() == 3, "{case}: {dead:?}"),
        }
    }
}

#[tokio::test]
async fn a_series_is_answered_step_by_step_as_its_windows_would_be_alone() {
    use sluice_messages::envelope::{SeriesStep, StockSeries};
    let loader = FakeLoader::new(usize::MAX);
    let (mut stage, _tx, _) = stage(&loader, 0).await;
    // Five days; windows of two ending on days 1..=4; the window ending on
    // day 3 starts with the poison value, so its step alone fails.
    let firsts = [0.0, 1.0, POISON, 3.0, 4.0];
    let values: Vec<f32> = firsts.iter().flat_map(|f| [*f, 0.25, 0.25]).collect();
    let day = |d: u32| NaiveDate::from_ymd_opt(2024, 6, d).expect("date");
    let history = StockWindow::new("S0042", day(7), 5, FEATURES as u32, values);
    let steps =
        (1..5).map(|end| SeriesStep { event_id: format!("b:{end}"), as_of: day(2 + end), end_row: end }).collect();
    let series = StockSeries { history, window: DAYS as u32, steps };
    let input =
        Incoming::new("in", 0, 0, codec::encode(&Envelope::new("b", Payload::NormalizedSeries(series.clone()))));
    let outputs = stage.process(&[input]).await.expect("the batch succeeds");

    let mut answered = Vec::new();
    let mut dead = Vec::new();
    for output in &outputs {
        match output {
            Output::Send { payload, key, .. } => {
                let envelope = codec::decode(payload).expect("envelope");
                // The series came without a key: each answer is keyed by its own event id.
                assert_eq!(key.as_deref(), Some(envelope.event_id.as_bytes()));
                let Payload::Prediction(p) = envelope.payload else { panic!("not a prediction") };
                answered.push((envelope.event_id, p.symbol, p.as_of, p.predicted_return));
            }
            Output::DeadLetter { reason, event_id, original, .. } => {
                let original = codec::decode(original.as_ref().expect("the step's own window")).expect("envelope");
                dead.push((*reason, event_id.clone(), original));
            }
        }
    }
    answered.sort_by(|a, b| a.0.cmp(&b.0));
    // Each step's answer is the fake model's for the window ending on its row.
    let expected: Vec<_> = [(1, 0.0), (2, 1.0), (4, 3.0)]
        .iter()
        .map(|(end, first): &(u32, f32)| (format!("b:{end}"), "S0042".to_string(), day(2 + end), first / 100.0))
        .collect();
    assert_eq!(answered, expected, "{dead:?}");
    // The window ending on row 3 starts at row 2, the poison.
    let [(reason, event_id, original)] = &dead[..] else { panic!("{dead:?}") };
    assert_eq!((*reason, event_id.as_deref()), (Reason::ModelError, Some("b:3")));
    assert_eq!(original.event_id, "b:3");
    let Payload::Normalized(window) = &original.payload else { panic!("{}", original.payload.kind()) };
    assert_eq!(Some(window), series.step_window(&series.steps[2]).as_ref(), "replayed alone, it is that step's window");
}

/// `batch(n)`'s windows, read at offsets from `from`.
fn batch_at(n: usize, from: i64) -> Vec<Incoming> {
    batch(n, &[]).into_iter().map(|i| Incoming { offset: i.offset + from, ..i }).collect()
}

#[tokio::test]
async fn the_next_batch_is_prepared_while_the_model_runs_and_again_if_the_version_changed() {
    use sluice_control::cache::{LruConfig, PredictionCache};
    let loader = FakeLoader::new(usize::MAX);
    let runner = loader.load(config()).await.expect("version 1");
    let (tx, rx) = watch::channel(Settings { cache_enabled: true, ..settings() });
    let cache = Arc::new(PredictionCache::new(LruConfig::default(), None));
    let stats = Arc::new(InferrerStats::default());
    let mut stage = Inferrer::new(loader.clone(), runner, config(), rx, Some(cache), "out", stats).expect("stage");
    let answers = |outputs: &[Output]| outcome(outputs).0.into_iter().map(|(_, p)| p).collect::<Vec<_>>();

    // b is a's windows again, prepared (looked up in the cache) while the
    // model ran a, before a's answers were in the cache: so it is computed
    // again, from the preparation, with the same answers.
    let (a, b) = (batch_at(4, 0), batch_at(4, 4));
    let first = answers(&stage.process_before(&a, Some(&b)).await.expect("a"));
    let second = answers(&stage.process_before(&b, None).await.expect("b"));
    assert!(first.iter().chain(&second).all(|p| !p.cached), "b's preparation was used");
    let values = |ps: &[StockPrediction]| ps.iter().map(|p| p.predicted_return).collect::<Vec<_>>();
    assert_eq!(values(&first), values(&second));
    // Prepared again, b finds a's answers in the cache.
    let again = answers(&stage.process(&b).await.expect("b again"));
    assert!(again.iter().all(|p| p.cached), "{again:?}");

    // d (a's windows, all cached under version 1) is prepared while c runs;
    // version 2 is swapped in before d: d's preparation is stale, and d is
    // answered by version 2, not from version 1's cached answers.
    tx.send_modify(|s| s.model_version = "2".into());
    let (c, d) = (batch_at(1, 8), batch_at(4, 9));
    let served = answers(&stage.process_before(&c, Some(&d)).await.expect("c"));
    assert_eq!(served[0].model_version, "1", "c was served before the switch");
    // The fake version loads at once, on this test's thread, while it sleeps.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let d_answers = answers(&stage.process_before(&d, None).await.expect("d"));
    assert_eq!(d_answers.len(), 4);
    for (i, p) in d_answers.iter().enumerate() {
        assert_eq!(p.model_version, "2");
        assert!(!p.cached && p.predicted_return == i as f32 / 100.0 + 1.0, "version 2's own answer: {p:?}");
    }
}
