//! Metric names and recorders, exposed in the Prometheus text format.
//!
//! Every family has `# HELP` and `# TYPE`. Close reasons use the same lower-case
//! names as logs and the `CloseReason` enum (`timeout`, `client_goodbye`, …), so
//! one vocabulary serves clients, observers, operators and dashboards.
//!
//! prometheus-client writes OpenMetrics; scrapers that ask for it get it as is.
//! Everyone else gets the classic Prometheus text format (version 0.0.4), which
//! differs in two ways: a counter's `# HELP`/`# TYPE` lines name its `_total`
//! sample, and there is no `# EOF`.

mod cluster;

use std::{fmt::Write, sync::OnceLock, time::Duration};

use prometheus_client::{
    encoding::text::{encode_eof, encode_registry},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

/// Content type of the classic Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of the OpenMetrics text format.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the deadline-lateness buckets, in seconds.
const LATENESS_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Upper bounds of the φ-at-suspicion buckets.
const PHI_BUCKETS: [f64; 11] = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 30.0];

type ReasonCounter = Family<[(&'static str, &'static str); 1], Counter>;

pub(crate) use cluster::ClusterMetrics;

/// The server's metrics; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sessions_open: Gauge,
    sessions_suspect: Gauge,
    sessions_opened: Counter,
    sessions_closed: ReasonCounter,
    rtt: Histogram,
    deadline_lateness: Histogram,
    phi_at_suspicion: Histogram,
    rotations: Counter,
    frames_received: Counter,
    frames_sent: Counter,
    ping_strikes: Counter,
    admission_rejections: ReasonCounter,
    watchers: Gauge,
    watchers_lagged: Counter,
    log_lines_dropped: Counter,
    connections_refused: Counter,
    connections_closed_idle: Counter,
    accept_errors: Counter,
    tls_handshakes_failed: Counter,
    /// Cluster mode's families, registered when a node joins a cluster.
    cluster: OnceLock<ClusterMetrics>,
}

impl Metrics {
    /// Registers every family. The `reason` series of closes and rejections
    /// start at zero for each of the given names, so dashboards see them all.
    pub fn new(close_reasons: &[&'static str], rejection_reasons: &[&'static str]) -> Self {
        let mut registry = Registry::default();
        let metrics = Self {
            sessions_open: Gauge::default(),
            sessions_suspect: Gauge::default(),
            sessions_opened: Counter::default(),
            sessions_closed: ReasonCounter::default(),
            // 100 µs to about 26 s.
            rtt: Histogram::new(exponential_buckets(0.0001, 2.0, 19)),
            // Fine where the target is (a few milliseconds), coarse beyond.
            deadline_lateness: Histogram::new(LATENESS_BUCKETS),
            phi_at_suspicion: Histogram::new(PHI_BUCKETS),
            rotations: Counter::default(),
            frames_received: Counter::default(),
            frames_sent: Counter::default(),
            ping_strikes: Counter::default(),
            admission_rejections: ReasonCounter::default(),
            watchers: Gauge::default(),
            watchers_lagged: Counter::default(),
            log_lines_dropped: Counter::default(),
            connections_refused: Counter::default(),
            connections_closed_idle: Counter::default(),
            accept_errors: Counter::default(),
            tls_handshakes_failed: Counter::default(),
            cluster: OnceLock::new(),
            registry: Registry::default(),
        };
        let build_info = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        registry.register(
            "heartbeat_build_info",
            "Always 1; the version label is the running server's",
            build_info,
        );
        registry.register(
            "heartbeat_sessions_open",
            "Heartbeat sessions open now (Hello received, not yet closed)",
            metrics.sessions_open.clone(),
        );
        registry.register(
            "heartbeat_sessions_suspect",
            "Open sessions whose client has been silent past the suspicion threshold",
            metrics.sessions_suspect.clone(),
        );
        registry.register(
            "heartbeat_sessions_opened",
            "Sessions opened (Hello received)",
            metrics.sessions_opened.clone(),
        );
        registry.register(
            "heartbeat_sessions_closed",
            "Sessions closed, by close reason",
            metrics.sessions_closed.clone(),
        );
        registry.register(
            "heartbeat_rtt_seconds",
            "Round-trip time of the server's pings, per answered ping",
            metrics.rtt.clone(),
        );
        registry.register(
            "heartbeat_deadline_lateness_seconds",
            "How long after its deadline (last frame plus timeout) each silent session's Goodbye{TIMEOUT} was handed to HTTP/2",
            metrics.deadline_lateness.clone(),
        );
        registry.register(
            "heartbeat_phi_at_suspicion",
            "Adaptive suspicion: each suspected session's phi at the moment it became suspect (a phi below the threshold means the fixed suspect_after came first)",
            metrics.phi_at_suspicion.clone(),
        );
        registry.register(
            "heartbeat_rotations",
            "Sessions asked to rotate (Goodbye{ROTATE}) at their maximum age",
            metrics.rotations.clone(),
        );
        registry.register(
            "heartbeat_frames_received",
            "Frames received from clients",
            metrics.frames_received.clone(),
        );
        registry.register(
            "heartbeat_frames_sent",
            "Frames sent to clients",
            metrics.frames_sent.clone(),
        );
        registry.register(
            "heartbeat_ping_strikes",
            "Unsolicited client frames that came closer together than the minimum spacing",
            metrics.ping_strikes.clone(),
        );
        registry.register(
            "heartbeat_admission_rejections",
            "Streams refused before any frame, by reason",
            metrics.admission_rejections.clone(),
        );
        registry.register(
            "heartbeat_watchers",
            "Presence watches open now",
            metrics.watchers.clone(),
        );
        registry.register(
            "heartbeat_watchers_lagged",
            "Presence watches ended because they fell too far behind",
            metrics.watchers_lagged.clone(),
        );
        registry.register(
            "heartbeat_log_lines_dropped",
            "Log lines dropped because the log writer fell behind (a slow or blocked stderr), never a stalled heartbeat",
            metrics.log_lines_dropped.clone(),
        );
        registry.register(
            "heartbeat_connections_refused",
            "Connections closed at accept because their peer IP held its maximum",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "heartbeat_connections_closed_idle",
            "Connections closed for opening no stream within the handshake timeout, or none for the idle timeout",
            metrics.connections_closed_idle.clone(),
        );
        registry.register(
            "heartbeat_accept_errors",
            "Failed accepts (for instance out of file descriptors), each followed by a pause",
            metrics.accept_errors.clone(),
        );
        registry.register(
            "heartbeat_tls_handshakes_failed",
            "TLS handshakes that failed or timed out (an untrusted or missing client certificate, a plain-text client)",
            metrics.tls_handshakes_failed.clone(),
        );
        // Creating each series is the point; the returned guard is not needed.
        for reason in close_reasons {
            let _ = metrics.sessions_closed.get_or_create(&[("reason", reason)]);
        }
        for reason in rejection_reasons {
            let _ = metrics
                .admission_rejections
                .get_or_create(&[("reason", reason)]);
        }
        Self {
            registry,
            ..metrics
        }
    }

    /// A session said Hello.
    pub fn session_opened(&self) {
        self.sessions_opened.inc();
        self.sessions_open.inc();
    }

    /// A session closed for `reason`; `was_suspect` if it was suspect then.
    pub fn session_closed(&self, reason: &'static str, was_suspect: bool) {
        self.sessions_open.dec();
        if was_suspect {
            self.sessions_suspect.dec();
        }
        self.sessions_closed
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// A session became suspect.
    pub fn session_suspected(&self) {
        self.sessions_suspect.inc();
    }

    /// A suspect session recovered.
    pub fn session_recovered(&self) {
        self.sessions_suspect.dec();
    }

    /// A client answered a server ping after `rtt`.
    pub fn rtt(&self, rtt: Duration) {
        self.rtt.observe(rtt.as_secs_f64());
    }

    /// A silent session's ending went out `lateness` after its deadline.
    pub fn deadline_lateness(&self, lateness: Duration) {
        self.deadline_lateness.observe(lateness.as_secs_f64());
    }

    /// A session became suspect with φ `phi` (adaptive suspicion).
    pub fn phi_at_suspicion(&self, phi: f64) {
        self.phi_at_suspicion.observe(phi);
    }

    /// A session was asked to rotate.
    pub fn rotation(&self) {
        self.rotations.inc();
    }

    /// A frame arrived from a client.
    pub fn frame_received(&self) {
        self.frames_received.inc();
    }

    /// A frame went to a client.
    pub fn frame_sent(&self) {
        self.frames_sent.inc();
    }

    /// A client earned a ping strike.
    pub fn ping_strike(&self) {
        self.ping_strikes.inc();
    }

    /// A stream was refused before any frame, for `reason`.
    pub fn admission_rejected(&self, reason: &'static str) {
        self.admission_rejections
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// A presence watch started.
    pub fn watcher_started(&self) {
        self.watchers.inc();
    }

    /// A presence watch ended.
    pub fn watcher_ended(&self) {
        self.watchers.dec();
    }

    /// A presence watch was cut off for falling behind (counted the moment
    /// it is cut, even while its sends are blocked).
    pub fn watcher_lagged(&self) {
        self.watchers_lagged.inc();
    }

    /// A connection was refused at accept: its peer was over its cap.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// A connection was closed for idleness (or for never starting).
    pub fn connection_closed_idle(&self) {
        self.connections_closed_idle.inc();
    }

    /// A TLS handshake failed or timed out.
    pub fn tls_handshake_failed(&self) {
        self.tls_handshakes_failed.inc();
    }

    /// An `accept` failed.
    pub fn accept_error(&self) {
        self.accept_errors.inc();
    }

    /// The log writer has dropped `total` lines since it started (a running
    /// total, as the writer counts them).
    pub fn log_lines_dropped(&self, total: u64) {
        let counted = self.log_lines_dropped.get();
        if total > counted {
            self.log_lines_dropped.inc_by(total - counted);
        }
    }

    /// Cluster mode's families, registered (in this server's scrape) on the
    /// first call.
    pub(crate) fn cluster(&self) -> &ClusterMetrics {
        self.cluster.get_or_init(ClusterMetrics::new)
    }

    /// The metrics in OpenMetrics if `openmetrics`, else in the classic
    /// Prometheus text format; with the matching content type.
    pub fn render(&self, openmetrics: bool) -> (String, &'static str) {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut text, &self.registry);
        if let Some(cluster) = self.cluster.get() {
            cluster.refresh();
            let _ = encode_registry(&mut text, &cluster.registry);
        }
        let _ = encode_eof(&mut text);
        if openmetrics {
            (text, OPENMETRICS_TEXT)
        } else {
            (to_prometheus_text(&text), PROMETHEUS_TEXT)
        }
    }
}

/// Rewrites OpenMetrics text as classic Prometheus text (version 0.0.4).
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        let _ = writeln!(out, "{}", described.as_deref().unwrap_or(line));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that the classic format names counters with `_total` in HELP and
    /// TYPE, drops `# EOF`, and keeps every family described.
    #[test]
    fn classic_text_describes_counters_by_their_samples() {
        let metrics = Metrics::new(&["timeout"], &["capacity"]);
        metrics.session_opened();
        metrics.session_closed("timeout", false);
        metrics.rtt(Duration::from_millis(3));
        let (text, content_type) = metrics.render(false);
        assert_eq!(content_type, PROMETHEUS_TEXT);
        assert!(
            text.contains("# TYPE heartbeat_sessions_closed_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP heartbeat_sessions_closed_total Sessions closed"),
            "{text}"
        );
        assert!(
            text.contains("heartbeat_sessions_closed_total{reason=\"timeout\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE heartbeat_sessions_open gauge\n"),
            "{text}"
        );
        assert!(text.contains("heartbeat_rtt_seconds_count 1\n"), "{text}");
        assert!(!text.contains("# EOF"));
        let (open, content_type) = metrics.render(true);
        assert_eq!(content_type, OPENMETRICS_TEXT);
        assert!(open.ends_with("# EOF\n"));
    }

    /// Tests that every server reports its version, and that the cluster
    /// families appear only once a node uses them, before the one `# EOF`.
    #[test]
    fn build_info_always_and_cluster_families_once_used() {
        let metrics = Metrics::new(&["timeout"], &["capacity"]);
        let (text, _) = metrics.render(false);
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!(
                "heartbeat_build_info{{version=\"{version}\"}} 1\n"
            )),
            "{text}"
        );
        assert!(!text.contains("heartbeat_cluster_"), "{text}");
        metrics.cluster().write_failed("nospace");
        metrics.cluster().heard_head(10);
        metrics.cluster().applied(7);
        metrics.cluster().progressed(6);
        let (text, _) = metrics.render(true);
        assert!(
            text.contains("heartbeat_cluster_write_failures_total{error=\"nospace\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("heartbeat_cluster_write_failures_total{error=\"timeout\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("heartbeat_cluster_mirror_lag_revisions 3\n"),
            "{text}"
        );
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }
}
