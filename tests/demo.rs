//! `sluice demo` runs the whole pipeline on the embedded broker with no
//! external service and accounts for every event.

use std::process::Command;

use sluice_testkit::{heavy_test_lock, sluice_bin};

#[test]
fn the_demo_runs_and_loses_nothing() {
    let _heavy = heavy_test_lock();
    let output = Command::new(sluice_bin())
        .args(["demo", "--events", "400", "--invalid-every", "50"])
        .env("SLUICE_OBSERVE__LISTEN", "127.0.0.1:0")
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let field = |name: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{name}` line in:\n{stdout}"))
    };
    assert_eq!(field("events in:"), 400);
    // One event in ten is a query (40); of the 360 stock events every 50th is invalid (7).
    assert_eq!(field("query intents out:"), 40, "{stdout}");
    assert_eq!(field("dead letters:"), 7, "every 50th stock event is invalid\n{stdout}");
    assert_eq!(field("predictions out:") + field("below min_confidence:"), 353, "{stdout}");
    assert_eq!(field("lost:"), 0, "{stdout}");
    assert!(stdout.contains("latency p50 / p99:"), "{stdout}");
}

/// Without Redis a rollout is the process's alone, started by the
/// configuration: the demo rolls the stock model's version 2 out beside
/// version 1, whose answers it does not match, and reports it rolled back;
/// every event is still accounted for. A bad rollout key is refused by name.
#[test]
fn without_redis_the_configuration_starts_a_rollout_of_the_process_own() {
    let _heavy = heavy_test_lock();
    let demo = |env: &[(&str, &str)]| {
        Command::new(sluice_bin())
            .args(["demo", "--events", "3000"])
            .env("SLUICE_OBSERVE__LISTEN", "127.0.0.1:0")
            .env("RUST_BACKTRACE", "0")
            .envs(env.iter().copied())
            .output()
            .expect("run the demo")
    };
    let output = demo(&[
        ("SLUICE_INFERRER__ROLLOUT__CANDIDATE", "2"),
        ("SLUICE_INFERRER__ROLLOUT__SHADOW", "1.0"),
        ("SLUICE_INFERRER__ROLLOUT__CANARY", "0.1"),
        ("SLUICE_INFERRER__ROLLOUT__GATES__MIN_COMPARED", "400"),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        stdout.contains("rollout:                 stock-lstm version 2 beside 1: rolled back by max_return_diff_p99"),
        "{stdout}"
    );
    assert!(stdout.contains("lost:                    0"), "{stdout}");

    let refused = demo(&[("SLUICE_INFERRER__ROLLOUT__CANDIDATE", "2"), ("SLUICE_INFERRER__ROLLOUT__CANARY", "5")]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("`inferrer.rollout.canary`"), "{stderr}");
    let with_redis =
        demo(&[("SLUICE_INFERRER__ROLLOUT__CANDIDATE", "2"), ("SLUICE_CONTROL__REDIS_URL", "redis://127.0.0.1:6379")]);
    let stderr = String::from_utf8_lossy(&with_redis.stderr);
    assert!(stderr.contains("`inferrer.rollout.candidate`") && stderr.contains("sluice rollout start"), "{stderr}");
}
