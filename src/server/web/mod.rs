//! The browser listener: the same sessions over WebSocket, and a live presence page.
//!
//! Browsers cannot hold a gRPC bidirectional stream (gRPC-Web has no client
//! streaming), yet web apps are the most common heartbeat clients. So the
//! contract maps a session onto one WebSocket at `/v1/heartbeat`, and this
//! module serves it (`socket`), with the presence page and the two endpoints
//! it reads (`page`).
//!
//! # Why a listener of its own
//!
//! The gRPC listener speaks HTTP/2 only (by prior knowledge, or `h2` in ALPN),
//! while browsers open WebSockets with an HTTP/1.1 upgrade. Serving both on one
//! port would mean sniffing every connection's first bytes and offering two
//! ALPN protocols on the gRPC port; a second listener keeps the gRPC path
//! untouched and lets operators expose the two differently (a browser-facing
//! load balancer, a firewall rule). It shares the rest: the accept loop with
//! its per-IP caps and handshake and idle timeouts, the server's TLS (offering
//! `http/1.1`), and the heartbeat service itself.
//!
//! # Why a bridge, not a second session implementation
//!
//! A WebSocket session is the gRPC session: the socket is bridged into an
//! in-process call of the same [`HeartbeatServer`], behind the same liveness
//! layer, so admission, credentials, limits, the rate rule, deadlines,
//! replace, evict, drain and every close reason hold by construction. The
//! bridge only moves frames between the two transports and turns the call's
//! end into a close frame.

mod page;
mod socket;

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tonic::{
    transport::server::{Connected, TcpIncoming},
    Code,
};
use tracing::{debug, info};

use super::{
    connection::{self, PeerInfo, PeerTable},
    presence::PresenceEndpoint,
    shared::ServerShared,
    HeartbeatServer,
};
use crate::{
    config::{ServerConfig, WebConfig},
    error::ServeError,
    tls::Alpn,
};

/// The response body of every route.
type WebBody = UnsyncBoxBody<Bytes, Infallible>;

/// The path of the WebSocket session endpoint.
const HEARTBEAT_PATH: &str = "/v1/heartbeat";

/// The browser client, served for pages that load it from the server.
const CLIENT_JS: &str = include_str!("../../../web/heartbeat.js");

/// What every route of the listener shares.
struct WebEndpoint {
    /// The server's settings, registry and the rest.
    shared: Arc<ServerShared>,
    /// The heartbeat service sockets are bridged into.
    heartbeat: HeartbeatServer,
    /// The presence service the page's endpoints call.
    presence: PresenceEndpoint,
    /// This listener's settings.
    settings: WebConfig,
    /// Says when the shutdown grace is over: whatever still runs is closed.
    forced: watch::Receiver<bool>,
    /// Held by every connection and socket (through their `Arc` of this):
    /// when the last is gone, the listener's drain is over.
    _open: mpsc::Sender<Infallible>,
}

impl WebEndpoint {
    async fn route(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: PeerInfo,
    ) -> Response<WebBody> {
        let ui = self.settings.ui;
        let path = request.uri().path();
        match (request.method(), path) {
            (&Method::GET, HEARTBEAT_PATH) => socket::upgrade(self, request, peer).await,
            (&Method::GET, "/heartbeat.js") => {
                let mut response =
                    typed(StatusCode::OK, "text/javascript; charset=utf-8", CLIENT_JS);
                // A public, static module: any page may import it.
                response.headers_mut().insert(
                    header::ACCESS_CONTROL_ALLOW_ORIGIN,
                    HeaderValue::from_static("*"),
                );
                response
            }
            (&Method::GET, "/") if ui => page::page(),
            (&Method::GET, page::WATCH_PATH) if ui => page::watch(self, request, peer).await,
            (&Method::POST, page::EVICT_PATH) if ui => page::evict(self, request).await,
            (_, HEARTBEAT_PATH | "/heartbeat.js") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
            }
            (_, "/" | page::WATCH_PATH | page::EVICT_PATH) if ui => {
                text(StatusCode::METHOD_NOT_ALLOWED, "see the presence page at / for how these are called\n")
            }
            (_, "/") => text(
                StatusCode::NOT_FOUND,
                "this is the heartbeat server's browser listener: sessions are at /v1/heartbeat (WebSocket), the client at /heartbeat.js; start the server with --web-ui for the presence page\n",
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "no such path: sessions are at /v1/heartbeat (WebSocket), the client at /heartbeat.js\n",
            ),
        }
    }

    /// Whether a browser page at the request's `Origin` may use the
    /// endpoint: refused with why, and what to change.
    ///
    /// Listed origins may. So may the listener's own pages (the presence
    /// page), whose `Origin` is the scheme and `Host` of the request, but
    /// only where that host is an IP address or `localhost`: under a DNS
    /// name, any page could rebind its own name to this listener's address
    /// and pass as "own". Pages served under a name are listed instead.
    fn check_origin(&self, headers: &HeaderMap) -> Result<(), String> {
        // Only browsers send Origin; other clients are checked by their
        // credentials alone.
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = String::from_utf8_lossy(origin.as_bytes());
        let listed = self
            .settings
            .allowed_origins
            .iter()
            .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(&origin));
        let scheme = if self.shared.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let own = headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
            .filter(|host| names_an_address(host))
            .is_some_and(|host| origin.eq_ignore_ascii_case(&format!("{scheme}://{host}")));
        if listed || own {
            return Ok(());
        }
        let origin =
            crate::protocol::text::Escaped::quote(&origin, crate::protocol::text::QUOTE_BYTES);
        Err(format!(
            "pages from origin \"{origin}\" may not connect: start the server with --web-allowed-origin {origin}\n"
        ))
    }
}

/// Whether a `Host` header names an IP address or `localhost`, which no
/// other site's page can rebind to.
fn names_an_address(host: &str) -> bool {
    if let Some(bracketed) = host.strip_prefix('[') {
        // An IPv6 literal, with or without a port.
        return bracketed
            .split(']')
            .next()
            .is_some_and(|inside| inside.parse::<std::net::Ipv6Addr>().is_ok());
    }
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    name.parse::<std::net::Ipv4Addr>().is_ok() || name.eq_ignore_ascii_case("localhost")
}

/// The HTTP status that says what a gRPC status code says, for every
/// refusal the listener answers: 401 for credentials and 503 for capacity
/// and drain, as the contract maps an upgrade's refusals, and the usual
/// meanings for the page's endpoints.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::ResourceExhausted | Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A plain-text response.
fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<WebBody> {
    typed(status, "text/plain; charset=utf-8", body)
}

/// A response of `content_type`, which browsers are told not to second-guess.
fn typed(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<WebBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn full(body: impl Into<Bytes>) -> WebBody {
    Full::new(body.into()).boxed_unsync()
}

/// Serves the browser listener until `stopped` says stop; then stops
/// accepting, lets each connection finish its request, and returns once
/// every connection and WebSocket has ended (the drain ends the sessions).
pub(crate) async fn serve(
    incoming: Option<TcpIncoming>,
    shared: Arc<ServerShared>,
    heartbeat: HeartbeatServer,
    peers: Arc<PeerTable>,
    mut stopped: watch::Receiver<bool>,
    forced: watch::Receiver<bool>,
) {
    let (Some(incoming), Some(settings)) = (incoming, shared.config.web.clone()) else {
        return;
    };
    let tls = shared.config.tls.clone().map(|tls| (tls, Alpn::Web));
    let mut connections = connection::accept(incoming, peers, shared.wheel.clone(), tls);
    let (open, mut all_closed) = mpsc::channel::<Infallible>(1);
    let endpoint = Arc::new(WebEndpoint {
        presence: PresenceEndpoint::new(shared.clone()),
        shared,
        heartbeat,
        settings,
        forced,
        _open: open,
    });
    loop {
        let io = tokio::select! {
            next = connections.next() => match next {
                Some(Ok(io)) => io,
                None => break,
            },
            () = stop_requested(&mut stopped) => break,
        };
        let peer = io.connect_info();
        let (endpoint, mut stopped) = (endpoint.clone(), stopped.clone());
        let mut forced = endpoint.forced.clone();
        let handshake_timeout = endpoint.shared.config.handshake_timeout;
        tokio::spawn(async move {
            let route_peer = peer.clone();
            let service = hyper::service::service_fn(move |request| {
                let (endpoint, peer) = (endpoint.clone(), route_peer.clone());
                async move { Ok::<_, Infallible>(endpoint.route(request, peer).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // A slow client's request head is bounded like a slow TLS
                // handshake; a WebSocket's messages then have their own limits.
                .header_read_timeout(Some(handshake_timeout))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop_requested(&mut stopped) => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        result = connection => result,
                        // Past the grace, what is left is dropped.
                        () = stop_requested(&mut forced) => Ok(()),
                    }
                }
            };
            if let Err(error) = result {
                debug!(peer = %peer.remote_addr, %error, "browser connection ended");
            }
        });
    }
    drop(connections);
    // Connections and upgraded sockets hold the endpoint; the drain ends
    // their sessions, and then the last of them lets go.
    drop(endpoint);
    let _ = all_closed.recv().await;
}

/// Waits for the server's stop (a send, or its sender dropped).
async fn stop_requested(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Binds the browser listener `config.web` asks for, if any, and logs where.
pub(crate) fn bind(config: &ServerConfig) -> Result<Option<TcpIncoming>, ServeError> {
    let Some(settings) = &config.web else {
        return Ok(None);
    };
    let bind_error = |source| ServeError::Bind {
        addr: settings.listen,
        source,
    };
    let incoming = TcpIncoming::bind(settings.listen)
        .map_err(bind_error)?
        .with_nodelay(Some(true));
    let addr = incoming.local_addr().unwrap_or(settings.listen);
    info!(web_listen = %addr, ui = settings.ui, "serving browsers");
    Ok(Some(incoming))
}
