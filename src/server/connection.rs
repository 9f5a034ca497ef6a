//! The server's connections: bounded per peer, closed when they never start
//! or sit idle, and accepted without spinning when descriptors run out.
//!
//! # Why the server accepts its own connections
//!
//! tonic's accept loop retries a failed `accept` at once, so a process out of
//! file descriptors spins on `EMFILE` and logs every attempt. It keeps a
//! connection that never sends the HTTP/2 preface, or never opens a stream,
//! for as long as the peer likes. Here one task accepts. It backs off on
//! errors and logs them at most once a second. It counts connections and
//! streams per peer IP. Each connection carries a [`Connection`] that the
//! shared timer wheel checks: one with no stream for the handshake timeout
//! (before its first stream) or the idle timeout (after) is closed. Closing
//! means the next read returns end-of-file, so hyper drops the connection
//! and its socket.
//!
//! Streams are counted by [`StreamCountLayer`], which tonic runs for every
//! call with the connection's [`PeerInfo`] in the request's extensions.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::mpsc,
    time::Instant,
};
use tokio_rustls::{rustls::pki_types::CertificateDer, server::TlsStream};
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::transport::server::{Connected, TcpIncoming};
use tower::{Layer, Service};
use tracing::warn;

use crate::{
    config::ServerConfig,
    liveness::{TimerWheel, WheelTarget},
    metrics::Metrics,
    tls::{Alpn, ServerTls},
};

/// Accepted connections waiting for the HTTP/2 server to take them.
const ACCEPTED_QUEUE: usize = 128;

/// The first and the longest pause after a failed `accept`.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// At most one log line per this long for repeated refusals and errors.
const LOG_EVERY: Duration = Duration::from_secs(1);

// === PeerTable ===

/// Connections and streams of each peer IP, held under the configured caps.
pub(crate) struct PeerTable {
    peers: Mutex<HashMap<IpAddr, PeerCounts>>,
    max_connections: usize,
    max_streams: usize,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct PeerCounts {
    connections: usize,
    streams: usize,
}

/// A peer over one of its caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerLimit {
    /// It holds its maximum of connections.
    Connections(usize),
    /// It holds its maximum of streams.
    Streams(usize),
}

impl PeerLimit {
    /// What a call refused for this limit is told.
    pub(crate) fn refusal(self) -> String {
        match self {
            Self::Streams(max) => format!(
                "this client address holds its maximum of {max} streams; close some, or raise --max-streams-per-ip"
            ),
            Self::Connections(max) => format!(
                "this client address holds its maximum of {max} connections; close some, or raise --max-connections-per-ip"
            ),
        }
    }
}

impl PeerTable {
    pub(crate) fn new(config: &ServerConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            peers: Mutex::new(HashMap::new()),
            max_connections: config.max_connections_per_ip,
            max_streams: config.max_streams_per_ip,
            handshake_timeout: config.handshake_timeout,
            idle_timeout: config.idle_timeout,
            metrics,
        }
    }

    fn take_connection(&self, ip: IpAddr) -> Result<(), PeerLimit> {
        let mut peers = self.peers.lock();
        let counts = peers.entry(ip).or_default();
        if counts.connections >= self.max_connections {
            return Err(PeerLimit::Connections(self.max_connections));
        }
        counts.connections += 1;
        Ok(())
    }

    fn take_stream(&self, ip: IpAddr) -> Result<(), PeerLimit> {
        let mut peers = self.peers.lock();
        let counts = peers.entry(ip).or_default();
        if counts.streams >= self.max_streams {
            return Err(PeerLimit::Streams(self.max_streams));
        }
        counts.streams += 1;
        Ok(())
    }

    fn release(&self, ip: IpAddr, connection: bool) {
        let mut peers = self.peers.lock();
        if let Some(counts) = peers.get_mut(&ip) {
            if connection {
                counts.connections = counts.connections.saturating_sub(1);
            } else {
                counts.streams = counts.streams.saturating_sub(1);
            }
            if counts.connections == 0 && counts.streams == 0 {
                peers.remove(&ip);
            }
        }
    }
}

// === Connection ===

/// One accepted connection: its peer, its open streams, and whether it is
/// to be closed.
pub(crate) struct Connection {
    peer: SocketAddr,
    table: Arc<PeerTable>,
    wheel: TimerWheel,
    /// Calls open on this connection now.
    streams: AtomicUsize,
    /// When the connection last had no stream, in µs since the wheel's base.
    idle_since: AtomicU64,
    /// Whether any stream has opened: before, the handshake timeout applies.
    started: AtomicBool,
    /// Set to close the connection: its next read is end-of-file.
    closed: AtomicBool,
    /// Heartbeat sessions started on this connection so far.
    sessions: AtomicU64,
    /// The task reading the connection, woken to see `closed`.
    reader: Mutex<Option<Waker>>,
}

impl Connection {
    /// Numbers the heartbeat sessions of this connection 0, 1, 2, … in the
    /// order they start.
    pub(crate) fn next_session(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::Relaxed)
    }

    /// Accounts a new connection from `peer`, and arms its handshake check.
    fn open(
        peer: SocketAddr,
        table: &Arc<PeerTable>,
        wheel: &TimerWheel,
    ) -> Result<Arc<Self>, PeerLimit> {
        table.take_connection(peer.ip())?;
        let now = Instant::now();
        let connection = Arc::new(Self {
            peer,
            table: table.clone(),
            wheel: wheel.clone(),
            streams: AtomicUsize::new(0),
            idle_since: AtomicU64::new(micros_since(wheel.base(), now)),
            started: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            reader: Mutex::new(None),
        });
        let target: Arc<dyn WheelTarget> = connection.clone();
        wheel.insert(now + table.handshake_timeout, 0, Arc::downgrade(&target));
        Ok(connection)
    }

    /// Counts one more stream on this connection and its peer.
    pub(crate) fn hold_stream(self: &Arc<Self>) -> Result<StreamHold, PeerLimit> {
        self.table.take_stream(self.peer.ip())?;
        self.started.store(true, Ordering::Release);
        self.streams.fetch_add(1, Ordering::AcqRel);
        Ok(StreamHold {
            connection: self.clone(),
        })
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(reader) = self.reader.lock().take() {
            reader.wake();
        }
    }
}

impl WheelTarget for Connection {
    /// Closes the connection once it has had no stream for too long.
    fn fire(&self, _token: u64, now: Instant) -> Option<Instant> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let limit = if self.started.load(Ordering::Acquire) {
            self.table.idle_timeout
        } else {
            self.table.handshake_timeout
        };
        if self.streams.load(Ordering::Acquire) > 0 {
            // Busy: look again once it could have been idle that long.
            return Some(now + limit);
        }
        let idle_since =
            self.wheel.base() + Duration::from_micros(self.idle_since.load(Ordering::Acquire));
        if now.saturating_duration_since(idle_since) >= limit {
            self.table.metrics.connection_closed_idle();
            self.close();
            return None;
        }
        Some(idle_since + limit)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.table.release(self.peer.ip(), true);
    }
}

/// A call's hold on its connection and its peer's stream count.
pub(crate) struct StreamHold {
    connection: Arc<Connection>,
}

impl Drop for StreamHold {
    fn drop(&mut self) {
        let connection = &self.connection;
        connection.table.release(connection.peer.ip(), false);
        // Stored first, so the timer never sees no stream with an old idle
        // time; while other streams remain, it is not read.
        let now = micros_since(connection.wheel.base(), Instant::now());
        connection.idle_since.store(now, Ordering::Release);
        connection.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

fn micros_since(base: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(base).as_micros()).unwrap_or(u64::MAX)
}

// === GuardedIo ===

/// What tonic finds in a request's extensions about its connection.
#[derive(Clone)]
pub(crate) struct PeerInfo {
    /// The peer's address.
    pub(crate) remote_addr: SocketAddr,
    /// The client certificate the TLS handshake verified, if any.
    pub(crate) certificate: Option<Arc<CertificateDer<'static>>>,
    pub(crate) connection: Arc<Connection>,
}

impl std::fmt::Debug for PeerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerInfo")
            .field("remote_addr", &self.remote_addr)
            .finish_non_exhaustive()
    }
}

/// An accepted connection as the HTTP/2 server sees it: reads end once the
/// connection is closed for idleness.
pub(crate) struct GuardedIo {
    inner: Transport,
    connection: Arc<Connection>,
}

/// The bytes of a connection: plain TCP, or TLS over it.
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Forwards an `AsyncRead`/`AsyncWrite` call to whichever transport it is.
macro_rules! on_transport {
    ($io:expr, $method:ident($($arg:expr),*)) => {
        match &mut $io.inner {
            Transport::Plain(stream) => Pin::new(stream).$method($($arg),*),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).$method($($arg),*),
        }
    };
}

impl Connected for GuardedIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        let certificate = match &self.inner {
            Transport::Plain(_) => None,
            Transport::Tls(stream) => stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| Arc::new(leaf.clone().into_owned())),
        };
        PeerInfo {
            remote_addr: self.connection.peer,
            certificate,
            connection: self.connection.clone(),
        }
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let mut reader = this.connection.reader.lock();
            if this.connection.closed.load(Ordering::Acquire) {
                // End-of-file: hyper closes the connection.
                return Poll::Ready(Ok(()));
            }
            match &*reader {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => *reader = Some(cx.waker().clone()),
            }
        }
        on_transport!(this, poll_read(cx, buf))
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_transport!(self.get_mut(), poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_transport!(self.get_mut(), poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_transport!(self.get_mut(), poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_transport!(self.get_mut(), poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Transport::Plain(stream) => stream.is_write_vectored(),
            Transport::Tls(stream) => stream.is_write_vectored(),
        }
    }
}

// === accepting ===

/// Accepts on `listener` in a task of its own and yields the connections the
/// caps allow, after their TLS handshake when `tls` is set. Ends when the
/// returned stream is dropped.
pub(crate) fn accept(
    listener: TcpIncoming,
    table: Arc<PeerTable>,
    wheel: TimerWheel,
    tls: Option<(ServerTls, Alpn)>,
) -> impl Stream<Item = Result<GuardedIo, Infallible>> {
    let (accepted, stream) = mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(accept_loop(listener, table, wheel, tls, accepted));
    ReceiverStream::new(stream).map(Ok)
}

async fn accept_loop(
    mut listener: TcpIncoming,
    table: Arc<PeerTable>,
    wheel: TimerWheel,
    tls: Option<(ServerTls, Alpn)>,
    accepted: mpsc::Sender<GuardedIo>,
) {
    let handshakes = Arc::new(Mutex::new(RateLimitedLog::new()));
    let mut pause = ACCEPT_BACKOFF.0;
    let mut errors = RateLimitedLog::new();
    let mut refusals = RateLimitedLog::new();
    loop {
        let next = tokio::select! {
            next = listener.next() => next,
            () = accepted.closed() => return,
        };
        let stream = match next {
            Some(Ok(stream)) => {
                pause = ACCEPT_BACKOFF.0;
                stream
            }
            Some(Err(error)) => {
                // Out of descriptors, or a connection reset before accept:
                // wait rather than spin, longer each time in a row.
                table.metrics.accept_error();
                errors.log(|suppressed| {
                    warn!(%error, suppressed, pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX), "cannot accept connections; pausing")
                });
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
            None => return,
        };
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        match Connection::open(peer, &table, &wheel) {
            Ok(connection) => match &tls {
                None => {
                    let io = GuardedIo {
                        inner: Transport::Plain(stream),
                        connection,
                    };
                    if accepted.send(io).await.is_err() {
                        return;
                    }
                }
                // Each handshake in a task of its own: a slow one holds up
                // only itself, and the handshake timeout bounds it.
                Some((tls, alpn)) => {
                    let handshake = tls.acceptor(*alpn).accept(stream);
                    let limit = table.handshake_timeout;
                    let (accepted, handshakes, metrics) =
                        (accepted.clone(), handshakes.clone(), table.metrics.clone());
                    tokio::spawn(async move {
                        let error = match tokio::time::timeout(limit, handshake).await {
                            Ok(Ok(stream)) => {
                                let io = GuardedIo {
                                    inner: Transport::Tls(Box::new(stream)),
                                    connection,
                                };
                                let _ = accepted.send(io).await;
                                return;
                            }
                            Ok(Err(error)) => error.to_string(),
                            Err(_) => "no handshake within the handshake timeout".to_owned(),
                        };
                        metrics.tls_handshake_failed();
                        handshakes.lock().log(|suppressed| {
                            warn!(peer = %peer.ip(), %error, suppressed, "TLS handshake failed")
                        });
                    });
                }
            },
            Err(limit) => {
                table.metrics.connection_refused();
                refusals.log(|suppressed| {
                    warn!(peer = %peer.ip(), ?limit, suppressed, "connection refused: the peer is over its cap")
                });
            }
        }
    }
}

/// Logs the first event, then at most once per [`LOG_EVERY`] with how many
/// were left unlogged in between.
pub(crate) struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub(crate) fn new() -> Self {
        Self {
            last: None,
            suppressed: 0,
        }
    }

    pub(crate) fn log(&mut self, write: impl FnOnce(u64)) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < LOG_EVERY)
        {
            self.suppressed += 1;
            return;
        }
        write(self.suppressed);
        self.suppressed = 0;
        self.last = Some(now);
    }
}

// === StreamCountLayer ===

/// Counts every call against its connection (so a busy connection is never
/// idle) and its peer's stream cap, which it enforces with `RESOURCE_EXHAUSTED`.
#[derive(Clone, Default)]
pub(crate) struct StreamCountLayer;

impl<S> Layer<S> for StreamCountLayer {
    type Service = StreamCount<S>;

    fn layer(&self, inner: S) -> StreamCount<S> {
        StreamCount { inner }
    }
}

/// See [`StreamCountLayer`].
#[derive(Clone)]
pub(crate) struct StreamCount<S> {
    inner: S,
}

impl<S, B, ResBody> Service<http::Request<B>> for StreamCount<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<HeldBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let hold = match request.extensions().get::<PeerInfo>() {
            Some(peer) => match peer.connection.hold_stream() {
                Ok(hold) => Some(hold),
                Err(limit) => {
                    let status = tonic::Status::resource_exhausted(limit.refusal());
                    let response = status.into_http::<ResBody>();
                    return Box::pin(async move {
                        Ok(response.map(|body| HeldBody {
                            inner: body,
                            hold: None,
                        }))
                    });
                }
            },
            // Served on a listener of the embedder's own: nothing to count.
            None => None,
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|body| HeldBody { inner: body, hold }))
        })
    }
}

pin_project! {
    /// A response body that holds its call's stream count until it is done.
    pub(crate) struct HeldBody<B> {
        #[pin]
        inner: B,
        hold: Option<StreamHold>,
    }
}

impl<B: Body<Data = Bytes>> Body for HeldBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = frame {
            // The call is over: the connection may go idle now.
            this.hold.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
