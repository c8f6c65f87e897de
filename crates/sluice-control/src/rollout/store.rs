//! A rollout's state and tally: in Redis, where every replica of every stage
//! reads the same rollout and adds to the same tally, and where a decision is
//! taken once (a compare-and-set on the rollout's JSON); or in process, for
//! the embedded default (no Redis: a rollout is then this process's alone).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::judge::{DIFF_BUCKETS, Gates, Tally};
use crate::ControlError;
use crate::keys::{KeyLayout, NOTIFY_OVERRIDES};
use crate::link::RedisLink;
use crate::store::{OverrideStore, Scope};

/// The override a promotion sets: the candidate becomes the serving version.
pub const VERSION_FIELD: &str = "model_version";

/// One model's rollout of a candidate version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// `{model}-{candidate}-{started_at_ms}`: names its tally and seeds its
    /// canary keys, so that a new rollout starts from nothing.
    pub id: String,
    pub model: String,
    /// The version serving when it started.
    pub serving: String,
    pub candidate: String,
    /// The share of batches the candidate also runs on (shadow).
    pub shadow: f64,
    /// The share of keys the candidate answers (canary).
    pub canary: f64,
    pub gates: Gates,
    /// Canary shares `sluice rollout step` moves through, in order.
    #[serde(default)]
    pub schedule: Vec<f64>,
    /// Steps taken by themselves this often (0: only by `sluice rollout step`).
    #[serde(default)]
    pub step_every_s: u64,
    pub started_at_ms: i64,
    /// When the canary share last changed.
    #[serde(default)]
    pub stepped_at_ms: i64,
    pub phase: Phase,
}

/// Where a rollout stands. A decided phase is final until a person starts a
/// new rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    Running,
    /// Every gate held: the candidate serves (its `model_version` override is set).
    Promoted {
        figures: String,
        at_ms: i64,
    },
    /// A gate was exceeded (or the candidate failed to load): the serving version stays.
    RolledBack {
        gate: String,
        figures: String,
        at_ms: i64,
    },
    /// Stopped by a person (`sluice rollout abort`).
    Aborted {
        by: String,
        at_ms: i64,
    },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Promoted { .. } => "promoted",
            Self::RolledBack { .. } => "rolled_back",
            Self::Aborted { .. } => "aborted",
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A share given as `20%` or `0.2`, within 0 and 1.
pub fn parse_share(key: &str, text: &str) -> Result<f64, String> {
    let text = text.trim();
    let share = match text.strip_suffix('%') {
        Some(percent) => percent.trim().parse::<f64>().map(|p| p / 100.0),
        None => text.parse::<f64>(),
    }
    .map_err(|_| format!("{key}: {text:?} is not a share (20% or 0.2)"))?;
    if share.is_finite() && (0.0..=1.0).contains(&share) {
        Ok(share)
    } else {
        Err(format!("{key}: {text:?} is outside 0%..100%"))
    }
}

impl Rollout {
    /// A rollout of `candidate` beside `serving`, checked: refused with the
    /// name of the key at fault.
    #[allow(clippy::too_many_arguments, reason = "each is one flag of `sluice rollout start`")]
    pub fn new(
        model: &str,
        serving: &str,
        candidate: &str,
        shadow: f64,
        canary: f64,
        gates: Gates,
        schedule: Vec<f64>,
        step_every_s: u64,
    ) -> Result<Self, String> {
        if candidate == serving {
            return Err(format!("candidate: version {candidate} is already serving"));
        }
        gates.check()?;
        let share = |key: &str, x: f64| {
            if x.is_finite() && (0.0..=1.0).contains(&x) { Ok(()) } else { Err(format!("{key}: {x} is outside 0..=1")) }
        };
        share("shadow", shadow)?;
        share("canary", canary)?;
        for step in &schedule {
            share("schedule", *step)?;
        }
        if schedule.windows(2).any(|w| w[1] < w[0]) || schedule.first().is_some_and(|s| *s < canary) {
            return Err("schedule: canary shares must rise from --canary on".into());
        }
        if step_every_s > 0 && schedule.is_empty() {
            return Err("step_every_s: steps by themselves need a --schedule".into());
        }
        if shadow == 0.0 && canary == 0.0 && schedule.is_empty() {
            return Err("shadow: with no shadow and no canary share the candidate would never be compared".into());
        }
        let at = now_ms();
        Ok(Self {
            id: format!("{model}-{candidate}-{at}"),
            model: model.to_string(),
            serving: serving.to_string(),
            candidate: candidate.to_string(),
            shadow,
            canary,
            gates,
            schedule,
            step_every_s,
            started_at_ms: at,
            stepped_at_ms: at,
            phase: Phase::Running,
        })
    }

    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    /// The next canary share of the schedule, if any is left.
    pub fn next_step(&self) -> Option<f64> {
        self.schedule.iter().copied().find(|s| *s > self.canary)
    }

    /// This rollout with the canary share moved to `share`.
    pub fn stepped(&self, share: f64) -> Self {
        Self { canary: share, stepped_at_ms: now_ms(), ..self.clone() }
    }

    /// Whether a step by itself is due at `now_ms`.
    pub fn step_due(&self, now_ms: i64) -> bool {
        self.is_running()
            && self.step_every_s > 0
            && self.next_step().is_some()
            && now_ms - self.stepped_at_ms >= (self.step_every_s as i64).saturating_mul(1000)
    }

    /// This rollout, decided.
    pub fn decided(&self, phase: Phase) -> Self {
        Self { phase, ..self.clone() }
    }
}

/// A rollout as stored: its JSON (what a compare-and-set compares) and what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub raw: String,
    pub rollout: Rollout,
}

/// In-process rollouts and tallies (no Redis).
#[derive(Debug, Default)]
pub struct Local {
    rollouts: HashMap<String, String>,
    tallies: HashMap<String, Tally>,
}

/// Replaces the rollout if it is still what the caller read (and, on a
/// promotion, sets the model's `model_version` override and notifies the
/// stages in the same step): KEYS = rollout, model overrides; ARGV =
/// expected JSON ('' for none), new JSON, version to serve ('' for none),
/// channel, field.
const REPLACE: &str = r"
local current = redis.call('GET', KEYS[1])
if (current == false and ARGV[1] == '') or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  if ARGV[3] ~= '' then
    redis.call('HSET', KEYS[2], ARGV[5], ARGV[3])
    redis.call('PUBLISH', ARGV[4], 'overrides')
  end
  return 1
end
return 0
";

/// Where rollouts live.
#[derive(Debug, Clone)]
pub enum RolloutStore {
    Redis {
        link: Arc<RedisLink>,
        keys: KeyLayout,
    },
    /// This process's alone; a promotion sets the override in `overrides`.
    Memory {
        local: Arc<Mutex<Local>>,
        overrides: OverrideStore,
    },
}

impl RolloutStore {
    /// The rollouts beside an override store: in Redis where it is, in this
    /// process where it is.
    pub fn beside(overrides: &OverrideStore) -> Self {
        match overrides {
            OverrideStore::Redis { link, keys } => Self::Redis { link: link.clone(), keys: keys.clone() },
            OverrideStore::Memory { .. } => Self::Memory { local: Arc::default(), overrides: overrides.clone() },
        }
    }

    /// Whether every replica shares it.
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Redis { .. })
    }

    /// The key a model's rollout is kept in (in Redis).
    pub fn key(&self, model: &str) -> String {
        match self {
            Self::Redis { keys, .. } => keys.rollout(model),
            Self::Memory { overrides, .. } => overrides.keys().rollout(model),
        }
    }

    /// The model's rollout, running or decided; `None` if it never had one.
    pub async fn get(&self, model: &str) -> Result<Option<Stored>, ControlError> {
        let key = self.key(model);
        let raw: Option<String> = match self {
            Self::Redis { link, .. } => {
                let name = key.clone();
                link.run(|mut conn| async move { redis::cmd("GET").arg(&name).query_async(&mut conn).await }).await?
            }
            Self::Memory { local, .. } => lock(local).rollouts.get(&key).cloned(),
        };
        raw.map(|raw| match serde_json::from_str(&raw) {
            Ok(rollout) => Ok(Stored { raw, rollout }),
            Err(e) => Err(ControlError::Rollout(format!(
                "key {key} does not hold a rollout ({e}); start a new one with `sluice rollout start`"
            ))),
        })
        .transpose()
    }

    /// Replaces `expected` (what was read; `None`: no rollout) with `new`;
    /// returns false, changing nothing, if another replica or a person
    /// changed it first. A promotion sets the model's `model_version`
    /// override to the candidate in the same step.
    pub async fn replace(&self, expected: Option<&Stored>, new: &Rollout) -> Result<bool, ControlError> {
        let key = self.key(&new.model);
        let json = serde_json::to_string(new).map_err(|e| ControlError::Rollout(e.to_string()))?;
        let promote = matches!(new.phase, Phase::Promoted { .. }).then(|| new.candidate.clone());
        let expected = expected.map_or_else(String::new, |s| s.raw.clone());
        match self {
            Self::Redis { link, keys } => {
                let (overrides, channel) = (keys.model_overrides(&new.model), keys.channel());
                let replaced: i64 = link
                    .run(|mut conn| async move {
                        redis::cmd("EVAL")
                            .arg(REPLACE)
                            .arg(2)
                            .arg(&key)
                            .arg(&overrides)
                            .arg(&expected)
                            .arg(&json)
                            .arg(promote.unwrap_or_default())
                            .arg(&channel)
                            .arg(VERSION_FIELD)
                            .query_async(&mut conn)
                            .await
                    })
                    .await?;
                debug_assert_eq!(NOTIFY_OVERRIDES, "overrides", "the script publishes this");
                Ok(replaced == 1)
            }
            Self::Memory { local, overrides } => {
                {
                    let mut local = lock(local);
                    let current = local.rollouts.get(&key).cloned().unwrap_or_default();
                    if current != expected {
                        return Ok(false);
                    }
                    local.rollouts.insert(key, json);
                }
                if let Some(version) = promote {
                    overrides.set(&Scope::Model(new.model.clone()), VERSION_FIELD, &version).await?;
                }
                Ok(true)
            }
        }
    }

    /// Adds `delta` to rollout `id`'s tally and returns the sum over every replica.
    pub async fn add(&self, model: &str, id: &str, delta: &Tally) -> Result<Tally, ControlError> {
        match self {
            Self::Redis { link, keys } => {
                let key = keys.rollout_tally(model, id);
                let fields = to_fields(delta);
                let (sum,): (HashMap<String, i64>,) = link
                    .run(|mut conn| async move {
                        let mut pipe = redis::pipe();
                        for (field, n) in fields.iter().filter(|(_, n)| *n != 0) {
                            pipe.hincr(&key, field, *n).ignore();
                        }
                        // A decided rollout's tally is kept a week for `sluice rollout status`.
                        pipe.expire(&key, 7 * 24 * 3600).ignore();
                        pipe.hgetall(&key).query_async(&mut conn).await
                    })
                    .await?;
                Ok(from_fields(&sum))
            }
            Self::Memory { local, overrides } => {
                let key = overrides.keys().rollout_tally(model, id);
                let mut local = lock(local);
                let sum = local.tallies.entry(key).or_default();
                sum.merge(delta);
                Ok(sum.clone())
            }
        }
    }

    /// Rollout `id`'s tally so far.
    pub async fn tally(&self, model: &str, id: &str) -> Result<Tally, ControlError> {
        self.add(model, id, &Tally::default()).await
    }
}

fn lock(local: &Mutex<Local>) -> std::sync::MutexGuard<'_, Local> {
    local.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A tally as the hash's fields (times in whole microseconds, so that
/// replicas add them with HINCRBY).
fn to_fields(t: &Tally) -> Vec<(String, i64)> {
    let n = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
    let mut fields = vec![
        ("compared".to_string(), n(t.compared)),
        ("errors".into(), n(t.errors)),
        ("queries".into(), n(t.queries)),
        ("agreed".into(), n(t.agreed)),
        ("candidate_us".into(), (t.candidate_seconds * 1e6).round() as i64),
        ("serving_us".into(), (t.serving_seconds * 1e6).round() as i64),
    ];
    fields.extend(t.return_diff.iter().enumerate().map(|(i, c)| (format!("d{i}"), n(*c))));
    fields
}

fn from_fields(fields: &HashMap<String, i64>) -> Tally {
    let get = |name: &str| fields.get(name).copied().unwrap_or(0).max(0) as u64;
    Tally {
        compared: get("compared"),
        errors: get("errors"),
        queries: get("queries"),
        agreed: get("agreed"),
        candidate_seconds: get("candidate_us") as f64 / 1e6,
        serving_seconds: get("serving_us") as f64 / 1e6,
        return_diff: (0..DIFF_BUCKETS).map(|i| get(&format!("d{i}"))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout() -> Rollout {
        Rollout::new("m", "1", "2", 0.2, 0.05, Gates::default(), vec![0.25, 1.0], 0).expect("valid")
    }

    #[test]
    fn shares_and_schedules_are_checked_by_name() {
        assert_eq!(parse_share("shadow", "20%"), Ok(0.2));
        assert_eq!(parse_share("shadow", "0.05"), Ok(0.05));
        assert!(parse_share("canary", "120%").expect_err("refused").starts_with("canary"));
        assert!(parse_share("canary", "lots").expect_err("refused").starts_with("canary"));
        let new = |candidate: &str, schedule: Vec<f64>, every: u64| {
            Rollout::new("m", "1", candidate, 0.2, 0.05, Gates::default(), schedule, every)
        };
        assert!(new("1", vec![], 0).expect_err("refused").starts_with("candidate"));
        assert!(new("2", vec![0.5, 0.25], 0).expect_err("refused").starts_with("schedule"));
        assert!(new("2", vec![], 60).expect_err("refused").starts_with("step_every_s"));
        let r = rollout();
        assert!(r.id.starts_with("m-2-") && r.is_running());
        assert_eq!(r.next_step(), Some(0.25));
        assert_eq!(r.stepped(0.25).next_step(), Some(1.0));
        assert_eq!(r.stepped(1.0).next_step(), None);
        assert!(!r.step_due(now_ms() + 3_600_000), "no steps by themselves without step_every_s");
    }

    #[test]
    fn a_tally_survives_its_hash_fields() {
        let mut t = Tally::default();
        t.stock(0.1, 0.1001);
        t.query(true);
        t.error();
        t.timed(0.25, 0.5);
        let fields: HashMap<String, i64> = to_fields(&t).into_iter().collect();
        assert_eq!(from_fields(&fields), t);
    }

    #[tokio::test]
    async fn in_process_a_decision_is_taken_once_and_a_promotion_sets_the_version() {
        let overrides = OverrideStore::memory(KeyLayout::new("sluice", "test"));
        let store = RolloutStore::beside(&overrides);
        assert!(!store.is_shared());
        assert_eq!(store.get("m").await.expect("read"), None);
        let r = rollout();
        assert!(store.replace(None, &r).await.expect("start"));
        assert!(!store.replace(None, &r).await.expect("second start"), "already started");
        let read = store.get("m").await.expect("read").expect("there");
        assert_eq!(read.rollout, r);
        let promoted = r.decided(Phase::Promoted { figures: "ok".into(), at_ms: 1 });
        assert!(store.replace(Some(&read), &promoted).await.expect("decide"));
        assert!(
            !store.replace(Some(&read), &r.decided(Phase::Aborted { by: "x".into(), at_ms: 2 })).await.expect("late")
        );
        let raw = overrides.read(Scope::Model("m".into())).await.expect("overrides");
        assert_eq!(raw.model, Ok(vec![(b"model_version".to_vec(), b"2".to_vec())]));
        let mut t = Tally::default();
        t.error();
        store.add("m", &r.id, &t).await.expect("add");
        assert_eq!(store.add("m", &r.id, &t).await.expect("add").errors, 2);
        assert_eq!(store.tally("m", "another").await.expect("read"), Tally::default());
    }
}
