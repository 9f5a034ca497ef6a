//! This node's sessions, written to etcd: one write per open, suspicion,
//! recovery and close, and none per heartbeat.
//!
//! The writer follows the local registry's changes in order, and puts the
//! changes that have queued up meanwhile into one transaction (a *batch*),
//! so a burst (a drain's closes, a reconnect storm's opens) costs one etcd
//! round trip per batch instead of one per session.
//!
//! An open that names a client id takes the id's key, on the condition that
//! the key's `mod_revision` is still the one just read: the session it
//! replaces, on whatever node, is the one its node then sees replaced. A
//! close overwrites the session's key with the close (on a short tombstone
//! lease) and frees the client id if it still points here. Both conditions
//! are nested transactions, each deciding for its own session, so one lost
//! race does not undo the rest of the batch.
//!
//! A write that fails (etcd out of space, unreachable, slow) is retried with
//! jittered, growing pauses, and nothing is lost meanwhile: the node's
//! sessions run on, their changes queue in order (folded to one per session
//! once the backlog is long, so an outage of any length costs memory by
//! sessions, not by changes), and they reach etcd once it takes writes
//! again. While writes fail the node says so once (an
//! ERROR line, `heartbeat.v1.Cluster` turns `NOT_SERVING`, and
//! `heartbeat_cluster_write_failures_total` counts each failure by kind),
//! and once more when they recover.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use prost::Message;
use tokio::{
    sync::{watch, Notify},
    time::Instant,
};
use tracing::{error, warn};

use super::{
    etcd::{
        self,
        pb::{
            compare::{CompareResult, TargetUnion},
            request_op::Request,
            response_op::Response,
            RangeRequest, RequestOp, TxnRequest, TxnResponse,
        },
    },
    Node,
};
use crate::{
    backoff::Backoff,
    protocol::pb,
    registry::{Change, Lagged, SessionEvent, SessionRegistry, Subscription},
};

/// Local changes the writer's subscription holds, besides one close for
/// every session a drain ends at once: far more than arrive while one
/// write is on its way (the writer reads on while it writes and while it
/// waits to retry, into its folded backlog).
pub(super) const QUEUE: usize = 1 << 16;

/// The most operations a batch puts at the top of its transaction. etcd
/// refuses more than `--max-txn-ops` (128 by default) at one level, and a
/// nested transaction may only use what its parent left.
const BATCH_OPS: usize = 96;

/// The most bytes in one batch's request: well below etcd's default
/// `--max-request-bytes` of 1.5 MiB. A single change may be larger (up to
/// cluster mode's largest message, 1 MiB, and its keys): it goes alone.
const BATCH_BYTES: usize = 512 * 1024;

/// What an operation adds to a request besides its keys and value: its
/// framing, a lease id, a compare's target.
const OP_OVERHEAD: usize = 32;

/// How long a failed write waits before it is tried again: a jittered
/// pause that doubles from 100 ms up to 5 s, so a fleet of nodes facing a
/// full or recovering etcd does not retry in step.
fn retry_backoff() -> Backoff {
    // Both bounds are constants that satisfy Backoff's rules.
    Backoff::try_new(
        Duration::from_millis(100),
        Duration::from_secs(5),
        Duration::ZERO,
    )
    .unwrap_or_default()
}

/// Attempts at passing an eviction on before it is given up (and logged).
const EVICTION_ATTEMPTS: u32 = 25;

/// Attempts at taking a client id that other nodes keep taking meanwhile.
const CLIENT_ID_ATTEMPTS: usize = 8;

/// Writes every change of `changes` (the subscription to `local`, this
/// node's registry) to etcd, in order, until the registry ends (after a
/// drain) or the node is fenced; sets `flushed` when all are written, and
/// `writing` to whether writes reach etcd.
///
/// The subscription is read on while a write is on its way and while a
/// failed one waits to be retried, into a backlog that is folded to one
/// change per session when it grows long: an outage of any length costs
/// memory by sessions, not by changes, and never overflows the
/// subscription (which would fence the node).
pub(super) async fn sessions(
    node: Arc<Node>,
    mut changes: Subscription,
    local: SessionRegistry,
    fenced: watch::Sender<Option<String>>,
    flushed: watch::Sender<bool>,
    writing: watch::Sender<bool>,
) {
    let mut outage = Outage::new(writing);
    let mut writer = Writer {
        node,
        local,
        written: HashSet::new(),
    };
    let mut backlog = Backlog::default();
    let mut ended = false;
    loop {
        if backlog.is_empty() {
            if ended {
                break;
            }
            match changes.next().await {
                Ok(Some(change)) => backlog.queue(change),
                Ok(None) => ended = true,
                Err(lagged) => return writer.outran(&lagged, &fenced),
            }
        }
        while let Some(change) = changes.try_next() {
            backlog.queue(change);
        }
        backlog.fold_if_due(&writer.written, &HashSet::new());
        let mut batch = Batch::default();
        while let Some(change) = backlog.front() {
            if !writer.add(&mut batch, change) {
                break;
            }
            backlog.pop();
        }
        loop {
            let written = reading_on(writer.write(&batch), &mut changes, &mut backlog).await;
            // The batch counts as written: it is retried until it is.
            backlog.fold_if_due(&writer.written, &batch.sessions);
            let Err(status) = written else { break };
            if fenced.borrow().is_some() {
                return;
            }
            let metrics = writer.node.etcd.metrics().cluster();
            let pause = outage.failed(metrics, &status, batch.writes.len());
            reading_on(tokio::time::sleep(pause), &mut changes, &mut backlog).await;
        }
        outage.recovered();
    }
    flushed.send_replace(true);
}

/// How often the writer takes in what queued up while it waits on etcd.
const READ_ON_EVERY: Duration = Duration::from_millis(50);

/// Runs `work` (a write to etcd, or the pause before a retry) while taking
/// what queues up on `changes` into `backlog` every [`READ_ON_EVERY`], so
/// that the subscription never overflows while etcd is slow or away. (A
/// wake-up per change instead slowed a drain's writes by half.) An end or
/// a lag of the subscription is for the caller's next `next()` to learn.
async fn reading_on<T>(
    work: impl std::future::Future<Output = T>,
    changes: &mut Subscription,
    backlog: &mut Backlog,
) -> T {
    tokio::pin!(work);
    let mut every = tokio::time::interval_at(Instant::now() + READ_ON_EVERY, READ_ON_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            output = &mut work => return output,
            _ = every.tick() => {
                while let Some(change) = changes.try_next() {
                    backlog.queue(change);
                }
            }
        }
    }
}

/// How many changes may wait before the backlog is folded to one per
/// session: a burst larger than this is what an outage looks like.
const FOLD_AT: usize = 1 << 16;

/// Changes waiting for etcd, in order. Past a bound they are folded: each
/// session keeps only its last change (a close with its reason, or its
/// latest state), and a session that opened and closed without its open
/// ever being written is dropped, since no view has seen it.
#[derive(Default)]
struct Backlog {
    changes: VecDeque<Arc<Change>>,
    /// The length at which the next fold happens, past [`FOLD_AT`].
    fold_at: usize,
}

impl Backlog {
    fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    fn front(&self) -> Option<&Arc<Change>> {
        self.changes.front()
    }

    fn pop(&mut self) {
        self.changes.pop_front();
        if self.changes.is_empty() {
            self.fold_at = 0;
        }
    }

    /// Adds `change` at the end.
    fn queue(&mut self, change: Arc<Change>) {
        self.changes.push_back(change);
    }

    /// Folds the backlog if it is long; `written` and `in_flight` (a batch
    /// being written) are the sessions whose open etcd has or will have.
    fn fold_if_due(&mut self, written: &HashSet<String>, in_flight: &HashSet<String>) {
        let waiting = self.changes.len();
        if waiting < self.fold_at.max(FOLD_AT) {
            return;
        }
        let known = |id: &str| written.contains(id) || in_flight.contains(id);
        let dropped = fold(&mut self.changes, known);
        warn!(
            waiting,
            folded = self.changes.len(),
            dropped,
            "session changes waiting for etcd folded to one per session; \
             sessions that opened and closed meanwhile (dropped) will not be shown by any node"
        );
        // However many sessions stay, the next fold is as far off again.
        self.fold_at = self.changes.len() * 2;
    }
}

/// Folds `changes` to each session's last change, in the order of those
/// last changes; `written` says whose open etcd has. A session not written
/// keeps an open with its latest state, or nothing if it closed. Returns how
/// many such sessions were dropped.
fn fold(changes: &mut VecDeque<Arc<Change>>, written: impl Fn(&str) -> bool) -> usize {
    let id = |change: &Change| change.event.session().identity.session_id.clone();
    let mut last = HashMap::new();
    for (at, change) in changes.iter().enumerate() {
        last.insert(id(change), at);
    }
    let mut dropped = 0;
    let folded = std::mem::take(changes)
        .into_iter()
        .enumerate()
        .filter(|(at, change)| last.get(&id(change)) == Some(at))
        .filter_map(|(_, change)| {
            let session_id = id(&change);
            if written(&session_id) {
                return Some(change);
            }
            match &change.event {
                SessionEvent::Closed { .. } => {
                    dropped += 1;
                    None
                }
                SessionEvent::Opened(_) => Some(change),
                SessionEvent::Suspected(info) | SessionEvent::Recovered(info) => {
                    Some(Arc::new(Change {
                        revision: change.revision,
                        event: SessionEvent::Opened(info.clone()),
                    }))
                }
            }
        })
        .collect();
    *changes = folded;
    dropped
}

/// A run of failed writes: reported once when it starts and once when it
/// ends, each failure counted by kind, the retries spaced out.
struct Outage {
    writing: watch::Sender<bool>,
    /// When the first write of the run failed, and how many have since.
    since: Option<(Instant, u32)>,
    backoff: Backoff,
}

impl Outage {
    fn new(writing: watch::Sender<bool>) -> Self {
        Self {
            writing,
            since: None,
            backoff: retry_backoff(),
        }
    }

    /// A write of a batch of `changes` failed with `status`: how long to
    /// wait before the next try.
    fn failed(
        &mut self,
        metrics: &crate::metrics::ClusterMetrics,
        status: &tonic::Status,
        changes: usize,
    ) -> Duration {
        let kind = etcd::failure_kind(status);
        let (_, failures) = self.since.get_or_insert_with(|| {
            error!(
                error = kind,
                %status,
                changes,
                "writing session changes to etcd fails: other nodes no longer see this node's changes; \
                 its sessions run on, and their changes wait here until etcd takes writes again \
                 (if error=nospace, free etcd's space: compact, defrag, disarm the NOSPACE alarm)"
            );
            self.writing.send_replace(false);
            (Instant::now(), 0)
        });
        *failures += 1;
        metrics.write_failed(kind);
        self.backoff.delay(*failures, &mut rand::rng())
    }

    /// A write succeeded: ends the run, if there was one.
    fn recovered(&mut self) {
        if let Some((since, failures)) = self.since.take() {
            error!(
                failures,
                outage_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                "writing session changes to etcd works again: the changes that waited are being written"
            );
            self.writing.send_replace(true);
        }
    }
}

/// What one change asks of etcd.
enum Write {
    /// Put the session's record.
    Record,
    /// Put the session's record and take its client id.
    Claim { client_id: String },
    /// Put the session's close on a tombstone lease, freeing its client id
    /// (if any) when the id still names it.
    Close { client_id: Option<String> },
}

/// Consecutive changes written in one transaction: no key twice (etcd
/// refuses that), within etcd's limits.
#[derive(Default)]
struct Batch {
    /// Each change's session id, write and record.
    writes: Vec<(String, Write, Vec<u8>)>,
    sessions: HashSet<String>,
    client_ids: HashSet<String>,
    ops: usize,
    bytes: usize,
}

/// The writer's state: which sessions have their open in etcd, since only
/// they have a state or a close to write.
struct Writer {
    node: Arc<Node>,
    local: SessionRegistry,
    written: HashSet<String>,
}

impl Writer {
    /// The writer could not keep up with the registry even while reading on
    /// (not an etcd outage): in a drain, leaving revokes the lease, so what
    /// was not written is reported NODE_LOST at once; otherwise the node can
    /// no longer be seen as it is, and fences itself.
    fn outran(&self, lagged: &Lagged, fenced: &watch::Sender<Option<String>>) {
        let reason = format!("this node's session changes outran its etcd writer ({lagged})");
        error!(%reason, "session changes are no longer written to etcd");
        if !self.local.is_shut_down() {
            fenced.send_replace(Some(reason));
        }
    }

    /// Adds `change` to `batch`; false (and nothing added) if it must wait
    /// for the next batch. A change with nothing to write always fits.
    fn add(&self, batch: &mut Batch, change: &Change) -> bool {
        let session = change.event.session();
        let session_id = &session.identity.session_id;
        let client_id = &session.identity.client_id;
        let write = match &change.event {
            // A session that still holds its client id here claims the id in
            // etcd with its open. One closed or replaced here before its open
            // was written (the writer was behind, or etcd away) claims
            // nothing: its open and then its close are written plainly, so
            // every watcher in the cluster, this node's own included, still
            // sees it open and close (unless a long backlog was folded,
            // which drops such a session).
            SessionEvent::Opened(_)
                if !client_id.is_empty()
                    && self.local.holder(client_id).as_ref() == Some(session_id) =>
            {
                Write::Claim {
                    client_id: client_id.clone(),
                }
            }
            SessionEvent::Opened(_) => Write::Record,
            SessionEvent::Suspected(_) | SessionEvent::Recovered(_) => {
                if !self.written.contains(session_id) && !batch.sessions.contains(session_id) {
                    return true;
                }
                Write::Record
            }
            SessionEvent::Closed { .. } => {
                if !self.written.contains(session_id) && !batch.sessions.contains(session_id) {
                    // Never written: nothing to close, and no claim to forget.
                    self.node.claims.lock().remove(session_id);
                    return true;
                }
                Write::Close {
                    client_id: (!client_id.is_empty()).then(|| client_id.clone()),
                }
            }
        };
        let record = pb::WatchSessionsResponse::from(&Change {
            revision: 0,
            event: change.event.clone(),
        })
        .encode_to_vec();
        let (ops, id_taken) = match &write {
            Write::Record => (1, None),
            Write::Claim { client_id } => (1, Some(client_id)),
            Write::Close { client_id } => {
                (1 + usize::from(client_id.is_some()), client_id.as_ref())
            }
        };
        // The request's size: the record, the session's key, and the client
        // id's key as a compare and a put or delete (client ids may be long).
        let keys = &self.node.keys;
        let bytes = record.len()
            + keys.session(session_id).len()
            + id_taken.map_or(0, |id| 2 * keys.client(id).len())
            + OP_OVERHEAD * ops;
        let full = !batch.writes.is_empty()
            && (batch.ops + ops > BATCH_OPS || batch.bytes + bytes > BATCH_BYTES);
        if full
            || batch.sessions.contains(session_id)
            || id_taken.is_some_and(|id| batch.client_ids.contains(id))
        {
            return false;
        }
        batch.sessions.insert(session_id.clone());
        if let Some(id) = id_taken {
            batch.client_ids.insert(id.clone());
        }
        batch.ops += ops;
        batch.bytes += bytes;
        batch.writes.push((session_id.clone(), write, record));
        true
    }

    /// Writes `batch` in one transaction, then each claim that lost a race
    /// on its own; notes what is now in etcd.
    async fn write(&mut self, batch: &Batch) -> Result<(), tonic::Status> {
        if batch.writes.is_empty() {
            return Ok(());
        }
        let node = &self.node;
        let claims: Vec<&String> = batch
            .writes
            .iter()
            .filter_map(|(_, write, _)| match write {
                Write::Claim { client_id } => Some(client_id),
                _ => None,
            })
            .collect();
        let mut seen = read_mod_revisions(node, &claims).await?.into_iter();
        let closes = batch
            .writes
            .iter()
            .any(|(_, write, _)| matches!(write, Write::Close { .. }));
        let tombstone = match closes {
            true => node.tombstones.lease(&node.etcd).await?,
            false => 0,
        };
        let mut ops = Vec::with_capacity(batch.ops);
        for (session_id, write, record) in &batch.writes {
            let session_key = node.keys.session(session_id);
            match write {
                Write::Record => ops.push(etcd::put(session_key, record.clone(), node.lease)),
                Write::Claim { client_id } => ops.push(nested(claim(
                    node,
                    client_id,
                    session_id,
                    record,
                    seen.next().unwrap_or(0),
                ))),
                Write::Close { client_id } => {
                    ops.push(etcd::put(session_key, record.clone(), tombstone));
                    if let Some(client_id) = client_id {
                        ops.push(nested(release(node, client_id, session_id)));
                    }
                }
            }
        }
        let answer = node.etcd.txn(etcd::txn(Vec::new(), ops)).await?;
        node.etcd
            .metrics()
            .cluster()
            .write_batch(batch.writes.len());
        let revision = answer.header.as_ref().map_or(0, |header| header.revision);
        let mut answers = answer.responses.iter();
        for (session_id, write, record) in &batch.writes {
            let answer = answers.next();
            match write {
                Write::Record => {
                    self.written.insert(session_id.clone());
                }
                Write::Claim { client_id } => {
                    let claimed = match nested_succeeded(answer) {
                        true => revision,
                        false => claim_alone(node, client_id, session_id, record).await?,
                    };
                    let mut claims = node.claims.lock();
                    let at = claims.entry(session_id.clone()).or_insert(claimed);
                    *at = (*at).max(claimed);
                    self.written.insert(session_id.clone());
                }
                Write::Close { client_id } => {
                    if client_id.is_some() {
                        answers.next();
                    }
                    node.claims.lock().remove(session_id);
                    self.written.remove(session_id);
                }
            }
        }
        Ok(())
    }
}

/// The `mod_revision` of each of `client_ids`' keys (0 for a free id), in
/// one read.
async fn read_mod_revisions(
    node: &Node,
    client_ids: &[&String],
) -> Result<Vec<i64>, tonic::Status> {
    if client_ids.is_empty() {
        return Ok(Vec::new());
    }
    let reads = client_ids
        .iter()
        .map(|client_id| RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: node.keys.client(client_id),
                ..RangeRequest::default()
            })),
        })
        .collect();
    let answer = node.etcd.txn(etcd::txn(Vec::new(), reads)).await?;
    Ok(answer
        .responses
        .iter()
        .map(|response| match &response.response {
            Some(Response::ResponseRange(range)) => {
                range.kvs.first().map_or(0, |kv| kv.mod_revision)
            }
            _ => 0,
        })
        .collect())
}

/// Takes `client_id` for `session_id` and writes the session's open, if the
/// id's key is still at `seen` and the session is not written yet (a retry
/// after a lost answer must not take the id back from a later session).
fn claim(node: &Node, client_id: &str, session_id: &str, record: &[u8], seen: i64) -> TxnRequest {
    let client_key = node.keys.client(client_id);
    let session_key = node.keys.session(session_id);
    etcd::txn(
        vec![
            etcd::compare(
                client_key.clone(),
                CompareResult::Equal,
                TargetUnion::ModRevision(seen),
            ),
            etcd::absent(session_key.clone()),
        ],
        vec![
            etcd::put(client_key, session_id.as_bytes().to_vec(), node.lease),
            etcd::put(session_key, record.to_vec(), node.lease),
        ],
    )
}

/// Frees `client_id` if it still names `session_id`.
fn release(node: &Node, client_id: &str, session_id: &str) -> TxnRequest {
    let client_key = node.keys.client(client_id);
    etcd::txn(
        vec![etcd::compare(
            client_key.clone(),
            CompareResult::Equal,
            TargetUnion::Value(session_id.as_bytes().to_vec()),
        )],
        vec![etcd::delete(client_key)],
    )
}

/// A transaction as one operation of another.
fn nested(txn: TxnRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestTxn(txn)),
    }
}

fn nested_succeeded(answer: Option<&etcd::pb::ResponseOp>) -> bool {
    matches!(
        answer.and_then(|answer| answer.response.as_ref()),
        Some(Response::ResponseTxn(TxnResponse {
            succeeded: true,
            ..
        }))
    )
}

/// Takes a client id that changed hands between a batch's read and its
/// write: reads the key again and retries; the etcd revision of the claim.
async fn claim_alone(
    node: &Node,
    client_id: &str,
    session_id: &str,
    record: &[u8],
) -> Result<i64, tonic::Status> {
    let client_key = node.keys.client(client_id);
    let session_key = node.keys.session(session_id);
    for _ in 0..CLIENT_ID_ATTEMPTS {
        let (held, _) = node.etcd.get(&client_key).await?;
        let seen = held.map_or(0, |kv| kv.mod_revision);
        let answer = node
            .etcd
            .txn(claim(node, client_id, session_id, record, seen))
            .await?;
        if answer.succeeded {
            return Ok(answer.header.map_or(0, |header| header.revision));
        }
        if let (Some(kv), _) = node.etcd.get(&session_key).await? {
            // Written by an attempt whose answer was lost.
            return Ok(kv.create_revision);
        }
    }
    Err(tonic::Status::aborted(format!(
        "client id {client_id:?} kept changing hands"
    )))
}

/// Evictions asked through this node's view, on their way to etcd: one per
/// session at most (asking again replaces the message), so however often an
/// operator asks, it never holds more than the view has sessions.
#[derive(Debug, Clone, Default)]
pub(super) struct Evictions {
    inner: Arc<PendingEvictions>,
}

#[derive(Debug, Default)]
struct PendingEvictions {
    /// Message by session id.
    pending: parking_lot::Mutex<HashMap<String, String>>,
    notify: Notify,
}

impl Evictions {
    /// Asks for session `session_id` (of another node) to be evicted.
    pub(super) fn ask(&self, session_id: &str, message: &str) {
        self.inner
            .pending
            .lock()
            .insert(session_id.to_owned(), message.to_owned());
        self.inner.notify.notify_one();
    }

    /// Every eviction asked since the last call; waits for one.
    async fn take(&self) -> HashMap<String, String> {
        loop {
            let pending = std::mem::take(&mut *self.inner.pending.lock());
            if !pending.is_empty() {
                return pending;
            }
            self.inner.notify.notified().await;
        }
    }
}

/// Writes each eviction asked through this node's view, for the node that
/// holds the session to carry out.
pub(super) async fn evictions(node: Arc<Node>, requests: Evictions) {
    loop {
        for (session_id, message) in requests.take().await {
            let write = || async {
                let lease = node.tombstones.lease(&node.etcd).await?;
                let txn = etcd::txn(
                    Vec::new(),
                    vec![etcd::put(
                        node.keys.evict(&session_id),
                        message.clone().into_bytes(),
                        lease,
                    )],
                );
                node.etcd.txn(txn).await
            };
            let mut attempts = 0;
            while let Err(status) = write().await {
                attempts += 1;
                node.etcd
                    .metrics()
                    .cluster()
                    .write_failed(etcd::failure_kind(&status));
                if attempts == EVICTION_ATTEMPTS {
                    warn!(%status, %session_id, "could not pass an eviction on to etcd; giving up");
                    break;
                }
                node.etcd
                    .metrics()
                    .cluster()
                    .write_failed(etcd::failure_kind(&status));
                let pause = retry_backoff().delay(attempts, &mut rand::rng());
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::SystemTime};

    use super::*;
    use crate::{
        protocol::{CloseReason, Phi},
        registry::{SessionIdentity, SessionInfo, SessionState},
    };

    fn info(session_id: &str, state: SessionState) -> SessionInfo {
        SessionInfo {
            identity: Arc::new(SessionIdentity {
                session_id: session_id.into(),
                client_id: String::new(),
                labels: HashMap::new(),
                peer: None,
                opened_at: SystemTime::now(),
                node: String::new(),
            }),
            last_seen: SystemTime::now(),
            rtt: None,
            state,
            frames_in: 0,
            frames_out: 0,
            phi: Phi::default(),
        }
    }

    fn change(revision: u64, event: SessionEvent) -> Arc<Change> {
        Arc::new(Change { revision, event })
    }

    fn kinds(changes: &VecDeque<Arc<Change>>) -> Vec<(String, &'static str)> {
        changes
            .iter()
            .map(|change| {
                let kind = match change.event {
                    SessionEvent::Opened(_) => "opened",
                    SessionEvent::Suspected(_) => "suspected",
                    SessionEvent::Recovered(_) => "recovered",
                    SessionEvent::Closed { .. } => "closed",
                };
                (change.event.session().identity.session_id.clone(), kind)
            })
            .collect()
    }

    /// Tests that a fold keeps each session's last change (a written one's
    /// close with its reason, an unwritten one's open with its latest
    /// state), drops a session that opened and closed unwritten, and keeps
    /// the order of those last changes.
    #[test]
    fn a_fold_keeps_one_change_per_session() {
        let live = SessionState::Live;
        let suspect = SessionState::Suspect;
        let closed = |id: &str| SessionEvent::Closed {
            session: info(id, live),
            reason: CloseReason::Timeout,
            message: String::new(),
        };
        let mut changes = VecDeque::from([
            change(1, SessionEvent::Suspected(info("written", suspect))),
            change(2, SessionEvent::Opened(info("brief", live))),
            change(3, SessionEvent::Opened(info("fresh", live))),
            change(4, SessionEvent::Recovered(info("written", live))),
            change(5, closed("brief")),
            change(6, SessionEvent::Suspected(info("fresh", suspect))),
            change(7, closed("written")),
        ]);
        let dropped = fold(&mut changes, |id| id == "written");
        assert_eq!(dropped, 1);
        assert_eq!(
            kinds(&changes),
            [("fresh".into(), "opened"), ("written".into(), "closed")]
        );
        let SessionEvent::Opened(fresh) = &changes[0].event else {
            unreachable!("checked above");
        };
        assert_eq!(fresh.state, suspect, "the latest state");
        assert_eq!(changes[0].revision, 6);
    }

    /// Tests that the backlog folds once it is long, and then waits twice
    /// as long again before the next fold.
    #[test]
    fn the_backlog_folds_past_its_bound() {
        let mut backlog = Backlog::default();
        let none = HashSet::new();
        for n in 0..FOLD_AT - 1 {
            let id = format!("s{}", n % 10);
            let opened = SessionEvent::Opened(info(&id, SessionState::Live));
            backlog.queue(change(n as u64, opened));
        }
        backlog.fold_if_due(&none, &none);
        assert_eq!(backlog.changes.len(), FOLD_AT - 1, "not yet");
        backlog.queue(change(
            0,
            SessionEvent::Opened(info("s0", SessionState::Live)),
        ));
        backlog.fold_if_due(&none, &none);
        assert_eq!(backlog.changes.len(), 10, "folded to one per session");
        assert_eq!(backlog.fold_at, 20);
        while !backlog.is_empty() {
            backlog.pop();
        }
        assert_eq!(backlog.fold_at, 0, "the bound is back once caught up");
    }
}
