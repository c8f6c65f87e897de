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
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::keys::NOTIFY_CACHE_CLEAR;
use crate::overrides::{self, Follower, Refusal};
use crate::store::{OverrideStore, Scope, ScopedOverrides};
use crate::{Settings, telemetry};

/// Says whether a model version can be served.
pub type VersionCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;
/// Called when an operator clears the cache (`sluice cache clear`).
pub type OnCacheClear = Arc<dyn Fn() + Send + Sync>;

/// The override follower of one process.
pub struct Controller {
    store: OverrideStore,
    scope: Scope,
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
        f.debug_struct("Controller").field("scope", &self.scope).field("base", &self.base).finish_non_exhaustive()
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
    /// `base` holds the built-in and configured values; the shared overrides
    /// and then `scope`'s (a model's, by its name, or the writer's) apply on top.
    pub fn new(
        store: OverrideStore,
        scope: impl Into<Scope>,
        base: Settings,
        version_exists: VersionCheck,
        reconcile: Duration,
    ) -> Self {
        Self {
            store,
            scope: scope.into(),
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
        publish_gauges(&self.scope, &self.base);
        // At 0 from the start, so that alerts on increase() see the first refusal.
        telemetry::refusals_at_zero(overrides::names().chain(["unknown", "*"]));
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
                        telemetry::cache_cleared(None);
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
        let Ok(raw) = self.store.read(self.scope.clone()).await else { return };
        let (overrides, refused) =
            self.store.parse(self.scope.clone(), &raw, &followed.overrides, &*self.version_exists);
        let refused: BTreeSet<Refusal> = refused.into_iter().collect();
        let all_scope = self.store.key(&Scope::All);
        for r in refused.difference(&followed.reported) {
            if !self.reports_all_scope && r.key == all_scope {
                continue;
            }
            let known = overrides::field(&r.field).is_some() || r.field == "*";
            telemetry::override_refused(r, if known { &r.field } else { "unknown" });
        }
        *followed = Followed { overrides, reported: refused, cache_epoch: followed.cache_epoch };
        self.follow_cache_epoch(followed).await;
        let effective = followed.overrides.effective(&self.base);
        tx.send_if_modified(|current| {
            if *current == effective {
                return false;
            }
            for (field, value) in current.changed_fields(&effective) {
                telemetry::override_applied(field, &value);
            }
            publish_gauges(&self.scope, &effective);
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
            telemetry::cache_cleared(Some(epoch));
        }
        followed.cache_epoch = Some(epoch);
    }
}

/// The settings in force as gauges, for the fields `scope` follows.
fn publish_gauges(scope: &Scope, settings: &Settings) {
    let label = scope.label();
    for (field, value) in settings.gauges() {
        let followed = overrides::field(field).is_some_and(|f| match scope {
            Scope::Writer => f.follower == Follower::Writer,
            _ => f.follower == Follower::Models,
        });
        if followed {
            telemetry::setting(label, field, value);
        }
    }
}
