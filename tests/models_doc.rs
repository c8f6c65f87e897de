//! docs/models.md's worked example, as a user would follow it: the Python
//! script in the document exports a model of another architecture and shape
//! (a 1-D CNN over 20 days x 8 features), and `sluice pipeline`, configured
//! with the document's environment variables, serves it through the broker.
//! Every prediction equals the exported model's own answer on the same
//! window; windows of the old shape and query events are dead letters; every
//! output is keyed like its request.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sluice_kafka::client::Publisher;
use sluice_messages::dead_letter::DeadLetter;
use sluice_messages::envelope::StockWindow;
use sluice_messages::prediction::PredictionRecord;
use sluice_model::{Batch, ModelConfig};
use sluice_stages::Normalizer;
use sluice_stages::fetcher::{SyntheticConfig, SyntheticSource, WindowRequest, WindowShape};
use sluice_testkit::{Processes, StageProcess, TestPipeline, model_config, python};
use sluice_torch::Model;

/// The first fenced block of `language` after `heading` in docs/models.md.
fn code_block(heading: &str, language: &str) -> String {
    let doc = include_str!("../docs/models.md");
    let section = doc.split(heading).nth(1).expect("the section");
    let start = section.find(&format!("```{language}\n")).expect("a code block") + language.len() + 4;
    section[start..].split("\n```").next().expect("closed").to_string()
}

/// The `export NAME=value` lines of a shell block, quotes removed.
fn exports(shell: &str) -> Vec<(String, String)> {
    shell
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .map(|l| {
            let assignment = l.split("  #").next().expect("text").trim();
            let (name, value) = assignment.split_once('=').expect("NAME=value");
            (name.to_string(), value.trim_matches('\'').to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn the_documented_example_model_is_exported_and_served() {
    let mut p = TestPipeline::start("models-doc", 2, "", Processes::None);
    let script = p.path("export_my_model.py");
    std::fs::write(&script, code_block("## Bring your own stock model", "python")).expect("script");
    let models = p.path("models");
    let exported = std::process::Command::new(python()).arg(&script).arg(&models).output().expect("python");
    assert!(exported.status.success(), "the example failed:\n{}", String::from_utf8_lossy(&exported.stderr));
    let model_dir = models.join("my-conv");

    // The document's environment, with its directory replaced by this test's.
    let mut env = exports(&code_block("## Bring your own stock model", "sh"));
    assert!(env.iter().any(|(k, _)| k == "SLUICE_INFERRER__MODEL__DIR"), "{env:?}");
    for (name, value) in &mut env {
        if name == "SLUICE_INFERRER__MODEL__DIR" {
            *value = model_dir.display().to_string();
        }
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let dead = p.topic("dead-letters");
    let reader = p.reader(&["predictions", "dead-letters"]);
    p.stages.push(StageProcess::command_with_env(&p.config, &["pipeline"], "pipeline", &p.dir, &env));

    // Fetched windows, inline windows of the new shape, one of the old shape, a query.
    let inline: Vec<Vec<f64>> =
        (0..20).map(|d| (0..8).map(|f| ((d * 8 + f) % 13) as f64 * 0.3 - 1.0).collect()).collect();
    let mut events: Vec<(String, String)> = (0..40)
        .map(|i| {
            let id = format!("mine-{i}");
            let json = format!(
                r#"{{"kind":"stock","event_id":"{id}","symbol":"S{:04}","as_of":"2024-05-{:02}"}}"#,
                i * 7,
                20 + i % 8
            );
            (id, json)
        })
        .collect();
    let window_json = serde_json::to_string(&inline).expect("json");
    events.push((
        "inline".into(),
        format!(
            r#"{{"kind":"stock","event_id":"inline","symbol":"S0001","as_of":"2024-05-31","window":{window_json}}}"#
        ),
    ));
    let old_shape = serde_json::to_string(&vec![vec![0.5f64; 105]; 30]).expect("json");
    events.push((
        "old-shape".into(),
        format!(
            r#"{{"kind":"stock","event_id":"old-shape","symbol":"S0001","as_of":"2024-05-31","window":{old_shape}}}"#
        ),
    ));
    events.push(("q".into(), r#"{"kind":"query","event_id":"q","text":"what is my balance"}"#.into()));
    let mut publisher = Publisher::new(&p.kafka, "models-doc").expect("publisher");
    let requests = p.topic("requests");
    for (id, json) in &events {
        publisher.send(&requests, Some(format!("key-{id}").as_bytes()), json.as_bytes()).await.expect("send");
    }
    publisher.finish().await.expect("published");

    let mut seen: HashMap<String, (PredictionRecord, Option<Vec<u8>>)> = HashMap::new();
    let mut letters: HashMap<String, DeadLetter> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (seen.len() < 41 || letters.len() < 2) && Instant::now() < deadline {
        let Some(record) = reader.next(Duration::from_millis(200)).await else { continue };
        let record = record.expect("read");
        if record.topic == dead {
            let letter: DeadLetter = serde_json::from_slice(&record.payload).expect("dead letter");
            letters.insert(letter.event_id.clone().unwrap_or_default(), letter);
        } else {
            let prediction: PredictionRecord = serde_json::from_slice(&record.payload).expect("a prediction");
            seen.insert(prediction.event_id.clone(), (prediction, record.key));
        }
    }
    assert_eq!(seen.len(), 41, "predictions\n{}", p.logs(30));
    assert_eq!(letters.get("old-shape").map(|l| l.reason.as_str()), Some("invalid_window_shape"), "{letters:?}");
    assert_eq!(letters.get("q").map(|l| l.reason.as_str()), Some("unsupported_kind"), "{letters:?}");

    // The same windows, normalised and run here on the exported model.
    let model = Model::load(&ModelConfig { dir: model_dir, ..model_config("1") }).expect("the exported model");
    let metadata = model.metadata().clone();
    assert_eq!((metadata.days(), metadata.features()), (20, 8));
    let normalizer = Normalizer::new(metadata.normalization.as_ref().expect("stats"), 20, "unused");
    let source = SyntheticSource::new(SyntheticConfig::default());
    for (id, (prediction, key)) in &seen {
        assert_eq!((prediction.model.name.as_str(), prediction.model.version.as_str()), ("my-conv", "1"));
        assert_eq!(key.as_deref(), Some(format!("key-{id}").as_bytes()), "keyed like its request");
        let values: Vec<f32> = if id == "inline" {
            inline.iter().flatten().map(|v| *v as f32).collect()
        } else {
            source
                .window(
                    &WindowRequest { symbol: prediction.symbol.clone(), as_of: prediction.as_of },
                    WindowShape { days: 20, features: 8 },
                )
                .expect("window")
        };
        let window = StockWindow::new(&prediction.symbol, prediction.as_of, 20, 8, values);
        let x = normalizer.normalize(&window).expect("normalised").values;
        let y = model.forward(&Batch::Windows(x), 1).expect("forward");
        assert!(
            (prediction.predicted_return - y[0]).abs() < 1e-5 && (prediction.confidence - y[1]).abs() < 1e-5,
            "{id}: {prediction:?} vs {y:?}"
        );
    }
    p.stages[0].signal("TERM");
    assert!(p.stages[0].wait(Duration::from_secs(30)).is_some_and(|s| s.success()), "{}", p.logs(20));
}
