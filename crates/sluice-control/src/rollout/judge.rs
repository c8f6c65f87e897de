//! What a candidate version is judged on, and the decision its figures take:
//! pure and mergeable, so that every replica's tally of one rollout adds up
//! in Redis and one decision is taken from the sum.
//!
//! A [`Tally`] counts what the candidate did beside the serving version on the
//! same inputs: events compared, the candidate's errors (a failed call, a
//! non-finite answer or one outside its declared range), for stock events the
//! absolute difference of the predicted return in logarithmic buckets, for
//! queries whether the labels agreed, and both versions' model time on the
//! same batches. [`judge`] rolls back as soon as a gate cannot be met any
//! more, and promotes once `min_compared` events are in and every gate holds.

use serde::{Deserialize, Serialize};

/// Buckets of the absolute difference: bucket `i` holds differences up to
/// `DIFF_FLOOR * 10^((i + 1) / PER_DECADE)`; the first also holds smaller
/// ones (an exact match), the last larger ones.
pub const DIFF_BUCKETS: usize = 64;
const PER_DECADE: f64 = 8.0;
const DIFF_FLOOR: f64 = 1e-6;

/// The bounds a candidate must stay within.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    /// Compared events before a promotion can be decided.
    pub min_compared: u64,
    /// Stock: the p99 of |candidate - serving| predicted return, at most.
    pub max_return_diff_p99: f64,
    /// Queries: the share that got the same label from both, at least.
    pub min_label_agreement: f64,
    /// The candidate's errors over compared events, at most.
    pub max_error_rate: f64,
    /// The candidate's model time over the serving version's on the same
    /// batches, at most.
    pub max_time_ratio: f64,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            min_compared: 2_000,
            max_return_diff_p99: 0.01,
            min_label_agreement: 0.95,
            max_error_rate: 0.001,
            max_time_ratio: 1.5,
        }
    }
}

impl Gates {
    /// Its fields' names, as refusals name them.
    pub const FIELDS: [&'static str; 5] =
        ["min_compared", "max_return_diff_p99", "min_label_agreement", "max_error_rate", "max_time_ratio"];

    /// Refuses bounds no candidate could be judged by, naming the key.
    pub fn check(&self) -> Result<(), String> {
        let finite = |key: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{key}: must be a finite number >= 0, not {v}"))
            }
        };
        if self.min_compared == 0 {
            return Err("min_compared: must be at least 1".into());
        }
        finite("max_return_diff_p99", self.max_return_diff_p99)?;
        finite("max_error_rate", self.max_error_rate)?;
        finite("max_time_ratio", self.max_time_ratio)?;
        if !(0.0..=1.0).contains(&self.min_label_agreement) {
            return Err(format!("min_label_agreement: must be within 0 and 1, not {}", self.min_label_agreement));
        }
        if self.max_time_ratio < 1e-3 {
            return Err(format!("max_time_ratio: must be above 0, not {}", self.max_time_ratio));
        }
        Ok(())
    }
}

/// What the candidate did beside the serving version; one per replica,
/// added up with [`Tally::merge`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub compared: u64,
    pub errors: u64,
    /// Stock events compared, by |difference of the predicted return|.
    pub return_diff: Vec<u64>,
    /// Queries compared, and those with the same label.
    pub queries: u64,
    pub agreed: u64,
    /// Model seconds on the batches both ran.
    pub candidate_seconds: f64,
    pub serving_seconds: f64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            compared: 0,
            errors: 0,
            return_diff: vec![0; DIFF_BUCKETS],
            queries: 0,
            agreed: 0,
            candidate_seconds: 0.0,
            serving_seconds: 0.0,
        }
    }
}

/// The bucket of an absolute difference (a non-finite one is an error, not a difference).
pub fn diff_bucket(diff: f64) -> usize {
    let diff = diff.abs();
    if diff <= DIFF_FLOOR {
        return 0;
    }
    let i = ((diff / DIFF_FLOOR).log10() * PER_DECADE).ceil() as usize;
    i.saturating_sub(1).min(DIFF_BUCKETS - 1)
}

/// The upper bound of bucket `i`.
fn bucket_bound(i: usize) -> f64 {
    DIFF_FLOOR * 10f64.powf((i + 1) as f64 / PER_DECADE)
}

impl Tally {
    /// One stock event both answered.
    pub fn stock(&mut self, serving_return: f32, candidate_return: f32) {
        self.compared += 1;
        if candidate_return.is_finite() {
            self.return_diff[diff_bucket(f64::from(candidate_return) - f64::from(serving_return))] += 1;
        } else {
            self.errors += 1;
        }
    }

    /// One query both answered.
    pub fn query(&mut self, same_label: bool) {
        self.compared += 1;
        self.queries += 1;
        self.agreed += u64::from(same_label);
    }

    /// One event the candidate failed on (its call, or an invalid answer).
    pub fn error(&mut self) {
        self.compared += 1;
        self.errors += 1;
    }

    /// A batch both versions ran, with each one's model time.
    pub fn timed(&mut self, serving_seconds: f64, candidate_seconds: f64) {
        self.serving_seconds += serving_seconds;
        self.candidate_seconds += candidate_seconds;
    }

    pub fn merge(&mut self, other: &Self) {
        self.compared += other.compared;
        self.errors += other.errors;
        for (a, b) in self.return_diff.iter_mut().zip(&other.return_diff) {
            *a += b;
        }
        self.queries += other.queries;
        self.agreed += other.agreed;
        self.candidate_seconds += other.candidate_seconds;
        self.serving_seconds += other.serving_seconds;
    }

    /// The `q` quantile of the return difference, from above (the upper
    /// bound of its bucket: 1.33x the true value at most); `None` before any.
    pub fn return_diff_quantile(&self, q: f64) -> Option<f64> {
        let n: u64 = self.return_diff.iter().sum();
        if n == 0 {
            return None;
        }
        let rank = ((n as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, count) in self.return_diff.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(bucket_bound(i));
            }
        }
        Some(bucket_bound(DIFF_BUCKETS - 1))
    }
}

/// What the figures say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Not enough compared yet, and nothing exceeded.
    Continue { compared: u64, needed: u64 },
    /// Every gate held over at least `min_compared` events.
    Promote { figures: String },
    /// A gate was exceeded: which, and by what.
    RollBack { gate: String, figures: String },
}

/// Judges a tally. A gate is judged once a quarter of `min_compared` is in
/// (fewer would judge noise), except errors: those roll back as soon as there
/// are more than `max_error_rate * min_compared`, which no later success
/// could undo.
pub fn judge(gates: &Gates, tally: &Tally) -> Verdict {
    let rolled_back = |gate: &str, figures: String| Verdict::RollBack { gate: gate.into(), figures };
    let n = tally.compared;
    let allowed_errors = (gates.max_error_rate * n.max(gates.min_compared) as f64).floor() as u64;
    if tally.errors > allowed_errors {
        return rolled_back(
            "max_error_rate",
            format!("{} errors in {n} compared, over {} allowed", tally.errors, gates.max_error_rate),
        );
    }
    if n.saturating_mul(4) < gates.min_compared {
        return Verdict::Continue { compared: n, needed: gates.min_compared };
    }
    let diff = tally.return_diff_quantile(0.99);
    if let Some(p99) = diff.filter(|p| *p > gates.max_return_diff_p99) {
        return rolled_back(
            "max_return_diff_p99",
            format!("return difference p99 {p99:.3e}, over {:.3e}", gates.max_return_diff_p99),
        );
    }
    let agreement = (tally.queries > 0).then(|| tally.agreed as f64 / tally.queries as f64);
    if let Some(share) = agreement.filter(|a| *a < gates.min_label_agreement) {
        return rolled_back(
            "min_label_agreement",
            format!(
                "labels agreed on {:.1}% of {} queries, under {:.1}%",
                share * 100.0,
                tally.queries,
                gates.min_label_agreement * 100.0
            ),
        );
    }
    let ratio = (tally.serving_seconds > 0.0).then(|| tally.candidate_seconds / tally.serving_seconds);
    if let Some(ratio) = ratio.filter(|r| *r > gates.max_time_ratio) {
        return rolled_back(
            "max_time_ratio",
            format!("model time {ratio:.2}x the serving version's, over {:.2}x", gates.max_time_ratio),
        );
    }
    if n < gates.min_compared {
        return Verdict::Continue { compared: n, needed: gates.min_compared };
    }
    let mut figures = format!("{n} compared, {} errors", tally.errors);
    if let Some(p99) = diff {
        figures.push_str(&format!(", return difference p99 {p99:.3e}"));
    }
    if let Some(share) = agreement {
        figures.push_str(&format!(", labels agreed on {:.1}%", share * 100.0));
    }
    if let Some(ratio) = ratio {
        figures.push_str(&format!(", model time {ratio:.2}x"));
    }
    Verdict::Promote { figures }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gates() -> Gates {
        Gates { min_compared: 400, ..Gates::default() }
    }

    #[test]
    fn buckets_bound_each_difference_from_above_within_a_third() {
        for diff in [0.0, 1e-7, 1e-6, 3e-6, 0.004, 0.01, 0.2, 5.0] {
            let bound = bucket_bound(diff_bucket(diff));
            assert!(bound >= diff, "{diff} in a bucket up to {bound}");
            if diff > DIFF_FLOOR {
                assert!(bound <= diff * 1.34, "{diff}: {bound}");
            }
        }
        assert_eq!(diff_bucket(1e9), DIFF_BUCKETS - 1);
    }

    #[test]
    fn an_equal_candidate_is_promoted_once_enough_are_compared() {
        let mut t = Tally::default();
        for i in 0..399 {
            t.stock(0.01 * i as f32, 0.01 * i as f32);
            t.timed(0.001, 0.0011);
        }
        assert_eq!(judge(&gates(), &t), Verdict::Continue { compared: 399, needed: 400 });
        t.stock(1.0, 1.0);
        let Verdict::Promote { figures } = judge(&gates(), &t) else { panic!("{:?}", judge(&gates(), &t)) };
        assert!(figures.contains("400 compared, 0 errors") && figures.contains("1.10x"), "{figures}");
    }

    #[test]
    fn each_gate_rolls_back_and_says_by_what() {
        // Differences: 2% of events far off (p99 is among them).
        let mut t = Tally::default();
        for i in 0..100 {
            t.stock(0.1, if i % 50 == 0 { 0.5 } else { 0.1 });
        }
        let v = judge(&gates(), &t);
        assert!(matches!(&v, Verdict::RollBack { gate, .. } if gate == "max_return_diff_p99"), "{v:?}");
        // Errors: the first one past what min_compared allows, however early.
        let mut t = Tally::default();
        t.error();
        assert!(matches!(judge(&gates(), &t), Verdict::RollBack { gate, .. } if gate == "max_error_rate"));
        let mut t = Tally::default();
        t.stock(0.1, f32::NAN);
        assert_eq!(t.errors, 1, "a non-finite answer is an error");
        // Labels.
        let mut t = Tally::default();
        (0..100).for_each(|i| t.query(i % 10 != 0));
        let v = judge(&gates(), &t);
        assert!(
            matches!(&v, Verdict::RollBack { gate, figures } if gate == "min_label_agreement" && figures.contains("90.0%")),
            "{v:?}"
        );
        // Time.
        let mut t = Tally::default();
        (0..100).for_each(|_| {
            t.stock(0.1, 0.1);
            t.timed(0.001, 0.002);
        });
        let v = judge(&gates(), &t);
        assert!(matches!(&v, Verdict::RollBack { gate, .. } if gate == "max_time_ratio"), "{v:?}");
        // Too few to judge anything but errors.
        let mut t = Tally::default();
        t.stock(0.1, 0.9);
        assert!(matches!(judge(&gates(), &t), Verdict::Continue { .. }));
    }

    #[test]
    fn replicas_tallies_add_up_to_one_decision() {
        let (mut a, mut b) = (Tally::default(), Tally::default());
        (0..200).for_each(|_| a.stock(0.2, 0.2));
        (0..200).for_each(|_| b.query(true));
        assert!(matches!(judge(&gates(), &a), Verdict::Continue { .. }));
        a.merge(&b);
        assert_eq!((a.compared, a.queries), (400, 200));
        assert!(matches!(judge(&gates(), &a), Verdict::Promote { .. }));
    }

    #[test]
    fn gates_no_candidate_could_be_judged_by_are_refused_by_name() {
        assert!(Gates::default().check().is_ok());
        let bad = Gates { min_label_agreement: 1.5, ..Gates::default() };
        assert!(bad.check().expect_err("refused").starts_with("min_label_agreement"));
        let bad = Gates { max_time_ratio: f64::NAN, ..Gates::default() };
        assert!(bad.check().expect_err("refused").starts_with("max_time_ratio"));
        let bad = Gates { min_compared: 0, ..Gates::default() };
        assert!(bad.check().expect_err("refused").starts_with("min_compared"));
    }
}
