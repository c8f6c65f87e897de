//! The inferrer and writer stages driven directly (no broker): how a batch
//! maps to outputs, the dead letters of a non-finite prediction and of a wrong
//! payload, the `min_confidence` filter and the JSON-lines sink.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::NaiveDate;
use sluice_kafka::{Incoming, Output, Stage};
use sluice_messages::codec;
use sluice_messages::envelope::{Envelope, Payload, StockPrediction, StockWindow};
use sluice_messages::prediction::PredictionRecord;
use sluice_model::{DeviceChoice, ModelConfig, ModelWorker};
use sluice_stages::{Inferrer, Writer, WriterStats};
use sluice_tests::{model_dir, temp_dir};

fn envelope(id: &str, payload: Payload) -> Envelope {
    Envelope { event_id: id.into(), traceparent: None, requested_at_ms: 1, updated_at_ms: 1, attempt: 0, payload }
}

fn incoming(offset: i64, payload: Vec<u8>) -> Incoming {
    Incoming { key: None, payload, topic: "in".into(), partition: 0, offset, timestamp_ms: None }
}

fn date() -> NaiveDate {
    NaiveDate::from_ymd_opt(2024, 5, 31).expect("date")
}

fn window(value: f32) -> Payload {
    Payload::Normalized(StockWindow {
        symbol: "S0001".into(),
        as_of: date(),
        rows: 30,
        cols: 105,
        values: vec![value; 3150],
    })
}

#[tokio::test]
async fn the_inferrer_answers_each_row_and_dead_letters_the_rest() {
    let worker = ModelWorker::start(ModelConfig {
        dir: model_dir(),
        device: DeviceChoice::Cpu,
        intra_op_threads: 1,
        warmup_batch_size: 4,
    })
    .await
    .expect("model");
    let mut inferrer = Inferrer::new(worker, "out").expect("inferrer");
    let batch = vec![
        incoming(0, codec::encode(&envelope("good-1", window(0.1)))),
        incoming(1, codec::encode(&envelope("nan", window(f32::NAN)))),
        incoming(2, b"not an envelope".to_vec()),
        incoming(3, codec::encode(&envelope("good-2", window(-0.2)))),
        incoming(
            4,
            codec::encode(&envelope(
                "query",
                Payload::Query(sluice_messages::envelope::QueryText { text: "x".into() }),
            )),
        ),
    ];
    let outputs = inferrer.process(&batch).await.expect("a batch with bad rows still succeeds");
    assert_eq!(outputs.len(), 5, "one output per input: {outputs:?}");
    let mut answered = Vec::new();
    for output in &outputs {
        match output {
            Output::Send { source, topic, payload, .. } => {
                assert_eq!(&**topic, "out");
                let e = codec::decode(payload).expect("envelope");
                let Payload::Prediction(p) = e.payload else { panic!("not a prediction: {e:?}") };
                assert!(p.confidence > 0.0 && p.confidence < 1.0 && p.predicted_return.is_finite());
                assert_eq!(p.batch_size, 3, "the model ran once on the three normalized rows");
                answered.push((*source, e.event_id));
            }
            Output::DeadLetter { source, reason, detail, .. } => {
                let expected = match source {
                    1 => "non_finite_prediction",
                    2 => "undecodable_envelope",
                    4 => "unexpected_payload",
                    other => panic!("input {other} should have been answered: {detail}"),
                };
                assert_eq!(*reason, expected, "{detail}");
            }
        }
    }
    answered.sort();
    assert_eq!(answered, vec![(0, "good-1".to_string()), (3, "good-2".to_string())]);
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
            inferred_at_ms: 2,
        }),
    ))
}

#[tokio::test]
async fn the_writer_filters_by_confidence_and_appends_to_the_file() {
    let file = temp_dir("writer").join("predictions.jsonl");
    let stats = Arc::new(WriterStats::default());
    let mut writer = Writer::new(0.6, Some(&file), "predictions", stats.clone()).expect("writer");
    let batch = vec![
        incoming(0, prediction("high", 0.9)),
        incoming(1, prediction("low", 0.3)),
        incoming(2, codec::encode(&envelope("wrong", window(0.0)))),
        incoming(3, prediction("edge", 0.6)),
    ];
    let outputs = writer.process(&batch).await.expect("process");
    let sent: Vec<PredictionRecord> = outputs
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
        .collect();
    let ids: Vec<&str> = sent.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!(ids, vec!["high", "edge"]);
    assert_eq!(stats.below_min_confidence.load(Ordering::Relaxed), 1);
    assert_eq!(stats.written.load(Ordering::Relaxed), 2);
    let lines: Vec<PredictionRecord> = std::fs::read_to_string(&file)
        .expect("sink file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines, sent, "the file holds exactly what was published");
}
