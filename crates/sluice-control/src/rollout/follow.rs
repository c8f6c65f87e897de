//! What a model stage runs to take part in its model's rollout: a task that
//! reads the rollout a few times a second (a replica that starts or restarts
//! mid-rollout joins it on its first read), adds what this replica compared
//! since to the shared tally, judges the sum, and takes the decision by
//! compare-and-set, so that of all the replicas that judge the same sum one
//! decides, and logs and counts it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::judge::{Tally, Verdict, judge};
use super::store::{Phase, Rollout, RolloutStore, now_ms};
use crate::{ControlError, telemetry};

/// How often a follower reads the rollout and adds its tally.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(300);

/// What this replica compared since it last added to the shared tally.
#[derive(Debug, Default)]
struct Pending {
    /// The rollout it is for (a tally of another one is dropped).
    id: String,
    tally: Tally,
    /// Why the candidate cannot run here (it failed to load, its model
    /// thread died): rolls the rollout back.
    failed: Option<String>,
}

/// A model stage's end of its rollout: the rollout in force and where its
/// comparisons go.
#[derive(Debug, Clone)]
pub struct RolloutLink {
    state: watch::Receiver<Option<Arc<Rollout>>>,
    pending: Arc<Mutex<Pending>>,
    /// Decisions and steps this follower took (won the compare-and-set for).
    taken: Arc<AtomicU64>,
}

impl RolloutLink {
    /// A link that never has a rollout (benchmarks, stages without a control plane).
    pub fn none() -> Self {
        Self { state: watch::channel(None).1, pending: Arc::default(), taken: Arc::default() }
    }

    /// How many decisions (promotions, rollbacks) this follower took itself.
    pub fn decisions_taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// The model's rollout, running or decided, as last read.
    pub fn current(&self) -> Option<Arc<Rollout>> {
        self.state.borrow().clone()
    }

    /// The rollout now running, if one is.
    pub fn running(&self) -> Option<Arc<Rollout>> {
        self.current().filter(|r| r.is_running())
    }

    fn pending(&self, id: &str) -> std::sync::MutexGuard<'_, Pending> {
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.id != id {
            *pending = Pending { id: id.to_string(), ..Pending::default() };
        }
        pending
    }

    /// Counts comparisons for rollout `id`.
    pub fn record(&self, id: &str, count: impl FnOnce(&mut Tally)) {
        count(&mut self.pending(id).tally);
    }

    /// The candidate of rollout `id` cannot run: it is rolled back.
    pub fn fail(&self, id: &str, reason: &str) {
        self.pending(id).failed.get_or_insert_with(|| reason.to_string());
    }

    /// Takes what was recorded for `id`.
    fn take(&self, id: &str) -> (Tally, Option<String>) {
        let mut pending = self.pending(id);
        (std::mem::take(&mut pending.tally), pending.failed.take())
    }

    /// Gives back what could not be added (Redis was unreachable).
    fn give_back(&self, id: &str, tally: &Tally, failed: Option<String>) {
        let mut pending = self.pending(id);
        pending.tally.merge(tally);
        if pending.failed.is_none() {
            pending.failed = failed;
        }
    }
}

/// Follows `model`'s rollout in `store` until `shutdown`, reading it once
/// before it returns (a stage starts in the rollout).
pub async fn follow(store: RolloutStore, model: &str, shutdown: CancellationToken) -> RolloutLink {
    let (tx, rx) = watch::channel(None);
    let link = RolloutLink { state: rx, pending: Arc::default(), taken: Arc::default() };
    telemetry::rollout_decisions_at_zero(model);
    let follower = Follower { store, model: model.to_string(), tx, link: link.clone() };
    if let Err(e) = follower.tick().await {
        tracing::debug!(model, error = %e, "rollout not read yet");
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(FOLLOW_EVERY) => {}
            }
            if let Err(e) = follower.tick().await {
                tracing::debug!(model = follower.model, error = %e, "rollout not followed this time");
            }
        }
    });
    link
}

struct Follower {
    store: RolloutStore,
    model: String,
    tx: watch::Sender<Option<Arc<Rollout>>>,
    link: RolloutLink,
}

impl Follower {
    fn publish(&self, rollout: Option<&Rollout>) {
        self.tx.send_if_modified(|current| {
            if current.as_deref() == rollout {
                return false;
            }
            if let Some(r) = rollout
                && current.as_ref().is_none_or(|c| c.id != r.id || c.phase != r.phase)
            {
                telemetry::rollout_seen(r);
            }
            *current = rollout.map(|r| Arc::new(r.clone()));
            true
        });
        telemetry::rollout_shares(&self.model, rollout.filter(|r| r.is_running()));
    }

    /// Reads the rollout, adds this replica's tally, and decides if the sum says so.
    async fn tick(&self) -> Result<(), ControlError> {
        let Some(stored) = self.store.get(&self.model).await? else {
            self.publish(None);
            return Ok(());
        };
        let rollout = &stored.rollout;
        self.publish(Some(rollout));
        if !rollout.is_running() {
            return Ok(());
        }
        let (delta, failed) = self.link.take(&rollout.id);
        let sum = match self.store.add(&self.model, &rollout.id, &delta).await {
            Ok(sum) => sum,
            Err(e) => {
                self.link.give_back(&rollout.id, &delta, failed);
                return Err(e);
            }
        };
        telemetry::rollout_tally(&self.model, &sum);
        let at_ms = now_ms();
        let verdict = match failed {
            Some(reason) => Verdict::RollBack { gate: "candidate_failed".into(), figures: reason },
            None => judge(&rollout.gates, &sum),
        };
        let next = match verdict {
            Verdict::Continue { .. } => match rollout.next_step().filter(|_| rollout.step_due(at_ms)) {
                Some(share) => rollout.stepped(share),
                None => return Ok(()),
            },
            Verdict::Promote { figures } => rollout.decided(Phase::Promoted { figures, at_ms }),
            Verdict::RollBack { gate, figures } => rollout.decided(Phase::RolledBack { gate, figures, at_ms }),
        };
        if self.store.replace(Some(&stored), &next).await? {
            if next.is_running() {
                telemetry::rollout_stepped(&next);
            } else {
                self.link.taken.fetch_add(1, Ordering::Relaxed);
                telemetry::rollout_decided(&next);
            }
            self.publish(Some(&next));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyLayout;
    use crate::rollout::Gates;
    use crate::store::{OverrideStore, Scope};

    #[tokio::test]
    async fn followers_of_one_rollout_add_up_and_one_decides() {
        let overrides = OverrideStore::memory(KeyLayout::new("sluice", "test"));
        let store = RolloutStore::beside(&overrides);
        let gates = Gates { min_compared: 100, ..Gates::default() };
        let r = Rollout::new("m", "1", "2", 0.5, 0.0, gates, vec![], 0).expect("valid");
        assert!(store.replace(None, &r).await.expect("start"));
        let shutdown = CancellationToken::new();
        let (a, b) =
            (follow(store.clone(), "m", shutdown.clone()).await, follow(store.clone(), "m", shutdown.clone()).await);
        assert_eq!(a.running().map(|r| r.id.clone()), Some(r.id.clone()), "joined on its first read");
        // Each replica compares 60 equal answers: neither alone has enough, the sum has.
        for link in [&a, &b] {
            link.record(&r.id, |t| (0..60).for_each(|_| t.stock(0.1, 0.1)));
        }
        let decided = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(current) = store.get("m").await.expect("read").filter(|s| !s.rollout.is_running()) {
                    return current.rollout;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("decided within 5 s");
        assert!(matches!(decided.phase, Phase::Promoted { .. }), "{decided:?}");
        assert_eq!(store.tally("m", &r.id).await.expect("tally").compared, 120, "both tallies, each once");
        assert_eq!(a.decisions_taken() + b.decisions_taken(), 1, "decided once");
        let raw = overrides.read(Scope::Model("m".into())).await.expect("overrides");
        assert_eq!(raw.model, Ok(vec![(b"model_version".to_vec(), b"2".to_vec())]));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_schedule_steps_the_canary_share_by_itself_once_per_period() {
        let store = RolloutStore::beside(&OverrideStore::memory(KeyLayout::new("sluice", "test")));
        let r = Rollout::new("m", "1", "2", 0.2, 0.0, Gates::default(), vec![0.25, 0.5], 1).expect("valid");
        assert!(store.replace(None, &r).await.expect("start"));
        let shutdown = CancellationToken::new();
        let link = follow(store.clone(), "m", shutdown.clone()).await;
        assert_eq!(link.running().map(|r| r.canary), Some(0.0));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(link.running().map(|r| r.canary), Some(0.25), "one step after a second");
        tokio::time::sleep(Duration::from_millis(1700)).await;
        assert_eq!(link.running().map(|r| r.canary), Some(0.5), "the next a second later");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(link.running().map(|r| r.canary), Some(0.5), "no step left");
        assert_eq!(link.decisions_taken(), 0, "a step is not a decision");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_candidate_that_cannot_run_is_rolled_back() {
        let store = RolloutStore::beside(&OverrideStore::memory(KeyLayout::new("sluice", "test")));
        let r = Rollout::new("m", "1", "2", 0.5, 0.0, Gates::default(), vec![], 0).expect("valid");
        assert!(store.replace(None, &r).await.expect("start"));
        let shutdown = CancellationToken::new();
        let link = follow(store.clone(), "m", shutdown.clone()).await;
        link.fail(&r.id, "failed to load: no such file");
        link.fail(&r.id, "a later reason is not kept");
        tokio::time::sleep(FOLLOW_EVERY * 3).await;
        let now = link.current().expect("still there");
        assert!(
            matches!(&now.phase, Phase::RolledBack { gate, figures, .. } if gate == "candidate_failed" && figures.contains("no such file")),
            "{now:?}"
        );
        shutdown.cancel();
    }
}
