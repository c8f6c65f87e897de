//! The inferrer and writer stages driven directly (no broker): how a batch
//! maps to outputs, the dead letters of a non-finite prediction and of a wrong
//! payload, the prediction cache (hits, coalescing, invalidation by version),
//! a live model-version switch, the `min_confidence` filter and the file sink.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::NaiveDate;
use sluice_control::Settings;
use sluice_control::cache::{CacheKey, LruConfig, PredictionCache};
use sluice_core::{Incoming, Output, Stage};
use sluice_messages::codec;
use sluice_messages::envelope::{Envelope, Payload, QueryText, StockPrediction, StockWindow};
use sluice_messages::prediction::PredictionRecord;
use sluice_model::Batch;
use sluice_stages::{Inferrer, InferrerStats, Writer, WriterStats};
use sluice_testkit::{model_config, settings, temp_dir};
use sluice_torch::{Model, ModelWorker, TorchLoader};
use tokio::sync::watch;

fn envelope(id: &str, payload: Payload) -> Envelope {
    Envelope {
        event_id: id.into(),
        traceparent: None,
        requested_at_ms: 1,
        updated_at_ms: 1,
        attempt: 0,
        deadline_ms: None,
        payload,
    }
}

fn incoming(offset: i64, payload: Vec<u8>) -> Incoming {
    Incoming { key: None, payload, topic: "in".into(), partition: 0, offset, timestamp_ms: None, traceparent: None }
}

fn date() -> NaiveDate {
    NaiveDate::from_ymd_opt(2024, 5, 31).expect("date")
}

fn window(value: f32) -> Payload {
    Payload::Normalized(StockWindow::new("S0001", date(), 30, 105, vec![value; 3150]))
}

async fn inferrer(
    settings: watch::Receiver<Settings>,
    cache: Option<Arc<PredictionCache>>,
) -> (Inferrer<TorchLoader>, Arc<InferrerStats>) {
    let worker = ModelWorker::start(model_config("1")).await.expect("model");
    let stats = Arc::new(InferrerStats::default());
    let inferrer =
        Inferrer::new(TorchLoader, worker, model_config("1"), settings, cache, "out", stats.clone()).expect("inferrer");
    (inferrer, stats)
}

/// Decodes the predictions among `outputs`: (input index, prediction).
fn predictions(outputs: &[Output]) -> Vec<(usize, String, StockPrediction)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send { source, payload, .. } => {
                let e = codec::decode(payload).expect("envelope");
                match e.payload {
                    Payload::Prediction(p) => Some((*source, e.event_id, p)),
                    other => panic!("not a prediction: {other:?}"),
                }
            }
            Output::DeadLetter { .. } => None,
        })
        .collect()
}

#[tokio::test]
async fn the_inferrer_answers_each_row_and_dead_letters_the_rest() {
    let (mut inferrer, stats) = inferrer(watch::channel(Settings { cache_enabled: false, ..settings() }).1, None).await;
    let batch = vec![
        incoming(0, codec::encode(&envelope("good-1", window(0.1)))),
        incoming(1, codec::encode(&envelope("nan", window(f32::NAN)))),
        incoming(2, b"not an envelope".to_vec()),
        incoming(3, codec::encode(&envelope("good-2", window(-0.2)))),
        incoming(4, codec::encode(&envelope("query", Payload::Query(QueryText { text: "x".into() })))),
    ];
    let outputs = inferrer.process(&batch).await.expect("a batch with bad rows still succeeds");
    assert_eq!(outputs.len(), 5, "one output per input: {outputs:?}");
    for output in &outputs {
        if let Output::DeadLetter { source, reason, detail, .. } = output {
            let expected = match source {
                1 => "non_finite_prediction",
                2 => "undecodable_envelope",
                4 => "unexpected_payload",
                other => panic!("input {other} should have been answered: {detail}"),
            };
            assert_eq!(*reason, expected, "{detail}");
        }
    }
    let mut answered: Vec<(usize, String)> = predictions(&outputs)
        .into_iter()
        .map(|(i, id, p)| {
            assert!(p.confidence > 0.0 && p.confidence < 1.0 && p.predicted_return.is_finite() && !p.cached);
            assert_eq!(p.batch_size, 3, "the model ran once on the three normalized rows");
            (i, id)
        })
        .collect();
    answered.sort();
    assert_eq!(answered, vec![(0, "good-1".to_string()), (3, "good-2".to_string())]);
    assert_eq!(stats.model_rows.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn a_thousand_identical_events_cost_one_model_row() {
    let cache = Arc::new(PredictionCache::new(LruConfig::default(), None));
    let (mut inferrer, stats) = inferrer(watch::channel(settings()).1, Some(cache.clone())).await;
    let mut seen = Vec::new();
    for chunk in 0..16 {
        let batch: Vec<Incoming> = (0..64)
            .map(|i| {
                let n = chunk * 64 + i;
                incoming(n, codec::encode(&envelope(&format!("same-{n}"), window(0.3))))
            })
            .take_while(|input| input.offset < 1000)
            .collect();
        seen.extend(predictions(&inferrer.process(&batch).await.expect("process")));
    }
    assert_eq!(seen.len(), 1000);
    assert_eq!(stats.model_rows.load(Ordering::Relaxed), 1, "identical inputs share one model row");
    let first = &seen[0].2;
    assert!(!first.cached && first.batch_size == 1, "the first batch computes it once: {first:?}");
    let cached = seen.iter().filter(|(_, _, p)| p.cached).count();
    assert_eq!(cached, 1000 - 64, "later batches are answered from the cache");
    assert!(
        seen.iter().all(|(_, _, p)| p.confidence == first.confidence && p.predicted_return == first.predicted_return)
    );
    assert_eq!(cache.stats().entries, 1);
}

#[tokio::test]
async fn a_cached_value_of_the_wrong_width_is_a_miss_not_a_crash() {
    let cache = Arc::new(PredictionCache::new(LruConfig::default(), None));
    let key = CacheKey::of("stock-lstm", "1", &[0.3; 3150]);
    cache.put_many("stock-lstm", "1", vec![(key, vec![1.0, 2.0, 3.0])], Duration::from_secs(60)).await;
    let (mut inferrer, stats) = inferrer(watch::channel(settings()).1, Some(cache)).await;
    let batch = vec![incoming(0, codec::encode(&envelope("e", window(0.3))))];
    let (_, _, p) = predictions(&inferrer.process(&batch).await.expect("process")).remove(0);
    assert!(!p.cached && p.confidence > 0.0 && p.confidence < 1.0, "{p:?}");
    assert_eq!(stats.model_rows.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn cache_entries_are_per_version_and_a_switch_swaps_only_a_warmed_up_model() {
    let cache = Arc::new(PredictionCache::new(LruConfig::default(), None));
    let (tx, rx) = watch::channel(settings());
    let (mut inferrer, stats) = inferrer(rx, Some(cache)).await;
    let reference = |version: &str, value: f32| {
        let model = Model::load(&model_config(version)).expect("model");
        let out = model.forward(&Batch::Windows(vec![value; 3150]), 1).expect("forward");
        (out[0], out[1])
    };
    let expected = [("1", reference("1", 0.3)), ("2", reference("2", 0.3))];
    assert_ne!(expected[0].1, expected[1].1, "the two fixture versions differ");

    let batch = |n: i64| vec![incoming(n, codec::encode(&envelope(&format!("e-{n}"), window(0.3))))];
    let first = predictions(&inferrer.process(&batch(0)).await.expect("process"));
    assert_eq!(first[0].2.model_version, "1");

    tx.send_modify(|s| s.model_version = "2".into());
    let mut versions = Vec::new();
    for n in 1..400 {
        let (_, _, p) = predictions(&inferrer.process(&batch(n)).await.expect("process")).remove(0);
        // Every answer is a whole version's answer: never a half-loaded model.
        let (_, (r, c)) = expected.iter().find(|(v, _)| *v == p.model_version).expect("version 1 or 2");
        assert_eq!((p.predicted_return, p.confidence), (*r, *c), "{p:?}");
        versions.push(p.model_version.clone());
        if p.model_version == "2" {
            // The first answer of version 2 is computed, not version 1's cached answer.
            assert!(!p.cached, "a cached answer from another version: {p:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(versions.last().map(String::as_str), Some("2"), "the switch did not happen: {versions:?}");
    assert_eq!(stats.switches.load(Ordering::Relaxed), 1);

    // An unknown version is refused by the controller before it gets here; a
    // version that fails to load leaves the serving one in place.
    tx.send_modify(|s| s.model_version = "no-such-version".into());
    for n in 500..520 {
        let (_, _, p) = predictions(&inferrer.process(&batch(n)).await.expect("process")).remove(0);
        assert_eq!(p.model_version, "2");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn prediction(id: &str, confidence: f32) -> Vec<u8> {
    codec::encode(&envelope(
        id,
        Payload::Prediction(StockPrediction {
            symbol: "S0001".into(),
            as_of: date(),
            predicted_return: 0.01,
            confidence,
            model_name: "m".into(),
            model_version: "1".into(),
            batch_size: 2,
            cached: false,
            inferred_at_ms: 2,
        }),
    ))
}

#[tokio::test]
async fn the_writer_filters_by_the_live_confidence_and_appends_to_the_file() {
    let file = temp_dir("writer").join("predictions.jsonl");
    let stats = Arc::new(WriterStats::default());
    let (tx, rx) = watch::channel(Settings { min_confidence: 0.6, ..settings() });
    let mut writer = Writer::new(rx, Some(&file), "predictions", stats.clone()).expect("writer");
    let batch = vec![
        incoming(0, prediction("high", 0.9)),
        incoming(1, prediction("low", 0.3)),
        incoming(2, codec::encode(&envelope("wrong", window(0.0)))),
        incoming(3, prediction("edge", 0.6)),
    ];
    let sent = |outputs: Vec<Output>| -> Vec<PredictionRecord> {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Send { payload, key, .. } => {
                    let record: PredictionRecord = serde_json::from_slice(payload).expect("JSON record");
                    assert_eq!(key.as_deref(), Some(record.event_id.as_bytes()), "keyed by event id");
                    Some(record)
                }
                Output::DeadLetter { reason, .. } => {
                    assert_eq!(*reason, "unexpected_payload");
                    None
                }
            })
            .collect()
    };
    let first = sent(writer.process(&batch).await.expect("process"));
    let ids: Vec<&str> = first.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!(ids, vec!["high", "edge"]);
    assert_eq!(stats.below_min_confidence.load(Ordering::Relaxed), 1);
    assert_eq!(stats.written.load(Ordering::Relaxed), 2);

    // An override lowers the threshold: the next batch keeps "low".
    tx.send_modify(|s| s.min_confidence = 0.2);
    let second = sent(writer.process(&batch[1..2]).await.expect("process"));
    assert_eq!(second.len(), 1);

    let lines: Vec<PredictionRecord> = std::fs::read_to_string(&file)
        .expect("sink file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines, [first, second].concat(), "the file holds exactly what was published");
}

/// Versions of the stock fixture a switch must watch (deploy/models/export_test_fixtures.py).
fn variant(version: &str) -> sluice_model::ModelConfig {
    sluice_model::ModelConfig {
        dir: sluice_testkit::cache_dir().join("models/fixtures/stock-variants"),
        ..model_config(version)
    }
}

async fn variant_inferrer(
    version: &str,
    settings: watch::Receiver<Settings>,
) -> (Inferrer<TorchLoader>, Arc<InferrerStats>) {
    let worker = ModelWorker::start(variant(version)).await.expect("model");
    let stats = Arc::new(InferrerStats::default());
    let inferrer =
        Inferrer::new(TorchLoader, worker, variant(version), settings, None, "out", stats.clone()).expect("inferrer");
    (inferrer, stats)
}

/// Serves batches until the serving version has had `time` to change; returns
/// the versions that answered.
async fn versions_served(inferrer: &mut Inferrer<TorchLoader>, batches: i64) -> Vec<String> {
    let mut versions = Vec::new();
    for n in 0..batches {
        let batch = vec![incoming(n, codec::encode(&envelope(&format!("v-{n}"), window(0.3))))];
        for (_, _, p) in predictions(&inferrer.process(&batch).await.expect("process")) {
            versions.push(p.model_version);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    versions
}

#[tokio::test]
async fn a_version_that_answers_outside_its_ranges_or_names_another_model_is_refused() {
    // Loaded alone: refused at warm-up.
    let refused = ModelWorker::start(variant("overconfident")).await.expect_err("confidence 1.5");
    assert!(matches!(refused, sluice_model::ModelError::WarmUp(_)), "{refused}");
    assert!(refused.to_string().contains("confidence = 1.5"), "{refused}");

    // Switched to live: the serving version stays, for both.
    let (tx, rx) = watch::channel(settings());
    let (mut inferrer, stats) = variant_inferrer("1", rx).await;
    for bad in ["overconfident", "renamed"] {
        tx.send_modify(|s| s.model_version = bad.into());
        let served = versions_served(&mut inferrer, 60).await;
        assert!(served.iter().all(|v| v == "1"), "{bad} was switched in: {served:?}");
        assert_eq!(stats.serving_version(), "1");
    }
    assert_eq!(stats.switches.load(Ordering::Relaxed), 0);
    // A good version still switches afterwards.
    tx.send_modify(|s| s.model_version = "sometimes".into());
    let served = versions_served(&mut inferrer, 200).await;
    assert_eq!(served.last().map(String::as_str), Some("sometimes"), "{served:?}");
}

#[tokio::test]
async fn an_answer_outside_its_range_is_a_dead_letter_and_the_rest_is_answered() {
    let (mut inferrer, _) =
        variant_inferrer("sometimes", watch::channel(Settings { cache_enabled: false, ..settings() }).1).await;
    let mut sentinel = vec![0.1; 3150];
    sentinel[0] = 777.0;
    let odd = Payload::Normalized(StockWindow::new("S0001", date(), 30, 105, sentinel));
    let batch = vec![
        incoming(0, codec::encode(&envelope("fine", window(0.1)))),
        incoming(1, codec::encode(&envelope("odd", odd))),
        incoming(2, codec::encode(&envelope("fine-too", window(0.2)))),
    ];
    let outputs = inferrer.process(&batch).await.expect("process");
    let dead: Vec<(usize, &str, &str)> = outputs
        .iter()
        .filter_map(|o| match o {
            Output::DeadLetter { source, reason, detail, .. } => Some((*source, reason.as_str(), detail.as_str())),
            Output::Send { .. } => None,
        })
        .collect();
    assert_eq!(dead.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(), vec![(1, "prediction_out_of_range")]);
    assert!(dead[0].2.contains("confidence = 1.5") && dead[0].2.contains("0..=1"), "{}", dead[0].2);
    assert_eq!(predictions(&outputs).len(), 2);
}

/// A shared-cache entry is checked like a computed answer: one outside its
/// output's range, or not finite, is a miss, recomputed and counted, and
/// never published.
#[tokio::test]
async fn cache_entries_that_are_not_valid_answers_are_recomputed() {
    use sluice_control::keys::KeyLayout;
    use sluice_control::link::RedisLink;

    let keys = KeyLayout::new("sluice-test", &sluice_testkit::unique("badcache"));
    let link = Arc::new(RedisLink::new(sluice_testkit::LOCAL_REDIS).expect("url"));
    let cache = Arc::new(PredictionCache::new(LruConfig::default(), Some((link.clone(), keys.clone()))));
    let planted = [(0.3f32, vec![0.5f32, 7.5]), (0.4, vec![f32::NAN, 0.5])];
    for (value, answer) in &planted {
        let key = CacheKey::of("stock-lstm", "1", &[*value; 3150]);
        let name = keys.cache_entry("stock-lstm", "1", key.0);
        let bytes: Vec<u8> = answer.iter().flat_map(|v| v.to_le_bytes()).collect();
        link.run(|mut conn| async move {
            redis::cmd("SET").arg(&name).arg(bytes).arg("EX").arg(60).query_async::<()>(&mut conn).await
        })
        .await
        .expect("plant a bad entry");
    }
    let (mut inferrer, stats) = inferrer(watch::channel(settings()).1, Some(cache)).await;
    let batch: Vec<Incoming> = (0..100)
        .map(|i| {
            let value = planted[i % 2].0;
            incoming(i as i64, codec::encode(&envelope(&format!("c-{i}"), window(value))))
        })
        .collect();
    let outputs = inferrer.process(&batch).await.expect("process");
    let answered = predictions(&outputs);
    assert_eq!(
        answered.len(),
        100,
        "no dead letters: {:?}",
        outputs.iter().find(|o| matches!(o, Output::DeadLetter { .. }))
    );
    assert!(answered.iter().all(|(_, _, p)| !p.cached && p.confidence <= 1.0 && p.predicted_return.is_finite()));
    assert_eq!(stats.model_rows.load(Ordering::Relaxed), 2, "each bad entry was recomputed once");
    assert_eq!(stats.invalid_cache_entries.load(Ordering::Relaxed), 2);
    // The recomputed answers replaced the bad ones.
    let again = predictions(&inferrer.process(&batch[..2]).await.expect("process"));
    assert!(again.iter().all(|(_, _, p)| p.cached), "{again:?}");
}
