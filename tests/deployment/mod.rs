//! What the deployment-file checks share (`k8s.rs`, `compose.rs`,
//! `alerts_dashboard.rs`): the repository's files, YAML read as JSON, and the
//! error lists every check returns.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use sluice_app::config::SluiceConfig;

/// The stages, each a Deployment running `sluice run <stage>`.
pub const STAGES: [&str; 4] = ["fetcher", "normalizer", "inferrer", "writer"];

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

// ---------------------------------------------------------------------------
// YAML

/// Every document of a YAML file as JSON, with `<<` merge keys resolved (Compose
/// uses them) and empty documents left out.
pub fn yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut documents = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let mut yaml = serde_yaml_ng::Value::deserialize(document).map_err(|e| e.to_string())?;
        // apply_merge resolves one level of merges per call (a merged mapping can
        // bring its own `<<`).
        for _ in 0..8 {
            yaml.apply_merge().map_err(|e| e.to_string())?;
        }
        let json = serde_json::to_value(&yaml).map_err(|e| e.to_string())?;
        if !json.is_null() {
            documents.push(json);
        }
    }
    Ok(documents)
}

pub fn read_yaml(path: &Path) -> Result<Vec<Value>, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    yaml_documents(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn read_one_yaml(path: &Path) -> Value {
    let mut documents = read_yaml(path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(documents.len(), 1, "{} must hold one YAML document", path.display());
    documents.remove(0)
}

/// The port of `observe.listen` (metrics, probes).
pub fn listen_port(config: &SluiceConfig) -> i64 {
    i64::from(config.observe.listen.port())
}

pub fn assert_no_errors(what: &str, errors: &[String]) {
    assert!(errors.is_empty(), "{what}:\n  {}", errors.join("\n  "));
}

/// Removes `key` from the object `value`, which must have it.
pub fn unset(value: &mut Value, key: &str) {
    let removed = value.as_object_mut().and_then(|m| m.remove(key));
    assert!(removed.is_some(), "no {key} to remove");
}
