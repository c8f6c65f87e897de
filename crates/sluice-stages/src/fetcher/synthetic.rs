//! A deterministic synthetic history source: the same symbol and day always
//! give the same row, so windows of neighbouring dates overlap exactly as they
//! would in a table, and results can be recomputed anywhere (tests, benchmarks).

use std::future::Future;
use std::pin::Pin;

use chrono::{Datelike, NaiveDate, Weekday};
use serde::{Deserialize, Serialize};
use sluice_core::BatchFailure;

use super::{FetchResults, HistorySource, WindowRequest, WindowShape};
use crate::StageError;

/// Which symbols and days the synthetic source knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    /// Known symbols are `S0000` .. `S{universe-1}` (zero-padded to 4 digits).
    pub universe: usize,
    /// The first trading day with history.
    pub history_start: NaiveDate,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self { universe: 5000, history_start: NaiveDate::from_ymd_opt(2020, 1, 1).expect("a valid date") }
    }
}

/// Feature `f`'s mean in the synthetic history. The export script of the
/// fixture model uses the same formula for its normalisation statistics.
pub fn feature_mean(f: usize) -> f32 {
    ((f % 7) as f32 - 3.0) * 0.5
}

/// Feature `f`'s standard deviation in the synthetic history (see [`feature_mean`]).
pub fn feature_std(f: usize) -> f32 {
    1.0 + (f % 5) as f32 * 0.25
}

/// The synthetic source.
#[derive(Debug, Clone)]
pub struct SyntheticSource {
    config: SyntheticConfig,
}

impl SyntheticSource {
    pub fn new(config: SyntheticConfig) -> Self {
        Self { config }
    }

    /// The name of known symbol `i`.
    pub fn symbol(i: usize) -> String {
        format!("S{i:04}")
    }

    fn knows(&self, symbol: &str) -> bool {
        symbol
            .strip_prefix('S')
            .is_some_and(|digits| digits.len() == 4 && digits.parse::<usize>().is_ok_and(|i| i < self.config.universe))
    }

    /// The window for one request.
    pub fn window(&self, request: &WindowRequest, shape: WindowShape) -> Result<Vec<f32>, StageError> {
        if !self.knows(&request.symbol) {
            return Err(StageError::UnknownSymbol(request.symbol.clone()));
        }
        let days = trading_days_back(request.as_of, self.config.history_start, shape.days);
        if days.len() < shape.days {
            return Err(StageError::InsufficientHistory {
                symbol: request.symbol.clone(),
                as_of: request.as_of,
                have: days.len(),
                need: shape.days,
            });
        }
        let symbol_seed = fnv1a(request.symbol.as_bytes());
        let mut values = Vec::with_capacity(shape.days * shape.features);
        for day in days.iter().rev() {
            push_row(&mut values, symbol_seed, *day, shape.features);
        }
        Ok(values)
    }
}

impl HistorySource for SyntheticSource {
    fn name(&self) -> &'static str {
        "synthetic"
    }

    fn fetch<'a>(
        &'a self,
        requests: &'a [WindowRequest],
        shape: WindowShape,
    ) -> Pin<Box<dyn Future<Output = Result<FetchResults, BatchFailure>> + Send + 'a>> {
        Box::pin(async move { Ok(requests.iter().map(|r| self.window(r, shape)).collect()) })
    }
}

/// One day's `features` values for `symbol`: what `sluice db seed` stores in
/// PostgreSQL, so that the database and the synthetic source agree.
pub fn synthetic_row(symbol: &str, day: NaiveDate, features: usize) -> Vec<f32> {
    let mut row = Vec::with_capacity(features);
    push_row(&mut row, fnv1a(symbol.as_bytes()), day, features);
    row
}

/// Up to `n` weekdays on or before `as_of` and on or after `start`, newest first.
pub fn trading_days_back(as_of: NaiveDate, start: NaiveDate, n: usize) -> Vec<NaiveDate> {
    let mut days = Vec::with_capacity(n);
    let mut day = as_of;
    while days.len() < n && day >= start {
        if !matches!(day.weekday(), Weekday::Sat | Weekday::Sun) {
            days.push(day);
        }
        match day.pred_opt() {
            Some(previous) => day = previous,
            None => break,
        }
    }
    days
}

/// One day's features: per-feature mean and spread with a bell-shaped noise.
fn push_row(values: &mut Vec<f32>, symbol_seed: u64, day: NaiveDate, features: usize) {
    let mut state = symbol_seed ^ (day.num_days_from_ce() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for f in 0..features {
        // Irwin-Hall: the sum of 4 uniforms, centred and scaled to unit variance.
        // One hash gives all four (16 bits each): a hash per uniform made this
        // loop a third of the fetcher's CPU in the pipeline benchmark.
        state = splitmix64(state);
        let sum = (0..4).map(|i| ((state >> (16 * i)) & 0xFFFF) as f32).sum::<f32>() / 65536.0;
        let noise = (sum - 2.0) * 3f32.sqrt();
        values.push(feature_mean(f) + feature_std(f) * noise);
    }
}

fn splitmix64(state: u64) -> u64 {
    let mut z = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01B3))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: WindowShape = WindowShape { days: 30, features: 105 };

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("date")
    }

    fn request(symbol: &str, as_of: NaiveDate) -> WindowRequest {
        WindowRequest { symbol: symbol.into(), as_of }
    }

    #[test]
    fn same_symbol_and_date_give_the_same_window() {
        let source = SyntheticSource::new(SyntheticConfig::default());
        let a = source.window(&request("S0001", date(2024, 5, 31)), SHAPE).expect("window");
        let b = source.window(&request("S0001", date(2024, 5, 31)), SHAPE).expect("window");
        let c = source.window(&request("S0002", date(2024, 5, 31)), SHAPE).expect("window");
        assert_eq!(a.len(), 30 * 105);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn neighbouring_dates_overlap_like_a_table() {
        let source = SyntheticSource::new(SyntheticConfig::default());
        // Friday 2024-05-31 and Monday 2024-06-03: one trading day apart.
        let friday = source.window(&request("S0001", date(2024, 5, 31)), SHAPE).expect("window");
        let monday = source.window(&request("S0001", date(2024, 6, 3)), SHAPE).expect("window");
        assert_eq!(&friday[105..], &monday[..29 * 105]);
    }

    #[test]
    fn statistics_match_the_documented_formulas() {
        let source = SyntheticSource::new(SyntheticConfig::default());
        let mut sums = vec![0f64; 105];
        let mut squares = vec![0f64; 105];
        let mut n = 0f64;
        for s in 0..40 {
            let w = source.window(&request(&SyntheticSource::symbol(s), date(2024, 5, 31)), SHAPE).expect("window");
            for row in w.chunks(105) {
                for (f, v) in row.iter().enumerate() {
                    sums[f] += f64::from(*v);
                    squares[f] += f64::from(*v) * f64::from(*v);
                }
                n += 1.0;
            }
        }
        for f in [0, 3, 50, 104] {
            let mean = sums[f] / n;
            let std = (squares[f] / n - mean * mean).sqrt();
            assert!((mean - f64::from(feature_mean(f))).abs() < 0.15, "feature {f} mean {mean}");
            assert!((std / f64::from(feature_std(f)) - 1.0).abs() < 0.1, "feature {f} std {std}");
        }
    }

    #[test]
    fn unknown_symbols_and_short_history_are_refused() {
        let source = SyntheticSource::new(SyntheticConfig { universe: 10, history_start: date(2024, 1, 1) });
        let unknown = source.window(&request("S0010", date(2024, 5, 31)), SHAPE).expect_err("unknown");
        assert_eq!(unknown.reason(), "unknown_symbol");
        let short = source.window(&request("S0001", date(2024, 1, 20)), SHAPE).expect_err("short");
        assert_eq!(short.reason(), "insufficient_history");
        assert!(short.to_string().contains("has 15 trading days"), "{short}");
    }
}
