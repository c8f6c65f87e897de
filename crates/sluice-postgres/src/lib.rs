//! Sluice's PostgreSQL side: the schema and its migrations, synthetic seeding
//! (COPY), and the fetcher's history source (one query per micro-batch).

mod config;
mod error;
pub mod history;
pub mod migrate;
pub mod seed;

pub use config::PostgresConfig;
pub use error::PostgresError;
