//! The JSON Schemas in `schemas/` are the contract for producers and consumers
//! in other languages; the Rust types in `sluice-messages` are what Sluice
//! actually parses and writes. This test keeps the two in step: every example
//! in `schemas/examples/` is valid against its schema and accepted by the Rust
//! parser, every example in `schemas/examples/invalid/` is refused by both
//! (the schema alone for output records), records built in Rust validate, and
//! the edge cases where schema and parser could drift apart are pinned down.

use std::fs;
use std::path::{Path, PathBuf};

use jsonschema::Validator;
use serde_json::{Value, json};
use sluice_messages::dead_letter::{DeadLetter, SourceCoordinates};
use sluice_messages::envelope::LabelScore;
use sluice_messages::events::{Priority, QueryRequest, RequestEvent, StockRequest};
use sluice_messages::prediction::{IntentRecord, ModelRef, PredictionRecord};

/// The schemas, by name: `schemas/<name>.schema.json`, examples `<name>.<anything>.json`.
const SCHEMAS: [&str; 3] = ["request", "prediction", "dead_letter"];
/// At least this many examples must be checked, so that the test cannot pass vacuously.
const MIN_VALID_EXAMPLES: usize = 8;
const MIN_INVALID_EXAMPLES: usize = 20;
/// The current model's window: rows (trading days) x features.
const WINDOW_ROWS: usize = 30;
const WINDOW_FEATURES: usize = 105;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read_json(path: &Path) -> (Vec<u8>, Value) {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let value =
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not one JSON document: {e}", path.display()));
    (bytes, value)
}

/// Compiles `schemas/<name>.schema.json` as draft 2020-12, with `format` asserted.
fn validator(name: &str) -> Validator {
    let path = repo_root().join(format!("schemas/{name}.schema.json"));
    let (_, schema) = read_json(&path);
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema",
        "{} must declare draft 2020-12",
        path.display()
    );
    assert_eq!(
        schema["$id"],
        format!("https://sluice.dev/schemas/{name}.schema.json"),
        "{} has an unexpected $id",
        path.display()
    );
    if let Err(e) = jsonschema::meta::validate(&schema) {
        panic!("{} is not a valid JSON Schema: {e} at {}", path.display(), e.instance_path());
    }
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{} does not compile: {e}", path.display()))
}

/// The schema's complaints about `instance`, one per line (empty when it is valid).
fn schema_errors(validator: &Validator, instance: &Value) -> String {
    validator.iter_errors(instance).map(|e| format!("  {} (at `{}`)\n", e, e.instance_path())).collect()
}

fn assert_valid(schema: &str, instance: &Value, what: &str) {
    let errors = schema_errors(&validator(schema), instance);
    assert!(errors.is_empty(), "{what} should be valid against {schema}.schema.json but:\n{errors}");
}

/// One example file: which schema its name selects, its bytes and its JSON.
#[derive(Debug)]
struct Example {
    /// The path from the repository root, for messages.
    path: String,
    schema: &'static str,
    bytes: Vec<u8>,
    value: Value,
}

/// The `*.json` examples directly in `dir` (sorted), each checked to name a known schema.
fn examples(dir_name: &str) -> Vec<Example> {
    let dir = repo_root().join(dir_name);
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    let mut paths: Vec<PathBuf> =
        entries.map(|entry| entry.expect("read a directory entry").path()).filter(|path| !path.is_dir()).collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).expect("UTF-8 file name").to_owned();
            assert!(name.ends_with(".json"), "{}: examples must be `<schema>.<anything>.json`", path.display());
            let prefix = name.split('.').next().expect("split yields at least one piece");
            let schema = SCHEMAS
                .into_iter()
                .find(|s| *s == prefix)
                .unwrap_or_else(|| panic!("{}: `{prefix}` is not one of the schemas {SCHEMAS:?}", path.display()));
            let (bytes, value) = read_json(&path);
            Example { path: format!("{dir_name}/{name}"), schema, bytes, value }
        })
        .collect()
}

fn assert_every_schema_has_examples(examples: &[Example], kind: &str) {
    for schema in SCHEMAS {
        assert!(examples.iter().any(|e| e.schema == schema), "no {kind} example for {schema}.schema.json");
    }
}

#[test]
fn valid_examples_match_their_schema_and_the_rust_types() {
    let examples = examples("schemas/examples");
    assert!(
        examples.len() >= MIN_VALID_EXAMPLES,
        "only {} valid examples; expected at least {MIN_VALID_EXAMPLES}",
        examples.len()
    );
    assert_every_schema_has_examples(&examples, "valid");
    for example in &examples {
        let shown = &example.path;
        let validator = validator(example.schema);
        let errors = schema_errors(&validator, &example.value);
        assert!(errors.is_empty(), "{shown} should be valid against {}.schema.json but:\n{errors}", example.schema);

        // The Rust side accepts it, and what Rust writes back is valid too.
        let rewritten = match example.schema {
            "request" => {
                let event = RequestEvent::from_json(&example.bytes).unwrap_or_else(|e| {
                    panic!("{shown} passes the schema but RequestEvent::from_json refuses it: {e}")
                });
                serde_json::to_value(&event).expect("a RequestEvent serialises")
            }
            "prediction" if example.value["kind"] == "query" => {
                let record: IntentRecord = serde_json::from_slice(&example.bytes)
                    .unwrap_or_else(|e| panic!("{shown} passes the schema but is not an IntentRecord: {e}"));
                serde_json::to_value(&record).expect("an IntentRecord serialises")
            }
            "prediction" => {
                let record: PredictionRecord = serde_json::from_slice(&example.bytes)
                    .unwrap_or_else(|e| panic!("{shown} passes the schema but is not a PredictionRecord: {e}"));
                serde_json::to_value(&record).expect("a PredictionRecord serialises")
            }
            "dead_letter" => {
                let letter: DeadLetter = serde_json::from_slice(&example.bytes)
                    .unwrap_or_else(|e| panic!("{shown} passes the schema but is not a DeadLetter: {e}"));
                letter.payload().unwrap_or_else(|e| panic!("{shown}: payload_base64 does not decode: {e}"));
                serde_json::to_value(&letter).expect("a DeadLetter serialises")
            }
            other => unreachable!("examples() only returns known schemas, not {other}"),
        };
        let errors = schema_errors(&validator, &rewritten);
        assert!(errors.is_empty(), "{shown}, parsed and written back by Rust, is no longer valid:\n{errors}");
    }
}

#[test]
fn invalid_examples_are_refused_by_their_schema_and_the_request_parser() {
    let examples = examples("schemas/examples/invalid");
    assert!(
        examples.len() >= MIN_INVALID_EXAMPLES,
        "only {} invalid examples; expected at least {MIN_INVALID_EXAMPLES}",
        examples.len()
    );
    assert_every_schema_has_examples(&examples, "invalid");
    for example in &examples {
        let shown = &example.path;
        assert!(
            !validator(example.schema).is_valid(&example.value),
            "{shown} should be invalid against {}.schema.json but passes it",
            example.schema
        );
        // Sluice reads requests; predictions and dead letters it only writes.
        if example.schema == "request" {
            let parsed = RequestEvent::from_json(&example.bytes);
            assert!(parsed.is_err(), "{shown} fails the schema but RequestEvent::from_json accepts it: {parsed:?}");
        }
    }
}

fn prediction(event_id: &str, cached: bool) -> PredictionRecord {
    PredictionRecord {
        event_id: event_id.into(),
        kind: "stock".into(),
        symbol: "BRK.B".into(),
        as_of: "2024-02-29".parse().expect("a date"),
        predicted_return: -0.0125,
        confidence: 0.73,
        model: ModelRef { name: "stock-lstm".into(), version: "1".into() },
        batch_size: if cached { 0 } else { 64 },
        cached,
        requested_at_ms: 1_717_171_200_000,
        inferred_at_ms: 1_717_171_200_030,
        written_at_ms: sluice_messages::now_ms(),
    }
}

fn dead_letter(event_id: Option<&str>, key: Option<&str>, payload: &[u8]) -> DeadLetter {
    DeadLetter {
        stage: "normalizer".into(),
        reason: "non_finite_input".into(),
        detail: "non-finite input at day 0, feature 1".into(),
        source: SourceCoordinates { topic: "sluice.fetched".into(), partition: 2, offset: 77 },
        event_id: event_id.map(Into::into),
        key: key.map(Into::into),
        payload_base64: DeadLetter::encode_payload(payload),
        payload_bytes: payload.len() as u64,
        payload_truncated: false,
        dead_at_ms: sluice_messages::now_ms(),
    }
}

#[test]
fn records_written_by_rust_match_their_schemas() {
    for record in [prediction("req-1", false), prediction("a:b.c_d-9", true)] {
        let json = serde_json::to_value(&record).expect("a PredictionRecord serialises");
        assert_valid("prediction", &json, &format!("serialised {record:?}"));
    }
    let score = |label: &str, score: f32| LabelScore { label: label.into(), score };
    let intent = IntentRecord {
        event_id: "q-1".into(),
        kind: "query".into(),
        text: "what is my balance".into(),
        label: "check_balance".into(),
        confidence: 0.97,
        top: vec![score("check_balance", 0.97), score("transfer_money", 0.02), score("open_account", 0.01)],
        model: ModelRef { name: "query-intent".into(), version: "1".into() },
        batch_size: 8,
        cached: false,
        requested_at_ms: 1_717_171_200_000,
        inferred_at_ms: 1_717_171_200_030,
        written_at_ms: sluice_messages::now_ms(),
    };
    let json = serde_json::to_value(&intent).expect("an IntentRecord serialises");
    assert_valid("prediction", &json, &format!("serialised {intent:?}"));
    // Payload lengths 0..=3 mod 3 cover every base64 padding case.
    for (event_id, key, payload) in [
        (Some("req-1"), Some("AAPL"), &b"{\"kind\":\"stock\"}"[..]),
        (None, None, b""),
        (Some("bad id with spaces"), None, b"x"),
        (None, Some("\u{fffd}key"), b"xy"),
        (Some(""), Some(""), b"xyz"),
    ] {
        let letter = dead_letter(event_id, key, payload);
        let json = serde_json::to_value(&letter).expect("a DeadLetter serialises");
        assert_valid("dead_letter", &json, &format!("serialised {letter:?}"));
    }
    let window = vec![vec![0.5; WINDOW_FEATURES]; WINDOW_ROWS];
    for event in [
        RequestEvent::Stock(StockRequest {
            event_id: "req-1".into(),
            symbol: "AAPL".into(),
            as_of: "2024-05-31".parse().expect("a date"),
            window: None,
            from: None,
            stride: None,
            deadline_ms: Some(1_717_171_260_000),
            max_age_ms: None,
            priority: None,
        }),
        RequestEvent::Stock(StockRequest {
            event_id: "backfill-1".into(),
            symbol: "AAPL".into(),
            as_of: "2024-05-31".parse().expect("a date"),
            window: None,
            from: Some("2024-03-01".parse().expect("a date")),
            stride: Some(5),
            deadline_ms: None,
            max_age_ms: None,
            priority: Some(Priority::Bulk),
        }),
        RequestEvent::Stock(StockRequest {
            event_id: "req-2".into(),
            symbol: "MSFT".into(),
            as_of: "2024-05-31".parse().expect("a date"),
            window: Some(window),
            from: None,
            stride: None,
            deadline_ms: None,
            max_age_ms: None,
            priority: None,
        }),
        RequestEvent::Query(QueryRequest {
            event_id: "q-1".into(),
            text: "what is my balance".into(),
            deadline_ms: None,
            max_age_ms: Some(2_000),
            priority: None,
        }),
    ] {
        let json = serde_json::to_value(&event).expect("a RequestEvent serialises");
        assert_valid("request", &json, &format!("serialised {event:?}"));
    }
}

/// A stock request with these fields (over a valid one).
fn stock(overrides: &Value) -> Value {
    let mut event = json!({"kind": "stock", "event_id": "e-1", "symbol": "AAPL", "as_of": "2024-05-31"});
    let fields = event.as_object_mut().expect("an object");
    for (k, v) in overrides.as_object().expect("an object") {
        fields.insert(k.clone(), v.clone());
    }
    event
}

fn query(text: &str) -> Value {
    json!({"kind": "query", "event_id": "q-1", "text": text})
}

#[test]
fn schema_and_request_parser_agree_on_edge_cases() {
    let validator = validator("request");
    let window = |rows: usize, cols: usize| json!(vec![vec![0.5; cols]; rows]);
    // (case, the request, whether the schema accepts it, whether RequestEvent::from_json does)
    let cases = [
        ("event_id of 128 characters", stock(&json!({"event_id": "e".repeat(128)})), true, true),
        ("event_id of 129 characters", stock(&json!({"event_id": "e".repeat(129)})), false, false),
        ("every allowed event_id character", stock(&json!({"event_id": "AZaz09._:-"})), true, true),
        ("non-ASCII event_id", stock(&json!({"event_id": "é"})), false, false),
        ("event_id with a newline at the end", stock(&json!({"event_id": "e-1\n"})), false, false),
        ("event_id not a string", stock(&json!({"event_id": 7})), false, false),
        ("symbol of 16 characters", stock(&json!({"symbol": "ABCDEFGHIJKLMNOP"})), true, true),
        ("symbol with . and -", stock(&json!({"symbol": "BRK.B-2"})), true, true),
        ("empty symbol", stock(&json!({"symbol": ""})), false, false),
        ("symbol with a newline at the end", stock(&json!({"symbol": "AAPL\n"})), false, false),
        ("leap day", stock(&json!({"as_of": "2024-02-29"})), true, true),
        ("29 February of a common year", stock(&json!({"as_of": "2023-02-29"})), false, false),
        ("month 13", stock(&json!({"as_of": "2024-13-01"})), false, false),
        ("date with a time", stock(&json!({"as_of": "2024-05-31T00:00:00Z"})), false, false),
        ("date not a string", stock(&json!({"as_of": 20240531})), false, false),
        // Both insist on the canonical YYYY-MM-DD (chrono alone would take these).
        ("date without zero padding", stock(&json!({"as_of": "2024-5-31"})), false, false),
        ("date with a sign", stock(&json!({"as_of": "+2024-05-31"})), false, false),
        ("date with spaces", stock(&json!({"as_of": " 2024 - 05 - 31 "})), false, false),
        ("null window", stock(&json!({"window": null})), true, true),
        ("30 x 105 window of integers", stock(&json!({"window": vec![vec![1; 105]; 30]})), true, true),
        ("window of nulls", stock(&json!({"window": vec![vec![Value::Null; 105]; 30]})), false, false),
        ("window not an array", stock(&json!({"window": {"rows": 30}})), false, false),
        ("text with one letter", query("x"), true, true),
        ("text of spaces and tabs", query(" \t\r\n"), false, false),
        ("empty text", query(""), false, false),
        // Rust's `str::trim` removes Unicode White_Space, which is not ECMA-262's `\s`.
        ("text of U+0085 NEXT LINE", query("\u{85}"), false, false),
        ("text of U+3000 IDEOGRAPHIC SPACE", query("\u{3000}\u{2003}"), false, false),
        ("text of U+FEFF BYTE ORDER MARK", query("\u{feff}"), true, true),
        ("text of U+200B ZERO WIDTH SPACE", query("\u{200b}"), true, true),
        ("query with a symbol", json!({"kind": "query", "event_id": "q", "text": "x", "symbol": "A"}), false, false),
        ("kind in another case", stock(&json!({"kind": "Stock"})), false, false),
        ("kind null", stock(&json!({"kind": null})), false, false),
        ("text holding U+0000", query("what is my balance\u{0}"), false, false),
        ("text with a tab and a newline", query("balance\tplease\n"), true, true),
        // The window's shape is the served model's, checked by the fetcher
        // (`invalid_window_shape`), not by the schema: a model of another shape
        // (docs/models.md) takes other windows.
        ("29 x 105 window", stock(&json!({"window": window(29, 105)})), true, true),
        ("20 x 8 window", stock(&json!({"window": window(20, 8)})), true, true),
        // Known, deliberate differences: the schema is stricter than the parser.
        ("empty window", stock(&json!({"window": []})), false, true),
        ("window of empty rows", stock(&json!({"window": [[], []]})), false, true),
    ];
    for (case, event, schema_accepts, parser_accepts) in &cases {
        let errors = schema_errors(&validator, event);
        assert_eq!(
            errors.is_empty(),
            *schema_accepts,
            "{case}: the schema should {}accept {event}; its errors:\n{errors}",
            if *schema_accepts { "" } else { "not " }
        );
        let bytes = serde_json::to_vec(event).expect("serialise a Value");
        let parsed = RequestEvent::from_json(&bytes);
        assert_eq!(
            parsed.is_ok(),
            *parser_accepts,
            "{case}: RequestEvent::from_json should {}accept {event}; it gave {parsed:?}",
            if *parser_accepts { "" } else { "not " }
        );
    }
}
