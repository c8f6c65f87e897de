use std::path::PathBuf;

use std::future::Future;
use std::pin::Pin;

use deadpool_postgres::{Connect, Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, NoTls, Socket};

use sluice_core::{ConfigError, Secret};

use crate::PostgresError;
use crate::error::describe;

/// How to reach PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// libpq-style (`host=... user=... dbname=...`) or URL (`postgres://...`).
    /// May hold a password: a [`Secret`], never printed.
    pub dsn: Secret,
    /// Connections per process (one pool per process, shared by its stages).
    pub pool_size: usize,
    /// Server-side limit on each statement.
    pub statement_timeout_ms: u64,
    /// The schema Sluice's tables live in (tests use one of their own).
    pub schema: String,
    /// A PEM file of trusted certificates: connect over TLS and verify the
    /// server's certificate and host name against it. Without it, TLS is used
    /// only when the DSN says `sslmode=require`, and then unverified.
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            dsn: Secret::default(),
            pool_size: 4,
            statement_timeout_ms: 5000,
            schema: "public".into(),
            tls_ca_file: None,
        }
    }
}

impl PostgresConfig {
    /// Checks what serde cannot; errors name the key (never the DSN's value).
    pub fn validate(&self) -> Result<(), PostgresError> {
        if self.dsn.is_empty() {
            return Err(PostgresError::Config(ConfigError::new("postgres.dsn", "empty")));
        }
        if !(1..=256).contains(&self.pool_size) {
            return Err(PostgresError::Config(ConfigError::new("postgres.pool_size", "outside 1..=256")));
        }
        let schema_ok = !self.schema.is_empty()
            && self.schema.len() <= 63
            && !self.schema.starts_with("pg_")
            && self.schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !schema_ok {
            return Err(PostgresError::Config(ConfigError::new(
                "postgres.schema",
                "must be 1 to 63 of a-z 0-9 _, not starting with pg_",
            )));
        }
        Ok(())
    }

    /// The connection pool: every connection uses `schema` and the statement timeout.
    pub fn pool(&self) -> Result<Pool, PostgresError> {
        self.validate()?;
        let mut pg: tokio_postgres::Config =
            self.dsn.expose().parse().map_err(|_| {
                PostgresError::Config(ConfigError::new("postgres.dsn", "not a valid connection string"))
            })?;
        pg.options(format!("-c search_path={} -c statement_timeout={}", self.schema, self.statement_timeout_ms));
        let config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = if self.tls_ca_file.is_some() || pg.get_ssl_mode() == SslMode::Require {
            if self.tls_ca_file.is_some() {
                pg.ssl_mode(SslMode::Require);
            }
            Manager::from_connect(pg, Connector(crate::tls::connector(self.tls_ca_file.as_deref())?), config)
        } else {
            Manager::from_connect(pg, Connector(NoTls), config)
        };
        Pool::builder(manager)
            .max_size(self.pool_size)
            .build()
            .map_err(|e| PostgresError::Config(ConfigError::new("postgres.pool_size", e.to_string())))
    }
}

/// Connects as deadpool's own connector does, but logs a connection that ends
/// in error with its SQLSTATE and message (deadpool logs only "db error", so a
/// terminated backend, a shutdown and a network cut looked the same).
struct Connector<T>(T);

impl<T> Connect for Connector<T>
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> Pin<Box<dyn Future<Output = Result<(Client, JoinHandle<()>), tokio_postgres::Error>> + Send + '_>> {
        let tls = self.0.clone();
        let pg_config = pg_config.clone();
        Box::pin(async move {
            let (client, connection) = pg_config.connect(tls).await?;
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(
                        error = describe(&e),
                        "postgres connection closed on an error; the pool opens another"
                    );
                }
            });
            Ok((client, task))
        })
    }
}
