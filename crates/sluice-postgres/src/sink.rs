//! The writer's PostgreSQL sink: one idempotent statement per table and
//! batch, in one transaction.

use std::future::Future;
use std::pin::Pin;

use chrono::NaiveDate;
use deadpool_postgres::Pool;
use sluice_messages::prediction::{IntentRecord, PredictionRecord};
use sluice_stages::PredictionSink;
use sluice_stages::writer::SinkError;

use crate::PostgresError;
use crate::error::Retry;

/// All rows of a batch in one statement (so one implicit transaction); an event
/// id already saved is left as it is, so a re-delivered batch adds nothing.
const INSERT: &str = "\
INSERT INTO stock_predictions
    (event_id, symbol, as_of, predicted_return, confidence, model_name, model_version, cached)
SELECT * FROM unnest($1::text[], $2::text[], $3::date[], $4::real[], $5::real[], $6::text[], $7::text[], $8::bool[])
ON CONFLICT (event_id) DO NOTHING";

/// The same for query intents; the top labels travel as JSON text.
const INSERT_INTENTS: &str = "\
INSERT INTO query_intents
    (event_id, query_text, label, confidence, top_labels, model_name, model_version, cached)
SELECT id, query_text, label, confidence, top::jsonb, name, version, cached
FROM unnest($1::text[], $2::text[], $3::text[], $4::real[], $5::text[], $6::text[], $7::text[], $8::bool[])
    AS r(id, query_text, label, confidence, top, name, version, cached)
ON CONFLICT (event_id) DO NOTHING";

/// The shadow tables' statements: the same rows, one per event and version.
const INSERT_SHADOW: &str = "\
INSERT INTO stock_predictions_shadow
    (event_id, symbol, as_of, predicted_return, confidence, model_name, model_version, cached)
SELECT * FROM unnest($1::text[], $2::text[], $3::date[], $4::real[], $5::real[], $6::text[], $7::text[], $8::bool[])
ON CONFLICT (event_id, model_version) DO NOTHING";

const INSERT_INTENTS_SHADOW: &str = "\
INSERT INTO query_intents_shadow
    (event_id, query_text, label, confidence, top_labels, model_name, model_version, cached)
SELECT id, query_text, label, confidence, top::jsonb, name, version, cached
FROM unnest($1::text[], $2::text[], $3::text[], $4::real[], $5::text[], $6::text[], $7::text[], $8::bool[])
    AS r(id, query_text, label, confidence, top, name, version, cached)
ON CONFLICT (event_id, model_version) DO NOTHING";

/// Saves predictions to `stock_predictions` and intents to `query_intents`
/// (or, for a rollout's shadow answers, to their `_shadow` tables).
#[derive(Debug, Clone)]
pub struct PgPredictions {
    pool: Pool,
    /// The statements for stock predictions and for query intents.
    statements: (&'static str, &'static str),
}

impl PgPredictions {
    pub fn new(pool: Pool) -> Self {
        Self { pool, statements: (INSERT, INSERT_INTENTS) }
    }

    /// Saves to `stock_predictions_shadow` and `query_intents_shadow`.
    pub fn shadow(pool: Pool) -> Self {
        Self { pool, statements: (INSERT_SHADOW, INSERT_INTENTS_SHADOW) }
    }

    /// Inserts the rows in one transaction; returns how many were new.
    pub async fn insert(&self, stocks: &[PredictionRecord], intents: &[IntentRecord]) -> Result<u64, PostgresError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let mut new = 0;
        if !stocks.is_empty() {
            let column = |f: fn(&PredictionRecord) -> String| stocks.iter().map(f).collect::<Vec<String>>();
            let ids = column(|r| r.event_id.clone());
            let symbols = column(|r| r.symbol.clone());
            let names = column(|r| r.model.name.clone());
            let versions = column(|r| r.model.version.clone());
            let dates: Vec<NaiveDate> = stocks.iter().map(|r| r.as_of).collect();
            let returns: Vec<f32> = stocks.iter().map(|r| r.predicted_return).collect();
            let confidences: Vec<f32> = stocks.iter().map(|r| r.confidence).collect();
            let cached: Vec<bool> = stocks.iter().map(|r| r.cached).collect();
            let statement = tx.prepare_cached(self.statements.0).await?;
            new += tx
                .execute(&statement, &[&ids, &symbols, &dates, &returns, &confidences, &names, &versions, &cached])
                .await?;
        }
        if !intents.is_empty() {
            let column = |f: fn(&IntentRecord) -> String| intents.iter().map(f).collect::<Vec<String>>();
            let ids = column(|r| r.event_id.clone());
            let texts = column(|r| r.text.clone());
            let labels = column(|r| r.label.clone());
            let tops = column(|r| serde_json::to_string(&r.top).expect("label scores always serialise"));
            let names = column(|r| r.model.name.clone());
            let versions = column(|r| r.model.version.clone());
            let confidences: Vec<f32> = intents.iter().map(|r| r.confidence).collect();
            let cached: Vec<bool> = intents.iter().map(|r| r.cached).collect();
            let statement = tx.prepare_cached(self.statements.1).await?;
            new += tx
                .execute(&statement, &[&ids, &texts, &labels, &confidences, &tops, &names, &versions, &cached])
                .await?;
        }
        tx.commit().await?;
        Ok(new)
    }
}

impl PredictionSink for PgPredictions {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn write<'a>(
        &'a self,
        stocks: &'a [PredictionRecord],
        intents: &'a [IntentRecord],
    ) -> Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>> {
        Box::pin(async move {
            self.insert(stocks, intents).await.map(|_| ()).map_err(|e| {
                let message = format!("saving predictions: {e}");
                match e.retry() {
                    Retry::Later => SinkError::Retryable(message),
                    Retry::RowsRefused => SinkError::Refused(e.to_string()),
                    Retry::Never => SinkError::Fatal(message),
                }
            })
        })
    }
}
