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

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tonic::transport::server::{Connected, TcpIncoming};
use tracing::debug;

use super::{
    connection::{self, PeerInfo, PeerTable},
    presence::PresenceEndpoint,
    shared::ServerShared,
    HeartbeatServer,
};
use crate::{config::WebConfig, tls::Alpn};

/// The response body of every route.
type WebBody = UnsyncBoxBody<Bytes, Infallible>;

/// The path of the WebSocket session endpoint.
const HEARTBEAT_PATH: &str = "/v1/heartbeat";

/// The browser client, served for pages that load it from the server.
const CLIENT_JS: &str = include_str!("../../../web/heartbeat.js");

/// What every route of the listener shares.
struct WebEndpoint {
    shared: Arc<ServerShared>,
    heartbeat: HeartbeatServer,
    presence: PresenceEndpoint,
    settings: WebConfig,
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
                let mut response = text(StatusCode::OK, CLIENT_JS);
                let headers = response.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/javascript; charset=utf-8"),
                );
                // A public, static module: any page may import it.
                headers.insert(
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
    fn check_origin(&self, headers: &HeaderMap) -> Result<(), String> {
        // Only browsers send Origin; other clients are checked by their
        // credentials alone.
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = String::from_utf8_lossy(origin.as_bytes());
        let allowed = &self.settings.allowed_origins;
        let listed = allowed
            .iter()
            .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(&origin));
        // The listener's own pages (the presence page) are always allowed.
        let same_origin = headers.get(header::HOST).is_some_and(|host| {
            origin.split_once("://").is_some_and(|(_, authority)| {
                authority.as_bytes().eq_ignore_ascii_case(host.as_bytes())
            })
        });
        if listed || same_origin {
            return Ok(());
        }
        let origin =
            crate::protocol::text::Escaped::quote(&origin, crate::protocol::text::QUOTE_BYTES);
        Err(format!(
            "pages from origin \"{origin}\" may not connect: start the server with --web-allowed-origin {origin}, or serve the page from this listener\n"
        ))
    }
}

/// A plain-text response.
fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<WebBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
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
    incoming: TcpIncoming,
    shared: Arc<ServerShared>,
    heartbeat: HeartbeatServer,
    peers: Arc<PeerTable>,
    mut stopped: watch::Receiver<bool>,
) {
    let Some(settings) = shared.config.web.clone() else {
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
                .header_read_timeout(Some(std::time::Duration::from_secs(10)))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop_requested(&mut stopped) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
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

/// Binds the listener; returns it with its bound address, for the log.
pub(crate) fn bind(settings: &WebConfig) -> Result<(TcpIncoming, SocketAddr), std::io::Error> {
    let incoming = TcpIncoming::bind(settings.listen)?.with_nodelay(Some(true));
    let addr = incoming.local_addr().unwrap_or(settings.listen);
    Ok((incoming, addr))
}
