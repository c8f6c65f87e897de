use thiserror::Error;

/// What can go wrong with PostgreSQL.
#[derive(Debug, Error)]
pub enum PostgresError {
    /// A bad `postgres.*` setting: fatal, fix the configuration.
    #[error("configuration key `{key}`: {message}")]
    Config { key: &'static str, message: String },
    /// The database refused or failed a statement.
    #[error("postgres: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// No connection could be had from the pool.
    #[error("postgres connection pool: {0}")]
    Pool(String),
}

impl PostgresError {
    /// Whether trying again may help: connection trouble yes; a statement the
    /// database refuses (syntax, missing table: SQLSTATE class 42) no.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Config { .. } => false,
            Self::Pool(_) => true,
            Self::Db(e) => e.as_db_error().is_none_or(|db| !db.code().code().starts_with("42")),
        }
    }
}

impl From<deadpool_postgres::PoolError> for PostgresError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Pool(e.to_string())
    }
}
