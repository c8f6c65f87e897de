//! A deterministic synthetic history source: the same symbol and day always
//! give the same row, so windows of neighbouring dates overlap exactly as they
//! would in a table, and results can be recomputed anywhere (tests, benchmarks).

use std::future::Future;
use std::pin::Pin;

use chrono::{Datelike, NaiveDate, Weekday};
use serde::{Deserialize, Serialize};
use sluice_core::BatchFailure;

use super::{
    FetchResults, HistorySource, Series, SeriesFuture, SeriesRequest, SeriesResults, WindowRequest, WindowShape,
};
use crate::StageError;

/// Which symbols and days the synthetic source knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    /// Known symbols are `S0000` .. `S{universe-1}` (zero-padded to 4 digits).
    pub universe: usize,
    /// The first trading day with history.
    pub history_start: NaiveDate,
    /// How each feature moves from one day to the next.
    pub history: SyntheticHistory,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            universe: 5000,
            history_start: NaiveDate::from_ymd_opt(2020, 1, 1).expect("a valid date"),
            history: SyntheticHistory::Noise,
        }
    }
}

/// How the synthetic features move from day to day. Both have each feature's
/// [`feature_mean`] and [`feature_std`], so the fixture models' normalisation
/// statistics hold for either.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyntheticHistory {
    /// Every day drawn afresh: the cheapest to generate, and as hard to
    /// compress as data gets.
    #[default]
    Noise,
    /// Like prices: each day is the previous one plus a small step (the sum of
    /// the last [`WALK_DAYS`] calendar days' steps, so that it stays within
    /// the statistics instead of drifting without bound). Neighbouring days
    /// differ by about a fifth of the feature's spread. For measuring what
    /// depends on the data's shape, such as compression.
    RandomWalk,
}

/// The calendar days whose steps make one day of [`SyntheticHistory::RandomWalk`].
pub const WALK_DAYS: usize = 64;

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

    /// Up to `n` trading days of `symbol` on or before `as_of`, newest first.
    fn days(&self, symbol: &str, as_of: NaiveDate, n: usize) -> Result<Vec<NaiveDate>, StageError> {
        if !self.knows(symbol) {
            return Err(StageError::UnknownSymbol(symbol.to_string()));
        }
        Ok(trading_days_back(as_of, self.config.history_start, n))
    }

    /// The window for one request.
    pub fn window(&self, request: &WindowRequest, shape: WindowShape) -> Result<Vec<f32>, StageError> {
        let days = self.days(&request.symbol, request.as_of, shape.days)?;
        if days.len() < shape.days {
            return Err(StageError::InsufficientHistory {
                symbol: request.symbol.clone(),
                as_of: request.as_of,
                have: days.len(),
                need: shape.days,
            });
        }
        Ok(rows(self.config.history, &request.symbol, &days, shape.features))
    }

    /// Up to `request.rows` days up to `request.as_of`, with their dates.
    pub fn series(&self, request: &SeriesRequest, features: usize) -> Result<Series, StageError> {
        let days = self.days(&request.symbol, request.as_of, request.rows)?;
        let values = rows(self.config.history, &request.symbol, &days, features);
        Ok(Series { dates: days.into_iter().rev().collect(), values })
    }
}

/// The rows of `symbol` on `days` (newest first), oldest first.
fn rows(history: SyntheticHistory, symbol: &str, days: &[NaiveDate], features: usize) -> Vec<f32> {
    let symbol_seed = fnv1a(symbol.as_bytes());
    let mut values = Vec::with_capacity(days.len() * features);
    match history {
        SyntheticHistory::Noise => {
            for day in days.iter().rev() {
                push_row(&mut values, symbol_seed, *day, features);
            }
        }
        SyntheticHistory::RandomWalk => push_walk_rows(&mut values, symbol_seed, days, features),
    }
    values
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

    fn fetch_series<'a>(&'a self, requests: &'a [SeriesRequest], features: usize) -> Option<SeriesFuture<'a>> {
        let results: SeriesResults = requests.iter().map(|r| self.series(r, features)).collect();
        Some(Box::pin(async move { Ok(results) }))
    }
}

/// One day's `features` values for `symbol`: what `sluice db seed` stores in
/// PostgreSQL, so that the database and the synthetic source agree.
pub fn synthetic_row(symbol: &str, day: NaiveDate, features: usize, history: SyntheticHistory) -> Vec<f32> {
    rows(history, symbol, &[day], features)
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
    let scale = 3f32.sqrt() / 65536.0;
    let steps = day_steps(symbol_seed, day).take(features);
    values.extend(steps.enumerate().map(|(f, s)| feature_mean(f) + feature_std(f) * (s as f32 * scale)));
}

/// The rows of `days` (newest first, as [`trading_days_back`] gives them),
/// oldest first, of the random walk: each is the sum of the steps of the
/// [`WALK_DAYS`] calendar days up to it. Sums are of integers, so a day's row
/// is the same whichever window it is computed for.
fn push_walk_rows(values: &mut Vec<f32>, symbol_seed: u64, days: &[NaiveDate], features: usize) {
    let (Some(&newest), Some(&oldest)) = (days.first(), days.last()) else { return };
    let first = oldest - chrono::Days::new(WALK_DAYS as u64 - 1);
    // prefix[d] holds the sum of the steps of the calendar days before first + d.
    let span = (newest - first).num_days() as usize + 1;
    let mut prefix = vec![0i64; (span + 1) * features];
    for d in 0..span {
        let steps = day_steps(symbol_seed, first + chrono::Days::new(d as u64)).take(features);
        for (f, step) in steps.enumerate() {
            prefix[(d + 1) * features + f] = prefix[d * features + f] + i64::from(step);
        }
    }
    // A step's variance is 4 * 65536^2 / 12; a day sums WALK_DAYS of them.
    let scale = 1.0 / (65536.0 * (WALK_DAYS as f64 / 3.0).sqrt());
    for day in days.iter().rev() {
        let end = (*day - first).num_days() as usize + 1;
        for f in 0..features {
            let sum = prefix[end * features + f] - prefix[(end - WALK_DAYS) * features + f];
            values.push(feature_mean(f) + feature_std(f) * (sum as f64 * scale) as f32);
        }
    }
}

/// One calendar day's integer draws, one per feature: Irwin-Hall, the sum of
/// 4 uniforms of 16 bits, centred (variance 4 * 65536^2 / 12). One hash gives
/// all four: a hash per uniform made this loop a third of the fetcher's CPU
/// in the pipeline benchmark.
fn day_steps(symbol_seed: u64, day: NaiveDate) -> impl Iterator<Item = i32> {
    let mut state = symbol_seed ^ (day.num_days_from_ce() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    std::iter::repeat_with(move || {
        state = splitmix64(state);
        (0..4).map(|i| ((state >> (16 * i)) & 0xFFFF) as i32).sum::<i32>() - 2 * 65536
    })
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
    fn a_random_walk_keeps_the_statistics_and_moves_in_small_steps() {
        let config = SyntheticConfig { history: SyntheticHistory::RandomWalk, ..SyntheticConfig::default() };
        let source = SyntheticSource::new(config);
        let friday = source.window(&request("S0001", date(2024, 5, 31)), SHAPE).expect("window");
        let monday = source.window(&request("S0001", date(2024, 6, 3)), SHAPE).expect("window");
        // Integer sums: a day's row is the same in every window that holds it,
        // and it is the row `sluice db seed` stores.
        assert_eq!(&friday[105..], &monday[..29 * 105]);
        let last = synthetic_row("S0001", date(2024, 6, 3), 105, SyntheticHistory::RandomWalk);
        assert_eq!(&monday[29 * 105..], last.as_slice());
        // Across 40 symbols and 30 days: each feature's mean and spread as
        // documented, and a day-to-day step of about a fifth of the spread
        // (sqrt(2 / WALK_DAYS) of it per calendar day) where noise has sqrt(2).
        let (mut sums, mut squares, mut step_squares, mut n, mut steps) =
            (vec![0f64; 105], vec![0f64; 105], vec![0f64; 105], 0f64, 0f64);
        for s in 0..40 {
            let w = source.window(&request(&SyntheticSource::symbol(s), date(2024, 5, 31)), SHAPE).expect("window");
            for (day, row) in w.chunks(105).enumerate() {
                for (f, v) in row.iter().enumerate() {
                    sums[f] += f64::from(*v);
                    squares[f] += f64::from(*v) * f64::from(*v);
                    if day > 0 {
                        step_squares[f] += f64::from(v - w[(day - 1) * 105 + f]).powi(2);
                    }
                }
                n += 1.0;
                steps += f64::from(u8::from(day > 0));
            }
        }
        for f in 0..105 {
            let mean = sums[f] / n;
            let std = (squares[f] / n - mean * mean).sqrt();
            let step = (step_squares[f] / steps).sqrt() / f64::from(feature_std(f));
            // Neighbouring days share most of their sum, so 1200 rows are
            // fewer independent draws than for noise: wider bounds.
            assert!(
                (mean - f64::from(feature_mean(f))).abs() < 0.5 * f64::from(feature_std(f)),
                "feature {f} mean {mean}"
            );
            assert!((std / f64::from(feature_std(f)) - 1.0).abs() < 0.35, "feature {f} std {std}");
            assert!((0.12..0.35).contains(&step), "feature {f} step {step}");
        }
    }

    #[test]
    fn unknown_symbols_and_short_history_are_refused() {
        let config = SyntheticConfig { universe: 10, history_start: date(2024, 1, 1), ..SyntheticConfig::default() };
        let source = SyntheticSource::new(config);
        let unknown = source.window(&request("S0010", date(2024, 5, 31)), SHAPE).expect_err("unknown");
        assert_eq!(unknown.reason(), "unknown_symbol");
        let short = source.window(&request("S0001", date(2024, 1, 20)), SHAPE).expect_err("short");
        assert_eq!(short.reason(), "insufficient_history");
        assert!(short.to_string().contains("has 15 trading days"), "{short}");
    }
}
