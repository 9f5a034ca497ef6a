//! The `heartbeat` command line: every bad flag exits non-zero with one line
//! naming the value and the fix.

use std::process::{Command, Output};

fn heartbeat(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_heartbeat"));
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run heartbeat")
}

/// Runs `heartbeat serve` with `args` and returns its one error line.
fn serve_error(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    let output = heartbeat(&all, env);
    assert!(!output.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    errors[0].to_owned()
}

/// Tests that a timeout not above the interval is refused, naming both.
#[test]
fn timeout_must_exceed_interval() {
    let line = serve_error(&["--ping-interval", "10s", "--timeout", "10s"], &[]);
    assert!(
        line.contains("timeout 10s must be longer than ping_interval 10s"),
        "{line}"
    );
}

/// Tests that the same check applies to values from the environment.
#[test]
fn environment_values_are_validated_too() {
    let line = serve_error(&[], &[("HEARTBEAT_TIMEOUT", "5s")]);
    assert!(
        line.contains("timeout 5s must be longer than ping_interval 10s"),
        "{line}"
    );
}

/// Tests that zero durations are refused with an example of a good one.
#[test]
fn zero_durations_are_refused() {
    let line = serve_error(&["--min-ping-interval", "0s"], &[]);
    assert!(
        line.contains("min_ping_interval must be greater than zero (for example 1s)"),
        "{line}"
    );
}

/// Tests that a malformed duration says how to write one.
#[test]
fn malformed_durations_say_how_to_write_one() {
    let line = serve_error(&["--timeout", "thirty"], &[]);
    assert!(line.contains("'thirty' is not a duration"), "{line}");
    assert!(line.contains("like 200ms, 10s or 1m"), "{line}");
}

/// Tests that a suspicion threshold outside (interval, timeout) is refused.
#[test]
fn suspect_after_must_lie_between_interval_and_timeout() {
    let line = serve_error(&["--suspect-after", "5s"], &[]);
    assert!(
        line.contains(
            "suspect_after 5s must be longer than ping_interval 10s and shorter than timeout 30s"
        ),
        "{line}"
    );
}

/// Tests that min ping spacing at or above the interval is refused.
#[test]
fn min_ping_interval_must_be_below_interval() {
    let line = serve_error(&["--min-ping-interval", "10s"], &[]);
    assert!(
        line.contains("min_ping_interval 10s must be shorter than ping_interval 10s"),
        "{line}"
    );
}

/// Tests that a session capacity of zero, or just over the largest, is refused.
#[test]
fn zero_capacity_is_refused() {
    let line = serve_error(&["--max-sessions", "0"], &[]);
    assert!(line.contains("max_sessions must be at least 1"), "{line}");
    let line = serve_error(&["--max-sessions", "100000001"], &[]);
    assert!(
        line.contains("max_sessions 100000001 is out of range: use 1 to 100000000"),
        "{line}"
    );
}

/// Tests that an out-of-range frame limit is refused with its range.
#[test]
fn frame_limits_are_range_checked() {
    let line = serve_error(&["--max-message-size", "10"], &[]);
    assert!(
        line.contains("max_message_size 10 is out of range: use 64 to 4194304"),
        "{line}"
    );
}

/// Tests that a malformed listen address is refused, naming it.
#[test]
fn malformed_listen_address_is_refused() {
    let line = serve_error(&["--listen", "localhost:port"], &[]);
    assert!(
        line.contains("invalid value 'localhost:port' for '--listen <ADDR>'"),
        "{line}"
    );
}

/// Tests that an address in use is refused with what to do about it.
#[test]
fn address_in_use_is_refused() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    let line = serve_error(&["--listen", &addr], &[]);
    assert!(line.contains(&format!("cannot listen on {addr}")), "{line}");
    assert!(line.contains("choose another --listen"), "{line}");
}

/// Tests that --help teaches: defaults and environment variables are shown.
#[test]
fn help_shows_defaults_and_environment() {
    let output = heartbeat(&["serve", "--help"], &[]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "HEARTBEAT_PING_INTERVAL",
        "[default: 10s]",
        "[default: 127.0.0.1:50051]",
        "--shutdown-grace",
    ] {
        assert!(help.contains(expected), "--help lacks {expected}:\n{help}");
    }
}

/// Tests that `heartbeat connect` refuses a bad URL with one line.
#[test]
fn connect_refuses_a_bad_url() {
    let output = heartbeat(&["connect", "ftp://host:1"], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid server URL \"ftp://host:1\": the scheme must be http or https"),
        "{stderr}"
    );
}

/// Tests that `heartbeat connect` refuses a malformed label, saying how to write one.
#[test]
fn connect_refuses_a_bad_label() {
    let output = heartbeat(&["connect", "127.0.0.1:1", "--label", "zone"], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("label \"zone\" has no '=': write key=value"),
        "{stderr}"
    );
}

/// Tests that absurdly long durations are refused with their bound, not a
/// panic, whether alone or in a combination that would overflow.
#[test]
fn durations_have_an_upper_bound() {
    for args in [
        vec!["--timeout", "500000000000y"],
        vec![
            "--ping-interval",
            "500000000000y",
            "--timeout",
            "550000000000y",
        ],
        vec!["--hello-timeout", "2days"],
    ] {
        let line = serve_error(&args, &[]);
        assert!(
            line.contains("is too long: use at most 1day"),
            "{args:?}: {line}"
        );
    }
}

/// Tests that `heartbeat bench` refuses each bad flag, and each bound just
/// over it, with a line naming the flag and the fix.
#[test]
fn bench_flags_name_the_flag_and_the_fix() {
    for (args, expected) in [
        (
            &["http://127.0.0.1:1", "--connections", "0"][..],
            "--connections 0 must be between 1 and --sessions",
        ),
        (
            &["http://127.0.0.1:1", "--sessions", "5", "--freeze", "6"][..],
            "use --freeze-all",
        ),
        (&["https://127.0.0.1:1"][..], "plain-text HTTP/2 only"),
        (
            &["http://127.0.0.1:1", "--rate", "0"][..],
            "--rate 0 must be between 0.01 and 1000000",
        ),
        (
            &["http://127.0.0.1:1", "--rate", "1000001"][..],
            "--rate 1000001 must be between 0.01 and 1000000",
        ),
        (
            &["http://127.0.0.1:1", "--sessions", "10000001"][..],
            "--sessions 10000001 must be between 1 and 10000000",
        ),
        (
            &[
                "http://127.0.0.1:1",
                "--metrics-url",
                "https://127.0.0.1:2/metrics",
            ][..],
            "the metrics listener speaks plain HTTP",
        ),
    ] {
        let mut all = vec!["bench"];
        all.extend_from_slice(args);
        let output = heartbeat(&all, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// Tests that each cluster flag is checked before anything connects, just
/// over each bound, with a line naming the value and the fix.
#[test]
fn cluster_flags_name_the_value_and_the_fix() {
    let etcd = ["--cluster", "http://127.0.0.1:1"];
    let long_id = "n".repeat(64);
    let cases: [(Vec<&str>, &str); 8] = [
        (
            vec!["--cluster", "127.0.0.1:2379", "--node-id", "n1"],
            "is not an http:// URL",
        ),
        (
            [&etcd[..], &["--node-id", "n 1"]].concat(),
            "node id \"n 1\" must be 1 to 63 letters",
        ),
        (
            [&etcd[..], &["--node-id", &long_id]].concat(),
            "must be 1 to 63 letters",
        ),
        (
            [&etcd[..], &["--node-id", "n1", "--cluster-prefix", "/hb/"]].concat(),
            "must start with '/' and not end with one",
        ),
        (
            [&etcd[..], &["--node-id", "n1", "--lease-ttl", "1s"]].concat(),
            "lease TTL 1s must be whole seconds from 2s to 1h",
        ),
        (
            [&etcd[..], &["--node-id", "n1", "--lease-ttl", "2500ms"]].concat(),
            "must be whole seconds",
        ),
        (
            [
                &etcd[..],
                &["--node-id", "n1", "--max-message-size", "1048577"],
            ]
            .concat(),
            "max_message_size 1048577 is over 1048576",
        ),
        (
            [&etcd[..], &["--node-id", "n1", "--max-sessions", "1000001"]].concat(),
            "max_sessions 1000001 is over 1000000, the most one cluster node may hold",
        ),
    ];
    for (args, expected) in cases {
        let line = serve_error(&args, &[]);
        assert!(line.contains(expected), "{args:?}: {line}");
    }
    // Each of the two flags needs the other.
    for args in [
        vec!["serve", "--node-id", "n1"],
        ["serve"].into_iter().chain(etcd).collect(),
    ] {
        let output = heartbeat(&args, &[]);
        assert!(!output.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("required"), "{args:?}: {stderr}");
    }
}

/// Tests that a node that cannot reach etcd exits at once with a line naming
/// the call, the status and what to check, and never says it is serving.
#[test]
fn an_unreachable_etcd_is_named_at_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let output = heartbeat(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cluster",
            &url,
            "--node-id",
            "n1",
        ],
        &[],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("error: etcd epoch: Unavailable")
            && stderr.contains("is etcd running at the --cluster endpoints?"),
        "{stderr}"
    );
    assert!(!stderr.contains("serving"), "{stderr}");
}

/// Tests that the browser flags are checked at start: an origin a browser
/// would never send is refused naming it and how to write one, an address in
/// use names the address, and --web-ui or --web-allowed-origin without
/// --web-listen are refused.
#[test]
fn web_flags_name_the_value_and_the_fix() {
    let web = ["--web-listen", "127.0.0.1:0"];
    for (origin, problem) in [
        ("app.example.com", "has no scheme"),
        ("ftp://app.example.com", "is neither http nor https"),
        ("https://app.example.com/page", "has a path"),
        ("https://", "has no host"),
    ] {
        let args = [&web[..], &["--web-allowed-origin", origin]].concat();
        let line = serve_error(&args, &[]);
        assert!(
            line.contains(&format!("web allowed origin \"{origin}\" {problem}"))
                && line.contains("scheme://host[:port]"),
            "{origin}: {line}"
        );
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    let line = serve_error(&["--listen", "127.0.0.1:0", "--web-listen", &addr], &[]);
    assert!(line.contains(&addr), "{line}");
    for args in [
        vec!["serve", "--web-ui"],
        vec!["serve", "--web-allowed-origin", "https://app.example.com"],
    ] {
        let output = heartbeat(&args, &[]);
        assert!(!output.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--web-listen"), "{args:?}: {stderr}");
    }
}

/// Tests that the suspicion and rotation flags are checked at start, just
/// past each bound, with a line naming the value and the fix.
#[test]
fn suspicion_and_rotation_flags_name_the_value_and_the_fix() {
    for (args, expected) in [
        (
            vec!["--suspicion", "adaptive", "--phi-threshold", "0.9"],
            "phi threshold 0.9 is out of range: use 1 to 30",
        ),
        (
            vec!["--suspicion", "adaptive", "--phi-threshold", "30.1"],
            "phi threshold 30.1 is out of range",
        ),
        (
            vec!["--phi-threshold", "8"],
            "--phi-threshold applies only with --suspicion adaptive",
        ),
        (
            vec!["--max-session-age", "0s"],
            "max_session_age must be greater than zero",
        ),
        (
            vec!["--rotation-grace", "0s"],
            "rotation_grace must be greater than zero",
        ),
        (
            vec!["--max-rotations-per-second", "0"],
            "max_rotations_per_second must be at least 1",
        ),
    ] {
        let line = serve_error(&args, &[]);
        assert!(line.contains(expected), "{args:?}: {line}");
    }
    let output = heartbeat(&["serve", "--suspicion", "sometimes"], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("fixed") && stderr.contains("adaptive"),
        "{stderr}"
    );
}
