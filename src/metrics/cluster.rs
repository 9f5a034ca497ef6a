//! Cluster mode's metric families, registered only on a cluster node, so a
//! single server's scrape carries none of them.
//!
//! They answer an operator's questions about etcd before it fails the
//! cluster: how long its requests take, how large the write batches are,
//! whether this node's changes reach it (`write_failures`, by kind), how far
//! behind the view follows it, and which nodes this node sees.

use std::{
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

/// The kinds of failed etcd write, as `heartbeat_cluster_write_failures_total`'s
/// `error` label: etcd out of space (its `NOSPACE` alarm), etcd unreachable or
/// without a leader, a call that timed out, and anything else.
const WRITE_FAILURES: [&str; 4] = ["nospace", "unavailable", "timeout", "other"];

/// The etcd calls cluster mode makes, as the latency histogram's `op` label.
const ETCD_OPS: [&str; 6] = ["range", "txn", "compact", "grant", "revoke", "keepalive"];

type Labelled<M> = Family<[(&'static str, &'static str); 1], M, fn() -> M>;

fn latency_histogram() -> Histogram {
    // 250 µs to about 16 s.
    Histogram::new(exponential_buckets(0.00025, 2.0, 17))
}

fn counter() -> Counter {
    Counter::default()
}

/// Cluster mode's metrics (see the module docs).
#[derive(Debug)]
pub(crate) struct ClusterMetrics {
    pub(super) registry: Registry,
    etcd_requests: Labelled<Histogram>,
    write_failures: Labelled<Counter>,
    write_batch: Histogram,
    compactions: Counter,
    mirror_lag: Gauge,
    mirror_age: Gauge<f64, AtomicU64>,
    nodes: Gauge,
    /// etcd's newest revision as last heard; the view's last applied event;
    /// the newest revision etcd said the view's watch had caught up to.
    head: AtomicI64,
    applied: AtomicI64,
    current: AtomicI64,
    /// When the view last applied something, in milliseconds from `started`.
    applied_at: AtomicU64,
    started: Instant,
}

impl ClusterMetrics {
    /// Registers every cluster family, each labelled series at zero.
    pub(super) fn new() -> Self {
        let mut registry = Registry::default();
        let etcd_requests: Labelled<Histogram> = Family::new_with_constructor(latency_histogram);
        let write_failures: Labelled<Counter> = Family::new_with_constructor(counter);
        for op in ETCD_OPS {
            let _ = etcd_requests.get_or_create(&[("op", op)]);
        }
        for error in WRITE_FAILURES {
            let _ = write_failures.get_or_create(&[("error", error)]);
        }
        let metrics = Self {
            registry: Registry::default(),
            etcd_requests,
            write_failures,
            // 1 to 128 changes.
            write_batch: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            compactions: Counter::default(),
            mirror_lag: Gauge::default(),
            mirror_age: Gauge::default(),
            nodes: Gauge::default(),
            head: AtomicI64::new(0),
            applied: AtomicI64::new(0),
            current: AtomicI64::new(0),
            applied_at: AtomicU64::new(0),
            started: Instant::now(),
        };
        registry.register(
            "heartbeat_cluster_etcd_request_duration_seconds",
            "How long each etcd call took until its answer, by operation (keepalive: a lease renewal's round trip)",
            metrics.etcd_requests.clone(),
        );
        registry.register(
            "heartbeat_cluster_write_failures",
            "Writes of this node's session changes (or evictions) to etcd that failed, by kind: nospace (etcd's quota is full), unavailable, timeout, other; each is retried",
            metrics.write_failures.clone(),
        );
        registry.register(
            "heartbeat_cluster_write_batch_size",
            "Session changes written per etcd transaction",
            metrics.write_batch.clone(),
        );
        registry.register(
            "heartbeat_cluster_compactions",
            "Compactions of etcd's history that this node carried out",
            metrics.compactions.clone(),
        );
        registry.register(
            "heartbeat_cluster_mirror_lag_revisions",
            "How many etcd revisions the view is behind the newest revision this node has heard of",
            metrics.mirror_lag.clone(),
        );
        registry.register(
            "heartbeat_cluster_mirror_last_applied_age_seconds",
            "Seconds since the view last applied an event or a progress notice from etcd's watch (about a second when idle and healthy)",
            metrics.mirror_age.clone(),
        );
        registry.register(
            "heartbeat_cluster_nodes",
            "Nodes of the cluster this node sees registered in etcd, itself included",
            metrics.nodes.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// An etcd call of kind `op` (one of `ETCD_OPS`) answered after `took`.
    pub(crate) fn etcd_request(&self, op: &'static str, took: Duration) {
        self.etcd_requests
            .get_or_create(&[("op", op)])
            .observe(took.as_secs_f64());
    }

    /// A write to etcd failed, of kind `error` (one of `WRITE_FAILURES`).
    pub(crate) fn write_failed(&self, error: &'static str) {
        self.write_failures.get_or_create(&[("error", error)]).inc();
    }

    /// A transaction carried `changes` session changes.
    pub(crate) fn write_batch(&self, changes: usize) {
        self.write_batch.observe(changes as f64);
    }

    /// This node compacted etcd's history.
    pub(crate) fn compacted(&self) {
        self.compactions.inc();
    }

    /// An etcd answer said its newest revision is `revision`.
    pub(crate) fn heard_head(&self, revision: i64) {
        self.head.fetch_max(revision, Ordering::Relaxed);
    }

    /// The view applied every event up to etcd revision `revision`.
    pub(crate) fn applied(&self, revision: i64) {
        self.applied.fetch_max(revision, Ordering::Relaxed);
        self.progressed(revision);
    }

    /// etcd said the view's watch has caught up to `revision` (a progress
    /// answer): current for the metrics, not a resume point.
    pub(crate) fn progressed(&self, revision: i64) {
        self.current.fetch_max(revision, Ordering::Relaxed);
        self.head.fetch_max(revision, Ordering::Relaxed);
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.applied_at.store(now, Ordering::Relaxed);
    }

    /// The view was read anew at etcd revision `revision` (at the join, or
    /// after a compaction): it may now be behind what it had applied before.
    pub(crate) fn reread(&self, revision: i64) {
        self.applied.store(revision, Ordering::Relaxed);
        self.current.store(revision, Ordering::Relaxed);
        self.applied(revision);
    }

    /// etcd's newest revision as last heard, and the view's last applied
    /// event: what the compactor goes by.
    pub(crate) fn positions(&self) -> (i64, i64) {
        (
            self.head.load(Ordering::Relaxed),
            self.applied.load(Ordering::Relaxed),
        )
    }

    /// How many nodes this node sees registered.
    pub(crate) fn nodes(&self, count: usize) {
        self.nodes.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Brings the values read at scrape time (the lag, the age) up to date.
    pub(super) fn refresh(&self) {
        let head = self.head.load(Ordering::Relaxed);
        let current = self.current.load(Ordering::Relaxed);
        self.mirror_lag.set(head.saturating_sub(current).max(0));
        let now = self.started.elapsed().as_secs_f64();
        let at = self.applied_at.load(Ordering::Relaxed) as f64 / 1000.0;
        self.mirror_age.set((now - at).max(0.0));
    }
}
