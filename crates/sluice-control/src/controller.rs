//! Follows the override store and publishes the effective [`Settings`].
//!
//! A change takes effect within one reconcile interval (500 ms by default)
//! even if a notification is missed or Redis restarted: the store is re-read
//! on every pub/sub notification *and* on a timer. Refused values are logged
//! and counted once per change, and the last good value is kept.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use metrics::{counter, gauge};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Settings;
use crate::keys::NOTIFY_CACHE_CLEAR;
use crate::overrides::{FIELDS, Refusal};
use crate::store::{OverrideStore, Scope, ScopedOverrides};

/// Says whether a model version can be served.
pub type VersionCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;
/// Called when an operator clears the cache (`sluice cache clear`).
pub type OnCacheClear = Arc<dyn Fn() + Send + Sync>;

/// The override follower of one process.
pub struct Controller {
    store: OverrideStore,
    model: String,
    base: Settings,
    version_exists: VersionCheck,
    reconcile: Duration,
    on_cache_clear: Option<OnCacheClear>,
    /// Whether this controller logs and counts refusals in the all-models
    /// hash: in a process that follows several models, only one does, so a
    /// refusal there is reported once.
    reports_all_scope: bool,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("model", &self.model).field("base", &self.base).finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Followed {
    overrides: ScopedOverrides,
    reported: BTreeSet<Refusal>,
    /// The cache-clear counter last seen (None until first read).
    cache_epoch: Option<u64>,
}

impl Controller {
    /// `base` holds the built-in and configured values; overrides for `model`
    /// apply on top.
    pub fn new(
        store: OverrideStore,
        model: &str,
        base: Settings,
        version_exists: VersionCheck,
        reconcile: Duration,
    ) -> Self {
        Self {
            store,
            model: model.into(),
            base,
            version_exists,
            reconcile,
            on_cache_clear: None,
            reports_all_scope: true,
        }
    }

    /// Leaves refusals in the all-models hash to another controller of the
    /// process (see `reports_all_scope`).
    pub fn leave_all_scope_reports(mut self) -> Self {
        self.reports_all_scope = false;
        self
    }

    pub fn on_cache_clear(mut self, f: OnCacheClear) -> Self {
        self.on_cache_clear = Some(f);
        self
    }

    /// Reads the overrides once (so that a stage starts with them when Redis is
    /// up), then follows them on a task until `shutdown`.
    pub async fn start(self, shutdown: CancellationToken) -> watch::Receiver<Settings> {
        let mut followed = Followed::default();
        let (tx, rx) = watch::channel(self.base.clone());
        publish_gauges(&self.model, &self.base);
        // At 0 from the start, so that alerts on increase() see the first refusal.
        for field in FIELDS.iter().copied().chain(["unknown", "*"]) {
            counter!("sluice_overrides_refused_total", "field" => field).increment(0);
        }
        self.reconcile_once(&tx, &mut followed).await;
        tokio::spawn(self.run(tx, followed, shutdown));
        rx
    }

    async fn run(self, tx: watch::Sender<Settings>, mut followed: Followed, shutdown: CancellationToken) {
        let mut messages: Option<redis::aio::PubSubStream> = None;
        loop {
            if messages.is_none()
                && let OverrideStore::Redis { link, keys } = &self.store
                && link.is_up()
            {
                // Bounded: a half-open socket must not freeze the reconcile loop.
                let subscribe = async {
                    let mut pubsub = link.pubsub().await?;
                    pubsub.subscribe(keys.channel()).await?;
                    Ok::<_, crate::ControlError>(pubsub)
                };
                match tokio::time::timeout(Duration::from_millis(500), subscribe).await {
                    Ok(Ok(pubsub)) => messages = Some(pubsub.into_on_message()),
                    Ok(Err(e)) => tracing::debug!(error = %e, "pub/sub subscribe failed; reconcile still runs"),
                    Err(_) => tracing::debug!("pub/sub subscribe timed out; reconcile still runs"),
                }
            }
            let notified = async {
                match (&mut messages, &self.store) {
                    (Some(stream), _) => stream.next().await.map(|m| m.get_payload_bytes().to_vec()),
                    (None, OverrideStore::Memory { changed, .. }) => {
                        changed.notified().await;
                        Some(Vec::new())
                    }
                    (None, OverrideStore::Redis { .. }) => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.reconcile) => {}
                message = notified => match message {
                    Some(payload) if payload == NOTIFY_CACHE_CLEAR.as_bytes() => {
                        if let Some(clear) = &self.on_cache_clear {
                            clear();
                        }
                        tracing::info!("cache cleared by an operator");
                    }
                    Some(_) => {}
                    // The pub/sub connection dropped: resubscribe once Redis is back.
                    None => messages = None,
                },
            }
            self.reconcile_once(&tx, &mut followed).await;
        }
    }

    async fn reconcile_once(&self, tx: &watch::Sender<Settings>, followed: &mut Followed) {
        // An unreachable Redis is reported by the link; the last good values stay.
        let Ok(raw) = self.store.read(&self.model).await else { return };
        let (overrides, refused) = self.store.parse(&self.model, &raw, &followed.overrides, &*self.version_exists);
        let refused: BTreeSet<Refusal> = refused.into_iter().collect();
        let all_scope = self.store.key(&Scope::All);
        for r in refused.difference(&followed.reported) {
            if !self.reports_all_scope && r.key == all_scope {
                continue;
            }
            let field =
                if FIELDS.contains(&r.field.as_str()) || r.field == "*" { r.field.clone() } else { "unknown".into() };
            counter!("sluice_overrides_refused_total", "field" => field).increment(1);
            tracing::warn!(
                key = r.key,
                field = r.field,
                value = r.value,
                reason = r.reason,
                "override refused; the last good value is kept"
            );
        }
        *followed = Followed { overrides, reported: refused, cache_epoch: followed.cache_epoch };
        self.follow_cache_epoch(followed).await;
        let effective = followed.overrides.effective(&self.base);
        tx.send_if_modified(|current| {
            if *current == effective {
                return false;
            }
            for (field, value) in current.changed_fields(&effective) {
                counter!("sluice_overrides_applied_total", "field" => field).increment(1);
                tracing::info!(field, value, "override applied");
            }
            publish_gauges(&self.model, &effective);
            *current = effective.clone();
            true
        });
    }
}

impl Controller {
    /// Empties the in-process cache tier when `sluice cache clear` ran, even if
    /// its notification was missed.
    async fn follow_cache_epoch(&self, followed: &mut Followed) {
        let (OverrideStore::Redis { link, keys }, Some(clear)) = (&self.store, &self.on_cache_clear) else { return };
        let key = keys.cache_epoch();
        let Ok(epoch) = link
            .run(|mut conn| async move { redis::cmd("GET").arg(&key).query_async::<Option<u64>>(&mut conn).await })
            .await
        else {
            return;
        };
        let epoch = epoch.unwrap_or(0);
        if followed.cache_epoch.is_some_and(|seen| seen != epoch) {
            clear();
            tracing::info!(epoch, "cache cleared by an operator");
        }
        followed.cache_epoch = Some(epoch);
    }
}

fn publish_gauges(model: &str, s: &Settings) {
    let model = model.to_string();
    let set = |field: &'static str, value: f64| {
        gauge!("sluice_setting", "model" => model.clone(), "field" => field).set(value)
    };
    set("max_batch_size", s.max_batch_size as f64);
    set("max_batch_tokens", s.max_batch_tokens as f64);
    set("max_wait_ms", s.max_wait_ms as f64);
    set("min_confidence", f64::from(s.min_confidence));
    set("cache_enabled", if s.cache_enabled { 1.0 } else { 0.0 });
    set("cache_ttl_s", s.cache_ttl_s as f64);
    set("intra_op_threads", s.intra_op_threads as f64);
}
