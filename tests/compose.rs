//! The Compose stack in `deploy/compose/`, checked offline: every service the
//! stack needs, health checks and start order, the stages' configuration
//! (loaded by Sluice itself), Prometheus' scrape targets and rules, and
//! Grafana's provisioning. Every check is shown to fail on a stack broken on
//! purpose.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sluice_app::config::SluiceConfig;

#[allow(dead_code, reason = "the Kubernetes and alert checks use the rest")]
mod deployment;
use deployment::{STAGES, assert_no_errors, listen_port, read_one_yaml, repo_root, unset};

const COMPOSE_SERVICES: [&str; 10] =
    ["kafka", "redis", "postgres", "setup", "fetcher", "normalizer", "inferrer", "writer", "prometheus", "grafana"];

fn compose_dir() -> PathBuf {
    repo_root().join("deploy/compose")
}

fn compose() -> Value {
    read_one_yaml(&compose_dir().join("docker-compose.yml"))
}

/// A command, a healthcheck's test or an entrypoint (a string or a list) as one line.
fn command_line(command: &Value) -> String {
    match command {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "),
        _ => String::new(),
    }
}

/// The structure the stack depends on; `dir` is where the compose file lives
/// (bind mounts are relative to it).
fn check_compose(compose: &Value, dir: &Path) -> Vec<String> {
    let services = &compose["services"];
    let mut errors = Vec::new();
    for name in COMPOSE_SERVICES {
        if !services[name].is_object() {
            errors.push(format!("compose: service {name} is missing"));
        }
    }
    let healthy = |name: &str| !services[name]["healthcheck"]["test"].is_null();
    for (name, service) in services.as_object().into_iter().flatten() {
        for (dependency, condition) in service["depends_on"].as_object().into_iter().flatten() {
            if !services[dependency].is_object() {
                errors.push(format!("compose: {name} depends on {dependency}, which is no service"));
            }
            if condition["condition"] == "service_healthy" && !healthy(dependency) {
                errors.push(format!("compose: {name} waits for {dependency} to be healthy, which has no healthcheck"));
            }
        }
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let source = volume.as_str().unwrap_or_default().split(':').next().unwrap_or_default();
            if source.starts_with('.') && !dir.join(source).exists() {
                errors.push(format!("compose: {name} mounts {source}, which does not exist"));
            }
        }
    }
    for name in ["kafka", "redis", "postgres"] {
        if !healthy(name) {
            errors.push(format!("compose: {name} needs a healthcheck (the setup job waits for it)"));
        }
    }
    let kafka_roles = services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"].as_str().unwrap_or_default();
    if !services["kafka"]["image"].as_str().unwrap_or_default().starts_with("apache/kafka")
        || !kafka_roles.contains("controller")
    {
        errors.push("compose: kafka must be apache/kafka in KRaft mode (KAFKA_PROCESS_ROLES with controller)".into());
    }
    let setup = &services["setup"];
    let setup_command = command_line(&setup["command"]);
    for step in ["sluice topics create", "sluice db migrate"] {
        if !setup_command.contains(step) {
            errors.push(format!("compose: the setup job must run `{step}`"));
        }
    }
    for dependency in ["kafka", "postgres"] {
        if setup["depends_on"][dependency]["condition"] != "service_healthy" {
            errors.push(format!("compose: setup must wait for {dependency} to be healthy"));
        }
    }
    for stage in STAGES {
        let service = &services[stage];
        if service["command"] != json!(["run", stage]) {
            errors.push(format!("compose: {stage} must run `sluice run {stage}`, runs {}", service["command"]));
        }
        if service["depends_on"]["setup"]["condition"] != "service_completed_successfully" {
            errors.push(format!("compose: {stage} must start after the setup job completed"));
        }
        if !command_line(&service["healthcheck"]["test"]).contains("/readyz") {
            errors.push(format!("compose: {stage}'s healthcheck must ask /readyz"));
        }
        if service["image"] != setup["image"] || service["image"].is_null() {
            errors.push(format!("compose: {stage} must run the same image as setup"));
        }
        let config = service["environment"]["SLUICE_CONFIG"].as_str().unwrap_or("<unset>");
        let mounted = service["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v.as_str().is_some_and(|v| v.split(':').nth(1) == Some(config)));
        if !mounted {
            errors.push(format!("compose: {stage}: SLUICE_CONFIG ({config}) is not a mounted file"));
        }
    }
    errors
}

/// Compose's sluice.toml: Sluice loads it (known keys, right types), and the
/// services it names exist.
fn check_compose_config(compose: &Value, text: &str) -> Vec<String> {
    let config = match SluiceConfig::from_text(text, &[]) {
        Ok(config) => config,
        Err(errors) => return errors.iter().map(|e| format!("deploy/compose/sluice.toml: {e}")).collect(),
    };
    let host = |value: &str| -> String {
        let value = value.split("://").last().unwrap_or_default();
        value.split([':', '/']).next().unwrap_or_default().to_string()
    };
    let dsn_host = config
        .postgres
        .dsn
        .expose()
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("host="))
        .unwrap_or_default()
        .to_string();
    let mut errors = Vec::new();
    for (key, service) in [
        ("kafka.brokers", host(&config.kafka.brokers)),
        ("control.redis_url", host(config.control.redis_url.expose())),
        ("postgres.dsn", dsn_host),
    ] {
        if !compose["services"][&service].is_object() {
            errors.push(format!("compose sluice.toml: {key} names {service:?}, which is no compose service"));
        }
    }
    errors
}

/// Prometheus scrapes every stage's metrics port by its service name.
fn check_prometheus(prometheus: &Value, listen_port: i64) -> Vec<String> {
    let targets: BTreeSet<&str> = prometheus["scrape_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|job| job["metrics_path"].as_str().unwrap_or("/metrics") == "/metrics")
        .flat_map(|job| job["static_configs"].as_array().into_iter().flatten())
        .flat_map(|s| s["targets"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    STAGES
        .iter()
        .filter(|stage| !targets.contains(format!("{stage}:{listen_port}").as_str()))
        .map(|stage| format!("prometheus.yml: no target {stage}:{listen_port}"))
        .collect()
}

#[test]
fn the_compose_stack_is_complete() {
    let compose = compose();
    assert_no_errors("deploy/compose/docker-compose.yml", &check_compose(&compose, &compose_dir()));
    let text = fs::read_to_string(compose_dir().join("sluice.toml")).expect("compose sluice.toml");
    assert_no_errors("deploy/compose/sluice.toml", &check_compose_config(&compose, &text));
    let config = SluiceConfig::from_text(&text, &[]).expect("compose's sluice.toml loads");
    let port = listen_port(&config);
    let prometheus = read_one_yaml(&repo_root().join("deploy/prometheus/prometheus.yml"));
    assert_no_errors("deploy/prometheus/prometheus.yml", &check_prometheus(&prometheus, port));

    let datasources = read_one_yaml(&repo_root().join("deploy/grafana/provisioning/datasources/prometheus.yml"));
    let url = datasources["datasources"][0]["url"].as_str().unwrap_or_default();
    assert!(url.contains("prometheus:9090"), "Grafana's data source must be the compose Prometheus, is {url}");
    let provider = read_one_yaml(&repo_root().join("deploy/grafana/provisioning/dashboards/sluice.yml"));
    let path = provider["providers"][0]["options"]["path"].as_str().unwrap_or_default();
    let mounted = compose["services"]["grafana"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| v.as_str().is_some_and(|v| v.starts_with("../grafana/dashboards:") && v.contains(path)));
    assert!(mounted, "the dashboards folder must be mounted where the provider reads ({path})");
}

/// (what is broken, how, a fragment of the error that must appear).
type ComposeBreakage = (&'static str, fn(&mut Value), &'static str);

#[test]
fn the_compose_checks_refuse_a_broken_stack() {
    let good = compose();
    let config = fs::read_to_string(compose_dir().join("sluice.toml")).expect("compose sluice.toml");
    let cases: [ComposeBreakage; 8] = [
        ("no postgres", |c| unset(&mut c["services"], "postgres"), "service postgres is missing"),
        ("no kafka healthcheck", |c| unset(&mut c["services"]["kafka"], "healthcheck"), "kafka needs a healthcheck"),
        ("zookeeper", |c| c["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] = json!("broker"), "KRaft"),
        ("no migration", |c| c["services"]["setup"]["command"] = json!(["sluice topics create"]), "sluice db migrate"),
        (
            "a stage that does not wait",
            |c| unset(&mut c["services"]["writer"], "depends_on"),
            "writer must start after",
        ),
        ("a wrong stage", |c| c["services"]["normalizer"]["command"] = json!(["run", "writer"]), "normalizer must run"),
        (
            "a missing file",
            |c| {
                c["services"]["prometheus"]["volumes"][0] =
                    json!("../prometheus/prom.yml:/etc/prometheus/prometheus.yml:ro")
            },
            "does not exist",
        ),
        (
            "a health wait on no healthcheck",
            |c| c["services"]["prometheus"]["depends_on"]["setup"] = json!({"condition": "service_healthy"}),
            "which has no healthcheck",
        ),
    ];
    for (what, breakage, expected) in cases {
        let mut broken = good.clone();
        breakage(&mut broken);
        let errors = check_compose(&broken, &compose_dir());
        assert!(errors.iter().any(|e| e.contains(expected)), "{what}: expected {expected:?} in {errors:#?}");
    }
    let errors = check_compose_config(&good, &config.replace("redis://redis:6379", "redis://cache:6379"));
    assert!(errors.iter().any(|e| e.contains("\"cache\"")), "{errors:?}");
    let errors = check_compose_config(&good, &format!("{config}\n[cache]\nttl = 5\n"));
    assert!(errors.iter().any(|e| e.contains("unknown key cache.ttl")), "{errors:?}");
    let prometheus = json!({"scrape_configs": [{"job_name": "s", "static_configs": [{"targets": ["fetcher:9100"]}]}]});
    assert!(check_prometheus(&prometheus, 9100).iter().any(|e| e.contains("writer:9100")));
}

/// The compose stack's Prometheus loads the alerting rules, mounted where it looks.
#[test]
fn the_compose_prometheus_loads_the_alerting_rules() {
    let prometheus = read_one_yaml(&repo_root().join("deploy/prometheus/prometheus.yml"));
    assert_eq!(prometheus["rule_files"], json!(["alerts.yml"]), "prometheus.yml must load alerts.yml");
    let mounted = compose()["services"]["prometheus"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| v == "../prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro");
    assert!(mounted, "the compose stack must mount alerts.yml next to prometheus.yml");
}

/// What `local.yml` may say for podman-compose 1.0.3, which merges an
/// override by appending its lists to the base file's: only services the
/// stack has, and no key whose value is a list in the base (a command or a
/// healthcheck would be appended to, not replaced). Every Sluice service runs
/// the image `make images` builds; no third-party image is left but
/// Grafana's, which is not started there.
fn check_local_override(base: &Value, local: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let Some(services) = local["services"].as_object() else { return vec!["local.yml: no services".into()] };
    for (name, service) in services {
        let Some(fields) = service.as_object() else { continue };
        let original = &base["services"][name];
        if original.is_null() {
            errors.push(format!("local.yml: {name} is not a service of docker-compose.yml"));
            continue;
        }
        for (key, value) in fields {
            if original[key].is_array() && key != "volumes" {
                errors.push(format!(
                    "local.yml: {name}.{key} is a list in docker-compose.yml: podman-compose appends to it"
                ));
            }
            if key == "volumes" && !value.is_array() {
                errors.push(format!("local.yml: {name}.volumes must be a list"));
            }
        }
        let image = service["image"].as_str().unwrap_or("");
        if !image.starts_with("localhost/") {
            errors.push(format!("local.yml: {name} runs {image:?}, not a local image"));
        }
    }
    for name in COMPOSE_SERVICES.iter().filter(|s| **s != "grafana") {
        if services.get(*name).is_none() {
            errors.push(format!("local.yml: {name} keeps docker-compose.yml's image"));
        }
    }
    errors
}

#[test]
fn the_local_override_replaces_every_image_but_grafanas_without_lists() {
    let local = read_one_yaml(&compose_dir().join("local.yml"));
    assert_no_errors("deploy/compose/local.yml", &check_local_override(&compose(), &local));
    let local_sh = fs::read_to_string(compose_dir().join("local.sh")).expect("local.sh");
    let ups: Vec<&str> = local_sh.lines().filter(|l| l.trim_start().starts_with("compose up")).collect();
    assert!(!ups.is_empty() && ups.iter().all(|l| !l.contains("grafana")), "local.sh must not start grafana: {ups:?}");

    let mut broken = local;
    broken["services"]["redis"]["command"] = json!(["redis-server", "--port", "6380"]);
    broken["services"]["nosuch"] = json!({ "image": "localhost/x" });
    broken["services"]["writer"]["image"] = json!("sluice:dev");
    unset(&mut broken["services"], "postgres");
    let errors = check_local_override(&compose(), &broken);
    for needle in ["redis.command is a list", "nosuch is not a service", "writer runs", "postgres keeps"] {
        assert!(errors.iter().any(|e| e.contains(needle)), "{needle} not caught: {errors:?}");
    }
}
