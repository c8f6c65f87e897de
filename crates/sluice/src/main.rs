//! The `sluice` command: parses its arguments, loads the configuration, and
//! hands off to `sluice-app` (stages, the demo, operator commands) or
//! `sluice-bench` (benchmarks). Nothing else lives here.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use figment::Figment;
use sluice_app::config::SluiceConfig;
use sluice_app::control_cli::{self, CacheAction, OverridesAction, RolloutAction};
use sluice_app::launch::{StageKind, run_stages};
use sluice_app::tools::{self, Events};
use sluice_app::{demo, dlq, observe};
use sluice_bench as bench;

#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "A streaming batch-inference pipeline over Kafka")]
struct Cli {
    /// Configuration file (TOML); see crates/sluice-app/src/default.toml for every key.
    #[arg(long, env = "SLUICE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Overrides `kafka.brokers`.
    #[arg(long, global = true)]
    brokers: Option<String>,
    /// Overrides `observe.listen` (the metrics and health server).
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Overrides `observe.log_format`.
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole pipeline on an in-process broker, with synthetic events,
    /// and print a summary. Needs no external service.
    Demo {
        /// Events to publish.
        #[arg(long, default_value_t = 2000)]
        events: usize,
        /// Make every N-th stock event invalid (0: none), to show dead letters.
        /// (One event in ten is a text query.)
        #[arg(long, default_value_t = 100)]
        invalid_every: usize,
    },
    /// Run one stage (a consumer-group member; run as many replicas as you like).
    Run { stage: StageKind },
    /// Run all four stages in this process, still through Kafka topics.
    Pipeline,
    /// Manage topics.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Publish request events to the requests topic.
    Produce {
        /// A JSON-lines file, one event per line.
        #[arg(long, conflicts_with = "synthetic")]
        file: Option<PathBuf>,
        /// Publish this many synthetic stock events instead.
        #[arg(long)]
        synthetic: Option<usize>,
        /// With --synthetic: make every N-th event invalid (0: none).
        #[arg(long, default_value_t = 0)]
        invalid_every: usize,
        /// With --synthetic: event ids are `{prefix}-{n}`.
        #[arg(long, default_value = "evt")]
        prefix: String,
        /// Publish to the bulk twin of the requests topic: bulk work, served
        /// after live work (needs `lanes.enabled`).
        #[arg(long)]
        bulk: bool,
    },
    /// Live overrides in Redis (batch size, deadline, min confidence, model version, cache, threads).
    Overrides {
        #[command(subcommand)]
        action: OverridesAction,
    },
    /// The prediction cache's shared tier in Redis.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Safe model rollout: a candidate version in shadow and canary beside
    /// the serving one, promoted or rolled back by its gates (needs Redis).
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
    },
    /// Dead letters: republish selected ones to the topic they came from.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// PostgreSQL: create the tables, load synthetic history.
    Db {
        #[command(subcommand)]
        action: DbAction,
    },
    /// Measure, and write the figures to docs/benchmarks.md.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Print the effective configuration (secrets left out) and exit.
    Config,
}

#[derive(Debug, Subcommand)]
enum DbAction {
    /// Apply the migrations in schemas/sql/ that are missing.
    Migrate,
    /// Load deterministic synthetic history (the synthetic source's rows) with COPY.
    Seed {
        /// Symbols S0000.. to load.
        #[arg(long, default_value_t = 5000)]
        symbols: usize,
        /// Trading days per symbol, ending at --end.
        #[arg(long, default_value_t = 60)]
        days: usize,
        #[arg(long, default_value = "2024-12-31")]
        end: chrono::NaiveDate,
    },
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Republish the original bytes of the dead letters that match to the
    /// topic each came from (after a fix), keyed as before. Sinks are
    /// idempotent by event id: a replayed event never makes a second row.
    Replay {
        /// Only these reasons (repeatable; default: every reason).
        #[arg(long = "reason")]
        reasons: Vec<String>,
        /// Only dead letters of this stage.
        #[arg(long)]
        stage: Option<String>,
        /// Only dead letters written at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only dead letters written before this time (RFC 3339).
        #[arg(long)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// Stop after this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Count what matches; publish nothing.
        #[arg(long)]
        dry_run: bool,
        /// Stop reading once nothing new arrives for this long (ms).
        #[arg(long, default_value_t = 3000)]
        idle_ms: u64,
    },
}

/// A half of `sluice bench traffic`.
#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
enum TrafficHalf {
    Lanes,
    Ramp,
}

#[derive(Debug, Subcommand)]
enum BenchWhat {
    /// Per-event cost of a cache hit against a model run, in process.
    Cache {
        #[arg(long, default_value_t = 4096)]
        events: usize,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Also measure hits served by Redis (e.g. redis://127.0.0.1:6379).
        #[arg(long)]
        redis_url: Option<String>,
        /// The Markdown file to update.
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
    /// The query model's queries per second by batch size and token budget,
    /// padding to the longest against padding to the maximum (in process).
    Query {
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
    /// The users' job: seed N stocks, predict each through the four stages as
    /// separate processes (tansu broker, PostgreSQL in and out), time it.
    Postgres {
        #[arg(long, default_value_t = 5000)]
        symbols: usize,
        #[arg(long, default_value_t = 60)]
        days: usize,
        /// Timed runs of the job (each as of another day, so no run is a cache
        /// hit of another); the median run is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
    /// What batching buys: the raw model, the inferrer in memory, the inferrer
    /// through the broker and the four-stage pipeline, by batch size; one at a
    /// time; and low-load latency by `max_wait`. Writes JSON, Markdown and SVG.
    Batching {
        /// Events per measured point.
        #[arg(long, default_value_t = 16384)]
        events: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64,128,256,512")]
        sizes: Vec<usize>,
        /// The inferrer's max_wait_ms values for the low-load latency runs.
        #[arg(long, value_delimiter = ',', default_value = "0,5,20,50")]
        waits: Vec<u64>,
        /// Events per second in the low-load latency runs.
        #[arg(long, default_value_t = 50)]
        rate: u32,
        /// Runs per throughput point: the median is reported, with the spread.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// A near-free model with the stock model's input, measured beside it
        /// [default: the stock-light fixture that `make setup` exports].
        #[arg(long)]
        light_model: Option<PathBuf>,
        /// The LSTM alone, without the near-free model.
        #[arg(long, conflicts_with = "light_model")]
        no_light_model: bool,
        #[arg(long, default_value = "docs/benchmarks")]
        out_dir: PathBuf,
    },
    /// Sluice's inferrer against a plain Python consumer loop (confluent-kafka
    /// and torch) on the same broker, records and model, LSTM and near-free.
    Baseline {
        /// Events per run.
        #[arg(long, default_value_t = 16384)]
        events: usize,
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Rounds: the median run is reported, with the spread.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// The near-free model, measured after the LSTM [default: the stock-light fixture].
        #[arg(long)]
        light_model: Option<PathBuf>,
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
    /// What decoding a large batch on several threads (`inferrer.decode_threads`)
    /// brings to the inferrer in memory, with the LSTM and the near-free model.
    Decode {
        /// Events per measured run.
        #[arg(long, default_value_t = 16384)]
        events: usize,
        #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
        sizes: Vec<usize>,
        /// Decode threads compared; the first is the baseline.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        /// Rounds: the median run is reported, with the spread.
        #[arg(long, default_value_t = 9)]
        repeats: usize,
        /// The near-free model, measured after the LSTM [default: the stock-light fixture].
        #[arg(long)]
        light_model: Option<PathBuf>,
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
    /// What a model rollout costs the inferrer: in memory, no rollout against
    /// a candidate in 20% shadow, and with a 5% canary as well.
    Rollout {
        /// Events per measured run.
        #[arg(long, default_value_t = 8192)]
        events: usize,
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// The candidate version, installed beside the serving one.
        #[arg(long, default_value = "2")]
        candidate: String,
        /// Rounds: the median run is reported, with the spread.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
    /// A backlog published before any stage runs, then drained by the four
    /// stages (separate processes, tansu broker), with every process's
    /// resident memory sampled.
    Backlog {
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Every N-th event is a stock event, the rest queries (0: queries only).
        #[arg(long, default_value_t = 50)]
        stock_every: usize,
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
    /// Live latency while a bulk backlog drains, with lanes and without,
    /// against the same live stream alone (four stages, tansu broker); then
    /// the latency controller against fixed batch sizes on a load ramp (the
    /// inferrer alone, tansu broker).
    Traffic {
        /// One half only: `lanes` or `ramp` (both by default).
        #[arg(long)]
        only: Option<TrafficHalf>,
        /// Stock requests in the bulk backlog.
        #[arg(long, default_value_t = 20_000)]
        bulk: usize,
        /// Live requests per run, published one by one at --live-rate.
        #[arg(long, default_value_t = 300)]
        live: usize,
        #[arg(long, default_value_t = 10)]
        live_rate: u32,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// The stages' `lanes.bulk_share` (one batch in N is bulk while both wait).
        #[arg(long, default_value_t = 8)]
        bulk_share: u64,
        #[arg(long, default_value = "docs/benchmarks/traffic.md")]
        out: PathBuf,
        /// Seconds per load level of the ramp.
        #[arg(long, default_value_t = 4.0)]
        ramp_level_s: f64,
        /// The controller's `latency_target_ms` in the ramp: one run per target.
        #[arg(long, value_delimiter = ',', default_value = "50,250")]
        ramp_target_ms: Vec<u64>,
        /// The bounds in the ramp: `max_batch_size` (also the capacity's batch size).
        #[arg(long, default_value_t = 256)]
        ramp_max_batch: usize,
        /// The bounds in the ramp: `max_wait_ms` (every fixed setting's too).
        #[arg(long, default_value_t = 20)]
        ramp_max_wait_ms: u64,
        /// Fixed batch sizes the ramp compares the controller with.
        #[arg(long, value_delimiter = ',', default_value = "16,64")]
        ramp_fixed: Vec<usize>,
    },
    /// What producer compression saves on the windows between the stages and
    /// what it costs, by codec, on noise and on random-walk history: the
    /// broker alone, then the four-stage pipeline.
    Compression {
        /// Windows per broker-alone run.
        #[arg(long, default_value_t = 4096)]
        windows: usize,
        /// Requests per pipeline run (0: no pipeline runs).
        #[arg(long, default_value_t = 8192)]
        events: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
    /// How long answers stop when the inferrer is killed mid-stream and
    /// restarted at once, with dynamic and with static group membership.
    Recovery {
        /// Kills per membership mode.
        #[arg(long, default_value_t = 3)]
        kills: usize,
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TopicsAction {
    /// Create every configured topic (existing ones are left alone).
    Create,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut overrides = Figment::new();
    if let Some(brokers) = &cli.brokers {
        overrides = overrides.merge(SluiceConfig::flag("kafka.brokers", brokers));
    }
    if let Some(listen) = &cli.listen {
        overrides = overrides.merge(SluiceConfig::flag("observe.listen", listen));
    }
    if let Some(format) = &cli.log_format {
        overrides = overrides.merge(SluiceConfig::flag("observe.log_format", format));
    }
    let config = SluiceConfig::load(cli.config.as_deref(), &overrides)?;
    // Still one thread: the only safe moment to change the environment.
    if config.inferrer.model.tf32 || config.inferrer.query.model.tf32 {
        sluice_app::launch::allow_tf32();
    }
    // The demo prints a summary: keep its logs to warnings unless RUST_LOG says otherwise.
    let default_filter = match cli.command {
        Command::Demo { .. } => "warn",
        _ => "info,librdkafka=warn,rdkafka=warn",
    };
    observe::init_logs(config.observe.log_format, default_filter);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(run(cli.command, config));
    // Dropping a runtime waits, without limit, for its blocking tasks, and the
    // drain abandons librdkafka calls that outlive the drain timeout (a final
    // commit, a flush or a group leave against a broker that is gone). Those
    // must not hold the process past the drain timeout.
    runtime.shutdown_timeout(EXIT_GRACE);
    result
}

/// How long, after the command is done, blocking work may still run before the
/// process exits without it.
const EXIT_GRACE: Duration = Duration::from_millis(500);

async fn run(command: Command, config: SluiceConfig) -> anyhow::Result<()> {
    match command {
        Command::Demo { events, invalid_every } => demo::run(config, events, invalid_every).await,
        Command::Run { stage } => run_stages(&[stage], config).await,
        Command::Pipeline => run_stages(&StageKind::ALL, config).await,
        Command::Topics { action: TopicsAction::Create } => tools::topics_create(&config).await,
        Command::Produce { file, synthetic, invalid_every, prefix, bulk } => {
            let events = match (&file, synthetic) {
                (Some(path), _) => Events::File(path),
                (None, Some(count)) => Events::Synthetic { count, invalid_every, prefix: &prefix },
                (None, None) => anyhow::bail!("give --file FILE or --synthetic N"),
            };
            tools::produce(&config, events, bulk).await
        }
        Command::Overrides { action } => control_cli::overrides(config, action).await,
        Command::Cache { action } => control_cli::cache(config, action).await,
        Command::Rollout { action } => control_cli::rollout(config, action).await,
        Command::Dlq { action: DlqAction::Replay { reasons, stage, since, until, limit, dry_run, idle_ms } } => {
            let idle = Duration::from_millis(idle_ms);
            let selection = dlq::Selection { reasons, stage, since, until, limit, dry_run, idle };
            dlq::replay(&config, &selection).await.map(|_| ())
        }
        Command::Db { action: DbAction::Migrate } => tools::db_migrate(&config).await,
        Command::Db { action: DbAction::Seed { symbols, days, end } } => {
            tools::db_seed(&config, symbols, days, end).await
        }
        Command::Bench { what: BenchWhat::Cache { events, batch, redis_url, out } } => {
            bench::cache::cache(config, events, batch.max(1), redis_url, &out).await
        }
        Command::Bench { what: BenchWhat::Query { out } } => bench::query::query(config, &out).await,
        Command::Bench { what: BenchWhat::Postgres { symbols, days, runs, out } } => {
            bench::postgres::postgres(config, symbols, days, runs, &out).await
        }
        Command::Bench {
            what: BenchWhat::Batching { events, sizes, waits, rate, repeats, light_model, no_light_model, out_dir },
        } => {
            let light_model = if no_light_model { None } else { light_model.or_else(bench::batching::light_fixture) };
            let options =
                bench::batching::Options { events, sizes, waits, low_load_rate: rate, repeats, light_model, out_dir };
            bench::batching::batching(config, options).await
        }
        Command::Bench { what: BenchWhat::Baseline { events, batch, repeats, light_model, out } } => {
            let light_model = light_model.or_else(bench::batching::light_fixture);
            let options = bench::baseline::Options { events, batch, repeats, light_model, out };
            bench::baseline::baseline(config, options).await
        }
        Command::Bench { what: BenchWhat::Decode { events, sizes, threads, repeats, light_model, out } } => {
            let light_model = light_model.or_else(bench::batching::light_fixture);
            let options = bench::decode::Options { events, sizes, threads, repeats, light_model, out };
            bench::decode::decode(config, options).await
        }
        Command::Bench { what: BenchWhat::Rollout { events, batch, candidate, repeats, out } } => {
            let options = bench::rollout::Options { events, batch, candidate, repeats, out };
            bench::rollout::rollout(config, options).await
        }
        Command::Bench { what: BenchWhat::Backlog { events, stock_every, out } } => {
            bench::backlog::backlog(config, events, stock_every, &out).await
        }
        Command::Bench { what: BenchWhat::Compression { windows, events, repeats, out } } => {
            bench::compression::compression(config, bench::compression::Options { windows, events, repeats, out }).await
        }
        Command::Bench {
            what:
                BenchWhat::Traffic {
                    only,
                    bulk,
                    live,
                    live_rate,
                    repeats,
                    bulk_share,
                    out,
                    ramp_level_s,
                    ramp_target_ms,
                    ramp_max_batch,
                    ramp_max_wait_ms,
                    ramp_fixed,
                },
        } => {
            let ramp = (only != Some(TrafficHalf::Lanes)).then(|| bench::ramp::Options {
                level_s: ramp_level_s,
                targets_ms: ramp_target_ms,
                max_batch: ramp_max_batch,
                max_wait_ms: ramp_max_wait_ms,
                fixed: ramp_fixed,
                repeats,
                out: out.clone(),
            });
            let lanes = only != Some(TrafficHalf::Ramp);
            let options = bench::traffic::Options { bulk, live_rate, live, repeats, bulk_share, out, lanes, ramp };
            bench::traffic::traffic(config, options).await
        }
        Command::Bench { what: BenchWhat::Recovery { kills, out } } => {
            bench::recovery::recovery(config, kills, &out).await
        }
        Command::Config => tools::print_config(&config),
    }
}
