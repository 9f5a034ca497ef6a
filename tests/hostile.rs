//! Hostile clients against a real server process.
//!
//! Each test starts `heartbeat serve` as its own process, runs one attack,
//! and asserts two things:
//! - (a) the server's resident memory and CPU, read from `/proc`, stay
//!   within the bound the test states;
//! - (b) a well-behaved "canary" session keeps its pongs under 50 ms
//!   meanwhile and is never ended.

mod support;

use std::{
    io::Read,
    net::SocketAddr,
    process::{Child, ChildStderr, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use prost::Message;
use rand::{rngs::StdRng, Rng, SeedableRng};
use support::*;
use tokio::{io::AsyncWriteExt, net::TcpStream, task::JoinHandle, time::Instant};
use tonic::Code;
use tonic_heartbeat::{
    presence::{PresenceClient, SessionFilter},
    protocol::pb::{
        self, heartbeat_request::Frame as In, heartbeat_response::Frame as Out,
        presence_service_client::PresenceServiceClient,
    },
};

/// The longest a canary's pong may take.
const PONG_BOUND: Duration = Duration::from_millis(50);

/// A `heartbeat serve` process under attack.
struct Target {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    /// Held and never read, for the test of a blocked stderr.
    _stderr: Option<ChildStderr>,
}

impl Target {
    /// Starts the server with quick timing and `extra` flags; `wrapper` runs
    /// it under another program (`prlimit …`).
    fn start(extra: &[&str], wrapper: &[&str], stderr_unread: bool) -> Self {
        Self::start_with_env(extra, wrapper, stderr_unread, &[])
    }

    fn start_with_env(
        extra: &[&str],
        wrapper: &[&str],
        stderr_unread: bool,
        env: &[(&str, &str)],
    ) -> Self {
        // A port found free may be taken (by another test's client socket)
        // before the server binds it, and the server then exits: try again
        // with other ports.
        for _ in 0..4 {
            if let Some(target) = Self::try_start(extra, wrapper, stderr_unread, env) {
                return target;
            }
        }
        panic!("the server exited at start four times (its ports taken?)");
    }

    /// One start on fresh ports; None if the server exited before both its
    /// listeners answered.
    fn try_start(
        extra: &[&str],
        wrapper: &[&str],
        stderr_unread: bool,
        env: &[(&str, &str)],
    ) -> Option<Self> {
        let (addr, metrics) = (free_port(), free_port());
        let program = env!("CARGO_BIN_EXE_heartbeat");
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(program);
                command
            }
            None => Command::new(program),
        };
        command
            .args(["serve", "--listen", &addr.to_string()])
            .args(["--metrics-listen", &metrics.to_string()]);
        // Quick timing, unless the test sets its own.
        for (flag, value) in [
            ("--ping-interval", "500ms"),
            ("--timeout", "2s"),
            ("--min-ping-interval", "50ms"),
        ] {
            if !extra.contains(&flag) {
                command.args([flag, value]);
            }
        }
        command
            .envs(env.iter().copied())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(if stderr_unread {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = command.spawn().expect("spawn heartbeat serve");
        let stderr = child.stderr.take();
        let deadline = Instant::now() + WAIT;
        for listener in [addr, metrics] {
            while std::net::TcpStream::connect(listener).is_err() {
                if child.try_wait().ok().flatten().is_some() {
                    return None;
                }
                assert!(Instant::now() < deadline, "the server never listened");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Some(Self {
            child,
            addr,
            metrics,
            _stderr: stderr,
        })
    }

    /// Resident memory, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// CPU time used so far (user + system).
    fn cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("/proc stat");
        // Fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat format")
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        Duration::from_millis(ticks * 10) // 100 clock ticks a second on Linux
    }

    /// One sample of a metric family, by its full line prefix.
    async fn metric(&self, prefix: &str) -> f64 {
        metric(self.metrics, prefix).await
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A heartbeat client on a connection of its own.
    async fn heartbeat_client(
        &self,
    ) -> pb::heartbeat_service_client::HeartbeatServiceClient<tonic::transport::Channel> {
        let channel = tonic::transport::Endpoint::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        pb::heartbeat_service_client::HeartbeatServiceClient::new(channel)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A well-behaved session that pings every 100 ms and answers the server.
struct Canary {
    worst: Arc<Mutex<Duration>>,
    task: JoinHandle<Option<String>>,
}

impl Canary {
    async fn start(addr: SocketAddr) -> Self {
        let (mut session, _) = RawSession::hello(addr, "canary").await;
        let worst = Arc::new(Mutex::new(Duration::ZERO));
        let record = worst.clone();
        let task = tokio::spawn(async move {
            let mut seq = 0;
            let mut every = tokio::time::interval(Duration::from_millis(100));
            let mut sent: Option<(u64, Instant)> = None;
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        if sent.is_none() {
                            seq += 1;
                            session.send(In::Ping(pb::Ping { seq })).await;
                            sent = Some((seq, Instant::now()));
                        }
                    }
                    frame = session.inbound.message() => match frame {
                        Ok(Some(pb::HeartbeatResponse { frame: Some(Out::Ping(ping)) })) => {
                            session.send(In::Pong(pb::Pong { seq: ping.seq })).await;
                        }
                        Ok(Some(pb::HeartbeatResponse { frame: Some(Out::Pong(pong)) })) => {
                            if let Some((expected, at)) = sent.take() {
                                if pong.seq == expected {
                                    let rtt = at.elapsed();
                                    let mut worst = record.lock();
                                    *worst = (*worst).max(rtt);
                                }
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => return Some("the stream ended".to_owned()),
                        Err(status) => return Some(format!("{status:?}")),
                    },
                }
            }
        });
        Self { worst, task }
    }

    /// Asserts the canary was never ended and its pongs stayed under the bound.
    fn assert_well(self) {
        assert!(!self.task.is_finished(), "the canary was ended");
        self.task.abort();
        let worst = *self.worst.lock();
        assert!(worst > Duration::ZERO, "the canary got pongs");
        assert!(worst < PONG_BOUND, "the canary's worst pong took {worst:?}");
    }
}

/// Asserts the growth of resident memory stays under `bound_mib`.
fn assert_rss_growth(target: &Target, before_kib: u64, bound_mib: u64, what: &str) {
    let after = target.rss_kib();
    let grown = after.saturating_sub(before_kib) / 1024;
    eprintln!("{what}: RSS {} → {} MiB", before_kib / 1024, after / 1024);
    assert!(
        grown < bound_mib,
        "{what} grew RSS by {grown} MiB (bound {bound_mib})"
    );
}

/// Tests that watchers that never read — fresh ones, and resumes that
/// replay the whole history — cost bounded memory: they are capped, and
/// cut off as lagging even while their sends are blocked. Bound: 200 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deaf_watchers_and_replay_bombs() {
    let target = Target::start(&["--watch-queue", "64", "--max-watchers", "64"], &[], false);
    let canary = Canary::start(target.addr).await;
    churn_large_sessions(target.addr, 600).await;
    let before = target.rss_kib();
    let epoch = PresenceClient::new(small_window_endpoint(&target.url()).connect_lazy())
        .list(&SessionFilter::default())
        .await
        .expect("list")
        .epoch;
    let mut deaf = Vec::new();
    for watcher in 0..80 {
        let channel = small_window_endpoint(&target.url())
            .connect()
            .await
            .expect("connect");
        let mut client = PresenceServiceClient::new(channel);
        // Half resume from the start of the history: a replay of every change.
        let resume_epoch = if watcher % 2 == 0 { epoch } else { 0 };
        let request = pb::WatchSessionsRequest {
            resume_epoch,
            resume_after: 1,
            ..Default::default()
        };
        match client.watch_sessions(request).await {
            Ok(stream) => deaf.push((client, stream)),
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
    }
    assert!(deaf.len() <= 64, "capped at --max-watchers");
    churn_large_sessions(target.addr, 300).await;
    within(WAIT, async {
        while target.metric("heartbeat_watchers_lagged_total ").await < 1.0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_rss_growth(&target, before, 200, "deaf watchers");
    canary.assert_well();
}

/// Tests that streams that never say Hello are ended at the hello timeout
/// and cost bounded memory meanwhile. Bound: 100 MiB for 2,000 streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_streams_without_hello() {
    let target = Target::start(&["--hello-timeout", "1s"], &[], false);
    let canary = Canary::start(target.addr).await;
    let before = target.rss_kib();
    let mut silent = Vec::new();
    for _ in 0..20 {
        let mut client = target.heartbeat_client().await;
        for _ in 0..100 {
            silent.push(RawSession::open_with(&mut client).await.expect("admitted"));
        }
    }
    assert_rss_growth(&target, before, 100, "2,000 silent streams");
    for session in &mut silent {
        let ended = session.ended().await;
        assert_eq!(ended.status.code(), Code::DeadlineExceeded, "{ended:?}");
    }
    canary.assert_well();
}

/// Tests that connections that never start are closed at the handshake
/// timeout, every one of them. Bound: 50 MiB for 500 connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let target = Target::start(&["--handshake-timeout", "1s"], &[], false);
    let canary = Canary::start(target.addr).await;
    let before = target.rss_kib();
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(TcpStream::connect(target.addr).await.expect("connect"));
    }
    assert_rss_growth(&target, before, 50, "500 idle connections");
    within(WAIT, async {
        while target
            .metric("heartbeat_connections_closed_idle_total ")
            .await
            < 500.0
        {
            tokio::task::yield_now().await;
        }
    })
    .await;
    canary.assert_well();
}

/// Tests that running out of file descriptors (under a lowered
/// RLIMIT_NOFILE) makes the server pause between accepts instead of
/// spinning: under 30% of a core meanwhile, and it accepts again once
/// descriptors free up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_backs_off() {
    let target = Target::start(&[], &["prlimit", "--nofile=96:96"], false);
    let canary = Canary::start(target.addr).await;
    let mut held = Vec::new();
    for _ in 0..150 {
        if let Ok(stream) = TcpStream::connect(target.addr).await {
            held.push(stream);
        }
    }
    // Out of descriptors, the server cannot even answer a scrape: measure
    // its CPU over a fixed window, and read the metrics once it recovers.
    let cpu_before = target.cpu();
    let wall = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let share = (target.cpu() - cpu_before).as_secs_f64() / wall.elapsed().as_secs_f64();
    eprintln!("out of descriptors: {:.0}% of a core", share * 100.0);
    assert!(
        share < 0.3,
        "the server spun at {:.0}% of a core",
        share * 100.0
    );
    drop(held);
    assert!(
        target.metric("heartbeat_accept_errors_total ").await >= 1.0,
        "the window above was spent out of descriptors"
    );
    let (mut after, _) = within(WAIT, async {
        loop {
            if let Ok(session) = RawSession::open(target.addr).await {
                break (session, ());
            }
        }
    })
    .await;
    after.say_hello("after-exhaustion").await;
    canary.assert_well();
}

/// Tests that Hellos at every limit, and goodbye messages far past theirs,
/// cost bounded memory, and that messages are stored cut. Bound: 150 MiB
/// for 1,000 sessions with 10 KB of labels each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_message_and_client_id_bombs() {
    let target = Target::start(&["--timeout", "5s"], &[], false);
    let canary = Canary::start(target.addr).await;
    let before = target.rss_kib();
    let labels: Vec<(String, String)> = (0..32)
        .map(|i| (format!("{i:0>63}"), "v".repeat(256)))
        .collect();
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut client = target.heartbeat_client().await;
    let mut sessions = Vec::new();
    for i in 0..1000 {
        let mut session = RawSession::open_with(&mut client).await.expect("admitted");
        let client_id = format!("{i:0>256}");
        session.say_hello_with(&client_id, &labels).await;
        sessions.push(session);
    }
    assert_rss_growth(&target, before, 150, "1,000 sessions at every Hello limit");
    for session in &mut sessions {
        session
            .send(In::Goodbye(pb::Goodbye {
                reason: pb::GoodbyeReason::ClientShutdown.into(),
                message: "m".repeat(15_000),
                reconnect_after: None,
            }))
            .await;
        session.half_close();
        assert_eq!(session.ended().await.status.code(), Code::Ok);
    }
    canary.assert_well();
}

/// Tests that a server whose stderr is a pipe nobody reads keeps every
/// session's pongs on time while it logs thousands of lines, and counts the
/// lines it drops. Bound: 100 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_nobody_reads_blocks_nothing() {
    // h2's debug lines come by the dozen per session: far more than the
    // writer's queue and a pipe hold.
    let target = Target::start_with_env(
        &["--log-format", "json"],
        &[],
        true,
        &[("RUST_LOG", "info,h2=debug")],
    );
    let canary = Canary::start(target.addr).await;
    let before = target.rss_kib();
    // Each open and close logs a line: far more than a pipe holds.
    for round in 0..40 {
        let mut batch = Vec::new();
        for i in 0..50 {
            batch.push(
                RawSession::hello(target.addr, &format!("noisy-{round}-{i}"))
                    .await
                    .0,
            );
        }
        for session in &mut batch {
            session.half_close();
            session.ended().await;
        }
    }
    within(WAIT, async {
        while target.metric("heartbeat_log_lines_dropped_total ").await < 1.0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_rss_growth(
        &target,
        before,
        100,
        "4,000 sessions logged into a full pipe",
    );
    canary.assert_well();
}

/// Tests that client text reaches neither the logs nor the operator's
/// terminal raw: a client id with a newline is refused, and a goodbye
/// message full of escape sequences is printed escaped by `heartbeat sessions`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_injection_strings_are_escaped() {
    let target = Target::start(&[], &[], false);
    let canary = Canary::start(target.addr).await;
    let mut forged = RawSession::open(target.addr).await.expect("admitted");
    forged
        .send(In::Hello(pb::Hello {
            client_id: "x\n{\"message\":\"session opened\"}".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(forged.ended().await.status.code(), Code::InvalidArgument);

    let mut watch = Command::new(env!("CARGO_BIN_EXE_heartbeat"))
        .args(["sessions", &target.addr.to_string(), "--watch"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = watch.stdout.take().expect("piped");
    let (chunks_tx, mut chunks) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut stdout = stdout;
        let mut buffer = [0u8; 4096];
        while let Ok(read) = stdout.read(&mut buffer) {
            if read == 0 || chunks_tx.send(buffer[..read].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut printed = String::new();
    read_until(&mut chunks, &mut printed, "synced").await;
    let (mut session, _) = RawSession::hello(target.addr, "injector").await;
    session
        .send(In::Goodbye(pb::Goodbye {
            reason: pb::GoodbyeReason::ClientShutdown.into(),
            message: "\u{1b}[2J\u{1b}[31mfake row\nclosed revision=99".into(),
            reconnect_after: None,
        }))
        .await;
    read_until(&mut chunks, &mut printed, "reason=client_goodbye").await;
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(
        !printed.contains('\u{1b}'),
        "a raw escape reached the terminal: {printed:?}"
    );
    assert!(
        !printed.contains("\nclosed revision=99"),
        "a forged row: {printed:?}"
    );
    canary.assert_well();
}

/// Tests, with frames drawn from a seeded generator (set
/// HEARTBEAT_FUZZ_CASES for more, HEARTBEAT_FUZZ_SEED for another seed),
/// that any sequence of frames and any raw bytes after the HTTP/2 preface end
/// their own stream or connection with a status, never the server: the
/// canary lives through it all. Bound: 100 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_frames_and_bytes_harm_no_one() {
    let cases: usize = std::env::var("HEARTBEAT_FUZZ_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(48);
    let seed: u64 = std::env::var("HEARTBEAT_FUZZ_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or(0x5eed);
    let target = Target::start(&["--hello-timeout", "1s"], &[], false);
    let canary = Canary::start(target.addr).await;
    let before = target.rss_kib();
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..cases {
        let mut session = RawSession::open(target.addr).await.expect("admitted");
        for _ in 0..rng.random_range(1..8) {
            let frame = match rng.random_range(0..6) {
                0 => Some(In::Hello(pb::Hello {
                    client_id: random_text(&mut rng, 300),
                    labels: (0..rng.random_range(0..40))
                        .map(|_| (random_text(&mut rng, 70), random_text(&mut rng, 300)))
                        .collect(),
                })),
                1 => Some(In::Ping(pb::Ping { seq: rng.random() })),
                2 => Some(In::Pong(pb::Pong { seq: rng.random() })),
                3 => Some(In::Goodbye(pb::Goodbye {
                    reason: rng.random(),
                    message: random_text(&mut rng, 2000),
                    reconnect_after: None,
                })),
                _ => None,
            };
            if session
                .outbound_send(pb::HeartbeatRequest { frame })
                .await
                .is_err()
            {
                break;
            }
        }
        session.half_close();
        let ended = session.ended().await;
        assert!(
            matches!(
                ended.status.code(),
                Code::Ok
                    | Code::InvalidArgument
                    | Code::ResourceExhausted
                    | Code::DeadlineExceeded
                    | Code::PermissionDenied
            ),
            "{ended:?}"
        );
    }
    for _ in 0..cases {
        let mut stream = TcpStream::connect(target.addr).await.expect("connect");
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let noise: Vec<u8> = (0..rng.random_range(1..512))
            .map(|_| rng.random())
            .collect();
        bytes.extend(noise);
        let _ = stream.write_all(&bytes).await;
        // Garbage that happens to encode a valid message is fine too.
        let _ = pb::HeartbeatRequest::decode(&bytes[24..]);
    }
    assert_rss_growth(&target, before, 100, "fuzzed frames and bytes");
    canary.assert_well();
}

/// Reads a process's output into `printed` until it holds `needle`.
async fn read_until(
    chunks: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    printed: &mut String,
    needle: &str,
) {
    within(WAIT, async {
        while !printed.contains(needle) {
            let chunk = chunks.recv().await.expect("the process prints");
            printed.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
}

fn random_text(rng: &mut StdRng, max: usize) -> String {
    let len = rng.random_range(0..=max);
    (0..len)
        .map(|_| match rng.random_range(0..10) {
            0 => char::from(rng.random_range(0u8..32)),
            1 => 'é',
            _ => char::from(rng.random_range(b'a'..=b'z')),
        })
        .collect()
}
