use std::fmt::Write as _;

use sluice_core::ConfigError;
use thiserror::Error;

/// What can go wrong with PostgreSQL. Its message always says what happened:
/// the SQLSTATE and the server's message when the server answered, else the
/// client's own cause (refused, closed, timed out), never only "db error".
#[derive(Debug, Error)]
pub enum PostgresError {
    /// A bad `postgres.*` setting: fatal, fix the configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database refused or failed a statement, or the connection failed.
    #[error("postgres: {}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    /// No connection could be had from the pool.
    #[error("postgres connection pool: {0}")]
    Pool(String),
}

/// What trying again can do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Connection trouble, a timeout, a lock, a read-only or shutting-down
    /// database: the same statement may succeed later.
    Later,
    /// The server refuses these rows and will refuse them again (a data
    /// exception, SQLSTATE class 22, or an integrity violation, class 23):
    /// isolate the rows that cause it, the others can be saved.
    RowsRefused,
    /// The statement itself is refused (syntax, a missing table: class 42):
    /// nothing can help but a fix of the deployment.
    Never,
}

impl PostgresError {
    /// What retrying can do; see [`Retry`].
    pub fn retry(&self) -> Retry {
        match self {
            Self::Config(_) => Retry::Never,
            Self::Pool(_) => Retry::Later,
            Self::Db(e) => match e.as_db_error().map(|db| db.code().code()) {
                Some(code) if code.starts_with("42") => Retry::Never,
                Some(code) if code.starts_with("22") || code.starts_with("23") => Retry::RowsRefused,
                _ => Retry::Later,
            },
        }
    }

    /// Whether trying again may help.
    pub fn retryable(&self) -> bool {
        self.retry() == Retry::Later
    }

    /// The SQLSTATE, when the server answered with one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Self::Db(e) => e.as_db_error().map(|db| db.code().code()),
            _ => None,
        }
    }
}

impl From<deadpool_postgres::PoolError> for PostgresError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            // The connection attempt's own error, with its cause.
            deadpool_postgres::PoolError::Backend(e) => Self::Db(e),
            other => Self::Pool(other.to_string()),
        }
    }
}

/// Server messages can hold row values (a CHECK's "failing row contains ..."):
/// bounded in logs and dead letters.
const MAX_DETAIL: usize = 300;

/// `SQLSTATE 57P01: terminating connection due to administrator command`, or
/// for a client-side failure its chain of causes (`error connecting to server:
/// Connection refused (os error 111)`). tokio-postgres's own message for a
/// server error is only "db error".
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("SQLSTATE {}: {}", db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            let _ = write!(text, " ({})", cut(detail));
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            let _ = write!(text, ": {cause_text}");
        }
        source = cause.source();
    }
    text
}

fn cut(text: &str) -> String {
    if text.len() <= MAX_DETAIL {
        return text.to_string();
    }
    let mut end = MAX_DETAIL;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_details_are_cut_at_a_character_boundary() {
        let long = "é".repeat(400);
        let cut = cut(&long);
        assert!(cut.len() < 320 && cut.ends_with("(800 bytes)"), "{cut}");
        assert_eq!(super::cut("short"), "short");
    }
}
