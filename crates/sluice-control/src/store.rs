//! Where overrides live: Redis hashes (see [`crate::keys`]), or an in-process
//! map for the embedded default (no Redis configured).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::keys::{KeyLayout, NOTIFY_OVERRIDES};
use crate::link::RedisLink;
use crate::overrides::{Follower, Refusal};
use crate::{ControlError, Overrides, Settings};

/// Which overrides: every model's and the writer's, one model's, or the
/// writer's (which win over the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Model(String),
    Writer,
}

impl Scope {
    /// The settings read in this scope (`None`: any).
    fn follower(&self) -> Option<Follower> {
        match self {
            Self::All => None,
            Self::Model(_) => Some(Follower::Models),
            Self::Writer => Some(Follower::Writer),
        }
    }

    /// Its name in metrics and logs: the model's, or `writer`.
    pub fn label(&self) -> &str {
        match self {
            Self::All => "all",
            Self::Model(name) => name,
            Self::Writer => "writer",
        }
    }
}

/// A model's scope, by the model's name.
impl From<&str> for Scope {
    fn from(model: &str) -> Self {
        Self::Model(model.to_string())
    }
}

/// One scope's hash as Redis holds it: its fields and values as bytes (they
/// may be anything a client wrote), or why the key cannot be read as a hash
/// (it holds a string, a list, ...).
pub type RawHash = Result<Vec<(Vec<u8>, Vec<u8>)>, String>;

/// Both scopes' hashes, as read: the shared one, and the model's (or the writer's).
#[derive(Debug, Clone, PartialEq)]
pub struct RawScopes {
    pub all: RawHash,
    pub model: RawHash,
}

/// The overrides of both scopes for one model, checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScopedOverrides {
    pub all: Overrides,
    pub model: Overrides,
}

impl ScopedOverrides {
    /// The settings in force: `base` with every model's overrides, then this model's, on top.
    pub fn effective(&self, base: &Settings) -> Settings {
        base.with(&self.all.then(&self.model))
    }
}

/// An override store.
#[derive(Debug, Clone)]
pub enum OverrideStore {
    Redis {
        link: Arc<RedisLink>,
        keys: KeyLayout,
    },
    Memory {
        scopes: Arc<Mutex<HashMap<String, HashMap<String, String>>>>,
        keys: KeyLayout,
        changed: Arc<tokio::sync::Notify>,
    },
}

impl OverrideStore {
    /// An in-process store (the embedded default).
    pub fn memory(keys: KeyLayout) -> Self {
        Self::Memory { scopes: Arc::default(), keys, changed: Arc::default() }
    }

    pub fn keys(&self) -> &KeyLayout {
        match self {
            Self::Redis { keys, .. } | Self::Memory { keys, .. } => keys,
        }
    }

    /// The hash a scope is kept in.
    pub fn key(&self, scope: &Scope) -> String {
        match scope {
            Scope::All => self.keys().overrides(),
            Scope::Model(model) => self.keys().model_overrides(model),
            Scope::Writer => self.keys().writer_overrides(),
        }
    }

    /// Both scopes' raw fields for `model`, in one round trip. A key that is
    /// not a hash fails only its own scope (see [`RawHash`]); only Redis being
    /// unreachable fails the read.
    pub async fn read(&self, scope: impl Into<Scope>) -> Result<RawScopes, ControlError> {
        let (all, one) = (self.key(&Scope::All), self.key(&scope.into()));
        match self {
            Self::Redis { link, .. } => {
                let mut replies = link
                    .run(|mut conn| async move {
                        redis::pipe()
                            .hgetall(&all)
                            .hgetall(&one)
                            .ignore_errors()
                            .query_async::<Vec<redis::RedisResult<Vec<(Vec<u8>, Vec<u8>)>>>>(&mut conn)
                            .await
                    })
                    .await?
                    .into_iter()
                    .map(|reply| reply.map_err(|e| e.to_string()));
                let mut next = || replies.next().unwrap_or_else(|| Err("no reply".into()));
                Ok(RawScopes { all: next(), model: next() })
            }
            Self::Memory { scopes, .. } => {
                let scopes = scopes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let raw = |key: &str| {
                    Ok(scopes
                        .get(key)
                        .map(|fields| {
                            fields.iter().map(|(f, v)| (f.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
                        })
                        .unwrap_or_default())
                };
                Ok(RawScopes { all: raw(&all), model: raw(&one) })
            }
        }
    }

    /// Checks both scopes' raw fields (as [`OverrideStore::read`] returns them);
    /// a refused field keeps its value from `previous`, and a key that is not
    /// a hash keeps all of its scope's.
    pub fn parse(
        &self,
        scope: impl Into<Scope>,
        raw: &RawScopes,
        previous: &ScopedOverrides,
        version_exists: &dyn Fn(&str) -> bool,
    ) -> (ScopedOverrides, Vec<Refusal>) {
        let scope = scope.into();
        let (all, mut refused) =
            Overrides::parse(&self.key(&Scope::All), &raw.all, &previous.all, None, version_exists);
        let (model, refused_model) =
            Overrides::parse(&self.key(&scope), &raw.model, &previous.model, scope.follower(), version_exists);
        refused.extend(refused_model);
        (ScopedOverrides { all, model }, refused)
    }

    /// Sets one field and notifies the stages.
    pub async fn set(&self, scope: &Scope, field: &str, value: &str) -> Result<(), ControlError> {
        let key = self.key(scope);
        match self {
            Self::Redis { link, keys } => {
                let channel = keys.channel();
                let name = key.clone();
                link.run(|mut conn| async move {
                    redis::pipe()
                        .hset(&name, field, value)
                        .publish(&channel, NOTIFY_OVERRIDES)
                        .query_async::<()>(&mut conn)
                        .await
                })
                .await
                .map_err(|e| wrong_type(&key, e))
            }
            Self::Memory { scopes, changed, .. } => {
                scopes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(key)
                    .or_default()
                    .insert(field.into(), value.into());
                changed.notify_waiters();
                Ok(())
            }
        }
    }

    /// Removes one field; returns whether it was set.
    pub async fn unset(&self, scope: &Scope, field: &str) -> Result<bool, ControlError> {
        let key = self.key(scope);
        match self {
            Self::Redis { link, keys } => {
                let channel = keys.channel();
                let name = key.clone();
                let (removed, _): (u32, u32) = link
                    .run(|mut conn| async move {
                        redis::pipe()
                            .hdel(&name, field)
                            .publish(&channel, NOTIFY_OVERRIDES)
                            .query_async(&mut conn)
                            .await
                    })
                    .await
                    .map_err(|e| wrong_type(&key, e))?;
                Ok(removed > 0)
            }
            Self::Memory { scopes, changed, .. } => {
                let removed = scopes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_mut(&key)
                    .and_then(|s| s.remove(field))
                    .is_some();
                changed.notify_waiters();
                Ok(removed)
            }
        }
    }
}

/// Names the key when Redis refuses a hash command on it because it holds
/// another type, and says how to recover.
fn wrong_type(key: &str, e: ControlError) -> ControlError {
    match e {
        ControlError::Redis(message) if message.contains("WRONGTYPE") => ControlError::Redis(format!(
            "key {key} is not a hash ({message}); delete it (`redis-cli DEL {key}`) and set the overrides again"
        )),
        other => other,
    }
}
