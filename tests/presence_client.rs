//! The library's presence client: a `Watcher` that outlives its streams and a
//! `PresenceView` that ends equal to what the server lists.

mod support;

use std::{collections::BTreeSet, time::Duration};

use support::*;
use tonic::{
    transport::{Channel, Endpoint},
    Code,
};
use tonic_heartbeat::{
    client::{Backoff, Client},
    error::PresenceError,
    presence::{PresenceClient, PresenceView, SessionFilter, WatchEvent, Watcher},
    registry::SessionEvent,
    ServerConfig,
};

/// A channel that connects on first use and reconnects after a restart.
fn lazy_channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect_lazy()
}

/// A client that reconnects quickly, on this test's runtime.
fn client(url: &str, client_id: &str) -> Client {
    let backoff = Backoff::try_new(
        Duration::from_millis(20),
        Duration::from_millis(200),
        Duration::from_secs(30),
    )
    .expect("valid backoff");
    Client::builder(url)
        .client_id(client_id)
        .backoff(backoff)
        .spawn_on(tokio::runtime::Handle::current())
        .connect()
        .expect("client")
}

/// The session ids a view holds, and those the server lists now.
async fn view_and_list(
    view: &PresenceView,
    presence: &PresenceClient,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let listed = presence
        .list(&SessionFilter::default())
        .await
        .expect("list");
    let ids = |sessions: Vec<&tonic_heartbeat::presence::SessionInfo>| {
        sessions
            .into_iter()
            .map(|session| session.identity.session_id.clone())
            .collect::<BTreeSet<_>>()
    };
    (
        ids(view.sessions().collect()),
        ids(listed.sessions.iter().collect()),
    )
}

/// Applies events to `view` until it is synced and holds exactly what the
/// server lists, with `want` sessions; returns every event seen.
async fn until_view_matches(
    watcher: &mut Watcher,
    view: &mut PresenceView,
    presence: &PresenceClient,
    want: usize,
) -> Vec<WatchEvent> {
    let mut seen = Vec::new();
    within(WAIT, async {
        loop {
            let event = watcher.next().await.expect("no permanent error");
            view.apply(&event);
            seen.push(event);
            if view.is_synced() && view.len() == want {
                let (held, listed) = view_and_list(view, presence).await;
                if held == listed {
                    return;
                }
            }
        }
    })
    .await;
    seen
}

/// Tests that a watcher resumes by itself across a server restart: it is
/// told to reset (the epoch changed), and its view ends equal to the new
/// server's ListSessions once the clients have reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_survives_a_server_restart() {
    let config = ServerConfig {
        reconnect_after: Duration::from_millis(50),
        ..fast_config()
    };
    let first = TestServer::start(config.clone()).await;
    let (addr, url) = (first.addr, first.url());
    let clients: Vec<Client> = ["w1", "w2", "w3"]
        .iter()
        .map(|id| client(&url, id))
        .collect();
    let presence = PresenceClient::new(lazy_channel(&url));
    let mut watcher = presence.watch(SessionFilter::default());
    let mut view = PresenceView::default();
    until_view_matches(&mut watcher, &mut view, &presence, 3).await;
    let first_epoch = view.epoch();
    assert_eq!(first_epoch, first.handle.registry().epoch());

    first.shutdown().await.expect("clean shutdown");
    let second = TestServer::start_at(addr, config).await;
    let seen = until_view_matches(&mut watcher, &mut view, &presence, 3).await;

    assert!(
        seen.iter()
            .any(|e| matches!(e, WatchEvent::Interrupted { .. })),
        "the watch was interrupted: {seen:?}"
    );
    assert!(
        seen.iter().any(|e| matches!(e, WatchEvent::Reset { .. })),
        "a new epoch means a reset: {seen:?}"
    );
    assert_eq!(view.epoch(), second.handle.registry().epoch());
    assert_ne!(view.epoch(), first_epoch);
    let clients_seen: BTreeSet<&str> = view
        .sessions()
        .map(|session| session.identity.client_id.as_str())
        .collect();
    assert_eq!(clients_seen, BTreeSet::from(["w1", "w2", "w3"]));
    for client in clients {
        client.close().await.expect("close");
    }
}

/// Tests that a watcher cut off for lagging resumes from its last revision
/// with a replay: no reset, and every change exactly once, with consecutive
/// revisions across the break.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_watcher_resumes_with_a_replay() {
    let config = ServerConfig {
        watch_queue: 8,
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let presence = PresenceClient::new(small_window_endpoint(&server.url()).connect_lazy());
    let mut watcher = presence.watch(SessionFilter::default());
    let mut view = PresenceView::default();
    let first = within(WAIT, watcher.next()).await.expect("synced");
    let WatchEvent::Synced { revision, .. } = first else {
        panic!("an empty server starts with synced, got {first:?}");
    };
    view.apply(&first);

    // About 1 MB of events: well past hyper's send buffer and the queues.
    let rounds = 250;
    churn_large_sessions(server.addr, rounds).await;

    let mut expected = revision + 1;
    let mut lagged = false;
    within(WAIT, async {
        while expected <= revision + 2 * rounds as u64 {
            let event = watcher.next().await.expect("no permanent error");
            view.apply(&event);
            match event {
                WatchEvent::Change(change) => {
                    assert_eq!(change.revision, expected, "no gap, no duplicate");
                    expected += 1;
                    assert!(matches!(
                        change.event,
                        SessionEvent::Opened(_) | SessionEvent::Closed { .. }
                    ));
                }
                WatchEvent::Interrupted {
                    error: PresenceError::Status(status),
                    resume_after,
                    ..
                } => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert_eq!(resume_after, expected - 1);
                    lagged = true;
                }
                WatchEvent::Synced { .. } => {}
                other => panic!("a replay needs no {other:?}"),
            }
        }
    })
    .await;
    assert!(lagged, "the watcher was cut off for lagging");
    assert!(view.is_empty(), "every session closed: {view:?}");
    let (held, listed) = view_and_list(&view, &presence).await;
    assert_eq!(held, listed);
}
