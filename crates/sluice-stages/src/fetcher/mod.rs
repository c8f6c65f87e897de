//! The fetcher: reads request events (JSON) and attaches each stock event's
//! history window, from the event itself or from a [`HistorySource`].

mod synthetic;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::NaiveDate;
use sluice_kafka::{BatchFailure, Incoming, Output, Stage};
use sluice_messages::envelope::{Envelope, Payload, QueryText, StockWindow};
use sluice_messages::events::{RequestEvent, StockRequest};

pub use synthetic::{SyntheticConfig, SyntheticSource, feature_mean, feature_std, synthetic_row, trading_days_back};

use crate::StageError;
use crate::common::{dead_letter, send};

/// The shape every window must have: the model's input shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowShape {
    pub days: usize,
    pub features: usize,
}

/// One window to fetch: the `days` trading days up to and including `as_of`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRequest {
    pub symbol: String,
    pub as_of: NaiveDate,
}

/// Result of fetching a batch of windows: one entry per request, in order.
pub type FetchResults = Vec<Result<Vec<f32>, StageError>>;

/// Where history comes from. Given a whole batch of requests at once, so that a
/// database source can answer it with one query.
pub trait HistorySource: Send + Sync + 'static {
    /// A short name for logs.
    fn name(&self) -> &'static str;

    /// One `days x features` window (row-major, oldest day first) or one error
    /// per request. A failure of the source itself (not of one request) is an
    /// `Err` of the whole call.
    fn fetch<'a>(
        &'a self,
        requests: &'a [WindowRequest],
        shape: WindowShape,
    ) -> Pin<Box<dyn Future<Output = Result<FetchResults, BatchFailure>> + Send + 'a>>;
}

/// The fetcher stage.
pub struct Fetcher {
    source: Box<dyn HistorySource>,
    shape: WindowShape,
    output: Arc<str>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").field("source", &self.source.name()).field("shape", &self.shape).finish()
    }
}

impl Fetcher {
    pub fn new(source: Box<dyn HistorySource>, shape: WindowShape, output_topic: &str) -> Self {
        Self { source, shape, output: output_topic.into() }
    }

    fn inline_window(&self, request: &StockRequest, rows: &[Vec<f64>]) -> Result<StockWindow, StageError> {
        let WindowShape { days, features } = self.shape;
        let cols = rows.first().map_or(0, Vec::len);
        if rows.len() != days || rows.iter().any(|r| r.len() != features) {
            return Err(StageError::WindowShape { rows: rows.len(), cols, want_rows: days, want_cols: features });
        }
        // Values beyond f32's range become infinities here and dead letters in
        // the normalizer, which owns the finiteness rule.
        let values = rows.iter().flatten().map(|v| *v as f32).collect();
        Ok(window(request, self.shape, values))
    }
}

fn window(request: &StockRequest, shape: WindowShape, values: Vec<f32>) -> StockWindow {
    StockWindow {
        symbol: request.symbol.clone(),
        as_of: request.as_of,
        rows: shape.days as u32,
        cols: shape.features as u32,
        values,
    }
}

/// What became of one input before the source is asked.
enum Pending {
    Done(Output),
    Fetch(StockRequest, Envelope),
}

impl Stage for Fetcher {
    fn name(&self) -> &'static str {
        "fetcher"
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        let mut pending = Vec::with_capacity(batch.len());
        for (i, input) in batch.iter().enumerate() {
            let event = match RequestEvent::from_json(&input.payload) {
                Ok(event) => event,
                Err(e) => {
                    pending.push(Pending::Done(dead_letter(i, &e.into(), best_effort_event_id(&input.payload))));
                    continue;
                }
            };
            let mut envelope = Envelope {
                event_id: event.event_id().to_string(),
                traceparent: None,
                requested_at_ms: input.timestamp_ms.unwrap_or_else(sluice_messages::now_ms),
                updated_at_ms: sluice_messages::now_ms(),
                attempt: 0,
                payload: Payload::Query(QueryText { text: String::new() }),
            };
            pending.push(match event {
                RequestEvent::Query(query) => {
                    envelope.payload = Payload::Query(QueryText { text: query.text });
                    Pending::Done(send(i, input, &self.output, &envelope))
                }
                RequestEvent::Stock(request) => match &request.window {
                    Some(rows) => Pending::Done(match self.inline_window(&request, rows) {
                        Ok(w) => {
                            envelope.payload = Payload::Fetched(w);
                            send(i, input, &self.output, &envelope)
                        }
                        Err(e) => dead_letter(i, &e, Some(envelope.event_id)),
                    }),
                    None => Pending::Fetch(request, envelope),
                },
            });
        }

        let requests: Vec<WindowRequest> = pending
            .iter()
            .filter_map(|p| match p {
                Pending::Fetch(r, _) => Some(WindowRequest { symbol: r.symbol.clone(), as_of: r.as_of }),
                Pending::Done(_) => None,
            })
            .collect();
        let mut fetched =
            if requests.is_empty() { Vec::new() } else { self.source.fetch(&requests, self.shape).await? }.into_iter();

        let mut outputs = Vec::with_capacity(batch.len());
        for (i, p) in pending.into_iter().enumerate() {
            outputs.push(match p {
                Pending::Done(output) => output,
                Pending::Fetch(request, mut envelope) => match fetched.next() {
                    Some(Ok(values)) => {
                        envelope.payload = Payload::Fetched(window(&request, self.shape, values));
                        send(i, &batch[i], &self.output, &envelope)
                    }
                    Some(Err(e)) => dead_letter(i, &e, Some(envelope.event_id)),
                    None => {
                        return Err(BatchFailure {
                            retryable: false,
                            message: format!("history source {} returned too few results", self.source.name()),
                        });
                    }
                },
            });
        }
        Ok(outputs)
    }
}

/// The `event_id` of a refused request, if its JSON has one: dead letters are
/// easier to trace with it.
fn best_effort_event_id(payload: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let id = value.get("event_id")?.as_str()?;
    (id.len() <= sluice_messages::events::MAX_EVENT_ID_LEN).then(|| id.to_string())
}
