//! The node's lease, kept alive; fencing when it cannot be; and the short
//! leases that closed sessions' records live on.
//!
//! etcd expires a lease no sooner than its TTL after the last renewal it
//! confirmed, counted from when etcd handled it, which is after this node
//! sent it. So the node knows a floor for the lease's life: the send time of
//! the last confirmed renewal plus the TTL etcd confirmed. It renews every
//! second (a tenth of a short TTL), so an etcd stall of a few seconds (a
//! leader election, a slow fsync) costs nothing: the renewals queued during
//! it are answered when etcd wakes. Only when that floor comes within a
//! fifth of the TTL does the node fence itself: its sessions are ended with
//! `Goodbye{SERVER_SHUTDOWN}` while the lease still holds, so by the time
//! the other nodes report them `NODE_LOST`, their clients have already gone
//! elsewhere and no client is reported live on two nodes.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use tokio::{
    sync::{watch, Mutex},
    time::{sleep_until, timeout_at, Instant, MissedTickBehavior},
};
use tracing::{error, warn};

use super::{
    etcd::{pb::LeaseKeepAliveRequest, Etcd},
    Node,
};

/// How often a lease of `ttl` is renewed: every second, or every tenth of a
/// TTL shorter than 10 s.
fn renew_every(ttl: Duration) -> Duration {
    (ttl / 10).min(Duration::from_secs(1))
}

/// How long before its lease can expire a node fences itself: time for the
/// drain's goodbyes to go out, a fifth of the TTL and at least two renewals.
fn fence_margin(ttl: Duration) -> Duration {
    (ttl / 5).max(renew_every(ttl) * 2)
}

/// Renews the node's lease until the node fences itself. `granted` is when
/// the grant was asked for: the lease runs from no earlier than that.
pub(super) async fn keep_alive(
    node: Arc<Node>,
    fenced: watch::Sender<Option<String>>,
    granted: Instant,
) {
    let interval = renew_every(node.ttl);
    let margin = fence_margin(node.ttl);
    let metrics = node.etcd.metrics().cluster();
    // The lease holds at least until then.
    let mut expires = granted + node.ttl;
    let silent = |expires: Instant| {
        let confirmed = expires.checked_sub(node.ttl).unwrap_or(granted);
        format!(
            "no lease renewal confirmed by etcd for {}; the lease may expire in {}",
            human(confirmed.elapsed()),
            human(expires.saturating_duration_since(Instant::now()))
        )
    };
    let reason = 'renewing: loop {
        let fence_at = expires - margin;
        // The first renewal is asked with the call.
        let mut in_flight = VecDeque::from([Instant::now()]);
        let (sender, mut responses) =
            match timeout_at(fence_at, node.etcd.keep_alive(node.lease)).await {
                Err(_) => break silent(expires),
                Ok(Ok(stream)) => stream,
                Ok(Err(status)) => {
                    warn!(%status, "lease keep-alive stream failed; retrying");
                    sleep_until((Instant::now() + interval).min(fence_at)).await;
                    continue;
                }
            };
        let mut renew = tokio::time::interval_at(Instant::now() + interval, interval);
        renew.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let fence_at = expires - margin;
            tokio::select! {
                answer = responses.message() => match answer {
                    Ok(Some(response)) if response.ttl > 0 => {
                        // etcd answers a stream's renewals in order.
                        let Some(sent) = in_flight.pop_front() else { continue };
                        metrics.etcd_request("keepalive", sent.elapsed());
                        if let Some(header) = &response.header {
                            metrics.heard_head(header.revision);
                        }
                        let ttl = Duration::from_secs(response.ttl.unsigned_abs());
                        expires = expires.max(sent + ttl);
                    }
                    Ok(Some(_)) => break 'renewing "the node's lease expired in etcd".to_owned(),
                    Ok(None) | Err(_) => {
                        sleep_until((Instant::now() + interval / 4).min(fence_at)).await;
                        continue 'renewing;
                    }
                },
                _ = renew.tick() => {
                    // A full queue already holds a renewal that has not gone
                    // out: another would confirm nothing more.
                    let request = LeaseKeepAliveRequest { id: node.lease };
                    if sender.try_send(request).is_ok() {
                        in_flight.push_back(Instant::now());
                    }
                }
                () = sleep_until(fence_at) => break 'renewing silent(expires),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that a stall of 5 s between two renewals is within what the
    /// default 10 s lease tolerates (a renewal sent just before it, an
    /// answer right after), and that the shortest lease still fences before
    /// it can expire.
    #[test]
    fn stalls_shorter_than_the_lease_are_tolerated() {
        let ttl = Duration::from_secs(10);
        assert_eq!(renew_every(ttl), Duration::from_secs(1));
        let tolerated = ttl - fence_margin(ttl) - renew_every(ttl);
        assert!(tolerated >= Duration::from_secs(7), "{tolerated:?}");
        assert_eq!(
            renew_every(Duration::from_secs(3600)),
            Duration::from_secs(1)
        );
        let short = Duration::from_secs(2);
        assert_eq!(renew_every(short), Duration::from_millis(200));
        assert!(fence_margin(short) >= Duration::from_millis(400));
        assert!(fence_margin(short) < short);
    }
}
