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
