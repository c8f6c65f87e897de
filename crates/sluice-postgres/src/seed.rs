//! `sluice db seed`: deterministic synthetic history, loaded with COPY.
//!
//! The rows are exactly the synthetic source's (`synthetic_row`), so a window
//! read from PostgreSQL equals the synthetic source's window for the same
//! symbol and date.

use chrono::NaiveDate;
use deadpool_postgres::Pool;
use futures_util::pin_mut;
use sluice_stages::fetcher::{SyntheticHistory, SyntheticSource, synthetic_row, trading_days_back};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use crate::PostgresError;

/// Loads `days` trading days up to `end` for symbols `S0000`.. `S{symbols-1}`,
/// replacing rows that exist. Returns the number of rows written.
pub async fn seed(
    pool: &Pool,
    symbols: usize,
    days: usize,
    end: NaiveDate,
    features: usize,
    history: SyntheticHistory,
) -> Result<u64, PostgresError> {
    let mut dates = trading_days_back(end, NaiveDate::MIN, days);
    dates.reverse();
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    // COPY cannot upsert: load a scratch table, then merge it in.
    tx.batch_execute("CREATE TEMP TABLE features_seed (LIKE features) ON COMMIT DROP").await?;
    let sink = tx.copy_in("COPY features_seed (symbol, trade_date, features) FROM STDIN BINARY").await?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::TEXT, Type::DATE, Type::BYTEA]);
    pin_mut!(writer);
    for s in 0..symbols {
        let symbol = SyntheticSource::symbol(s);
        for day in &dates {
            let row = crate::packed::pack(&synthetic_row(&symbol, *day, features, history));
            writer.as_mut().write(&[&symbol, day, &row]).await?;
        }
    }
    let rows = writer.finish().await?;
    tx.batch_execute(
        "INSERT INTO features SELECT * FROM features_seed \
         ON CONFLICT (symbol, trade_date) DO UPDATE SET features = EXCLUDED.features",
    )
    .await?;
    tx.commit().await?;
    Ok(rows)
}
