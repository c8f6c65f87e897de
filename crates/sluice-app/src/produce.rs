//! `sluice produce`: publish request events from a JSON-lines file or from the
//! synthetic generator, with a progress bar.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use sluice_kafka::KafkaConfig;
use sluice_kafka::client::Publisher;
use sluice_stages::generate::GeneratedEvent;

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({per_sec}, {eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Publishes generated events, keyed by event id.
pub async fn publish_generated(kafka: &KafkaConfig, topic: &str, events: &[GeneratedEvent]) -> anyhow::Result<u64> {
    let mut publisher = Publisher::new(kafka, "sluice-produce")?;
    let bar = progress(events.len() as u64, "publishing");
    for e in events {
        publisher.send(topic, Some(e.event_id.as_bytes()), &e.json).await?;
        bar.inc(1);
    }
    let delivered = publisher.finish().await?;
    bar.finish_and_clear();
    Ok(delivered)
}

/// Publishes each non-empty line of a file as one event, keyed by its
/// `event_id` when the line is JSON that has one. Lines are sent as they are,
/// bytes and all (even ones that are not UTF-8): validating them is the
/// fetcher's job (bad ones become dead letters).
pub async fn publish_file(kafka: &KafkaConfig, topic: &str, path: &Path) -> anyhow::Result<u64> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<&[u8]> = bytes
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.trim_ascii().is_empty())
        .collect();
    let mut publisher = Publisher::new(kafka, "sluice-produce")?;
    let bar = progress(lines.len() as u64, "publishing");
    for line in lines {
        let key = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("event_id").and_then(|id| id.as_str()).map(str::to_string));
        publisher.send(topic, key.as_deref().map(str::as_bytes), line).await?;
        bar.inc(1);
    }
    let delivered = publisher.finish().await?;
    bar.finish_and_clear();
    Ok(delivered)
}
