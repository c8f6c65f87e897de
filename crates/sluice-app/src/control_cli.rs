//! `sluice overrides get|set|unset|watch` and `sluice cache stats|clear`.

use std::io::Write;
use std::sync::Arc;

use clap::Subcommand;
use serde_json::json;
use sluice_control::admin;
use sluice_control::link::RedisLink;
use sluice_control::overrides::{self, Follower};
use sluice_control::store::{OverrideStore, RawHash, Scope, ScopedOverrides};
use sluice_control::{Overrides, Settings};
use sluice_model::{ModelConfig, ModelKind};
use tokio_util::sync::CancellationToken;

use crate::config::SluiceConfig;
use crate::launch::{batch_size_choice, cancel_on_signals, model_name, override_store, start_control};

/// Which overrides a command reads or writes.
#[derive(Debug, Clone, clap::Args)]
#[group(multiple = false)]
pub struct ScopeArgs {
    /// This model's overrides (its metadata's name), which win over the shared ones.
    #[arg(long)]
    pub model: Option<String>,
    /// The writer's overrides (`min_confidence`), which win over the shared ones.
    #[arg(long)]
    pub writer: bool,
}

impl ScopeArgs {
    fn scope(&self) -> Scope {
        match (&self.model, self.writer) {
            (_, true) => Scope::Writer,
            (Some(model), false) => Scope::Model(model.clone()),
            (None, false) => Scope::All,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum OverridesAction {
    /// Print the raw overrides of the shared scope and one model's (by default
    /// the stock model's) or the writer's, and the settings they give.
    Get {
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Set one field (checked first); every stage applies it within a second.
    /// Without --model or --writer: the shared scope, for every model and the writer.
    Set {
        field: String,
        value: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Remove one field: the configured value applies again.
    Unset {
        field: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Print the effective settings each time they change, until Ctrl-C.
    Watch,
}

#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Hits, misses and model rows summed over every inferrer, and the entry count.
    Stats,
    /// Delete every cache entry of the pipeline and empty the inferrers' LRUs.
    Clear,
}

fn out(text: &str) -> anyhow::Result<()> {
    writeln!(std::io::stdout(), "{text}")?;
    Ok(())
}

fn redis_store(config: &SluiceConfig) -> anyhow::Result<(OverrideStore, Arc<RedisLink>)> {
    match override_store(config)? {
        (store, Some(link)) => Ok((store, link)),
        (_, None) => anyhow::bail!(
            "configuration key `control.redis_url` is empty: overrides then live in each process's memory \
             (the embedded default); set it to manage them from here"
        ),
    }
}

/// A raw hash as JSON: its fields (bytes that are not UTF-8 shown lossily,
/// long values cut), or why the key is not a hash.
fn shown(raw: &RawHash) -> serde_json::Value {
    let text = |bytes: &[u8]| overrides::shown(&String::from_utf8_lossy(bytes));
    match raw {
        Ok(fields) => fields.iter().map(|(f, v)| (text(f), json!(text(v)))).collect::<serde_json::Map<_, _>>().into(),
        Err(why) => json!({ "error": why }),
    }
}

/// The model named `name` (the stock model unless it is the query model's
/// name) and its settings as configured.
fn model_of<'a>(config: &'a SluiceConfig, name: &str) -> (&'a ModelConfig, Settings) {
    if name == model_name(&config.inferrer.query.model) {
        (&config.inferrer.query.model, config.query_base_settings())
    } else {
        (&config.inferrer.model, config.base_settings())
    }
}

pub async fn overrides(config: SluiceConfig, action: OverridesAction) -> anyhow::Result<()> {
    match action {
        OverridesAction::Get { scope } => {
            let (store, _) = redis_store(&config)?;
            let scope = match scope.scope() {
                Scope::All => Scope::Model(model_name(&config.inferrer.model)),
                other => other,
            };
            let raw = store.read(scope.clone()).await?;
            let (served, mut base) = model_of(&config, scope.label());
            // 0 leaves a model's batch size to the device: show what the stages use.
            let mut by = None;
            if scope != Scope::Writer {
                let kind = if served == &config.inferrer.query.model { ModelKind::Query } else { ModelKind::Stock };
                let choice = batch_size_choice(served, base.max_batch_size, kind, false).await?;
                base.max_batch_size = choice.batch_size;
                by = Some(if choice.by == "device" && served.autotune_p99_ms > 0 {
                    "autotune (measured by each inferrer at start, see its /status; the device default is shown)"
                } else {
                    choice.by
                });
            }
            let versions = |v: &str| served.has_version(v);
            let (parsed, refused) = store.parse(scope.clone(), &raw, &ScopedOverrides::default(), &versions);
            let effective = parsed.effective(&base);
            let refused: Vec<_> = refused
                .iter()
                .map(|r| json!({"key": r.key, "field": r.field, "value": r.value, "reason": r.reason}))
                .collect();
            let mut report = json!({
                "scope": scope.label(),
                store.key(&Scope::All): shown(&raw.all),
                store.key(&scope): shown(&raw.model),
                "refused": refused,
                "effective": effective,
            });
            if let Some(by) = by {
                report["model"] = json!(scope.label());
                report["max_batch_size_by"] = json!(by);
            }
            out(&serde_json::to_string_pretty(&report)?)
        }
        OverridesAction::Set { field, value, scope } => {
            let (store, _) = redis_store(&config)?;
            let scope = scope.scope();
            let spec = overrides::field(&field).ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown field {field:?} (known: {})",
                    overrides::names().collect::<Vec<_>>().join(", ")
                )
            })?;
            match (&scope, spec.follower) {
                (Scope::Writer, Follower::Models) => {
                    anyhow::bail!("`{field}` is a model setting: set it with --model or for all")
                }
                (Scope::Model(_), Follower::Writer) => {
                    anyhow::bail!("`{field}` is the writer's: set it with --writer or for all")
                }
                _ => {}
            }
            // A version for one model is checked against that model; for all
            // models, against any.
            let served: Vec<&ModelConfig> = match &scope {
                Scope::Model(name) => vec![model_of(&config, name).0],
                _ => vec![&config.inferrer.model, &config.inferrer.query.model],
            };
            let key = store.key(&scope);
            Overrides::default()
                .check(&field, &value, &|v| served.iter().any(|m| m.has_version(v)))
                .map_err(|reason| anyhow::anyhow!("override `{field}` = {value:?} refused: {reason}"))?;
            store.set(&scope, &field, &value).await?;
            out(&format!("{key} {field} = {value}"))
        }
        OverridesAction::Unset { field, scope } => {
            anyhow::ensure!(
                overrides::field(&field).is_some(),
                "unknown field {field:?} (known: {})",
                overrides::names().collect::<Vec<_>>().join(", ")
            );
            let (store, _) = redis_store(&config)?;
            let scope = scope.scope();
            let removed = store.unset(&scope, &field).await?;
            out(&format!("{} {field} {}", store.key(&scope), if removed { "removed" } else { "was not set" }))
        }
        OverridesAction::Watch => {
            redis_store(&config)?;
            let shutdown = CancellationToken::new();
            cancel_on_signals(shutdown.clone());
            let control = start_control(&config, false, false, shutdown.clone()).await?;
            let mut settings = control.settings;
            loop {
                out(&serde_json::to_string(&*settings.borrow_and_update())?)?;
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    changed = settings.changed() => if changed.is_err() { return Ok(()) },
                }
            }
        }
    }
}

pub async fn cache(config: SluiceConfig, action: CacheAction) -> anyhow::Result<()> {
    let (store, link) = redis_store(&config)?;
    match action {
        CacheAction::Stats => {
            let (counters, entries) = admin::cache_stats(&link, store.keys()).await?;
            let get = |k: &str| counters.get(k).copied().unwrap_or(0);
            let hits = get("hits_lru") + get("hits_redis");
            let lookups = hits + get("misses");
            out(&serde_json::to_string_pretty(&json!({
                "counters": counters,
                "hit_ratio": if lookups > 0 { hits as f64 / lookups as f64 } else { 0.0 },
                "redis_entries": entries,
            }))?)
        }
        CacheAction::Clear => {
            let deleted = admin::clear_cache(&link, store.keys()).await?;
            out(&format!("deleted {deleted} cache entries; running inferrers empty their in-process tier"))
        }
    }
}
