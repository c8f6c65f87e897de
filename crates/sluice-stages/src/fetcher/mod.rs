//! The fetcher: reads request events (JSON) and attaches each stock event's
//! history window, from the event itself or from a [`HistorySource`].

mod synthetic;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::NaiveDate;
use sluice_core::{BatchFailure, Incoming, Output, Stage};
use sluice_messages::dead_letter::Reason;
use sluice_messages::envelope::{Header, Payload, QueryText, StockWindow};
use sluice_messages::events::{RequestEvent, StockRequest};

pub use synthetic::{SyntheticConfig, SyntheticSource, feature_mean, feature_std, synthetic_row, trading_days_back};

use crate::StageError;
use crate::common::{dead_letter, forward};

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
    /// Larger requests are dead letters, unparsed.
    max_request_bytes: usize,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").field("source", &self.source.name()).field("shape", &self.shape).finish()
    }
}

impl Fetcher {
    /// The dead-letter reasons this stage gives (docs/instrumentation.md).
    pub const DEAD_LETTER_REASONS: &[Reason] = &[
        Reason::RequestTooLarge,
        Reason::MalformedJson,
        Reason::InvalidUtf8,
        Reason::InvalidEvent,
        Reason::InvalidField,
        Reason::UnknownSymbol,
        Reason::InsufficientHistory,
        Reason::InvalidWindowShape,
    ];

    /// The default `fetcher.max_request_bytes`: a full inline window of the
    /// stock model is about 80 KB of JSON.
    pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1 << 20;

    pub fn new(source: Box<dyn HistorySource>, shape: WindowShape, output_topic: &str) -> Self {
        Self { source, shape, output: output_topic.into(), max_request_bytes: Self::DEFAULT_MAX_REQUEST_BYTES }
    }

    /// Refuses requests over `bytes` (dead letters, `request_too_large`).
    pub fn with_max_request_bytes(mut self, bytes: usize) -> Self {
        self.max_request_bytes = bytes;
        self
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
        Ok(window(&request.symbol, request.as_of, self.shape, values))
    }
}

fn window(symbol: &str, as_of: NaiveDate, shape: WindowShape, values: Vec<f32>) -> StockWindow {
    StockWindow::new(symbol, as_of, shape.days as u32, shape.features as u32, values)
}

/// What became of one input (or one step of a backfill) before the source is asked.
enum Pending {
    Done(Output),
    /// A window to fetch, sent on under `header` once it is there.
    Fetch {
        source: usize,
        request: WindowRequest,
        header: Header,
    },
}

impl Stage for Fetcher {
    fn name(&self) -> &'static str {
        "fetcher"
    }

    fn dead_letter_reasons(&self) -> &'static [Reason] {
        Self::DEAD_LETTER_REASONS
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        let mut pending = Vec::with_capacity(batch.len());
        for (i, input) in batch.iter().enumerate() {
            if input.payload.len() > self.max_request_bytes {
                let e = StageError::RequestTooLarge { bytes: input.payload.len(), max: self.max_request_bytes };
                pending.push(Pending::Done(dead_letter(i, &e, None)));
                continue;
            }
            let event = match RequestEvent::from_json(&input.payload) {
                Ok(event) => event,
                Err(e) => {
                    pending.push(Pending::Done(dead_letter(i, &e.into(), best_effort_event_id(&input.payload))));
                    continue;
                }
            };
            // Request events have no trace field of their own: the request's
            // `traceparent` header is the trace, so the envelope records it and
            // agrees with the headers of every record that follows.
            let header = |event_id: String| Header {
                event_id,
                traceparent: input.traceparent.map(|t| t.to_string()),
                requested_at_ms: input.timestamp_ms.unwrap_or_else(sluice_messages::now_ms),
                attempt: 0,
            };
            match event {
                RequestEvent::Query(query) => {
                    let payload = Payload::Query(QueryText { text: query.text });
                    pending.push(Pending::Done(forward(i, input, &self.output, &header(query.event_id), payload)));
                }
                RequestEvent::Stock(request) => match &request.window {
                    Some(rows) => pending.push(Pending::Done(match self.inline_window(&request, rows) {
                        Ok(w) => {
                            forward(i, input, &self.output, &header(request.event_id.clone()), Payload::Fetched(w))
                        }
                        Err(e) => dead_letter(i, &e, Some(request.event_id.clone())),
                    })),
                    // A backfill's steps are fetched in the same query as the rest of the batch.
                    None => {
                        for (event_id, as_of) in request.steps() {
                            pending.push(Pending::Fetch {
                                source: i,
                                request: WindowRequest { symbol: request.symbol.clone(), as_of },
                                header: header(event_id),
                            });
                        }
                    }
                },
            }
        }

        let requests: Vec<WindowRequest> = pending
            .iter()
            .filter_map(|p| match p {
                Pending::Fetch { request, .. } => Some(request.clone()),
                Pending::Done(_) => None,
            })
            .collect();
        let mut fetched =
            if requests.is_empty() { Vec::new() } else { self.source.fetch(&requests, self.shape).await? }.into_iter();

        let mut outputs = Vec::with_capacity(pending.len());
        for p in pending {
            outputs.push(match p {
                Pending::Done(output) => output,
                Pending::Fetch { source, request, header } => match fetched.next() {
                    Some(Ok(values)) => {
                        let payload = Payload::Fetched(window(&request.symbol, request.as_of, self.shape, values));
                        forward(source, &batch[source], &self.output, &header, payload)
                    }
                    Some(Err(e)) => dead_letter(source, &e, Some(header.event_id)),
                    None => {
                        let message = format!("history source {} returned too few results", self.source.name());
                        return Err(BatchFailure::fatal(message));
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

#[cfg(test)]
mod tests {
    use sluice_messages::codec;
    use sluice_messages::trace::TraceParent;

    use super::*;

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn input(offset: i64, json: &str, traceparent: Option<TraceParent>) -> Incoming {
        Incoming {
            key: None,
            payload: json.as_bytes().to_vec(),
            topic: "requests".into(),
            partition: 0,
            offset,
            timestamp_ms: Some(1),
            traceparent,
        }
    }

    #[tokio::test]
    async fn the_request_header_is_the_envelope_traceparent() {
        let source = SyntheticSource::new(SyntheticConfig::default());
        let mut fetcher = Fetcher::new(Box::new(source), WindowShape { days: 30, features: 105 }, "fetched");
        let header = TraceParent::parse(TRACEPARENT.as_bytes());
        assert!(header.is_some());
        let batch = [
            input(0, r#"{"kind": "query", "event_id": "q-1", "text": "what is my balance"}"#, header),
            input(1, r#"{"kind": "stock", "event_id": "s-1", "symbol": "S0042", "as_of": "2024-05-31"}"#, header),
            input(2, r#"{"kind": "query", "event_id": "q-2", "text": "what is my balance"}"#, None),
        ];
        let outputs = fetcher.process(&batch).await.expect("processed");
        let traces: Vec<Option<String>> = outputs
            .iter()
            .map(|o| match o {
                Output::Send { payload, .. } => codec::decode(payload).expect("envelope").traceparent,
                Output::DeadLetter { detail, .. } => panic!("dead letter: {detail}"),
            })
            .collect();
        assert_eq!(traces, vec![Some(TRACEPARENT.to_string()), Some(TRACEPARENT.to_string()), None]);
    }
}
