//! The one-shot commands: create topics, publish events, PostgreSQL's schema
//! and seed, print the configuration.

use std::io::Write;
use std::path::Path;

use sluice_kafka::admin::create_topics;
use sluice_stages::generate::generate;

use crate::config::SluiceConfig;
use crate::produce;

/// `sluice topics create`: every configured topic (existing ones are left alone).
pub async fn topics_create(config: &SluiceConfig) -> anyhow::Result<()> {
    let created = create_topics(&config.kafka, &config.topic_specs()).await?;
    tracing::info!(?created, brokers = config.kafka.brokers, "topics ready");
    Ok(())
}

/// What `sluice produce` publishes.
#[derive(Debug)]
pub enum Events<'a> {
    /// A JSON-lines file, one event per line.
    File(&'a Path),
    /// `count` synthetic stock events named `{prefix}-{n}`, every
    /// `invalid_every`-th invalid (0: none).
    Synthetic { count: usize, invalid_every: usize, prefix: &'a str },
}

/// `sluice produce`: publishes to the requests topic (`bulk`: its bulk twin,
/// which needs lanes on); prints how many were delivered.
pub async fn produce(config: &SluiceConfig, events: Events<'_>, bulk: bool) -> anyhow::Result<()> {
    if bulk && !config.lanes.enabled {
        anyhow::bail!("--bulk needs lanes: set `lanes.enabled = true` (SLUICE_LANES__ENABLED=true)");
    }
    let requests = &config.topics.requests;
    let topic = &if bulk { config.lanes.twin(requests) } else { requests.clone() };
    let delivered = match events {
        Events::File(path) => produce::publish_file(&config.kafka, topic, path).await?,
        Events::Synthetic { count, invalid_every, prefix } => {
            let events = generate(prefix, count, invalid_every, config.fetcher.synthetic.universe);
            produce::publish_generated(&config.kafka, topic, &events).await?
        }
    };
    writeln!(std::io::stdout(), "published {delivered} events to {topic}")?;
    Ok(())
}

/// `sluice db migrate`: applies the migrations in schemas/sql/ that are missing.
pub async fn db_migrate(config: &SluiceConfig) -> anyhow::Result<()> {
    let pool = config.postgres.pool()?;
    let applied = sluice_postgres::migrate::migrate(&pool, &config.postgres.schema).await?;
    writeln!(std::io::stdout(), "applied {} migration(s): {applied:?}", applied.len())?;
    Ok(())
}

/// `sluice db seed`: the synthetic source's history for `symbols` symbols,
/// `days` trading days up to `end`, loaded with COPY.
pub async fn db_seed(config: &SluiceConfig, symbols: usize, days: usize, end: chrono::NaiveDate) -> anyhow::Result<()> {
    let pool = config.postgres.pool()?;
    let model = &config.inferrer.model;
    let metadata = sluice_model::ModelMetadata::load(&model.version_dir(&model.version))?;
    let started = std::time::Instant::now();
    let rows =
        sluice_postgres::seed::seed(&pool, symbols, days, end, metadata.features(), config.fetcher.synthetic.history)
            .await?;
    writeln!(std::io::stdout(), "seeded {rows} rows in {:.1} s", started.elapsed().as_secs_f64())?;
    Ok(())
}

/// `sluice config`: the effective configuration as JSON, secrets redacted.
pub fn print_config(config: &SluiceConfig) -> anyhow::Result<()> {
    writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&config.shown())?)?;
    Ok(())
}
