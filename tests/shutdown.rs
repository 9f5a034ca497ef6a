//! Graceful shutdown: the real binary on SIGTERM, and the drain in process.

mod support;

use std::time::Duration;

use support::*;
use tonic::Code;
use tonic_heartbeat::protocol::{pb::GoodbyeReason, proto_to_duration};

/// Tests that SIGTERM gives every session Goodbye{SERVER_SHUTDOWN} with a
/// reconnect hint and UNAVAILABLE, ends streams that never said Hello too,
/// and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_session_and_exits_zero() {
    let (mut child, addr) = spawn_server_process(&["--reconnect-after", "2s"]);
    let mut sessions = Vec::new();
    for id in ["a", "b", "c"] {
        sessions.push(RawSession::hello(addr, id).await.0);
    }
    let mut silent = RawSession::open(addr).await.expect("admitted");
    signal(&child, "-TERM");
    for session in &mut sessions {
        let ended = session
            .expect_end(GoodbyeReason::ServerShutdown, Code::Unavailable)
            .await;
        let hint = ended.goodbye.and_then(|g| g.reconnect_after);
        assert_eq!(
            hint.as_ref().and_then(proto_to_duration),
            Some(Duration::from_secs(2))
        );
    }
    let ended = silent.ended().await;
    assert_eq!(ended.status.code(), Code::Unavailable, "{:?}", ended.status);
    let exit = within(WAIT, tokio::task::spawn_blocking(move || child.wait()))
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(exit.code(), Some(0), "{exit:?}");
}

/// Tests that a drain records every session as SERVER_SHUTDOWN, refuses new
/// streams with UNAVAILABLE, and lets `serve` return once sessions have ended.
#[tokio::test]
async fn drain_refuses_new_streams() {
    let server = TestServer::start(fast_config()).await;
    let mut events = server.handle.subscribe();
    let (mut session, welcome) = RawSession::hello(server.addr, "d").await;
    server.handle.drain();
    session
        .expect_end(GoodbyeReason::ServerShutdown, Code::Unavailable)
        .await;
    let (reason, _) = closed(&mut events, &welcome.session_id).await;
    assert_eq!(reason, tonic_heartbeat::CloseReason::ServerShutdown);
    let refused = RawSession::open(server.addr).await.err().expect("refused");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    server.shutdown().await.expect("clean shutdown");
}

fn flooding_flags(grace: &'static str) -> [&'static str; 6] {
    [
        "--shutdown-grace",
        grace,
        "--ping-strikes",
        "4000000000",
        "--min-ping-interval",
        "1ms",
    ]
}

async fn exit_of(child: std::process::Child) -> std::process::ExitStatus {
    let mut child = child;
    within(WAIT, tokio::task::spawn_blocking(move || child.wait()))
        .await
        .expect("join")
        .expect("wait")
}

/// Tests that the grace period bounds a drain that cannot complete: the server
/// closes what is left once it passes, and still exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_bounds_a_stuck_drain() {
    let (child, addr) = spawn_server_process(&flooding_flags("700ms"));
    let _wedged = wedge_a_stream(addr).await;
    let signalled = tokio::time::Instant::now();
    signal(&child, "-TERM");
    let exit = exit_of(child).await;
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    assert!(
        signalled.elapsed() >= Duration::from_millis(700),
        "exited after {:?}, before the grace period",
        signalled.elapsed()
    );
}

/// Tests that a second signal during a drain exits at once, with code 130.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_exits_at_once() {
    let (child, addr) = spawn_server_process(&flooding_flags("60s"));
    let (mut healthy, _) = RawSession::hello(addr, "healthy").await;
    let _wedged = wedge_a_stream(addr).await;
    signal(&child, "-TERM");
    // The drain has begun once the healthy session hears of it; it then waits
    // up to 60 s on the wedged stream, unless a second signal comes.
    healthy
        .expect_end(GoodbyeReason::ServerShutdown, Code::Unavailable)
        .await;
    signal(&child, "-TERM");
    let exit = exit_of(child).await;
    assert_eq!(exit.code(), Some(130), "{exit:?}");
}
