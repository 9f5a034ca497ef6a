//! The heartbeat session protocol, duty by duty, against a real server.

mod support;

use std::time::Duration;

use support::*;
use tokio::time::Instant;
use tonic::Code;
use tonic_heartbeat::{
    protocol::{
        grpc,
        pb::{
            self, heartbeat_request::Frame as In, heartbeat_response::Frame as Out, GoodbyeReason,
        },
        proto_to_duration,
    },
    registry::{SessionEvent, SessionState},
    CloseReason, ServerConfig,
};

/// Tests that Welcome carries a session id and the server's interval and timeout.
#[tokio::test]
async fn welcome_carries_interval_and_timeout() {
    let server = TestServer::start(fast_config()).await;
    let (_session, welcome) = RawSession::hello(server.addr, "w").await;
    assert!(!welcome.session_id.is_empty());
    let interval = welcome.ping_interval.as_ref().and_then(proto_to_duration);
    let timeout = welcome.timeout.as_ref().and_then(proto_to_duration);
    assert_eq!(interval, Some(Duration::from_millis(100)));
    assert_eq!(timeout, Some(Duration::from_millis(300)));
}

/// Tests that the server pings at its interval, numbering its pings from 1.
#[tokio::test]
async fn server_pings_from_one_at_the_interval() {
    let server = TestServer::start(fast_config()).await;
    let (mut session, _) = RawSession::hello(server.addr, "p").await;
    let welcomed = Instant::now();
    let mut arrivals = vec![welcomed];
    for expected in 1..=4u64 {
        match session.next_frame().await {
            Some(Out::Ping(ping)) => assert_eq!(ping.seq, expected),
            other => panic!("expected Ping {expected}, got {other:?}"),
        }
        arrivals.push(Instant::now());
        session.send(In::Pong(pb::Pong { seq: expected })).await;
    }
    // The first ping comes within one interval of the Welcome (the pings
    // of a connection's sessions fall on a shared grid), every later one an
    // interval after the one before.
    let gaps: Vec<Duration> = arrivals.windows(2).map(|pair| pair[1] - pair[0]).collect();
    assert!(
        gaps[0] <= Duration::from_millis(200),
        "first ping after {:?}",
        gaps[0]
    );
    for gap in &gaps[1..] {
        assert!(*gap >= Duration::from_millis(90), "pings {gap:?} apart");
        assert!(*gap <= Duration::from_millis(200), "pings {gap:?} apart");
    }
}

/// Tests that a client Ping is answered at once with a Pong of the same seq.
#[tokio::test]
async fn pong_echoes_the_seq_at_once() {
    let server = TestServer::start(fast_config()).await;
    let (mut session, _) = RawSession::hello(server.addr, "e").await;
    session.send(In::Ping(pb::Ping { seq: 41 })).await;
    let sent = session.last_sent;
    loop {
        match session.next_frame().await {
            Some(Out::Pong(pong)) => {
                assert_eq!(pong.seq, 41);
                // Far below the server's 100 ms ping tick: not held back for it.
                assert!(
                    sent.elapsed() < Duration::from_millis(50),
                    "pong after {:?}",
                    sent.elapsed()
                );
                break;
            }
            Some(Out::Ping(_)) => {}
            other => panic!("expected Pong, got {other:?}"),
        }
    }
}

/// Tests that a client that only answers pings stays alive across many timeouts.
#[tokio::test]
async fn answering_pings_keeps_a_session_alive() {
    let server = TestServer::start(fast_config()).await;
    let (mut session, _) = RawSession::hello(server.addr, "alive").await;
    let until = Instant::now() + Duration::from_millis(300) * 6;
    let mut pings = 0;
    while Instant::now() < until {
        match session.next_frame().await {
            Some(Out::Ping(ping)) => {
                pings += 1;
                session.send(In::Pong(pb::Pong { seq: ping.seq })).await;
            }
            other => panic!("session should stay alive, got {other:?}"),
        }
    }
    assert!(pings >= 15, "only {pings} pings");
    assert_eq!(server.handle.registry().len(), 1);
}

/// Tests that a silent client is ended with Goodbye{TIMEOUT} and
/// DEADLINE_EXCEEDED no earlier than the timeout after its last frame and
/// within 100 ms after it, and that presence records TIMEOUT.
#[tokio::test]
async fn silent_client_is_ended_on_time() {
    let server = TestServer::start(fast_config()).await;
    let mut events = server.handle.subscribe();
    let (mut session, welcome) = RawSession::hello(server.addr, "quiet").await;
    let last_frame = session.last_sent;
    let ended = session
        .expect_end(GoodbyeReason::Timeout, Code::DeadlineExceeded)
        .await;
    assert_on_time(
        "the timeout",
        ended.at,
        last_frame + Duration::from_millis(300),
        Duration::from_millis(100),
    );
    let (reason, _) = closed(&mut events, &welcome.session_id).await;
    assert_eq!(reason, CloseReason::Timeout);
}

/// Tests that suspicion is reported after `suspect_after`, recovery when the
/// client speaks again, and a timeout after suspicion when it does not.
#[tokio::test]
async fn suspect_then_recovered_then_suspect_then_timeout() {
    let config = ServerConfig {
        suspect_after: Some(Duration::from_millis(150)),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut events = server.handle.subscribe();
    let (mut session, welcome) = RawSession::hello(server.addr, "late").await;
    let id = welcome.session_id.clone();
    let spoke = session.last_sent;
    event_for(&mut events, &id, |e| {
        matches!(e, SessionEvent::Suspected(_))
    })
    .await;
    assert!(spoke.elapsed() >= Duration::from_millis(150));
    session.send_raw(pb::HeartbeatRequest { frame: None }).await;
    let recovered = event_for(&mut events, &id, |e| {
        matches!(e, SessionEvent::Recovered(_))
    })
    .await;
    assert_eq!(recovered.session().state, SessionState::Live);
    event_for(&mut events, &id, |e| {
        matches!(e, SessionEvent::Suspected(_))
    })
    .await;
    let (reason, _) = closed(&mut events, &id).await;
    assert_eq!(reason, CloseReason::Timeout);
}

/// Tests that a ping flood is cut with TOO_MANY_PINGS and RESOURCE_EXHAUSTED
/// while a well-behaved session's pongs stay prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_is_cut_without_hurting_others() {
    let config = ServerConfig {
        ping_strikes: 20_000,
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut events = server.handle.subscribe();
    let (mut flood, flood_welcome) = RawSession::hello(server.addr, "flood").await;
    let (mut calm, _) = RawSession::hello(server.addr, "calm").await;
    let flooding = tokio::spawn(async move {
        for seq in 1..=30_000u64 {
            let request = pb::HeartbeatRequest {
                frame: Some(In::Ping(pb::Ping { seq })),
            };
            if flood.outbound_send(request).await.is_err() {
                break;
            }
        }
        flood
            .expect_end(GoodbyeReason::TooManyPings, Code::ResourceExhausted)
            .await
    });
    let mut worst = Duration::ZERO;
    let mut cadence = tokio::time::interval(Duration::from_millis(25));
    for seq in 1..=20u64 {
        cadence.tick().await;
        calm.send(In::Ping(pb::Ping { seq })).await;
        let sent = calm.last_sent;
        loop {
            match calm.next_frame().await {
                Some(Out::Pong(pong)) if pong.seq == seq => break,
                Some(Out::Ping(ping)) => calm.send(In::Pong(pb::Pong { seq: ping.seq })).await,
                Some(_) => {}
                None => panic!("calm session ended"),
            }
        }
        worst = worst.max(sent.elapsed());
    }
    within(WAIT, flooding).await.expect("flood task");
    let (reason, _) = closed(&mut events, &flood_welcome.session_id).await;
    assert_eq!(reason, CloseReason::TooManyPings);
    assert!(
        worst < Duration::from_millis(100),
        "calm pong took {worst:?} during the flood"
    );
}

/// Tests that a first frame other than Hello is a protocol violation.
#[tokio::test]
async fn first_frame_must_be_hello() {
    let server = TestServer::start(fast_config()).await;
    let mut session = RawSession::open(server.addr).await.expect("admitted");
    session.send(In::Ping(pb::Ping { seq: 1 })).await;
    let ended = session
        .expect_end(GoodbyeReason::ProtocolViolation, Code::InvalidArgument)
        .await;
    assert!(ended.status.message().contains("first frame must be Hello"));
}

/// Tests that a second Hello is a protocol violation, recorded as such.
#[tokio::test]
async fn hello_twice_is_a_violation() {
    let server = TestServer::start(fast_config()).await;
    let mut events = server.handle.subscribe();
    let (mut session, welcome) = RawSession::hello(server.addr, "twice").await;
    session.send(In::Hello(pb::Hello::default())).await;
    session
        .expect_end(GoodbyeReason::ProtocolViolation, Code::InvalidArgument)
        .await;
    let (reason, _) = closed(&mut events, &welcome.session_id).await;
    assert_eq!(reason, CloseReason::ProtocolViolation);
}

/// Tests that a Hello over its limits is a protocol violation naming the limit.
#[tokio::test]
async fn oversized_hello_is_a_violation() {
    let server = TestServer::start(fast_config()).await;
    let mut session = RawSession::open(server.addr).await.expect("admitted");
    session
        .send(In::Hello(pb::Hello {
            client_id: "x".repeat(300),
            ..Default::default()
        }))
        .await;
    let ended = session
        .expect_end(GoodbyeReason::ProtocolViolation, Code::InvalidArgument)
        .await;
    assert!(
        ended.status.message().contains("client_id is 300 bytes"),
        "{:?}",
        ended.status
    );
}

/// Tests that a frame over the size limit ends the session as a protocol
/// violation before the server reads it.
#[tokio::test]
async fn frame_over_the_size_limit_is_a_violation() {
    let server = TestServer::start(fast_config()).await;
    let mut events = server.handle.subscribe();
    let (mut session, welcome) = RawSession::hello(server.addr, "big").await;
    session
        .send(In::Hello(pb::Hello {
            client_id: "y".repeat(20 * 1024),
            ..Default::default()
        }))
        .await;
    let ended = session
        .expect_end(GoodbyeReason::ProtocolViolation, Code::InvalidArgument)
        .await;
    assert!(
        ended.status.message().contains("larger than 16384 bytes"),
        "{:?}",
        ended.status
    );
    let (reason, _) = closed(&mut events, &welcome.session_id).await;
    assert_eq!(reason, CloseReason::ProtocolViolation);
}

/// Half-closes `session` and checks it finishes with OK, recorded as `expected`.
async fn assert_half_close_finishes_ok(
    mut session: RawSession,
    events: &mut tonic_heartbeat::registry::Subscription,
    session_id: &str,
    expected: CloseReason,
) {
    session.half_close();
    let ended = session.ended().await;
    assert_eq!(ended.status.code(), Code::Ok, "{:?}", ended.status);
    let (reason, _) = closed(events, session_id).await;
    assert_eq!(reason, expected);
}

/// Tests that a client goodbye finishes with OK and is recorded as CLIENT_GOODBYE.
#[tokio::test]
async fn client_goodbye_finishes_ok() {
    let server = TestServer::start(fast_config()).await;
    let mut events = server.handle.subscribe();
    let (mut session, welcome) = RawSession::hello(server.addr, "bye").await;
    session
        .send(In::Goodbye(pb::Goodbye {
            reason: GoodbyeReason::ClientShutdown.into(),
            ..Default::default()
        }))
        .await;
    assert_half_close_finishes_ok(
        session,
        &mut events,
        &welcome.session_id,
        CloseReason::ClientGoodbye,
    )
    .await;
}

/// Tests that a half-close without goodbye finishes with OK as CLIENT_HALF_CLOSE.
#[tokio::test]
async fn half_close_finishes_ok() {
    let server = TestServer::start(fast_config()).await;
    let mut events = server.handle.subscribe();
    let (session, welcome) = RawSession::hello(server.addr, "half").await;
    assert_half_close_finishes_ok(
        session,
        &mut events,
        &welcome.session_id,
        CloseReason::ClientHalfClose,
    )
    .await;
}

/// Tests that a Hello with a live client id replaces the older session with
/// Goodbye{REPLACED} and ABORTED, and the newer one lives on.
#[tokio::test]
async fn same_client_id_replaces_the_older_session() {
    let server = TestServer::start(fast_config()).await;
    let mut events = server.handle.subscribe();
    let (mut older, older_welcome) = RawSession::hello(server.addr, "worker-7").await;
    let (mut newer, _) = RawSession::hello(server.addr, "worker-7").await;
    older
        .expect_end(GoodbyeReason::Replaced, Code::Aborted)
        .await;
    let (reason, _) = closed(&mut events, &older_welcome.session_id).await;
    assert_eq!(reason, CloseReason::Replaced);
    newer.send(In::Ping(pb::Ping { seq: 1 })).await;
    loop {
        match newer.next_frame().await {
            Some(Out::Pong(pong)) => break assert_eq!(pong.seq, 1),
            Some(Out::Ping(_)) => {}
            other => panic!("newer session should live, got {other:?}"),
        }
    }
    assert_eq!(server.handle.registry().len(), 1);
}

/// Tests that an evicted session gets Goodbye{EVICTED} with the message, and
/// ABORTED, and is recorded as EVICTED.
#[tokio::test]
async fn eviction_ends_with_aborted() {
    let server = TestServer::start(fast_config()).await;
    let (mut session, welcome) = RawSession::hello(server.addr, "evictee").await;
    assert!(server.handle.evict(&welcome.session_id, "maintenance"));
    let ended = session
        .expect_end(GoodbyeReason::Evicted, Code::Aborted)
        .await;
    assert_eq!(ended.goodbye.map(|g| g.message), Some("maintenance".into()));
    assert!(!server.handle.evict(&welcome.session_id, "again"));
}

/// Tests that streams past capacity are refused before any frame (and
/// counted in the admission metric), and that a slot frees when a session ends.
#[tokio::test]
async fn capacity_refuses_before_welcome_and_frees_on_end() {
    let config = ServerConfig {
        max_sessions: 2,
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let (mut first, _) = RawSession::hello(server.addr, "a").await;
    let _pending = RawSession::open(server.addr).await.expect("second slot");
    let refused = RawSession::open(server.addr)
        .await
        .err()
        .expect("third refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let metrics = server.handle.metrics().render(false).0;
    assert!(
        metrics.contains("heartbeat_admission_rejections_total{reason=\"capacity\"} 1\n"),
        "the refusal is counted: {metrics}"
    );
    first.half_close();
    first.ended().await;
    within(WAIT, async {
        loop {
            match RawSession::open(server.addr).await {
                Ok(mut session) => break session.say_hello("c").await,
                Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
            }
        }
    })
    .await;
}

/// Tests that a frame with no oneof set proves liveness and counts as unsolicited.
#[tokio::test]
async fn unknown_frames_keep_alive_and_earn_strikes() {
    let server = TestServer::start(fast_config()).await;
    let (mut session, _) = RawSession::hello(server.addr, "future").await;
    // Every 100 ms for three timeouts: slower than the strike spacing, faster
    // than the timeout.
    let mut cadence = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..9 {
        cadence.tick().await;
        session.send_raw(pb::HeartbeatRequest { frame: None }).await;
    }
    assert_eq!(
        server.handle.registry().len(),
        1,
        "empty frames prove liveness"
    );
    for _ in 0..5 {
        session.send_raw(pb::HeartbeatRequest { frame: None }).await;
    }
    session
        .expect_end(GoodbyeReason::TooManyPings, Code::ResourceExhausted)
        .await;
}

/// Tests that a session whose client stops reading loses its slot at its
/// timeout, although its HTTP/2 stream cannot even carry the goodbye.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_its_slot_at_the_timeout() {
    let config = ServerConfig {
        max_sessions: 1,
        ping_strikes: u32::MAX,
        min_ping_interval: Duration::from_millis(1),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut events = server.handle.subscribe();
    let _wedged = wedge_a_stream(server.addr).await;
    let opened = next_change(&mut events).await;
    let (reason, _) = closed(&mut events, &opened.event.session().identity.session_id).await;
    assert_eq!(reason, CloseReason::Timeout);
    let (_, welcome) = RawSession::hello(server.addr, "next").await;
    assert!(!welcome.session_id.is_empty());
}

/// Opens a raw HTTP/2 stream on `path` with `headers` and, optionally, one
/// body chunk; returns the response head and body.
async fn raw_call(
    server: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<bytes::Bytes>,
) -> http::Response<h2::RecvStream> {
    let tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let (mut h2, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(connection);
    let mut request = http::Request::post(format!("{}{path}", server.url()))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(()).expect("request");
    let (response, mut stream) = h2.send_request(request, false).expect("send");
    if let Some(body) = body {
        stream.send_data(body, false).expect("send the body");
    }
    within(WAIT, response).await.expect("response")
}

/// Asserts a trailers-only response (one HEADERS frame ending the stream)
/// with `code`, as every gRPC implementation expects of a refusal.
fn assert_trailers_only(response: &http::Response<h2::RecvStream>, code: Code) {
    assert_eq!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some((code as i32).to_string().as_bytes()),
        "{response:?}"
    );
    assert!(
        response.body().is_end_stream(),
        "the refusal should end the stream in its HEADERS frame"
    );
}

/// Tests that a refusal before any frame is a trailers-only response.
#[tokio::test]
async fn refusals_are_trailers_only() {
    let server = TestServer::start(fast_config()).await;
    server.handle.drain();
    let response = raw_call(
        &server,
        "/heartbeat.v1.HeartbeatService/Heartbeat",
        &[],
        None,
    )
    .await;
    assert_trailers_only(&response, Code::Unavailable);
}

/// Tests that another method of the service, and compressed messages, are
/// refused at once with UNIMPLEMENTED, trailers-only, as tonic's generated
/// server would; and that a compressed message slipped in after Hello ends
/// the session as a protocol violation.
#[tokio::test]
async fn unknown_methods_and_compression_are_refused() {
    let server = TestServer::start(fast_config()).await;
    let response = raw_call(&server, "/heartbeat.v1.HeartbeatService/Beat", &[], None).await;
    assert_trailers_only(&response, Code::Unimplemented);
    let path = "/heartbeat.v1.HeartbeatService/Heartbeat";
    let response = raw_call(&server, path, &[("grpc-encoding", "gzip")], None).await;
    assert_trailers_only(&response, Code::Unimplemented);
    assert_eq!(
        response
            .headers()
            .get("grpc-accept-encoding")
            .map(|v| v.as_bytes()),
        Some(&b"identity"[..])
    );

    let mut events = server.handle.subscribe();
    let hello = pb::HeartbeatRequest {
        frame: Some(In::Hello(pb::Hello {
            client_id: "squeezed".into(),
            ..Default::default()
        })),
    };
    let mut body = bytes::BytesMut::from(&grpc::frame(&hello)[..]);
    let mut compressed = bytes::BytesMut::from(&grpc::frame(&hello)[..]);
    compressed[0] = 1;
    body.extend_from_slice(&compressed);
    let response = raw_call(&server, path, &[], Some(body.freeze())).await;
    assert_eq!(response.status(), http::StatusCode::OK);
    let opened = next_change(&mut events).await;
    let session_id = &opened.event.session().identity.session_id;
    let closed = event_for(&mut events, session_id, |event| {
        matches!(event, SessionEvent::Closed { .. })
    })
    .await;
    let SessionEvent::Closed {
        reason, message, ..
    } = closed
    else {
        unreachable!("event_for picked a close");
    };
    assert_eq!(reason, CloseReason::ProtocolViolation);
    assert!(message.contains("compressed"), "{message}");
}

/// Tests that a stream that never says Hello is ended at the hello timeout
/// (shorter than the session timeout here) with Goodbye{TIMEOUT} and
/// DEADLINE_EXCEEDED, not before it, and never appears in presence.
#[tokio::test]
async fn a_stream_without_hello_is_ended_at_the_hello_timeout() {
    let config = ServerConfig {
        ping_interval: Duration::from_secs(1),
        timeout: Duration::from_secs(3),
        hello_timeout: Duration::from_millis(200),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut events = server.handle.subscribe();
    // Taken before the stream opens: the server's deadline starts after it.
    let opened = Instant::now();
    let mut session = RawSession::open(server.addr).await.expect("admitted");
    let ended = session
        .expect_end(GoodbyeReason::Timeout, Code::DeadlineExceeded)
        .await;
    assert_on_time(
        "the hello deadline",
        ended.at,
        opened + Duration::from_millis(200),
        Duration::from_millis(500),
    );
    assert!(
        ended.status.message().contains("no Hello within 200ms"),
        "{:?}",
        ended.status
    );
    assert_eq!(server.handle.admitted(), 0, "the slot is free");
    assert!(server.handle.registry().is_empty());
    // Presence never saw the stream: the next change is this later session's.
    let (_later, welcome) = RawSession::hello(server.addr, "later").await;
    let change = next_change(&mut events).await;
    assert_eq!(
        change.event.session().identity.session_id,
        welcome.session_id
    );
}

/// Tests that a Hello carrying a control character (in its client id, a
/// label key or a label value) is a protocol violation that never opens.
#[tokio::test]
async fn control_characters_in_hello_are_a_violation() {
    let server = TestServer::start(fast_config()).await;
    for (client_id, labels) in [
        ("forged\nsession opened", vec![]),
        ("esc", vec![("k\u{1b}[31m", "v")]),
        ("del", vec![("k", "v\u{7f}")]),
    ] {
        let mut session = RawSession::open(server.addr).await.expect("admitted");
        let hello = pb::Hello {
            client_id: client_id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        session.send(In::Hello(hello)).await;
        let ended = session
            .expect_end(GoodbyeReason::ProtocolViolation, Code::InvalidArgument)
            .await;
        let message = ended.status.message();
        assert!(message.contains("control character"), "{message}");
        assert!(
            !message.chars().any(char::is_control),
            "escaped: {message:?}"
        );
    }
    assert!(server.handle.registry().is_empty());
}

/// Tests that a 15 KB label key (just under the frame limit) comes back
/// quoted in a few bytes: the status message and the goodbye stay within
/// the contract's 1 KiB.
#[tokio::test]
async fn echoed_client_input_is_cut() {
    let server = TestServer::start(fast_config()).await;
    let mut session = RawSession::open(server.addr).await.expect("admitted");
    let hello = pb::Hello {
        client_id: "big-key".into(),
        labels: [("k".repeat(15 * 1024), String::new())].into(),
    };
    session.send(In::Hello(hello)).await;
    let ended = session
        .expect_end(GoodbyeReason::ProtocolViolation, Code::InvalidArgument)
        .await;
    assert!(
        ended.status.message().len() <= 1024,
        "{}",
        ended.status.message().len()
    );
    let goodbye = ended.goodbye.expect("a goodbye");
    assert!(goodbye.message.len() <= 1024, "{}", goodbye.message.len());
    assert!(
        goodbye.message.contains("15360 bytes"),
        "{}",
        goodbye.message
    );
}

/// Tests that a client's goodbye message is stored and passed on only up to
/// 1 KiB, cut at a character boundary, and the call still ends OK.
#[tokio::test]
async fn a_long_goodbye_message_is_cut_to_one_kib() {
    let server = TestServer::start(fast_config()).await;
    let mut events = server.handle.subscribe();
    let (mut session, welcome) = RawSession::hello(server.addr, "talkative").await;
    session
        .send(In::Goodbye(pb::Goodbye {
            reason: GoodbyeReason::ClientShutdown.into(),
            message: "é".repeat(1500),
            reconnect_after: None,
        }))
        .await;
    let ended = session.ended().await;
    assert_eq!(ended.status.code(), Code::Ok, "{:?}", ended.status);
    assert!(ended.status.message().is_empty(), "nothing echoed");
    let event = event_for(&mut events, &welcome.session_id, |event| {
        matches!(event, SessionEvent::Closed { .. })
    })
    .await;
    let SessionEvent::Closed {
        message, reason, ..
    } = event
    else {
        unreachable!("event_for matched a close")
    };
    assert_eq!(reason, CloseReason::ClientGoodbye);
    assert_eq!(message.len(), 1024);
    assert!(message.chars().all(|c| c == 'é'));
}
