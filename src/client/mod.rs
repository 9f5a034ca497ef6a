//! The heartbeat client: a session that stays up, and tells its owner the truth.
//!
//! [`Client::builder`] → [`ClientBuilder::connect`] starts a session that says
//! Hello, adopts the server's interval and timeout, answers the server's pings
//! at once, pings the server and keeps its round-trip time, and reconnects with
//! exponential backoff and full jitter when the session is lost. Its owner reads
//! the current [`ClientState`] and a stream of [`ClientEvent`]s, and learns *why*
//! a session was lost ([`LossReason`]): silence, transport, or the server's own
//! goodbye with its reason.
//!
//! # Why a thread of its own
//!
//! By default the session runs on a thread with its own small runtime and its own
//! HTTP/2 connection. A heartbeat on the application's runtime shares its fate: a
//! worker thread blocked by application code can hold the heartbeat task, the
//! pings go unanswered, and the server ends a perfectly healthy process. On its own
//! thread the heartbeat measures the process, not the application's scheduling.
//! Programs that run many sessions (load tools) can put them on a runtime of their
//! choosing with [`ClientBuilder::spawn_on`].
//!
//! # Example
//!
//! ```
//! use tonic_heartbeat::client::{Client, ClientEvent};
//! # use tonic::transport::{server::TcpIncoming, Server};
//! # use tonic_heartbeat::{HeartbeatServer, ServerConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let (_handle, heartbeat) = HeartbeatServer::new(ServerConfig::default())?;
//! # let incoming = TcpIncoming::bind("127.0.0.1:0".parse()?)?;
//! # let addr = incoming.local_addr()?;
//! # tokio::spawn(Server::builder().add_service(heartbeat).serve_with_incoming(incoming));
//! let client = Client::builder(format!("http://{addr}"))
//!     .client_id("worker-1")
//!     .label("zone", "eu-1")
//!     .connect()?;
//! let mut events = client.events();
//! let session_id = client.live().await?;
//! println!("live as {session_id}");
//! while let Some(event) = events.next().await {
//!     if let ClientEvent::Connected { .. } = event {
//!         break;
//!     }
//! }
//! client.close().await?; // Goodbye{CLIENT_SHUTDOWN}, half-close, wait for OK
//! # Ok(()) }
//! ```

mod session;

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use parking_lot::Mutex;

use tokio::{
    runtime::Handle,
    sync::{broadcast, oneshot, watch},
};
use tonic::{
    metadata::MetadataMap,
    transport::{Certificate, ClientTlsConfig, Endpoint, Error as TransportError, Identity},
};

pub use crate::backoff::Backoff;
use crate::{error::ClientError, protocol::CloseReason};

/// What the client is doing now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientState {
    /// Connecting, or waiting to reconnect.
    Connecting,
    /// A session is open.
    Live {
        /// The server's id for the session.
        session_id: String,
    },
    /// The last session was lost; a reconnect follows unless the loss was final.
    Lost {
        /// Why.
        reason: LossReason,
    },
    /// Closed by its owner (or for good, after a replacement); it will not reconnect.
    Closed,
}

/// Why a session was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LossReason {
    /// No frame from the server for the session's timeout: a frozen server or a
    /// black-holed network.
    Timeout {
        /// How long the server had been silent when the loss was declared.
        silence: Duration,
    },
    /// The connection failed or broke (refused, reset, closed) without a status.
    Transport {
        /// What the transport said.
        message: String,
    },
    /// The call ended with a status and no goodbye (a refusal before Welcome, or
    /// a status without explanation).
    Status {
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// The server ended the session and said why in its `Goodbye`.
    Goodbye {
        /// The server's reason, in the vocabulary presence and logs use.
        /// [`CloseReason::Unknown`] is a reason newer than this client, which
        /// it treats like a shutdown, as the contract says.
        reason: CloseReason,
        /// The server's message.
        message: String,
        /// How long the server asked clients to wait before reconnecting.
        reconnect_after: Option<Duration>,
    },
}

/// Something that happened to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// A session opened.
    Connected {
        /// The server's id for the session.
        session_id: String,
        /// The ping interval adopted from `Welcome`.
        ping_interval: Duration,
        /// The timeout adopted from `Welcome`.
        timeout: Duration,
    },
    /// A round-trip time sample from one of the client's pings.
    Rtt {
        /// This sample.
        sample: Duration,
        /// The smoothed round-trip time (RFC 6298 SRTT).
        smoothed: Duration,
        /// The smoothed deviation (RFC 6298 RTTVAR).
        variance: Duration,
    },
    /// The server asked the session to rotate (`Goodbye{ROTATE}`: it reached
    /// the server's maximum age), and the client moved to a successor before
    /// leaving it (make-before-break): no loss, and presence never showed the
    /// client id missing. The successor may be on another server.
    Rotated {
        /// The session that was asked to rotate.
        from: String,
        /// Its successor, now live.
        to: String,
        /// The ping interval adopted from the successor's `Welcome`.
        ping_interval: Duration,
        /// The timeout adopted from the successor's `Welcome`.
        timeout: Duration,
    },
    /// The session was lost.
    Lost {
        /// Why.
        reason: LossReason,
    },
    /// The client will try again after `delay`.
    Reconnecting {
        /// The attempt about to be made, from 1; resets after a stable session.
        attempt: u32,
        /// How long it waits first.
        delay: Duration,
    },
    /// The client is closed and will not connect again.
    Closed,
    /// This subscriber fell behind and missed `count` events.
    Missed {
        /// How many.
        count: u64,
    },
}

/// Events of one client, in order. See [`Client::events`].
#[derive(Debug)]
pub struct ClientEvents {
    receiver: broadcast::Receiver<ClientEvent>,
}

impl ClientEvents {
    /// The next event; `None` once the client has closed and every event was read.
    pub async fn next(&mut self) -> Option<ClientEvent> {
        match self.receiver.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(count)) => Some(ClientEvent::Missed { count }),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// Events kept for a subscriber that is slow to read.
const EVENT_BUFFER: usize = 256;

type EndpointHook = Arc<dyn Fn(Endpoint) -> Result<Endpoint, TransportError> + Send + Sync>;

/// Builds a [`Client`]. See the [module docs](self) for an example.
#[must_use = "a builder does nothing until `connect` is called"]
pub struct ClientBuilder {
    /// The servers to try, in order; the first is the builder's target.
    targets: Vec<String>,
    client_id: String,
    labels: HashMap<String, String>,
    metadata: MetadataMap,
    backoff: Backoff,
    handshake_timeout: Duration,
    close_timeout: Duration,
    configure: Option<EndpointHook>,
    runtime: Option<Handle>,
    bearer_token: Option<String>,
    tls: Option<ClientTls>,
}

/// A running heartbeat client. Dropping it ends the session (with a goodbye,
/// in the background) and stops its thread.
#[derive(Debug)]
pub struct Client {
    state: watch::Receiver<ClientState>,
    /// Weak, so that the event streams end when the session task does.
    events: broadcast::WeakSender<ClientEvent>,
    /// The receiver created before the session started, for the first
    /// subscriber, so it sees every event from the start.
    first_events: Mutex<Option<broadcast::Receiver<ClientEvent>>>,
    /// Dropping or sending on it asks the session to close.
    close: watch::Sender<bool>,
    /// Completes when the session task has finished.
    finished: Option<oneshot::Receiver<()>>,
    close_timeout: Duration,
}

// === impl ClientBuilder ===

impl ClientBuilder {
    fn new(target: String) -> Self {
        Self {
            targets: vec![target],
            client_id: String::new(),
            labels: HashMap::new(),
            metadata: MetadataMap::new(),
            backoff: Backoff::default(),
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            configure: None,
            runtime: None,
            bearer_token: None,
            tls: None,
        }
    }

    /// Another server to use when a session is lost (a node of a cluster, or a
    /// standby). After each loss the client moves to the next target in the
    /// order given, wrapping around, with the usual backoff between attempts;
    /// while a session lives it stays where it is.
    pub fn endpoint(mut self, target: impl Into<String>) -> Self {
        self.targets.push(target.into());
        self
    }

    /// The client's name for presence. Default: empty (anonymous, never replaces).
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }

    /// Adds a label for presence filters. Default: none.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Metadata sent with every session request (for instance credentials).
    /// Default: none.
    pub fn metadata(mut self, metadata: MetadataMap) -> Self {
        self.metadata = metadata;
        self
    }

    /// TLS settings for an `https://` server: the CA to trust and, for mutual
    /// TLS, a client certificate. Default: for `https://`, the Mozilla roots
    /// built in and no client certificate.
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sends `authorization: Bearer <token>` with every session request, for
    /// a server that requires client credentials. Default: none.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer_token = Some(token.into());
        self
    }

    /// Reconnect delays. Default: [`Backoff::default`].
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How long connecting and waiting for `Welcome` may take before the attempt
    /// counts as lost. Default: 10 s.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How long [`Client::close`] waits for the server to finish the session.
    /// Default: 5 s.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Adjusts the tonic `Endpoint` before each connect, for instance to set
    /// TLS (`endpoint.tls_config(...)`). Default: none.
    pub fn configure_endpoint(
        mut self,
        configure: impl Fn(Endpoint) -> Result<Endpoint, TransportError> + Send + Sync + 'static,
    ) -> Self {
        self.configure = Some(Arc::new(configure));
        self
    }

    /// Runs the session on `runtime` instead of a thread of its own. Default: a
    /// dedicated thread, so application work can never starve the heartbeat.
    pub fn spawn_on(mut self, runtime: Handle) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// Validates the settings and starts the session; returns at once.
    pub fn connect(mut self) -> Result<Client, ClientError> {
        if let Some(token) = self.bearer_token.take() {
            let mut value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}")
                .parse()
                .map_err(|_| ClientError::InvalidToken)?;
            // Kept out of HTTP/2 header compression tables.
            value.set_sensitive(true);
            self.metadata.insert("authorization", value);
        }
        let endpoints = self
            .targets
            .iter()
            .map(|target| self.endpoint_for(target))
            .collect::<Result<Vec<_>, _>>()?;
        let (state_tx, state) = watch::channel(ClientState::Connecting);
        let (events, first_events) = broadcast::channel(EVENT_BUFFER);
        let (close, close_rx) = watch::channel(false);
        let (finished_tx, finished) = oneshot::channel();
        let task = session::SessionTask {
            endpoints,
            current: Default::default(),
            hello: crate::protocol::pb::Hello {
                client_id: self.client_id,
                labels: self.labels,
            },
            metadata: self.metadata,
            backoff: self.backoff,
            handshake_timeout: self.handshake_timeout,
            close_timeout: self.close_timeout,
            state: state_tx,
            events: events.clone(),
            close: close_rx,
        };
        let run = async move {
            task.run().await;
            let _ = finished_tx.send(());
        };
        match self.runtime {
            Some(runtime) => {
                runtime.spawn(run);
            }
            None => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(ClientError::Thread)?;
                std::thread::Builder::new()
                    // Thread names are cut at 15 bytes on Linux; this one fits.
                    .name("hb-client".into())
                    .spawn(move || runtime.block_on(run))
                    .map_err(ClientError::Thread)?;
            }
        }
        Ok(Client {
            state,
            events: events.downgrade(),
            first_events: Mutex::new(Some(first_events)),
            close,
            finished: Some(finished),
            close_timeout: self.close_timeout,
        })
    }
}

impl ClientBuilder {
    /// The endpoint for one target, with this builder's TLS, hook and timeouts.
    fn endpoint_for(&self, target: &str) -> Result<Endpoint, ClientError> {
        let endpoint = secure_endpoint(target, self.tls.as_ref())?;
        let endpoint = match &self.configure {
            Some(configure) => configure(endpoint).map_err(|error| ClientError::InvalidUrl {
                url: target.to_owned(),
                reason: error.to_string(),
            })?,
            None => endpoint,
        };
        Ok(endpoint
            .connect_timeout(self.handshake_timeout)
            .tcp_nodelay(true))
    }
}

/// TLS settings of a client, from PEM files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificates the server's certificate must chain to; `None` for the
    /// Mozilla roots built in.
    pub ca: Option<PathBuf>,
    /// A client certificate chain, for mutual TLS; needs `key`.
    pub cert: Option<PathBuf>,
    /// The private key of `cert`.
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// tonic's TLS settings from these files; the error names the file.
    pub fn config(&self) -> Result<ClientTlsConfig, ClientError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| ClientError::TlsFile {
                path: path.clone(),
                source,
            })
        };
        let config = ClientTlsConfig::new();
        let config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => config.with_webpki_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                Ok(config.identity(Identity::from_pem(read(cert)?, read(key)?)))
            }
            (None, None) => Ok(config),
            _ => Err(ClientError::TlsPair),
        }
    }
}

/// The endpoint for `target`, with TLS for `https://` (`tls`, or the
/// defaults); TLS settings for a plain `http://` target are an error.
pub fn secure_endpoint(target: &str, tls: Option<&ClientTls>) -> Result<Endpoint, ClientError> {
    let endpoint = endpoint_for(target)?;
    match (endpoint.uri().scheme_str() == Some("https"), tls) {
        (true, tls) => {
            let config = tls.cloned().unwrap_or_default().config()?;
            endpoint
                .tls_config(config)
                .map_err(|error| ClientError::InvalidUrl {
                    url: target.to_owned(),
                    reason: error.to_string(),
                })
        }
        (false, Some(_)) => Err(ClientError::InvalidUrl {
            url: target.to_owned(),
            reason: "TLS settings need an https:// URL".into(),
        }),
        (false, None) => Ok(endpoint),
    }
}

/// Turns `http://host:port`, `https://…` or a bare `host:port` into a tonic
/// endpoint, refusing anything that is not a server address.
pub fn endpoint_for(target: &str) -> Result<Endpoint, ClientError> {
    let invalid = |reason: String| ClientError::InvalidUrl {
        url: target.to_owned(),
        reason,
    };
    let url = if target.contains("://") {
        target.to_owned()
    } else {
        format!("http://{target}")
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|error: http::uri::InvalidUri| invalid(error.to_string()))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        other => {
            return Err(invalid(format!(
                "the scheme must be http or https, not {}",
                other.unwrap_or("none")
            )))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("there is no host".into()));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(invalid(format!(
            "a server address has no path ({})",
            uri.path()
        )));
    }
    if uri.query().is_some() || url.contains('#') {
        return Err(invalid("a server address has no query or fragment".into()));
    }
    if uri
        .authority()
        .is_some_and(|authority| authority.as_str().contains('@'))
    {
        return Err(invalid(
            "a server address has no user name or password".into(),
        ));
    }
    Endpoint::from_shared(url).map_err(|error| invalid(error.to_string()))
}

// === impl Client ===

impl Client {
    /// A builder for a client of the server at `target` (`http://host:port`,
    /// or a bare `host:port`).
    pub fn builder(target: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(target.into())
    }

    /// The current state.
    pub fn state(&self) -> ClientState {
        self.state.borrow().clone()
    }

    /// A receiver of every state change, `tokio::sync::watch` style. Do not
    /// hold its `borrow()` across slow work: the session waits for it to
    /// record the next state.
    pub fn watch(&self) -> watch::Receiver<ClientState> {
        self.state.clone()
    }

    /// The client's events. The first call sees every event since the client
    /// started; later calls see events from the moment of the call.
    pub fn events(&self) -> ClientEvents {
        let first = self.first_events.lock().take();
        let receiver = first.unwrap_or_else(|| match self.events.upgrade() {
            Some(events) => events.subscribe(),
            // The session has ended: an empty stream that is already over.
            None => broadcast::channel(1).1,
        });
        ClientEvents { receiver }
    }

    /// Waits until a session is live and returns its id; fails if the client
    /// closes first.
    pub async fn live(&self) -> Result<String, ClientError> {
        let mut state = self.state.clone();
        let live = state
            .wait_for(|state| matches!(state, ClientState::Live { .. } | ClientState::Closed))
            .await
            .map_err(|_| ClientError::Closed)?;
        match &*live {
            ClientState::Live { session_id } => Ok(session_id.clone()),
            _ => Err(ClientError::Closed),
        }
    }

    /// Ends the session on purpose: sends `Goodbye{CLIENT_SHUTDOWN}`, half-closes,
    /// and waits (at most the close timeout) for the server to finish the call.
    pub async fn close(mut self) -> Result<(), ClientError> {
        let _ = self.close.send(true);
        let Some(finished) = self.finished.take() else {
            return Ok(());
        };
        // The task itself bounds its wait by the close timeout; the margin only
        // covers the time to notice.
        match tokio::time::timeout(self.close_timeout + Duration::from_secs(1), finished).await {
            Ok(_) => Ok(()),
            Err(_) => Err(ClientError::CloseTimeout(self.close_timeout)),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The session task sees the request and closes in the background.
        let _ = self.close.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that bare host:port is accepted and bad addresses name the problem.
    #[test]
    fn endpoints_are_validated() {
        assert!(endpoint_for("127.0.0.1:50051").is_ok());
        assert!(endpoint_for("http://localhost:50051").is_ok());
        for (bad, expected) in [
            ("ftp://host:1", "the scheme must be http or https"),
            ("http://host:1/path", "has no path"),
            ("http://:1", "invalid"),
            ("http://user:pw@host:1", "no user name"),
            ("http://host:1/?q=1", "no query"),
            ("not a url", "invalid"),
        ] {
            let error = endpoint_for(bad).expect_err(bad).to_string();
            assert!(
                error.contains(expected) || error.contains("host"),
                "{bad}: {error}"
            );
        }
    }
}
