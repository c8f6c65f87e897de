//! Schema migrations: the SQL files in `schemas/sql/`, applied in order, each
//! once, under an advisory lock so that replicas starting together do not race.

use deadpool_postgres::Pool;

use crate::PostgresError;

/// (name, SQL) in order of application.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_initial", include_str!("../../../schemas/sql/0001_initial.sql")),
    ("0002_packed_features", include_str!("../../../schemas/sql/0002_packed_features.sql")),
    ("0003_shadow", include_str!("../../../schemas/sql/0003_shadow.sql")),
];

/// An arbitrary key for `pg_advisory_xact_lock`, Sluice's own ("SLUICE").
const LOCK_KEY: i64 = 0x534C_5549_4345;

/// Creates `schema` if needed and applies the missing migrations; returns their names.
pub async fn migrate(pool: &Pool, schema: &str) -> Result<Vec<String>, PostgresError> {
    let mut client = pool.get().await?;
    client.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")).await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS sluice_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let mut applied = Vec::new();
    for (name, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]).await?;
        let done = tx.query_opt("SELECT 1 FROM sluice_migrations WHERE name = $1", &[name]).await?.is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute("INSERT INTO sluice_migrations (name) VALUES ($1)", &[name]).await?;
            applied.push((*name).to_string());
        }
        tx.commit().await?;
    }
    Ok(applied)
}
