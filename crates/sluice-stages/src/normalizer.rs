//! The normalizer: per-feature z-scores with the statistics shipped in the
//! stock model's metadata (non-finite values, before or after, are dead
//! letters), and the query model's tokenizer for text queries (empty or
//! oversized texts are dead letters). Each kind goes to its own topic, where
//! its own inferrer reads it.

use std::sync::Arc;

use sluice_core::{BatchFailure, Incoming, Output, Stage};
use sluice_messages::dead_letter::Reason;
use sluice_messages::envelope::{Payload, QueryTokens, StockWindow, WindowPrecision};
use sluice_model::QueryTokenizer;
use sluice_model::metadata::Normalization;

use crate::StageError;
use crate::common::{dead_letter, decode, forward};

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
        let features = self.mean.len();
        let (rows, cols) = (window.rows as usize, window.cols as usize);
        if rows != self.days || cols != features || window.values.len() != rows * cols {
            return Err(StageError::WindowShape { rows, cols, want_rows: self.days, want_cols: features });
        }
        let mut values = Vec::with_capacity(window.values.len());
        for (day, row) in window.values.chunks_exact(features).enumerate() {
            for (feature, ((x, mean), inv_std)) in row.iter().zip(&self.mean).zip(&self.inv_std).enumerate() {
                if !x.is_finite() {
                    return Err(StageError::NonFiniteInput { what: "input", day, feature });
                }
                let z = (x - mean) * inv_std;
                if !z.is_finite() {
                    return Err(StageError::NonFiniteInput { what: "z-score", day, feature });
                }
                values.push(z);
            }
        }
        self.precision.round(&mut values);
        let mut normalized = StockWindow::new(&window.symbol, window.as_of, window.rows, window.cols, values);
        normalized.precision = self.precision;
        Ok(normalized)
    }
}

impl Stage for Normalizer {
    fn name(&self) -> &'static str {
        "normalizer"
    }

    fn dead_letter_reasons(&self) -> &'static [Reason] {
        Self::DEAD_LETTER_REASONS
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        Ok(batch
            .iter()
            .enumerate()
            .map(|(i, input)| {
                let (header, payload) = match decode(i, input) {
                    Ok(envelope) => envelope.into_parts(),
                    Err(dead) => return dead,
                };
                let result = match (&payload, &self.queries) {
                    (Payload::Fetched(window), _) => {
                        self.normalize(window).map(|w| (&self.output, Payload::Normalized(w)))
                    }
                    (Payload::Query(query), Some(queries)) => {
                        Self::tokenize(queries, &query.text).map(|t| (&queries.output, Payload::Tokens(t)))
                    }
                    (Payload::Query(_), None) => Err(StageError::UnsupportedKind {
                        kind: "query",
                        why: "no query model is configured (normalizer.queries is off)",
                    }),
                    (other, _) => {
                        Err(StageError::UnexpectedPayload { expected: "fetched or query", got: other.kind() })
                    }
                };
                match result {
                    Ok((topic, payload)) => forward(i, input, topic, &header, payload),
                    Err(e) => dead_letter(i, &e, Some(header.event_id)),
                }
            })
            .collect())
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
