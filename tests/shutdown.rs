//! Graceful shutdown: the real binary on SIGTERM, and the drain in process.

mod support;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::mpsc as std_mpsc,
    time::Duration,
};

use support::*;
use tonic::Code;
use tonic_heartbeat::protocol::{pb::GoodbyeReason, proto_to_duration};

/// Starts `heartbeat serve` on an ephemeral port and returns it with its address.
fn spawn_binary(extra: &[&str]) -> (std::process::Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_heartbeat"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn heartbeat");
    let stderr = child.stderr.take().expect("piped stderr");
    let (found, addr) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("\"listen\":\"").nth(1) {
                let _ = found.send(rest.split('"').next().unwrap_or_default().to_owned());
            }
        }
    });
    let addr = addr
        .recv_timeout(WAIT)
        .expect("the server logs its address")
        .parse()
        .expect("a socket address");
    (child, addr)
}

/// Tests that SIGTERM gives every session Goodbye{SERVER_SHUTDOWN} with a
/// reconnect hint and UNAVAILABLE, ends streams that never said Hello too,
/// and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_session_and_exits_zero() {
    let (mut child, addr) = spawn_binary(&["--reconnect-after", "2s"]);
    let mut sessions = Vec::new();
    for id in ["a", "b", "c"] {
        sessions.push(RawSession::hello(addr, id).await.0);
    }
    let mut silent = RawSession::open(addr).await.expect("admitted");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
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

/// Tests that once a drain begins new streams are refused with UNAVAILABLE and
/// `serve` returns when the sessions have ended.
#[tokio::test]
async fn drain_refuses_new_streams() {
    let server = TestServer::start(fast_config()).await;
    let (mut session, _) = RawSession::hello(server.addr, "d").await;
    server.handle.drain();
    session
        .expect_end(GoodbyeReason::ServerShutdown, Code::Unavailable)
        .await;
    let refused = RawSession::open(server.addr).await.err().expect("refused");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    server.shutdown().await.expect("clean shutdown");
}
