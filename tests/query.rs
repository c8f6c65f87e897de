//! The query model: Rust tokenization and libtorch reproduce the exporter's
//! Python references on every held-out phrase; padding to the longest equals
//! padding to the maximum; and the query inferrer answers repeats from the
//! cache and keeps its model calls within the row and token caps.

use std::sync::Arc;

use sluice_control::Settings;
use sluice_control::cache::{LruConfig, PredictionCache};
use sluice_core::{Incoming, Output, Stage};
use sluice_messages::codec;
use sluice_messages::envelope::{Envelope, Payload, QueryTokens};
use sluice_model::{Batch, ModelMetadata, QueryTokenizer};
use sluice_stages::{InferrerStats, QueryInferrer};
use sluice_testkit::{query_model_config, query_model_dir};
use sluice_torch::{Model, ModelWorker, TorchLoader};
use tokio::sync::watch;

const LOGIT_TOLERANCE: f32 = 1e-4;

fn load() -> (Model, QueryTokenizer, ModelMetadata) {
    let model = Model::load(&query_model_config("1")).expect("load the query model (run `make setup`)");
    let metadata = model.metadata().clone();
    let tokenizer = QueryTokenizer::load(&query_model_dir().join("1"), &metadata).expect("tokenizer");
    (model, tokenizer, metadata)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

#[test]
fn rust_reproduces_the_python_reference_on_every_held_out_phrase() {
    let (model, tokenizer, metadata) = load();
    let phrases = metadata.load_phrases(&query_model_dir().join("1")).expect("reference phrases");
    assert!(phrases.len() >= 200, "the issue asks for at least 200 held-out phrases, got {}", phrases.len());
    assert!(metadata.labels.len() >= 12, "{:?}", metadata.labels);
    let pad = metadata.tokenizer.as_ref().expect("tokenizer").pad_id;
    let width = metadata.labels.len();
    let mut truncated = 0;
    // Batches of 16, each padded to its own longest phrase, as the inferrer does.
    for chunk in phrases.chunks(16) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|p| tokenizer.encode(&p.text).expect("encode")).collect();
        for (p, ids) in chunk.iter().zip(&ids) {
            assert_eq!(ids, &p.input_ids, "token ids of {:?}", p.text);
            truncated += usize::from(ids.len() == tokenizer.max_length());
        }
        let sequences: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let batch = Batch::tokens(&sequences, 0, pad, Vec::new(), Vec::new());
        let logits = model.forward(&batch, chunk.len()).expect("forward");
        for (p, row) in chunk.iter().zip(logits.chunks(width)) {
            let diff = max_abs_diff(row, &p.logits);
            assert!(diff <= LOGIT_TOLERANCE, "{:?}: logits differ by {diff}", p.text);
            assert_eq!(metadata.labels[argmax(row)], p.top1, "top-1 of {:?}", p.text);
        }
    }
    assert!(truncated >= 1, "at least one held-out phrase reaches max_length, so truncation is exercised");
}

#[test]
fn padding_to_the_longest_gives_the_same_logits_as_padding_to_the_maximum() {
    let (model, tokenizer, metadata) = load();
    let spec = metadata.tokenizer.as_ref().expect("tokenizer");
    let texts = ["balance?", "send 50 pounds to my sister tonight please", "I lost my card", "freeze it"];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tokenizer.encode(t).expect("encode")).collect();
    let sequences: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let longest = Batch::tokens(&sequences, 0, spec.pad_id, Vec::new(), Vec::new());
    let maximum = Batch::tokens(&sequences, spec.max_length, spec.pad_id, Vec::new(), Vec::new());
    let (Batch::Tokens { len: short, .. }, Batch::Tokens { len: long, .. }) = (&longest, &maximum) else {
        unreachable!()
    };
    assert!(*short < 20 && *long == spec.max_length, "{short} vs {long}");
    let a = model.forward(&longest, texts.len()).expect("longest");
    let b = model.forward(&maximum, texts.len()).expect("maximum");
    let diff = max_abs_diff(&a, &b);
    assert!(diff <= 1e-5, "padding changed the logits by {diff}");
    // Each alone, unpadded, too.
    for (i, sequence) in sequences.iter().enumerate() {
        let one = model.forward(&Batch::tokens(&[sequence], 0, spec.pad_id, Vec::new(), Vec::new()), 1).expect("one");
        let diff = max_abs_diff(&one, &a[i * metadata.labels.len()..(i + 1) * metadata.labels.len()]);
        assert!(diff <= 1e-5, "{:?} alone differs by {diff}", texts[i]);
    }
}

fn envelope(id: &str, tokenizer: &QueryTokenizer, text: &str) -> Incoming {
    let envelope = Envelope {
        event_id: id.into(),
        traceparent: None,
        requested_at_ms: 0,
        updated_at_ms: 0,
        attempt: 0,
        deadline_ms: None,
        payload: Payload::Tokens(QueryTokens { text: text.into(), ids: tokenizer.encode(text).expect("encode") }),
    };
    Incoming::new("tokenized", 0, 0, codec::encode(&envelope))
}

fn intents(outputs: Vec<Output>) -> Vec<sluice_messages::envelope::QueryIntent> {
    outputs
        .into_iter()
        .map(|o| match o {
            Output::Send { payload, .. } => match codec::decode(&payload).expect("envelope").payload {
                Payload::Intent(intent) => intent,
                other => panic!("not an intent: {other:?}"),
            },
            Output::DeadLetter { reason, detail, .. } => panic!("dead letter {reason}: {detail}"),
        })
        .collect()
}

#[tokio::test]
async fn the_query_inferrer_answers_repeats_from_the_cache_within_its_caps() {
    let (_, tokenizer, metadata) = load();
    let settings = Settings { max_batch_size: 3, max_batch_tokens: 40, ..sluice_testkit::settings() };
    let (tx, rx) = watch::channel(settings);
    let cache = Arc::new(PredictionCache::new(LruConfig { max_entries: 1000, max_bytes: 1 << 20 }, None));
    let stats = Arc::new(InferrerStats::default());
    let worker = ModelWorker::start(query_model_config("1")).await.expect("model");
    let mut inferrer =
        QueryInferrer::new(TorchLoader, worker, query_model_config("1"), rx, Some(cache), "inferred", stats.clone())
            .expect("stage");

    let texts = [
        "what is my balance",
        "I lost my debit card yesterday on the train home from work and I cannot find it anywhere",
        "send 20 euros to Anna",
        "what is my balance",
        "What is my balance",
        "change my pin",
        "please freeze my card",
    ];
    let batch: Vec<Incoming> =
        texts.iter().enumerate().map(|(i, t)| envelope(&format!("q{i}"), &tokenizer, t)).collect();
    let first = intents(inferrer.process(&batch).await.expect("process"));
    assert_eq!(first.len(), texts.len());
    for intent in &first {
        assert!(metadata.labels.contains(&intent.label) && intent.confidence > 0.0 && intent.confidence <= 1.0);
        assert_eq!(intent.top.len(), 3);
        assert_eq!(intent.top[0].label, intent.label);
        assert!(intent.top.windows(2).all(|w| w[0].score >= w[1].score), "{:?}", intent.top);
        assert!(!intent.cached);
        assert!(intent.batch_size <= 3, "row cap: {intent:?}");
        // The long phrase is over the token budget alone: it gets a call of its own.
        assert!(
            intent.batch_size as usize * intent.padded_length as usize <= 40 || intent.batch_size == 1,
            "token cap: {intent:?}"
        );
    }
    assert_eq!(first[0].label, "check_balance");
    assert_eq!(first[1].label, "report_lost_card");
    // Same text, same answer; BERT's normalizer lowercases, so the capitalised
    // repeat is the same input too. Five distinct inputs were computed.
    assert_eq!((first[3].label.as_str(), first[3].confidence), (first[0].label.as_str(), first[0].confidence));
    assert_eq!(first[4].confidence, first[0].confidence);
    assert_eq!(stats.model_rows.load(std::sync::atomic::Ordering::Relaxed), 5);

    // The same queries again: every one from the cache, none computed.
    let again = intents(inferrer.process(&batch).await.expect("process again"));
    assert!(again.iter().all(|i| i.cached && i.batch_size == 0), "{again:?}");
    for (a, b) in first.iter().zip(&again) {
        assert_eq!((&a.label, a.confidence), (&b.label, b.confidence));
    }
    assert_eq!(stats.model_rows.load(std::sync::atomic::Ordering::Relaxed), 5);
    assert_eq!(stats.cache_hits.load(std::sync::atomic::Ordering::Relaxed), texts.len() as u64);

    // A live token budget of one row's worth: every call holds a single row.
    tx.send_modify(|s| s.max_batch_tokens = 1);
    tx.send_modify(|s| s.cache_enabled = false);
    let capped = intents(inferrer.process(&batch).await.expect("capped"));
    assert!(capped.iter().all(|i| i.batch_size == 1), "{capped:?}");
    for (a, b) in first.iter().zip(&capped) {
        assert_eq!(a.label, b.label);
        assert!((a.confidence - b.confidence).abs() < 1e-5, "batching changed an answer: {a:?} vs {b:?}");
    }
}
