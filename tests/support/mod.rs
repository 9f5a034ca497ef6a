//! Spawn, connect and wait helpers shared by the integration tests.
//!
//! Every test drives a real server on 127.0.0.1:0 over real HTTP/2, and waits
//! on events under a bounded timeout instead of sleeping.
#![allow(dead_code)] // each test file uses its own subset of these helpers

pub mod certs;
pub mod driver;
pub mod etcd;
pub mod languages;
pub mod proxy;

use std::{
    future::Future,
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::mpsc as std_mpsc,
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{transport::server::TcpIncoming, Code, Status, Streaming};
use tonic_heartbeat::{
    error::ServeError,
    protocol::pb::{
        self, heartbeat_request::Frame as In, heartbeat_response::Frame as Out,
        heartbeat_service_client::HeartbeatServiceClient,
    },
    registry::{Change, SessionEvent, Subscription},
    server::{self, HeartbeatHandle},
    CloseReason, ServerConfig,
};

/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Settings scaled down so that timing tests take a fraction of a second.
pub fn fast_config() -> ServerConfig {
    ServerConfig {
        ping_interval: Duration::from_millis(100),
        timeout: Duration::from_millis(300),
        min_ping_interval: Duration::from_millis(20),
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    }
}

/// A server running in this process on 127.0.0.1:0.
pub struct TestServer {
    pub addr: SocketAddr,
    pub handle: HeartbeatHandle,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl TestServer {
    pub async fn start(config: ServerConfig) -> Self {
        Self::start_at("127.0.0.1:0".parse().expect("valid address"), config).await
    }

    /// Starts a server on `addr` (for instance the port of a stopped one).
    pub async fn start_at(addr: SocketAddr, config: ServerConfig) -> Self {
        let incoming = TcpIncoming::bind(addr)
            .expect("bind the test address")
            .with_nodelay(Some(true));
        let addr = incoming.local_addr().expect("bound address");
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready, handle) = oneshot::channel();
        let task = tokio::spawn(server::serve(
            incoming,
            config,
            async {
                let _ = stopped.await;
            },
            move |handle| {
                let _ = ready.send(handle);
            },
        ));
        let handle = handle.await.expect("server built");
        Self {
            addr,
            handle,
            stop: Some(stop),
            task,
        }
    }

    /// Triggers the drain and waits for `serve` to return.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within(WAIT, &mut self.task).await.expect("serve task")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The client ids of the sessions open now.
    pub fn client_ids(&self) -> Vec<String> {
        self.handle
            .registry()
            .snapshot()
            .sessions
            .iter()
            .map(|session| session.identity.client_id.clone())
            .collect()
    }
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, future: F) -> F::Output {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}"))
}

/// One raw heartbeat stream, driven frame by frame by the test.
pub struct RawSession {
    outbound: Option<mpsc::Sender<pb::HeartbeatRequest>>,
    pub inbound: Streaming<pb::HeartbeatResponse>,
    /// When the test last sent a frame.
    pub last_sent: Instant,
}

/// How a stream ended, as the client saw it.
#[derive(Debug)]
pub struct Ended {
    pub goodbye: Option<pb::Goodbye>,
    pub status: Status,
    pub at: Instant,
}

impl RawSession {
    /// Opens a stream without sending anything.
    pub async fn open(addr: SocketAddr) -> Result<Self, Status> {
        let mut client = HeartbeatServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        Self::open_with(&mut client).await
    }

    /// Opens a stream on an existing connection.
    pub async fn open_with(
        client: &mut HeartbeatServiceClient<tonic::transport::Channel>,
    ) -> Result<Self, Status> {
        Self::open_authorized(client, None).await
    }

    /// Opens a stream that presents `authorization: Bearer <token>`.
    pub async fn open_with_token(addr: SocketAddr, token: &str) -> Result<Self, Status> {
        let mut client = HeartbeatServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        Self::open_authorized(&mut client, Some(token)).await
    }

    async fn open_authorized(
        client: &mut HeartbeatServiceClient<tonic::transport::Channel>,
        token: Option<&str>,
    ) -> Result<Self, Status> {
        let (outbound, requests) = mpsc::channel(1024);
        let mut request = tonic::Request::new(ReceiverStream::new(requests));
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().expect("a header value");
            request.metadata_mut().insert("authorization", value);
        }
        let inbound = within(WAIT, client.heartbeat(request)).await?.into_inner();
        Ok(Self {
            outbound: Some(outbound),
            inbound,
            last_sent: Instant::now(),
        })
    }

    /// Opens a stream and completes Hello → Welcome.
    pub async fn hello(addr: SocketAddr, client_id: &str) -> (Self, pb::Welcome) {
        let mut session = Self::open(addr).await.expect("admitted");
        let welcome = session.say_hello(client_id).await;
        (session, welcome)
    }

    pub async fn say_hello(&mut self, client_id: &str) -> pb::Welcome {
        self.say_hello_with(client_id, &[("zone", "test")]).await
    }

    /// Opens a stream and completes Hello → Welcome with these labels.
    pub async fn hello_with(
        addr: SocketAddr,
        client_id: &str,
        labels: &[(&str, &str)],
    ) -> (Self, pb::Welcome) {
        let mut session = Self::open(addr).await.expect("admitted");
        let welcome = session.say_hello_with(client_id, labels).await;
        (session, welcome)
    }

    pub async fn say_hello_with(
        &mut self,
        client_id: &str,
        labels: &[(&str, &str)],
    ) -> pb::Welcome {
        self.send(In::Hello(pb::Hello {
            client_id: client_id.into(),
            labels: labels
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
        }))
        .await;
        match self.next_frame().await {
            Some(Out::Welcome(welcome)) => welcome,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub async fn send(&mut self, frame: In) {
        self.send_raw(pb::HeartbeatRequest { frame: Some(frame) })
            .await;
    }

    pub async fn send_raw(&mut self, request: pb::HeartbeatRequest) {
        self.last_sent = Instant::now();
        self.outbound
            .as_ref()
            .expect("not half-closed")
            .send(request)
            .await
            .expect("request stream open");
    }

    /// Sends without waiting for queue space to matter; fails once the server
    /// has stopped reading.
    pub async fn outbound_send(&mut self, request: pb::HeartbeatRequest) -> Result<(), ()> {
        match &self.outbound {
            Some(outbound) => outbound.send(request).await.map_err(|_| ()),
            None => Err(()),
        }
    }

    /// Ends the request stream without a goodbye.
    pub fn half_close(&mut self) {
        self.outbound = None;
    }

    /// The next server frame; panics on a status or the end of the stream.
    pub async fn next_frame(&mut self) -> Option<Out> {
        match within(WAIT, self.inbound.message()).await {
            Ok(Some(response)) => response.frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Reads until the stream ends, skipping pings, and returns how it ended.
    pub async fn ended(&mut self) -> Ended {
        let mut goodbye = None;
        loop {
            match within(WAIT, self.inbound.message()).await {
                Ok(Some(pb::HeartbeatResponse {
                    frame: Some(Out::Goodbye(frame)),
                })) => goodbye = Some(frame),
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Ended {
                        goodbye,
                        status: Status::ok(""),
                        at: Instant::now(),
                    }
                }
                Err(status) => {
                    return Ended {
                        goodbye,
                        status,
                        at: Instant::now(),
                    }
                }
            }
        }
    }

    /// Waits for the end and checks its goodbye reason and status code.
    pub async fn expect_end(&mut self, reason: pb::GoodbyeReason, code: Code) -> Ended {
        let ended = self.ended().await;
        let goodbye = ended.goodbye.as_ref().unwrap_or_else(|| {
            panic!(
                "expected Goodbye{{{reason:?}}}, got none; status {:?}",
                ended.status
            )
        });
        assert_eq!(goodbye.reason(), reason, "goodbye {goodbye:?}");
        assert_eq!(ended.status.code(), code, "status {:?}", ended.status);
        ended
    }
}

/// The next change of `subscription`.
pub async fn next_change(subscription: &mut Subscription) -> Change {
    within(WAIT, subscription.next())
        .await
        .expect("not lagged")
        .expect("registry alive")
        .as_ref()
        .clone()
}

/// Waits for the close of `session_id` and returns its reason and when it came.
pub async fn closed(subscription: &mut Subscription, session_id: &str) -> (CloseReason, Instant) {
    loop {
        let change = next_change(subscription).await;
        if let SessionEvent::Closed {
            session, reason, ..
        } = &change.event
        {
            if session.identity.session_id == session_id {
                return (*reason, Instant::now());
            }
        }
    }
}

/// Waits for an event about `session_id` that `pick` accepts.
pub async fn event_for(
    subscription: &mut Subscription,
    session_id: &str,
    pick: impl Fn(&SessionEvent) -> bool,
) -> SessionEvent {
    loop {
        let change = next_change(subscription).await;
        if change.event.session().identity.session_id == session_id && pick(&change.event) {
            return change.event;
        }
    }
}

/// Asserts that `at` lies in [`earliest`, `earliest + slack`].
pub fn assert_on_time(what: &str, at: Instant, earliest: Instant, slack: Duration) {
    assert!(at >= earliest, "{what} came {:?} early", earliest - at);
    assert!(
        at - earliest <= slack,
        "{what} came {:?} late (allowed {slack:?})",
        at - earliest
    );
}

/// Opens a session on `addr` that floods pings and never reads, until its
/// pongs fill the flow-control window and the server can send it nothing, not
/// even a goodbye. Returns once the client's own sends are blocked too: the
/// server reads pings only while it can answer them.
pub async fn wedge_a_stream(addr: SocketAddr) -> RawSession {
    let (mut session, _) = RawSession::hello(addr, "wedged").await;
    within(WAIT, async {
        for seq in 1.. {
            let ping = pb::HeartbeatRequest {
                frame: Some(In::Ping(pb::Ping { seq })),
            };
            // A send blocked for a whole second is flow control holding it;
            // a failed one means the stream is gone (the caller's checks
            // then say why), and must not spin here.
            if !matches!(
                tokio::time::timeout(Duration::from_secs(1), session.outbound_send(ping)).await,
                Ok(Ok(()))
            ) {
                return;
            }
        }
    })
    .await;
    session
}

/// Starts the real `heartbeat serve` binary with `args` (an ephemeral port
/// unless `--listen` is among them) and returns it with the address it logged.
pub fn spawn_server_process(args: &[&str]) -> (Child, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_heartbeat"));
    command.args(["serve", "--log-format", "json"]);
    if !args.contains(&"--listen") {
        command.args(["--listen", "127.0.0.1:0"]);
    }
    let mut child = command
        .args(args)
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

/// Sends `signal` (like "-STOP") to a child process with the `kill` command.
pub fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} failed");
}

/// A port on 127.0.0.1 that was free a moment ago, for listeners that the
/// server binds itself (the metrics endpoint).
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
}

/// An endpoint with small HTTP/2 windows (hyper's client defaults are
/// megabytes), so the events a watcher does not read back up into the
/// server's queues quickly.
pub fn small_window_endpoint(url: &str) -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(16 * 1024)
}

/// Opens and half-closes `rounds` sessions one after another, each with
/// 2 KB of labels, so that every open and close makes a large event.
pub async fn churn_large_sessions(addr: SocketAddr, rounds: usize) {
    let big = "x".repeat(250);
    let labels: Vec<(String, String)> = (0..8).map(|i| (format!("k{i}"), big.clone())).collect();
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for round in 0..rounds {
        let (mut session, _) = RawSession::hello_with(addr, &format!("c{round}"), &labels).await;
        session.half_close();
        session.ended().await;
    }
}

/// A session that exists only in the registry: for filling presence with
/// many sessions cheaply. Asked to end, it closes at once.
pub struct RegistryOnlySession {
    registry: tonic_heartbeat::SessionRegistry,
    session_id: String,
}

impl tonic_heartbeat::registry::SessionLink for RegistryOnlySession {
    fn stats(&self) -> tonic_heartbeat::registry::SessionStats {
        tonic_heartbeat::registry::SessionStats {
            phi: tonic_heartbeat::protocol::Phi::default(),
            last_seen: Instant::now(),
            rtt: None,
            frames_in: 1,
            frames_out: 1,
        }
    }

    fn conclude(&self, reason: CloseReason, message: &str) {
        self.registry.close(&self.session_id, reason, message);
    }
}

/// Opens `count` registry-only sessions, ids `fill-0000000` …, each with
/// `label_bytes` bytes of labels.
pub fn fill_registry(handle: &HeartbeatHandle, count: usize, label_bytes: usize) {
    let registry = handle.registry();
    let labels: std::collections::HashMap<String, String> = (0..label_bytes.div_ceil(200))
        .map(|i| (format!("k{i}"), "v".repeat(200.min(label_bytes))))
        .collect();
    for i in 0..count {
        let session_id = format!("fill-{i:07}");
        let identity = tonic_heartbeat::registry::SessionIdentity {
            session_id: session_id.clone(),
            client_id: format!("filler-{i}"),
            labels: labels.clone(),
            peer: None,
            opened_at: std::time::SystemTime::now(),
            node: String::new(),
        };
        let link = std::sync::Arc::new(RegistryOnlySession {
            registry: registry.clone(),
            session_id,
        });
        registry.open(identity, link).expect("registry open");
    }
}

/// Waits (within `WAIT`) for a child process to exit, and returns its status.
pub async fn exit_of(child: &mut Child) -> std::process::ExitStatus {
    within(WAIT, async {
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A presence client of the server at `addr`.
pub async fn presence_client(
    addr: SocketAddr,
) -> pb::presence_service_client::PresenceServiceClient<tonic::transport::Channel> {
    pb::presence_service_client::PresenceServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to presence")
}

/// One `ListSessions` page (the first) from the server at `addr`.
pub async fn list_sessions(addr: SocketAddr) -> pb::ListSessionsResponse {
    presence_client(addr)
        .await
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .expect("ListSessions")
        .into_inner()
}

/// A `heartbeat serve` process started by [`spawn_server_process`], killed
/// when dropped.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts the real binary with `args`; see [`spawn_server_process`].
    pub fn start(args: &[&str]) -> Self {
        let (child, addr) = spawn_server_process(args);
        Self { child, addr }
    }

    /// A presence client of this server.
    pub async fn presence(
        &self,
    ) -> pb::presence_service_client::PresenceServiceClient<tonic::transport::Channel> {
        presence_client(self.addr).await
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sample of a metric family, by its full line prefix, scraped from
/// `GET /metrics` at `addr`.
pub async fn metric(addr: SocketAddr, prefix: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("scrape");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("answer");
    text.lines()
        .find_map(|line| line.strip_prefix(prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in the metrics"))
}
