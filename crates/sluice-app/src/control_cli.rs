//! `sluice overrides get|set|unset|watch`, `sluice cache stats|clear` and
//! `sluice rollout start|step|status|promote|abort`.

use std::io::Write;

use anyhow::Context as _;
use std::sync::Arc;

use clap::Subcommand;
use serde_json::json;
use sluice_control::admin;
use sluice_control::link::RedisLink;
use sluice_control::overrides::{self, Follower};
use sluice_control::rollout::store::{Stored, now_ms, parse_share};
use sluice_control::rollout::{Gates, Phase, Rollout, RolloutStore, Tally, judge};
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

/// The gates a rollout is judged by (defaults: [`Gates::default`]).
#[derive(Debug, Clone, clap::Args)]
pub struct GateArgs {
    /// Compared events before a promotion can be decided.
    #[arg(long)]
    pub min_compared: Option<u64>,
    /// Stock: the p99 of |candidate - serving| predicted return, at most.
    #[arg(long)]
    pub max_return_diff_p99: Option<f64>,
    /// Queries: the share of events both label alike, at least (0..1).
    #[arg(long)]
    pub min_label_agreement: Option<f64>,
    /// The candidate's errors (failed calls, non-finite or out-of-range answers) per compared event, at most.
    #[arg(long)]
    pub max_error_rate: Option<f64>,
    /// The candidate's model time over the serving version's on the same batches, at most.
    #[arg(long)]
    pub max_time_ratio: Option<f64>,
}

impl GateArgs {
    fn gates(&self) -> Gates {
        let d = Gates::default();
        Gates {
            min_compared: self.min_compared.unwrap_or(d.min_compared),
            max_return_diff_p99: self.max_return_diff_p99.unwrap_or(d.max_return_diff_p99),
            min_label_agreement: self.min_label_agreement.unwrap_or(d.min_label_agreement),
            max_error_rate: self.max_error_rate.unwrap_or(d.max_error_rate),
            max_time_ratio: self.max_time_ratio.unwrap_or(d.max_time_ratio),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Start a rollout: every inferrer replica loads the candidate beside the
    /// serving version, runs it on --shadow of the batches and answers
    /// --canary of the keys with it, and promotes or rolls it back by itself.
    Start {
        /// The model (its metadata's name; the stock model by default).
        #[arg(long)]
        model: Option<String>,
        /// The version to roll out (installed under the model's directory).
        #[arg(long)]
        candidate: String,
        /// The share of batches the candidate also runs on, its answers to the shadow topic (20% or 0.2).
        #[arg(long, default_value = "20%")]
        shadow: String,
        /// The share of keys (stock symbols, query event ids) the candidate answers.
        #[arg(long, default_value = "0%")]
        canary: String,
        /// Canary shares `sluice rollout step` moves through, rising (5%,25%,100%).
        #[arg(long, value_delimiter = ',')]
        schedule: Vec<String>,
        /// Take the schedule's next step by itself this often (seconds; 0: only by hand).
        #[arg(long, default_value_t = 0)]
        step_every_s: u64,
        #[command(flatten)]
        gates: GateArgs,
    },
    /// Raise the canary share: to --to, or to the schedule's next step.
    Step {
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        to: Option<String>,
    },
    /// The rollout, its tally summed over every replica, and what the gates say of it now.
    Status {
        #[arg(long)]
        model: Option<String>,
    },
    /// Promote the candidate now, whatever the gates say.
    Promote {
        #[arg(long)]
        model: Option<String>,
    },
    /// Stop the rollout: the serving version stays, the candidate is unloaded.
    Abort {
        #[arg(long)]
        model: Option<String>,
    },
}

/// The tally's figures a person reads.
fn figures(tally: &Tally) -> serde_json::Value {
    let ratio = (tally.serving_seconds > 0.0).then(|| tally.candidate_seconds / tally.serving_seconds);
    json!({
        "compared": tally.compared,
        "errors": tally.errors,
        "return_diff_p50": tally.return_diff_quantile(0.5),
        "return_diff_p99": tally.return_diff_quantile(0.99),
        "queries": tally.queries,
        "label_agreement": (tally.queries > 0).then(|| tally.agreed as f64 / tally.queries as f64),
        "model_time_ratio": ratio,
    })
}

pub async fn rollout(config: SluiceConfig, action: RolloutAction) -> anyhow::Result<()> {
    let (overrides, _) = redis_store(&config)?;
    let store = RolloutStore::beside(&overrides);
    let stock = model_name(&config.inferrer.model);
    let model = |m: &Option<String>| m.clone().unwrap_or_else(|| stock.clone());
    // A change a person asks of the running rollout, compared-and-set.
    let running = async |name: &str| -> anyhow::Result<Stored> {
        match store.get(name).await? {
            Some(stored) if stored.rollout.is_running() => Ok(stored),
            Some(stored) => anyhow::bail!(
                "the rollout {} of {name} is {} already; start a new one with `sluice rollout start`",
                stored.rollout.id,
                stored.rollout.phase.name()
            ),
            None => anyhow::bail!("{name} has no rollout; start one with `sluice rollout start`"),
        }
    };
    let replaced = |done: bool, next: &Rollout| -> anyhow::Result<()> {
        anyhow::ensure!(done, "the rollout changed meanwhile (a replica decided it?): see `sluice rollout status`");
        out(&serde_json::to_string_pretty(next)?)
    };
    match action {
        RolloutAction::Start { model: m, candidate, shadow, canary, schedule, step_every_s, gates } => {
            let name = model(&m);
            let (served, base) = model_of(&config, &name);
            anyhow::ensure!(
                served.has_version(&candidate),
                "candidate: version {candidate} of {name} is not installed under {}",
                served.dir.display()
            );
            let raw = overrides.read(Scope::Model(name.clone())).await?;
            let versions = |v: &str| served.has_version(v);
            let (parsed, _) = overrides.parse(Scope::Model(name.clone()), &raw, &ScopedOverrides::default(), &versions);
            let serving = parsed.effective(&base).model_version;
            let share = |key: &str, text: &str| parse_share(key, text).map_err(anyhow::Error::msg);
            let schedule = schedule.iter().map(|s| share("schedule", s)).collect::<anyhow::Result<Vec<_>>>()?;
            let rollout = Rollout::new(
                &name,
                &serving,
                &candidate,
                share("shadow", &shadow)?,
                share("canary", &canary)?,
                gates.gates(),
                schedule,
                step_every_s,
            )
            .map_err(|e| anyhow::anyhow!("rollout refused: {e}"))?;
            let current = store.get(&name).await?;
            if let Some(c) = current.as_ref().filter(|c| c.rollout.is_running()) {
                anyhow::bail!("the rollout {} of {name} is running: `sluice rollout abort` it first", c.rollout.id);
            }
            replaced(store.replace(current.as_ref(), &rollout).await?, &rollout)
        }
        RolloutAction::Step { model: m, to } => {
            let stored = running(&model(&m)).await?;
            let share = match to {
                Some(to) => parse_share("to", &to).map_err(anyhow::Error::msg)?,
                None => stored.rollout.next_step().context("no step left in the schedule: give --to")?,
            };
            anyhow::ensure!(
                share >= stored.rollout.canary,
                "to: the canary share only rises (now {})",
                stored.rollout.canary
            );
            let next = stored.rollout.stepped(share);
            replaced(store.replace(Some(&stored), &next).await?, &next)
        }
        RolloutAction::Status { model: m } => {
            let name = model(&m);
            let Some(stored) = store.get(&name).await? else {
                return out(&serde_json::to_string_pretty(&json!({ "model": name, "rollout": null }))?);
            };
            let tally = store.tally(&name, &stored.rollout.id).await?;
            out(&serde_json::to_string_pretty(&json!({
                "model": name,
                "rollout": stored.rollout,
                "tally": figures(&tally),
                "gates_say": judge(&stored.rollout.gates, &tally),
            }))?)
        }
        RolloutAction::Promote { model: m } => {
            let name = model(&m);
            let stored = running(&name).await?;
            let tally = store.tally(&name, &stored.rollout.id).await?;
            let figures = format!("by a person, at {}", figures(&tally));
            let next = stored.rollout.decided(Phase::Promoted { figures, at_ms: now_ms() });
            replaced(store.replace(Some(&stored), &next).await?, &next)
        }
        RolloutAction::Abort { model: m } => {
            let stored = running(&model(&m)).await?;
            let next = stored.rollout.decided(Phase::Aborted { by: "a person".into(), at_ms: now_ms() });
            replaced(store.replace(Some(&stored), &next).await?, &next)
        }
    }
}
