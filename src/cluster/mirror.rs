//! Every node's sessions, read from etcd into this node's view.
//!
//! The view starts from one read of the session keys at etcd revision R, then
//! follows a watch from R + 1. A joining node takes R up to `--watch-history`
//! revisions in the past and replays the changes since before it serves, so
//! its history, like every other node's, lets a watch resume here.
//!
//! The watch does not resume by itself: when it breaks (etcd restarted, a
//! network blip) it is opened again from the revision after the last one
//! applied, so nothing is missed or applied twice. If etcd compacted that
//! revision away, the view is read again. The difference is not the changes
//! themselves (a session that opened and closed meanwhile is in neither), so
//! it is not streamed: the view's watches end and resume, with a reset here
//! and a replay on any node that saw the changes.
//!
//! The same watch carries what this node must act on: a client id taken by a
//! session elsewhere (the local holder is replaced) and an eviction asked
//! through any node (the local session is evicted).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Arc,
    time::Duration,
};

use prost::Message;
use tokio::{sync::watch, time::Instant};
use tonic::Streaming;
use tracing::warn;

use super::{
    etcd::pb::{event::EventType, Event, KeyValue, WatchResponse},
    keys::{self, Key},
    replicate::Evictions,
    ClusterError, Node,
};
use crate::{
    config::ServerConfig,
    metrics::Metrics,
    presence::wire::session_event,
    protocol::{pb, CloseReason},
    registry::{
        SessionEvent, SessionInfo, SessionLink, SessionRegistry, SessionState, SessionStats,
    },
};

/// How long a broken watch waits before it is opened again.
const RETRY: Duration = Duration::from_millis(250);

/// How often the follower asks etcd how far its watch has come, so that an
/// idle cluster's view still shows as current in its lag and age metrics.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// How long a joining node may take to replay the recent history before it
/// starts without it.
const CATCH_UP: Duration = Duration::from_secs(10);

/// Builds the view of the cluster, current as of this node's registration
/// at etcd revision `registered` (or later): a follower to keep it current.
///
/// So that a watch resumes here as on the nodes that were up before, the
/// view's history is filled too: the cluster is read as it was up to
/// `--watch-history` etcd revisions earlier, and the changes since are
/// replayed from etcd's own history, numbered as every other node numbered
/// them. If etcd compacted that far back, the view is read as it is now,
/// with an empty history (a resume from before gets a reset).
pub(super) async fn read_view(
    node: Arc<Node>,
    epoch: u64,
    server: &ServerConfig,
    evictions: Evictions,
    metrics: Arc<Metrics>,
    registered: i64,
) -> Result<Follower, ClusterError> {
    let history = i64::try_from(server.watch_history).unwrap_or(i64::MAX);
    let from = registered
        .saturating_sub(history)
        .max(node.revisions.base())
        .max(1);
    if from < registered {
        let follower = Follower::read(&node, epoch, server, &evictions, &metrics, from).await;
        if let Ok(mut follower) = follower {
            let caught_up = tokio::time::timeout(CATCH_UP, follower.catch_up(registered)).await;
            if let Ok(Ok(())) = caught_up {
                return Ok(follower);
            }
        }
        warn!(
            from,
            "could not replay the cluster's recent changes (compacted?); \
             watches from before this node joined will get a reset"
        );
    }
    Follower::read(&node, epoch, server, &evictions, &metrics, 0)
        .await
        .map_err(ClusterError::etcd("read the sessions"))
}

/// The cluster as read in full at one etcd revision.
struct Reading {
    revision: i64,
    /// Every session record (open or closed) by session id, in order: every
    /// node applies a difference in the same order.
    records: BTreeMap<String, SessionEvent>,
    /// Each client id taken: (client id, holder, etcd revision of the claim).
    holders: Vec<(String, String, i64)>,
    /// Evictions still on record: (session id, message).
    evictions: Vec<(String, String)>,
    /// The nodes registered.
    nodes: BTreeSet<String>,
}

/// Reads every session record, client id and eviction at etcd revision
/// `at` (0: now).
///
/// An open record whose client id's key names another session was replaced
/// (its node has not written its close yet): it reads as closed, as the
/// views that followed the replacement have it.
async fn read_records(node: &Node, at: i64) -> Result<Reading, tonic::Status> {
    let response = node.etcd.range_prefix(&node.keys.sessions(), at).await?;
    // The header's revision is etcd's now, also for a read of the past.
    let revision = match at {
        0 => response.header.map_or(0, |header| header.revision),
        at => at,
    };
    let holders: Vec<(String, String, i64)> =
        read_prefix(node, &node.keys.clients(), revision, |key, kv| match key {
            Key::Client(client_id) => Some((
                client_id.to_owned(),
                String::from_utf8(kv.value.clone()).ok()?,
                kv.mod_revision,
            )),
            _ => None,
        })
        .await?;
    let evictions = read_prefix(
        node,
        &node.keys.evictions(),
        revision,
        |key, kv| match key {
            Key::Evict(session_id) => Some((
                session_id.to_owned(),
                String::from_utf8_lossy(&kv.value).into_owned(),
            )),
            _ => None,
        },
    )
    .await?;
    let nodes = read_prefix(node, &node.keys.nodes(), revision, |key, _| match key {
        Key::Node(id) => Some(id.to_owned()),
        _ => None,
    })
    .await?;
    let holder: BTreeMap<&str, &str> = holders
        .iter()
        .map(|(client_id, session_id, _)| (client_id.as_str(), session_id.as_str()))
        .collect();
    let records = response
        .kvs
        .iter()
        .filter_map(|kv| {
            let Key::Session(id) = node.keys.parse(&kv.key) else {
                return None;
            };
            let record = decode(kv)?;
            let session = record.session();
            let client_id = session.identity.client_id.as_str();
            let replaced = !client_id.is_empty()
                && !matches!(record, SessionEvent::Closed { .. })
                && holder.get(client_id).copied() != Some(id);
            let record = match replaced {
                true => SessionEvent::Closed {
                    session: session.clone(),
                    reason: CloseReason::Replaced,
                    message: "replaced by another session".into(),
                },
                false => record,
            };
            Some((id.to_owned(), record))
        })
        .collect();
    Ok(Reading {
        revision,
        records,
        holders,
        evictions,
        nodes,
    })
}

/// The watch's next response; a watch that ended or broke is `Broken`.
async fn next_response(responses: &mut Streaming<WatchResponse>) -> Result<WatchResponse, Ended> {
    match responses.message().await {
        Ok(Some(response)) => Ok(response),
        Ok(None) => Err(Ended::Broken),
        Err(status) => {
            warn!(%status, "the cluster watch broke; resuming");
            Err(Ended::Broken)
        }
    }
}

/// Every key under `prefix` at etcd revision `revision`, each turned by
/// `pick` (from what the key is and its value) into an item, or skipped.
async fn read_prefix<T, C: FromIterator<T>>(
    node: &Node,
    prefix: &[u8],
    revision: i64,
    pick: impl Fn(Key<'_>, &KeyValue) -> Option<T>,
) -> Result<C, tonic::Status> {
    let response = node.etcd.range_prefix(prefix, revision).await?;
    Ok(response
        .kvs
        .iter()
        .filter_map(|kv| pick(node.keys.parse(&kv.key), kv))
        .collect())
}

/// Whether a session's record says more than the view shows: another state
/// or other counters.
fn moved(record: &SessionInfo, viewed: &SessionInfo) -> bool {
    let counters = |info: &SessionInfo| (info.state, info.rtt, info.frames_in, info.frames_out);
    counters(record) != counters(viewed)
}

/// A session record: the session's last change.
fn decode(kv: &KeyValue) -> Option<SessionEvent> {
    let record = pb::WatchSessionsResponse::decode(kv.value.as_slice()).ok()?;
    session_event(record.event?).ok().flatten()
}

/// Keeps the view current: applies each session change of the watch to the
/// view with its revision, and carries out replacements and evictions of
/// this node's sessions.
#[derive(Debug)]
pub(super) struct Follower {
    node: Arc<Node>,
    view: SessionRegistry,
    /// This node's sessions (an empty registry until the node serves).
    local: SessionRegistry,
    evictions: Evictions,
    /// The last etcd revision whose events were all applied.
    applied: i64,
    /// The etcd revision of the last numbered event, and the index the next
    /// event of that revision gets.
    position: (i64, u64),
    /// The nodes registered in etcd.
    nodes: BTreeSet<String>,
}

/// Why a watch stopped.
enum Ended {
    /// etcd compacted the revisions it was to start from.
    Compacted,
    /// It broke, or etcd ended it.
    Broken,
}

impl Follower {
    /// A new view of the cluster as it was at etcd revision `at`.
    async fn read(
        node: &Arc<Node>,
        epoch: u64,
        server: &ServerConfig,
        evictions: &Evictions,
        metrics: &Arc<Metrics>,
        at: i64,
    ) -> Result<Self, tonic::Status> {
        let Reading {
            records,
            revision,
            nodes,
            ..
        } = read_records(node, at).await?;
        // Past every change of that etcd revision, which the read holds: a
        // resume from within it gets a reset, not a replay without them.
        let view = SessionRegistry::mirror(
            epoch,
            node.revisions.of(revision, keys::CHANGES_PER_REVISION - 1),
            server.watch_history,
            server.watch_queue,
            metrics.clone(),
        );
        for event in records.into_values() {
            if let SessionEvent::Opened(info)
            | SessionEvent::Suspected(info)
            | SessionEvent::Recovered(info) = event
            {
                let link = RemoteSession::link(&info, evictions);
                view.seed(info, link);
            }
        }
        metrics.cluster().nodes(nodes.len());
        metrics.cluster().reread(revision);
        Ok(Self {
            node: node.clone(),
            view,
            local: SessionRegistry::new(0, 1, metrics.clone()),
            evictions: evictions.clone(),
            applied: revision,
            position: (revision, 0),
            nodes,
        })
    }

    /// The view this follower keeps.
    pub(super) fn view(&self) -> &SessionRegistry {
        &self.view
    }

    /// Replays the changes up to etcd revision `until` (one with a change
    /// under the prefix), before this node has sessions of its own.
    async fn catch_up(&mut self, until: i64) -> Result<(), Ended> {
        let (_open, mut responses) = self
            .node
            .etcd
            .watch_prefix(&self.node.keys.all(), self.applied + 1)
            .await
            .map_err(|_| Ended::Broken)?;
        while self.applied < until {
            let response = next_response(&mut responses).await?;
            self.absorb(response)?;
        }
        Ok(())
    }

    /// Follows the watch with `local` as this node's sessions until the
    /// task is stopped or the node fenced.
    pub(super) async fn follow(
        mut self,
        local: SessionRegistry,
        fenced: watch::Sender<Option<String>>,
    ) {
        self.local = local;
        while fenced.borrow().is_none() {
            let watch = self
                .node
                .etcd
                .watch_prefix(&self.node.keys.all(), self.applied + 1)
                .await;
            let (open, mut responses) = match watch {
                Ok(watch) => watch,
                Err(status) => {
                    warn!(%status, "could not watch the cluster's sessions; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            let mut progress = tokio::time::interval_at(
                tokio::time::Instant::now() + PROGRESS_EVERY,
                PROGRESS_EVERY,
            );
            progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let ended = loop {
                tokio::select! {
                    response = next_response(&mut responses) => {
                        if let Err(ended) = response.and_then(|response| self.absorb(response)) {
                            break ended;
                        }
                    }
                    _ = progress.tick() => {
                        // A full queue already holds a request: skip this one.
                        let _ = open.try_send(super::etcd::progress_request());
                    }
                }
            };
            if let Ended::Compacted = ended {
                self.resync().await;
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Applies one response of the watch.
    fn absorb(&mut self, response: WatchResponse) -> Result<(), Ended> {
        if response.canceled {
            return Err(match response.compact_revision > 0 {
                true => Ended::Compacted,
                false => Ended::Broken,
            });
        }
        // A progress answer (no events, not the creation) says how far etcd
        // has come. Older etcd versions (before 3.4.24 and 3.5.8) may send it
        // ahead of events still queued, so it only tells the metrics that the
        // view is current; the resume point moves with events alone.
        let progress = (!response.created && response.events.is_empty())
            .then(|| response.header.as_ref().map_or(0, |header| header.revision));
        let newest = response
            .events
            .iter()
            .filter_map(|event| event.kv.as_ref().map(|kv| kv.mod_revision))
            .max();
        let mut events = response.events;
        // Within one etcd revision, sessions before client ids: a replacing
        // open's txn claims the id, then writes the session, but every view
        // shows the newer session opened before the older closed, so the id
        // is never missing.
        events.sort_by_key(|event| {
            let kv = event.kv.as_ref();
            let client_key =
                kv.is_some_and(|kv| matches!(self.node.keys.parse(&kv.key), Key::Client(_)));
            (kv.map_or(0, |kv| kv.mod_revision), client_key)
        });
        for event in events {
            self.apply(event);
        }
        self.applied = self.applied.max(newest.unwrap_or(0));
        let metrics = self.node.etcd.metrics().cluster();
        if let Some(header) = &response.header {
            metrics.heard_head(header.revision);
        }
        match progress {
            Some(current) => metrics.progressed(current),
            None => metrics.applied(self.applied),
        }
        Ok(())
    }

    /// The contract's revision for the next numbered event of `etcd_revision`.
    fn next_revision(&mut self, etcd_revision: i64) -> u64 {
        if self.position.0 != etcd_revision {
            self.position = (etcd_revision, 0);
        }
        let revision = self.node.revisions.of(etcd_revision, self.position.1);
        self.position.1 += 1;
        revision
    }

    /// Applies one event. Every session key's event and every client id's
    /// claim takes the next revision of its etcd revision, whether or not
    /// it changes this view: numbering then depends on etcd's events alone,
    /// never on a view's state, which differs between a node that followed
    /// the cluster and one that read it (a skipped number is allowed).
    fn apply(&mut self, event: Event) {
        let Some(kv) = event.kv else {
            return;
        };
        let put = event.r#type == EventType::Put as i32;
        match self.node.keys.parse(&kv.key) {
            Key::Session(id) => {
                let revision = self.next_revision(kv.mod_revision);
                let change = if put {
                    decode(&kv)
                } else {
                    // A key deleted while its session was open went with its
                    // node's lease; deleted after its close, it was a tombstone.
                    self.view.session(id).map(|session| SessionEvent::Closed {
                        message: format!("node {} was lost", session.identity.node),
                        session,
                        reason: CloseReason::NodeLost,
                    })
                };
                if let Some(change) = change {
                    let link = RemoteSession::link(change.session(), &self.evictions);
                    self.view.apply(revision, change, link);
                }
            }
            Key::Client(client_id) if put => {
                let revision = self.next_revision(kv.mod_revision);
                if let Ok(newer) = std::str::from_utf8(&kv.value) {
                    self.replace_in_view(client_id, newer, revision);
                    self.claim_seen(client_id, newer, kv.mod_revision);
                }
            }
            Key::Evict(session_id) if put => {
                self.local
                    .evict(session_id, &String::from_utf8_lossy(&kv.value));
            }
            Key::Node(id) => {
                match put {
                    true => self.nodes.insert(id.to_owned()),
                    false => self.nodes.remove(id),
                };
                self.node.etcd.metrics().cluster().nodes(self.nodes.len());
            }
            Key::Client(_) | Key::Evict(_) | Key::Other => {}
        }
    }

    /// Session `newer` took `client_id`, at `revision`: in every view the
    /// id's previous holder is replaced there and then, at the same revision
    /// on every node, and the claim makes `newer` the holder (an open
    /// written without one never takes it).
    fn replace_in_view(&mut self, client_id: &str, newer: &str, revision: u64) {
        let older = self.view.holder(client_id).filter(|older| older != newer);
        if let Some(session) = older.and_then(|older| self.view.session(&older)) {
            let change = SessionEvent::Closed {
                session,
                reason: CloseReason::Replaced,
                message: format!("replaced by session {newer}"),
            };
            let link = RemoteSession::link(change.session(), &self.evictions);
            self.view.apply(revision, change, link);
        }
        self.view.hold(client_id, newer);
    }

    /// Session `newer` took `client_id` at `etcd_revision`: this node's
    /// holder of it ends if its own claim came first (a claim not yet
    /// written will come later, and win).
    fn claim_seen(&self, client_id: &str, newer: &str, etcd_revision: i64) {
        // Claims are recorded here, in watch order, so this node's own
        // claim is always known before a later one is judged against it.
        let replace = {
            let mut claims = self.node.claims.lock();
            if self.local.session(newer).is_some() {
                let claimed = claims.entry(newer.to_owned()).or_insert(etcd_revision);
                *claimed = (*claimed).max(etcd_revision);
            }
            self.local
                .holder(client_id)
                .filter(|holder| holder != newer)
                .is_some_and(|holder| claims.get(&holder).is_some_and(|at| *at < etcd_revision))
        };
        if replace {
            self.local.replaced_elsewhere(client_id, newer);
        }
    }

    /// After a compaction: reads the sessions again and moves the view to
    /// them (its watchers resume), then acts on what this node missed: a
    /// client id taken from one of its sessions, an eviction.
    async fn resync(&mut self) {
        let Reading {
            revision,
            records,
            holders,
            evictions,
            nodes,
        } = loop {
            match read_records(&self.node, 0).await {
                Ok(read) => break read,
                Err(status) => {
                    warn!(%status, "could not read the cluster's sessions again; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        };
        // The difference, as changes: closes, updates, then opens.
        let mut changes = Vec::new();
        for session in self.view.snapshot().sessions {
            let id = session.identity.session_id.clone();
            match records.get(&id) {
                Some(SessionEvent::Closed {
                    reason, message, ..
                }) => changes.push(SessionEvent::Closed {
                    session,
                    reason: *reason,
                    message: message.clone(),
                }),
                // Still open: its state and counters as last written, if
                // they moved (each update swaps a link under the view's lock).
                Some(record) if moved(record.session(), &session) => {
                    let info = record.session().clone();
                    changes.push(match info.state {
                        SessionState::Suspect => SessionEvent::Suspected(info),
                        SessionState::Live => SessionEvent::Recovered(info),
                    });
                }
                Some(_) => {}
                None => changes.push(SessionEvent::Closed {
                    message: format!("node {} was lost", session.identity.node),
                    session,
                    reason: CloseReason::NodeLost,
                }),
            }
        }
        for record in records.into_values() {
            if let SessionEvent::Opened(info)
            | SessionEvent::Suspected(info)
            | SessionEvent::Recovered(info) = record
            {
                if self.view.session(&info.identity.session_id).is_none() {
                    changes.push(SessionEvent::Opened(info));
                }
            }
        }
        // Not streamed: the difference is not the changes themselves (a
        // session that opened and closed meanwhile is in neither), so its
        // watchers resume instead, and get a reset here.
        let changes = changes
            .into_iter()
            .map(|change| {
                let link = RemoteSession::link(change.session(), &self.evictions);
                (change, link)
            })
            .collect();
        let top = keys::CHANGES_PER_REVISION - 1;
        self.view
            .resynchronize(self.node.revisions.of(revision, top), changes);
        // The view already shows every holder's rivals closed; this sets
        // the holders, and replaces a local session that lost its id.
        let held: HashSet<&str> = holders
            .iter()
            .map(|(client_id, _, _)| client_id.as_str())
            .collect();
        self.released_elsewhere(&held, revision);
        for (client_id, holder, claimed) in &holders {
            self.view.hold(client_id, holder);
            self.claim_seen(client_id, holder, *claimed);
        }
        for (session_id, message) in evictions {
            self.local.evict(&session_id, &message);
        }
        self.applied = revision;
        self.nodes = nodes;
        let metrics = self.node.etcd.metrics().cluster();
        metrics.nodes(self.nodes.len());
        metrics.reread(revision);
    }

    /// After a resync at etcd revision `revision`: ends each local session
    /// whose client id, claimed before that revision, no longer names it nor
    /// anyone (`held` are the ids etcd names a holder for). Another session
    /// took the id and let it go while this node was not watching.
    fn released_elsewhere(&self, held: &HashSet<&str>, revision: i64) {
        let claims = self.node.claims.lock();
        for session in self.local.snapshot().sessions {
            let identity = &session.identity;
            let client_id = identity.client_id.as_str();
            let claimed_before = claims
                .get(&identity.session_id)
                .is_some_and(|claimed| *claimed <= revision);
            let holds = self.local.holder(client_id).as_ref() == Some(&identity.session_id);
            if !client_id.is_empty() && claimed_before && holds && !held.contains(client_id) {
                self.local.replaced_elsewhere(client_id, "");
            }
        }
    }
}

/// A session of the view: its counters as its node last wrote them, and the
/// way an eviction reaches that node.
struct RemoteSession {
    session_id: String,
    stats: SessionStats,
    evictions: Evictions,
}

impl RemoteSession {
    fn link(info: &SessionInfo, evictions: &Evictions) -> Arc<dyn SessionLink> {
        let ago = std::time::SystemTime::now()
            .duration_since(info.last_seen)
            .unwrap_or_default();
        Arc::new(Self {
            session_id: info.identity.session_id.clone(),
            stats: SessionStats {
                last_seen: Instant::now().checked_sub(ago).unwrap_or_else(Instant::now),
                rtt: info.rtt,
                frames_in: info.frames_in,
                frames_out: info.frames_out,
                phi: info.phi,
            },
            evictions: evictions.clone(),
        })
    }
}

impl SessionLink for RemoteSession {
    fn stats(&self) -> SessionStats {
        self.stats
    }

    fn conclude(&self, reason: CloseReason, message: &str) {
        // Only an eviction travels: every other end is the holder's to decide.
        if reason == CloseReason::Evicted {
            self.evictions.ask(&self.session_id, message);
        }
    }
}
