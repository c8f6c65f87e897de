//! Prometheus' text format, read back from a stage's `/metrics`.

use std::collections::BTreeMap;

/// One series: its name and labels.
pub type Series = (String, BTreeMap<String, String>);

/// Every series of a rendering, with its value (comments and blank lines skipped).
pub fn series(text: &str) -> BTreeMap<Series, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let Some((key, value)) = line.rsplit_once(' ') else { continue };
        let (name, labels) = key.split_once('{').unwrap_or((key, "}"));
        let labels = labels
            .trim_end_matches('}')
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        out.insert((name.to_string(), labels), value.parse().unwrap_or(f64::NAN));
    }
    out
}

/// The sum of the series named `name` whose labels include all of `labels`.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    series(text)
        .into_iter()
        .filter(|((n, l), _)| n == name && labels.iter().all(|(k, v)| l.get(*k).is_some_and(|x| x == v)))
        .map(|(_, value)| value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_series_with_and_without_labels() {
        let text = "# TYPE x counter\nx{stage=\"a\",reason=\"r\"} 2\nx{stage=\"b\"} 3\ny 1.5\n";
        assert_eq!(sum(text, "x", &[]), 5.0);
        assert_eq!(sum(text, "x", &[("stage", "a")]), 2.0);
        assert_eq!(sum(text, "y", &[]), 1.5);
        assert_eq!(series(text).len(), 3);
    }
}
