//! A real browser against the real binary: Debian's Chromium, driven by
//! playwright-core (`tests/browser/driver.mjs`), opening pages that use the
//! server's `/heartbeat.js`, and the presence page at `/`. Both are installed
//! on first run (see `support::languages`).
//!
//! The driver only does what it is told and prints what the pages report;
//! the assertions live here, beside a gRPC view of the same server.

mod support;

use std::{net::SocketAddr, time::Duration};

use serde_json::{json, Value};
use support::{
    driver::Driver, free_port, languages::browser, list_sessions, presence_client, signal, within,
    ServerProcess, WAIT,
};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic_heartbeat::protocol::pb::{self, watch_sessions_response::Event};

/// Quick timing, slow enough for a browser on a busy CI machine.
const TIMING: [&str; 8] = [
    "--ping-interval",
    "200ms",
    "--timeout",
    "1s",
    "--min-ping-interval",
    "50ms",
    "--reconnect-after",
    "300ms",
];
const TIMEOUT: Duration = Duration::from_secs(1);
const PING_INTERVAL: Duration = Duration::from_millis(200);

/// The binary with a browser listener, the presence page and `extra` flags.
struct Server {
    process: ServerProcess,
    web: SocketAddr,
    /// The origin the test pages come from (the driver serves them), which
    /// the server allows.
    app: String,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        Self::start_at(
            free_port(),
            free_port(),
            format!("http://{}", free_port()),
            extra,
        )
    }

    fn start_at(grpc: SocketAddr, web: SocketAddr, app: String, extra: &[&str]) -> Self {
        let (grpc, web_text) = (grpc.to_string(), web.to_string());
        let mut args: Vec<&str> = TIMING.to_vec();
        args.extend([
            "--listen",
            &grpc,
            "--web-listen",
            &web_text,
            "--web-allowed-origin",
            &app,
            "--web-ui",
        ]);
        args.extend(extra);
        Self {
            process: ServerProcess::start(&args),
            web,
            app,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.process.addr
    }

    /// A gRPC watch of every session, from now.
    async fn watch(&self) -> tonic::Streaming<pb::WatchSessionsResponse> {
        presence_client(self.addr())
            .await
            .watch_sessions(pb::WatchSessionsRequest::default())
            .await
            .expect("WatchSessions")
            .into_inner()
    }
}

/// The driver and the reports it printed that no one has read yet.
struct Chromium {
    driver: Driver,
    unread: Vec<Value>,
    next_id: u64,
}

impl Chromium {
    async fn launch(server: &Server) -> Self {
        Self::launch_with(server, &[]).await
    }

    /// With `["--lifecycle", "on"]`, a Chromium whose pages can be frozen.
    async fn launch_with(server: &Server, extra: &[&str]) -> Self {
        let web = format!("http://{}", server.web);
        let mut args = vec!["--web", web.as_str(), "--app", server.app.as_str()];
        args.extend(extra);
        let command = browser().driver(args);
        let mut chromium = Self {
            driver: Driver::spawn("the browser driver".into(), command).ends_on_eof(),
            unread: Vec::new(),
            next_id: 0,
        };
        chromium.report("ready", |line| line["ready"] == true).await;
        chromium
    }

    /// The first report (read or not) that `wanted` accepts, within `WAIT`.
    async fn report(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        if let Some(at) = self.unread.iter().position(&wanted) {
            return self.unread.remove(at);
        }
        let found = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.driver.next_line().await {
                let value: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if wanted(&value) {
                    return Some(value);
                }
                self.unread.push(value);
            }
            None
        })
        .await;
        match found {
            Ok(Some(value)) => value,
            Ok(None) => panic!(
                "{what}: the driver ended first\n{}",
                self.driver.transcript()
            ),
            Err(_) => panic!(
                "{what}: not seen within {WAIT:?}\n{}",
                self.driver.transcript()
            ),
        }
    }

    /// Runs one driver command and returns its reply; fails if it failed.
    async fn run(&mut self, mut command: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        command["id"] = json!(id);
        self.driver.send(&command);
        let reply = self
            .report(&format!("the reply to {command}"), |line| line["id"] == id)
            .await;
        assert_eq!(
            reply["ok"],
            true,
            "{command} failed: {reply}\n{}",
            self.driver.transcript()
        );
        reply
    }

    /// Opens a tab holding a session of `client_id`; returns its Connected.
    async fn open(&mut self, tab: &str, client_id: &str, encoding: &str) -> Value {
        self.run(json!({
            "cmd": "open", "tab": tab, "clientId": client_id, "encoding": encoding,
            "labels": { "tab": tab, "encoding": encoding },
        }))
        .await;
        self.event(tab, "connected").await["detail"].clone()
    }

    /// The tab's next session event of `kind`.
    async fn event(&mut self, tab: &str, kind: &str) -> Value {
        self.report(&format!("{tab}: {kind}"), |line| {
            line["tab"] == tab && line["event"] == kind
        })
        .await
    }

    /// Whether the tab reported an event of `kind` (read or not) so far.
    fn reported(&self, tab: &str, kind: &str) -> bool {
        self.unread
            .iter()
            .any(|line| line["tab"] == tab && line["event"] == kind)
    }
}

/// The session's close, as a gRPC watcher sees it: the reason and when.
async fn closed(
    watch: &mut tonic::Streaming<pb::WatchSessionsResponse>,
    session_id: &str,
) -> (pb::CloseReason, Instant) {
    loop {
        let event = within(WAIT, watch.next())
            .await
            .expect("watching")
            .expect("an event");
        if let Some(Event::Closed(closed)) = event.event {
            if closed
                .session
                .as_ref()
                .is_some_and(|s| s.session_id == session_id)
            {
                return (closed.reason(), Instant::now());
            }
        }
    }
}

fn session_id(connected: &Value) -> String {
    connected["sessionId"]
        .as_str()
        .expect("a session id")
        .to_owned()
}

/// Tests that pages open sessions over both subprotocols, that the server
/// lists them with their labels, and that they stay alive across several
/// timeouts, measuring round trips.
#[tokio::test]
async fn pages_hold_sessions_over_both_subprotocols() {
    let server = Server::start(&[]);
    let mut chromium = Chromium::launch(&server).await;
    let proto = session_id(&chromium.open("p", "page-proto", "proto").await);
    let json = session_id(&chromium.open("j", "page-json", "json").await);
    let listed = list_sessions(server.addr()).await.sessions;
    for (id, client, encoding) in [
        (&proto, "page-proto", "proto"),
        (&json, "page-json", "json"),
    ] {
        let session = listed
            .iter()
            .find(|session| &session.session_id == id)
            .unwrap_or_else(|| panic!("{client} listed: {listed:?}"));
        assert_eq!(session.client_id, client);
        assert_eq!(
            session.labels.get("encoding").map(String::as_str),
            Some(encoding)
        );
    }
    // Three timeouts later, the same sessions, with round trips measured.
    let mut watch = server.watch().await;
    let until = Instant::now() + 3 * TIMEOUT;
    while Instant::now() < until {
        if let Ok(Some(Ok(event))) = tokio::time::timeout_at(until, watch.next()).await {
            assert!(
                !matches!(event.event, Some(Event::Closed(_))),
                "a page session closed: {event:?}"
            );
        }
    }
    for tab in ["p", "j"] {
        chromium.event(tab, "rtt").await;
        assert!(!chromium.reported(tab, "lost"), "{tab} lost its session");
    }
    let ids: Vec<String> = list_sessions(server.addr())
        .await
        .sessions
        .into_iter()
        .map(|session| session.session_id)
        .collect();
    assert!(ids.contains(&proto) && ids.contains(&json), "{ids:?}");
}

/// Tests how a page's session ends: closing the tab is DISCONNECTED, and the
/// page calling `close()` is CLIENT_GOODBYE.
#[tokio::test]
async fn closing_a_tab_disconnects_and_close_says_goodbye() {
    let server = Server::start(&[]);
    let mut chromium = Chromium::launch(&server).await;
    let mut watch = server.watch().await;
    let gone = session_id(&chromium.open("gone", "page-gone", "proto").await);
    let leaving = session_id(&chromium.open("leaving", "page-leaving", "json").await);
    chromium
        .run(json!({ "cmd": "closeTab", "tab": "gone" }))
        .await;
    assert_eq!(
        closed(&mut watch, &gone).await.0,
        pb::CloseReason::Disconnected
    );
    chromium
        .run(json!({ "cmd": "close", "tab": "leaving" }))
        .await;
    assert_eq!(
        closed(&mut watch, &leaving).await.0,
        pb::CloseReason::ClientGoodbye
    );
    chromium.event("leaving", "closed").await;
}

/// Tests that a page frozen through the DevTools protocol runs nothing, so
/// its session is suspected and then ends as TIMEOUT on time, and that a gRPC
/// watcher sees its opened, suspected and closed in order, like any other
/// session's.
#[tokio::test]
async fn a_frozen_page_times_out_on_time() {
    let server = Server::start(&[]);
    let mut chromium = Chromium::launch_with(&server, &["--lifecycle", "on"]).await;
    let mut watch = server.watch().await;
    let id = session_id(&chromium.open("frozen", "page-frozen", "proto").await);
    chromium
        .run(json!({ "cmd": "freeze", "tab": "frozen" }))
        .await;
    let mut seen = Vec::new();
    let (last_seen, closed_at) = loop {
        let event = within(WAIT, watch.next())
            .await
            .expect("watching")
            .expect("an event");
        let (kind, session) = match &event.event {
            Some(Event::Opened(session)) => ("opened", Some(session)),
            Some(Event::Suspected(suspected)) => ("suspected", suspected.session.as_ref()),
            Some(Event::Recovered(recovered)) => ("recovered", recovered.session.as_ref()),
            Some(Event::Closed(closed)) => ("closed", closed.session.as_ref()),
            _ => continue,
        };
        if session.is_some_and(|session| session.session_id == id) {
            seen.push((kind, event.revision));
            if let Some(Event::Closed(closed)) = &event.event {
                assert_eq!(closed.reason(), pb::CloseReason::Timeout);
                let last_seen = session
                    .and_then(|session| session.last_seen)
                    .and_then(|at| std::time::SystemTime::try_from(at).ok())
                    .expect("the closed session's last_seen");
                break (last_seen, std::time::SystemTime::now());
            }
        }
    };
    // Opened first, then (a busy machine may add suspected and recovered
    // pairs before the freeze) suspected and closed last.
    let kinds: Vec<&str> = seen.iter().map(|(kind, _)| *kind).collect();
    assert_eq!(kinds.first(), Some(&"opened"), "{seen:?}");
    assert!(kinds.ends_with(&["suspected", "closed"]), "{seen:?}");
    assert!(
        seen.windows(2).all(|pair| pair[0].1 < pair[1].1),
        "revisions rise: {seen:?}"
    );
    // Closed a timeout after the page's last frame, and not much later.
    let after = closed_at
        .duration_since(last_seen)
        .expect("closed after the last frame");
    assert!(
        after >= TIMEOUT && after <= TIMEOUT + Duration::from_millis(500),
        "closed {after:?} after the page's last frame; the timeout is {TIMEOUT:?}"
    );
}

/// Tests that a hidden tab stops its own pings (no round trips measured) yet
/// keeps its session by answering the server's, and measures again at once
/// when shown.
#[tokio::test]
async fn a_hidden_tab_pauses_its_pings_and_keeps_its_session() {
    let server = Server::start(&[]);
    let mut chromium = Chromium::launch(&server).await;
    let mut watch = server.watch().await;
    let id = session_id(&chromium.open("hidden", "page-hidden", "json").await);
    chromium.event("hidden", "rtt").await;
    chromium
        .run(json!({ "cmd": "hide", "tab": "hidden" }))
        .await;
    // Drop what was measured before hiding; anything after is a ping sent hidden.
    let settle = Instant::now() + PING_INTERVAL;
    while let Ok(Some(line)) = tokio::time::timeout_at(settle, chromium.driver.next_line()).await {
        let _ = line;
    }
    chromium.unread.clear();
    let until = Instant::now() + 2 * TIMEOUT;
    while Instant::now() < until {
        match tokio::time::timeout_at(until, watch.next()).await {
            Ok(Some(Ok(event))) => {
                if let Some(Event::Closed(closed)) = &event.event {
                    assert_ne!(
                        closed.session.as_ref().map(|s| s.session_id.as_str()),
                        Some(id.as_str()),
                        "the hidden tab's session closed: {closed:?}"
                    );
                }
            }
            _ => break,
        }
    }
    while let Ok(Some(line)) =
        tokio::time::timeout(Duration::from_millis(10), chromium.driver.next_line()).await
    {
        chromium
            .unread
            .push(serde_json::from_str(&line).unwrap_or(Value::Null));
    }
    assert!(
        !chromium.reported("hidden", "rtt"),
        "pinged while hidden: {:?}",
        chromium.unread
    );
    assert!(
        !chromium.reported("hidden", "lost"),
        "lost while hidden: {:?}",
        chromium.unread
    );
    chromium
        .run(json!({ "cmd": "show", "tab": "hidden" }))
        .await;
    chromium.event("hidden", "rtt").await;
    assert!(
        !chromium.reported("hidden", "lost"),
        "{:?}",
        chromium.unread
    );
}

/// Tests that the presence page resumes by revision after its connection
/// drops (a proxy cuts it): no reset, and both a session opened meanwhile
/// and the close of one from before show.
#[tokio::test]
async fn the_presence_page_resumes_after_a_drop() {
    let server = Server::start(&[]);
    let proxy = support::proxy::CutProxy::start(server.web).await;
    let mut chromium = Chromium::launch(&server).await;
    let url = format!("http://{}/", proxy.addr);
    chromium
        .run(json!({ "cmd": "presence", "tab": "presence", "url": url }))
        .await;
    chromium
        .run(json!({ "cmd": "wait", "tab": "presence", "selector": "#status[data-state=live]", "timeoutMs": 5000 }))
        .await;
    let before = session_id(&chromium.open("before", "page-before", "proto").await);
    let row = |id: &str| format!("tr[data-session-id=\"{id}\"]");
    chromium
        .run(json!({ "cmd": "wait", "tab": "presence", "selector": row(&before), "timeoutMs": 5000 }))
        .await;
    assert!(proxy.cut() >= 1, "the page's watch went through the proxy");
    let during = session_id(&chromium.open("during", "page-during", "json").await);
    chromium
        .run(json!({ "cmd": "closeTab", "tab": "before" }))
        .await;
    chromium
        .run(json!({ "cmd": "wait", "tab": "presence", "selector": row(&during), "timeoutMs": 10000 }))
        .await;
    let feed = format!(
        "#feed li[data-session-id=\"{before}\"][data-reason=\"CLOSE_REASON_DISCONNECTED\"]"
    );
    chromium
        .run(json!({ "cmd": "wait", "tab": "presence", "selector": feed, "timeoutMs": 10000 }))
        .await;
    chromium
        .run(json!({
            "cmd": "wait", "tab": "presence", "timeoutMs": 10000,
            "selector": "#status[data-state=live][data-resets=\"0\"]:not([data-resumes=\"0\"])",
        }))
        .await;
}

/// Tests the presence page: a new session shows within 1 s, and an eviction
/// from the page's button shows its close with the reason; the evicted page
/// hears EVICTED.
#[tokio::test]
async fn the_presence_page_follows_sessions_and_evicts() {
    let token_file =
        std::env::temp_dir().join(format!("heartbeat-browser-token-{}", std::process::id()));
    std::fs::write(&token_file, "page-admin-token\n").expect("write the token");
    let token_path = token_file.to_string_lossy().into_owned();
    let server = Server::start(&["--admin-token-file", &token_path]);
    let mut chromium = Chromium::launch(&server).await;
    chromium
        .run(json!({ "cmd": "presence", "tab": "presence", "token": "page-admin-token" }))
        .await;
    chromium
        .run(json!({ "cmd": "wait", "tab": "presence", "selector": "#status[data-state=live]", "timeoutMs": 5000 }))
        .await;
    let id = session_id(&chromium.open("watched", "page-watched", "proto").await);
    let row = format!("tr[data-session-id=\"{id}\"]");
    let shown = chromium
        .run(json!({ "cmd": "wait", "tab": "presence", "selector": row, "timeoutMs": 1000 }))
        .await;
    assert!(
        shown["ms"].as_f64().is_some_and(|ms| ms <= 1000.0),
        "{shown}"
    );
    let state = chromium
        .run(json!({ "cmd": "text", "tab": "presence", "selector": format!("{row} td.state") }))
        .await;
    assert_eq!(state["text"], "live");
    chromium
        .run(
            json!({ "cmd": "click", "tab": "presence", "selector": format!("{row} button.evict") }),
        )
        .await;
    let feed = format!("#feed li[data-session-id=\"{id}\"][data-reason=\"CLOSE_REASON_EVICTED\"]");
    chromium
        .run(json!({ "cmd": "wait", "tab": "presence", "selector": feed, "timeoutMs": 5000 }))
        .await;
    let lost = chromium.event("watched", "lost").await;
    assert_eq!(
        lost["detail"]["goodbye"], "GOODBYE_REASON_EVICTED",
        "{lost}"
    );
    assert_eq!(lost["detail"]["code"], 4006, "{lost}");
    let _ = std::fs::remove_file(&token_file);
}

/// Tests the drain: the page hears SERVER_SHUTDOWN with the reconnect hint,
/// waits at least that long, and comes back to the restarted server.
#[tokio::test]
async fn after_a_drain_the_page_comes_back() {
    let (grpc, web) = (free_port(), free_port());
    let mut server = Server::start_at(grpc, web, format!("http://{}", free_port()), &[]);
    let mut chromium = Chromium::launch(&server).await;
    let first = session_id(&chromium.open("back", "page-back", "proto").await);
    signal(&server.process.child, "-TERM");
    let lost = chromium.event("back", "lost").await;
    assert_eq!(
        lost["detail"]["goodbye"], "GOODBYE_REASON_SERVER_SHUTDOWN",
        "{lost}"
    );
    assert_eq!(lost["detail"]["code"], 4002, "{lost}");
    assert_eq!(lost["detail"]["reconnectAfterMs"], 300.0, "{lost}");
    let reconnecting = chromium.event("back", "reconnecting").await;
    assert!(
        reconnecting["detail"]["delayMs"]
            .as_f64()
            .is_some_and(|ms| ms >= 300.0),
        "{reconnecting}"
    );
    let _ = server.process.child.wait();
    server = Server::start_at(grpc, web, server.app.clone(), &[]);
    let again = session_id(&chromium.event("back", "connected").await["detail"]);
    assert_ne!(again, first);
    let listed = list_sessions(server.addr()).await.sessions;
    assert!(
        listed.iter().any(|session| session.session_id == again),
        "{listed:?}"
    );
}

/// Tests that `web/heartbeat.js` type-checks under `tsc --checkJs --strict`
/// against the DOM's types (its JSDoc is its typing), and that the README's
/// browser snippet is valid module syntax.
#[test]
fn the_browser_client_type_checks_and_the_readme_snippet_parses() {
    let node = support::languages::node();
    let client = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web/heartbeat.js");
    let tsc = node
        .command([
            "node_modules/.bin/tsc",
            "--ignoreConfig",
            "--noEmit",
            "--allowJs",
            "--checkJs",
            "--strict",
        ])
        .args([
            "--target",
            "es2022",
            "--module",
            "es2022",
            "--moduleResolution",
            "bundler",
        ])
        .args(["--lib", "es2022,dom", "--skipLibCheck"])
        .arg(&client)
        .output()
        .expect("run tsc");
    assert!(
        tsc.status.success(),
        "tsc --checkJs web/heartbeat.js:\n{}{}",
        String::from_utf8_lossy(&tsc.stdout),
        String::from_utf8_lossy(&tsc.stderr)
    );
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read the README");
    let section = readme
        .split("## From a browser")
        .nth(1)
        .expect("the README has a From a browser section");
    let snippet = section
        .split("```js\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a js block");
    assert!(snippet.contains("new HeartbeatSession("), "{snippet}");
    let file = std::env::temp_dir().join(format!("heartbeat-readme-{}.mjs", std::process::id()));
    std::fs::write(&file, snippet).expect("write the snippet");
    let check = std::process::Command::new("node")
        .arg("--check")
        .arg(&file)
        .output()
        .expect("run node --check");
    let _ = std::fs::remove_file(&file);
    assert!(
        check.status.success(),
        "the README's snippet:\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// Tests rotation in the browser client, over both subprotocols: past the
/// server's maximum age each page moves to a successor socket (`rotated`,
/// never `lost`), and a gRPC watcher sees the successor opened before the
/// old session closed as REPLACED; an anonymous page, which no successor
/// replaces, leaves its old session itself (CLIENT_GOODBYE).
#[tokio::test]
async fn pages_rotate_before_they_break() {
    let server = Server::start(&["--max-session-age", "1s", "--rotation-grace", "5s"]);
    let mut chromium = Chromium::launch(&server).await;
    let mut watch = server.watch().await;
    let pages = [
        ("rp", "proto", "page-rotating-rp", pb::CloseReason::Replaced),
        ("rj", "json", "page-rotating-rj", pb::CloseReason::Replaced),
        ("ra", "json", "", pb::CloseReason::ClientGoodbye),
    ];
    let mut rotations = Vec::new();
    for (tab, encoding, client_id, expected) in pages {
        let first = session_id(&chromium.open(tab, client_id, encoding).await);
        rotations.push((tab, first, expected));
    }
    let mut successors = Vec::new();
    for (tab, first, _) in &rotations {
        let rotated = chromium
            .report(&format!("{tab}: rotated or lost"), |line| {
                line["tab"] == *tab && (line["event"] == "rotated" || line["event"] == "lost")
            })
            .await;
        assert_eq!(rotated["event"], "rotated", "{rotated}");
        assert_eq!(rotated["detail"]["from"], first.as_str(), "{rotated}");
        successors.push(rotated["detail"]["to"].as_str().expect("an id").to_owned());
    }
    // Every open and close, in the watcher's order, until each old session closed.
    let mut seen: Vec<(&'static str, String, pb::CloseReason)> = Vec::new();
    let closed_all = |seen: &[(&str, String, pb::CloseReason)]| {
        rotations.iter().all(|(_, first, _)| {
            seen.iter()
                .any(|(kind, id, _)| *kind == "closed" && id == first)
        })
    };
    while !closed_all(&seen) {
        let event = within(WAIT, watch.next())
            .await
            .expect("watching")
            .expect("an event");
        match event.event {
            Some(Event::Opened(session)) => {
                seen.push(("opened", session.session_id, pb::CloseReason::Unspecified));
            }
            Some(Event::Closed(closed)) => {
                let reason = closed.reason();
                let id = closed
                    .session
                    .map(|session| session.session_id)
                    .unwrap_or_default();
                seen.push(("closed", id, reason));
            }
            _ => {}
        }
    }
    for ((tab, first, expected), to) in rotations.iter().zip(&successors) {
        let at = |kind: &str, id: &str| seen.iter().position(|(k, i, _)| *k == kind && i == id);
        let closed = at("closed", first).expect("closed");
        if *expected == pb::CloseReason::Replaced {
            let opened = at("opened", to).expect("the successor opened");
            assert!(
                opened < closed,
                "{tab}: {first} closed before {to} opened: {seen:?}"
            );
        }
        assert_eq!(seen[closed].2, *expected, "{tab}: {seen:?}");
        assert!(!chromium.reported(tab, "lost"), "{:?}", chromium.unread);
    }
}
