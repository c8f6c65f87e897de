//! Logs, Prometheus metrics and the health endpoints of a Sluice process.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use sluice_kafka::StageStatus;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Starts logging. `RUST_LOG` overrides `default_filter`.
pub fn init_logs(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Installs the Prometheus recorder (once per process).
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 32.0, 64.0, 128.0,
            256.0, 512.0, 1024.0,
        ])?
        .install_recorder()?;
    Ok(handle)
}

/// What the health endpoints report on.
#[derive(Debug, Clone)]
pub struct Health {
    pub metrics: PrometheusHandle,
    /// The stages of this process, by name.
    pub stages: Vec<(&'static str, Arc<StageStatus>)>,
    /// Static facts for `/status` (effective configuration, with secrets left out).
    pub info: serde_json::Value,
    /// The settings in force (configuration and Redis overrides), by model
    /// name: the stock model's (also the writer's), then the query model's if
    /// it is served here.
    pub settings: Vec<(String, tokio::sync::watch::Receiver<sluice_control::Settings>)>,
    /// The prediction cache, in a process that runs an inferrer.
    pub cache: Option<Arc<sluice_control::cache::PredictionCache>>,
    /// Each served model's counters (serving version), by model name.
    pub models: Vec<(String, Arc<sluice_stages::InferrerStats>)>,
    /// Each served model's rollout (running or decided), by model name.
    pub rollouts: Vec<(String, sluice_control::rollout::RolloutLink)>,
    /// GPU readings, in a process that runs models where NVML loads.
    pub gpu: Option<Arc<crate::gpu::GpuMonitor>>,
    /// PostgreSQL, in a process whose stages cannot work without it (a
    /// fetcher reading history from it, a writer saving to it): `/readyz`
    /// checks it answers.
    pub postgres: Option<deadpool_postgres::Pool>,
}

/// Whether PostgreSQL answers `SELECT 1` within a second.
async fn postgres_answers(pool: &deadpool_postgres::Pool) -> bool {
    let check = async {
        let client = pool.get().await.ok()?;
        client.simple_query("SELECT 1").await.ok()
    };
    matches!(tokio::time::timeout(std::time::Duration::from_secs(1), check).await, Ok(Some(_)))
}

/// Serves `/metrics`, `/healthz`, `/readyz` and `/status` until `shutdown`.
/// Returns the bound address (useful with port 0).
pub async fn serve(listen: SocketAddr, health: Health, shutdown: CancellationToken) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("configuration key `observe.listen`: cannot bind {listen}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(Arc::new(health));
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "health server stopped");
        }
    });
    tracing::info!(%bound, "serving /metrics /healthz /readyz /status");
    Ok(bound)
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    health.metrics.render()
}

fn stage_states(health: &Health) -> serde_json::Value {
    health
        .stages
        .iter()
        .map(|(name, s)| {
            (
                name.to_string(),
                json!({
                    "ready": s.ready(),
                    "warmed_up": s.warmed_up(),
                    "assigned_partitions": s.assigned_partitions(),
                    "acknowledged": s.acknowledged.load(std::sync::atomic::Ordering::Relaxed),
                    "stalled_partitions": s.stalled(),
                    "batch_controller": s.controller(),
                    "bulk_paused": s.bulk_paused(),
                    "bulk_pauses": s.bulk_pauses(),
                }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Ready: every stage warmed up (models loaded) and in its consumer group
/// with its partitions assigned, and PostgreSQL answering where a stage needs
/// it. Redis is reported, not required: without it the settings in force stay
/// and the cache misses, the pipeline goes on.
async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let stages = health.stages.iter().all(|(_, s)| s.ready());
    let postgres = match &health.postgres {
        Some(pool) => Some(postgres_answers(pool).await),
        None => None,
    };
    let redis = health.cache.as_ref().and_then(|c| c.redis_up());
    let ready = stages && postgres != Some(false);
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        code,
        Json(json!({
            "ready": ready,
            "stages": stage_states(&health),
            "dependencies": { "postgres": postgres, "redis": redis },
        })),
    )
}

async fn status(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let settings: serde_json::Map<String, serde_json::Value> =
        health.settings.iter().map(|(name, s)| (name.clone(), json!(*s.borrow()))).collect();
    let cache = health.cache.as_ref().map(|c| c.stats());
    let models: serde_json::Map<String, serde_json::Value> = health
        .models
        .iter()
        .map(|(name, s)| {
            let stats = json!({
                "serving_version": s.serving_version(),
                "model_rows": s.model_rows.load(std::sync::atomic::Ordering::Relaxed),
                "cache_hits": s.cache_hits.load(std::sync::atomic::Ordering::Relaxed),
                "switches": s.switches.load(std::sync::atomic::Ordering::Relaxed),
                "rollout": health.rollouts.iter().find(|(n, _)| n == name).and_then(|(_, r)| r.current()).map(|r| json!(*r)),
            });
            (name.clone(), stats)
        })
        .collect();
    Json(json!({
        "stages": stage_states(&health),
        "settings": settings,
        "models": models,
        "cache": cache,
        "gpu": health.gpu.as_ref().map(|g| g.readings()),
        "config": health.info,
    }))
}
