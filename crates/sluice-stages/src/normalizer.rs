//! The normalizer: per-feature z-scores with the statistics shipped in the
//! stock model's metadata (non-finite values, before or after, are dead
//! letters), and the query model's tokenizer for text queries (empty or
//! oversized texts are dead letters). Each kind goes to its own topic, where
//! its own inferrer reads it.

use std::sync::Arc;

use sluice_core::{BatchFailure, Incoming, Output, Stage};
use sluice_messages::dead_letter::Reason;
use sluice_messages::envelope::{Header, Payload, QueryTokens, SeriesStep, StockSeries, StockWindow, WindowPrecision};
use sluice_model::QueryTokenizer;
use sluice_model::metadata::Normalization;

use crate::StageError;
use crate::common::{Cut, dead_letter, dead_letter_of, decode_or_dead, forward, forward_several};

/// The normalizer stage.
#[derive(Debug)]
pub struct Normalizer {
    mean: Vec<f32>,
    /// 1 / std, so the hot loop multiplies.
    inv_std: Vec<f32>,
    days: usize,
    /// The format normalised windows travel in.
    precision: WindowPrecision,
    output: Arc<str>,
    queries: Option<Queries>,
}

/// How text queries are tokenized, and where they go.
#[derive(Debug)]
pub struct Queries {
    pub tokenizer: QueryTokenizer,
    /// Longer texts are dead letters (`text_too_long`).
    pub max_bytes: usize,
    pub output: Arc<str>,
}

impl Normalizer {
    /// The dead-letter reasons this stage gives (docs/instrumentation.md).
    pub const DEAD_LETTER_REASONS: &[Reason] = &[
        Reason::UnknownEnvelopeVersion,
        Reason::UndecodableEnvelope,
        Reason::UnexpectedPayload,
        Reason::InvalidWindowShape,
        Reason::NonFiniteInput,
        Reason::EmptyText,
        Reason::TextTooLong,
        Reason::UnsupportedKind,
        Reason::DeadlineExceeded,
    ];

    /// `days` and the statistics' length fix the window shape it accepts.
    pub fn new(stats: &Normalization, days: usize, output_topic: &str) -> Self {
        Self {
            mean: stats.mean.clone(),
            inv_std: stats.std.iter().map(|s| 1.0 / s).collect(),
            days,
            precision: WindowPrecision::Fp32,
            output: output_topic.into(),
            queries: None,
        }
    }

    /// Sends windows on in `precision` (rounded to nearest, ties to even).
    pub fn with_precision(mut self, precision: WindowPrecision) -> Self {
        self.precision = precision;
        self
    }

    /// Also tokenizes text queries, onto their own topic.
    pub fn with_queries(mut self, tokenizer: QueryTokenizer, max_bytes: usize, output_topic: &str) -> Self {
        self.queries = Some(Queries { tokenizer, max_bytes, output: output_topic.into() });
        self
    }

    /// A query's tokens, refusing empty and oversized texts.
    pub fn tokenize(queries: &Queries, text: &str) -> Result<QueryTokens, StageError> {
        if text.trim().is_empty() {
            return Err(StageError::EmptyText);
        }
        if text.len() > queries.max_bytes {
            return Err(StageError::TextTooLong { bytes: text.len(), max: queries.max_bytes });
        }
        let ids = queries.tokenizer.encode(text)?;
        Ok(QueryTokens { text: text.to_string(), ids })
    }

    /// z-scores a window, refusing wrong shapes and non-finite values.
    pub fn normalize(&self, window: &StockWindow) -> Result<StockWindow, StageError> {
        let (rows, cols) = (window.rows as usize, window.cols as usize);
        if rows != self.days {
            return Err(StageError::WindowShape { rows, cols, want_rows: self.days, want_cols: self.mean.len() });
        }
        let (normalized, bad) = self.z_scores(window)?;
        match bad.first() {
            Some(bad) => Err(bad.error(0)),
            None => Ok(normalized),
        }
    }

    /// z-scores every row of `history` (any number of rows of the right
    /// width), with the first non-finite value of each row that has one,
    /// by row.
    fn z_scores(&self, history: &StockWindow) -> Result<(StockWindow, Vec<NonFinite>), StageError> {
        let features = self.mean.len();
        let (rows, cols) = (history.rows as usize, history.cols as usize);
        if cols != features || history.values.len() != rows * cols {
            return Err(StageError::WindowShape { rows, cols, want_rows: self.days, want_cols: features });
        }
        let mut values = Vec::with_capacity(history.values.len());
        let mut bad = Vec::new();
        for (day, row) in history.values.chunks_exact(features).enumerate() {
            let mut first_bad = None;
            for (feature, ((x, mean), inv_std)) in row.iter().zip(&self.mean).zip(&self.inv_std).enumerate() {
                let z = (x - mean) * inv_std;
                if first_bad.is_none() && !z.is_finite() {
                    let what = if x.is_finite() { "z-score" } else { "input" };
                    first_bad = Some(NonFinite { what, day, feature });
                }
                values.push(z);
            }
            bad.extend(first_bad);
        }
        self.precision.round(&mut values);
        let mut normalized = StockWindow::new(&history.symbol, history.as_of, history.rows, history.cols, values);
        normalized.precision = self.precision;
        Ok((normalized, bad))
    }

    /// z-scores a backfill's series: each step whose window has a non-finite
    /// value is a dead letter of its own (keeping its fetched window, to
    /// replay alone), and the rest go on together.
    fn normalize_series(&self, source: usize, input: &Incoming, header: &Header, series: &StockSeries) -> Vec<Output> {
        let (history, bad) = match self.z_scores(&series.history) {
            Ok(z) => z,
            Err(e) => {
                return series.steps.iter().map(|step| step_dead_letter(source, &e, header, series, step)).collect();
            }
        };
        let mut outputs = Vec::new();
        let mut steps = Vec::with_capacity(series.steps.len());
        for step in &series.steps {
            let (end, window) = (step.end_row as usize, series.window as usize);
            if window != self.days || series.step_values(step).is_none() {
                let e = StageError::WindowShape {
                    rows: window,
                    cols: history.cols as usize,
                    want_rows: self.days,
                    want_cols: self.mean.len(),
                };
                outputs.push(step_dead_letter(source, &e, header, series, step));
                continue;
            }
            // The first bad row within the window, its day counted from the window's start.
            let first = end + 1 - window;
            match bad.iter().find(|b| (first..=end).contains(&b.day)) {
                Some(b) => outputs.push(step_dead_letter(source, &b.error(first), header, series, step)),
                None => steps.push(step.clone()),
            }
        }
        if !steps.is_empty() {
            let normalized = StockSeries { history, window: series.window, steps };
            outputs.push(forward_several(source, input, &self.output, header, Payload::NormalizedSeries(normalized)));
        }
        outputs
    }
}

/// The first non-finite value of a row: before z-scoring (`input`) or after.
#[derive(Debug)]
struct NonFinite {
    what: &'static str,
    day: usize,
    feature: usize,
}

impl NonFinite {
    /// Its error, the day counted from row `first`.
    fn error(&self, first: usize) -> StageError {
        StageError::NonFiniteInput { what: self.what, day: self.day - first, feature: self.feature }
    }
}

/// A dead letter for one step of a fetched series, with its own window to replay.
fn step_dead_letter(source: usize, e: &StageError, header: &Header, series: &StockSeries, step: &SeriesStep) -> Output {
    dead_letter_of(source, e, &header.of_event(&step.event_id), series.step_window(step).map(Payload::Fetched))
}

impl Stage for Normalizer {
    fn name(&self) -> &'static str {
        "normalizer"
    }

    fn dead_letter_reasons(&self) -> &'static [Reason] {
        Self::DEAD_LETTER_REASONS
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        let mut outputs = Vec::with_capacity(batch.len());
        let cut = Cut::now(0);
        for (i, input) in batch.iter().enumerate() {
            let Some((header, payload)) = decode_or_dead(i, input, &mut outputs, "normalizer", cut) else { continue };
            if let Payload::FetchedSeries(series) = &payload {
                outputs.extend(self.normalize_series(i, input, &header, series));
                continue;
            }
            outputs.push(self.normalize_one(i, input, &header, &payload));
        }
        Ok(outputs)
    }
}

impl Normalizer {
    /// A window's or a query's output.
    fn normalize_one(&self, i: usize, input: &Incoming, header: &Header, payload: &Payload) -> Output {
        let result = match (payload, &self.queries) {
            (Payload::Fetched(window), _) => self.normalize(window).map(|w| (&self.output, Payload::Normalized(w))),
            (Payload::Query(query), Some(queries)) => {
                Self::tokenize(queries, &query.text).map(|t| (&queries.output, Payload::Tokens(t)))
            }
            (Payload::Query(_), None) => Err(StageError::UnsupportedKind {
                kind: "query",
                why: "no query model is configured (normalizer.queries is off)",
            }),
            (other, _) => Err(StageError::UnexpectedPayload { expected: "fetched or query", got: other.kind() }),
        };
        match result {
            Ok((topic, payload)) => forward(i, input, topic, header, payload),
            Err(e) => dead_letter(i, &e, Some(header.event_id.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn normalizer() -> Normalizer {
        Normalizer::new(&Normalization { mean: vec![1.0, -2.0], std: vec![2.0, 0.5] }, 2, "out")
    }

    fn window(values: Vec<f32>) -> StockWindow {
        StockWindow::new("S0001", NaiveDate::from_ymd_opt(2024, 1, 2).expect("date"), 2, 2, values)
    }

    #[test]
    fn z_scores_each_feature() {
        let out = normalizer().normalize(&window(vec![1.0, -2.0, 5.0, -1.0])).expect("normalised");
        assert_eq!(out.values, vec![0.0, 0.0, 2.0, 2.0]);
        assert_eq!((out.rows, out.cols, out.symbol.as_str()), (2, 2, "S0001"));
    }

    #[test]
    fn windows_travel_in_bf16_or_fp16_rounded_to_nearest_even() {
        // z = (1 + 2/3 - 1) / 2 = 1/3 (in f32: 0.33333337), which neither format holds.
        let x = vec![1.0 + 2.0 / 3.0, -2.0, 1.0, -2.0];
        let exact = normalizer().normalize(&window(x.clone())).expect("normalised");
        assert_eq!(exact.precision, WindowPrecision::Fp32);
        assert!((exact.values[0] - 1.0 / 3.0).abs() < 1e-6, "{}", exact.values[0]);
        // bf16 0x3EAB (0.333984375) and fp16 0x3555 (0.333251953125), as f32
        // bits: 1/3 rounded to nearest, as libtorch converts it.
        let (bf16, fp16) = (f32::from_bits(0x3EAB_0000), f32::from_bits(0x3EAA_A000));
        for (precision, third) in [(WindowPrecision::Bf16, bf16), (WindowPrecision::Fp16, fp16)] {
            let out = normalizer().with_precision(precision).normalize(&window(x.clone())).expect("normalised");
            assert_eq!(out.precision, precision);
            assert_eq!(out.values, vec![third, 0.0, 0.0, 0.0], "{precision:?}");
        }
    }

    #[tokio::test]
    async fn a_series_step_with_a_non_finite_value_is_a_dead_letter_of_its_own() {
        use sluice_messages::codec;
        use sluice_messages::envelope::Envelope;
        // Four days of two features; windows of two days ending on days 1, 2 and 3; day 2 holds a NaN.
        let values = vec![1.0, -2.0, 3.0, -1.0, f32::NAN, 0.0, 5.0, -3.0];
        let history = StockWindow::new("S0001", NaiveDate::from_ymd_opt(2024, 1, 5).expect("date"), 4, 2, values);
        let step = |end_row: u32, day: u32| SeriesStep {
            event_id: format!("b:{day}"),
            as_of: NaiveDate::from_ymd_opt(2024, 1, day).expect("date"),
            end_row,
        };
        let series = StockSeries { history, window: 2, steps: vec![step(1, 3), step(2, 4), step(3, 5)] };
        let input =
            Incoming::new("fetched", 0, 7, codec::encode(&Envelope::new("b", Payload::FetchedSeries(series.clone()))));
        let outputs = normalizer().process(std::slice::from_ref(&input)).await.expect("processed");
        let mut dead = Vec::new();
        let mut sent = Vec::new();
        for output in outputs {
            match output {
                Output::DeadLetter { reason, event_id, original, detail, .. } => {
                    let original = codec::decode(&original.expect("the step's own window")).expect("envelope");
                    dead.push((reason, event_id, detail, original));
                }
                Output::Send { payload, .. } => sent.push(codec::decode(&payload).expect("envelope")),
            }
        }
        assert_eq!(dead.len(), 2);
        for ((reason, event_id, detail, original), (step, day)) in
            dead.iter().zip([(&series.steps[1], 1), (&series.steps[2], 0)])
        {
            assert_eq!((*reason, event_id.as_deref()), (Reason::NonFiniteInput, Some(step.event_id.as_str())));
            assert_eq!(
                detail,
                &format!("non-finite input at day {day}, feature 0"),
                "counted within the step's window"
            );
            // Replayed alone, the dead letter is that step's window.
            assert_eq!(original.event_id, step.event_id);
            let Payload::Fetched(window) = &original.payload else { panic!("{}", original.payload.kind()) };
            // (Compared as text: the window holds the NaN, and NaN != NaN.)
            assert_eq!(format!("{window:?}"), format!("{:?}", series.step_window(step).expect("held")));
        }
        let [envelope] = &sent[..] else { panic!("{} sent", sent.len()) };
        let Payload::NormalizedSeries(normalized) = &envelope.payload else { panic!("{}", envelope.payload.kind()) };
        assert_eq!(normalized.steps, vec![series.steps[0].clone()]);
        let alone = normalizer().normalize(&series.step_window(&series.steps[0]).expect("held")).expect("normalised");
        assert_eq!(normalized.step_window(&normalized.steps[0]), Some(alone), "the same z-scores as a window alone");
    }

    #[test]
    fn refuses_non_finite_values_and_wrong_shapes() {
        let n = normalizer();
        let nan = n.normalize(&window(vec![1.0, f32::NAN, 0.0, 0.0])).expect_err("NaN");
        assert_eq!(
            (nan.reason().as_str(), nan.to_string().as_str()),
            ("non_finite_input", "non-finite input at day 0, feature 1")
        );
        let inf = n.normalize(&window(vec![0.0, 0.0, f32::INFINITY, 0.0])).expect_err("inf");
        assert_eq!(inf.reason(), "non_finite_input");
        let overflow = n.normalize(&window(vec![0.0, f32::MAX, 0.0, 0.0])).expect_err("overflow");
        assert!(overflow.to_string().contains("z-score"), "{overflow}");
        let mut short = window(vec![0.0; 2]);
        short.rows = 1;
        assert_eq!(n.normalize(&short).expect_err("shape").reason(), "invalid_window_shape");
    }
}
