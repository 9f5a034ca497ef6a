//! The errors the library returns at its boundaries.
//!
//! Each message names the offending value and says how to fix it, because the
//! same text reaches an operator as the one line `heartbeat serve` prints.

use std::{io, net::SocketAddr, time::Duration};

use humantime::format_duration;

/// A setting, or a combination of settings, that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The φ threshold of adaptive suspicion is outside what is taken.
    #[error("phi threshold {value} is out of range: use {min} to {max} ({default}, the default, suspects a steady client soon after it misses its rhythm)")]
    PhiThreshold {
        /// The configured threshold, as given.
        value: String,
        /// The smallest taken.
        min: String,
        /// The largest taken.
        max: String,
        /// The default.
        default: String,
    },
    /// A browser listener is configured in a build without it.
    #[error("this build has no browser listener (the `web` feature is off): build tonic-heartbeat with features = [\"web\"], or leave ServerConfig::web unset")]
    WebNotBuilt,
    /// An allowed web origin is not one a browser sends.
    #[error("web allowed origin \"{origin}\" {problem}: write it as a browser sends it, scheme://host[:port] (for example https://app.example.com), or * for any")]
    WebOrigin {
        /// The configured origin.
        origin: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A cluster setting is invalid; the message names it and the fix.
    #[error("{0}")]
    Cluster(String),
    /// A duration that must be positive is zero.
    #[error("{name} must be greater than zero (for example {example})")]
    ZeroDuration {
        /// The setting's name.
        name: &'static str,
        /// A sensible value to suggest.
        example: &'static str,
    },
    /// A duration is longer than any setting takes.
    #[error(
        "{name} {} is too long: use at most {}",
        format_duration(*value),
        format_duration(*max)
    )]
    DurationTooLong {
        /// The setting's name.
        name: &'static str,
        /// The configured value.
        value: Duration,
        /// The longest allowed.
        max: Duration,
    },
    /// A count that must be positive is zero.
    #[error("{name} must be at least 1")]
    ZeroCount {
        /// The setting's name.
        name: &'static str,
    },
    /// The timeout does not leave room for a ping.
    #[error(
        "timeout {} must be longer than ping_interval {}: raise timeout or lower ping_interval (2-3 intervals is usual)",
        format_duration(*timeout),
        format_duration(*ping_interval)
    )]
    TimeoutNotAboveInterval {
        /// The configured timeout.
        timeout: Duration,
        /// The configured ping interval.
        ping_interval: Duration,
    },
    /// The suspicion threshold is outside (ping_interval, timeout).
    #[error(
        "suspect_after {} must be longer than ping_interval {} and shorter than timeout {}",
        format_duration(*suspect_after),
        format_duration(*ping_interval),
        format_duration(*timeout)
    )]
    SuspectOutOfRange {
        /// The configured suspicion threshold.
        suspect_after: Duration,
        /// The configured ping interval.
        ping_interval: Duration,
        /// The configured timeout.
        timeout: Duration,
    },
    /// Clients pinging at the interval would earn strikes.
    #[error(
        "min_ping_interval {} must be shorter than ping_interval {}, or clients that ping at the interval earn strikes",
        format_duration(*min_ping_interval),
        format_duration(*ping_interval)
    )]
    MinPingNotBelowInterval {
        /// The configured minimum spacing of client pings.
        min_ping_interval: Duration,
        /// The configured ping interval.
        ping_interval: Duration,
    },
    /// Client ids from certificates need client certificates.
    #[error(
        "client ids from certificates need mutual TLS: give a client CA (--tls-client-ca) too"
    )]
    CertificateIdsWithoutMutualTls,
    /// A size limit is outside its allowed range.
    #[error("{name} {value} is out of range: use {min} to {max}")]
    OutOfRange {
        /// The setting's name.
        name: &'static str,
        /// The configured value.
        value: u64,
        /// The smallest allowed value.
        min: u64,
        /// The largest allowed value.
        max: u64,
    },
}

/// The admin token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("cannot read the admin token file {path}: {source}")]
    Unreadable {
        /// The file's path.
        path: std::path::PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// The file holds only white space.
    #[error("the admin token file {path} is empty: write the token into it (surrounding white space is ignored)")]
    Empty {
        /// The file's path.
        path: std::path::PathBuf,
    },
}

/// The client credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file could not be read.
    #[error("cannot read the client credentials file {path}: {source}")]
    Unreadable {
        /// The file's path.
        path: std::path::PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// A line is not a credential.
    #[error("the client credentials file {path}, line {line}: {problem}")]
    Malformed {
        /// The file's path.
        path: std::path::PathBuf,
        /// The line's number, from 1.
        line: usize,
        /// What is wrong with it, and how to write it.
        problem: String,
    },
}

/// The TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read, or holds no valid PEM of what it should.
    #[error("cannot read {what} from {path}: {source} (it must be PEM)")]
    Pem {
        /// The file's path.
        path: std::path::PathBuf,
        /// What the file should hold.
        what: &'static str,
        /// Why reading failed.
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{path} holds no certificate: it must hold PEM `CERTIFICATE` blocks")]
    NoCertificate {
        /// The file's path.
        path: std::path::PathBuf,
    },
    /// rustls refused part of the configuration.
    #[error("TLS refused {what}: {source}")]
    Rejected {
        /// What was refused.
        what: &'static str,
        /// rustls's reason.
        source: tokio_rustls::rustls::Error,
    },
    /// The client CA cannot verify client certificates.
    #[error("the client CA file {path} cannot be used: {problem}")]
    ClientCa {
        /// The file's path.
        path: std::path::PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// The standalone server could not start or failed while serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}{hint}", hint = bind_hint(source))]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        source: io::Error,
    },
    /// The HTTP/2 server failed.
    #[error("the server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built from the descriptors.
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// Cluster mode could not join, or the node fenced itself.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

fn bind_hint(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::AddrInUse => {
            " (another process holds it: stop it or choose another --listen)"
        }
        io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need privileges: choose a port above 1023)"
        }
        io::ErrorKind::AddrNotAvailable => {
            " (no interface has that address: use 127.0.0.1 or 0.0.0.0)"
        }
        _ => "",
    }
}

/// Backoff settings that cannot work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid backoff: {0}")]
pub struct InvalidBackoff(pub(crate) &'static str);

/// The heartbeat client could not be built or closed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address is not a usable URL.
    #[error("invalid server URL {url:?}: {reason} (write http://host:port, or host:port)")]
    InvalidUrl {
        /// The address as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The backoff settings are invalid.
    #[error(transparent)]
    Backoff(#[from] InvalidBackoff),
    /// A TLS file could not be read.
    #[error("cannot read the TLS file {path}: {source}")]
    TlsFile {
        /// The file's path.
        path: std::path::PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// A client certificate without its key, or a key without its certificate.
    #[error("a client certificate and its key go together: give both, or neither")]
    TlsPair,
    /// The bearer token cannot travel in a header.
    #[error("the bearer token is not valid in a header: it must be printable ASCII")]
    InvalidToken,
    /// The client's own thread could not be started.
    #[error("cannot start the heartbeat client's thread: {0}")]
    Thread(#[source] io::Error),
    /// The client is closed; it will not connect again.
    #[error("the heartbeat client is closed")]
    Closed,
    /// The server did not finish the session within the close timeout.
    #[error("the server did not confirm the goodbye within {}", format_duration(*.0))]
    CloseTimeout(Duration),
}

/// A call to a server's PresenceService failed, or its answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// The admin token cannot travel in a header.
    #[error("the admin token is not valid in a header: it must be printable ASCII")]
    InvalidToken,
    /// The server has no open session with this id.
    #[error("no session {0:?} is open; list them with ListSessions")]
    NotFound(String),
    /// The server refused the call or it failed; the status says why.
    #[error("the server answered {:?}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// The server sent a message this client cannot read.
    #[error("the server sent a malformed presence message: {0}")]
    Malformed(&'static str),
}

impl PresenceError {
    /// Whether trying again later may succeed: the server was restarting,
    /// the watcher lagged, or the connection broke. Refusals (credentials,
    /// bad requests) and malformed answers are permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Status(status) => matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Aborted
                    | tonic::Code::Internal
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
            ),
            Self::InvalidToken | Self::NotFound(_) | Self::Malformed(_) => false,
        }
    }
}
