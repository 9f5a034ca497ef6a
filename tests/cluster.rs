//! Cluster mode against a real etcd (Debian's etcd-server) and real
//! `heartbeat serve` processes: one presence across nodes, replace and evict
//! across nodes, a killed node's sessions reported NODE_LOST within the lease
//! TTL, watches that resume by revision on any node, mirrors that re-watch
//! after an etcd restart, and nodes that fence themselves when etcd is gone;
//! and etcd kept in health for months: compacted by the nodes, survived when
//! out of space, and stalls of a few seconds that fence nobody.

mod support;

use std::{collections::BTreeSet, time::Duration};

use support::{etcd::TestEtcd, *};
use tokio::time::Instant;
use tonic::{Code, Streaming};
use tonic_heartbeat::protocol::pb::{self, watch_sessions_response::Event};

/// Held by the tests that load the machine (thousands of sessions at once,
/// megabytes of etcd writes and a defrag) and by those that time a
/// deadline, so that on two cores none runs beside another of them: a
/// drain's 1 s grace, or a fence's bounds, must not depend on what the next
/// test is doing.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `heartbeat serve --cluster` process, killed when dropped.
struct Node(ServerProcess);

impl std::ops::Deref for Node {
    type Target = ServerProcess;

    fn deref(&self) -> &ServerProcess {
        &self.0
    }
}

impl Node {
    /// Node `id` of the cluster in `etcd`, with a lease of `ttl` seconds.
    fn start(etcd: &TestEtcd, id: &str, ttl: u64) -> Self {
        Self::start_with(etcd, id, ttl, &[])
    }

    /// Like [`Node::start`], with more flags.
    fn start_with(etcd: &TestEtcd, id: &str, ttl: u64, more: &[&str]) -> Self {
        Self::start_at(&etcd.url, id, ttl, more)
    }

    /// Like [`Node::start_with`], reaching etcd at `url`.
    fn start_at(url: &str, id: &str, ttl: u64, more: &[&str]) -> Self {
        let ttl = format!("{ttl}s");
        let mut args = vec![
            "--cluster",
            url,
            "--node-id",
            id,
            "--lease-ttl",
            &ttl,
            // Slow enough that raw test sessions, which answer no pings, stay
            // open for the whole test.
            "--ping-interval",
            "10s",
            "--timeout",
            "30s",
        ];
        args.extend_from_slice(more);
        Self(ServerProcess::start(&args))
    }

    /// Every open session, with the epoch and revision of the view.
    async fn list(&self) -> (u64, u64, Vec<pb::Session>) {
        let page = list_sessions(self.addr).await;
        (page.epoch, page.revision, page.sessions)
    }

    async fn ids(&self) -> BTreeSet<String> {
        self.list()
            .await
            .2
            .into_iter()
            .map(|session| session.session_id)
            .collect()
    }

    /// A watch resuming after `after` of `epoch` (0: fresh).
    async fn watch(&self, epoch: u64, after: u64) -> Streaming<pb::WatchSessionsResponse> {
        self.presence()
            .await
            .watch_sessions(pb::WatchSessionsRequest {
                resume_epoch: epoch,
                resume_after: after,
                ..Default::default()
            })
            .await
            .expect("WatchSessions")
            .into_inner()
    }
}

/// Polls `check` until it holds, within `WAIT`.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(WAIT, what, check).await;
}

/// Polls `check` until it holds, within `limit`.
async fn eventually_within<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A watcher's view, built from its events.
#[derive(Default)]
struct View {
    epoch: u64,
    revision: u64,
    open: BTreeSet<String>,
    resets: usize,
    /// Every change: (revision, kind, session id, close reason).
    changes: Vec<(u64, &'static str, String, i32)>,
}

impl View {
    /// Applies the next event of `watch`; false once the watch ended.
    async fn next(&mut self, watch: &mut Streaming<pb::WatchSessionsResponse>) -> bool {
        let Some(response) = within(WAIT, watch.message()).await.expect("a watch event") else {
            return false;
        };
        assert!(
            response.revision >= self.revision,
            "revisions never go back"
        );
        self.revision = response.revision;
        let (kind, id, reason) = match response.event.expect("an event") {
            Event::Opened(session) => {
                self.open.insert(session.session_id.clone());
                ("opened", session.session_id, 0)
            }
            Event::Closed(closed) => {
                let id = closed.session.expect("a session").session_id;
                self.open.remove(&id);
                ("closed", id, closed.reason)
            }
            Event::Suspected(_) | Event::Recovered(_) => return true,
            Event::Synced(synced) => {
                self.epoch = synced.epoch;
                return true;
            }
            Event::Reset(_) => {
                self.resets += 1;
                self.open.clear();
                return true;
            }
        };
        self.changes.push((response.revision, kind, id, reason));
        true
    }

    /// Reads until `done` holds of the view.
    async fn until(
        &mut self,
        watch: &mut Streaming<pb::WatchSessionsResponse>,
        what: &str,
        done: impl Fn(&View) -> bool,
    ) {
        while !done(self) {
            assert!(self.next(watch).await, "{what}: the watch ended first");
        }
    }
}

/// Tests that a session on node 1 is listed and watched on nodes 2 and 3
/// with `node` set; that the same client id on node 2 replaces it (REPLACED
/// there, one session cluster-wide, the newer opened before the older closed
/// in every view); and that an eviction sent through node 3 ends a session
/// on node 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_presence_with_replace_and_evict_across_nodes() {
    let etcd = TestEtcd::start("presence");
    let nodes = [1, 2, 3].map(|n| Node::start(&etcd, &format!("n{n}"), 10));
    let mut watch = nodes[2].watch(0, 0).await;
    let mut view = View::default();
    view.until(&mut watch, "synced", |view| view.epoch != 0)
        .await;

    let (mut first, welcome) = RawSession::hello(nodes[0].addr, "worker-a").await;
    let id = welcome.session_id.clone();
    view.until(&mut watch, "opened on node 3", |view| {
        view.open.contains(&id)
    })
    .await;
    eventually("listed on node 2", || async {
        nodes[1].ids().await.contains(&id)
    })
    .await;
    let (_, _, listed) = nodes[1].list().await;
    let session = listed
        .iter()
        .find(|s| s.session_id == id)
        .expect("listed on node 2");
    assert_eq!(session.node, "n1");
    assert_eq!(session.client_id, "worker-a");

    let (_second, newer) = RawSession::hello(nodes[1].addr, "worker-a").await;
    first
        .expect_end(pb::GoodbyeReason::Replaced, Code::Aborted)
        .await;
    let newer_id = newer.session_id.clone();
    view.until(&mut watch, "the replacement", |view| {
        !view.open.contains(&id) && view.open.contains(&newer_id)
    })
    .await;
    let closed = view
        .changes
        .iter()
        .find(|change| change.2 == id && change.1 == "closed");
    assert_eq!(
        closed.map(|change| change.3),
        Some(pb::CloseReason::Replaced as i32)
    );
    // The newer session opened before the older closed: the client id was
    // never missing from node 3's presence.
    let at = |kind: &str, session: &str| {
        view.changes
            .iter()
            .position(|change| change.1 == kind && change.2 == session)
    };
    assert!(
        at("opened", &newer_id) < at("closed", &id),
        "{:?}",
        view.changes
    );
    for node in &nodes {
        eventually("one session for the id on every node", || async {
            node.ids().await == BTreeSet::from([newer_id.clone()])
        })
        .await;
    }

    let (mut evicted, welcome) = RawSession::hello(nodes[0].addr, "worker-b").await;
    let evicted_id = welcome.session_id.clone();
    eventually("listed on node 3", || async {
        nodes[2].ids().await.contains(&evicted_id)
    })
    .await;
    nodes[2]
        .presence()
        .await
        .evict_session(pb::EvictSessionRequest {
            session_id: evicted_id.clone(),
            message: "through node 3".into(),
        })
        .await
        .expect("evict through node 3");
    let ended = evicted
        .expect_end(pb::GoodbyeReason::Evicted, Code::Aborted)
        .await;
    assert_eq!(ended.goodbye.expect("a goodbye").message, "through node 3");
    view.until(&mut watch, "the eviction", |view| {
        !view.open.contains(&evicted_id)
    })
    .await;
}

/// Tests that Hellos racing with one client id on three nodes at once leave
/// exactly one session with it, the same on every node, and that the
/// others end with Goodbye{REPLACED}: the client id's key is taken by
/// comparing its `mod_revision`, so of any two claims the later replaces
/// the earlier, whichever nodes they came through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_hellos_leave_one_session_per_client_id() {
    const ROUNDS: usize = 10;
    let etcd = TestEtcd::start("race");
    let nodes = [1, 2, 3].map(|n| Node::start(&etcd, &format!("n{n}"), 10));
    let mut watch = nodes[0].watch(0, 0).await;
    let mut view = View::default();
    view.until(&mut watch, "synced", |view| view.epoch != 0)
        .await;
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let client_id = format!("racer-{round}");
        let hellos: Vec<_> = nodes
            .iter()
            .map(|node| {
                let (addr, client_id) = (node.addr, client_id.clone());
                tokio::spawn(async move { RawSession::hello(addr, &client_id).await })
            })
            .collect();
        let mut racers = Vec::new();
        for hello in hellos {
            let (session, welcome) = hello.await.expect("a Hello");
            racers.push((session, welcome.session_id));
        }
        rounds.push((client_id, racers));
    }
    // Settled once every racer opened and all but one per round closed.
    let racers: BTreeSet<String> = rounds
        .iter()
        .flat_map(|(_, racers)| racers.iter().map(|(_, id)| id.clone()))
        .collect();
    view.until(&mut watch, "every race decided", |view| {
        let seen = |kind| {
            view.changes
                .iter()
                .filter(|change| change.1 == kind && racers.contains(&change.2))
                .count()
        };
        seen("opened") == racers.len() && seen("closed") == 2 * ROUNDS
    })
    .await;
    for (client_id, racers) in &mut rounds {
        let open: Vec<&String> = racers
            .iter()
            .map(|(_, id)| id)
            .filter(|id| view.open.contains(*id))
            .collect();
        assert_eq!(open.len(), 1, "{client_id}: one racer left open");
        let winner = open[0].clone();
        eventually("every node lists the winner alone", || async {
            sole_holder(&nodes, client_id).await.as_ref() == Some(&winner)
        })
        .await;
        for (session, _) in racers.iter_mut().filter(|(_, id)| *id != winner) {
            session
                .expect_end(pb::GoodbyeReason::Replaced, Code::Aborted)
                .await;
        }
    }
    let closes_replaced = view
        .changes
        .iter()
        .filter(|change| change.1 == "closed" && racers.contains(&change.2))
        .all(|change| change.3 == pb::CloseReason::Replaced as i32);
    assert!(closes_replaced, "every loser closed as REPLACED");
}

/// The one session every node lists with `client_id`, if they agree on one.
async fn sole_holder(nodes: &[Node], client_id: &str) -> Option<String> {
    let mut holders = BTreeSet::new();
    for node in nodes {
        let of_id: Vec<String> = node
            .list()
            .await
            .2
            .into_iter()
            .filter(|session| session.client_id == client_id)
            .map(|session| session.session_id)
            .collect();
        if of_id.len() != 1 {
            return None;
        }
        holders.extend(of_id);
    }
    holders.pop_first().filter(|_| holders.is_empty())
}

/// Tests that a node joining while a replaced session's node is frozen (so
/// its close is never written) lists only the newer session, as the nodes
/// that saw the replacement do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_sees_a_replacement_whose_close_was_never_written() {
    let etcd = TestEtcd::start("join-after-replace");
    let frozen = Node::start(&etcd, "n1", 10);
    let follower = Node::start(&etcd, "n2", 10);
    let (_older, welcome) = RawSession::hello(frozen.addr, "worker-z").await;
    let older = welcome.session_id;
    eventually("listed on node 2", || async {
        follower.ids().await.contains(&older)
    })
    .await;
    signal(&frozen.child, "-STOP");
    let (_newer, welcome) = RawSession::hello(follower.addr, "worker-z").await;
    let newer = welcome.session_id;
    let expected = BTreeSet::from([newer.clone()]);
    eventually("node 2 lists only the newer", || async {
        follower.ids().await == expected
    })
    .await;
    let joined = Node::start(&etcd, "n3", 10);
    assert_eq!(joined.ids().await, expected, "the joining node's view");
    signal(&frozen.child, "-CONT");
}

/// Tests that the sessions of a SIGKILLed node are reported NODE_LOST on the
/// other nodes within the lease TTL and a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_sessions_are_node_lost_within_the_lease_ttl() {
    let _heavy = HEAVY.lock().await;
    const TTL: u64 = 2;
    let etcd = TestEtcd::start("node-lost");
    let doomed = Node::start(&etcd, "n1", TTL);
    let survivors = [2, 3].map(|n| Node::start(&etcd, &format!("n{n}"), TTL));
    let mut watches = synced_watches(&survivors).await;
    let mut sessions = Vec::new();
    for n in 0..5 {
        sessions.push(
            RawSession::hello(doomed.addr, &format!("doomed-{n}"))
                .await
                .0,
        );
    }
    for (watch, view) in &mut watches {
        view.until(watch, "opened", |view| view.open.len() == 5)
            .await;
    }
    let before = watches[0].1.revision;

    signal(&doomed.child, "-KILL");
    let killed = Instant::now();
    let mut losses = Vec::new();
    for (watch, view) in &mut watches {
        view.until(watch, "closed", |view| view.open.is_empty())
            .await;
        let after = killed.elapsed();
        assert!(
            after <= Duration::from_secs(TTL + 1),
            "NODE_LOST after {after:?}"
        );
        let lost: Vec<_> = view
            .changes
            .iter()
            .filter(|change| change.1 == "closed")
            .cloned()
            .collect();
        assert!(
            lost.iter()
                .all(|change| change.3 == pb::CloseReason::NodeLost as i32),
            "{lost:?}"
        );
        losses.push(lost);
    }
    // One lease expiry is one etcd revision, yet each session gets its own
    // revision, the same on every node.
    let revisions: BTreeSet<u64> = losses[0].iter().map(|change| change.0).collect();
    assert_eq!(revisions.len(), 5, "{:?}", losses[0]);
    assert_eq!(losses[0], losses[1]);
    // A watch resumed in the middle of the batch gets exactly the rest.
    let (epoch, middle) = (watches[0].1.epoch, losses[0][1].0);
    let mut resumed = survivors[1].watch(epoch, middle).await;
    let mut view = View {
        revision: middle,
        ..View::default()
    };
    view.until(&mut resumed, "the rest of the batch", |view| {
        view.epoch != 0
    })
    .await;
    assert_eq!(view.resets, 0);
    assert_eq!(view.changes, losses[0][2..]);
    assert!(losses[0][0].0 > before);
    drop(doomed);
}

/// Tests that a node drained with SIGTERM reports its sessions as
/// SERVER_SHUTDOWN to the other nodes (not NODE_LOST), and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_nodes_sessions_close_as_server_shutdown_everywhere() {
    let etcd = TestEtcd::start("drain");
    let mut leaving = Node::start(&etcd, "n1", 10);
    let staying = Node::start(&etcd, "n2", 10);
    let mut watch = staying.watch(0, 0).await;
    let mut view = View::default();
    view.until(&mut watch, "synced", |view| view.epoch != 0)
        .await;
    let mut sessions = Vec::new();
    for n in 0..5 {
        sessions.push(
            RawSession::hello(leaving.addr, &format!("drained-{n}"))
                .await
                .0,
        );
    }
    view.until(&mut watch, "opened", |view| view.open.len() == 5)
        .await;
    signal(&leaving.child, "-TERM");
    for session in &mut sessions {
        session
            .expect_end(pb::GoodbyeReason::ServerShutdown, Code::Unavailable)
            .await;
    }
    view.until(&mut watch, "closed", |view| view.open.is_empty())
        .await;
    let reasons: BTreeSet<i32> = view
        .changes
        .iter()
        .filter(|change| change.1 == "closed")
        .map(|change| change.3)
        .collect();
    assert_eq!(
        reasons,
        BTreeSet::from([pb::CloseReason::ServerShutdown as i32])
    );
    let status = exit_of(&mut leaving.0.child).await;
    assert!(status.success(), "a drained node exits 0");
}

/// Tests that a drain of thousands of sessions reaches every node as
/// SERVER_SHUTDOWN within a short shutdown grace: the closes are written
/// many to a transaction, where one transaction each would take longer than
/// the grace and leave the rest to be reported NODE_LOST. Also tests that a
/// watcher of the cluster that cannot keep up with the burst is counted as
/// lagged in its node's metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_drain_is_written_in_batches_within_the_grace() {
    let _heavy = HEAVY.lock().await;
    const SESSIONS: usize = 3_000;
    let etcd = TestEtcd::start("large-drain");
    let mut leaving = Node::start_with(&etcd, "n1", 10, &["--shutdown-grace", "1s"]);
    let staying = Node::start_with(&etcd, "n2", 10, &["--watch-queue", "10000"]);
    let metrics = free_port().to_string();
    let lagging = Node::start_with(
        &etcd,
        "n3",
        10,
        &["--watch-queue", "64", "--metrics-listen", &metrics],
    );
    let metrics = metrics.parse().expect("an address");
    assert_eq!(
        metric(metrics, "heartbeat_watchers_lagged_total ").await,
        0.0
    );
    // Opened on a small window, and never read.
    let small_windows = small_window_endpoint(&format!("http://{}", lagging.addr))
        .connect()
        .await
        .expect("connect");
    let _deaf = pb::presence_service_client::PresenceServiceClient::new(small_windows)
        .watch_sessions(pb::WatchSessionsRequest::default())
        .await
        .expect("WatchSessions");
    let mut watch = staying.watch(0, 0).await;
    let mut view = View::default();
    view.until(&mut watch, "synced", |view| view.epoch != 0)
        .await;
    let mut client = pb::heartbeat_service_client::HeartbeatServiceClient::connect(format!(
        "http://{}",
        leaving.addr
    ))
    .await
    .expect("connect");
    let mut sessions = Vec::new();
    for n in 0..SESSIONS {
        let mut session = RawSession::open_with(&mut client).await.expect("admitted");
        session.say_hello(&format!("drained-{n}")).await;
        sessions.push(session);
    }
    view.until(&mut watch, "every open", |view| view.open.len() == SESSIONS)
        .await;
    eventually("the deaf watcher is counted as lagged", || async {
        metric(metrics, "heartbeat_watchers_lagged_total ").await == 1.0
    })
    .await;
    signal(&leaving.child, "-TERM");
    view.until(&mut watch, "every close", |view| view.open.is_empty())
        .await;
    let lost = view
        .changes
        .iter()
        .filter(|change| change.1 == "closed")
        .filter(|change| change.3 != pb::CloseReason::ServerShutdown as i32)
        .count();
    assert_eq!(lost, 0, "every drained session closes as SERVER_SHUTDOWN");
    let status = exit_of(&mut leaving.0.child).await;
    assert!(status.success(), "a drained node exits 0");
    drop(sessions);
}

/// Tests that a watch dropped on node 2 resumes by revision on node 2, on
/// node 3, and on a node 4 that joined after that revision alike: the same
/// changes, nothing missed or repeated, no reset, and a view equal to
/// ListSessions on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_by_revision_on_any_node() {
    let etcd = TestEtcd::start("resume");
    let nodes = [1, 2, 3].map(|n| Node::start(&etcd, &format!("n{n}"), 10));
    let mut watch = nodes[1].watch(0, 0).await;
    let mut before = View::default();
    before
        .until(&mut watch, "synced", |view| view.epoch != 0)
        .await;
    let mut kept = Kept::new();
    churn(&nodes, "before", &mut kept).await;
    let expected = ids(&kept);
    before
        .until(&mut watch, "the first churn", |view| view.open == expected)
        .await;
    drop(watch);
    let (epoch, after) = (before.epoch, before.revision);

    churn(&nodes, "after", &mut kept).await;
    let (_, revision, _) = nodes[0].list().await;
    let joined = Node::start(&etcd, "n4", 10);
    let mut replays = Vec::new();
    for node in [&nodes[1], &nodes[2], &joined] {
        let mut watch = node.watch(epoch, after).await;
        let mut view = View {
            open: before.open.clone(),
            revision: after,
            ..View::default()
        };
        view.until(&mut watch, "the replay", |view| {
            view.revision >= revision && view.epoch != 0
        })
        .await;
        assert_eq!(view.resets, 0, "a resume within the history replays");
        assert!(view.changes.iter().all(|change| change.0 > after));
        let listed = node.ids().await;
        assert_eq!(view.open, listed, "the resumed view is the list");
        replays.push(view.changes);
    }
    assert_eq!(
        replays[0], replays[1],
        "node 2 and node 3 replay the same changes"
    );
    assert_eq!(
        replays[0], replays[2],
        "a node that joined later replays the same changes"
    );
    assert!(!replays[0].is_empty());
    drop(kept);
}

/// Tests that after etcd restarts on the same data directory, the nodes'
/// mirrors watch again from where they were: a watch on each of three nodes
/// sees every change of a churn across the nodes and the restart, without a
/// reset, and ends equal to ListSessions on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_rewatch_after_an_etcd_restart() {
    let mut etcd = TestEtcd::start("restart");
    // A lease long enough to outlive the restart.
    let nodes = [1, 2, 3].map(|n| Node::start(&etcd, &format!("n{n}"), 15));
    let mut watches = synced_watches(&nodes).await;
    let mut kept = Kept::new();
    churn(&nodes, "before", &mut kept).await;
    etcd.stop();
    // Opened while etcd is down: written, and watched, once it is back.
    for (n, node) in nodes.iter().enumerate() {
        let (session, welcome) = RawSession::hello(node.addr, &format!("while-down-{n}")).await;
        kept.push((session, welcome.session_id));
    }
    etcd.start_again();
    churn(&nodes, "after", &mut kept).await;
    let expected = ids(&kept);
    for (watch, view) in &mut watches {
        view.until(watch, "every change", |view| view.open == expected)
            .await;
        assert_eq!(view.resets, 0);
    }
    for node in &nodes {
        assert_eq!(node.ids().await, expected);
    }
    for (_, view) in &watches {
        let opened = view.changes.iter().filter(|c| c.1 == "opened").count();
        assert_eq!(opened, 63, "every open seen once");
    }
}

/// Tests that a node whose watch comes back after etcd compacted the
/// revisions it missed reads the cluster again: it lists what the other node
/// lists; it carries out what it missed for its own sessions (one whose
/// client id was taken on the other node is replaced, also when that node's
/// session let the id go again; one evicted through the other node is
/// evicted); and its watches end, to be resumed. Resumed there they get a
/// reset and the sessions as they are (its history lacks the changes);
/// resumed on the other node, a replay of each change with its reason. A
/// node that joins after the compaction, with no history left to replay,
/// lists the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_behind_a_compaction_reads_the_cluster_again() {
    let etcd = TestEtcd::start("compaction");
    let proxy = proxy::CutProxy::start(etcd.client).await;
    // A lease long enough to outlive the partition.
    let behind = Node::start_at(&format!("http://{}", proxy.addr), "n1", 15, &[]);
    let direct = Node::start(&etcd, "n2", 15);
    let mut watch = behind.watch(0, 0).await;
    let mut view = View::default();
    view.until(&mut watch, "synced", |view| view.epoch != 0)
        .await;
    let (mut goodbye, said_goodbye) = RawSession::hello(direct.addr, "goodbye").await;
    let (mut half_closed, was_half_closed) = RawSession::hello(direct.addr, "half-close").await;
    let (_kept, kept) = RawSession::hello(direct.addr, "kept").await;
    let (mut replaced, _) = RawSession::hello(behind.addr, "moves").await;
    let (mut evicted, doomed) = RawSession::hello(behind.addr, "doomed").await;
    let (mut lent, lent_id) = RawSession::hello(behind.addr, "borrowed").await;
    view.until(&mut watch, "every open", |view| view.open.len() == 6)
        .await;
    eventually("the other node lists them", || async {
        direct.ids().await.len() == 6
    })
    .await;

    proxy.pause();
    goodbye
        .send(pb::heartbeat_request::Frame::Goodbye(pb::Goodbye {
            reason: pb::GoodbyeReason::ClientShutdown.into(),
            ..Default::default()
        }))
        .await;
    goodbye.half_close();
    goodbye.ended().await;
    half_closed.half_close();
    half_closed.ended().await;
    let (_opened, opened) = RawSession::hello(direct.addr, "opened").await;
    let (_moved, moved) = RawSession::hello(direct.addr, "moves").await;
    // Taken (once the claim is in etcd) and let go again: no key names a
    // holder of it any more.
    let (mut borrower, borrower_id) = RawSession::hello(direct.addr, "borrowed").await;
    eventually("the other node shows the id taken", || async {
        let ids = direct.ids().await;
        ids.contains(&borrower_id.session_id) && !ids.contains(&lent_id.session_id)
    })
    .await;
    borrower.half_close();
    borrower.ended().await;
    direct
        .presence()
        .await
        .evict_session(pb::EvictSessionRequest {
            session_id: doomed.session_id.clone(),
            message: "while cut off".into(),
        })
        .await
        .expect("evict through the other node");
    let expected = BTreeSet::from([
        kept.session_id.clone(),
        opened.session_id.clone(),
        moved.session_id.clone(),
        doomed.session_id.clone(),
    ]);
    eventually("the other node lists the changes", || async {
        direct.ids().await == expected
    })
    .await;
    etcd.compact().await;
    let (epoch, revision_before) = (view.epoch, view.revision);
    proxy.resume();

    replaced
        .expect_end(pb::GoodbyeReason::Replaced, Code::Aborted)
        .await;
    lent.expect_end(pb::GoodbyeReason::Replaced, Code::Aborted)
        .await;
    let ended = evicted
        .expect_end(pb::GoodbyeReason::Evicted, Code::Aborted)
        .await;
    assert_eq!(ended.goodbye.expect("a goodbye").message, "while cut off");
    let after: BTreeSet<String> = expected
        .iter()
        .filter(|id| **id != doomed.session_id)
        .cloned()
        .collect();
    // The watch on the node that re-read the cluster ends, to be resumed.
    let ended = loop {
        match within(WAIT, watch.message()).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the watch ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("re-read the cluster"), "{ended:?}");
    // Resumed there: its history has not the changes, so a reset and the
    // sessions as they are.
    let mut resumed = behind.watch(epoch, revision_before).await;
    let mut again = View {
        revision: revision_before,
        ..View::default()
    };
    again
        .until(&mut resumed, "the same sessions", |view| {
            view.epoch != 0 && view.open == after
        })
        .await;
    assert_eq!(again.resets, 1, "a resume across a resync is a reset");
    // Resumed on the other node, which saw the changes: each of them, with
    // the reasons their node wrote, and no reset.
    let mut elsewhere = direct.watch(epoch, revision_before).await;
    let mut replayed = View {
        revision: revision_before,
        open: view.open.clone(),
        ..View::default()
    };
    replayed
        .until(&mut elsewhere, "the replay", |view| view.open == after)
        .await;
    assert_eq!(replayed.resets, 0);
    let closed = |id: &str| {
        replayed
            .changes
            .iter()
            .find(|change| change.1 == "closed" && change.2 == id)
            .map(|change| change.3)
    };
    assert_eq!(
        closed(&said_goodbye.session_id),
        Some(pb::CloseReason::ClientGoodbye as i32)
    );
    assert_eq!(
        closed(&was_half_closed.session_id),
        Some(pb::CloseReason::ClientHalfClose as i32)
    );
    eventually("both nodes list the same", || async {
        behind.ids().await == after && direct.ids().await == after
    })
    .await;
    // Joining after the compaction: no history to replay, the same list.
    let late = Node::start(&etcd, "n3", 15);
    assert_eq!(late.ids().await, after);
}

/// Tests that a node cut off from etcd ends its sessions with
/// Goodbye{SERVER_SHUTDOWN} before its lease could expire, and exits saying
/// it fenced itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_etcd_fences_its_sessions_before_its_lease_expires() {
    let _heavy = HEAVY.lock().await;
    const TTL: u64 = 3;
    let etcd = TestEtcd::start("fence");
    let mut node = Node::start(&etcd, "n1", TTL);
    let (mut session, _) = RawSession::hello(node.addr, "fenced").await;
    let frozen = Instant::now();
    etcd.freeze();
    let ended = session
        .expect_end(pb::GoodbyeReason::ServerShutdown, Code::Unavailable)
        .await;
    let after = frozen.elapsed();
    // The node fences when its lease (counted from its last confirmed
    // renewal, at most a tenth of the TTL before the freeze) has a fifth of
    // the TTL left: not before it must, and before the lease can expire.
    let ttl = Duration::from_secs(TTL);
    assert!(
        after >= ttl * 2 / 3,
        "fenced {after:?} after etcd froze: before the lease ran low"
    );
    assert!(
        after <= ttl - Duration::from_millis(250),
        "fenced {after:?} after etcd froze: too close to the lease's expiry"
    );
    drop(ended);
    let status = exit_of(&mut node.0.child).await;
    assert!(!status.success(), "a fenced node exits with an error");
}

/// A fresh watch on each of `nodes`, each read until it is synced.
async fn synced_watches(nodes: &[Node]) -> Vec<(Streaming<pb::WatchSessionsResponse>, View)> {
    let mut watches = Vec::new();
    for node in nodes {
        let mut watch = node.watch(0, 0).await;
        let mut view = View::default();
        view.until(&mut watch, "synced", |view| view.epoch != 0)
            .await;
        watches.push((watch, view));
    }
    watches
}

/// Sessions a test keeps open, with their ids.
type Kept = Vec<(RawSession, String)>;

/// Opens 30 sessions spread over `nodes` and ends 20 of them (by goodbye
/// and by half-close), adding the 10 left open to `kept`; returns once every
/// node lists exactly the kept sessions.
async fn churn(nodes: &[Node], round: &str, kept: &mut Kept) {
    let mut open = Vec::new();
    for n in 0..30 {
        let node = &nodes[n % nodes.len()];
        let (session, welcome) = RawSession::hello(node.addr, &format!("churn-{round}-{n}")).await;
        open.push((session, welcome.session_id));
    }
    for (n, (mut session, _)) in open.drain(..20).enumerate() {
        if n % 2 == 0 {
            session
                .send(pb::heartbeat_request::Frame::Goodbye(pb::Goodbye {
                    reason: pb::GoodbyeReason::ClientShutdown.into(),
                    ..Default::default()
                }))
                .await;
        }
        session.half_close();
        session.ended().await;
    }
    kept.extend(open);
    let expected = ids(kept);
    for node in nodes {
        eventually("every node lists the kept sessions", || async {
            node.ids().await == expected
        })
        .await;
    }
}

fn ids(kept: &Kept) -> BTreeSet<String> {
    kept.iter().map(|(_, id)| id.clone()).collect()
}

/// Answers the server's pings and pings it once: proof that `session` is
/// still open (it fails on a goodbye or the stream's end), which also keeps
/// a raw session from timing out during a long test.
async fn still_open(session: &mut RawSession, seq: u64) {
    session
        .send(pb::heartbeat_request::Frame::Ping(pb::Ping { seq }))
        .await;
    loop {
        match session.next_frame().await {
            Some(pb::heartbeat_response::Frame::Pong(pong)) if pong.seq == seq => return,
            Some(pb::heartbeat_response::Frame::Ping(ping)) => {
                session
                    .send(pb::heartbeat_request::Frame::Pong(pb::Pong {
                        seq: ping.seq,
                    }))
                    .await;
            }
            Some(pb::heartbeat_response::Frame::Goodbye(goodbye)) => {
                panic!("the session ended: {goodbye:?}")
            }
            _ => {}
        }
    }
}

/// Runs `heartbeat bench` against `node`: `sessions` open at 5,000 a
/// second, run a second, and close (the bench half-closes them all).
async fn bench_churn(node: &Node, sessions: usize, prefix: &str) {
    let url = format!("http://{}", node.addr);
    let sessions = sessions.to_string();
    let prefix = prefix.to_owned();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_heartbeat"))
            .args(["bench", &url, "--sessions", &sessions, "--rate", "5000"])
            .args(["--duration", "1s", "--client-id-prefix", &prefix])
            .args(["--output", "json"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run heartbeat bench")
    })
    .await
    .expect("the bench's thread");
    assert!(status.success(), "heartbeat bench failed: {status}");
}

/// The health status of `service` on the server at `addr`.
async fn health_of(addr: std::net::SocketAddr, service: &str) -> i32 {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("a URL")
        .connect()
        .await
        .expect("connect");
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("Health.Check")
        .into_inner()
        .status
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// Tests that the nodes compact etcd themselves: 20,000 session lives go
/// through an etcd with an 8 MiB quota without raising its NOSPACE alarm,
/// and the nodes still replicate after. With `--etcd-compaction off` etcd
/// runs out of space within the churn (tried: the churn's closes then never
/// reach node 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_a_churning_cluster_within_etcd_quota() {
    let _heavy = HEAVY.lock().await;
    const QUOTA: u64 = 8 * 1024 * 1024;
    let quota = QUOTA.to_string();
    let etcd = TestEtcd::start_with("quota-churn", &["--quota-backend-bytes", &quota]);
    let flags = ["--watch-history", "20"];
    let metrics = free_port();
    let busy = Node::start_with(
        &etcd,
        "n1",
        10,
        &[&flags[..], &["--metrics-listen", &metrics.to_string()]].concat(),
    );
    let other = Node::start_with(&etcd, "n2", 10, &flags);
    for round in 0..4 {
        bench_churn(&busy, 5_000, &format!("churn-{round}")).await;
        eventually("the churn is closed on node 2", || async {
            other.ids().await.is_empty()
        })
        .await;
        let alarms = etcd.alarms().await;
        assert!(
            !alarms.contains("NOSPACE"),
            "round {round}: etcd is full: {alarms}"
        );
    }
    let (db_size, _) = etcd.status().await;
    assert!(db_size < QUOTA, "etcd's database is {db_size} bytes");
    assert!(metric(metrics, "heartbeat_cluster_compactions_total ").await >= 1.0);
    let (_session, welcome) = RawSession::hello(busy.addr, "after-the-churn").await;
    eventually("node 2 still sees node 1's sessions", || async {
        other.ids().await.contains(&welcome.session_id)
    })
    .await;
    let failures = metric(
        metrics,
        "heartbeat_cluster_write_failures_total{error=\"nospace\"} ",
    )
    .await;
    assert_eq!(failures, 0.0, "no write was refused for space");
}

/// Tests that an etcd out of space (its live data over its quota) ends no
/// session: the node's writes fail, counted as `nospace`, its
/// `heartbeat.v1.Cluster` health turns NOT_SERVING while the empty name
/// stays SERVING, and once the operator frees etcd every change that
/// waited reaches it and the views converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_out_of_space_ends_no_session_and_recovers() {
    let _heavy = HEAVY.lock().await;
    let etcd = TestEtcd::start_with("nospace", &["--quota-backend-bytes", "8388608"]);
    let metrics = free_port();
    let writer = Node::start_with(&etcd, "n1", 10, &["--metrics-listen", &metrics.to_string()]);
    let reader = Node::start(&etcd, "n2", 10);
    let (mut before, welcome) = RawSession::hello(writer.addr, "before").await;
    eventually("node 2 lists the first session", || async {
        reader.ids().await.contains(&welcome.session_id)
    })
    .await;
    assert_eq!(
        health_of(writer.addr, "heartbeat.v1.Cluster").await,
        SERVING
    );
    assert!(etcd.fill().await > 0);
    // Anonymous: its open is a plain put, which a full etcd refuses (etcd
    // 3.4 lets a claim of a client id through, nested in a transaction).
    let (mut during, opened) = RawSession::hello(writer.addr, "").await;
    let nospace = "heartbeat_cluster_write_failures_total{error=\"nospace\"} ";
    eventually("the failed write is counted as nospace", || async {
        metric(metrics, nospace).await >= 1.0
    })
    .await;
    eventually("the cluster health turns NOT_SERVING", || async {
        health_of(writer.addr, "heartbeat.v1.Cluster").await == NOT_SERVING
    })
    .await;
    assert_eq!(health_of(writer.addr, "").await, SERVING);
    still_open(&mut before, 1).await;
    still_open(&mut during, 1).await;
    assert!(!reader.ids().await.contains(&opened.session_id));

    etcd.free_space().await;
    eventually(
        "node 2 lists the session opened while etcd was full",
        || async { reader.ids().await.contains(&opened.session_id) },
    )
    .await;
    eventually("the cluster health recovers", || async {
        health_of(writer.addr, "heartbeat.v1.Cluster").await == SERVING
    })
    .await;
    still_open(&mut before, 2).await;
    still_open(&mut during, 2).await;
    eventually("the views converge", || async {
        reader.ids().await == writer.ids().await
    })
    .await;
}

/// Tests that ten 5 s stalls of etcd (SIGSTOP, as a leader election or a
/// slow disk looks) fence no node with the default 10 s lease: a session
/// on the node stays open through all of them, and the node's changes
/// reach the other node after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_stalls_shorter_than_the_lease_never_fence() {
    let _heavy = HEAVY.lock().await;
    let etcd = TestEtcd::start("stalls");
    let stalled = Node::start(&etcd, "n1", 10);
    let other = Node::start(&etcd, "n2", 10);
    let (mut session, _) = RawSession::hello(stalled.addr, "through-the-stalls").await;
    for trial in 1..=10 {
        etcd.freeze();
        tokio::time::sleep(Duration::from_secs(5)).await;
        etcd.thaw();
        still_open(&mut session, trial).await;
        let (_probe, welcome) = RawSession::hello(stalled.addr, &format!("probe-{trial}")).await;
        eventually("the node's changes flow again", || async {
            other.ids().await.contains(&welcome.session_id)
        })
        .await;
    }
    still_open(&mut session, 11).await;
}

/// Tests that two nodes compacting the same etcd at once is harmless:
/// compactions happen (counted only when they compacted something), and
/// watchers on both nodes follow every change with no reset and no cut-off
/// while views stay equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_compacting_at_once_is_harmless() {
    let _heavy = HEAVY.lock().await;
    let etcd = TestEtcd::start("two-compactors");
    let (first, second) = (free_port(), free_port());
    let flags = |metrics: std::net::SocketAddr| {
        vec![
            "--watch-history".to_owned(),
            "40".to_owned(),
            "--metrics-listen".to_owned(),
            metrics.to_string(),
        ]
    };
    let start = |id, metrics| {
        let flags = flags(metrics);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Node::start_with(&etcd, id, 10, &flags)
    };
    let nodes = [start("n1", first), start("n2", second)];
    let mut watches = synced_watches(&nodes).await;
    let mut kept = Kept::new();
    for round in 0..8 {
        churn(&nodes, &format!("c{round}"), &mut kept).await;
    }
    let compactions = metric(first, "heartbeat_cluster_compactions_total ").await
        + metric(second, "heartbeat_cluster_compactions_total ").await;
    assert!(compactions >= 2.0, "{compactions} compactions");
    let expected = ids(&kept);
    for (watch, view) in &mut watches {
        view.until(watch, "every kept session", |view| view.open == expected)
            .await;
        assert_eq!(view.resets, 0, "no watcher was reset");
    }
    for node in &nodes {
        assert_eq!(node.ids().await, expected);
    }
}

/// Tests that an outage longer than the writer's queue costs no session:
/// with `--max-sessions 6000` the queue holds 71,536 changes, and 80,000
/// changes of churn come while etcd is full. Before, the queue overflowed
/// and the node fenced itself, ending every session; now the waiting
/// changes fold to one per session, and once etcd is freed the views
/// converge on the sessions that are open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_with_churn_fences_no_node() {
    let _heavy = HEAVY.lock().await;
    let etcd = TestEtcd::start_with("long-outage", &["--quota-backend-bytes", "8388608"]);
    let writer = Node::start_with(&etcd, "n1", 10, &["--max-sessions", "6000"]);
    let reader = Node::start(&etcd, "n2", 10);
    let (mut canary, welcome) = RawSession::hello(writer.addr, "canary").await;
    eventually("node 2 lists the canary", || async {
        reader.ids().await.contains(&welcome.session_id)
    })
    .await;
    assert!(etcd.fill().await > 0);
    for round in 0..8 {
        bench_churn(&writer, 5_000, &format!("outage-{round}")).await;
        still_open(&mut canary, round + 1).await;
    }
    let (_late, opened) = RawSession::hello(writer.addr, "").await;
    etcd.free_space().await;
    // A retry pause of up to 5 s, then thousands of waiting changes.
    let catch_up = Duration::from_secs(30);
    eventually_within(catch_up, "node 2 lists the session opened last", || async {
        reader.ids().await.contains(&opened.session_id)
    })
    .await;
    eventually_within(
        catch_up,
        "the views converge on the open sessions",
        || async { reader.ids().await.len() == 2 && reader.ids().await == writer.ids().await },
    )
    .await;
    still_open(&mut canary, 100).await;
}
