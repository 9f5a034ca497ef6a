//! The reconnecting client against real servers: in process, and as real
//! processes where the fault is real (SIGKILL, SIGSTOP).

mod support;

use std::{collections::HashSet, time::Duration};

use support::*;
use tokio::time::Instant;
use tonic_heartbeat::{
    client::{Backoff, Client, ClientEvent, ClientEvents, ClientState, LossReason},
    registry::SessionEvent,
    CloseReason, ServerConfig,
};

/// Flags of a server process with the timing of `fast_config`.
const FAST_SERVER: [&str; 6] = [
    "--ping-interval",
    "100ms",
    "--timeout",
    "300ms",
    "--min-ping-interval",
    "20ms",
];

/// A backoff fast enough for tests: 20 ms base, 160 ms cap.
fn quick_backoff() -> Backoff {
    Backoff::try_new(
        Duration::from_millis(20),
        Duration::from_millis(160),
        Duration::from_secs(60),
    )
    .expect("valid backoff")
}

fn client(addr: std::net::SocketAddr, client_id: &str) -> Client {
    Client::builder(format!("http://{addr}"))
        .client_id(client_id)
        .label("role", "test")
        .backoff(quick_backoff())
        .handshake_timeout(Duration::from_millis(500))
        .connect()
        .expect("valid client settings")
}

/// The next event that `pick` accepts, failing on `Closed` unless picked.
async fn wait_event(events: &mut ClientEvents, pick: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
    within(WAIT, async {
        loop {
            let event = events.next().await.expect("client still running");
            if pick(&event) {
                return event;
            }
        }
    })
    .await
}

async fn connected(events: &mut ClientEvents) -> String {
    match wait_event(events, |e| matches!(e, ClientEvent::Connected { .. })).await {
        ClientEvent::Connected { session_id, .. } => session_id,
        _ => unreachable!(),
    }
}

async fn lost(events: &mut ClientEvents) -> (LossReason, Instant) {
    match wait_event(events, |e| matches!(e, ClientEvent::Lost { .. })).await {
        ClientEvent::Lost { reason } => (reason, Instant::now()),
        _ => unreachable!(),
    }
}

/// Collects events for `period`, failing on any loss.
async fn no_loss_for(events: &mut ClientEvents, period: Duration) -> Vec<ClientEvent> {
    let mut seen = Vec::new();
    let until = Instant::now() + period;
    while let Ok(event) = tokio::time::timeout_at(until, events.next()).await {
        let event = event.expect("client still running");
        assert!(
            !matches!(event, ClientEvent::Lost { .. }),
            "unexpected {event:?}"
        );
        seen.push(event);
    }
    seen
}

/// Tests that a live session reports RTT samples and answers the server's
/// pings, so the server keeps it across many timeouts.
#[tokio::test]
async fn live_session_reports_rtt_and_stays_alive() {
    let server = TestServer::start(fast_config()).await;
    let client = client(server.addr, "live");
    let mut events = client.events();
    let session_id = connected(&mut events).await;
    let seen = no_loss_for(&mut events, Duration::from_millis(300) * 4).await;
    let samples = seen
        .iter()
        .filter(|e| matches!(e, ClientEvent::Rtt { .. }))
        .count();
    assert!(samples >= 5, "only {samples} RTT samples");
    let snapshot = server.handle.registry().snapshot();
    let session = snapshot
        .sessions
        .iter()
        .find(|s| s.identity.session_id == session_id)
        .expect("the server keeps the session");
    assert!(session.rtt.is_some(), "the client answered no server ping");
    assert_eq!(client.state(), ClientState::Live { session_id });
}

/// Tests that the client uses the interval and timeout of the server's Welcome.
#[tokio::test]
async fn client_adopts_the_servers_interval_and_timeout() {
    let config = ServerConfig {
        ping_interval: Duration::from_millis(50),
        timeout: Duration::from_millis(250),
        min_ping_interval: Duration::from_millis(10),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let client = client(server.addr, "adopt");
    let mut events = client.events();
    match wait_event(&mut events, |e| matches!(e, ClientEvent::Connected { .. })).await {
        ClientEvent::Connected {
            ping_interval,
            timeout,
            ..
        } => {
            assert_eq!(ping_interval, Duration::from_millis(50));
            assert_eq!(timeout, Duration::from_millis(250));
        }
        _ => unreachable!(),
    }
    let seen = no_loss_for(&mut events, Duration::from_millis(600)).await;
    let samples = seen
        .iter()
        .filter(|e| matches!(e, ClientEvent::Rtt { .. }))
        .count();
    assert!(
        samples >= 8,
        "pinging every 50 ms should give ~12 samples, got {samples}"
    );
}

/// Tests that a killed and restarted server is reported lost and reconnected
/// with a new session id, after delays drawn under doubling ceilings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_server_is_reconnected_with_jittered_backoff() {
    let (mut first, addr) = spawn_server_process(&[]);
    let client = client(addr, "restart");
    let mut events = client.events();
    let first_session = connected(&mut events).await;
    first.kill().expect("SIGKILL the server");
    let _ = first.wait();
    let (reason, _) = lost(&mut events).await;
    assert!(matches!(reason, LossReason::Transport { .. }), "{reason:?}");
    let mut delays = Vec::new();
    while delays.len() < 4 {
        if let ClientEvent::Reconnecting { attempt, delay } = wait_event(&mut events, |e| {
            matches!(e, ClientEvent::Reconnecting { .. })
        })
        .await
        {
            assert_eq!(attempt as usize, delays.len() + 1, "attempts count up");
            assert!(
                delay <= quick_backoff().ceiling(attempt),
                "attempt {attempt}: {delay:?}"
            );
            delays.push(delay);
        }
    }
    let distinct: HashSet<_> = delays.iter().collect();
    assert!(distinct.len() > 1, "delays are jittered: {delays:?}");
    let listen = addr.to_string();
    let (mut second, _) = spawn_server_process(&["--listen", &listen]);
    let second_session = connected(&mut events).await;
    assert_ne!(first_session, second_session);
    drop(client);
    let _ = second.kill();
    let _ = second.wait();
}

/// Tests that a frozen server (SIGSTOP) is declared lost for silence no
/// earlier than the timeout and within 100 ms after it, and that the client
/// reconnects once the server resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_server_is_lost_on_time_and_rejoined() {
    let (mut server, addr) = spawn_server_process(&FAST_SERVER);
    let client = client(addr, "freeze");
    let mut events = client.events();
    let first_session = connected(&mut events).await;
    no_loss_for(&mut events, Duration::from_millis(200)).await;
    signal(&server, "-STOP");
    let stopped = Instant::now();
    let (reason, at) = lost(&mut events).await;
    let LossReason::Timeout { silence } = reason else {
        panic!("expected a timeout, got {reason:?}");
    };
    assert!(
        silence >= Duration::from_millis(300),
        "declared after {silence:?} of silence"
    );
    assert!(
        silence <= Duration::from_millis(400),
        "declared after {silence:?} of silence"
    );
    // The last frame came at most one ping interval before the freeze.
    assert!(
        at >= stopped + Duration::from_millis(200),
        "lost {:?} after the freeze",
        at - stopped
    );
    signal(&server, "-CONT");
    let second_session = connected(&mut events).await;
    assert_ne!(first_session, second_session);
    let _ = server.kill();
    let _ = server.wait();
}

/// Tests that the drain's Goodbye{SERVER_SHUTDOWN, reconnect_after} makes the
/// client wait at least that long before it reconnects.
#[tokio::test]
async fn shutdown_goodbye_delays_the_reconnect() {
    let config = ServerConfig {
        reconnect_after: Duration::from_millis(500),
        ..fast_config()
    };
    let first = TestServer::start(config.clone()).await;
    let addr = first.addr;
    let client = client(addr, "drained");
    let mut events = client.events();
    connected(&mut events).await;
    first.shutdown().await.expect("clean shutdown");
    let (reason, lost_at) = lost(&mut events).await;
    assert!(
        matches!(
            reason,
            LossReason::Goodbye { reason: CloseReason::ServerShutdown, reconnect_after: Some(after), .. }
                if after == Duration::from_millis(500)
        ),
        "{reason:?}"
    );
    match wait_event(&mut events, |e| {
        matches!(e, ClientEvent::Reconnecting { .. })
    })
    .await
    {
        ClientEvent::Reconnecting { delay, .. } => {
            assert!(delay >= Duration::from_millis(500), "{delay:?}")
        }
        _ => unreachable!(),
    }
    let _second = TestServer::start_at(addr, config).await;
    connected(&mut events).await;
    assert!(
        lost_at.elapsed() >= Duration::from_millis(500),
        "reconnected after {:?}",
        lost_at.elapsed()
    );
}

/// Tests that a client given two endpoints moves to the second when its
/// session on the first is lost, and back to the first after the next loss.
#[tokio::test]
async fn a_lost_session_moves_to_the_next_endpoint() {
    let config = ServerConfig {
        reconnect_after: Duration::from_millis(50),
        ..fast_config()
    };
    let first = TestServer::start(config.clone()).await;
    let second = TestServer::start(config.clone()).await;
    let addr = first.addr;
    let client = Client::builder(first.url())
        .endpoint(second.url())
        .client_id("roaming")
        .backoff(quick_backoff())
        .handshake_timeout(Duration::from_millis(500))
        .connect()
        .expect("valid client settings");
    let mut events = client.events();
    let on_first = connected(&mut events).await;
    assert!(first
        .handle
        .registry()
        .snapshot()
        .sessions
        .iter()
        .any(|s| s.identity.session_id == on_first));
    first.shutdown().await.expect("clean shutdown");
    let on_second = connected(&mut events).await;
    assert!(second
        .handle
        .registry()
        .snapshot()
        .sessions
        .iter()
        .any(|s| s.identity.session_id == on_second));

    let first = TestServer::start_at(addr, config).await;
    assert!(second.handle.evict(&on_second, "move along"));
    let back = connected(&mut events).await;
    assert!(first
        .handle
        .registry()
        .snapshot()
        .sessions
        .iter()
        .any(|s| s.identity.session_id == back));
}

/// Tests that a replaced session surfaces as REPLACED and the client stops,
/// and an evicted one surfaces as EVICTED with its message.
#[tokio::test]
async fn replaced_and_evicted_sessions_surface_with_their_reason() {
    let server = TestServer::start(fast_config()).await;
    let replaced = client(server.addr, "twin");
    let mut replaced_events = replaced.events();
    connected(&mut replaced_events).await;
    let (_newer, _) = RawSession::hello(server.addr, "twin").await;
    let (reason, _) = lost(&mut replaced_events).await;
    assert!(
        matches!(
            reason,
            LossReason::Goodbye {
                reason: CloseReason::Replaced,
                ..
            }
        ),
        "{reason:?}"
    );
    wait_event(&mut replaced_events, |e| matches!(e, ClientEvent::Closed)).await;
    assert_eq!(replaced.state(), ClientState::Closed);

    let evicted = client(server.addr, "evictee");
    let mut evicted_events = evicted.events();
    let session_id = connected(&mut evicted_events).await;
    assert!(server.handle.evict(&session_id, "rebalancing"));
    let (reason, _) = lost(&mut evicted_events).await;
    match reason {
        LossReason::Goodbye {
            reason, message, ..
        } => {
            assert_eq!(reason, CloseReason::Evicted);
            assert_eq!(message, "rebalancing");
        }
        other => panic!("expected an eviction, got {other:?}"),
    }
}

/// Tests that close() says goodbye (CLIENT_GOODBYE in the registry) and that
/// dropping a client spawned on the caller's runtime leaves no task behind.
/// (That the default client's thread ends is tested in `client_thread.rs`,
/// a binary of its own so that no other test's threads are counted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_says_goodbye_and_drop_leaks_nothing() {
    let server = TestServer::start(fast_config()).await;
    let mut registry = server.handle.subscribe();
    let closing = client(server.addr, "closing");
    let session_id = closing.live().await.expect("live");
    closing.close().await.expect("closed in time");
    let (reason, _) = closed(&mut registry, &session_id).await;
    assert_eq!(reason, CloseReason::ClientGoodbye);

    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    let on_runtime = Client::builder(server.url())
        .client_id("on-runtime")
        .spawn_on(tokio::runtime::Handle::current())
        .connect()
        .expect("valid");
    on_runtime.live().await.expect("live");
    drop(on_runtime);
    within(WAIT, async {
        while metrics.num_alive_tasks() > tasks_before {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Tests that an application task blocking its worker thread for longer than
/// the timeout causes no false loss on a multi-threaded runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_application_thread_causes_no_false_loss() {
    let (mut server, addr) = spawn_server_process(&FAST_SERVER);
    let client = client(addr, "busy");
    let mut events = client.events();
    connected(&mut events).await;
    // Three timeouts of a worker thread doing blocking work, on both workers.
    const BLOCKED_FOR: Duration = Duration::from_millis(900);
    let blockers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async { std::thread::sleep(BLOCKED_FOR) }))
        .collect();
    no_loss_for(&mut events, Duration::from_millis(1200)).await;
    for blocker in blockers {
        blocker.await.expect("blocker");
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// Tests that `heartbeat connect` as a real process opens a session with its
/// client id and labels, and on SIGTERM says goodbye and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_command_says_goodbye_on_sigterm() {
    let server = TestServer::start(fast_config()).await;
    let mut registry = server.handle.subscribe();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_heartbeat"))
        .args([
            "connect",
            &server.addr.to_string(),
            "--client-id",
            "cli-1",
            "--label",
            "zone=z9",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn heartbeat connect");
    let opened = match next_change(&mut registry).await.event {
        SessionEvent::Opened(session) => session,
        other => panic!("expected an open, got {other:?}"),
    };
    assert_eq!(opened.identity.client_id, "cli-1");
    assert_eq!(
        opened.identity.labels.get("zone").map(String::as_str),
        Some("z9")
    );
    signal(&child, "-TERM");
    let (reason, _) = closed(&mut registry, &opened.identity.session_id).await;
    assert_eq!(reason, CloseReason::ClientGoodbye);
    let mut child = child;
    let exit = within(WAIT, tokio::task::spawn_blocking(move || child.wait()))
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(exit.code(), Some(0), "{exit:?}");
}
