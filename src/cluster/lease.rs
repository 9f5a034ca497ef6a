//! The node's lease, kept alive; fencing when it cannot be; and the short
//! leases that closed sessions' records live on.
//!
//! etcd expires a lease no sooner than its TTL after the last renewal it
//! confirmed. A node that has had no confirmation for two thirds of the TTL
//! fences itself: its sessions are ended with `Goodbye{SERVER_SHUTDOWN}` while
//! the lease still holds, so by the time the other nodes report them
//! `NODE_LOST`, their clients have already gone elsewhere and no client is
//! reported live on two nodes.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{watch, Mutex},
    time::{timeout_at, Instant},
};
use tracing::{error, warn};

use super::{
    etcd::{pb::LeaseKeepAliveRequest, Etcd},
    Node,
};

/// Renews the node's lease every third of its TTL until the node fences
/// itself. `granted` is when the grant was asked for: the lease runs from no
/// earlier than that.
pub(super) async fn keep_alive(
    node: Arc<Node>,
    fenced: watch::Sender<Option<String>>,
    granted: Instant,
) {
    let interval = node.ttl / 3;
    let fence_after = node.ttl - interval;
    let silent = || format!("no lease renewal from etcd for {}", human(fence_after));
    // etcd counts a renewal from when it handled the request, which is after
    // this node sent it: counting from the send keeps the whole margin.
    let mut renewed = granted;
    let reason = 'renewing: loop {
        let deadline = renewed + fence_after;
        let mut sent = Instant::now();
        let (sender, mut responses) =
            match timeout_at(deadline, node.etcd.keep_alive(node.lease)).await {
                Err(_) => break silent(),
                Ok(Ok(stream)) => stream,
                Ok(Err(status)) => {
                    warn!(%status, "lease keep-alive stream failed; retrying");
                    let retry = (Instant::now() + interval / 4).min(deadline);
                    tokio::time::sleep_until(retry).await;
                    continue;
                }
            };
        loop {
            match timeout_at(renewed + fence_after, responses.message()).await {
                Err(_) => break 'renewing silent(),
                Ok(Ok(Some(response))) if response.ttl > 0 => renewed = sent,
                Ok(Ok(Some(_))) => break 'renewing "the node's lease expired in etcd".to_owned(),
                Ok(Ok(None)) | Ok(Err(_)) => {
                    let retry = (Instant::now() + interval / 4).min(renewed + fence_after);
                    tokio::time::sleep_until(retry).await;
                    continue 'renewing;
                }
            }
            // Every third of the TTL from the last send, however long its
            // answer took: a slow answer must not push the fence late.
            tokio::time::sleep_until(sent + interval).await;
            sent = Instant::now();
            let renew = LeaseKeepAliveRequest { id: node.lease };
            if sender.send(renew).await.is_err() {
                continue 'renewing;
            }
        }
    };
    error!(node = %node.id, %reason, "fencing: ending every session of this node");
    fenced.send_replace(Some(reason));
}

fn human(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(duration)
}

/// Short leases for records that only need to outlive their readers: closed
/// sessions' last records and eviction requests. One lease serves every such
/// record of half its TTL, so they cost one grant per period, not one each.
#[derive(Debug)]
pub(super) struct Tombstones {
    ttl: Duration,
    current: Mutex<Option<(i64, Instant)>>,
}

impl Tombstones {
    /// Tombstones that live between 1.5 and 3 node TTLs (at least 15 s):
    /// long enough for every node's watch to read them, even after a retry.
    pub(super) fn new(node_ttl: Duration) -> Self {
        Self {
            ttl: (node_ttl * 3).max(Duration::from_secs(30)),
            current: Mutex::new(None),
        }
    }

    /// The lease to attach a tombstone to now.
    pub(super) async fn lease(&self, etcd: &Etcd) -> Result<i64, tonic::Status> {
        let mut current = self.current.lock().await;
        if let Some((id, granted)) = *current {
            if granted.elapsed() < self.ttl / 2 {
                return Ok(id);
            }
        }
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let (id, _) = etcd.grant(ttl).await?;
        *current = Some((id, Instant::now()));
        Ok(id)
    }
}
