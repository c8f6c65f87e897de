//! The Grafana dashboard and the Prometheus alerting rules, checked against
//! docs/instrumentation.md's metrics table: every query parses as PromQL and
//! names documented metrics and only their labels (read from the parsed
//! expression), the dashboard shows what an operator needs, and every alert
//! has a severity, its annotations and a runbook section in
//! docs/operations.md. Every check is shown to fail on a file broken on purpose.
//! promtool (Prometheus' own) checks the rules, and its unit tests
//! (`deploy/prometheus/alerts.test.yml`) show every alert firing on the series
//! it watches and silent on healthy ones.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::Command;

use serde_json::{Value, json};

#[allow(dead_code, reason = "the Kubernetes and Compose checks use the rest")]
mod deployment;
use deployment::{assert_no_errors, read_one_yaml, repo_root};

/// A documented metric: its type and labels (docs/instrumentation.md).
#[derive(Debug, Clone)]
struct Metric {
    kind: String,
    labels: BTreeSet<String>,
}

/// What the pipeline dashboard must show.
const DASHBOARD_MUST_SHOW: [&str; 11] = [
    "sluice_stage_events_in_total",
    "sluice_stage_events_out_total",
    "sluice_stage_dead_letters_total",
    "sluice_stage_batch_size",
    "sluice_stage_batch_wait_seconds",
    "sluice_model_inference_seconds",
    "sluice_cache_hits_total",
    "sluice_cache_misses_total",
    "sluice_kafka_consumer_lag",
    "sluice_overrides_applied_total",
    "sluice_overrides_refused_total",
];

/// The metrics table of docs/instrumentation.md.
fn documented_metrics() -> BTreeMap<String, Metric> {
    let text = fs::read_to_string(repo_root().join("docs/instrumentation.md")).expect("docs/instrumentation.md");
    let mut metrics = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `sluice_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, names, kind, labels, ..] = cells.as_slice() else { continue };
        // "tier (`lru`, `redis`)" -> tier: drop the parenthesised values.
        let mut plain = String::new();
        let mut depth = 0;
        for ch in labels.chars() {
            match ch {
                '(' => depth += 1,
                ')' => depth -= 1,
                c if depth == 0 => plain.push(c),
                _ => {}
            }
        }
        let labels: BTreeSet<String> =
            plain.split(',').map(|l| l.trim().trim_matches('`').to_string()).filter(|l| !l.is_empty()).collect();
        for name in names.split(',').map(|n| n.trim().trim_matches('`')) {
            metrics.insert(name.to_string(), Metric { kind: kind.to_string(), labels: labels.clone() });
        }
    }
    metrics
}

/// The `sluice_` metric names and the label names (grouping, vector matching
/// and the matchers of `sluice_` selectors) of a PromQL expression, read from
/// promql-parser's syntax tree. Grafana's `$__rate_interval`, the one template
/// variable the dashboard's queries use, stands for a duration.
fn promql_names(expr: &str) -> Result<(Vec<String>, Vec<String>), String> {
    use promql_parser::label::Matchers;
    use promql_parser::parser::{self, Expr, VectorSelector};

    fn selector(vs: &VectorSelector, metrics: &mut Vec<String>, labels: &mut Vec<String>) {
        let Matchers { matchers, or_matchers } = &vs.matchers;
        let name = vs.name.clone().or_else(|| matchers.iter().find(|m| m.name == "__name__").map(|m| m.value.clone()));
        let Some(name) = name.filter(|n| n.starts_with("sluice_")) else { return };
        metrics.push(name);
        let matchers = matchers.iter().chain(or_matchers.iter().flatten());
        labels.extend(matchers.filter(|m| m.name != "__name__").map(|m| m.name.clone()));
    }
    fn walk(expr: &Expr, metrics: &mut Vec<String>, labels: &mut Vec<String>) {
        match expr {
            Expr::Aggregate(a) => {
                labels.extend(a.modifier.iter().flat_map(|m| m.labels().labels.iter().cloned()));
                walk(&a.expr, metrics, labels);
                a.param.iter().for_each(|p| walk(p, metrics, labels));
            }
            Expr::Binary(b) => {
                if let Some(m) = &b.modifier {
                    labels.extend(m.matching.iter().flat_map(|l| l.labels().labels.iter().cloned()));
                    labels.extend(m.card.labels().into_iter().flat_map(|l| l.labels.iter().cloned()));
                }
                walk(&b.lhs, metrics, labels);
                walk(&b.rhs, metrics, labels);
            }
            Expr::Unary(u) => walk(&u.expr, metrics, labels),
            Expr::Paren(p) => walk(&p.expr, metrics, labels),
            Expr::Subquery(s) => walk(&s.expr, metrics, labels),
            Expr::Call(c) => c.args.args.iter().for_each(|a| walk(a, metrics, labels)),
            Expr::VectorSelector(vs) => selector(vs, metrics, labels),
            Expr::MatrixSelector(ms) => selector(&ms.vs, metrics, labels),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
        }
    }
    let parsed = parser::parse(&expr.replace("$__rate_interval", "5m"))?;
    let (mut metrics, mut labels) = (Vec::new(), Vec::new());
    walk(&parsed, &mut metrics, &mut labels);
    Ok((metrics, labels))
}

/// The documented metrics a query names (a histogram's `_bucket`, `_sum` and
/// `_count` series as the histogram), and its errors: a metric that is not
/// documented, a histogram queried as such, a label none of its metrics has.
fn check_query(expr: &str, metrics: &BTreeMap<String, Metric>) -> (BTreeSet<String>, Vec<String>) {
    let mut used = BTreeSet::new();
    let (names, labels) = match promql_names(expr) {
        Ok(names) => names,
        Err(e) => return (used, vec![format!("the expression does not parse: {e}")]),
    };
    let mut errors = Vec::new();
    let mut allowed: BTreeSet<String> = ["le".to_string()].into();
    for name in names {
        let histogram_series = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            name.strip_suffix(suffix).filter(|base| metrics.get(*base).is_some_and(|m| m.kind == "histogram"))
        });
        let base = histogram_series.unwrap_or(&name).to_string();
        match metrics.get(&base) {
            Some(metric) if metric.kind == "histogram" && histogram_series.is_none() => {
                errors.push(format!("{name} is a histogram; query its _bucket, _sum or _count"))
            }
            Some(metric) => allowed.extend(metric.labels.iter().cloned()),
            None => errors.push(format!("{name} is not in docs/instrumentation.md")),
        }
        used.insert(base);
    }
    for label in labels {
        if !allowed.contains(&label) {
            errors.push(format!("label {label} is not one of {allowed:?}"));
        }
    }
    (used, errors)
}

/// Every query names documented metrics and only their labels (see
/// [`check_query`]); the dashboard shows what an operator needs; panels use
/// the dashboard's data-source variable.
fn check_dashboard(dashboard: &Value, metrics: &BTreeMap<String, Metric>) -> Vec<String> {
    let mut errors = Vec::new();
    let variable = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus");
    let Some(variable) = variable else {
        return vec!["dashboard: no Prometheus data-source variable".into()];
    };
    let source = format!("${{{}}}", variable["name"].as_str().unwrap_or_default());
    let mut used = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("?");
        if !ids.insert(panel["id"].as_i64().unwrap_or(-1)) {
            errors.push(format!("dashboard: panel {title:?} repeats id {}", panel["id"]));
        }
        if panel["gridPos"]["w"].as_i64().is_none() {
            errors.push(format!("dashboard: panel {title:?} has no gridPos"));
        }
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
        if targets.is_empty() {
            errors.push(format!("dashboard: panel {title:?} has no query"));
        }
        if panel["datasource"]["uid"] != source.as_str() {
            errors.push(format!("dashboard: panel {title:?} must use the data source {source}"));
        }
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            let (names, query_errors) = check_query(expr, metrics);
            if names.is_empty() {
                errors.push(format!("dashboard: panel {title:?}: {expr:?} names no sluice_ metric"));
            }
            errors.extend(query_errors.into_iter().map(|e| format!("dashboard: panel {title:?}: {e}")));
            used.extend(names);
        }
    }
    for metric in DASHBOARD_MUST_SHOW {
        if !used.contains(metric) {
            errors.push(format!("dashboard: no panel shows {metric}"));
        }
    }
    errors
}

fn dashboard() -> Value {
    let path = repo_root().join("deploy/grafana/dashboards/sluice.json");
    let text = fs::read_to_string(&path).expect("the dashboard");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_dashboard_shows_documented_metrics() {
    let metrics = documented_metrics();
    assert!(metrics.len() >= 30, "docs/instrumentation.md's table was not read ({} metrics)", metrics.len());
    assert_eq!(metrics["sluice_cache_hits_total"].labels, ["tier".to_string()].into());
    assert_eq!(metrics["sluice_cache_bytes"].kind, "gauge");
    let dashboard = dashboard();
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string(), "the dashboard needs a uid and a title");
    assert_no_errors("deploy/grafana/dashboards/sluice.json", &check_dashboard(&dashboard, &metrics));
}

#[test]
fn the_dashboard_check_refuses_unknown_metrics_and_labels() {
    let (names, labels) = promql_names(
        r#"histogram_quantile(0.99, sum by (stage, le) (rate(sluice_stage_batch_size_bucket{stage="inferrer", x=~"a,b"}[$__rate_interval])))"#,
    )
    .expect("parses");
    assert_eq!(names, ["sluice_stage_batch_size_bucket"]);
    assert_eq!(labels, ["stage", "le", "stage", "x"]);
    let (names, labels) = promql_names(
        r#"sum(rate(sluice_cache_hits_total[5m])) / on (tier) group_left (stage) sum by (tier) (up{job="s"})"#,
    )
    .expect("parses");
    assert_eq!(names, ["sluice_cache_hits_total"], "up is not a sluice_ metric");
    assert_eq!(labels, ["tier", "stage", "tier"], "on (...), group_left (...) and by (...), not up's matchers");
    assert!(promql_names("sum(rate(sluice_x[5m])").is_err());

    let metrics = documented_metrics();
    let good = dashboard();
    let first_query = "/panels/1/targets/0/expr";
    let cases: [(&str, &str, &str); 5] = [
        ("an unknown metric", "sum(rate(sluice_stage_events_total[5m]))", "not in docs/instrumentation.md"),
        ("an unknown label", "sum by (topic) (rate(sluice_stage_events_in_total[5m]))", "label topic"),
        ("a histogram without _bucket", "sluice_stage_batch_size", "is a histogram"),
        ("_bucket of a counter", "rate(sluice_stage_events_in_total_bucket[5m])", "not in docs/instrumentation.md"),
        ("no query at all", "", "names no sluice_ metric"),
    ];
    for (what, expr, expected) in cases {
        let mut broken = good.clone();
        *broken.pointer_mut(first_query).expect("the first panel's query") = json!(expr);
        let errors = check_dashboard(&broken, &metrics);
        assert!(errors.iter().any(|e| e.contains(expected)), "{what}: expected {expected:?} in {errors:#?}");
    }
    let mut broken = good.clone();
    broken["panels"].as_array_mut().expect("panels").retain(|p| {
        !p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["expr"].as_str().unwrap_or_default().contains("consumer_lag"))
    });
    assert!(check_dashboard(&broken, &metrics).iter().any(|e| e.contains("no panel shows sluice_kafka_consumer_lag")));
    let mut broken = good;
    broken["panels"][1]["datasource"]["uid"] = json!("prometheus");
    assert!(check_dashboard(&broken, &metrics).iter().any(|e| e.contains("must use the data source")));
}

// ---------------------------------------------------------------------------
// Alerting rules

/// What an alert's `severity` label may be (Alertmanager routes on it).
const SEVERITIES: [&str; 2] = ["warning", "critical"];

fn alert_rules() -> Value {
    read_one_yaml(&repo_root().join("deploy/prometheus/alerts.yml"))
}

/// The `###` headings of the "Alerts" section of docs/operations.md.
fn runbook_sections() -> BTreeSet<String> {
    let text = fs::read_to_string(repo_root().join("docs/operations.md")).expect("docs/operations.md");
    let section = text.split("\n## Alerts\n").nth(1).unwrap_or_default();
    let section = section.split("\n## ").next().unwrap_or_default();
    section.lines().filter_map(|l| l.strip_prefix("### ")).map(|h| h.trim().to_string()).collect()
}

/// A Prometheus duration: one or more of a number and a unit (`1h30m`).
fn is_duration(text: &str) -> bool {
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        // "ms" before "m", so that 5ms is not 5m followed by "s".
        let unit = ["ms", "s", "m", "h", "d", "w", "y"].into_iter().find(|u| rest[digits..].starts_with(u));
        match unit {
            Some(unit) if digits > 0 => rest = &rest[digits + unit.len()..],
            _ => return false,
        }
    }
    !text.is_empty()
}

/// Every rule is an alert whose expression parses as PromQL and names
/// documented metrics and labels only (or `up`), with a severity, a summary, a
/// description and a runbook section of its own; and every runbook section has
/// its alert.
fn check_alert_rules(rules: &Value, metrics: &BTreeMap<String, Metric>, runbook: &BTreeSet<String>) -> Vec<String> {
    let mut errors = Vec::new();
    let mut names = BTreeSet::new();
    let groups = rules["groups"].as_array().map(Vec::as_slice).unwrap_or_default();
    if groups.is_empty() {
        errors.push("alerts: no groups".into());
    }
    for rule in groups.iter().flat_map(|g| g["rules"].as_array().into_iter().flatten()) {
        let Some(alert) = rule["alert"].as_str().filter(|a| a.starts_with("Sluice")) else {
            errors.push(format!("alerts: a rule is not an alert named Sluice*: {rule}"));
            continue;
        };
        if !names.insert(alert.to_string()) {
            errors.push(format!("alerts: {alert} is defined twice"));
        }
        let expr = rule["expr"].as_str().unwrap_or_default();
        if let Ok(parsed) = promql_parser::parser::parse(expr)
            && parsed.value_type() != promql_parser::parser::value::ValueType::Vector
        {
            errors.push(format!("alerts: {alert}: the expression is a {}, not a vector", parsed.value_type()))
        }
        let (used, query_errors) = check_query(expr, metrics);
        errors.extend(query_errors.into_iter().map(|e| format!("alerts: {alert}: {e}")));
        // Prometheus' own `up` is the one other series an alert may watch
        // (a stage that does not answer has no sluice_ series to look at).
        if used.is_empty() && !expr.starts_with("up{") {
            errors.push(format!("alerts: {alert}: names no sluice_ metric"));
        }
        if let Some(wait) = rule.get("for").and_then(Value::as_str).filter(|d| !is_duration(d)) {
            errors.push(format!("alerts: {alert}: `for: {wait}` is not a duration"));
        }
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        if !SEVERITIES.contains(&severity) {
            errors.push(format!("alerts: {alert}: severity {severity:?} is not one of {SEVERITIES:?}"));
        }
        for annotation in ["summary", "description"] {
            if rule["annotations"][annotation].as_str().is_none_or(str::is_empty) {
                errors.push(format!("alerts: {alert}: no {annotation} annotation"));
            }
        }
        let runbook_url = format!("docs/operations.md#{}", alert.to_lowercase());
        if rule["annotations"]["runbook_url"] != runbook_url.as_str() {
            errors.push(format!("alerts: {alert}: runbook_url must be {runbook_url}"));
        }
        if !runbook.contains(alert) {
            errors.push(format!("alerts: {alert}: no section `### {alert}` under `## Alerts` in docs/operations.md"));
        }
    }
    for section in runbook.difference(&names) {
        errors.push(format!("docs/operations.md: the Alerts section {section} has no alert"));
    }
    errors
}

#[test]
fn the_alert_rules_parse_and_name_documented_metrics() {
    let rules = alert_rules();
    let errors = check_alert_rules(&rules, &documented_metrics(), &runbook_sections());
    assert_no_errors("deploy/prometheus/alerts.yml", &errors);
    let alerts =
        rules["groups"].as_array().into_iter().flatten().flat_map(|g| g["rules"].as_array().into_iter().flatten());
    assert!(alerts.count() >= 10, "the rules were not read");
}

#[test]
fn the_alert_check_refuses_broken_rules() {
    let metrics = documented_metrics();
    let runbook = runbook_sections();
    let good = alert_rules();
    assert!(check_alert_rules(&good, &metrics, &runbook).is_empty());
    let first = "/groups/0/rules/1";
    let cases: [(&str, &str, Value, &str); 8] = [
        ("a syntax error", "/expr", json!("sum(rate(sluice_stage_events_in_total[5m])"), "does not parse"),
        ("a scalar", "/expr", json!("scalar(sum(sluice_redis_up))"), "not a vector"),
        (
            "an unknown metric",
            "/expr",
            json!("rate(sluice_stage_events_total[5m]) > 0"),
            "not in docs/instrumentation.md",
        ),
        (
            "an unknown label",
            "/expr",
            json!("sum by (topic) (rate(sluice_stage_events_in_total[5m])) > 0"),
            "label topic",
        ),
        ("a wrong duration", "/for", json!("10 minutes"), "not a duration"),
        ("an unknown severity", "/labels/severity", json!("page"), "severity \"page\""),
        ("a wrong runbook", "/annotations/runbook_url", json!("docs/operations.md"), "runbook_url must be"),
        ("no runbook section", "/alert", json!("SluiceUnheardOf"), "no section `### SluiceUnheardOf`"),
    ];
    for (what, field, value, expected) in cases {
        let mut broken = good.clone();
        *broken.pointer_mut(&format!("{first}{field}")).unwrap_or_else(|| panic!("{what}: no {first}{field}")) = value;
        let errors = check_alert_rules(&broken, &metrics, &runbook);
        assert!(errors.iter().any(|e| e.contains(expected)), "{what}: expected {expected:?} in {errors:#?}");
    }
    let mut stale = runbook;
    stale.insert("SluiceRemoved".into());
    let errors = check_alert_rules(&good, &metrics, &stale);
    assert!(errors.iter().any(|e| e.contains("SluiceRemoved has no alert")), "{errors:#?}");
}

/// `promtool check rules` passes, `promtool test rules` passes on
/// alerts.test.yml, and that file has a group expecting every alert to fire.
#[test]
fn promtool_checks_the_rules_and_every_alert_fires_in_its_unit_test() {
    let dir = repo_root().join("deploy/prometheus");
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    for args in [["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]] {
        let out = Command::new(&promtool).args(args).current_dir(&dir).output().unwrap_or_else(|e| {
            panic!("{promtool}: {e} (it comes with Debian's prometheus package, which `make test` installs)")
        });
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {}:\n{text}", args.join(" "));
    }
    let tests = read_one_yaml(&dir.join("alerts.test.yml"));
    let fired: BTreeSet<String> = tests["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter(|case| case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .filter_map(|case| case["alertname"].as_str().map(str::to_string))
        .collect();
    let alerts: BTreeSet<String> = alert_rules()["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect();
    assert!(alerts.len() >= 15, "the rules were not read: {alerts:?}");
    assert_eq!(fired, alerts, "alerts.test.yml must show each alert of alerts.yml firing");
}
