//! The heartbeat server: services to mount, and a handle to run them.
//!
//! [`HeartbeatServer::new`] returns a pair, as `tonic-health` does: a cloneable
//! [`HeartbeatHandle`] (sessions, subscriptions, eviction, drain) and the
//! [`HeartbeatServer`] service to `add_service` on your own tonic `Server`. The
//! service already sits behind the [liveness layer](crate::liveness), so every
//! session's deadline holds however the rest of your server is doing.
//!
//! [`serve`] is the whole standalone server on a listener you bind, stopped by
//! a future you pass: the CLI passes a signal, tests pass a channel.
//!
//! # Example
//!
//! ```
//! use tonic::transport::{server::TcpIncoming, Server};
//! use tonic_heartbeat::{server::HeartbeatServer, ServerConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (handle, heartbeat) = HeartbeatServer::new(ServerConfig::default())?;
//! let incoming = TcpIncoming::bind("127.0.0.1:0".parse()?)?.with_nodelay(Some(true));
//! let mut sessions = handle.subscribe();
//! let server = Server::builder()
//!     .add_service(heartbeat)
//!     .serve_with_incoming_shutdown(incoming, async { /* your shutdown signal */ });
//! # server.await?;
//! # let _ = &mut sessions;
//! # Ok(()) }
//! ```

mod admission;
mod connection;
mod drain;
mod exposition;
mod farewell;
mod health;
mod heartbeat;
mod presence;
mod rotation;
mod session;
mod shared;
#[cfg(feature = "web")]
mod web;

use std::{
    convert::Infallible,
    future::{Future, Ready},
    sync::{atomic::AtomicUsize, Arc},
    task::{Context, Poll},
};

use tonic::{server::NamedService, transport::server::TcpIncoming, transport::Server};
use tower::{Layer, Service};
use tracing::{info, warn};

pub use self::session::SessionBody;
use self::{
    admission::{AdmissionGate, Refusal},
    heartbeat::HeartbeatMethod,
    shared::ServerShared,
};
use crate::{
    cluster::{Cluster, ClusterError},
    config::{ServerConfig, Suspicion},
    error::{ConfigError, ServeError},
    liveness::{Liveness, LivenessBody, LivenessLayer, ResponseFuture, TimerWheel},
    metrics::Metrics,
    protocol::pb::{self, presence_service_server::PresenceServiceServer},
    protocol::CloseReason,
    registry::{SessionRegistry, Subscription},
    tls::Alpn,
};

/// The `heartbeat.v1.HeartbeatService` behind its liveness layer, ready to
/// mount with `Server::add_service`. See the [module docs](self).
#[derive(Clone)]
pub struct HeartbeatServer {
    inner: Liveness<HeartbeatMethod>,
}

/// The metrics of one server, labelled with every close reason and refusal.
fn server_metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new(
        &CloseReason::ALL.map(CloseReason::as_str),
        &Refusal::ALL.map(Refusal::as_str),
    ))
}

/// A cloneable handle to a running heartbeat server's sessions.
#[derive(Clone)]
pub struct HeartbeatHandle {
    shared: Arc<ServerShared>,
}

// === impl HeartbeatServer ===

impl HeartbeatServer {
    /// Builds the service and its handle; fails if `config` is invalid. This
    /// serves one server alone: cluster mode (`config.cluster`) is run by
    /// [`serve`], which joins the cluster before it serves.
    pub fn new(config: ServerConfig) -> Result<(HeartbeatHandle, HeartbeatServer), ConfigError> {
        if config.cluster.is_some() {
            return Err(ConfigError::Cluster(
                "HeartbeatServer::new serves one server alone; run cluster mode with server::serve, which joins etcd first".into(),
            ));
        }
        Self::build(config, None, String::new(), server_metrics())
    }

    /// The service and its handle, with presence answering from `view` (the
    /// cluster's sessions) when given, and sessions held under `node`.
    fn build(
        config: ServerConfig,
        view: Option<SessionRegistry>,
        node: String,
        metrics: Arc<Metrics>,
    ) -> Result<(HeartbeatHandle, HeartbeatServer), ConfigError> {
        config.validate()?;
        let wheel = TimerWheel::new();
        let shared = Arc::new(ServerShared {
            registry: SessionRegistry::new(
                config.watch_history,
                config.watch_queue,
                metrics.clone(),
            ),
            metrics,
            gate: Arc::new(AdmissionGate::new(config.max_sessions)),
            rotations: rotation::RotationPace::new(config.max_rotations_per_second),
            wheel: wheel.clone(),
            watchers: AtomicUsize::new(0),
            view,
            node,
            config,
        });
        let config = &shared.config;
        let mut layer = LivenessLayer::new(config.timeout)
            .suspect_after(config.effective_suspect_after())
            .max_message_size(config.limits.max_message_size)
            // Reading ahead by one largest frame keeps a session moving; more
            // would only let a client that stops reading pin more memory.
            .inbound_buffer(config.limits.max_message_size as usize)
            .on_silence(farewell::ending_for(
                CloseReason::Timeout,
                &farewell::silence_message(config),
                None,
            ))
            .on_oversize(farewell::ending_for(
                CloseReason::ProtocolViolation,
                &farewell::oversize_message(config),
                None,
            ))
            .wheel(wheel);
        if let Suspicion::Adaptive { phi_threshold } = config.suspicion {
            // The contract's bounds: never before a ping interval of silence,
            // always by the fixed threshold.
            layer = layer.adaptive_suspicion(phi_threshold.0, config.ping_interval);
        }
        let service = HeartbeatMethod {
            shared: shared.clone(),
        };
        Ok((
            HeartbeatHandle { shared },
            HeartbeatServer {
                inner: layer.layer(service),
            },
        ))
    }
}

impl NamedService for HeartbeatServer {
    const NAME: &'static str = "heartbeat.v1.HeartbeatService";
}

impl Service<http::Request<tonic::body::Body>> for HeartbeatServer {
    type Response = http::Response<LivenessBody<SessionBody>>;
    type Error = Infallible;
    type Future = ResponseFuture<Ready<Result<http::Response<SessionBody>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        self.inner.call(request)
    }
}

// === impl HeartbeatHandle ===

impl HeartbeatHandle {
    /// The sessions registry: snapshots, subscriptions, eviction.
    pub fn registry(&self) -> &SessionRegistry {
        &self.shared.registry
    }

    /// A snapshot of the open sessions, then every change; see
    /// [`SessionRegistry::subscribe`].
    pub fn subscribe(&self) -> Subscription {
        self.shared.registry.subscribe()
    }

    /// Ends a session with `Goodbye{EVICTED}` and `ABORTED`; false if no such
    /// session is open.
    pub fn evict(&self, session_id: &str, message: &str) -> bool {
        self.shared.registry.evict(session_id, message)
    }

    /// The server's metrics, to expose wherever you serve yours.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The `heartbeat.v1.PresenceService` of this server's sessions, to mount
    /// next to the heartbeat service. It requires `config.admin_token` when set.
    pub fn presence(
        &self,
    ) -> PresenceServiceServer<impl pb::presence_service_server::PresenceService> {
        PresenceServiceServer::new(presence::PresenceEndpoint::new(self.shared.clone()))
    }

    /// The settings the server runs with.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// Streams holding an admission slot (sessions, and streams yet to say Hello).
    pub fn admitted(&self) -> usize {
        self.shared.gate.admitted()
    }

    /// Starts a drain: refuses new streams with `UNAVAILABLE` and ends every
    /// stream with `Goodbye{SERVER_SHUTDOWN, reconnect_after}` and
    /// `UNAVAILABLE`. Returns at once; [`Self::idle`] waits for the endings.
    pub fn drain(&self) {
        drain::begin(&self.shared);
    }

    /// Waits until no stream holds an admission slot.
    pub async fn idle(&self) {
        self.shared.gate.idle().await;
    }
}

impl std::fmt::Debug for HeartbeatHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatHandle")
            .field("admitted", &self.admitted())
            .finish_non_exhaustive()
    }
}

/// The health service name of a cluster node's part in the cluster:
/// `SERVING` while its session changes reach etcd, `NOT_SERVING` while
/// they cannot (every other node's view of its sessions is stale then,
/// though the sessions themselves, and the empty name, are fine).
pub const CLUSTER_HEALTH: &str = "heartbeat.v1.Cluster";

/// Reports [`CLUSTER_HEALTH`] as `writing` says, until the task is stopped.
async fn report_cluster_health(
    health: tonic_health::server::HealthReporter,
    mut writing: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let status = match *writing.borrow_and_update() {
            true => tonic_health::ServingStatus::Serving,
            false => tonic_health::ServingStatus::NotServing,
        };
        health.set_service_status(CLUSTER_HEALTH, status).await;
        if writing.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the standalone heartbeat server on `incoming` until `shutdown`
/// completes, then drains: health turns `NOT_SERVING`, every session gets its
/// goodbye, and the server waits up to `config.shutdown_grace` for the endings
/// to reach the clients and for presence watches to finish.
///
/// Next to the heartbeat service it serves `PresenceService`, `grpc.health.v1.Health`
/// (for `heartbeat.v1.HeartbeatService`, `heartbeat.v1.PresenceService` and the
/// empty name, and [`CLUSTER_HEALTH`] in cluster mode) and gRPC reflection (v1 and v1alpha), and `GET /metrics` on
/// `config.metrics_listen` when set.
///
/// `on_ready` receives the handle once the services are built, for callers that
/// want to watch sessions (tests, an embedding binary).
pub async fn serve(
    incoming: TcpIncoming,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(HeartbeatHandle),
) -> Result<(), ServeError> {
    let metrics = server_metrics();
    let mut cluster = match &config.cluster {
        Some(settings) => {
            config.validate()?;
            // The view counts its lagging watchers in the server's metrics.
            Some(Cluster::join(settings, &config, metrics.clone()).await?)
        }
        None => None,
    };
    let (handle, heartbeat) = match &cluster {
        Some(cluster) => HeartbeatServer::build(
            config,
            Some(cluster.view()),
            cluster.node_id().to_owned(),
            metrics,
        )?,
        None => HeartbeatServer::new(config)?,
    };
    if let Some(cluster) = &mut cluster {
        cluster.start(handle.registry().clone());
    }
    let config = handle.config().clone();
    // Bound before the server says it serves, like the gRPC listener.
    #[cfg(feature = "web")]
    let web_listener = web::bind(&config)?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?,
        ),
        None => None,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Past the shutdown grace: what still runs of the browser listener closes.
    let (force, forced) = tokio::sync::watch::channel(false);
    let (health, _) = tonic_health::server::health_reporter();
    let health_service = tonic_health::pb::health_server::HealthServer::new(
        health::DrainingHealth::new(health.clone(), stopped.clone()),
    );
    let health_names = [
        "",
        HeartbeatServer::NAME,
        <PresenceServiceServer<presence::PresenceEndpoint> as NamedService>::NAME,
    ];
    for name in health_names {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    // In cluster mode, whether this node's changes reach etcd.
    let cluster_health = match &cluster {
        Some(cluster) => {
            health
                .set_service_status(CLUSTER_HEALTH, tonic_health::ServingStatus::Serving)
                .await;
            Some(tokio::spawn(report_cluster_health(
                health.clone(),
                cluster.writing(),
            )))
        }
        None => None,
    };
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    on_ready(handle.clone());

    if let Some(listener) = metrics_listener {
        tokio::spawn(exposition::serve_metrics(
            listener,
            handle.shared.metrics.clone(),
            stopped.clone(),
        ));
    }
    let mut server_stopped = stopped.clone();
    let peers = Arc::new(connection::PeerTable::new(
        &config,
        handle.shared.metrics.clone(),
    ));
    #[cfg(feature = "web")]
    let web_server = tokio::spawn(web::serve(
        web_listener,
        handle.shared.clone(),
        heartbeat.clone(),
        peers.clone(),
        stopped.clone(),
        forced,
    ));
    #[cfg(not(feature = "web"))]
    let web_server = {
        drop(forced);
        tokio::spawn(std::future::ready(()))
    };
    let incoming = connection::accept(
        incoming,
        peers,
        handle.shared.wheel.clone(),
        config.tls.clone().map(|tls| (tls, Alpn::Grpc)),
    );
    let server = Server::builder()
        .max_concurrent_streams(config.max_streams_per_connection)
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
        .layer(connection::StreamCountLayer)
        .add_service(health_service)
        .add_service(heartbeat)
        .add_service(handle.presence())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, async move {
            // A send or a dropped sender both mean stop.
            let _ = server_stopped.wait_for(|stop| *stop).await;
        });
    tokio::pin!(server);
    let fenced = {
        let fenced = async {
            match &cluster {
                Some(cluster) => cluster.fenced().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = &mut server => return result.map_err(ServeError::from),
            () = shutdown => None,
            reason = fenced => Some(reason),
        }
    };
    info!(
        sessions = handle.registry().len(),
        grace_ms = u64::try_from(config.shutdown_grace.as_millis()).unwrap_or(u64::MAX),
        "shutting down"
    );
    if let Some(reporter) = cluster_health {
        // Stopped before the drain's NOT_SERVING, which it must not undo.
        reporter.abort();
        let _ = reporter.await;
        health
            .set_service_status(CLUSTER_HEALTH, tonic_health::ServingStatus::NotServing)
            .await;
    }
    for name in health_names {
        health
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
    handle.drain();
    let _ = stop.send(true);
    let finished = tokio::time::timeout(config.shutdown_grace, async {
        handle.idle().await;
        let _ = web_server.await;
        (&mut server).await
    })
    .await;
    match finished {
        Ok(result) => result?,
        Err(_) => {
            warn!(
                streams = handle.admitted(),
                "shutdown grace elapsed; closing the remaining connections"
            );
            let _ = force.send(true);
        }
    }
    if let Some(cluster) = cluster {
        cluster.leave(config.shutdown_grace).await;
    }
    if let Some(reason) = fenced {
        return Err(ClusterError::Fenced(reason).into());
    }
    info!("shut down");
    Ok(())
}
