//! The fetcher: reads request events (JSON) and attaches each stock event's
//! history window, from the event itself or from a [`HistorySource`].

mod synthetic;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::NaiveDate;
use sluice_core::{BatchFailure, Incoming, Output, Stage};
use sluice_messages::dead_letter::Reason;
use sluice_messages::envelope::{Header, Payload, QueryText, SeriesStep, StockSeries, StockWindow};
use sluice_messages::events::{Priority, RequestEvent, StockRequest};

pub use synthetic::{
    SyntheticConfig, SyntheticHistory, SyntheticSource, WALK_DAYS, feature_mean, feature_std, synthetic_row,
    trading_days_back,
};

use crate::StageError;
use crate::common::{Cut, dead_letter, forward, forward_several, too_late};

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

/// The history a backfill's series is cut from: up to `rows` days up to and
/// including `as_of`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesRequest {
    pub symbol: String,
    pub as_of: NaiveDate,
    pub rows: usize,
}

/// Days of history, oldest first, with their dates: `dates.len()` rows of
/// `features` values. Fewer rows than asked where history starts later.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub dates: Vec<NaiveDate>,
    pub values: Vec<f32>,
}

/// Result of fetching a batch of series: one entry per request, in order.
pub type SeriesResults = Vec<Result<Series, StageError>>;

/// What [`HistorySource::fetch_series`] gives.
pub type SeriesFuture<'a> = Pin<Box<dyn Future<Output = Result<SeriesResults, BatchFailure>> + Send + 'a>>;

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

    /// The history of several steps of backfills at once: for each request,
    /// the last `rows` days on or before its date (fewer where history starts
    /// later), with their dates, so that each step's window is the last
    /// `days` rows on or before the step's date, as [`HistorySource::fetch`]
    /// would give it. `None`: this source fetches windows only, and a
    /// backfill's steps are fetched and sent one by one.
    fn fetch_series<'a>(&'a self, _requests: &'a [SeriesRequest], _features: usize) -> Option<SeriesFuture<'a>> {
        None
    }
}

/// The fetcher stage.
pub struct Fetcher {
    source: Box<dyn HistorySource>,
    shape: WindowShape,
    output: Arc<str>,
    /// With lanes on: where the windows of bulk requests go (the bulk twin
    /// of `output`).
    bulk_output: Option<Arc<str>>,
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
        Reason::DeadlineExceeded,
    ];

    /// The default `fetcher.max_request_bytes`: a full inline window of the
    /// stock model is about 80 KB of JSON.
    pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1 << 20;

    pub fn new(source: Box<dyn HistorySource>, shape: WindowShape, output_topic: &str) -> Self {
        Self {
            source,
            shape,
            output: output_topic.into(),
            bulk_output: None,
            max_request_bytes: Self::DEFAULT_MAX_REQUEST_BYTES,
        }
    }

    /// Lanes on: the windows of requests whose priority is bulk (a backfill's
    /// by default) go to `topic`.
    pub fn with_bulk_output(mut self, topic: &str) -> Self {
        self.bulk_output = Some(topic.into());
        self
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

/// The most history one series carries: a backfill with more steps travels
/// as several series, each far below the brokers' usual 1 MiB record limit.
pub const MAX_SERIES_BYTES: usize = 256 * 1024;

/// What became of one input (or one step of a backfill) before the source is asked.
enum Pending {
    Done(Output),
    /// A window to fetch, sent on under `header` once it is there.
    Fetch {
        source: usize,
        request: WindowRequest,
        header: Header,
    },
    /// Steps of one backfill whose windows overlap, to carry as one series of
    /// `rows` days (sent under `header`, the backfill's own).
    Series {
        source: usize,
        header: Header,
        symbol: String,
        steps: Vec<(Header, NaiveDate)>,
        rows: usize,
    },
}

impl Fetcher {
    /// A backfill's steps, as series where their windows overlap (stride
    /// below the window), in pieces of at most [`MAX_SERIES_BYTES`]; else
    /// (and a step left alone) as windows of their own.
    fn backfill(
        &self,
        source: usize,
        header: &Header,
        request: &StockRequest,
        steps: Vec<(Header, NaiveDate)>,
    ) -> Vec<Pending> {
        let WindowShape { days, features } = self.shape;
        let stride = request.stride.unwrap_or(1).max(1) as usize;
        let per_series = 1 + (MAX_SERIES_BYTES / (features * 4)).saturating_sub(days) / stride;
        if request.from.is_none() || stride >= days || per_series < 2 {
            return self.one_by_one(source, &request.symbol, steps);
        }
        let mut pending = Vec::new();
        let mut steps = steps.into_iter().peekable();
        while steps.peek().is_some() {
            let chunk: Vec<(Header, NaiveDate)> = steps.by_ref().take(per_series).collect();
            if chunk.len() < 2 {
                pending.extend(self.one_by_one(source, &request.symbol, chunk));
            } else {
                let rows = days + (chunk.len() - 1) * stride;
                pending.push(Pending::Series {
                    source,
                    header: header.clone(),
                    symbol: request.symbol.clone(),
                    steps: chunk,
                    rows,
                });
            }
        }
        pending
    }

    fn one_by_one(&self, source: usize, symbol: &str, steps: Vec<(Header, NaiveDate)>) -> Vec<Pending> {
        steps
            .into_iter()
            .map(|(header, as_of)| Pending::Fetch {
                source,
                request: WindowRequest { symbol: symbol.into(), as_of },
                header,
            })
            .collect()
    }

    /// The series of `steps` cut from `history`: every step whose window it
    /// holds (the last `days` rows on or before the step's date, as a window
    /// fetched alone would be), and the others fetched one by one, so that
    /// they fail (or not) exactly as they would alone.
    fn cut(
        &self,
        source: usize,
        input: &Incoming,
        header: &Header,
        symbol: &str,
        steps: Vec<(Header, NaiveDate)>,
        history: Option<Series>,
    ) -> Vec<Pending> {
        let WindowShape { days, features } = self.shape;
        let Some(history) = history.filter(|h| h.values.len() == h.dates.len() * features) else {
            return self.one_by_one(source, symbol, steps);
        };
        let (mut formed, mut alone) = (Vec::new(), Vec::new());
        for (step_header, as_of) in steps {
            let rows = history.dates.partition_point(|d| *d <= as_of);
            if rows >= days { formed.push((step_header, as_of, rows - 1)) } else { alone.push((step_header, as_of)) }
        }
        if formed.len() < 2 {
            alone.extend(formed.into_iter().map(|(h, as_of, _)| (h, as_of)));
            alone.sort_by_key(|(_, as_of)| *as_of);
            return self.one_by_one(source, symbol, alone);
        }
        let (first, last) = (formed[0].2 + 1 - days, formed[formed.len() - 1].2);
        let values = history.values[first * features..(last + 1) * features].to_vec();
        let rows = (last + 1 - first) as u32;
        let series = StockSeries {
            history: StockWindow::new(symbol, history.dates[last], rows, features as u32, values),
            window: days as u32,
            steps: formed
                .into_iter()
                .map(|(h, as_of, end)| SeriesStep { event_id: h.event_id, as_of, end_row: (end - first) as u32 })
                .collect(),
        };
        let series = forward_several(source, input, &self.output, header, Payload::FetchedSeries(series));
        let mut pending = vec![Pending::Done(series)];
        pending.extend(self.one_by_one(source, symbol, alone));
        pending
    }
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
        // The inputs whose outputs take the bulk lane.
        let mut bulk = vec![false; batch.len()];
        let cut = Cut::now(0);
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
            let requested_at_ms = input.timestamp_ms.unwrap_or_else(sluice_messages::now_ms);
            let deadline_ms = event.deadline_ms(requested_at_ms);
            let header = |event_id: String| Header {
                event_id,
                traceparent: input.traceparent.map(|t| t.to_string()),
                requested_at_ms,
                attempt: 0,
                deadline_ms,
            };
            // A request already past its own deadline is not fetched.
            if let Some(late) = cut.late(&header(String::new())) {
                let id = event.event_id().to_string();
                pending.push(Pending::Done(too_late(i, &late, "fetcher", event.kind(), id)));
                continue;
            }
            bulk[i] = event.priority() == Priority::Bulk;
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
                        let steps = request.steps().into_iter().map(|(id, as_of)| (header(id), as_of)).collect();
                        pending.extend(self.backfill(i, &header(request.event_id.clone()), &request, steps));
                    }
                },
            }
        }

        // The series first: what they cannot hold is fetched as windows below.
        let series: Vec<SeriesRequest> = pending
            .iter()
            .filter_map(|p| match p {
                Pending::Series { symbol, steps, rows, .. } => {
                    Some(SeriesRequest { symbol: symbol.clone(), as_of: steps[steps.len() - 1].1, rows: *rows })
                }
                Pending::Done(_) | Pending::Fetch { .. } => None,
            })
            .collect();
        let fetching = if series.is_empty() { None } else { self.source.fetch_series(&series, self.shape.features) };
        let mut histories = match fetching {
            Some(fetching) => fetching.await?,
            // None: each step of a series is fetched alone below.
            None => Vec::new(),
        };
        if !histories.is_empty() && histories.len() != series.len() {
            let message = format!(
                "history source {} returned {} series for {}",
                self.source.name(),
                histories.len(),
                series.len()
            );
            return Err(BatchFailure::fatal(message));
        }
        histories.reverse();
        let pending: Vec<Pending> = pending
            .into_iter()
            .flat_map(|p| match p {
                Pending::Series { source, header, symbol, steps, .. } => {
                    let history = histories.pop().and_then(Result::ok);
                    self.cut(source, &batch[source], &header, &symbol, steps, history)
                }
                other => vec![other],
            })
            .collect();

        let requests: Vec<WindowRequest> = pending
            .iter()
            .filter_map(|p| match p {
                Pending::Fetch { request, .. } => Some(request.clone()),
                Pending::Done(_) | Pending::Series { .. } => None,
            })
            .collect();
        let mut fetched =
            if requests.is_empty() { Vec::new() } else { self.source.fetch(&requests, self.shape).await? }.into_iter();

        let mut outputs = Vec::with_capacity(pending.len());
        for p in pending {
            outputs.push(match p {
                Pending::Done(output) => output,
                Pending::Series { .. } => return Err(BatchFailure::fatal("a backfill's series was left uncut")),
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
        if let Some(bulk_output) = &self.bulk_output {
            for output in &mut outputs {
                if let Output::Send { source, topic, .. } = output
                    && bulk[*source]
                {
                    *topic = bulk_output.clone();
                }
            }
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

    fn sent(outputs: &[Output]) -> Vec<sluice_messages::envelope::Envelope> {
        outputs
            .iter()
            .map(|o| match o {
                Output::Send { payload, .. } => codec::decode(payload).expect("envelope"),
                Output::DeadLetter { detail, .. } => panic!("dead letter: {detail}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_backfill_travels_as_one_series_whose_windows_equal_the_windows_fetched_one_by_one() {
        let shape = WindowShape { days: 30, features: 105 };
        for history in [SyntheticHistory::Noise, SyntheticHistory::RandomWalk] {
            let config = SyntheticConfig { history, ..SyntheticConfig::default() };
            let mut fetcher = Fetcher::new(Box::new(SyntheticSource::new(config.clone())), shape, "fetched");
            let json = r#"{"kind":"stock","event_id":"b-1","symbol":"S0007","from":"2024-04-01","as_of":"2024-06-21","stride":5}"#;
            let RequestEvent::Stock(request) = RequestEvent::from_json(json.as_bytes()).expect("valid") else {
                unreachable!()
            };
            let outputs = fetcher.process(&[input(0, json, None)]).await.expect("processed");
            // Keyless, like its request: each step's answer is keyed by the step's id.
            assert!(matches!(&outputs[..], [Output::Send { key: None, .. }]), "{outputs:?}");
            let envelopes = sent(&outputs);
            assert_eq!(envelopes.len(), 1, "one record for the whole backfill");
            assert_eq!(envelopes[0].event_id, "b-1");
            let Payload::FetchedSeries(series) = &envelopes[0].payload else {
                panic!("{:?}", envelopes[0].payload.kind())
            };
            let steps: Vec<(String, NaiveDate)> = series.steps.iter().map(|s| (s.event_id.clone(), s.as_of)).collect();
            assert_eq!(steps, request.steps());
            // 12 steps 5 trading days apart: 30 + 11 * 5 rows instead of 12 * 30.
            assert_eq!(series.history.rows, 85);
            let source = SyntheticSource::new(config);
            for step in &series.steps {
                let alone = source.window(&WindowRequest { symbol: "S0007".into(), as_of: step.as_of }, shape);
                let formed = series.step_window(step).expect("held");
                assert_eq!(formed.values, alone.expect("window"), "{history:?} {}", step.event_id);
                assert_eq!((formed.as_of, formed.rows, formed.symbol.as_str()), (step.as_of, 30, "S0007"));
            }
        }
    }

    #[tokio::test]
    async fn backfill_steps_a_series_cannot_hold_are_fetched_alone_and_fail_alone() {
        let shape = WindowShape { days: 30, features: 105 };
        // History from 2024-01-01: the 30th trading day is 2024-02-09.
        let start = NaiveDate::from_ymd_opt(2024, 1, 1).expect("date");
        let config = SyntheticConfig { history_start: start, ..SyntheticConfig::default() };
        let mut fetcher = Fetcher::new(Box::new(SyntheticSource::new(config)), shape, "fetched");
        let early =
            r#"{"kind":"stock","event_id":"b-2","symbol":"S0001","from":"2024-02-01","as_of":"2024-03-29","stride":5}"#;
        let unknown =
            r#"{"kind":"stock","event_id":"b-3","symbol":"S9999","from":"2024-03-01","as_of":"2024-03-29","stride":5}"#;
        let wide = r#"{"kind":"stock","event_id":"b-4","symbol":"S0002","from":"2024-03-01","as_of":"2024-06-28","stride":30}"#;
        let outputs = fetcher.process(&[input(0, early, None), input(1, unknown, None), input(2, wide, None)]).await;
        let outputs = outputs.expect("processed");
        let mut dead = Vec::new();
        let mut windows = Vec::new();
        let mut series = Vec::new();
        for output in &outputs {
            match output {
                Output::DeadLetter { source, reason, event_id, .. } => dead.push((*source, *reason, event_id.clone())),
                Output::Send { source, payload, .. } => match codec::decode(payload).expect("envelope").payload {
                    Payload::Fetched(w) => windows.push((*source, w.as_of)),
                    Payload::FetchedSeries(s) => series.push((*source, s.steps.len())),
                    other => panic!("{}", other.kind()),
                },
            }
        }
        // b-2: steps on 2024-02-01 and 2024-02-08 have under 30 days of history.
        let early_dead: Vec<_> = dead.iter().filter(|d| d.0 == 0).map(|d| (d.1, d.2.clone())).collect();
        let id = |s: &str| Some(s.to_string());
        assert_eq!(
            early_dead,
            vec![(Reason::InsufficientHistory, id("b-2:20240201")), (Reason::InsufficientHistory, id("b-2:20240208"))]
        );
        assert_eq!(series, vec![(0, 7)], "the other steps of b-2 travel together");
        // b-3: an unknown symbol, each step a dead letter as it would be alone.
        assert_eq!(dead.iter().filter(|d| d.0 == 1 && d.1 == Reason::UnknownSymbol).count(), 5);
        // b-4: steps 30 trading days apart share no row: windows of their own.
        assert_eq!(windows.iter().filter(|w| w.0 == 2).count(), 3);
    }

    #[tokio::test]
    async fn a_request_carries_its_deadline_on_and_is_not_fetched_past_it() {
        let source = SyntheticSource::new(SyntheticConfig::default());
        let mut fetcher = Fetcher::new(Box::new(source), WindowShape { days: 30, features: 105 }, "fetched");
        let ahead = sluice_messages::now_ms() + 60_000;
        let stock = format!(
            r#"{{"kind":"stock","event_id":"s-1","symbol":"S0042","as_of":"2024-05-31","deadline_ms":{ahead}}}"#
        );
        let batch = [
            input(0, &stock, None),
            // Requested at 1 ms after the epoch (its Kafka timestamp): long past a second's age.
            input(1, r#"{"kind":"query","event_id":"q-1","text":"hi","max_age_ms":1000}"#, None),
            input(2, r#"{"kind":"query","event_id":"q-2","text":"hi"}"#, None),
        ];
        let mut seen = Vec::new();
        for output in fetcher.process(&batch).await.expect("processed") {
            seen.push(match output {
                Output::Send { source, payload, .. } => {
                    (source, codec::decode(&payload).expect("envelope").deadline_ms, None)
                }
                Output::DeadLetter { source, reason, .. } => (source, None, Some(reason)),
            });
        }
        seen.sort_by_key(|s| s.0);
        assert_eq!(seen, vec![(0, Some(ahead), None), (1, None, Some(Reason::DeadlineExceeded)), (2, None, None)]);
    }

    #[tokio::test]
    async fn with_lanes_bulk_requests_and_backfills_go_to_the_bulk_output_and_the_rest_stays_live() {
        let source = SyntheticSource::new(SyntheticConfig::default());
        let shape = WindowShape { days: 30, features: 105 };
        let mut fetcher = Fetcher::new(Box::new(source), shape, "fetched").with_bulk_output("fetched.bulk");
        let batch = [
            input(0, r#"{"kind":"stock","event_id":"s-1","symbol":"S0042","as_of":"2024-05-31"}"#, None),
            input(
                1,
                r#"{"kind":"stock","event_id":"s-2","symbol":"S0042","as_of":"2024-05-31","priority":"bulk"}"#,
                None,
            ),
            // A backfill is bulk unless it says otherwise.
            input(
                2,
                r#"{"kind":"stock","event_id":"b-1","symbol":"S0007","from":"2024-05-01","as_of":"2024-05-31","stride":5}"#,
                None,
            ),
            input(
                3,
                r#"{"kind":"stock","event_id":"b-2","symbol":"S0007","from":"2024-05-01","as_of":"2024-05-31","stride":5,"priority":"live"}"#,
                None,
            ),
            input(4, r#"{"kind":"query","event_id":"q-1","text":"hi","priority":"bulk"}"#, None),
            input(5, r#"{"kind":"query","event_id":"q-2","text":"hi"}"#, None),
        ];
        let mut routed: Vec<(usize, String)> = fetcher
            .process(&batch)
            .await
            .expect("processed")
            .into_iter()
            .map(|o| match o {
                Output::Send { source, topic, .. } => (source, topic.to_string()),
                Output::DeadLetter { detail, .. } => panic!("dead letter: {detail}"),
            })
            .collect();
        routed.sort();
        routed.dedup();
        let expected = [
            (0, "fetched"),
            (1, "fetched.bulk"),
            (2, "fetched.bulk"),
            (3, "fetched"),
            (4, "fetched.bulk"),
            (5, "fetched"),
        ];
        assert_eq!(routed, expected.map(|(s, t)| (s, t.to_string())));
        // Without lanes, priority is accepted and everything goes to the one output.
        let mut one_lane = Fetcher::new(Box::new(SyntheticSource::new(SyntheticConfig::default())), shape, "fetched");
        let outputs = one_lane.process(&batch).await.expect("processed");
        assert!(
            outputs.iter().all(|o| matches!(o, Output::Send { topic, .. } if &**topic == "fetched")),
            "{outputs:?}"
        );
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
