//! Validated server settings with documented defaults.
//!
//! Defaults keep a session alive behind the common 60 s idle timeouts of nginx
//! and cloud load balancers: the server pings every 10 s, so a healthy stream is
//! never idle for long, and a client is declared gone after 30 s (three missed
//! intervals) rather than on one delayed packet.

use std::{fmt, net::SocketAddr, path::Path, time::Duration};

use crate::{
    credentials::ClientCredentials,
    error::{ConfigError, TokenError},
    protocol::Phi,
    tls::ServerTls,
};

/// The longest duration any setting takes. Longer ones are surely typos, and
/// deadlines that far away would overflow the clock.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Everything the heartbeat server can be told; see each field for its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// How often the server pings each session, and tells clients to. Default 10 s.
    pub ping_interval: Duration,
    /// Silence after which a session is ended with `DEADLINE_EXCEEDED`. Default 30 s.
    pub timeout: Duration,
    /// Silence after which a session is suspect. Default (`None`): the smaller of
    /// 2 × `ping_interval` and the midpoint of `ping_interval` and `timeout`.
    pub suspect_after: Option<Duration>,
    /// A stream that has not said Hello by then is ended as a timeout; the
    /// deadline in force is the smaller of this and `timeout`. Default 10 s.
    pub hello_timeout: Duration,
    /// Unsolicited client frames closer together than this earn a strike. Default 1 s.
    pub min_ping_interval: Duration,
    /// Strikes allowed before a session is ended for too many pings. Default 2.
    pub ping_strikes: u32,
    /// Open sessions (streams, Hello or not) at most; more are refused. Default 100,000.
    pub max_sessions: usize,
    /// A connection that opens no stream within this is closed (a slowloris,
    /// or a peer that never sends the HTTP/2 preface). Default 10 s.
    pub handshake_timeout: Duration,
    /// A connection with no open stream for this long is closed. Default 5 min.
    pub idle_timeout: Duration,
    /// How often HTTP/2 pings probe a connection, to reap dead ones. Default 60 s.
    pub http2_keepalive_interval: Duration,
    /// How long an HTTP/2 ping may go unanswered before the connection is
    /// closed. Default 20 s.
    pub http2_keepalive_timeout: Duration,
    /// Connections one client IP may hold; more are closed at accept.
    /// Default 1,024.
    pub max_connections_per_ip: usize,
    /// Calls (sessions and presence calls) one client IP may hold open; more
    /// are refused with `RESOURCE_EXHAUSTED`. Default 20,000.
    pub max_streams_per_ip: usize,
    /// How long a shutdown waits for goodbyes to reach clients. Default 10 s.
    pub shutdown_grace: Duration,
    /// The `reconnect_after` hint sent with the shutdown goodbye. Default 1 s.
    pub reconnect_after: Duration,
    /// HTTP/2 streams one connection may hold open. Default 4,096.
    pub max_streams_per_connection: u32,
    /// Size limits on what clients send.
    pub limits: FrameLimits,
    /// Changes kept for resuming watchers. Default 10,000.
    pub watch_history: usize,
    /// Events queued for one watcher before it is ended as lagging. Default 1,024.
    pub watch_queue: usize,
    /// Presence watches open at once; more are refused with
    /// `RESOURCE_EXHAUSTED`. Default 256.
    pub max_watchers: usize,
    /// TLS for the server's listener (and, with a client CA, mutual TLS),
    /// applied by [`serve`](crate::server::serve); an embedder serving on its own
    /// listener sets up TLS there. Default: none (plain HTTP/2).
    pub tls: Option<ServerTls>,
    /// The tokens clients must present, and the client ids each allows
    /// (contract rule 1). Default: none (any client may say any id).
    pub client_credentials: Option<ClientCredentials>,
    /// Under mutual TLS, a stream without a bearer token may say `Hello` as
    /// any name its client certificate is valid for (its DNS subject
    /// alternative names), and one without either is refused. Needs the
    /// listener of [`serve`](crate::server::serve), which sees the certificate.
    /// Default: false.
    pub client_ids_from_certificate: bool,
    /// The token every PresenceService call must present. Default: none (open).
    pub admin_token: Option<AdminToken>,
    /// Where the standalone server answers `GET /metrics`. Default: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Cluster mode: one presence across several servers, kept in etcd.
    /// Default: `None`, a single server.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// The browser listener: sessions over WebSocket and, if asked, the live
    /// presence page; served by [`serve`](crate::server::serve). Default:
    /// `None`, gRPC only.
    pub web: Option<WebConfig>,
    /// How sessions become suspect: after the fixed `suspect_after`, or by
    /// each one's own rhythm. Default: fixed.
    pub suspicion: Suspicion,
    /// Rotation: a session this old (±10 %, drawn per session) is asked to
    /// move with `Goodbye{ROTATE}`, so that long-lived streams spread over a
    /// fleet that grew. Default: `None`, never.
    pub max_session_age: Option<Duration>,
    /// How long a session asked to rotate keeps its stream for its
    /// successor's Hello; then it ends as `ROTATED`. Default 10 s.
    pub rotation_grace: Duration,
    /// Rotations started per second at most, so a fleet whose sessions come
    /// of age together reconnects spread out, never as a herd. Default 100.
    pub max_rotations_per_second: u32,
}

/// How sessions become suspect (the contract's "Adaptive suspicion").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Suspicion {
    /// After `suspect_after` of silence, for every session alike.
    #[default]
    Fixed,
    /// When the session's φ, over its client's recent inter-arrival times,
    /// reaches the threshold (8 by default): a steady client is suspected
    /// soon after it misses its rhythm, a jittery one not for its usual
    /// jitter. Never before `ping_interval` of silence, always by
    /// `suspect_after`.
    Adaptive {
        /// The φ at which a session is suspect.
        phi_threshold: Phi,
    },
}

impl Suspicion {
    /// The default threshold of adaptive suspicion.
    pub const DEFAULT_PHI_THRESHOLD: Phi = Phi(8.0);
    /// The thresholds taken: below, jitter alone would suspect; above, a
    /// tail this improbable is beyond what a double can tell apart.
    pub const PHI_THRESHOLDS: std::ops::RangeInclusive<f64> = 1.0..=30.0;
}

/// The browser listener of [`serve`](crate::server::serve).
///
/// Browsers cannot hold a gRPC bidirectional stream, so the same sessions are
/// served over WebSocket at `/v1/heartbeat` (the contract's "Browsers"
/// mapping), on a listener of their own: HTTP/1.1, with the server's TLS
/// when it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The `Origin`s a browser page may connect from, as browsers send them
    /// (`https://app.example.com`, `http://localhost:8080`), or `*` for any.
    /// The listener's own pages, opened by IP address or as `localhost`, may
    /// always; pages under a DNS name (even the listener's own) need listing,
    /// which keeps out sites that rebind their name to the listener's address.
    /// Default: none. Requests without an `Origin` (not from a browser) are
    /// not checked here; credentials still are.
    pub allowed_origins: Vec<String>,
    /// Serve the live presence page at `/`, with the watch and evict
    /// endpoints it uses. Default: off.
    pub ui: bool,
}

impl WebConfig {
    /// Listening at `listen`, same-origin pages only, no presence page.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            allowed_origins: Vec::new(),
            ui: false,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for origin in &self.allowed_origins {
            if origin == "*" {
                continue;
            }
            let refused = |problem| {
                Err(ConfigError::WebOrigin {
                    origin: origin.clone(),
                    problem,
                })
            };
            let Some((scheme, host)) = origin.split_once("://") else {
                return refused("has no scheme");
            };
            if scheme != "http" && scheme != "https" {
                return refused("is neither http nor https");
            }
            if host.is_empty() {
                return refused("has no host");
            }
            if host.contains('/') {
                return refused("has a path, which origins never carry");
            }
            if origin.bytes().any(|byte| !byte.is_ascii_graphic()) {
                return refused("has spaces or characters origins never carry");
            }
        }
        Ok(())
    }
}

/// A secret that PresenceService callers present as `authorization: Bearer …`.
///
/// Its `Debug` never shows it, and it is compared in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Reads the token from `path`; surrounding white space is trimmed.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Unreadable {
            path: path.to_owned(),
            source,
        })?;
        Self::new(text.trim()).ok_or_else(|| TokenError::Empty {
            path: path.to_owned(),
        })
    }

    /// A token with this value; `None` if it is empty.
    pub fn new(token: impl Into<String>) -> Option<Self> {
        let token = token.into();
        (!token.is_empty()).then_some(Self(token))
    }

    /// The token's value, for sending it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is the token, in time that depends only on the
    /// lengths, never on where the first difference is.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        let difference = expected
            .iter()
            .zip(presented)
            .fold(expected.len() ^ presented.len(), |acc, (a, b)| {
                acc | usize::from(a ^ b)
            });
        difference == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Size limits on client frames; a frame over them is a protocol violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// One encoded inbound message, in bytes. Default 16 KiB.
    pub max_message_size: u32,
    /// `Hello.client_id`, in bytes of UTF-8. Default 256.
    pub max_client_id: usize,
    /// Label pairs in `Hello.labels`. Default 32.
    pub max_labels: usize,
    /// A label key, in bytes (keys must also be non-empty). Default 63.
    pub max_label_key: usize,
    /// A label value, in bytes. Default 256.
    pub max_label_value: usize,
}

impl ServerConfig {
    /// The defaults, as a constant: the one place they are written. The
    /// command line shows and uses these same values.
    pub const DEFAULT: Self = Self {
        ping_interval: Duration::from_secs(10),
        timeout: Duration::from_secs(30),
        suspect_after: None,
        hello_timeout: Duration::from_secs(10),
        min_ping_interval: Duration::from_secs(1),
        ping_strikes: 2,
        max_sessions: 100_000,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(300),
        http2_keepalive_interval: Duration::from_secs(60),
        http2_keepalive_timeout: Duration::from_secs(20),
        max_connections_per_ip: 1024,
        max_streams_per_ip: 20_000,
        shutdown_grace: Duration::from_secs(10),
        reconnect_after: Duration::from_secs(1),
        max_streams_per_connection: 4096,
        limits: FrameLimits::DEFAULT,
        watch_history: 10_000,
        watch_queue: 1024,
        max_watchers: 256,
        tls: None,
        client_credentials: None,
        client_ids_from_certificate: false,
        admin_token: None,
        metrics_listen: None,
        cluster: None,
        web: None,
        suspicion: Suspicion::Fixed,
        max_session_age: None,
        rotation_grace: Duration::from_secs(10),
        max_rotations_per_second: 100,
    };
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl FrameLimits {
    /// The defaults, as a constant; see [`ServerConfig::DEFAULT`].
    pub const DEFAULT: Self = Self {
        max_message_size: 16 * 1024,
        max_client_id: 256,
        max_labels: 32,
        max_label_key: 63,
        max_label_value: 256,
    };
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl ServerConfig {
    /// The most sessions one server may be configured to hold: far beyond
    /// what one process serves, and within what its queues can be sized for.
    pub const MAX_SESSIONS: usize = 100_000_000;

    /// The suspicion threshold in force: the configured one, or the default
    /// derived from the interval and the timeout.
    pub fn effective_suspect_after(&self) -> Duration {
        self.suspect_after.unwrap_or_else(|| {
            let midpoint =
                self.ping_interval + (self.timeout.saturating_sub(self.ping_interval)) / 2;
            self.ping_interval.saturating_mul(2).min(midpoint)
        })
    }

    /// Checks every setting and every combination; the error names the value
    /// and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
            let size = self.limits.max_message_size;
            if size > crate::cluster::ClusterConfig::MAX_MESSAGE_SIZE {
                return Err(ConfigError::Cluster(format!(
                    "max_message_size {size} is over {}, the most a session record can carry to etcd in one request (etcd refuses requests over 1.5 MiB by default): lower --max-message-size",
                    crate::cluster::ClusterConfig::MAX_MESSAGE_SIZE
                )));
            }
            let most = crate::cluster::ClusterConfig::MAX_SESSIONS;
            if self.max_sessions > most {
                return Err(ConfigError::Cluster(format!(
                    "max_sessions {} is over {most}, the most one cluster node may hold (a lost node's sessions all close in one etcd revision, which numbers at most 2^20 changes): lower --max-sessions, or run more nodes",
                    self.max_sessions
                )));
            }
        }
        if self.max_sessions > Self::MAX_SESSIONS {
            return Err(ConfigError::OutOfRange {
                name: "max_sessions",
                value: self.max_sessions as u64,
                min: 1,
                max: Self::MAX_SESSIONS as u64,
            });
        }
        if let Some(web) = &self.web {
            if cfg!(not(feature = "web")) {
                return Err(ConfigError::WebNotBuilt);
            }
            web.validate()?;
        }
        for (name, value, example) in [
            ("ping_interval", Some(self.ping_interval), "10s"),
            ("timeout", Some(self.timeout), "30s"),
            ("suspect_after", self.suspect_after, "20s"),
            ("hello_timeout", Some(self.hello_timeout), "10s"),
            ("min_ping_interval", Some(self.min_ping_interval), "1s"),
            ("shutdown_grace", Some(self.shutdown_grace), "10s"),
            ("handshake_timeout", Some(self.handshake_timeout), "10s"),
            ("idle_timeout", Some(self.idle_timeout), "5m"),
            (
                "http2_keepalive_interval",
                Some(self.http2_keepalive_interval),
                "60s",
            ),
            (
                "http2_keepalive_timeout",
                Some(self.http2_keepalive_timeout),
                "20s",
            ),
            ("reconnect_after", Some(self.reconnect_after), "1s"),
            ("max_session_age", self.max_session_age, "1h"),
            ("rotation_grace", Some(self.rotation_grace), "10s"),
        ] {
            let Some(value) = value else { continue };
            // A zero reconnect hint is allowed: come back at once.
            if value.is_zero() && name != "reconnect_after" {
                return Err(ConfigError::ZeroDuration { name, example });
            }
            if value > MAX_DURATION {
                return Err(ConfigError::DurationTooLong {
                    name,
                    value,
                    max: MAX_DURATION,
                });
            }
        }
        if self.timeout <= self.ping_interval {
            return Err(ConfigError::TimeoutNotAboveInterval {
                timeout: self.timeout,
                ping_interval: self.ping_interval,
            });
        }
        let suspect_after = self.effective_suspect_after();
        if suspect_after <= self.ping_interval || suspect_after >= self.timeout {
            return Err(ConfigError::SuspectOutOfRange {
                suspect_after,
                ping_interval: self.ping_interval,
                timeout: self.timeout,
            });
        }
        if self.min_ping_interval >= self.ping_interval {
            return Err(ConfigError::MinPingNotBelowInterval {
                min_ping_interval: self.min_ping_interval,
                ping_interval: self.ping_interval,
            });
        }
        for (name, value) in [
            ("max_sessions", self.max_sessions),
            ("watch_history", self.watch_history),
            ("watch_queue", self.watch_queue),
            ("max_watchers", self.max_watchers),
            (
                "max_rotations_per_second",
                self.max_rotations_per_second as usize,
            ),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("max_streams_per_ip", self.max_streams_per_ip),
            (
                "max_streams_per_connection",
                self.max_streams_per_connection as usize,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::ZeroCount { name });
            }
        }
        if let Suspicion::Adaptive { phi_threshold } = self.suspicion {
            if !Suspicion::PHI_THRESHOLDS.contains(&phi_threshold.0) {
                return Err(ConfigError::PhiThreshold {
                    value: phi_threshold.0.to_string(),
                    min: Suspicion::PHI_THRESHOLDS.start().to_string(),
                    max: Suspicion::PHI_THRESHOLDS.end().to_string(),
                    default: Suspicion::DEFAULT_PHI_THRESHOLD.0.to_string(),
                });
            }
        }
        let mutual_tls = self
            .tls
            .as_ref()
            .is_some_and(|tls| tls.files().client_ca.is_some());
        if self.client_ids_from_certificate && !mutual_tls {
            return Err(ConfigError::CertificateIdsWithoutMutualTls);
        }
        self.limits.validate()
    }
}

impl FrameLimits {
    fn validate(&self) -> Result<(), ConfigError> {
        let ranges: [(&'static str, u64, u64, u64); 5] = [
            (
                "max_message_size",
                u64::from(self.max_message_size),
                64,
                4 * 1024 * 1024,
            ),
            ("max_client_id", self.max_client_id as u64, 1, 64 * 1024),
            ("max_labels", self.max_labels as u64, 0, 1024),
            ("max_label_key", self.max_label_key as u64, 1, 64 * 1024),
            ("max_label_value", self.max_label_value as u64, 0, 64 * 1024),
        ];
        for (name, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::OutOfRange {
                    name,
                    value,
                    min,
                    max,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that tokens match exactly, never show in Debug, and that empty
    /// or unreadable files are refused naming the path.
    #[test]
    fn admin_tokens() {
        let token = AdminToken::new("s3cret").expect("non-empty");
        assert!(token.matches(b"s3cret"));
        assert!(!token.matches(b"s3cre"));
        assert!(!token.matches(b"s3cret!"));
        assert!(!token.matches(b"S3cret"));
        assert!(!format!("{token:?}").contains("s3cret"));
        let dir = std::env::temp_dir().join(format!("heartbeat-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("token");
        std::fs::write(&file, "  s3cret\n").expect("write");
        assert_eq!(AdminToken::from_file(&file).expect("readable"), token);
        std::fs::write(&file, " \n").expect("write");
        let empty = AdminToken::from_file(&file).expect_err("empty").to_string();
        assert!(
            empty.contains("is empty: write the token into it"),
            "{empty}"
        );
        let missing = AdminToken::from_file(&dir.join("absent"))
            .expect_err("absent")
            .to_string();
        assert!(
            missing.contains("cannot read the admin token file"),
            "{missing}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Tests that the defaults are valid and derive suspicion at 20 s.
    #[test]
    fn defaults_are_valid() {
        let config = ServerConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.effective_suspect_after(), Duration::from_secs(20));
    }

    /// Tests that the derived suspicion lies strictly between interval and timeout.
    #[test]
    fn derived_suspicion_is_between_interval_and_timeout() {
        let config = ServerConfig {
            ping_interval: Duration::from_millis(100),
            timeout: Duration::from_millis(110),
            ..ServerConfig::default()
        };
        assert_eq!(config.effective_suspect_after(), Duration::from_millis(105));
        let config = ServerConfig {
            min_ping_interval: Duration::from_millis(10),
            ..config
        };
        assert_eq!(config.validate(), Ok(()));
    }

    /// Tests that each broken combination is refused with a message naming it.
    #[test]
    fn refuses_bad_combinations() {
        let base = ServerConfig::default();
        let cases = [
            (
                ServerConfig { timeout: Duration::from_secs(10), ..base.clone() },
                "timeout 10s must be longer than ping_interval 10s",
            ),
            (
                ServerConfig { ping_interval: Duration::ZERO, ..base.clone() },
                "ping_interval must be greater than zero",
            ),
            (
                ServerConfig { suspect_after: Some(Duration::from_secs(40)), ..base.clone() },
                "suspect_after 40s must be longer than ping_interval 10s and shorter than timeout 30s",
            ),
            (
                ServerConfig { min_ping_interval: Duration::from_secs(10), ..base.clone() },
                "min_ping_interval 10s must be shorter than ping_interval 10s",
            ),
            (
                ServerConfig { max_sessions: 0, ..base.clone() },
                "max_sessions must be at least 1",
            ),
        ];
        for (config, expected) in cases {
            let message = config.validate().expect_err(expected).to_string();
            assert!(message.contains(expected), "{message}");
        }
    }
}
