//! `heartbeat serve`: the standalone server.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::Context;
use clap::Args;
use tonic::transport::server::TcpIncoming;
use tonic_heartbeat::{
    cluster::ClusterConfig,
    config::{AdminToken, Suspicion, WebConfig},
    credentials::ClientCredentials,
    error::ServeError,
    protocol::Phi,
    server::{self, HeartbeatHandle},
    tls::{ServerTls, TlsFiles},
    FrameLimits, ServerConfig,
};
use tracing::{info, warn};

use super::{human, parse_duration, HumanDuration, LogSink, ShutdownSignals};

/// How often the count of dropped log lines reaches the metrics.
const LOG_DROPS_REPORTED_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Every default of the server, written once in the library.
const DEFAULTS: ServerConfig = ServerConfig::DEFAULT;

/// Flags of `heartbeat serve`; defaults keep sessions alive behind proxies
/// with 60 s idle timeouts (nginx, cloud load balancers).
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on. Use 0.0.0.0:50051 to accept other hosts.
    #[arg(
        long,
        env = "HEARTBEAT_LISTEN",
        default_value = "127.0.0.1:50051",
        value_name = "ADDR"
    )]
    listen: SocketAddr,

    /// How often the server pings each session (and tells clients to ping).
    /// Keep it well under the idle timeout of any proxy on the path.
    #[arg(long, env = "HEARTBEAT_PING_INTERVAL", default_value_t = human(DEFAULTS.ping_interval), value_parser = parse_duration, value_name = "DURATION")]
    ping_interval: HumanDuration,

    /// Silence after which a session is ended (Goodbye{TIMEOUT}, DEADLINE_EXCEEDED).
    /// Must be longer than --ping-interval; 3 intervals rides out one lost ping.
    #[arg(long, env = "HEARTBEAT_TIMEOUT", default_value_t = human(DEFAULTS.timeout), value_parser = parse_duration, value_name = "DURATION")]
    timeout: HumanDuration,

    /// Silence after which a session is reported suspect (still open, but late).
    /// Between --ping-interval and --timeout. Default: the smaller of
    /// 2 × interval and the midpoint of interval and timeout.
    #[arg(long, env = "HEARTBEAT_SUSPECT_AFTER", value_parser = parse_duration, value_name = "DURATION")]
    suspect_after: Option<HumanDuration>,

    /// How sessions become suspect: `fixed` (after --suspect-after, every
    /// session alike) or `adaptive` (when the session's phi, over its
    /// client's recent inter-arrival times, reaches --phi-threshold: a steady
    /// client is suspected soon after it misses its rhythm, a jittery one not
    /// for its usual jitter; never before --ping-interval, always by
    /// --suspect-after).
    #[arg(long, env = "HEARTBEAT_SUSPICION", value_enum, default_value_t = SuspicionArg::Fixed)]
    suspicion: SuspicionArg,

    /// With --suspicion adaptive, the phi at which a session is suspect, from
    /// 1 to 30: phi 8 is a silence that this client's rhythm would produce
    /// once in 10^8 gaps. Default: 8.
    #[arg(long, env = "HEARTBEAT_PHI_THRESHOLD", value_name = "PHI")]
    phi_threshold: Option<f64>,

    /// Rotation: ask sessions this old (±10 % per session) to move, with
    /// Goodbye{ROTATE}, so that long-lived streams spread over a fleet that
    /// grew. Clients that know ROTATE open a successor first and never go
    /// missing from presence. Default: off.
    #[arg(long, env = "HEARTBEAT_MAX_SESSION_AGE", value_parser = parse_duration, value_name = "DURATION")]
    max_session_age: Option<HumanDuration>,

    /// How long a session asked to rotate keeps its stream for its
    /// successor; then it ends with UNAVAILABLE and close reason ROTATED.
    #[arg(long, env = "HEARTBEAT_ROTATION_GRACE", default_value_t = human(DEFAULTS.rotation_grace), value_parser = parse_duration, value_name = "DURATION")]
    rotation_grace: HumanDuration,

    /// Rotations started per second at most: sessions that come of age
    /// together are asked one by one, never as a herd.
    #[arg(
        long,
        env = "HEARTBEAT_MAX_ROTATIONS_PER_SECOND",
        default_value_t = DEFAULTS.max_rotations_per_second,
        value_name = "N"
    )]
    max_rotations_per_second: u32,

    /// A stream must say Hello within this (or --timeout, if shorter), or it is
    /// ended with Goodbye{TIMEOUT}: a client that connects and never speaks
    /// holds a slot only this long.
    #[arg(long, env = "HEARTBEAT_HELLO_TIMEOUT", default_value_t = human(DEFAULTS.hello_timeout), value_parser = parse_duration, value_name = "DURATION")]
    hello_timeout: HumanDuration,

    /// Unsolicited client frames (pings, unknown frames, stray pongs) closer
    /// together than this earn a strike. Must be shorter than --ping-interval.
    #[arg(long, env = "HEARTBEAT_MIN_PING_INTERVAL", default_value_t = human(DEFAULTS.min_ping_interval), value_parser = parse_duration, value_name = "DURATION")]
    min_ping_interval: HumanDuration,

    /// Strikes allowed; one more ends the session with Goodbye{TOO_MANY_PINGS}.
    #[arg(
        long,
        env = "HEARTBEAT_PING_STRIKES",
        default_value_t = DEFAULTS.ping_strikes,
        value_name = "N"
    )]
    ping_strikes: u32,

    /// Streams open at once (Hello or not); more are refused with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "HEARTBEAT_MAX_SESSIONS",
        default_value_t = DEFAULTS.max_sessions,
        value_name = "N"
    )]
    max_sessions: usize,

    /// On SIGTERM/SIGINT, how long to wait for goodbyes to reach clients before
    /// closing what is left.
    #[arg(long, env = "HEARTBEAT_SHUTDOWN_GRACE", default_value_t = human(DEFAULTS.shutdown_grace), value_parser = parse_duration, value_name = "DURATION")]
    shutdown_grace: HumanDuration,

    /// The reconnect_after hint sent with Goodbye{SERVER_SHUTDOWN}.
    #[arg(long, env = "HEARTBEAT_RECONNECT_AFTER", default_value_t = human(DEFAULTS.reconnect_after), value_parser = parse_duration, value_name = "DURATION")]
    reconnect_after: HumanDuration,

    /// A connection that opens no stream within this is closed (a peer that
    /// never sends the HTTP/2 preface, or never calls).
    #[arg(long, env = "HEARTBEAT_HANDSHAKE_TIMEOUT", default_value_t = human(DEFAULTS.handshake_timeout), value_parser = parse_duration, value_name = "DURATION")]
    handshake_timeout: HumanDuration,

    /// A connection with no open call for this long is closed.
    #[arg(long, env = "HEARTBEAT_IDLE_TIMEOUT", default_value_t = human(DEFAULTS.idle_timeout), value_parser = parse_duration, value_name = "DURATION")]
    idle_timeout: HumanDuration,

    /// How often HTTP/2 pings probe each connection, to reap dead ones.
    #[arg(long, env = "HEARTBEAT_HTTP2_KEEPALIVE_INTERVAL", default_value_t = human(DEFAULTS.http2_keepalive_interval), value_parser = parse_duration, value_name = "DURATION")]
    http2_keepalive_interval: HumanDuration,

    /// How long an HTTP/2 ping may go unanswered before its connection is closed.
    #[arg(long, env = "HEARTBEAT_HTTP2_KEEPALIVE_TIMEOUT", default_value_t = human(DEFAULTS.http2_keepalive_timeout), value_parser = parse_duration, value_name = "DURATION")]
    http2_keepalive_timeout: HumanDuration,

    /// Connections one client IP may hold; more are closed at accept. Raise it
    /// behind a load balancer, or for a load tool on one host.
    #[arg(
        long,
        env = "HEARTBEAT_MAX_CONNECTIONS_PER_IP",
        default_value_t = DEFAULTS.max_connections_per_ip,
        value_name = "N"
    )]
    max_connections_per_ip: usize,

    /// Calls (sessions, presence calls) one client IP may hold open; more are
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "HEARTBEAT_MAX_STREAMS_PER_IP",
        default_value_t = DEFAULTS.max_streams_per_ip,
        value_name = "N"
    )]
    max_streams_per_ip: usize,

    /// HTTP/2 streams one connection may hold open (one session is one stream).
    #[arg(
        long,
        env = "HEARTBEAT_MAX_STREAMS_PER_CONNECTION",
        default_value_t = DEFAULTS.max_streams_per_connection,
        value_name = "N"
    )]
    max_streams_per_connection: u32,

    /// Largest encoded client frame, in bytes; a larger one is a protocol violation.
    #[arg(long, env = "HEARTBEAT_MAX_MESSAGE_SIZE", default_value_t = DEFAULTS.limits.max_message_size, value_name = "BYTES")]
    max_message_size: u32,

    /// Longest Hello.client_id, in bytes of UTF-8.
    #[arg(
        long,
        env = "HEARTBEAT_MAX_CLIENT_ID",
        default_value_t = DEFAULTS.limits.max_client_id,
        value_name = "BYTES"
    )]
    max_client_id: usize,

    /// Most label pairs in a Hello.
    #[arg(
        long,
        env = "HEARTBEAT_MAX_LABELS",
        default_value_t = DEFAULTS.limits.max_labels,
        value_name = "N"
    )]
    max_labels: usize,

    /// Longest label key, in bytes (keys must be non-empty).
    #[arg(
        long,
        env = "HEARTBEAT_MAX_LABEL_KEY",
        default_value_t = DEFAULTS.limits.max_label_key,
        value_name = "BYTES"
    )]
    max_label_key: usize,

    /// Longest label value, in bytes.
    #[arg(
        long,
        env = "HEARTBEAT_MAX_LABEL_VALUE",
        default_value_t = DEFAULTS.limits.max_label_value,
        value_name = "BYTES"
    )]
    max_label_value: usize,

    /// Session changes kept so a dropped presence watch can resume without a snapshot.
    #[arg(
        long,
        env = "HEARTBEAT_WATCH_HISTORY",
        default_value_t = DEFAULTS.watch_history,
        value_name = "N"
    )]
    watch_history: usize,

    /// Events queued for one presence watcher before it is ended as lagging.
    #[arg(
        long,
        env = "HEARTBEAT_WATCH_QUEUE",
        default_value_t = DEFAULTS.watch_queue,
        value_name = "N"
    )]
    watch_queue: usize,

    /// Presence watches open at once; more are refused with RESOURCE_EXHAUSTED.
    /// Each costs at most its queue and one HTTP/2 stream's send buffer.
    #[arg(
        long,
        env = "HEARTBEAT_MAX_WATCHERS",
        default_value_t = DEFAULTS.max_watchers,
        value_name = "N"
    )]
    max_watchers: usize,

    /// The server's certificate chain (PEM) for TLS; needs --tls-key. Reloaded
    /// on SIGHUP and when the file changes, without dropping sessions.
    #[arg(
        long,
        env = "HEARTBEAT_TLS_CERT",
        value_name = "PATH",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        env = "HEARTBEAT_TLS_KEY",
        value_name = "PATH",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,

    /// CA certificates (PEM) that client certificates must chain to: with it,
    /// every connection needs a client certificate (mutual TLS).
    #[arg(
        long,
        env = "HEARTBEAT_TLS_CLIENT_CA",
        value_name = "PATH",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,

    /// A file of client credentials, one `TOKEN IDS` a line: each bearer token
    /// (or `sha256:<hex>` of it) and the client ids it may say Hello as (`id`,
    /// `prefix*`, `*`, `""` for anonymous). Streams without a known token are
    /// refused (UNAUTHENTICATED); a Hello with an id its token does not allow is
    /// refused (PERMISSION_DENIED). Reloaded on SIGHUP and when the file changes.
    #[arg(long, env = "HEARTBEAT_CLIENT_CREDENTIALS", value_name = "PATH")]
    client_credentials: Option<PathBuf>,

    /// Under mutual TLS, let a client without a bearer token say Hello as any
    /// name its certificate is valid for (its DNS subject alternative names).
    #[arg(
        long,
        env = "HEARTBEAT_CLIENT_IDS_FROM_CERT",
        requires = "tls_client_ca"
    )]
    client_ids_from_cert: bool,

    /// A file holding the admin token (surrounding white space ignored); when
    /// set, every PresenceService call needs `authorization: Bearer <token>`.
    #[arg(long, env = "HEARTBEAT_ADMIN_TOKEN_FILE", value_name = "PATH")]
    admin_token_file: Option<PathBuf>,

    /// Serve browsers on ADDR (for example 0.0.0.0:8080): sessions over
    /// WebSocket at /v1/heartbeat (subprotocol heartbeat.v1.proto or
    /// heartbeat.v1.json), the client module at /heartbeat.js, and with
    /// --web-ui the presence page at /. HTTP/1.1, with --tls-cert's TLS.
    #[arg(long, env = "HEARTBEAT_WEB_LISTEN", value_name = "ADDR")]
    web_listen: Option<SocketAddr>,

    /// A page origin allowed to open sessions, as browsers send it
    /// (`https://app.example.com`, `http://localhost:3000`); repeat, or separate
    /// with commas; * allows any. Without it, only the listener's own pages
    /// opened by IP address or as localhost may connect: list the origin of
    /// pages served under a DNS name, this listener's own included.
    #[arg(
        long,
        env = "HEARTBEAT_WEB_ALLOWED_ORIGIN",
        value_name = "ORIGIN",
        value_delimiter = ',',
        requires = "web_listen"
    )]
    web_allowed_origin: Vec<String>,

    /// Serve the live presence page at / of --web-listen: sessions, their
    /// state, RTT and age, and every close with its reason. It asks for the
    /// admin token when the server has one, and can evict with it.
    #[arg(long, env = "HEARTBEAT_WEB_UI", requires = "web_listen")]
    web_ui: bool,

    /// Serve Prometheus metrics at http://ADDR/metrics (for example 127.0.0.1:9090).
    #[arg(long, env = "HEARTBEAT_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,

    /// Cluster mode: etcd's client URL (repeat, or separate with commas, for
    /// several). Every node then answers presence for the whole cluster.
    /// Needs --node-id.
    #[arg(
        long,
        env = "HEARTBEAT_CLUSTER",
        value_name = "URL",
        value_delimiter = ',',
        requires = "node_id"
    )]
    cluster: Vec<String>,

    /// This node's id in the cluster (letters, digits, '-', '_', '.'): unique
    /// among live nodes, shown as each session's `node`.
    #[arg(
        long,
        env = "HEARTBEAT_NODE_ID",
        value_name = "ID",
        requires = "cluster"
    )]
    node_id: Option<String>,

    /// The cluster's key prefix in etcd; nodes with the same prefix share presence.
    #[arg(long, env = "HEARTBEAT_CLUSTER_PREFIX", default_value = ClusterConfig::DEFAULT_PREFIX, value_name = "PREFIX")]
    cluster_prefix: String,

    /// The node's etcd lease, in whole seconds: a node that dies has its
    /// sessions reported NODE_LOST this long after (plus up to a second). It
    /// is renewed every second; a node cut off from etcd ends its sessions
    /// when the lease has a fifth of it left (after 8 s of 10 s), so stalls
    /// of a few seconds cost nothing.
    #[arg(long, env = "HEARTBEAT_LEASE_TTL", default_value_t = human(ClusterConfig::DEFAULT_LEASE_TTL), value_parser = parse_duration, value_name = "DURATION")]
    lease_ttl: HumanDuration,

    /// Who compacts etcd's history. `on`: the nodes do, keeping between
    /// 1.25 and 2 times --watch-history etcd revisions (one node at a
    /// time). `off`: you do (etcd's --auto-compaction-retention, or your own
    /// job); without compaction etcd fills its quota and refuses writes.
    /// Compaction is etcd-wide: turn it off if other applications share
    /// this etcd and need a longer history.
    #[arg(long, env = "HEARTBEAT_ETCD_COMPACTION", value_enum, default_value_t = CompactionArg::On, value_name = "WHO")]
    etcd_compaction: CompactionArg,
}

impl ServeArgs {
    pub(super) fn config(&self) -> anyhow::Result<ServerConfig> {
        let admin_token = self
            .admin_token_file
            .as_deref()
            .map(AdminToken::from_file)
            .transpose()?;
        let client_credentials = self
            .client_credentials
            .as_deref()
            .map(ClientCredentials::from_file)
            .transpose()?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTls::from_files(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            })?),
            _ => None,
        };
        Ok(ServerConfig {
            ping_interval: self.ping_interval.into(),
            timeout: self.timeout.into(),
            suspect_after: self.suspect_after.map(Into::into),
            hello_timeout: self.hello_timeout.into(),
            min_ping_interval: self.min_ping_interval.into(),
            ping_strikes: self.ping_strikes,
            max_sessions: self.max_sessions,
            shutdown_grace: self.shutdown_grace.into(),
            reconnect_after: self.reconnect_after.into(),
            max_streams_per_connection: self.max_streams_per_connection,
            handshake_timeout: self.handshake_timeout.into(),
            idle_timeout: self.idle_timeout.into(),
            http2_keepalive_interval: self.http2_keepalive_interval.into(),
            http2_keepalive_timeout: self.http2_keepalive_timeout.into(),
            max_connections_per_ip: self.max_connections_per_ip,
            max_streams_per_ip: self.max_streams_per_ip,
            limits: FrameLimits {
                max_message_size: self.max_message_size,
                max_client_id: self.max_client_id,
                max_labels: self.max_labels,
                max_label_key: self.max_label_key,
                max_label_value: self.max_label_value,
            },
            watch_history: self.watch_history,
            watch_queue: self.watch_queue,
            max_watchers: self.max_watchers,
            tls,
            client_credentials,
            client_ids_from_certificate: self.client_ids_from_cert,
            admin_token,
            metrics_listen: self.metrics_listen,
            cluster: self.node_id.as_ref().map(|node_id| ClusterConfig {
                endpoints: self.cluster.clone(),
                node_id: node_id.clone(),
                prefix: self.cluster_prefix.clone(),
                lease_ttl: self.lease_ttl.into(),
                compaction: self.etcd_compaction == CompactionArg::On,
            }),
            suspicion: match (self.suspicion, self.phi_threshold) {
                (SuspicionArg::Fixed, None) => Suspicion::Fixed,
                (SuspicionArg::Fixed, Some(_)) => anyhow::bail!(
                    "--phi-threshold applies only with --suspicion adaptive: add --suspicion adaptive, or leave the threshold out"
                ),
                (SuspicionArg::Adaptive, threshold) => Suspicion::Adaptive {
                    phi_threshold: threshold.map_or(Suspicion::DEFAULT_PHI_THRESHOLD, Phi),
                },
            },
            max_session_age: self.max_session_age.map(Into::into),
            rotation_grace: self.rotation_grace.into(),
            max_rotations_per_second: self.max_rotations_per_second,
            web: self.web_listen.map(|listen| WebConfig {
                listen,
                allowed_origins: self.web_allowed_origin.clone(),
                ui: self.web_ui,
            }),
        })
    }
}

/// `--suspicion`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SuspicionArg {
    /// After --suspect-after, every session alike.
    Fixed,
    /// By each session's phi.
    Adaptive,
}

/// `--etcd-compaction`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CompactionArg {
    /// The cluster's nodes compact etcd.
    On,
    /// The operator compacts etcd.
    Off,
}

/// Validates the flags, binds, and serves until a signal.
pub(crate) fn run(args: ServeArgs, logs: &LogSink) -> anyhow::Result<()> {
    let config = args.config()?;
    config
        .validate()
        .context("invalid flags (see heartbeat serve --help)")?;
    raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Listening before anything is announced: a signal sent as soon as
        // the server says it is serving must drain it, not kill it.
        let signals = ShutdownSignals::listen()?;
        let incoming = TcpIncoming::bind(args.listen)
            .map_err(|source| ServeError::Bind {
                addr: args.listen,
                source,
            })?
            .with_nodelay(Some(true));
        let listen = incoming.local_addr().unwrap_or(args.listen);
        let reloadables: Vec<Reloadable> = config
            .client_credentials
            .clone()
            .map(Reloadable::Credentials)
            .into_iter()
            .chain(config.tls.clone().map(Reloadable::Tls))
            .collect();
        if !reloadables.is_empty() {
            tokio::spawn(reload_on_change(reloadables));
        }
        let drops = logs.drops();
        let (ping_interval, timeout) = (config.ping_interval, config.timeout);
        // Announced once the server is built (and, in cluster mode, joined).
        let on_ready = move |handle: HeartbeatHandle| {
            info!(%listen, ?ping_interval, ?timeout, "serving");
            tokio::spawn(async move {
                let mut every = tokio::time::interval(LOG_DROPS_REPORTED_EVERY);
                loop {
                    every.tick().await;
                    let dropped = u64::try_from(drops.dropped_lines()).unwrap_or(u64::MAX);
                    handle.metrics().log_lines_dropped(dropped);
                }
            });
        };
        server::serve(incoming, config, shutdown_signal(signals), on_ready).await?;
        Ok(())
    })
}

/// How often credential and certificate files are checked for changes.
const RELOAD_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// What the server reloads from files while it runs.
#[derive(Clone)]
enum Reloadable {
    Credentials(ClientCredentials),
    Tls(ServerTls),
}

impl Reloadable {
    fn paths(&self) -> Vec<PathBuf> {
        match self {
            Self::Credentials(credentials) => {
                credentials.path().map(Path::to_owned).into_iter().collect()
            }
            Self::Tls(tls) => {
                let files = tls.files();
                [
                    Some(&files.cert),
                    Some(&files.key),
                    files.client_ca.as_ref(),
                ]
                .into_iter()
                .flatten()
                .cloned()
                .collect()
            }
        }
    }

    /// Reloads, and logs what came of it: a file that does not parse leaves
    /// what is in force, and says why.
    fn reload(&self) {
        match self {
            Self::Credentials(credentials) => match credentials.reload() {
                Ok(count) => info!(credentials = count, "client credentials reloaded"),
                Err(error) => {
                    warn!(%error, "client credentials not reloaded; the ones in force stay")
                }
            },
            Self::Tls(tls) => match tls.reload() {
                Ok(()) => info!("TLS certificates reloaded; new connections use them"),
                Err(error) => {
                    warn!(%error, "TLS certificates not reloaded; the ones in force stay")
                }
            },
        }
    }
}

/// Reloads everything on SIGHUP, and each thing when one of its files changes.
async fn reload_on_change(reloadables: Vec<Reloadable>) {
    let stamps = |reloadable: &Reloadable| -> Vec<Option<std::time::SystemTime>> {
        reloadable
            .paths()
            .iter()
            .map(|path| {
                std::fs::metadata(path)
                    .and_then(|meta| meta.modified())
                    .ok()
            })
            .collect()
    };
    let mut seen: Vec<_> = reloadables.iter().map(stamps).collect();
    let mut hangups = Hangups::listen();
    let mut every = tokio::time::interval(RELOAD_CHECK_EVERY);
    loop {
        tokio::select! {
            () = hangups.recv() => reloadables.iter().for_each(Reloadable::reload),
            _ = every.tick() => {
                for (reloadable, seen) in reloadables.iter().zip(&mut seen) {
                    let now = stamps(reloadable);
                    if now != *seen {
                        *seen = now;
                        reloadable.reload();
                    }
                }
            }
        }
    }
}

/// SIGHUP, where there is such a thing.
struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                signal: signal(SignalKind::hangup()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            signal.recv().await;
            return;
        }
        std::future::pending::<()>().await;
    }
}

/// Completes on the first signal, and arms the second to exit at once.
async fn shutdown_signal(mut signals: ShutdownSignals) {
    signals.recv().await;
    tokio::spawn(async move {
        signals.recv().await;
        warn!("second signal: exiting at once");
        std::process::exit(130);
    });
}

/// Many sessions mean many sockets: lift the soft open-files limit to the hard one.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(open_files = limit, "open-files limit"),
        Err(error) => warn!(%error, "cannot raise the open-files limit"),
    }
}
