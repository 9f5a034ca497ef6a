//! Clients in other languages, generated from `proto/`, against the real
//! `heartbeat` binary: the Python package (`interop/python`, grpcio) and the
//! Node package (`interop/node`, @grpc/grpc-js with @grpc/proto-loader).
//!
//! Each scenario runs once per language. The clients are the packages'
//! examples and sketches, and `conformance.py` / `conformance.js`, which
//! print what they receive as one JSON object a line; the assertions live
//! here, so both languages are held to the same checks. Python and Node are
//! installed on first run (see `support::languages`).

mod support;

use std::{net::SocketAddr, process::ExitStatus, time::Duration};

use serde_json::Value;
use support::{
    certs::{Pems, TestCa},
    driver::Driver,
    languages::{node, python},
    proxy::CutProxy,
    *,
};
use tonic_heartbeat::protocol::pb::{self, heartbeat_request::Frame as In};

/// The interop server's timing: quick enough for tests, slow enough that a
/// Python or Node client on a busy CI machine keeps up.
const TIMING: [&str; 8] = [
    "--ping-interval",
    "100ms",
    "--timeout",
    "500ms",
    "--min-ping-interval",
    "20ms",
    "--reconnect-after",
    "300ms",
];
const TIMEOUT: f64 = 0.5;
/// `TIMING` with a timeout that outlasts a flooding client's busy loop.
const FLOOD_TIMING: [&str; 6] = [
    "--ping-interval",
    "100ms",
    "--timeout",
    "10s",
    "--min-ping-interval",
    "20ms",
];
const RECONNECT_AFTER: f64 = 0.3;

/// The real binary with the interop timing, killed when dropped.
struct Server(ServerProcess);

impl std::ops::Deref for Server {
    type Target = ServerProcess;

    fn deref(&self) -> &ServerProcess {
        &self.0
    }
}

impl Server {
    /// A server with the interop timing and `extra` flags.
    fn start(extra: &[&str]) -> Self {
        let args: Vec<&str> = TIMING.iter().chain(extra).copied().collect();
        Self(ServerProcess::start(&args))
    }

    /// A server listening on `addr` (to restart one where clients expect it).
    fn start_at(addr: SocketAddr) -> Self {
        Self::start(&["--listen", &addr.to_string()])
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }

    /// Sends `signal` and waits for the process to exit.
    fn stop(mut self, how: &str) -> ExitStatus {
        signal(&self.0.child, how);
        self.0.child.wait().expect("wait for the server")
    }

    /// The open sessions (one page is plenty here), with epoch and revision.
    async fn list(&self) -> (u64, u64, Vec<String>) {
        let page = list_sessions(self.addr).await;
        assert!(page.next_page_token.is_empty(), "one page");
        let mut ids: Vec<String> = page.sessions.into_iter().map(|s| s.session_id).collect();
        ids.sort();
        (page.epoch, page.revision, ids)
    }
}

#[derive(Clone, Copy, Debug)]
enum Lang {
    Python,
    Node,
}

impl Lang {
    fn other(self) -> Self {
        match self {
            Lang::Python => Lang::Node,
            Lang::Node => Lang::Python,
        }
    }

    /// `conformance.py` or `conformance.js` with `args`.
    fn conformance(self, args: &[&str]) -> Driver {
        let command = match self {
            Lang::Python => python().command(["conformance.py"].iter().chain(args)),
            Lang::Node => node().command(["conformance.js"].iter().chain(args)),
        };
        Driver::spawn(format!("{self:?} conformance {args:?}"), command)
    }

    /// The package's example, holding a session, printing JSON.
    fn example(self, args: &[&str]) -> Driver {
        let command = match self {
            Lang::Python => {
                python().command(["-m", "heartbeat_client", "--json"].iter().chain(args))
            }
            Lang::Node => node().command(["example.js", "--json"].iter().chain(args)),
        };
        Driver::spawn(format!("{self:?} example {args:?}"), command)
    }

    /// The README's sketch, on the generated stubs alone.
    fn sketch(self, target: &str, client_id: &str) -> Driver {
        let command = match self {
            Lang::Python => {
                let mut command = python().command(["sketch.py", target, client_id]);
                command.env("PYTHONPATH", &python().stubs);
                command
            }
            Lang::Node => node().command(["sketch.js", target, client_id]),
        };
        Driver::spawn(format!("{self:?} sketch"), command)
    }
}

fn is(field: &'static str, value: &'static str) -> impl Fn(&Value) -> bool {
    move |line| line[field] == value
}

fn frames<'a>(story: &'a [Value], kind: &str) -> Vec<&'a Value> {
    story.iter().filter(|line| line["frame"] == kind).collect()
}

/// The last line of a `raw` story: the call's final status.
fn final_status(story: &[Value]) -> &str {
    story
        .iter()
        .rev()
        .find_map(|line| line["end"].as_str())
        .unwrap_or("no status")
}

/// Runs every scenario below once for Python and once for Node.
macro_rules! in_both_languages {
    ($($scenario:ident),* $(,)?) => {
        mod python {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Lang::Python).await;
                }
            )*
        }
        mod node {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Lang::Node).await;
                }
            )*
        }
    };
}

in_both_languages!(
    welcome_fields_pings_and_pong_echo,
    a_client_that_only_answers_pings_outlives_many_timeouts,
    a_silent_client_gets_goodbye_timeout_and_deadline_exceeded,
    a_flood_gets_goodbye_too_many_pings,
    the_examples_goodbye_on_sigint_and_sigterm_is_seen_by_the_other_language,
    a_restarted_server_gets_a_new_session,
    a_frozen_server_is_lost_after_its_timeout,
    client_credentials_require_a_token,
    tls_with_a_ca_file,
    the_example_names_a_bad_argument,
    rotation_is_make_before_break,
    an_anonymous_client_leaves_its_old_session_after_rotating,
);

/// Tests Welcome's fields, the server's pings numbered from 1, and that
/// pongs echo each ping's `seq`, up to 2^53 - 1 (the largest a JavaScript
/// number holds exactly).
async fn welcome_fields_pings_and_pong_echo(lang: Lang) {
    let server = Server::start(&[]);
    let big = ((1u64 << 53) - 1).to_string();
    let args = [
        "raw",
        "--target",
        &server.target(),
        "--client-id",
        "welcome",
        "--ping",
        "7",
        "--ping",
        &big,
        "--answer",
        "--goodbye-after",
        "0.45",
    ];
    let mut raw = lang.conformance(&args);
    let story = raw.until_exit().await;
    let transcript = raw.transcript();
    let welcome = frames(&story, "welcome");
    assert_eq!(welcome.len(), 1, "{transcript}");
    assert!(welcome[0]["session_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    assert_eq!(welcome[0]["ping_interval"], 0.1, "{transcript}");
    assert_eq!(welcome[0]["timeout"], TIMEOUT, "{transcript}");
    let pongs: Vec<u64> = frames(&story, "pong")
        .iter()
        .filter_map(|pong| pong["seq"].as_u64())
        .collect();
    assert_eq!(pongs, [7, (1 << 53) - 1], "{transcript}");
    let pings: Vec<u64> = frames(&story, "ping")
        .iter()
        .filter_map(|ping| ping["seq"].as_u64())
        .collect();
    assert!(
        pings.len() >= 2,
        "pings every 100 ms for 450 ms: {transcript}"
    );
    assert!(
        pings.iter().copied().eq(1..=pings.len() as u64),
        "{transcript}"
    );
    assert!(frames(&story, "goodbye").is_empty(), "{transcript}");
    assert_eq!(final_status(&story), "OK", "{transcript}");
}

/// Tests that the sketch, which only answers pings, lives through four
/// timeouts, and learns why it ended when evicted.
async fn a_client_that_only_answers_pings_outlives_many_timeouts(lang: Lang) {
    let server = Server::start(&[]);
    let mut sketch = lang.sketch(&server.target(), "answers-only");
    let line = sketch.expect_text("session ").await;
    let session_id = line.trim_start_matches("session ").to_owned();
    tokio::time::sleep(Duration::from_secs_f64(4.0 * TIMEOUT)).await;
    let (_, _, open) = server.list().await;
    assert!(open.contains(&session_id), "{}", sketch.transcript());
    server
        .presence()
        .await
        .evict_session(pb::EvictSessionRequest {
            session_id,
            message: "interop".into(),
        })
        .await
        .expect("evict");
    sketch.expect_text("goodbye GOODBYE_REASON_EVICTED").await;
    sketch.expect_text("ended ABORTED").await;
    let early = sketch
        .seen
        .iter()
        .filter(|line| line.starts_with("goodbye"))
        .count();
    assert_eq!(
        early,
        1,
        "no goodbye before the eviction\n{}",
        sketch.transcript()
    );
}

/// Tests that a client that says Hello and nothing more is ended with
/// Goodbye{TIMEOUT} and DEADLINE_EXCEEDED, not before its timeout.
async fn a_silent_client_gets_goodbye_timeout_and_deadline_exceeded(lang: Lang) {
    let server = Server::start(&[]);
    let mut raw = lang.conformance(&["raw", "--target", &server.target(), "--client-id", "silent"]);
    let story = raw.until_exit().await;
    let transcript = raw.transcript();
    let goodbye = frames(&story, "goodbye");
    assert_eq!(goodbye.len(), 1, "{transcript}");
    assert_eq!(
        goodbye[0]["reason"], "GOODBYE_REASON_TIMEOUT",
        "{transcript}"
    );
    assert_eq!(final_status(&story), "DEADLINE_EXCEEDED", "{transcript}");
    let hello = story.iter().find(|line| line["sent"] == "hello");
    let sent = hello
        .and_then(|line| line["t"].as_f64())
        .expect("hello sent");
    let ended = goodbye[0]["t"].as_f64().expect("a time");
    // "sent" is noted just before the Hello is written; times are in µs.
    assert!(ended - sent >= TIMEOUT - 1e-6, "ended early: {transcript}");
}

/// Tests that pings without pause earn Goodbye{TOO_MANY_PINGS} and
/// RESOURCE_EXHAUSTED.
async fn a_flood_gets_goodbye_too_many_pings(lang: Lang) {
    // A flooding client may not yield to its event loop for most of a
    // second on a loaded machine (seen with Node under CI), which the usual
    // 500 ms timeout would end as TIMEOUT: this one is about the pings.
    let server = Server(ServerProcess::start(&FLOOD_TIMING));
    let args = [
        "raw",
        "--target",
        &server.target(),
        "--client-id",
        "flood",
        "--flood",
    ];
    let mut raw = lang.conformance(&args);
    let story = raw.until_exit().await;
    let transcript = raw.transcript();
    let goodbye = frames(&story, "goodbye");
    assert_eq!(goodbye.len(), 1, "{transcript}");
    assert_eq!(
        goodbye[0]["reason"], "GOODBYE_REASON_TOO_MANY_PINGS",
        "{transcript}"
    );
    assert_eq!(final_status(&story), "RESOURCE_EXHAUSTED", "{transcript}");
}

/// Tests that the example says goodbye and exits 0 on SIGINT and on SIGTERM,
/// and that a watcher written in the other language sees CLIENT_GOODBYE.
async fn the_examples_goodbye_on_sigint_and_sigterm_is_seen_by_the_other_language(lang: Lang) {
    let server = Server::start(&[]);
    let mut watcher = lang
        .other()
        .conformance(&["watch", "--target", &server.target()]);
    watcher.expect("synced", is("event", "synced")).await;
    for how in ["-INT", "-TERM"] {
        let client_id = format!("goodbye{how}");
        let mut example = lang.example(&[
            "--target",
            &server.target(),
            "--client-id",
            &client_id,
            "--label",
            "suite=interop",
        ]);
        let connected = example.expect("connected", is("event", "connected")).await;
        let session_id = connected["session_id"].clone();
        watcher
            .expect("opened", |line| {
                line["event"] == "opened" && line["session_id"] == session_id
            })
            .await;
        example.signal(how);
        example.expect("closed", is("event", "closed")).await;
        let status = example.exit().await;
        assert!(status.success(), "exit {status}\n{}", example.transcript());
        let closed = watcher
            .expect("closed", |line| {
                line["event"] == "closed" && line["session_id"] == session_id
            })
            .await;
        assert_eq!(
            closed["reason"],
            "CLOSE_REASON_CLIENT_GOODBYE",
            "{}",
            watcher.transcript()
        );
        assert_eq!(closed["client_id"], client_id.as_str());
    }
}

/// Tests that the example survives a drained server (waiting out the
/// reconnect hint) and a killed one, with a new session each time.
async fn a_restarted_server_gets_a_new_session(lang: Lang) {
    let addr = free_port();
    let server = Server::start_at(addr);
    let target = addr.to_string();
    let mut example = lang.example(&["--target", &target, "--client-id", "restart"]);
    let first = example.expect("connected", is("event", "connected")).await;

    assert!(server.stop("-TERM").success(), "the drain exits 0");
    let lost = example.expect("lost", is("event", "lost")).await;
    assert_eq!(
        lost["goodbye"],
        "GOODBYE_REASON_SERVER_SHUTDOWN",
        "{}",
        example.transcript()
    );
    assert_eq!(
        lost["reconnect_after"],
        RECONNECT_AFTER,
        "{}",
        example.transcript()
    );
    let wait = example
        .expect("reconnecting", is("event", "reconnecting"))
        .await;
    let delay = wait["delay"].as_f64().expect("a delay");
    assert!(
        delay >= RECONNECT_AFTER,
        "the hint is honoured: {}",
        example.transcript()
    );
    let server = Server::start_at(addr);
    let second = example.expect("connected", is("event", "connected")).await;
    assert_ne!(first["session_id"], second["session_id"]);

    drop(server); // SIGKILL: no goodbye, the connection just ends.
    example.expect("lost", is("event", "lost")).await;
    let _server = Server::start_at(addr);
    let third = example.expect("connected", is("event", "connected")).await;
    assert_ne!(second["session_id"], third["session_id"]);
    example.signal("-TERM");
    assert!(example.exit().await.success(), "{}", example.transcript());
}

/// Tests that the example takes a frozen server (SIGSTOP) for lost once no
/// frame came for the session's timeout, and gets a new session once the
/// server runs again.
async fn a_frozen_server_is_lost_after_its_timeout(lang: Lang) {
    let server = Server::start(&[]);
    let mut example = lang.example(&["--target", &server.target(), "--client-id", "frozen"]);
    let first = example.expect("connected", is("event", "connected")).await;
    signal(&server.child, "-STOP");
    let frozen = tokio::time::Instant::now();
    let lost = example.expect("lost", is("event", "lost")).await;
    let waited = frozen.elapsed().as_secs_f64();
    signal(&server.child, "-CONT");
    assert_eq!(lost["kind"], "timeout", "{}", example.transcript());
    // The last frame came at most one ping interval before the freeze.
    assert!(
        waited >= TIMEOUT - 0.1,
        "lost after {waited} s\n{}",
        example.transcript()
    );
    let second = example.expect("connected", is("event", "connected")).await;
    assert_ne!(first["session_id"], second["session_id"]);
}

/// Tests make-before-break rotation: past the server's maximum age the
/// example moves to a successor (a `rotated` event, never `lost`), twice,
/// and a watcher sees each successor opened before its predecessor closed
/// as REPLACED, so the client id is never missing from presence.
async fn rotation_is_make_before_break(lang: Lang) {
    let server = Server::start(&["--max-session-age", "700ms", "--rotation-grace", "5s"]);
    let client_id = format!("rotating-{lang:?}");
    let mut watch = server
        .presence()
        .await
        .watch_sessions(pb::WatchSessionsRequest {
            client_id: client_id.clone(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut example = lang.example(&["--target", &server.target(), "--client-id", &client_id]);
    let connected = example.expect("connected", is("event", "connected")).await;
    let mut current = connected["session_id"].as_str().expect("an id").to_owned();
    for _ in 0..2 {
        let rotated = example
            .expect("rotated", |line| {
                line["event"] == "rotated" || line["event"] == "lost"
            })
            .await;
        assert_eq!(rotated["event"], "rotated", "{}", example.transcript());
        assert_eq!(
            rotated["from_session_id"],
            current.as_str(),
            "{}",
            example.transcript()
        );
        let to = rotated["to_session_id"].as_str().expect("an id").to_owned();
        let mut successor_opened = false;
        loop {
            let event = within(WAIT, watch.message())
                .await
                .expect("watching")
                .expect("an event");
            match event.event {
                Some(pb::watch_sessions_response::Event::Opened(session))
                    if session.session_id == to =>
                {
                    successor_opened = true;
                }
                Some(pb::watch_sessions_response::Event::Closed(closed))
                    if closed
                        .session
                        .as_ref()
                        .is_some_and(|s| s.session_id == current) =>
                {
                    assert!(successor_opened, "{current} closed before {to} opened");
                    assert_eq!(closed.reason(), pb::CloseReason::Replaced);
                    break;
                }
                _ => {}
            }
        }
        current = to;
    }
    example.signal("-TERM");
    assert!(example.exit().await.success(), "{}", example.transcript());
    assert!(
        !example.seen.iter().any(|line| line.contains("\"lost\"")),
        "{}",
        example.transcript()
    );
}

/// Tests rotation of an anonymous client (no client id), which no
/// successor's Hello replaces: the example moves to its successor
/// (`rotated`) and leaves the old session itself, which closes as
/// CLIENT_GOODBYE rather than running out the grace as ROTATED.
async fn an_anonymous_client_leaves_its_old_session_after_rotating(lang: Lang) {
    let server = Server::start(&["--max-session-age", "700ms", "--rotation-grace", "5s"]);
    let label = format!("anonymous-{lang:?}");
    let mut watch = server
        .presence()
        .await
        .watch_sessions(pb::WatchSessionsRequest {
            labels: [("run".to_owned(), label.clone())].into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut example = lang.example(&[
        "--target",
        &server.target(),
        "--label",
        &format!("run={label}"),
    ]);
    let connected = example.expect("connected", is("event", "connected")).await;
    let first = connected["session_id"].as_str().expect("an id").to_owned();
    let rotated = example
        .expect("rotated", |line| {
            line["event"] == "rotated" || line["event"] == "lost"
        })
        .await;
    assert_eq!(rotated["event"], "rotated", "{}", example.transcript());
    let reason = loop {
        let event = within(WAIT, watch.message())
            .await
            .expect("watching")
            .expect("an event");
        if let Some(pb::watch_sessions_response::Event::Closed(closed)) = event.event {
            if closed
                .session
                .as_ref()
                .is_some_and(|s| s.session_id == first)
            {
                break closed.reason();
            }
        }
    };
    assert_eq!(
        reason,
        pb::CloseReason::ClientGoodbye,
        "{}",
        example.transcript()
    );
    example.signal("-TERM");
    assert!(example.exit().await.success(), "{}", example.transcript());
}

/// Tests that with client credentials on, a session needs a token, and the
/// token names the client ids it may use.
async fn client_credentials_require_a_token(lang: Lang) {
    let pems = Pems::new(&format!("credentials-{lang:?}"));
    let credentials = pems.write("credentials", "tok-interop interop-*\n");
    let token = pems.write("token", "tok-interop\n");
    let server = Server::start(&["--client-credentials", credentials.to_str().expect("utf-8")]);
    let target = server.target();
    let token = token.to_str().expect("utf-8");

    let mut anonymous = lang.example(&["--target", &target, "--client-id", "interop-a"]);
    let lost = anonymous.expect("lost", is("event", "lost")).await;
    assert_eq!(
        lost["code"],
        "UNAUTHENTICATED",
        "{}",
        anonymous.transcript()
    );

    let mut squatter = lang.example(&[
        "--target",
        &target,
        "--client-id",
        "admin",
        "--token-file",
        token,
    ]);
    let lost = squatter.expect("lost", is("event", "lost")).await;
    assert_eq!(
        lost["code"],
        "PERMISSION_DENIED",
        "{}",
        squatter.transcript()
    );

    let mut allowed = lang.example(&[
        "--target",
        &target,
        "--client-id",
        "interop-a",
        "--token-file",
        token,
    ]);
    allowed.expect("connected", is("event", "connected")).await;
    allowed.signal("-TERM");
    assert!(allowed.exit().await.success(), "{}", allowed.transcript());
}

/// Tests that the example connects over TLS trusting a CA file, and that
/// plaintext to a TLS server does not connect.
async fn tls_with_a_ca_file(lang: Lang) {
    let pems = Pems::new(&format!("interop-{lang:?}"));
    let ca = TestCa::new("interop CA");
    let (cert, key) = ca.server_leaf();
    let ca_file = pems.write("ca.pem", &ca.pem);
    let cert = pems.write("server.pem", &cert);
    let key = pems.write("server.key", &key);
    let server = Server::start(&[
        "--tls-cert",
        cert.to_str().expect("utf-8"),
        "--tls-key",
        key.to_str().expect("utf-8"),
    ]);
    let target = server.target();

    let mut trusting = lang.example(&[
        "--target",
        &target,
        "--client-id",
        "tls",
        "--ca-file",
        ca_file.to_str().expect("utf-8"),
    ]);
    trusting
        .expect("a round trip over TLS", is("event", "rtt"))
        .await;
    trusting.signal("-TERM");
    assert!(trusting.exit().await.success(), "{}", trusting.transcript());

    let mut plaintext = lang.example(&["--target", &target, "--client-id", "plain"]);
    let lost = plaintext.expect("lost", is("event", "lost")).await;
    assert_eq!(lost["code"], "UNAVAILABLE", "{}", plaintext.transcript());
}

/// Tests that a bad `--label` exits 2 with a line naming it and the fix.
async fn the_example_names_a_bad_argument(lang: Lang) {
    let mut example = lang.example(&["--label", "zone"]);
    let status = example.exit().await;
    assert_eq!(status.code(), Some(2), "{}", example.transcript());
    let stderr = example.stderr.lock().expect("not poisoned").clone();
    assert!(
        stderr.contains("'zone'") && stderr.contains("KEY=VALUE"),
        "{stderr}"
    );
}

/// Tests that a Python watcher and a Node watcher, both cut off mid-churn
/// by a proxy, resume by revision (a replay: no reset, since the epoch
/// survived JavaScript numbers, and no session reported opened twice, as a
/// fresh snapshot would) and end with the same view as ListSessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_node_watchers_resume_and_agree_with_list_sessions() {
    // Slow timing: no session turns suspect while the test runs, so the
    // view stops changing when the churn does.
    let server = Server(ServerProcess::start(&[
        "--ping-interval",
        "10s",
        "--timeout",
        "30s",
    ]));
    let proxy = CutProxy::start(server.addr).await;
    let target = proxy.addr.to_string();
    let mut watchers = [Lang::Python, Lang::Node]
        .map(|lang| lang.conformance(&["watch", "--target", &target, "--views"]));
    for watcher in &mut watchers {
        watcher.expect("synced", is("event", "synced")).await;
    }
    let mut kept = churn(server.addr, "before").await;
    let during = tokio::spawn(churn(server.addr, "during"));
    for watcher in &mut watchers {
        watcher
            .expect("the churn under way", |line| {
                line["event"] == "opened" && line["client_id"] == "churn-during-3"
            })
            .await;
    }
    assert_eq!(proxy.cut(), 2, "each watcher had its connection");
    kept.extend(during.await.expect("the churn"));
    kept.extend(churn(server.addr, "after").await);

    let (epoch, revision, open) = server.list().await;
    assert_eq!(open.len(), kept.len());
    for watcher in &mut watchers {
        watcher
            .expect("interrupted", is("event", "interrupted"))
            .await;
        let view = watcher
            .expect("the view at ListSessions' revision", |line| {
                line["event"] == "view" && line["revision"].as_u64() >= Some(revision)
            })
            .await;
        let transcript = watcher.transcript();
        assert_eq!(view["revision"], revision, "{transcript}");
        assert_eq!(view["epoch"], epoch, "{transcript}");
        assert_eq!(view["sessions"], serde_json::json!(open), "{transcript}");
        let resets = watcher
            .seen
            .iter()
            .filter(|line| line.contains(r#""reset""#));
        assert_eq!(resets.count(), 0, "a resume replays: {transcript}");
        let mut opened = std::collections::HashSet::new();
        for line in &watcher.seen {
            let event: Value = serde_json::from_str(line).unwrap_or_default();
            if event["event"] == "opened" {
                let id = event["session_id"].to_string();
                assert!(
                    opened.insert(id),
                    "opened twice, so not replayed: {transcript}"
                );
            }
        }
    }
    drop(kept);
}

/// Opens 30 sessions and ends 20 of them, by goodbye and by half-close;
/// returns the 10 left open.
async fn churn(addr: SocketAddr, round: &str) -> Vec<RawSession> {
    let mut open = Vec::new();
    for n in 0..30 {
        let (session, _) = RawSession::hello(addr, &format!("churn-{round}-{n}")).await;
        open.push(session);
    }
    for (n, mut session) in open.drain(..20).enumerate() {
        if n % 2 == 0 {
            session
                .send(In::Goodbye(pb::Goodbye {
                    reason: pb::GoodbyeReason::ClientShutdown.into(),
                    ..Default::default()
                }))
                .await;
        }
        session.half_close();
        session.ended().await;
    }
    open
}

/// Tests that the Node package's JSDoc types pass `tsc --checkJs`.
#[test]
fn the_node_package_type_checks() {
    let output = node()
        .command(["node_modules/typescript/bin/tsc", "-p", "."])
        .output()
        .expect("run tsc");
    assert!(
        output.status.success(),
        "tsc -p interop/node:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
