//! Sluice's PostgreSQL side: the schema and its migrations, synthetic seeding
//! (COPY), the fetcher's history source (one query per micro-batch) and the
//! writer's idempotent sink (one statement per batch).

mod config;
mod error;
pub mod history;
pub mod migrate;
pub mod packed;
pub mod seed;
pub mod sink;
mod tls;

pub use config::PostgresConfig;
pub use error::{PostgresError, Retry};
