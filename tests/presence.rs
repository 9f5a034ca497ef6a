//! The operator's view: PresenceService, the admin token, health, reflection,
//! metrics and `heartbeat sessions`, against real servers.

mod support;

use std::{
    collections::HashSet,
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{transport::Channel, Code, Request, Status, Streaming};
use tonic_heartbeat::{
    config::AdminToken,
    protocol::pb::{
        self, heartbeat_request::Frame as In, presence_service_client::PresenceServiceClient,
        watch_sessions_response::Event, CloseReason, GoodbyeReason,
    },
    ServerConfig,
};

async fn presence(addr: SocketAddr) -> PresenceServiceClient<Channel> {
    PresenceServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

fn watch_request(resume_epoch: u64, resume_after: u64) -> pb::WatchSessionsRequest {
    pb::WatchSessionsRequest {
        resume_epoch,
        resume_after,
        ..Default::default()
    }
}

async fn watch(
    client: &mut PresenceServiceClient<Channel>,
    request: pb::WatchSessionsRequest,
) -> Streaming<pb::WatchSessionsResponse> {
    within(WAIT, client.watch_sessions(request))
        .await
        .expect("watch accepted")
        .into_inner()
}

async fn next_event(
    stream: &mut Streaming<pb::WatchSessionsResponse>,
) -> pb::WatchSessionsResponse {
    within(WAIT, stream.message())
        .await
        .expect("watch open")
        .expect("watch not ended")
}

/// Reads the watch to its end and returns the status it ended with (OK if it
/// just stopped).
async fn watch_end(stream: &mut Streaming<pb::WatchSessionsResponse>) -> Status {
    within(WAIT, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => break Status::ok(""),
                Err(status) => break status,
            }
        }
    })
    .await
}

/// Reads events until `synced`; returns the events before it and the marker.
async fn until_synced(
    stream: &mut Streaming<pb::WatchSessionsResponse>,
) -> (Vec<pb::WatchSessionsResponse>, pb::Synced) {
    let mut before = Vec::new();
    loop {
        let event = next_event(stream).await;
        if let Some(Event::Synced(synced)) = event.event {
            return (before, synced);
        }
        before.push(event);
    }
}

fn session_of(event: &pb::WatchSessionsResponse) -> Option<&pb::Session> {
    match event.event.as_ref()? {
        Event::Opened(session) => Some(session),
        Event::Closed(closed) => closed.session.as_ref(),
        Event::Suspected(suspected) => suspected.session.as_ref(),
        Event::Recovered(recovered) => recovered.session.as_ref(),
        Event::Synced(_) | Event::Reset(_) => None,
    }
}

/// Waits for the close of a session matching `pick` and returns its reason.
async fn closed_via_watch(
    stream: &mut Streaming<pb::WatchSessionsResponse>,
    pick: impl Fn(&pb::Session) -> bool,
) -> CloseReason {
    loop {
        let event = next_event(stream).await;
        if let Some(Event::Closed(closed)) = &event.event {
            if closed.session.as_ref().is_some_and(&pick) {
                return closed.reason();
            }
        }
    }
}

async fn opened_via_watch(
    stream: &mut Streaming<pb::WatchSessionsResponse>,
    client_id: &str,
) -> pb::Session {
    loop {
        if let Some(Event::Opened(session)) = next_event(stream).await.event {
            if session.client_id == client_id {
                return session;
            }
        }
    }
}

/// Tests that ListSessions filters by client id and by all given labels, and
/// reports a non-zero epoch and the current revision.
#[tokio::test]
async fn list_sessions_filters_by_client_id_and_labels() {
    let server = TestServer::start(fast_config()).await;
    let _a = RawSession::hello_with(server.addr, "a", &[("zone", "eu"), ("role", "db")]).await;
    let _b = RawSession::hello_with(server.addr, "b", &[("zone", "us")]).await;
    let _c = RawSession::hello_with(server.addr, "c", &[("zone", "eu")]).await;
    let mut client = presence(server.addr).await;
    let list = |client_id: &str, labels: &[(&str, &str)]| pb::ListSessionsRequest {
        client_id: client_id.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let ids = |response: pb::ListSessionsResponse| -> HashSet<String> {
        response.sessions.into_iter().map(|s| s.client_id).collect()
    };
    let all = client
        .list_sessions(list("", &[]))
        .await
        .expect("list")
        .into_inner();
    assert_ne!(all.epoch, 0);
    assert_eq!(all.revision, 3);
    assert_eq!(
        ids(all),
        HashSet::from(["a".into(), "b".into(), "c".into()])
    );
    let eu = client
        .list_sessions(list("", &[("zone", "eu")]))
        .await
        .expect("list");
    assert_eq!(
        ids(eu.into_inner()),
        HashSet::from(["a".into(), "c".into()])
    );
    let eu_db = client
        .list_sessions(list("", &[("zone", "eu"), ("role", "db")]))
        .await
        .expect("list");
    assert_eq!(ids(eu_db.into_inner()), HashSet::from(["a".into()]));
    let b = client.list_sessions(list("b", &[])).await.expect("list");
    let sessions = b.into_inner().sessions;
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        sessions[0].labels.get("zone").map(String::as_str),
        Some("us")
    );
    assert!(sessions[0].peer.starts_with("127.0.0.1:"));
    assert_eq!(sessions[0].state(), pb::SessionState::Live);
}

/// Tests that a watch started in the middle of heavy churn sees a snapshot,
/// one synced marker, then consecutive revisions with no gap and no duplicate,
/// and ends up agreeing with ListSessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_under_churn_agrees_with_list() {
    // Timing long enough that no kept session turns suspect, however slowly
    // the churn runs next to other tests.
    let config = ServerConfig {
        ping_interval: Duration::from_secs(2),
        timeout: Duration::from_secs(6),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let churn: Vec<_> = (0..6)
        .map(|worker| {
            tokio::spawn(async move {
                let mut kept = Vec::new();
                for round in 0..25 {
                    let (mut session, _) =
                        RawSession::hello(addr, &format!("w{worker}-{round}")).await;
                    if round % 3 == 0 {
                        kept.push(session);
                    } else {
                        session.half_close();
                        session.ended().await;
                    }
                }
                kept
            })
        })
        .collect();
    // Start watching once the churn is under way.
    within(WAIT, async {
        while server.handle.registry().snapshot().revision < 40 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let mut client = presence(addr).await;
    let mut stream = watch(&mut client, watch_request(0, 0)).await;
    let (snapshot, synced) = until_synced(&mut stream).await;
    let mut open: HashSet<String> = HashSet::new();
    for event in &snapshot {
        assert_eq!(
            event.revision, synced.revision,
            "snapshot events carry its revision"
        );
        let Some(Event::Opened(session)) = &event.event else {
            panic!("a snapshot is opened events, got {event:?}");
        };
        assert!(
            open.insert(session.session_id.clone()),
            "duplicate in the snapshot"
        );
    }
    let mut kept = Vec::new();
    for worker in churn {
        kept.extend(within(WAIT, worker).await.expect("churn worker"));
    }
    let final_revision = server.handle.registry().snapshot().revision;
    let mut revision = synced.revision;
    while revision < final_revision {
        let event = next_event(&mut stream).await;
        assert_eq!(event.revision, revision + 1, "no gap, no duplicate");
        revision = event.revision;
        match &event.event {
            Some(Event::Opened(session)) => {
                assert!(
                    open.insert(session.session_id.clone()),
                    "opened twice: {session:?}"
                )
            }
            Some(Event::Closed(closed)) => {
                let id = &closed.session.as_ref().expect("session").session_id;
                assert!(open.remove(id), "closed an unknown session {id}");
            }
            other => panic!("unexpected event during churn: {other:?}"),
        }
    }
    let listed = client
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.revision, revision);
    let listed: HashSet<String> = listed.sessions.into_iter().map(|s| s.session_id).collect();
    assert_eq!(open, listed);
    assert_eq!(open.len(), kept.len());
}

/// Tests that resuming a dropped watch replays exactly the missed changes
/// (no snapshot, no reset), then synced, then live changes.
#[tokio::test]
async fn resume_replays_exactly_the_missed_changes() {
    let server = TestServer::start(fast_config()).await;
    let (_first, _) = RawSession::hello(server.addr, "first").await;
    let mut client = presence(server.addr).await;
    let mut stream = watch(&mut client, watch_request(0, 0)).await;
    let (_, synced) = until_synced(&mut stream).await;
    let watching = || {
        server
            .handle
            .metrics()
            .render(false)
            .0
            .contains("\nheartbeat_watchers 1\n")
    };
    assert!(watching());
    drop(stream);
    // The server notices a watcher that left without waiting for a change.
    within(WAIT, async {
        while watching() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let (mut second, _) = RawSession::hello(server.addr, "second").await;
    let (_third, _) = RawSession::hello(server.addr, "third").await;
    second.half_close();
    second.ended().await;
    let mut resumed = watch(&mut client, watch_request(synced.epoch, synced.revision)).await;
    let (replayed, marker) = until_synced(&mut resumed).await;
    let revisions: Vec<u64> = replayed.iter().map(|e| e.revision).collect();
    let r = synced.revision;
    assert_eq!(revisions, [r + 1, r + 2, r + 3]);
    assert!(matches!(replayed[0].event, Some(Event::Opened(_))));
    assert!(matches!(replayed[2].event, Some(Event::Closed(_))));
    assert_eq!((marker.epoch, marker.revision), (synced.epoch, r + 3));
    let (_fourth, _) = RawSession::hello(server.addr, "fourth").await;
    let live = next_event(&mut resumed).await;
    assert_eq!(live.revision, r + 4);
    assert_eq!(
        session_of(&live).map(|s| s.client_id.as_str()),
        Some("fourth")
    );
}

/// Tests that a resume the history no longer covers, or one from another
/// epoch, gets reset and a snapshot.
#[tokio::test]
async fn stale_or_foreign_resume_gets_reset_and_snapshot() {
    let config = ServerConfig {
        watch_history: 2,
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut sessions = Vec::new();
    for id in ["a", "b", "c", "d"] {
        sessions.push(RawSession::hello(server.addr, id).await.0);
    }
    let epoch = server.handle.registry().epoch();
    let mut client = presence(server.addr).await;
    for (resume_epoch, after) in [(epoch, 1), (epoch ^ 0xdead, 4), (epoch, 99)] {
        let mut stream = watch(&mut client, watch_request(resume_epoch, after)).await;
        let first = next_event(&mut stream).await;
        assert!(matches!(first.event, Some(Event::Reset(_))), "{first:?}");
        let (snapshot, synced) = until_synced(&mut stream).await;
        assert_eq!(snapshot.len(), 4);
        assert_eq!(synced.revision, 4);
    }
}

/// Tests that every close reason is observed through WatchSessions, with
/// real client processes for the disconnect (SIGKILL) and the timeout (SIGSTOP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_close_reason_is_observed_through_a_watch() {
    let server = TestServer::start(ServerConfig {
        ping_strikes: 1,
        ..fast_config()
    })
    .await;
    let addr = server.addr;
    let mut client = presence(addr).await;
    let mut stream = watch(&mut client, watch_request(0, 0)).await;
    until_synced(&mut stream).await;
    let by_client = |id: &'static str| move |session: &pb::Session| session.client_id == id;

    let (mut goodbye, _) = RawSession::hello(addr, "goodbye").await;
    goodbye
        .send(In::Goodbye(pb::Goodbye {
            reason: GoodbyeReason::ClientShutdown.into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(
        closed_via_watch(&mut stream, by_client("goodbye")).await,
        CloseReason::ClientGoodbye
    );

    let (mut half, _) = RawSession::hello(addr, "half").await;
    half.half_close();
    assert_eq!(
        closed_via_watch(&mut stream, by_client("half")).await,
        CloseReason::ClientHalfClose
    );

    let mut killed = connect_process(addr, "killed");
    opened_via_watch(&mut stream, "killed").await;
    killed.kill().expect("SIGKILL");
    assert_eq!(
        closed_via_watch(&mut stream, by_client("killed")).await,
        CloseReason::Disconnected
    );
    let _ = killed.wait();

    let mut frozen = connect_process(addr, "frozen");
    opened_via_watch(&mut stream, "frozen").await;
    signal(&frozen, "-STOP");
    assert_eq!(
        closed_via_watch(&mut stream, by_client("frozen")).await,
        CloseReason::Timeout
    );
    signal(&frozen, "-CONT");
    let _ = frozen.kill();
    let _ = frozen.wait();

    let (mut flood, _) = RawSession::hello(addr, "flood").await;
    for seq in 1..=5 {
        flood.send(In::Ping(pb::Ping { seq })).await;
    }
    assert_eq!(
        closed_via_watch(&mut stream, by_client("flood")).await,
        CloseReason::TooManyPings
    );

    let (mut rude, _) = RawSession::hello(addr, "rude").await;
    rude.send(In::Hello(pb::Hello::default())).await;
    assert_eq!(
        closed_via_watch(&mut stream, by_client("rude")).await,
        CloseReason::ProtocolViolation
    );

    let (_evictee, welcome) = RawSession::hello(addr, "evictee").await;
    client
        .evict_session(pb::EvictSessionRequest {
            session_id: welcome.session_id,
            message: String::new(),
        })
        .await
        .expect("evict");
    assert_eq!(
        closed_via_watch(&mut stream, by_client("evictee")).await,
        CloseReason::Evicted
    );

    let (_older, older) = RawSession::hello(addr, "twin").await;
    let (_newer, _) = RawSession::hello(addr, "twin").await;
    let older_id = older.session_id;
    let replaced = closed_via_watch(&mut stream, |session| session.session_id == older_id).await;
    assert_eq!(replaced, CloseReason::Replaced);

    server.handle.drain();
    assert_eq!(
        closed_via_watch(&mut stream, by_client("twin")).await,
        CloseReason::ServerShutdown
    );
    let refused = client
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .expect_err("refused while draining");
    assert_eq!(refused.code(), Code::Unavailable);
    let ended = watch_end(&mut stream).await;
    assert_eq!(
        ended.code(),
        Code::Unavailable,
        "watches end with the drain: {ended:?}"
    );
}

/// Starts `heartbeat connect` as a real client process.
fn connect_process(addr: SocketAddr, client_id: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_heartbeat"))
        .args(["connect", &addr.to_string(), "--client-id", client_id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn heartbeat connect")
}

/// Tests that a client pausing for less than the timeout is reported suspect,
/// then recovered when it speaks again.
#[tokio::test]
async fn a_pause_is_suspected_then_recovered() {
    let config = ServerConfig {
        suspect_after: Some(Duration::from_millis(150)),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut client = presence(server.addr).await;
    let mut stream = watch(&mut client, watch_request(0, 0)).await;
    until_synced(&mut stream).await;
    let (mut session, welcome) = RawSession::hello(server.addr, "pauser").await;
    let mut saw = Vec::new();
    loop {
        let event = next_event(&mut stream).await;
        let kind = match &event.event {
            Some(Event::Opened(_)) => "opened",
            Some(Event::Suspected(s)) => {
                assert_eq!(
                    s.session.as_ref().map(|s| s.state()),
                    Some(pb::SessionState::Suspect)
                );
                session.send_raw(pb::HeartbeatRequest { frame: None }).await;
                "suspected"
            }
            Some(Event::Recovered(r)) => {
                assert_eq!(
                    r.session.as_ref().map(|s| s.state()),
                    Some(pb::SessionState::Live)
                );
                "recovered"
            }
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(
            session_of(&event).map(|s| s.session_id.as_str()),
            Some(welcome.session_id.as_str())
        );
        saw.push(kind);
        if kind == "recovered" {
            break;
        }
    }
    assert_eq!(saw, ["opened", "suspected", "recovered"]);
}

/// Tests that EvictSession ends the session with its message, and answers
/// NOT_FOUND for an unknown id.
#[tokio::test]
async fn evict_session_and_not_found() {
    let server = TestServer::start(fast_config()).await;
    let (mut session, welcome) = RawSession::hello(server.addr, "target").await;
    let mut client = presence(server.addr).await;
    client
        .evict_session(pb::EvictSessionRequest {
            session_id: welcome.session_id.clone(),
            message: "moving you".into(),
        })
        .await
        .expect("evicted");
    let ended = session
        .expect_end(GoodbyeReason::Evicted, Code::Aborted)
        .await;
    assert_eq!(ended.goodbye.map(|g| g.message), Some("moving you".into()));
    let missing = client
        .evict_session(pb::EvictSessionRequest {
            session_id: welcome.session_id,
            message: String::new(),
        })
        .await
        .expect_err("already gone");
    assert_eq!(missing.code(), Code::NotFound);
}

/// Tests that a watcher that stops reading is ended with RESOURCE_EXHAUSTED
/// saying it lagged, and that the server stays responsive meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_watcher_is_cut_off_and_the_server_stays_responsive() {
    let config = ServerConfig {
        watch_queue: 8,
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut client = presence(server.addr).await;
    let small_windows = small_window_endpoint(&server.url())
        .connect()
        .await
        .expect("connect");
    let mut slow_client = PresenceServiceClient::new(small_windows);
    let mut slow = watch(&mut slow_client, watch_request(0, 0)).await;
    churn_large_sessions(server.addr, 150).await;
    let (_alive, welcome) = RawSession::hello(server.addr, "still-served").await;
    assert!(!welcome.session_id.is_empty(), "the server keeps serving");
    // Counted the moment it is cut off, while its sends are still blocked.
    let metrics = server.handle.metrics().render(false).0;
    assert!(
        metrics.contains("\nheartbeat_watchers_lagged_total 1\n"),
        "{metrics}"
    );
    let ended = watch_end(&mut slow).await;
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");
    assert!(ended.message().contains("lagged"), "{ended:?}");
    let listed = client
        .list_sessions(pb::ListSessionsRequest::default())
        .await;
    assert!(listed.is_ok(), "presence still answers: {listed:?}");
}

/// Tests that with an admin token every PresenceService call needs it: none
/// or a wrong one is UNAUTHENTICATED, the right one works.
#[tokio::test]
async fn admin_token_is_required_when_set() {
    let config = ServerConfig {
        admin_token: AdminToken::new("s3cret"),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut client = presence(server.addr).await;
    let with = |token: Option<&str>| {
        let mut request = Request::new(pb::ListSessionsRequest::default());
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().expect("header value");
            request.metadata_mut().insert("authorization", value);
        }
        request
    };
    let missing = client
        .list_sessions(with(None))
        .await
        .expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated);
    let wrong = client
        .list_sessions(with(Some("guess")))
        .await
        .expect_err("wrong");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(client.list_sessions(with(Some("s3cret"))).await.is_ok());
    let mut lower = Request::new(pb::ListSessionsRequest::default());
    lower
        .metadata_mut()
        .insert("authorization", "bearer s3cret".parse().expect("value"));
    assert!(
        client.list_sessions(lower).await.is_ok(),
        "the scheme is case-insensitive"
    );
    let mut request = Request::new(watch_request(0, 0));
    request
        .metadata_mut()
        .insert("authorization", "Bearer guess".parse().expect("value"));
    let status = client.watch_sessions(request).await.expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
    let evict = client
        .evict_session(pb::EvictSessionRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(evict.code(), Code::Unauthenticated);
}

/// Tests that health serves every name, turns NOT_SERVING as a drain begins,
/// and ends its watches so that they do not hold the shutdown.
#[tokio::test]
async fn health_turns_not_serving_on_drain() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let server = TestServer::start(fast_config()).await;
    let mut health = HealthClient::new(channel(server.addr).await);
    for name in [
        "",
        "heartbeat.v1.HeartbeatService",
        "heartbeat.v1.PresenceService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: name.into(),
            })
            .await
            .expect("check")
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{name:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "heartbeat.v1.HeartbeatService".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = within(WAIT, watch.message())
        .await
        .expect("open")
        .expect("status");
    assert_eq!(first.status(), ServingStatus::Serving);
    let grace = server.handle.config().shutdown_grace;
    let started = tokio::time::Instant::now();
    let stopping = tokio::spawn(server.shutdown());
    let next = within(WAIT, watch.message())
        .await
        .expect("open")
        .expect("status");
    assert_eq!(next.status(), ServingStatus::NotServing);
    // Then the watch ends, so it does not hold the shutdown for its grace.
    let end = within(WAIT, watch.message()).await;
    assert!(!matches!(end, Ok(Some(_))), "the watch should end: {end:?}");
    within(WAIT, stopping)
        .await
        .expect("join")
        .expect("clean shutdown");
    assert!(
        started.elapsed() < grace,
        "shutdown waited {:?}",
        started.elapsed()
    );
}

/// The service names a reflection service of version `$version` lists; one
/// body for both versions, whose generated types differ only in their module.
macro_rules! reflected_services {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let request = ServerReflectionRequest {
            message_request: Some(MessageRequest::ListServices(String::new())),
            ..Default::default()
        };
        let mut responses = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection")
            .into_inner();
        let response = within(WAIT, responses.next())
            .await
            .expect("a response")
            .expect("ok");
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("expected a service list");
        };
        list.service
            .into_iter()
            .map(|s| s.name)
            .collect::<HashSet<String>>()
    }};
}

/// Tests that reflection (v1 and v1alpha) lists both heartbeat services and health.
#[tokio::test]
async fn reflection_lists_the_services() {
    use tokio_stream::StreamExt;
    let server = TestServer::start(fast_config()).await;
    let expected = [
        "heartbeat.v1.HeartbeatService",
        "heartbeat.v1.PresenceService",
        "grpc.health.v1.Health",
    ];

    let v1_names = reflected_services!(v1, channel(server.addr).await);
    let v1alpha_names = reflected_services!(v1alpha, channel(server.addr).await);
    for name in expected {
        assert!(v1_names.contains(name), "v1 lacks {name}: {v1_names:?}");
        assert!(
            v1alpha_names.contains(name),
            "v1alpha lacks {name}: {v1alpha_names:?}"
        );
    }
}

/// Scrapes `/metrics` with a plain HTTP/1.1 GET; returns headers and body.
async fn scrape(addr: SocketAddr, accept: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to metrics");
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    within(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_owned(), body.to_owned())
}

/// Tests that `/metrics` shows the session counters moving with the right
/// reason labels, every family described, in the classic text format (and in
/// OpenMetrics when asked).
#[tokio::test]
async fn metrics_show_sessions_by_reason() {
    let metrics_addr = free_port();
    let config = ServerConfig {
        metrics_listen: Some(metrics_addr),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let (mut leaving, _) = RawSession::hello(server.addr, "leaving").await;
    let (mut evicted, welcome) = RawSession::hello(server.addr, "evicted").await;
    leaving
        .send(In::Goodbye(pb::Goodbye {
            reason: GoodbyeReason::ClientShutdown.into(),
            ..Default::default()
        }))
        .await;
    leaving.ended().await;
    server.handle.evict(&welcome.session_id, "");
    evicted.ended().await;
    let (head, body) = within(WAIT, async {
        loop {
            let (head, body) = scrape(metrics_addr, "*/*").await;
            if body.contains("heartbeat_sessions_closed_total{reason=\"evicted\"} 1") {
                break (head, body);
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for line in [
        "heartbeat_sessions_closed_total{reason=\"client_goodbye\"} 1",
        "heartbeat_sessions_closed_total{reason=\"timeout\"} 0",
        "heartbeat_sessions_opened_total 2",
        "heartbeat_sessions_open 0",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in\n{body}"
        );
    }
    let families: HashSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default())
        .map(|name| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name)
        })
        .collect();
    for family in &families {
        assert!(
            body.contains(&format!("# HELP {family} ")),
            "{family} lacks HELP"
        );
        assert!(
            body.contains(&format!("# TYPE {family} ")),
            "{family} lacks TYPE"
        );
    }
    assert!(families.len() >= 10, "{families:?}");
    let (head, body) = scrape(metrics_addr, "application/openmetrics-text; version=1.0.0").await;
    assert!(
        head.to_lowercase().contains("application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"));
}

fn sessions_command(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_heartbeat"))
        .arg("sessions")
        .args(args)
        .output()
        .expect("run heartbeat sessions")
}

/// Tests that `heartbeat sessions` prints a table and JSON lines, filters,
/// evicts, and needs the token file when the server has a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_command_lists_filters_and_evicts() {
    let dir = std::env::temp_dir().join(format!("heartbeat-sessions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "t0ken\n").expect("write token");
    let token_path = token_file.to_str().expect("utf-8 path").to_owned();
    let config = ServerConfig {
        admin_token: AdminToken::new("t0ken"),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let addr = server.addr.to_string();
    let (_a, _) = RawSession::hello_with(server.addr, "alpha", &[("zone", "eu")]).await;
    let (mut b, b_welcome) = RawSession::hello_with(server.addr, "beta", &[("zone", "us")]).await;

    let table = tokio::task::spawn_blocking({
        let (addr, token) = (addr.clone(), token_path.clone());
        move || sessions_command(&[&addr, "--admin-token-file", &token])
    })
    .await
    .expect("join");
    assert!(table.status.success(), "{table:?}");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("SESSION"), "{table}");
    assert!(
        table.contains("alpha") && table.contains("zone=eu") && table.contains("2 session(s)"),
        "{table}"
    );

    let json = tokio::task::spawn_blocking({
        let (addr, token) = (addr.clone(), token_path.clone());
        move || {
            sessions_command(&[
                &addr,
                "--admin-token-file",
                &token,
                "--label",
                "zone=us",
                "--output",
                "json",
            ])
        }
    })
    .await
    .expect("join");
    let json = String::from_utf8_lossy(&json.stdout);
    let lines: Vec<&str> = json.lines().collect();
    assert_eq!(lines.len(), 1, "{json}");
    assert!(lines[0].contains("\"client_id\":\"beta\""), "{json}");

    let evict = tokio::task::spawn_blocking({
        let (addr, token, id) = (
            addr.clone(),
            token_path.clone(),
            b_welcome.session_id.clone(),
        );
        move || {
            sessions_command(&[
                &addr,
                "--admin-token-file",
                &token,
                "--evict",
                &id,
                "--message",
                "bye",
            ])
        }
    })
    .await
    .expect("join");
    assert!(evict.status.success(), "{evict:?}");
    b.expect_end(GoodbyeReason::Evicted, Code::Aborted).await;

    let refused = tokio::task::spawn_blocking(move || sessions_command(&[&addr]))
        .await
        .expect("join");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("requires an admin token"), "{stderr}");
    assert!(
        stderr.contains("pass the token file with --admin-token-file"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Tests that `heartbeat sessions --watch` prints events as they happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_watch_prints_events() {
    use std::io::{BufRead, BufReader};
    let server = TestServer::start(fast_config()).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_heartbeat"))
        .args(["sessions", &server.addr.to_string(), "--watch"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("piped");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    async fn next_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
        within(WAIT, lines.recv()).await.expect("a line")
    }
    assert!(next_line(&mut lines).await.starts_with("synced revision=0"));
    let (mut session, _) = RawSession::hello(server.addr, "watched").await;
    let opened = next_line(&mut lines).await;
    assert!(
        opened.starts_with("opened revision=1") && opened.contains("client=watched"),
        "{opened}"
    );
    session.half_close();
    let closed = next_line(&mut lines).await;
    assert!(
        closed.starts_with("closed revision=2") && closed.contains("reason=client_half_close"),
        "{closed}"
    );
    signal(&child, "-TERM");
    let exit = within(WAIT, tokio::task::spawn_blocking(move || child.wait()))
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(exit.code(), Some(0));
}

/// Tests that a drain ending more sessions than a watcher's queue holds ends
/// the watch as a shutdown (UNAVAILABLE), not as a lagging watcher.
#[tokio::test]
async fn a_shutdown_burst_is_not_reported_as_lag() {
    let config = ServerConfig {
        watch_queue: 4,
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut sessions = Vec::new();
    for round in 0..12 {
        sessions.push(RawSession::hello(server.addr, &format!("s{round}")).await.0);
    }
    let mut client = presence(server.addr).await;
    let mut stream = watch(&mut client, watch_request(0, 0)).await;
    until_synced(&mut stream).await;
    server.handle.drain();
    let ended = watch_end(&mut stream).await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    let metrics = server.handle.metrics().render(false).0;
    assert!(
        metrics.contains("\nheartbeat_watchers_lagged_total 0\n"),
        "{metrics}"
    );
}

/// Tests that one decision ends each session: with evictions landing on
/// the very millisecond of hundreds of sessions' timeouts, the reason in
/// the Goodbye each client reads is the reason presence records, for every
/// session, whichever cause came first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_racing_timeouts_agree_with_the_client() {
    use std::collections::HashMap;
    use tonic_heartbeat::registry::SessionEvent;
    let timeout = Duration::from_millis(300);
    let server = TestServer::start(fast_config()).await;
    let mut events = server.handle.subscribe();
    let count = 200;
    let mut sessions = Vec::new();
    for i in 0..count {
        let (session, welcome) = RawSession::hello(server.addr, &format!("race-{i}")).await;
        // The session's deadline, from its Hello; evictions land within 2 ms of it.
        let offset = Duration::from_micros((i % 5) as u64 * 1000);
        let evict_at = session.last_sent + timeout + offset - Duration::from_millis(2);
        let handle = server.handle.clone();
        let id = welcome.session_id.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(evict_at).await;
            handle.evict(&id, "racing the timeout");
        });
        sessions.push((session, welcome.session_id));
    }
    let mut heard = HashMap::new();
    for (session, id) in &mut sessions {
        let ended = session.ended().await;
        let goodbye = ended.goodbye.expect("every end here carries a goodbye");
        heard.insert(id.clone(), goodbye.reason());
    }
    let mut recorded = HashMap::new();
    while recorded.len() < count {
        let change = next_change(&mut events).await;
        if let SessionEvent::Closed {
            session, reason, ..
        } = change.event
        {
            recorded.insert(session.identity.session_id.clone(), reason);
        }
    }
    let mut tally: HashMap<String, usize> = HashMap::new();
    for (id, goodbye) in &heard {
        let reason = recorded[id];
        assert_eq!(
            reason.goodbye(),
            Some(*goodbye),
            "session {id}: the client heard {goodbye:?}, presence recorded {reason}"
        );
        *tally.entry(reason.to_string()).or_default() += 1;
    }
    eprintln!("ends by reason: {tally:?}");
}

/// Reads every page of ListSessions with `page_size`, checking each page's
/// order and size; returns the session ids and how many pages there were.
async fn list_all_pages(
    client: &mut PresenceServiceClient<Channel>,
    page_size: i32,
) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut page_token = String::new();
    loop {
        let request = pb::ListSessionsRequest {
            page_size,
            page_token,
            ..Default::default()
        };
        let page = within(WAIT, client.list_sessions(request))
            .await
            .expect("a page")
            .into_inner();
        pages += 1;
        let encoded = prost::Message::encoded_len(&page);
        assert!(encoded <= 4 * 1024 * 1024, "a page of {encoded} bytes");
        ids.extend(page.sessions.into_iter().map(|s| s.session_id));
        if page.next_page_token.is_empty() {
            return (ids, pages);
        }
        page_token = page.next_page_token;
    }
}

/// Tests that ListSessions pages in session_id order: the default page size
/// is 1,000, larger requests are lowered to 10,000, pages stop short of
/// 4 MiB, the last page has no token, and every session is seen once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_sessions_pages_in_order_under_four_mib() {
    let server = TestServer::start(fast_config()).await;
    fill_registry(&server.handle, 12_500, 0);
    let mut client = presence(server.addr).await;

    let (ids, pages) = list_all_pages(&mut client, 0).await;
    assert_eq!((ids.len(), pages), (12_500, 13), "1,000 a page by default");
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "in session_id order, each once");

    let (ids, pages) = list_all_pages(&mut client, 50_000).await;
    assert_eq!((ids.len(), pages), (12_500, 2), "lowered to 10,000 a page");

    // 1 KB of labels a session: 10,000 of them would be 10 MB.
    let big = TestServer::start(fast_config()).await;
    fill_registry(&big.handle, 6_000, 1_000);
    let mut client = presence(big.addr).await;
    let (ids, pages) = list_all_pages(&mut client, 10_000).await;
    assert_eq!(ids.len(), 6_000);
    assert!(pages >= 2, "cut short of 4 MiB: {pages} page(s)");
}

/// Tests that a page token this server did not hand out, or a negative page
/// size, is INVALID_ARGUMENT with a message that says what to do.
#[tokio::test]
async fn bad_page_requests_are_invalid_arguments() {
    let server = TestServer::start(fast_config()).await;
    let mut client = presence(server.addr).await;
    for request in [
        pb::ListSessionsRequest {
            page_token: "not-a-token\n".into(),
            ..Default::default()
        },
        pb::ListSessionsRequest {
            page_size: -1,
            ..Default::default()
        },
    ] {
        let refused = client.list_sessions(request).await.expect_err("refused");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        let message = refused.message();
        assert!(
            message.contains("empty page_token") || message.contains("use 0 for the default"),
            "{message}"
        );
        assert!(!message.contains('\n'), "escaped: {message:?}");
    }
}

/// Tests that `heartbeat sessions` lists and watches 100,000 sessions: the
/// table pages through all of them, and the watch prints each snapshot
/// session before `synced`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_command_handles_a_hundred_thousand_sessions() {
    use std::io::{BufRead, BufReader};
    let server = TestServer::start(fast_config()).await;
    fill_registry(&server.handle, 100_000, 0);
    let addr = server.addr.to_string();
    let table = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || sessions_command(&[&addr])
    })
    .await
    .expect("join");
    assert!(
        table.status.success(),
        "{:?}",
        String::from_utf8_lossy(&table.stderr)
    );
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.ends_with("100000 session(s)\n"),
        "{}",
        &table[table.len().saturating_sub(200)..]
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_heartbeat"))
        .args(["sessions", &addr, "--watch"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("piped");
    let counted = within(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            let mut opened = 0;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("opened ") {
                    opened += 1;
                } else if line.starts_with("synced ") {
                    return opened;
                }
            }
            opened
        }),
    )
    .await
    .expect("join");
    signal(&child, "-TERM");
    let _ = child.wait();
    assert_eq!(counted, 100_000);
}

/// Tests that presence watches are capped: one past --max-watchers is
/// RESOURCE_EXHAUSTED, saying which setting to raise, and a slot frees when
/// a watch ends.
#[tokio::test]
async fn watches_are_capped() {
    let config = ServerConfig {
        max_watchers: 2,
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut client = presence(server.addr).await;
    let first = watch(&mut client, watch_request(0, 0)).await;
    let _second = watch(&mut client, watch_request(0, 0)).await;
    let refused = client
        .watch_sessions(watch_request(0, 0))
        .await
        .expect_err("a third watch is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("--max-watchers"), "{refused:?}");
    drop(first);
    within(WAIT, async {
        loop {
            if client.watch_sessions(watch_request(0, 0)).await.is_ok() {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
}
