//! `heartbeat bench` against the real server binary: that it runs, counts
//! right, and that `--freeze` reports what happened. Its figures are
//! measurements, so nothing here checks how fast anything is. Its flags are
//! checked with the others, in `tests/cli.rs`.

mod support;

use std::process::{Child, Command};

use serde_json::Value;
use support::*;

/// A server that pings every 100 ms and ends a client silent for 400 ms, with
/// its metrics on a port of its own.
fn server() -> (Child, String, String) {
    let metrics = free_port().to_string();
    let (child, addr) = spawn_server_process(&[
        "--ping-interval",
        "100ms",
        "--timeout",
        "400ms",
        "--min-ping-interval",
        "10ms",
        "--metrics-listen",
        &metrics,
    ]);
    (
        child,
        format!("http://{addr}"),
        format!("http://{metrics}/metrics"),
    )
}

/// Runs `heartbeat bench` with `args` and returns its JSON report.
fn bench(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_heartbeat"))
        .arg("bench")
        .args(args)
        .args(["--output", "json"])
        .output()
        .expect("run heartbeat bench");
    assert!(
        output.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the report is JSON")
}

fn at<'a>(report: &'a Value, path: &str) -> &'a Value {
    report
        .pointer(path)
        .unwrap_or_else(|| panic!("{path} missing from {report:#}"))
}

/// Tests that every session is counted once, that the frozen ones are all
/// told TIMEOUT and reported, and that the server's figures come with a pid
/// and a metrics URL.
#[test]
fn bench_counts_sessions_and_reports_frozen_ones() {
    let (mut server, url, metrics) = server();
    let pid = server.id().to_string();
    let report = bench(&[
        &url,
        "--sessions",
        "60",
        "--connections",
        "4",
        "--rate",
        "600",
        "--duration",
        "1s",
        "--freeze",
        "6",
        "--server-pid",
        &pid,
        "--metrics-url",
        &metrics,
    ]);
    signal(&server, "-TERM");
    let _ = server.wait();
    assert_eq!(at(&report, "/sessions/established"), 60, "{report:#}");
    assert_eq!(at(&report, "/sessions/failed"), 0, "{report:#}");
    assert_eq!(at(&report, "/detection/frozen"), 6, "{report:#}");
    assert_eq!(at(&report, "/detection/closed"), 6, "{report:#}");
    assert_eq!(at(&report, "/detection/not_closed"), 0, "{report:#}");
    assert_eq!(at(&report, "/server_ends/timeout"), 6, "{report:#}");
    // Everyone else half-closed when the run ended.
    assert_eq!(at(&report, "/wound_down"), 54, "{report:#}");
    assert!(at(&report, "/steady/round_trips").as_u64() > Some(0));
    assert!(at(&report, "/rtt_ms/count").as_u64() > Some(0));
    // No goodbye came before the timeout had passed since the session's
    // last frame (the server never ends a session early, and the bench
    // counts from the frame it really sent last).
    assert_eq!(at(&report, "/detection/early"), 0, "{report:#}");
    let error = at(&report, "/detection/error_ms/max")
        .as_f64()
        .expect("a number");
    assert!(error < 400.0, "{report:#}");
    // The server's own histogram saw the same six ends.
    assert_eq!(at(&report, "/server_lateness/count"), 6, "{report:#}");
    assert!(at(&report, "/server/cpu_us_per_round_trip").is_number());
    assert!(at(&report, "/server/rss_bytes_per_session").is_number());
    assert!(at(&report, "/generator/rss_bytes").as_u64() > Some(0));
}

/// Tests that `--freeze-all` silences every session at once, each is told
/// TIMEOUT, and the report says how far apart their last frames left.
#[test]
fn freeze_all_silences_every_session_at_once() {
    let (mut server, url, _) = server();
    let report = bench(&[
        &url,
        "--sessions",
        "40",
        "--connections",
        "2",
        "--rate",
        "400",
        "--duration",
        "200ms",
        "--freeze-all",
    ]);
    signal(&server, "-TERM");
    let _ = server.wait();
    assert_eq!(at(&report, "/detection/frozen"), 40, "{report:#}");
    assert_eq!(at(&report, "/detection/closed"), 40, "{report:#}");
    assert!(
        at(&report, "/detection/last_frames_spread_ms").is_number(),
        "{report:#}"
    );
    assert_eq!(at(&report, "/detection/early"), 0, "{report:#}");
    assert_eq!(at(&report, "/server_ends/timeout"), 40, "{report:#}");
}

/// Tests `--jitter`: both populations are opened and accounted for, every
/// frozen session is suspected after its freeze (a jittery one may already
/// have been suspect, in a stall, when it froze: counted apart), and a
/// malformed distribution is refused naming the fix.
#[test]
fn bench_jitter_accounts_for_both_populations() {
    // A timeout well past the jittery population's stalls (3 intervals).
    let (mut child, addr) = spawn_server_process(&[
        "--ping-interval",
        "100ms",
        "--timeout",
        "1s",
        "--min-ping-interval",
        "10ms",
        "--suspicion",
        "adaptive",
    ]);
    let url = format!("http://{addr}");
    let report = bench(&[
        &url,
        "--jitter",
        "0.2:0.05",
        "--sessions",
        "20",
        "--duration",
        "1s",
        "--freeze",
        "3",
    ]);
    for population in ["steady", "jittery"] {
        let path = |field: &str| format!("/populations/{population}/{field}");
        assert_eq!(at(&report, &path("sessions")), 10, "{report:#}");
        assert_eq!(at(&report, &path("frozen")), 3, "{report:#}");
        let suspected = at(&report, &path("frozen_suspected")).as_u64();
        let already = at(&report, &path("frozen_already_suspect")).as_u64();
        match population {
            // Steady sessions never stall, so never froze suspect.
            "steady" => assert_eq!((suspected, already), (Some(3), Some(0)), "{report:#}"),
            _ => assert_eq!(
                suspected.zip(already).map(|(s, a)| s + a),
                Some(3),
                "{report:#}"
            ),
        }
        assert!(at(&report, &path("session_minutes"))
            .as_f64()
            .is_some_and(|m| m > 0.0));
    }
    let _ = child.kill();
    let _ = child.wait();
    let output = Command::new(env!("CARGO_BIN_EXE_heartbeat"))
        .args(["bench", &url, "--jitter", "lots"])
        .output()
        .expect("run heartbeat bench");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("write SIGMA[:STALLS], like 0.25:0.02"),
        "{stderr}"
    );
}
