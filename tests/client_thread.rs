//! The default client runs on a thread of its own; dropping it ends the thread.
//! A test binary of its own, so no other test's client threads are counted.

mod support;

use std::time::Duration;

use support::*;
use tonic_heartbeat::{Client, CloseReason};

/// Threads of this process named like the client's.
fn client_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("procfs")
        .filter_map(Result::ok)
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.trim() == "hb-client")
        })
        .count()
}

/// Tests that a client runs on one thread of its own, and that dropping it
/// says goodbye and ends that thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_client_ends_its_thread() {
    let server = TestServer::start(fast_config()).await;
    let mut registry = server.handle.subscribe();
    assert_eq!(client_threads(), 0);
    let client = Client::builder(server.url())
        .client_id("dropped")
        .close_timeout(Duration::from_secs(2))
        .connect()
        .expect("valid");
    let session_id = client.live().await.expect("live");
    assert_eq!(client_threads(), 1);
    drop(client);
    let (reason, _) = closed(&mut registry, &session_id).await;
    assert_eq!(reason, CloseReason::ClientGoodbye);
    within(WAIT, async {
        while client_threads() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
}
