//! This node's sessions, written to etcd: one transaction per open,
//! suspicion, recovery and close, and none per heartbeat.
//!
//! The writer follows the local registry's changes in order. An open that
//! names a client id takes the id's key in the same transaction, on the
//! condition that the key's `mod_revision` is still the one just read: the
//! session it replaces, on whatever node, is the one its node then sees
//! replaced. A close overwrites the session's key with the close (on a short
//! tombstone lease) and frees the client id if it still points here.

use std::{collections::HashSet, sync::Arc, time::Duration};

use prost::Message;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use super::{
    etcd::{
        self,
        pb::{
            compare::{CompareResult, TargetUnion},
            TxnRequest,
        },
    },
    Node,
};
use crate::{
    protocol::pb,
    registry::{Change, SessionEvent, SessionRegistry, Subscription},
};

/// Local changes that may wait for etcd before the node fences itself: far
/// more than a burst of opens, bounded so a stuck etcd cannot grow it.
pub(super) const QUEUE: usize = 1 << 16;

/// How long a failed write waits before it is tried again.
const RETRY: Duration = Duration::from_millis(200);

/// Attempts at passing an eviction on before it is given up (and logged).
const EVICTION_ATTEMPTS: u32 = 25;

/// Attempts at taking a client id that other nodes keep taking meanwhile.
const CLIENT_ID_ATTEMPTS: usize = 8;

/// Writes every change of `changes` (the subscription to `local`, this
/// node's registry) to etcd, in order, until the registry ends (after a
/// drain) or the node is fenced; sets `flushed` when all are written.
pub(super) async fn sessions(
    node: Arc<Node>,
    mut changes: Subscription,
    local: SessionRegistry,
    fenced: watch::Sender<Option<String>>,
    flushed: watch::Sender<bool>,
) {
    // Sessions whose open is in etcd: only they have a state or a close to write.
    let mut written = HashSet::new();
    loop {
        let change = match changes.next().await {
            Ok(Some(change)) => change,
            Ok(None) => break,
            Err(lagged) => {
                fenced.send_replace(Some(format!(
                    "this node's session changes outran etcd ({lagged})"
                )));
                return;
            }
        };
        while let Err(status) = write(&node, &local, &mut written, &change).await {
            if fenced.borrow().is_some() {
                return;
            }
            warn!(%status, revision = change.revision, "writing a session change to etcd failed; retrying");
            tokio::time::sleep(RETRY).await;
        }
    }
    flushed.send_replace(true);
}

/// One change as one transaction (or none, for a session never written).
async fn write(
    node: &Node,
    local: &SessionRegistry,
    written: &mut HashSet<String>,
    change: &Change,
) -> Result<(), tonic::Status> {
    let session = change.event.session();
    let session_key = node.keys.session(&session.identity.session_id);
    let record = pb::WatchSessionsResponse::from(&Change {
        revision: 0,
        event: change.event.clone(),
    })
    .encode_to_vec();
    let client_id = &session.identity.client_id;
    let session_id = &session.identity.session_id;
    match &change.event {
        // A session that still holds its client id here claims the id in
        // etcd with its open. One closed or replaced here before its open
        // was written (the writer was behind, or etcd away) claims nothing:
        // its open and then its close are written plainly below, so every
        // watcher in the cluster, this node's own included, still sees it
        // open and close.
        SessionEvent::Opened(_)
            if !client_id.is_empty() && local.holder(client_id).as_ref() == Some(session_id) =>
        {
            let client_key = node.keys.client(client_id);
            let claim = session_id.as_bytes().to_vec();
            for _ in 0..CLIENT_ID_ATTEMPTS {
                let (held, _) = node.etcd.get(&client_key).await?;
                let seen = held.map_or(0, |kv| kv.mod_revision);
                let txn = etcd::txn(
                    vec![
                        etcd::compare(
                            client_key.clone(),
                            CompareResult::Equal,
                            TargetUnion::ModRevision(seen),
                        ),
                        // Not written yet: a retry after a lost answer must
                        // not take the id back from a later session.
                        etcd::absent(session_key.clone()),
                    ],
                    vec![
                        etcd::put(client_key.clone(), claim.clone(), node.lease),
                        etcd::put(session_key.clone(), record.clone(), node.lease),
                    ],
                );
                let answer = node.etcd.txn(txn).await?;
                let revision = if answer.succeeded {
                    answer.header.map_or(0, |header| header.revision)
                } else {
                    match node.etcd.get(&session_key).await? {
                        // Written by an attempt whose answer was lost.
                        (Some(kv), _) => kv.create_revision,
                        (None, _) => continue,
                    }
                };
                let mut claims = node.claims.lock();
                let claimed = claims.entry(session_id.clone()).or_insert(revision);
                *claimed = (*claimed).max(revision);
                written.insert(session_id.clone());
                return Ok(());
            }
            Err(tonic::Status::aborted(format!(
                "client id {client_id:?} kept changing hands"
            )))
        }
        SessionEvent::Opened(_) | SessionEvent::Suspected(_) | SessionEvent::Recovered(_) => {
            if !matches!(change.event, SessionEvent::Opened(_)) && !written.contains(session_id) {
                return Ok(());
            }
            let txn = etcd::txn(Vec::new(), vec![etcd::put(session_key, record, node.lease)]);
            node.etcd.txn(txn).await?;
            written.insert(session_id.clone());
            Ok(())
        }
        SessionEvent::Closed { .. } => {
            node.claims.lock().remove(session_id);
            if !written.contains(session_id) {
                return Ok(());
            }
            let tombstone = node.tombstones.lease(&node.etcd).await?;
            let put = etcd::put(session_key, record, tombstone);
            let txn = if client_id.is_empty() {
                etcd::txn(Vec::new(), vec![put])
            } else {
                let client_key = node.keys.client(client_id);
                TxnRequest {
                    compare: vec![etcd::compare(
                        client_key.clone(),
                        CompareResult::Equal,
                        TargetUnion::Value(session_id.as_bytes().to_vec()),
                    )],
                    success: vec![put.clone(), etcd::delete(client_key)],
                    failure: vec![put],
                }
            };
            node.etcd.txn(txn).await?;
            written.remove(session_id);
            Ok(())
        }
    }
}

/// Writes each eviction asked through this node's view, for the node that
/// holds the session to carry out.
pub(super) async fn evictions(
    node: Arc<Node>,
    mut requests: mpsc::UnboundedReceiver<(String, String)>,
) {
    while let Some((session_id, message)) = requests.recv().await {
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
            if attempts == EVICTION_ATTEMPTS {
                warn!(%status, %session_id, "could not pass an eviction on to etcd; giving up");
                break;
            }
            tokio::time::sleep(RETRY).await;
        }
    }
}
