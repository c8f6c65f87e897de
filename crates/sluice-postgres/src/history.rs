//! The fetcher's PostgreSQL history source: one query per micro-batch, for all
//! its (symbol, as_of) pairs at once, on a pooled connection.

use std::future::Future;
use std::pin::Pin;

use chrono::NaiveDate;
use deadpool_postgres::Pool;
use sluice_core::BatchFailure;
use sluice_stages::StageError;
use sluice_stages::fetcher::{
    FetchResults, HistorySource, Series, SeriesFuture, SeriesRequest, SeriesResults, WindowRequest, WindowShape,
};
use tokio_postgres::Row;

use crate::packed::unpack_into;
use crate::{PostgresError, Retry};

/// The last `$3[i]` days up to each request's date, newest first, tagged with
/// the request's position (1-based): a window's `days`, or a series' rows.
const DAYS: &str = "\
SELECT r.req, f.trade_date, f.features
FROM unnest($1::text[], $2::date[], $3::int8[]) WITH ORDINALITY AS r(symbol, as_of, n, req)
CROSS JOIN LATERAL (
    SELECT trade_date, features FROM features
    WHERE symbol = r.symbol AND trade_date <= r.as_of
    ORDER BY trade_date DESC
    LIMIT r.n
) f";

/// History from the `features` table.
#[derive(Debug, Clone)]
pub struct PgHistory {
    pool: Pool,
}

impl PgHistory {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// The rows of [`DAYS`] for each (symbol, date, limit), in one query.
    async fn days(&self, requests: impl Iterator<Item = (&str, NaiveDate, usize)>) -> Result<Vec<Row>, PostgresError> {
        let (mut symbols, mut dates, mut limits) = (Vec::new(), Vec::new(), Vec::new());
        for (symbol, date, limit) in requests {
            symbols.push(symbol);
            dates.push(date);
            limits.push(limit as i64);
        }
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(DAYS).await?;
        Ok(client.query(&statement, &[&symbols, &dates, &limits]).await?)
    }

    async fn windows(&self, requests: &[WindowRequest], shape: WindowShape) -> Result<FetchResults, PostgresError> {
        let rows = self.days(requests.iter().map(|r| (r.symbol.as_str(), r.as_of, shape.days))).await?;
        let days = per_request(&rows, requests.len());
        Ok(requests.iter().zip(days).map(|(request, packed)| window_of(request, shape, &packed)).collect())
    }

    async fn series(&self, requests: &[SeriesRequest], features: usize) -> Result<SeriesResults, PostgresError> {
        let rows = self.days(requests.iter().map(|r| (r.symbol.as_str(), r.as_of, r.rows))).await?;
        let days = per_request(&rows, requests.len());
        Ok(requests
            .iter()
            .zip(days)
            .map(|(request, packed)| {
                let shape = WindowShape { days: packed.len(), features };
                let window = WindowRequest { symbol: request.symbol.clone(), as_of: request.as_of };
                let values = window_of(&window, shape, &packed)?;
                Ok(Series { dates: packed.iter().rev().map(|(date, _)| *date).collect(), values })
            })
            .collect())
    }
}

/// Each of `n` requests' days, newest first, borrowed from the rows.
fn per_request(rows: &[Row], n: usize) -> Vec<Vec<(NaiveDate, &[u8])>> {
    let mut days: Vec<Vec<(NaiveDate, &[u8])>> = vec![Vec::new(); n];
    for row in rows {
        let req: i64 = row.get(0);
        if let Some(slot) = usize::try_from(req - 1).ok().and_then(|i| days.get_mut(i)) {
            slot.push((row.get(1), row.get(2)));
        }
    }
    days
}

/// One request's window, oldest day first, from its packed days newest first.
fn window_of(
    request: &WindowRequest,
    shape: WindowShape,
    packed: &[(NaiveDate, &[u8])],
) -> Result<Vec<f32>, StageError> {
    if packed.len() < shape.days {
        return Err(StageError::InsufficientHistory {
            symbol: request.symbol.clone(),
            as_of: request.as_of,
            have: packed.len(),
            need: shape.days,
        });
    }
    let mut values = Vec::with_capacity(shape.days * shape.features);
    for (date, day) in packed.iter().rev() {
        let before = values.len();
        if day.len() != shape.features * 4 || unpack_into(day, &mut values).is_none() {
            return Err(StageError::HistoryRow {
                symbol: request.symbol.clone(),
                date: *date,
                bytes: day.len(),
                want: shape.features,
            });
        }
        debug_assert_eq!(values.len() - before, shape.features);
    }
    Ok(values)
}

impl HistorySource for PgHistory {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn fetch<'a>(
        &'a self,
        requests: &'a [WindowRequest],
        shape: WindowShape,
    ) -> Pin<Box<dyn Future<Output = Result<FetchResults, BatchFailure>> + Send + 'a>> {
        Box::pin(async move { self.windows(requests, shape).await.map_err(failure) })
    }

    fn fetch_series<'a>(&'a self, requests: &'a [SeriesRequest], features: usize) -> Option<SeriesFuture<'a>> {
        Some(Box::pin(async move { self.series(requests, features).await.map_err(failure) }))
    }
}

/// The runtime retries retryable failures with backoff and reports them. A
/// read has no rows to isolate: only a statement that cannot work (class 42)
/// stops the stage.
fn failure(e: PostgresError) -> BatchFailure {
    if e.retry() == Retry::Never { BatchFailure::fatal(e) } else { BatchFailure::retryable(e) }
}
