//! Where overrides live: Redis hashes (see [`crate::keys`]), or an in-process
//! map for the embedded default (no Redis configured).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::keys::{KeyLayout, NOTIFY_OVERRIDES};
use crate::link::RedisLink;
use crate::overrides::Refusal;
use crate::{ControlError, Overrides, Settings};

/// Which overrides: every model's, or one model's (which win).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Model(String),
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
        }
    }

    /// Both scopes' raw fields for `model`, in one round trip.
    pub async fn read(&self, model: &str) -> Result<(HashMap<String, String>, HashMap<String, String>), ControlError> {
        let (all, one) = (self.key(&Scope::All), self.key(&Scope::Model(model.to_string())));
        match self {
            Self::Redis { link, .. } => {
                link.run(|mut conn| async move {
                    redis::pipe()
                        .hgetall(&all)
                        .hgetall(&one)
                        .query_async::<(HashMap<String, String>, HashMap<String, String>)>(&mut conn)
                        .await
                })
                .await
            }
            Self::Memory { scopes, .. } => {
                let scopes = scopes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                Ok((scopes.get(&all).cloned().unwrap_or_default(), scopes.get(&one).cloned().unwrap_or_default()))
            }
        }
    }

    /// Checks both scopes' raw fields (as [`OverrideStore::read`] returns them);
    /// a refused field keeps its value from `previous`.
    pub fn parse(
        &self,
        model: &str,
        (all, one): &(HashMap<String, String>, HashMap<String, String>),
        previous: &ScopedOverrides,
        version_exists: &dyn Fn(&str) -> bool,
    ) -> (ScopedOverrides, Vec<Refusal>) {
        let (all, mut refused) = Overrides::parse(&self.key(&Scope::All), all, &previous.all, version_exists);
        let model_key = self.key(&Scope::Model(model.to_string()));
        let (model, refused_model) = Overrides::parse(&model_key, one, &previous.model, version_exists);
        refused.extend(refused_model);
        (ScopedOverrides { all, model }, refused)
    }

    /// Sets one field and notifies the stages.
    pub async fn set(&self, scope: &Scope, field: &str, value: &str) -> Result<(), ControlError> {
        let key = self.key(scope);
        match self {
            Self::Redis { link, keys } => {
                let channel = keys.channel();
                link.run(|mut conn| async move {
                    redis::pipe()
                        .hset(&key, field, value)
                        .publish(&channel, NOTIFY_OVERRIDES)
                        .query_async::<()>(&mut conn)
                        .await
                })
                .await
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
                let (removed, _): (u32, u32) = link
                    .run(|mut conn| async move {
                        redis::pipe().hdel(&key, field).publish(&channel, NOTIFY_OVERRIDES).query_async(&mut conn).await
                    })
                    .await?;
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
