//! Rotation (the contract's "Rotation"): a session that reaches the server's
//! maximum age is asked to move with `Goodbye{ROTATE}` and keeps its stream
//! for the grace; the Rust client moves make-before-break, so presence never
//! shows its client id missing; a client that ignores the ask is ended as
//! ROTATED; and sessions that come of age together are asked one by one.

mod support;

use std::time::Duration;

use support::*;
use tonic::Code;
use tonic_heartbeat::{
    client::{Client, ClientEvent},
    protocol::pb::{self, heartbeat_response::Frame as Out},
    registry::SessionEvent,
    CloseReason, ServerConfig,
};

fn rotating(age: Duration, grace: Duration) -> ServerConfig {
    ServerConfig {
        max_session_age: Some(age),
        rotation_grace: grace,
        ..fast_config()
    }
}

/// Tests make-before-break with the Rust client: after its session's age,
/// presence shows the successor opened before the old session closed as
/// REPLACED, the client reports `Rotated` and never `Lost`, and its client
/// id is in every snapshot throughout.
#[tokio::test]
async fn the_client_rotates_before_it_breaks() {
    let server =
        TestServer::start(rotating(Duration::from_millis(500), Duration::from_secs(5))).await;
    let mut sessions = server.handle.subscribe();
    let client = Client::builder(server.url())
        .client_id("rotor")
        .connect()
        .expect("client");
    let mut events = client.events();
    let first = within(WAIT, client.live()).await.expect("live");
    // Twice over, to see that a successor rotates in turn.
    let mut current = first.clone();
    for _ in 0..2 {
        let (from, to) = loop {
            match within(WAIT, events.next()).await.expect("an event") {
                ClientEvent::Rotated { from, to, .. } => break (from, to),
                ClientEvent::Lost { reason } => panic!("the client lost its session: {reason:?}"),
                _ => {}
            }
        };
        assert_eq!(from, current);
        // The registry saw the successor open, then the old one replaced.
        let mut opened_successor = false;
        loop {
            let change = next_change(&mut sessions).await;
            match &change.event {
                SessionEvent::Opened(session) if session.identity.session_id == to => {
                    opened_successor = true;
                }
                SessionEvent::Closed {
                    session, reason, ..
                } if session.identity.session_id == from => {
                    assert!(
                        opened_successor,
                        "the old session closed before its successor opened"
                    );
                    assert_eq!(*reason, CloseReason::Replaced);
                    break;
                }
                _ => {}
            }
            let ids = server.client_ids();
            assert!(ids.contains(&"rotor".to_owned()), "rotor missing: {ids:?}");
        }
        current = to;
    }
    client.close().await.expect("close");
    server.shutdown().await.expect("clean shutdown");
}

/// Tests a client that ignores ROTATE: it gets `Goodbye{ROTATE}` with
/// `reconnect_after` 0 and its stream stays open (pings continue) through
/// the grace, then a second `Goodbye{ROTATE}` and `UNAVAILABLE`, recorded as
/// ROTATED; not before the age, and not before the grace is over.
#[tokio::test]
async fn a_client_that_ignores_rotate_is_ended_as_rotated() {
    let age = Duration::from_millis(400);
    let grace = Duration::from_millis(600);
    let server = TestServer::start(rotating(age, grace)).await;
    let mut sessions = server.handle.subscribe();
    let (mut session, welcome) = RawSession::hello(server.addr, "stubborn").await;
    let opened = tokio::time::Instant::now();
    let asked = loop {
        match within(WAIT, session.next_frame()).await {
            Some(Out::Ping(ping)) => {
                session
                    .send(pb::heartbeat_request::Frame::Pong(pb::Pong {
                        seq: ping.seq,
                    }))
                    .await
            }
            Some(Out::Goodbye(goodbye)) => {
                assert_eq!(goodbye.reason(), pb::GoodbyeReason::Rotate);
                assert_eq!(
                    goodbye.reconnect_after,
                    Some(tonic_heartbeat::protocol::duration_to_proto(Duration::ZERO))
                );
                break tokio::time::Instant::now();
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    // ±10 % of the age.
    // Timed where the frames arrive: a little slack either way.
    let slack = Duration::from_millis(50);
    assert!(
        asked - opened + slack >= age.mul_f64(0.9),
        "asked after {:?}",
        asked - opened
    );
    // Still open: the server keeps pinging, and pongs are taken.
    let mut pings_in_grace = 0;
    let ended = loop {
        match within(WAIT, session.inbound.message()).await {
            Ok(Some(pb::HeartbeatResponse {
                frame: Some(Out::Ping(ping)),
            })) => {
                pings_in_grace += 1;
                session
                    .send(pb::heartbeat_request::Frame::Pong(pb::Pong {
                        seq: ping.seq,
                    }))
                    .await;
            }
            Ok(Some(pb::HeartbeatResponse {
                frame: Some(Out::Goodbye(goodbye)),
            })) => {
                assert_eq!(goodbye.reason(), pb::GoodbyeReason::Rotate);
                let end = session.ended().await;
                assert_eq!(end.status.code(), Code::Unavailable, "{:?}", end.status);
                break end.at;
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(
        pings_in_grace >= 3,
        "{pings_in_grace} pings in a {grace:?} grace at 100 ms"
    );
    assert!(
        ended - asked + slack >= grace,
        "ended {:?} after the ask",
        ended - asked
    );
    assert_eq!(
        closed(&mut sessions, &welcome.session_id).await.0,
        CloseReason::Rotated
    );
    server.shutdown().await.expect("clean shutdown");
}

/// Tests the pace: 1,000 sessions coming of age at once are asked to rotate
/// at most 500 per second (the limit set here), spread over two seconds,
/// never as a herd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_keep_to_the_rate_limit() {
    const SESSIONS: usize = 1000;
    const RATE: usize = 500;
    let server = TestServer::start(ServerConfig {
        max_session_age: Some(Duration::from_secs(1)),
        max_rotations_per_second: u32::try_from(RATE).expect("small"),
        // Long enough that no session is suspect, or ends, before its ask
        // (a suspect session is not asked); the sessions stay silent.
        ping_interval: Duration::from_secs(2),
        suspect_after: Some(Duration::from_secs(15)),
        timeout: Duration::from_secs(20),
        min_ping_interval: Duration::from_millis(100),
        ..ServerConfig::default()
    })
    .await;
    let mut client = pb::heartbeat_service_client::HeartbeatServiceClient::connect(server.url())
        .await
        .expect("connect");
    let (asked, mut asks) = tokio::sync::mpsc::unbounded_channel();
    for n in 0..SESSIONS {
        let mut session = RawSession::open_with(&mut client).await.expect("open");
        session.say_hello(&format!("aged-{n}")).await;
        let asked = asked.clone();
        tokio::spawn(async move {
            while let Some(frame) = session.next_frame().await {
                if let Out::Goodbye(goodbye) = frame {
                    if goodbye.reason() == pb::GoodbyeReason::Rotate {
                        let _ = asked.send(tokio::time::Instant::now());
                        return;
                    }
                }
            }
        });
    }
    drop(asked);
    let mut times = Vec::new();
    while times.len() < SESSIONS {
        let at = within(Duration::from_secs(15), asks.recv())
            .await
            .expect("an ask");
        times.push(at);
    }
    times.sort();
    let spread = times[SESSIONS - 1] - times[0];
    assert!(
        spread >= Duration::from_millis(1900),
        "{SESSIONS} asks within {spread:?}"
    );
    // No one-second window holds more than the limit.
    for (i, start) in times.iter().enumerate() {
        let within_second = times[i..]
            .iter()
            .take_while(|at| **at - *start < Duration::from_secs(1))
            .count();
        // Timed where the asks arrive: a few may bunch on the way.
        assert!(
            within_second <= RATE + RATE / 20,
            "{within_second} asks in one second from ask {i}"
        );
    }
    let metrics = server.handle.metrics().render(false).0;
    assert!(
        metrics.contains(&format!("heartbeat_rotations_total {SESSIONS}\n")),
        "{metrics}"
    );
    server.shutdown().await.expect("clean shutdown");
}

/// Tests an anonymous client (empty client id), which no successor's Hello
/// can replace: it rotates, and leaves its old session itself
/// (CLIENT_GOODBYE), rather than letting it run out the grace as ROTATED.
#[tokio::test]
async fn an_anonymous_client_leaves_its_old_session() {
    let server =
        TestServer::start(rotating(Duration::from_millis(500), Duration::from_secs(5))).await;
    let mut sessions = server.handle.subscribe();
    let client = Client::builder(server.url()).connect().expect("client");
    let mut events = client.events();
    let first = within(WAIT, client.live()).await.expect("live");
    let to = loop {
        match within(WAIT, events.next()).await.expect("an event") {
            ClientEvent::Rotated { from, to, .. } => {
                assert_eq!(from, first);
                break to;
            }
            ClientEvent::Lost { reason } => panic!("lost: {reason:?}"),
            _ => {}
        }
    };
    assert_ne!(to, first);
    let (reason, _) = within(Duration::from_secs(2), closed(&mut sessions, &first)).await;
    assert_eq!(reason, CloseReason::ClientGoodbye);
    client.close().await.expect("close");
    server.shutdown().await.expect("clean shutdown");
}

/// Tests that a silent client is not asked to rotate: its silence is for
/// suspicion and the timeout to judge, so it never hears ROTATE and ends as
/// TIMEOUT, even with an age past its suspicion and a grace shorter than its
/// timeout.
#[tokio::test]
async fn a_silent_client_times_out_rather_than_rotating() {
    let server = TestServer::start(ServerConfig {
        max_session_age: Some(Duration::from_millis(400)),
        rotation_grace: Duration::from_millis(100),
        ping_interval: Duration::from_millis(100),
        suspect_after: Some(Duration::from_millis(200)),
        timeout: Duration::from_millis(800),
        min_ping_interval: Duration::from_millis(20),
        ..ServerConfig::default()
    })
    .await;
    let mut sessions = server.handle.subscribe();
    let (mut session, welcome) = RawSession::hello(server.addr, "silent").await;
    let mut goodbyes = Vec::new();
    loop {
        match within(WAIT, session.inbound.message()).await {
            Ok(Some(pb::HeartbeatResponse {
                frame: Some(Out::Goodbye(goodbye)),
            })) => goodbyes.push(goodbye.reason()),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    assert_eq!(
        goodbyes,
        [pb::GoodbyeReason::Timeout],
        "never asked to rotate"
    );
    assert_eq!(
        closed(&mut sessions, &welcome.session_id).await.0,
        CloseReason::Timeout
    );
    server.shutdown().await.expect("clean shutdown");
}
