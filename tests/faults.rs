//! Faults inside the inferrer, driven directly (no broker): one bad item does
//! not sink its batch (a failing model call is bisected until only the items
//! that fail alone are left, and those are dead letters), and a call over the
//! memory budget is split and the row cap lowered, losing nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::NaiveDate;
use sluice_control::Settings;
use sluice_core::{Incoming, Output, Stage};
use sluice_messages::codec;
use sluice_messages::envelope::{Envelope, Payload, StockPrediction, StockWindow};
use sluice_model::ModelConfig;
use sluice_stages::{Inferrer, InferrerStats};
use sluice_testkit::{cache_dir, model_config, settings};
use sluice_torch::{ModelWorker, TorchLoader};
use tokio::sync::watch;

/// The value that makes the poisoned fixture raise (deploy/models/export_test_fixtures.py).
const SENTINEL: f32 = 12345.0;

/// Ten distinct windows; those in `poisoned` start with the sentinel.
fn batch(poisoned: &[usize]) -> Vec<Incoming> {
    (0..10)
        .map(|i| {
            let mut values: Vec<f32> = (0..3150).map(|k| ((i * 31 + k) % 17) as f32 * 0.1 - 0.8).collect();
            if poisoned.contains(&i) {
                values[0] = SENTINEL;
            }
            let window = StockWindow::new(
                &format!("S{i:04}"),
                NaiveDate::from_ymd_opt(2024, 5, 31).expect("date"),
                30,
                105,
                values,
            );
            let envelope = Envelope::new(&format!("e{i}"), Payload::Normalized(window));
            Incoming::new("in", 0, i as i64, codec::encode(&envelope))
        })
        .collect()
}

async fn inferrer(model: ModelConfig) -> (Inferrer<TorchLoader>, Arc<InferrerStats>) {
    let (_, settings) = watch::channel(Settings { cache_enabled: false, ..settings() });
    let stats = Arc::new(InferrerStats::default());
    let worker = ModelWorker::start(model.clone()).await.expect("model");
    let inferrer = Inferrer::new(TorchLoader, worker, model, settings, None, "out", stats.clone()).expect("inferrer");
    (inferrer, stats)
}

/// (input index, prediction) of each prediction, in input order.
type Predictions = Vec<(usize, StockPrediction)>;
/// (input index, reason) of each dead letter.
type DeadLetters = Vec<(usize, String)>;

fn split(outputs: Vec<Output>) -> (Predictions, DeadLetters) {
    let (mut sent, mut dead) = (Vec::new(), Vec::new());
    for output in outputs {
        match output {
            Output::Send { source, payload, .. } => match codec::decode(&payload).expect("envelope").payload {
                Payload::Prediction(p) => sent.push((source, p)),
                other => panic!("not a prediction: {other:?}"),
            },
            Output::DeadLetter { source, reason, .. } => dead.push((source, reason.to_string())),
        }
    }
    sent.sort_by_key(|(i, _)| *i);
    (sent, dead)
}

#[tokio::test]
async fn one_bad_item_does_not_sink_its_batch() {
    let poisoned = ModelConfig { dir: cache_dir().join("models/fixtures/stock-poison"), ..model_config("1") };
    let (mut inferrer, stats) = inferrer(poisoned).await;
    let (sent, mut dead) = split(inferrer.process(&batch(&[3, 7])).await.expect("the batch is answered"));
    dead.sort();
    assert_eq!(dead, vec![(3, "model_error".to_string()), (7, "model_error".to_string())]);
    assert_eq!(sent.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0, 1, 2, 4, 5, 6, 8, 9]);

    // The answers are the plain model's, as if the poison had never been there.
    let (mut plain, _) = inferrer_plain().await;
    let (reference, none) = split(plain.process(&batch(&[])).await.expect("plain"));
    assert!(none.is_empty());
    for (i, p) in &sent {
        let r = &reference[*i].1;
        let close =
            (p.predicted_return - r.predicted_return).abs() <= 1e-6 && (p.confidence - r.confidence).abs() <= 1e-6;
        assert!(close, "row {i}: {p:?} vs {r:?}");
        assert!(p.batch_size >= 1 && p.batch_size < 10, "answered by a smaller call: {p:?}");
    }
    // 8 rows computed; every call with a poisoned row failed and was split.
    assert_eq!(stats.model_rows.load(Ordering::Relaxed), 8);
}

async fn inferrer_plain() -> (Inferrer<TorchLoader>, Arc<InferrerStats>) {
    inferrer(model_config("1")).await
}

#[tokio::test]
async fn a_call_over_the_memory_budget_is_split_and_the_cap_lowered() {
    // Room for three windows (3 x 3150 floats) per call.
    let budget = 3 * 3150 * 4;
    let (mut budgeted, stats) = inferrer(ModelConfig { memory_budget_bytes: budget, ..model_config("1") }).await;
    let (first, dead) = split(budgeted.process(&batch(&[])).await.expect("first batch"));
    assert!(dead.is_empty(), "{dead:?}");
    assert_eq!(first.len(), 10, "nothing lost");
    assert!(first.iter().all(|(_, p)| p.batch_size <= 3), "{first:?}");
    // The cap stays lowered: the next batch goes straight to small calls.
    let (second, _) = split(budgeted.process(&batch(&[])).await.expect("second batch"));
    assert!(second.iter().all(|(_, p)| p.batch_size <= 2), "cap from the first split (10 -> 5 -> 2): {second:?}");
    assert_eq!(stats.model_rows.load(Ordering::Relaxed), 20);

    let (mut plain, _) = inferrer_plain().await;
    let (reference, _) = split(plain.process(&batch(&[])).await.expect("plain"));
    assert!(reference.iter().all(|(_, p)| p.batch_size == 10));
    for ((i, p), (_, r)) in first.iter().zip(&reference) {
        assert!(
            (p.predicted_return - r.predicted_return).abs() <= 1e-6 && (p.confidence - r.confidence).abs() <= 1e-6,
            "row {i}: {p:?} vs {r:?}"
        );
    }
}
