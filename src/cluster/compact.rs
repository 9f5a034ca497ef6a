//! Keeping etcd's history short: the cluster compacts etcd itself.
//!
//! Every write to etcd keeps the old value as history until etcd is
//! compacted, and etcd 3.4 does not compact by default. A session's life
//! (its open and its close) leaves about 600 bytes of history, so a busy
//! cluster fills etcd's default 2 GiB quota in hours, after which etcd
//! refuses every write. kube-apiserver compacts its etcd itself for the same
//! reason; so does each node here.
//!
//! The history kept is between 1.25 and 2 times `--watch-history`
//! etcd revisions: the join replays `--watch-history` revisions (the extra
//! quarter usually covers a join that races a compaction; one that still
//! loses gets a reset), and a watch that resumes
//! within them still gets a replay. Compaction is triggered by
//! revision count, checked every second against the newest revision the
//! node has heard of, so no burst of churn can outrun a timer.
//!
//! One node compacts at a time, without a lock to hold or lose: the key
//! `P/compacted` holds the revision last compacted to, and a node takes the
//! next compaction by moving it with a transaction conditional on its
//! `mod_revision`, as kube-apiserver does. The loser of a race simply sees
//! the key moved. Compacting is idempotent: a node that took a round retries
//! its compaction until it succeeds; one that dies between moving the key
//! and compacting only delays the compaction by one round, which compacts
//! everything below its own revision anyway; and compacting to a revision
//! already compacted is not an error. A full etcd (NOSPACE) refuses the
//! key's move but not a compaction: the node then compacts without it.

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use super::{
    etcd::{
        self,
        pb::compare::{CompareResult, TargetUnion},
    },
    Node,
};

/// How often the compactor compares etcd's revision with the last
/// compaction. Reading it is local: the number comes from answers the node
/// gets anyway (lease renewals every second, the watch).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// When and how far to compact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    /// etcd revisions of history kept (a quarter more right after a
    /// compaction).
    keep: i64,
}

impl Plan {
    /// The revision to compact to, with etcd at `head` and the view having
    /// applied up to `applied`, if the history since `compacted` has grown
    /// to twice what is kept. Never past what this node's view applied,
    /// which would cut its own watch off.
    fn target(self, compacted: i64, head: i64, applied: i64) -> Option<i64> {
        let newest = head.min(applied);
        // A quarter more than is kept: a node joining meanwhile replays
        // `keep` revisions back from its registration, which etcd's head
        // may have passed by the time the compaction runs.
        let target = newest - self.keep - self.keep / 4;
        (newest - compacted >= 2 * self.keep && target > compacted).then_some(target)
    }
}

/// Compacts etcd's history whenever it has grown past twice `keep`
/// revisions, down to 1.25 × `keep`, until the task is stopped.
pub(super) async fn compact(node: Arc<Node>, keep: usize) {
    let plan = Plan {
        keep: i64::try_from(keep).unwrap_or(i64::MAX / 4).max(1),
    };
    // The last compaction as this node knows it; read from etcd before any
    // attempt, so a stale value only costs a read.
    let mut compacted = 0;
    // A round this node took whose compaction has not succeeded yet.
    let mut taken: Option<i64> = None;
    // Whether the last attempt failed: its warning is not repeated each second.
    let mut failing = false;
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let (head, applied) = node.positions();
        if taken.is_none() && plan.target(compacted, head, applied).is_none() {
            continue;
        }
        let attempt = match taken {
            Some(target) => compact_to(&node, plan, target).await.map(|()| target),
            None => take_round(&node, plan, head, applied, &mut taken).await,
        };
        match attempt {
            Ok(now) => {
                compacted = compacted.max(now);
                taken = None;
                failing = false;
            }
            Err(status) if !failing => {
                failing = true;
                warn!(%status, "could not compact etcd's history; trying again every second");
            }
            Err(_) => {}
        }
    }
}

/// Compacts etcd to `target` (a round this node took), counting and logging
/// a compaction that was not already done.
async fn compact_to(node: &Node, plan: Plan, target: i64) -> Result<(), tonic::Status> {
    if node.etcd.compact(target).await? {
        node.etcd.metrics().cluster().compacted();
        info!(
            revision = target,
            kept = plan.keep,
            "compacted etcd's history"
        );
    }
    Ok(())
}

/// Reads the last compaction; if one is due, takes the round (moves
/// `P/compacted`, noting it in `taken` until its compaction succeeds) and
/// compacts. Returns the revision etcd is now compacted to, as far as this
/// node knows.
async fn take_round(
    node: &Node,
    plan: Plan,
    head: i64,
    applied: i64,
    taken: &mut Option<i64>,
) -> Result<i64, tonic::Status> {
    let key = node.keys.compacted();
    let (mark, _) = node.etcd.get(&key).await?;
    let compacted = mark
        .as_ref()
        .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<i64>().ok())
        .unwrap_or(0);
    let Some(target) = plan.target(compacted, head, applied) else {
        return Ok(compacted);
    };
    let seen = mark.as_ref().map_or(0, |kv| kv.mod_revision);
    let take = etcd::txn(
        vec![etcd::compare(
            key.clone(),
            CompareResult::Equal,
            TargetUnion::ModRevision(seen),
        )],
        vec![etcd::put(key, target.to_string().into_bytes(), 0)],
    );
    match node.etcd.txn(take).await {
        // Another node took this round.
        Ok(answer) if !answer.succeeded => return Ok(compacted),
        Ok(_) => {}
        // etcd is full: the mark cannot move, but compacting still works
        // (and is harmless if another node does it too).
        Err(status) if etcd::failure_kind(&status) == "nospace" => {}
        Err(status) => return Err(status),
    }
    *taken = Some(target);
    compact_to(node, plan, target).await?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that compaction waits for twice the history kept, compacts down
    /// to a quarter more than is kept, and never past what the view applied.
    #[test]
    fn compacts_at_twice_the_history_down_to_it() {
        let plan = Plan { keep: 100 };
        assert_eq!(plan.target(0, 199, 199), None);
        assert_eq!(plan.target(0, 200, 200), Some(75));
        assert_eq!(plan.target(75, 274, 274), None);
        assert_eq!(plan.target(75, 275, 275), Some(150));
        assert_eq!(plan.target(0, 10_000, 150), None, "the view is behind");
        assert_eq!(plan.target(0, 10_000, 250), Some(125));
        assert_eq!(plan.target(500, 10, 10), None, "etcd was restored");
    }
}
