//! Secrets never leave the process: the PostgreSQL password, the Redis
//! password and a Kafka SASL password from the configuration appear in no log
//! line, no `/status` or `/metrics` answer, no `sluice config` output and no
//! error message, while the pipeline runs and while Redis is unreachable.

use std::process::Command;
use std::time::{Duration, Instant};

use sluice_testkit::{Processes, StageProcess, TestPipeline, free_port, http_response, sluice_bin};

const SECRETS: [&str; 3] = ["PgSecret-7f3a", "RedisSecret-91bc", "KafkaSecret-4d2e"];

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what} shows the secret {secret}:\n{text}");
    }
}

#[test]
fn secrets_never_appear_in_logs_status_or_errors() {
    let port = free_port();
    let extra = format!(
        "[kafka.properties]\n\"sasl.username\" = \"sluice\"\n\"sasl.password\" = \"{}\"\n\n\
         [writer]\npostgres = true\n\n\
         [postgres]\ndsn = \"host=127.0.0.1 user=postgres password={} dbname=test\"\nschema = \"{}\"\n\n\
         [control]\nredis_url = \"redis://:{}@127.0.0.1:1\"\n",
        SECRETS[2],
        SECRETS[0],
        sluice_testkit::unique_schema("secrets"),
        SECRETS[1]
    );
    let p = TestPipeline::start("secrets", 1, &extra, Processes::None);
    let config_text = std::fs::read_to_string(&p.config).expect("config");
    assert!(SECRETS.iter().all(|s| config_text.contains(s)), "the test must really configure the secrets");

    // `sluice config` prints the effective configuration.
    assert_no_secret("sluice config", &p.sluice(&["config"]));

    // A running pipeline, with Redis unreachable (an outage is logged).
    let listen = format!("127.0.0.1:{port}");
    let mut pipeline = StageProcess::command(&p.config, &["--listen", &listen, "pipeline"], "pipeline", &p.dir);
    let started = Instant::now();
    let mut status = None;
    while status.is_none() && started.elapsed() < Duration::from_secs(60) {
        status = http_response(port, "/status").filter(|s| s.contains("\"stages\""));
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = status.expect("/status answers");
    assert!(status.contains("<redacted>") && status.contains("***"), "redaction markers in /status:\n{status}");
    assert_no_secret("/status", &status);
    assert_no_secret("/metrics", &http_response(port, "/metrics").expect("/metrics"));
    pipeline.wait_for_log("redis is unreachable", 1, Duration::from_secs(30));
    pipeline.signal("TERM");
    assert!(pipeline.wait(Duration::from_secs(30)).is_some(), "the pipeline did not stop");
    assert_no_secret("the pipeline's log", &pipeline.logs());

    // Errors: a database that refuses the connection, Redis that is not there.
    let refused = config_text.replace("host=127.0.0.1 user=postgres", "host=127.0.0.1 port=1 user=postgres");
    let bad = p.path("refused.toml");
    std::fs::write(&bad, refused).expect("write");
    for args in [&["db", "migrate"][..], &["overrides", "get"][..], &["cache", "stats"][..]] {
        let output = Command::new(sluice_bin()).arg("--config").arg(&bad).args(args).output().expect("run");
        assert!(!output.status.success(), "{args:?} should fail");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(!text.trim().is_empty());
        assert_no_secret(&format!("sluice {args:?}"), &text);
    }
}
