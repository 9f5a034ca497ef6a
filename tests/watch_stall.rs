//! The reading-watch stall, hunted 50 times with each reader.
//!
//! A watch that keeps reading must never stop while another watch, on its
//! own connection, stops reading, during bursts of opens and closes (48 at a
//! time over 4 connections). Once, a Python grpc.aio reader was seen to stop
//! at about 4,500 of 5,000 changes with its stream still open; these tests
//! repeat the pattern with the library's Rust watcher and with the Python
//! package's watcher (`interop/python`, on grpc.aio).

mod support;

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
};

use support::*;
use tonic::transport::Channel;
use tonic_heartbeat::{
    presence::{PresenceClient, SessionFilter, WatchEvent},
    protocol::pb::{self, presence_service_client::PresenceServiceClient},
    ServerConfig,
};

const ROUNDS: usize = 50;
const PAIRS_PER_ROUND: usize = 480;

/// Four connections that open and close sessions 48 at a time.
struct Churn {
    connections: Vec<pb::heartbeat_service_client::HeartbeatServiceClient<Channel>>,
}

impl Churn {
    async fn new(server: &TestServer) -> Self {
        let mut connections = Vec::new();
        for _ in 0..4 {
            let channel = small_window_endpoint(&server.url())
                .connect()
                .await
                .expect("connect");
            connections.push(pb::heartbeat_service_client::HeartbeatServiceClient::new(
                channel,
            ));
        }
        Self { connections }
    }

    /// One round: a watch that never reads, then the bursts. Returns the
    /// revision the round ends at; the deaf watch lives until the next round.
    async fn round(
        &self,
        server: &TestServer,
        round: usize,
    ) -> (u64, tonic::Streaming<pb::WatchSessionsResponse>) {
        let deaf_channel = small_window_endpoint(&server.url())
            .connect()
            .await
            .expect("connect");
        let deaf = PresenceServiceClient::new(deaf_channel)
            .watch_sessions(pb::WatchSessionsRequest::default())
            .await
            .expect("a deaf watch")
            .into_inner();
        let tasks: Vec<_> = (0..48)
            .map(|task| {
                let mut client = self.connections[task % 4].clone();
                tokio::spawn(async move {
                    for pair in 0..PAIRS_PER_ROUND / 48 {
                        let mut session =
                            RawSession::open_with(&mut client).await.expect("admitted");
                        session.say_hello(&format!("r{round}-{task}-{pair}")).await;
                        session.half_close();
                        session.ended().await;
                    }
                })
            })
            .collect();
        for task in tasks {
            within(WAIT, task).await.expect("churn task");
        }
        (server.handle.registry().snapshot().revision, deaf)
    }
}

fn server_config() -> ServerConfig {
    ServerConfig {
        watch_queue: 256,
        ..fast_config()
    }
}

/// Tests, 50 times, that the library's watcher reading beside a deaf watch
/// reaches every round's last revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_reader_never_stalls_beside_a_deaf_watch() {
    let server = TestServer::start(server_config()).await;
    let churn = Churn::new(&server).await;
    let reader = PresenceClient::new(
        tonic::transport::Endpoint::from_shared(server.url())
            .expect("url")
            .connect_lazy(),
    );
    let mut watcher = reader.watch(SessionFilter::default());
    for round in 0..ROUNDS {
        let (end, _deaf) = churn.round(&server, round).await;
        within(WAIT, async {
            loop {
                match watcher.next().await.expect("no permanent error") {
                    WatchEvent::Change(change) if change.revision >= end => break,
                    WatchEvent::Synced { revision, .. } if revision >= end => break,
                    _ => {}
                }
            }
        })
        .await;
    }
}

/// Tests, 50 times, that a Python grpc.aio reader beside a deaf watch
/// reaches every round's last revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_reader_never_stalls_beside_a_deaf_watch() {
    let server = TestServer::start(server_config()).await;
    let churn = Churn::new(&server).await;
    let mut child = languages::python()
        .command([
            "conformance.py",
            "watch",
            "--target",
            &server.addr.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python reader");
    let stdout = child.stdout.take().expect("piped");
    let (revisions_tx, mut revisions) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(revision) = event["revision"].as_u64() {
                if revisions_tx.send(revision).is_err() {
                    break;
                }
            }
        }
    });
    let mut reached = 0;
    for round in 0..ROUNDS {
        let (end, _deaf) = churn.round(&server, round).await;
        within(WAIT, async {
            while reached < end {
                reached = reached.max(revisions.recv().await.expect("the reader runs"));
            }
        })
        .await;
    }
    let _ = child.kill();
    let _ = child.wait();
}
