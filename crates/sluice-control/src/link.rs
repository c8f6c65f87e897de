//! A Redis connection that tolerates outages.
//!
//! The first connection is made lazily and retried with backoff, so a stage
//! starts (with its last good, or built-in, settings) while Redis is down. Once
//! down, callers fail fast until the next retry is due instead of each paying a
//! connection timeout. An outage is reported once when it starts and once when
//! it ends (log and metrics), not once per message.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use sluice_core::ConfigError;

use crate::{ControlError, telemetry};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Short on purpose: a restarted Redis must be noticed within the one second
/// in which an override change has to take effect. While Redis is down that
/// is two cheap connection attempts a second per process.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Time budget of a call, unless the caller gives one.
const DEFAULT_BUDGET: Duration = Duration::from_millis(1000);
/// Calls in a row that must run out of their budget before Redis counts as
/// down. One slow answer is not an outage (a healthy Redis answered late on
/// a loaded machine and was reported unreachable); a hung Redis still costs
/// callers only this many budgets before they fail fast.
const TIMEOUTS_FOR_OUTAGE: u32 = 3;

#[derive(Debug)]
struct State {
    conn: Option<ConnectionManager>,
    down: bool,
    next_attempt: Instant,
    backoff: Duration,
    /// Calls in a row that ran out of their budget.
    timeouts: u32,
}

/// A shared, self-healing Redis connection.
pub struct RedisLink {
    client: redis::Client,
    state: Mutex<State>,
    /// Connects one caller at a time.
    connecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for RedisLink {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink").finish_non_exhaustive()
    }
}

impl RedisLink {
    /// Parses the URL (`redis://`, `rediss://`, with AUTH in it if needed);
    /// does not connect yet.
    pub fn new(url: &str) -> Result<Self, ControlError> {
        let client = redis::Client::open(url)
            .map_err(|e| ControlError::Config(ConfigError::new("control.redis_url", e.to_string())))?;
        telemetry::redis_link_created();
        Ok(Self {
            client,
            state: Mutex::new(State {
                conn: None,
                down: false,
                next_attempt: Instant::now(),
                backoff: MIN_BACKOFF,
                timeouts: 0,
            }),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A connection, or an error at once while Redis is known to be down and
    /// the next retry is not due.
    pub async fn conn(&self) -> Result<ConnectionManager, ControlError> {
        {
            let state = self.state();
            if state.down && Instant::now() < state.next_attempt {
                return Err(ControlError::Redis("unreachable (waiting to retry)".into()));
            }
            if let Some(conn) = &state.conn {
                return Ok(conn.clone());
            }
        }
        let _one_at_a_time = self.connecting.lock().await;
        {
            // Another caller may have connected, or failed, while this one waited.
            let state = self.state();
            if let Some(conn) = &state.conn {
                return Ok(conn.clone());
            }
            if state.down && Instant::now() < state.next_attempt {
                return Err(ControlError::Redis("unreachable (waiting to retry)".into()));
            }
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(MAX_BACKOFF);
        match ConnectionManager::new_with_config(self.client.clone(), config).await {
            Ok(conn) => {
                self.state().conn = Some(conn.clone());
                self.succeeded();
                Ok(conn)
            }
            Err(e) => {
                self.failed(&e.to_string());
                Err(e.into())
            }
        }
    }

    /// Opens a dedicated pub/sub connection.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, ControlError> {
        let connect = self.client.get_async_pubsub();
        match tokio::time::timeout(Duration::from_millis(500), connect).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ControlError::Redis("pub/sub connection timed out".into())),
        }
    }

    /// Runs `f` on a connection, recording the outcome for outage reporting.
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, ControlError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.run_within(DEFAULT_BUDGET, f).await
    }

    /// [`RedisLink::run`] with a time budget for the whole call (connecting
    /// included): a hung Redis costs a caller at most `budget`. After
    /// [`TIMEOUTS_FOR_OUTAGE`] calls in a row run out of time it counts as
    /// down, so that the next callers fail fast until a retry is due; fewer
    /// are counted as slow answers, not an outage.
    pub async fn run_within<T, F, Fut>(&self, budget: Duration, f: F) -> Result<T, ControlError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let call = async {
            let conn = self.conn().await?;
            Ok::<_, ControlError>(f(conn).await)
        };
        let answer = match tokio::time::timeout(budget, call).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let timeouts = {
                    let mut state = self.state();
                    state.timeouts += 1;
                    state.timeouts
                };
                if timeouts >= TIMEOUTS_FOR_OUTAGE {
                    self.failed(&format!("{timeouts} calls in a row got no answer within their time budget"));
                } else {
                    telemetry::redis_slow(budget);
                }
                return Err(ControlError::Redis(format!("no answer within {budget:?}")));
            }
        };
        match answer {
            Ok(value) => {
                self.succeeded();
                Ok(value)
            }
            Err(e) => {
                // Server-side errors (wrong type, ...) are not outages.
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
                    self.failed(&e.to_string());
                }
                Err(e.into())
            }
        }
    }

    /// Whether the last attempt reached Redis.
    pub fn is_up(&self) -> bool {
        !self.state().down
    }

    fn succeeded(&self) {
        let mut state = self.state();
        state.timeouts = 0;
        if state.down {
            telemetry::redis_back();
        }
        state.down = false;
        state.backoff = MIN_BACKOFF;
    }

    fn failed(&self, error: &str) {
        let mut state = self.state();
        if !state.down {
            telemetry::redis_down(error);
        }
        state.down = true;
        state.next_attempt = Instant::now() + state.backoff;
        state.backoff = (state.backoff * 2).min(MAX_BACKOFF);
    }
}
