//! Real faults in a real client process: killed with SIGKILL, frozen with SIGSTOP.
//!
//! The client process is this test binary run again with one ignored test
//! selected (`client_process`), so no extra binary is needed.

mod support;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime},
};

use support::*;
use tonic_heartbeat::{
    protocol::pb::{self, heartbeat_request::Frame as In, heartbeat_response::Frame as Out},
    registry::SessionEvent,
    CloseReason,
};

const ADDR_VAR: &str = "HEARTBEAT_TEST_CLIENT_ADDR";

/// Not a test of its own: the body of the client process the fault tests kill
/// and freeze. It says Hello, prints its session id, and answers pings forever.
#[test]
#[ignore = "runs only as the child process of the fault tests"]
fn client_process() {
    let Ok(addr) = std::env::var(ADDR_VAR) else {
        return;
    };
    let addr: SocketAddr = addr.parse().expect("address in env");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let (mut session, welcome) = RawSession::hello(addr, "child").await;
        println!("welcome {}", welcome.session_id);
        loop {
            if let Some(Out::Ping(ping)) = session.next_frame().await {
                session.send(In::Pong(pb::Pong { seq: ping.seq })).await;
            }
        }
    });
}

/// A client process and its session id.
struct ClientProcess {
    child: Child,
    session_id: String,
}

impl ClientProcess {
    /// Starts a client process; reads its stdout on a blocking thread, as the
    /// server it talks to runs on this test's runtime.
    async fn spawn(addr: SocketAddr) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "client_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ADDR_VAR, addr.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn client process");
        let stdout = child.stdout.take().expect("piped stdout");
        let session_id = within(
            WAIT,
            tokio::task::spawn_blocking(move || {
                BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    // The harness prints "test client_process ... " before it.
                    .find_map(|line| line.split("welcome ").nth(1).map(str::to_owned))
            }),
        )
        .await
        .expect("reader thread")
        .expect("the client process reports its session");
        Self { child, session_id }
    }

    fn signal(&self, name: &str) {
        signal(&self.child, name);
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tests that a client process killed with SIGKILL is closed as DISCONNECTED
/// within a second.
#[tokio::test]
async fn killed_client_is_disconnected_within_a_second() {
    let server = TestServer::start(fast_config()).await;
    let mut events = server.handle.subscribe();
    let mut client = ClientProcess::spawn(server.addr).await;
    client.child.kill().expect("SIGKILL");
    let killed = tokio::time::Instant::now();
    let (reason, at) = closed(&mut events, &client.session_id).await;
    assert_eq!(reason, CloseReason::Disconnected);
    assert!(
        at - killed < Duration::from_secs(1),
        "closed {:?} after the kill",
        at - killed
    );
}

/// Tests that a client process frozen with SIGSTOP is closed as TIMEOUT no
/// earlier than the timeout after its last frame and within 100 ms after it.
#[tokio::test]
async fn frozen_client_times_out_on_time() {
    let server = TestServer::start(fast_config()).await;
    let timeout = server.handle.config().timeout;
    let mut events = server.handle.subscribe();
    let client = ClientProcess::spawn(server.addr).await;
    client.signal("-STOP");
    let event = event_for(&mut events, &client.session_id, |event| {
        matches!(event, SessionEvent::Closed { .. })
    })
    .await;
    let now = SystemTime::now();
    let SessionEvent::Closed {
        session, reason, ..
    } = event
    else {
        unreachable!()
    };
    assert_eq!(reason, CloseReason::Timeout);
    let deadline = session.last_seen + timeout;
    assert!(
        now >= deadline,
        "closed {:?} early",
        deadline.duration_since(now)
    );
    let late = now.duration_since(deadline).unwrap_or_default();
    assert!(late <= Duration::from_millis(100), "closed {late:?} late");
}
