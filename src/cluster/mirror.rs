//! Every node's sessions, read from etcd into this node's view.
//!
//! The view starts from one read of the session keys at etcd revision R, then
//! follows a watch from R + 1. The watch does not resume by itself: when it
//! breaks (etcd restarted, a network blip) it is opened again from the
//! revision after the last one applied, so nothing is missed or applied
//! twice. If etcd compacted that revision away, the view is read again and
//! the difference applied as changes.
//!
//! The same watch carries what this node must act on: a client id taken by a
//! session elsewhere (the local holder is replaced) and an eviction asked
//! through any node (the local session is evicted).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use prost::Message;
use tokio::{sync::watch, time::Instant};
use tracing::warn;

use super::{
    etcd::pb::{event::EventType, Event, KeyValue},
    keys::{self, Key},
    replicate::Evictions,
    ClusterError, Node,
};
use crate::{
    config::ServerConfig,
    metrics::Metrics,
    presence::wire::session_event,
    protocol::{pb, CloseReason},
    registry::{SessionEvent, SessionInfo, SessionLink, SessionRegistry, SessionStats},
};

/// How long a broken watch waits before it is opened again.
const RETRY: Duration = Duration::from_millis(250);

/// Reads every session into a new view; returns it with the etcd revision
/// it was read at.
pub(super) async fn read_view(
    node: &Node,
    epoch: u64,
    server: &ServerConfig,
    evictions: Evictions,
    metrics: Arc<Metrics>,
) -> Result<(SessionRegistry, i64), ClusterError> {
    let Reading {
        records, revision, ..
    } = read_records(node)
        .await
        .map_err(ClusterError::etcd("read the sessions"))?;
    let view = SessionRegistry::mirror(
        epoch,
        keys::revision(revision, 0),
        server.watch_history,
        server.watch_queue,
        metrics,
    );
    for event in records.into_values() {
        if let SessionEvent::Opened(info)
        | SessionEvent::Suspected(info)
        | SessionEvent::Recovered(info) = event
        {
            let link = RemoteSession::link(&info, &evictions);
            view.seed(info, link);
        }
    }
    Ok((view, revision))
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
}

/// Reads every session record, client id and eviction at one revision.
///
/// An open record whose client id's key names another session was replaced
/// (its node has not written its close yet): it reads as closed, as the
/// views that followed the replacement have it.
async fn read_records(node: &Node) -> Result<Reading, tonic::Status> {
    let response = node.etcd.range_prefix(&node.keys.sessions(), 0).await?;
    let revision = response.header.map_or(0, |header| header.revision);
    let holders: Vec<(String, String, i64)> = node
        .etcd
        .range_prefix(&node.keys.clients(), revision)
        .await?
        .kvs
        .iter()
        .filter_map(|kv| match node.keys.parse(&kv.key) {
            Key::Client(client_id) => Some((
                client_id.to_owned(),
                String::from_utf8(kv.value.clone()).ok()?,
                kv.mod_revision,
            )),
            _ => None,
        })
        .collect();
    let evictions = node
        .etcd
        .range_prefix(&node.keys.evictions(), revision)
        .await?
        .kvs
        .iter()
        .filter_map(|kv| match node.keys.parse(&kv.key) {
            Key::Evict(session_id) => Some((
                session_id.to_owned(),
                String::from_utf8_lossy(&kv.value).into_owned(),
            )),
            _ => None,
        })
        .collect();
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
    })
}

/// A session record: the session's last change.
fn decode(kv: &KeyValue) -> Option<SessionEvent> {
    let record = pb::WatchSessionsResponse::decode(kv.value.as_slice()).ok()?;
    session_event(record.event?).ok().flatten()
}

/// Follows the watch until the task is stopped: applies each session change
/// to the view with its revision, and carries out replacements and
/// evictions of this node's sessions.
pub(super) async fn follow(
    node: Arc<Node>,
    view: SessionRegistry,
    local: SessionRegistry,
    start_revision: i64,
    evictions: Evictions,
    fenced: watch::Sender<Option<String>>,
) {
    let mut follower = Follower {
        node,
        view,
        local,
        evictions,
        applied: start_revision,
        position: (start_revision, 0),
    };
    while fenced.borrow().is_none() {
        let watch = follower
            .node
            .etcd
            .watch_prefix(&follower.node.keys.all(), follower.applied + 1)
            .await;
        let (_open, mut responses) = match watch {
            Ok(watch) => watch,
            Err(status) => {
                warn!(%status, "could not watch the cluster's sessions; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        loop {
            match responses.message().await {
                Ok(Some(response)) if response.canceled => {
                    if response.compact_revision > 0 {
                        follower.resync().await;
                    }
                    break;
                }
                Ok(Some(response)) => {
                    // A progress notification (no events, after creation)
                    // promises every event up to its header's revision was
                    // sent; the creation's header promises nothing yet.
                    let progress = match response.created {
                        true => 0,
                        false => response.header.map_or(0, |header| header.revision),
                    };
                    let newest = response
                        .events
                        .iter()
                        .filter_map(|event| event.kv.as_ref().map(|kv| kv.mod_revision))
                        .max();
                    let mut events = response.events;
                    // Within one etcd revision, sessions before client ids: a
                    // replacing open's txn claims the id, then writes the
                    // session, but every view shows the newer session opened
                    // before the older closed, so the id is never missing.
                    events.sort_by_key(|event| {
                        let kv = event.kv.as_ref();
                        let client_key = kv.is_some_and(|kv| {
                            matches!(follower.node.keys.parse(&kv.key), Key::Client(_))
                        });
                        (kv.map_or(0, |kv| kv.mod_revision), client_key)
                    });
                    for event in events {
                        follower.apply(event);
                    }
                    follower.applied = follower.applied.max(newest.unwrap_or(progress));
                }
                Ok(None) => break,
                Err(status) => {
                    warn!(%status, "the cluster watch broke; resuming");
                    break;
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

struct Follower {
    node: Arc<Node>,
    view: SessionRegistry,
    local: SessionRegistry,
    evictions: Evictions,
    /// The last etcd revision whose events were all applied.
    applied: i64,
    /// The etcd revision of the last session change, and the index the next
    /// change of that revision gets.
    position: (i64, u64),
}

impl Follower {
    /// The contract's revision for the next session change of `etcd_revision`.
    fn next_revision(&mut self, etcd_revision: i64) -> u64 {
        if self.position.0 != etcd_revision {
            self.position = (etcd_revision, 0);
        }
        let revision = keys::revision(etcd_revision, self.position.1);
        self.position.1 += 1;
        revision
    }

    fn apply(&mut self, event: Event) {
        let Some(kv) = event.kv else {
            return;
        };
        let put = event.r#type == EventType::Put as i32;
        match self.node.keys.parse(&kv.key) {
            Key::Session(id) => {
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
                    let revision = self.next_revision(kv.mod_revision);
                    let link = RemoteSession::link(change.session(), &self.evictions);
                    self.view.apply(revision, change, link);
                }
            }
            Key::Client(client_id) if put => {
                if let Ok(newer) = std::str::from_utf8(&kv.value) {
                    self.client_taken(client_id, newer, kv.mod_revision);
                }
            }
            Key::Evict(session_id) if put => {
                self.local
                    .evict(session_id, &String::from_utf8_lossy(&kv.value));
            }
            Key::Client(_) | Key::Evict(_) | Key::Other => {}
        }
    }

    /// Session `newer` took `client_id` at `etcd_revision`. In every view the
    /// id's previous holder is replaced there and then, at the same revision
    /// on every node; here, the local holder ends if its own claim came
    /// first (a claim not yet written will come later, and win).
    fn client_taken(&mut self, client_id: &str, newer: &str, etcd_revision: i64) {
        let older = self.view.holder(client_id).filter(|older| older != newer);
        if let Some(session) = older.and_then(|older| self.view.session(&older)) {
            let revision = self.next_revision(etcd_revision);
            let change = SessionEvent::Closed {
                session,
                reason: CloseReason::Replaced,
                message: format!("replaced by session {newer}"),
            };
            let link = RemoteSession::link(change.session(), &self.evictions);
            self.view.apply(revision, change, link);
        }
        // The claim decides the holder (an open written without one never
        // takes it).
        self.view.hold(client_id, newer);
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

    /// After a compaction: reads the sessions again and applies the
    /// difference from the view as changes, then acts on what this node
    /// missed: a client id taken from one of its sessions, an eviction.
    async fn resync(&mut self) {
        let Reading {
            revision,
            records,
            holders,
            evictions,
        } = loop {
            match read_records(&self.node).await {
                Ok(read) => break read,
                Err(status) => {
                    warn!(%status, "could not read the cluster's sessions again; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        };
        let viewed = self.view.snapshot().sessions;
        for session in viewed {
            let id = session.identity.session_id.clone();
            let (reason, message) = match records.get(&id) {
                Some(SessionEvent::Closed {
                    reason, message, ..
                }) => (*reason, message.clone()),
                Some(_) => continue,
                None => (
                    CloseReason::NodeLost,
                    format!("node {} was lost", session.identity.node),
                ),
            };
            let revision = self.next_revision(revision);
            let change = SessionEvent::Closed {
                session,
                reason,
                message,
            };
            let link = RemoteSession::link(change.session(), &self.evictions);
            self.view.apply(revision, change, link);
        }
        for record in records.into_values() {
            if let SessionEvent::Opened(info)
            | SessionEvent::Suspected(info)
            | SessionEvent::Recovered(info) = record
            {
                if self.view.session(&info.identity.session_id).is_none() {
                    let revision = self.next_revision(revision);
                    let link = RemoteSession::link(&info, &self.evictions);
                    self.view.apply(revision, SessionEvent::Opened(info), link);
                }
            }
        }
        // The view already shows every holder's rivals closed; this sets
        // the holders, and replaces a local session that lost its id.
        for (client_id, holder, claimed) in holders {
            self.client_taken(&client_id, &holder, claimed);
        }
        for (session_id, message) in evictions {
            self.local.evict(&session_id, &message);
        }
        self.applied = revision;
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
