//! Cluster mode: several servers, one presence, kept in etcd.
//!
//! Behind a load balancer a client's session may land on any server, yet
//! observers want one answer to "who is alive". Cluster mode keeps that answer
//! in etcd, a proven consensus store, instead of a consensus of our own.
//!
//! Each node keeps its own sessions exactly as a single server does (the local
//! [`SessionRegistry`] decides their ends), and:
//!
//! - **writes each transition** of its sessions to etcd: one write per open,
//!   suspicion, recovery and close, never one per heartbeat, and those that
//!   queue up share a transaction (`replicate`). Session keys live on the
//!   node's lease.
//! - **mirrors** every node's sessions into a second registry, the *view*, by
//!   reading the session keys at one etcd revision and watching from the next
//!   (`mirror`). Presence (`ListSessions`, `WatchSessions`) answers from the
//!   view, so every node answers for the whole cluster, with the same epoch
//!   and the same revisions.
//! - **keeps its lease alive**, and fences itself when it cannot: before the
//!   lease can expire it drains its sessions with
//!   `Goodbye{SERVER_SHUTDOWN}`, so no client is ever reported live on two
//!   nodes (`lease`).
//!
//! A node that dies stops renewing its lease; etcd deletes its keys, and every
//! other node reports those sessions closed as `NODE_LOST`. Revisions are
//! etcd's revision (counted from the epoch's start) × 2^20 plus the index of
//! the event within it (`keys::Revisions`), so the many closes of one lost
//! lease still get one revision each. See `keys` for the layout.

mod compact;
mod etcd;
mod keys;
mod lease;
mod mirror;
mod replicate;

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    config::ServerConfig,
    error::ConfigError,
    metrics::Metrics,
    registry::{SessionRegistry, EPOCH_LIMIT},
};

use self::{
    etcd::Etcd,
    keys::{Keys, Revisions},
};

/// Settings of cluster mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd's client URLs (`http://host:2379`).
    pub endpoints: Vec<String>,
    /// This node's id: unique among live nodes, shown as `Session.node`.
    pub node_id: String,
    /// The key prefix of this cluster in etcd, without a trailing `/`.
    pub prefix: String,
    /// The node's lease: how long after a node dies its sessions are
    /// reported `NODE_LOST`. Whole seconds.
    pub lease_ttl: Duration,
    /// Whether the nodes compact etcd's history themselves, keeping between
    /// 1.25 and 2 times `watch_history` etcd revisions. Off, the
    /// operator must compact etcd, or it fills its quota.
    pub compaction: bool,
}

impl ClusterConfig {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "/heartbeat";
    /// The default lease time-to-live.
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
    /// The longest node id.
    pub const MAX_NODE_ID: usize = 63;
    /// The largest `--max-message-size` in cluster mode: a session's record
    /// (its Hello, and what the server adds) must fit one etcd request,
    /// which etcd limits to 1.5 MiB by default.
    pub const MAX_MESSAGE_SIZE: u32 = 1024 * 1024;
    /// The largest `--max-sessions` in cluster mode: a node lost with all its
    /// sessions closes them in one etcd revision, and each needs a revision
    /// of its own within it (2^20 of them).
    pub const MAX_SESSIONS: usize = 1_000_000;

    /// Checks every setting; the error names the value and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::Cluster(
                "no etcd endpoint: give one like http://127.0.0.1:2379".into(),
            ));
        }
        for url in &self.endpoints {
            if !url.starts_with("http://") {
                return Err(ConfigError::Cluster(format!(
                    "etcd endpoint {url:?} is not an http:// URL: write it like http://127.0.0.1:2379"
                )));
            }
        }
        let node = &self.node_id;
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if node.is_empty() || node.len() > Self::MAX_NODE_ID || !node.chars().all(valid_char) {
            return Err(ConfigError::Cluster(format!(
                "node id {node:?} must be 1 to {} letters, digits, '-', '_' or '.' (for example node-1)",
                Self::MAX_NODE_ID
            )));
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(ConfigError::Cluster(format!(
                "cluster prefix {:?} must start with '/' and not end with one (for example {})",
                self.prefix,
                Self::DEFAULT_PREFIX
            )));
        }
        let ttl = self.lease_ttl;
        if ttl.subsec_nanos() != 0 || !(2..=3600).contains(&ttl.as_secs()) {
            return Err(ConfigError::Cluster(format!(
                "lease TTL {} must be whole seconds from 2s to 1h (etcd counts leases in seconds; for example 10s)",
                humantime::format_duration(ttl)
            )));
        }
        Ok(())
    }
}

/// Why a node could not join, or had to leave, its cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// An etcd endpoint is not a usable URL.
    #[error("etcd endpoint {url}: {reason}; write it like http://127.0.0.1:2379")]
    Endpoint {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// etcd did not answer a call, or refused it.
    #[error(
        "etcd {what}: {:?}: {}; is etcd running at the --cluster endpoints?",
        status.code(),
        status.message()
    )]
    Etcd {
        /// The call.
        what: &'static str,
        /// etcd's answer.
        status: tonic::Status,
    },
    /// Another live node holds this node id.
    #[error("node id {node} is held by a live node, and its lease did not expire within {waited:?}; give each node its own --node-id")]
    NodeIdTaken {
        /// The node id.
        node: String,
        /// How long this node waited for the other's lease.
        waited: Duration,
    },
    /// The cluster's epoch key under the prefix is unusable.
    #[error("cluster epoch: {0}")]
    Epoch(String),
    /// The node lost etcd (or its lease) and drained its sessions.
    #[error("fenced: {0}; the node's sessions were ended with SERVER_SHUTDOWN so that none is reported live on two nodes")]
    Fenced(String),
}

impl ClusterError {
    fn etcd(what: &'static str) -> impl FnOnce(tonic::Status) -> Self {
        move |status| Self::Etcd { what, status }
    }
}

/// What a node shares with its cluster tasks.
#[derive(Debug)]
struct Node {
    etcd: Etcd,
    keys: Keys,
    /// How etcd's revisions become the contract's.
    revisions: Revisions,
    id: String,
    lease: i64,
    ttl: Duration,
    /// Short leases that closed sessions' records and evictions live on.
    tombstones: lease::Tombstones,
    /// The etcd revision at which each of this node's sessions took its
    /// client id: a later claim by another session replaces it, an earlier
    /// one (or one seen before this node's claim is written) does not.
    claims: parking_lot::Mutex<std::collections::HashMap<String, i64>>,
}

impl Node {
    /// etcd's newest revision as this node last heard it, and the newest
    /// its view has applied.
    fn positions(&self) -> (i64, i64) {
        self.etcd.metrics().cluster().positions()
    }
}

/// A node that has joined its cluster: the view of every node's sessions,
/// and the tasks that keep it and this node's own sessions in step with etcd.
#[derive(Debug)]
pub(crate) struct Cluster {
    node: Arc<Node>,
    view: SessionRegistry,
    /// What keeps the view current, until [`Cluster::start`] runs it.
    follower: Option<mirror::Follower>,
    /// Evictions asked through the view, on their way to etcd.
    evictions: replicate::Evictions,
    fenced: watch::Sender<Option<String>>,
    tasks: Vec<JoinHandle<()>>,
    /// Set when the local registry's changes have all been written.
    flushed: Option<watch::Receiver<bool>>,
    /// How many local changes may wait for etcd: a backlog, and one close
    /// for every session a drain ends at once.
    write_queue: usize,
    /// True while this node's changes reach etcd: false from a failed write
    /// until one succeeds again (the other nodes' views of this node's
    /// sessions are stale meanwhile).
    writing: watch::Sender<bool>,
    /// The etcd revisions of history to keep, when the nodes compact etcd.
    compaction: Option<usize>,
}

impl Cluster {
    /// Joins the cluster: connects to etcd, agrees on the epoch, takes a
    /// lease and starts renewing it, registers the node (waiting out a
    /// previous holder of its id), and reads every session into the view,
    /// with the recent history of changes.
    ///
    /// The view counts its watchers that lag in `metrics` (the server's);
    /// only a node's own registry counts sessions, so none counts twice.
    pub(crate) async fn join(
        config: &ClusterConfig,
        server: &ServerConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ClusterError> {
        let etcd = Etcd::connect(&config.endpoints, metrics.clone())?;
        let keys = Keys::new(&config.prefix);
        let (epoch, revisions) = agree_on_epoch(&etcd, &keys).await?;
        let ttl = i64::try_from(config.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let granted = tokio::time::Instant::now();
        let (lease, ttl) = etcd
            .grant(ttl)
            .await
            .map_err(ClusterError::etcd("lease grant"))?;
        let node = Arc::new(Node {
            tombstones: lease::Tombstones::new(config.lease_ttl),
            etcd,
            keys,
            revisions,
            id: config.node_id.clone(),
            lease,
            // etcd may raise a short TTL to its minimum.
            ttl: Duration::from_secs(u64::try_from(ttl).unwrap_or(0)).max(config.lease_ttl),
            claims: Default::default(),
        });
        // Renewing from the grant on: registering may wait out a previous
        // holder of the id for a whole TTL.
        let (fenced, _) = watch::channel(None);
        let keeper = tokio::spawn(lease::keep_alive(node.clone(), fenced.clone(), granted));
        let joined = async {
            let registered =
                register(&node.etcd, &node.keys, &node.id, lease, config.lease_ttl).await?;
            let evictions = replicate::Evictions::default();
            let follower = mirror::read_view(
                node.clone(),
                epoch,
                server,
                evictions.clone(),
                metrics,
                registered,
            )
            .await?;
            Ok::<_, ClusterError>((follower, evictions))
        }
        .await;
        let (follower, evictions) = match joined {
            Ok(joined) => joined,
            Err(error) => {
                keeper.abort();
                let _ = node.etcd.revoke(lease).await;
                return Err(error);
            }
        };
        let view = follower.view().clone();
        info!(
            node = %node.id,
            epoch,
            sessions = view.len(),
            "joined the cluster"
        );
        Ok(Self {
            node,
            view,
            follower: Some(follower),
            evictions,
            fenced,
            tasks: vec![keeper],
            flushed: None,
            write_queue: replicate::QUEUE.saturating_add(server.max_sessions),
            writing: watch::channel(true).0,
            compaction: config.compaction.then_some(server.watch_history),
        })
    }

    /// The registry presence answers from: every node's sessions.
    pub(crate) fn view(&self) -> SessionRegistry {
        self.view.clone()
    }

    /// This node's id.
    pub(crate) fn node_id(&self) -> &str {
        &self.node.id
    }

    /// Whether this node's session changes reach etcd now; it changes when
    /// writes start failing and when they recover.
    pub(crate) fn writing(&self) -> watch::Receiver<bool> {
        self.writing.subscribe()
    }

    /// Starts keeping `local` (this node's sessions) and the view in step
    /// with etcd (the lease has been kept alive since the grant).
    pub(crate) fn start(&mut self, local: SessionRegistry) {
        let node = &self.node;
        // Subscribed before the server serves: no session opens unwritten.
        let changes = local.subscribe_with_queue(self.write_queue);
        if let Some(follower) = self.follower.take() {
            self.tasks.push(tokio::spawn(
                follower.follow(local.clone(), self.fenced.clone()),
            ));
        }
        self.tasks.push(tokio::spawn(replicate::evictions(
            node.clone(),
            self.evictions.clone(),
        )));
        if let Some(keep) = self.compaction {
            self.tasks
                .push(tokio::spawn(compact::compact(node.clone(), keep)));
        }
        let (flushed_tx, flushed) = watch::channel(false);
        self.flushed = Some(flushed);
        self.tasks.push(tokio::spawn(replicate::sessions(
            node.clone(),
            changes,
            local,
            self.fenced.clone(),
            flushed_tx,
            self.writing.clone(),
        )));
    }

    /// Completes when the node has fenced itself; the reason.
    pub(crate) async fn fenced(&self) -> String {
        let mut fenced = self.fenced.subscribe();
        // The sender lives in self: it is not dropped while this is polled.
        let reason = match fenced.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            Err(_) => None,
        };
        reason.unwrap_or_default()
    }

    /// Leaves after a drain: waits (at most `grace`) until the local closes
    /// are written, then revokes the lease, which deletes this node's keys.
    pub(crate) async fn leave(mut self, grace: Duration) {
        if let Some(mut flushed) = self.flushed.take() {
            // Not flushed within the grace, or the writer gave up.
            let written = tokio::time::timeout(grace, flushed.wait_for(|done| *done)).await;
            if !matches!(written, Ok(Ok(_))) {
                warn!("leaving the cluster with session changes not written to etcd; their sessions will be reported NODE_LOST");
            }
        }
        for task in self.tasks.drain(..) {
            task.abort();
        }
        if self.fenced.borrow().is_none() {
            if let Err(status) = self.node.etcd.revoke(self.node.lease).await {
                warn!(%status, "could not revoke the node's lease; its keys expire with it");
            }
        }
        self.view.shut_down("");
        info!(node = %self.node.id, "left the cluster");
    }
}

impl Drop for Cluster {
    /// A node dropped without leaving (serve failed after joining) stops
    /// renewing its lease, which then expires.
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The epoch: from etcd's cluster id, a random number that the first node
/// writes under the prefix, and the etcd revision that key was created at,
/// so every node derives the same one; and the revisions, counted from that
/// key's creation.
async fn agree_on_epoch(etcd: &Etcd, keys: &Keys) -> Result<(u64, Revisions), ClusterError> {
    let proposal = rand::random::<u64>() % EPOCH_LIMIT;
    let txn = etcd::txn(
        vec![etcd::absent(keys.epoch())],
        vec![etcd::put(
            keys.epoch(),
            proposal.to_string().into_bytes(),
            0,
        )],
    );
    let answer = etcd.txn(txn).await.map_err(ClusterError::etcd("epoch"))?;
    let cluster_id = answer.header.map_or(0, |header| header.cluster_id);
    let (epoch_key, _) = etcd
        .get(&keys.epoch())
        .await
        .map_err(ClusterError::etcd("epoch"))?;
    let key = String::from_utf8_lossy(&keys.epoch()).into_owned();
    let Some(epoch_key) = epoch_key else {
        return Err(ClusterError::Epoch(format!(
            "the epoch key {key} was deleted while this node joined; start it again"
        )));
    };
    let written = std::str::from_utf8(&epoch_key.value)
        .ok()
        .and_then(|value| value.parse::<u64>().ok())
        .ok_or_else(|| {
            ClusterError::Epoch(format!(
                "the epoch key {key} holds {:?}, not a number; delete it (the cluster starts a new epoch)",
                String::from_utf8_lossy(&epoch_key.value)
            ))
        })?;
    // The base and the numbering's version go into the epoch too: nodes
    // that number changes differently (another version) never share an
    // epoch, so a watch moving between them gets a reset, never a wrong
    // replay.
    let base = epoch_key.create_revision;
    Ok((
        keys::epoch(cluster_id, written ^ base.unsigned_abs() ^ keys::NUMBERING),
        Revisions::from_base(base),
    ))
}

/// Registers the node's id under its lease; a previous holder (this node
/// before a restart) is waited out, for at most one lease TTL and a second.
/// Returns the etcd revision of the registration.
async fn register(
    etcd: &Etcd,
    keys: &Keys,
    node: &str,
    lease: i64,
    ttl: Duration,
) -> Result<i64, ClusterError> {
    let start = tokio::time::Instant::now();
    let limit = ttl + Duration::from_secs(1);
    loop {
        let txn = etcd::txn(
            vec![etcd::absent(keys.node(node))],
            vec![etcd::put(keys.node(node), node.as_bytes().to_vec(), lease)],
        );
        let response = etcd
            .txn(txn)
            .await
            .map_err(ClusterError::etcd("register"))?;
        if response.succeeded {
            return Ok(response.header.map_or(0, |header| header.revision));
        }
        if start.elapsed() >= limit {
            return Err(ClusterError::NodeIdTaken {
                node: node.to_owned(),
                waited: limit,
            });
        }
        warn!(
            node,
            "node id held by a previous lease; waiting for it to expire"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
