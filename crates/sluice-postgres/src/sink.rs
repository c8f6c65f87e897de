//! The writer's PostgreSQL sink: one idempotent statement per batch.

use std::future::Future;
use std::pin::Pin;

use chrono::NaiveDate;
use deadpool_postgres::Pool;
use sluice_kafka::BatchFailure;
use sluice_messages::prediction::PredictionRecord;
use sluice_stages::PredictionSink;

use crate::PostgresError;

/// All rows of a batch in one statement (so one implicit transaction); an event
/// id already saved is left as it is, so a re-delivered batch adds nothing.
const INSERT: &str = "\
INSERT INTO stock_predictions
    (event_id, symbol, as_of, predicted_return, confidence, model_name, model_version, cached)
SELECT * FROM unnest($1::text[], $2::text[], $3::date[], $4::real[], $5::real[], $6::text[], $7::text[], $8::bool[])
ON CONFLICT (event_id) DO NOTHING";

/// Saves predictions to `stock_predictions`.
#[derive(Debug, Clone)]
pub struct PgPredictions {
    pool: Pool,
}

impl PgPredictions {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// Inserts the rows; returns how many were new.
    pub async fn insert(&self, records: &[PredictionRecord]) -> Result<u64, PostgresError> {
        let column = |f: fn(&PredictionRecord) -> String| records.iter().map(f).collect::<Vec<String>>();
        let ids = column(|r| r.event_id.clone());
        let symbols = column(|r| r.symbol.clone());
        let names = column(|r| r.model.name.clone());
        let versions = column(|r| r.model.version.clone());
        let dates: Vec<NaiveDate> = records.iter().map(|r| r.as_of).collect();
        let returns: Vec<f32> = records.iter().map(|r| r.predicted_return).collect();
        let confidences: Vec<f32> = records.iter().map(|r| r.confidence).collect();
        let cached: Vec<bool> = records.iter().map(|r| r.cached).collect();
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(INSERT).await?;
        Ok(client
            .execute(&statement, &[&ids, &symbols, &dates, &returns, &confidences, &names, &versions, &cached])
            .await?)
    }
}

impl PredictionSink for PgPredictions {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn write<'a>(
        &'a self,
        records: &'a [PredictionRecord],
    ) -> Pin<Box<dyn Future<Output = Result<(), BatchFailure>> + Send + 'a>> {
        Box::pin(async move {
            self.insert(records)
                .await
                .map(|_| ())
                .map_err(|e| BatchFailure { retryable: e.retryable(), message: format!("saving predictions: {e}") })
        })
    }
}
