//! Sessions over WebSocket, as the contract's "Browsers" section maps them:
//! a real server, a real WebSocket client over real TCP, and the registry
//! and presence watched as for any other session. The browser itself (the
//! client module, the presence page) is covered in `tests/browser.rs`.

mod support;

use std::{net::SocketAddr, time::Duration};

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use support::{closed, event_for, fast_config, free_port, within, TestServer, WAIT};
use tokio::{net::TcpStream, time::Instant};
use tokio_tungstenite::{
    tungstenite::{
        client::IntoClientRequest,
        protocol::{frame::coding::CloseCode, CloseFrame},
        Message,
    },
    MaybeTlsStream, WebSocketStream,
};
use tonic_heartbeat::{
    config::{AdminToken, WebConfig},
    protocol::pb::{self, heartbeat_request::Frame as In, heartbeat_response::Frame as Out},
    registry::SessionEvent,
    CloseReason, ServerConfig,
};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A fast server with a browser listener.
async fn web_server(adjust: impl FnOnce(&mut ServerConfig)) -> (TestServer, SocketAddr) {
    let web = free_port();
    let mut config = fast_config();
    config.web = Some(WebConfig::new(web));
    adjust(&mut config);
    (TestServer::start(config).await, web)
}

/// Opens `/v1/heartbeat` offering `protocols`, with `headers`.
async fn open(
    web: SocketAddr,
    protocols: &str,
    headers: &[(&'static str, &str)],
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("ws://{web}/v1/heartbeat")
        .into_client_request()
        .expect("a valid URL");
    if !protocols.is_empty() {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", protocols.parse().expect("header"));
    }
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, value.parse().expect("header"));
    }
    let (socket, _) = within(WAIT, tokio_tungstenite::connect_async(request)).await?;
    Ok(socket)
}

/// The HTTP status an upgrade was refused with.
async fn refused(web: SocketAddr, protocols: &str, headers: &[(&'static str, &str)]) -> u16 {
    match open(web, protocols, headers).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Ok(_) => panic!("the upgrade was accepted"),
        Err(other) => panic!("the upgrade failed otherwise: {other}"),
    }
}

fn encode(frame: In) -> Message {
    Message::Binary(
        pb::HeartbeatRequest { frame: Some(frame) }
            .encode_to_vec()
            .into(),
    )
}

fn hello(client_id: &str) -> In {
    In::Hello(pb::Hello {
        client_id: client_id.into(),
        labels: [("tab".to_owned(), "one".to_owned())].into(),
    })
}

/// The next server frame on a `heartbeat.v1.proto` socket; `Err` with the
/// close frame once it closes.
async fn next_frame(socket: &mut Socket) -> Result<Out, Option<CloseFrame>> {
    loop {
        match within(WAIT, socket.next()).await {
            Some(Ok(Message::Binary(bytes))) => {
                let response = pb::HeartbeatResponse::decode(bytes).expect("a HeartbeatResponse");
                return Ok(response.frame.expect("a frame"));
            }
            Some(Ok(Message::Close(close))) => return Err(close),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Reads until the close frame, answering pings; returns the close and the
/// goodbye before it, if any.
async fn until_close(socket: &mut Socket) -> (Option<pb::Goodbye>, CloseFrame) {
    let mut goodbye = None;
    loop {
        match next_frame(socket).await {
            Ok(Out::Goodbye(said)) => goodbye = Some(said),
            Ok(Out::Ping(ping)) => {
                let _ = socket
                    .send(encode(In::Pong(pb::Pong { seq: ping.seq })))
                    .await;
            }
            Ok(_) => {}
            Err(close) => return (goodbye, close.expect("a close frame with a code")),
        }
    }
}

/// A `Ping{seq: 7}` padded with an unknown field to exactly `size` bytes.
fn at_limit(protocol: &str, size: usize) -> Message {
    if protocol == "heartbeat.v1.json" {
        let bare = r#"{"ping":{"seq":"7"},"pad":""}"#;
        let pad = "x".repeat(size - bare.len());
        return Message::Text(format!(r#"{{"ping":{{"seq":"7"}},"pad":"{pad}"}}"#).into());
    }
    let mut bytes = pb::HeartbeatRequest {
        frame: Some(In::Ping(pb::Ping { seq: 7 })),
    }
    .encode_to_vec();
    // Field 15, length-delimited, which the decoder skips: its tag, a
    // two-byte length, then the padding.
    let pad = size - bytes.len() - 3;
    bytes.push(15 << 3 | 2);
    bytes.push(u8::try_from(pad & 0x7f).expect("seven bits") | 0x80);
    bytes.push(u8::try_from(pad >> 7).expect("under 2^14"));
    bytes.resize(size, 0);
    Message::Binary(bytes.into())
}

/// Waits for a session of `client_id` to open; returns its id.
async fn opened_by(
    sessions: &mut tonic_heartbeat::registry::Subscription,
    client_id: &str,
) -> String {
    loop {
        let change = support::next_change(sessions).await;
        if let SessionEvent::Opened(session) = &change.event {
            if session.identity.client_id == client_id {
                return session.identity.session_id.clone();
            }
        }
    }
}

/// Says hello and returns the Welcome.
async fn say_hello(socket: &mut Socket, client_id: &str) -> pb::Welcome {
    socket.send(encode(hello(client_id))).await.expect("send");
    match next_frame(socket).await {
        Ok(Out::Welcome(welcome)) => welcome,
        other => panic!("expected a Welcome, got {other:?}"),
    }
}

/// Tests a session over `heartbeat.v1.proto`: Welcome, the server's pings
/// answered, the client's ping ponged, presence with labels and peer, and a
/// client goodbye recorded as CLIENT_GOODBYE with close code 1000.
#[tokio::test]
async fn a_protobuf_session_lives_and_says_goodbye() {
    let (server, web) = web_server(|_| {}).await;
    let mut sessions = server.handle.subscribe();
    let mut socket = open(web, "heartbeat.v1.proto", &[]).await.expect("upgrade");
    let welcome = say_hello(&mut socket, "w-proto").await;
    let opened = event_for(&mut sessions, &welcome.session_id, |event| {
        matches!(event, SessionEvent::Opened(_))
    })
    .await;
    let identity = &opened.session().identity;
    assert_eq!(identity.client_id, "w-proto");
    assert_eq!(identity.labels.get("tab").map(String::as_str), Some("one"));
    assert!(identity.peer.is_some_and(|peer| peer.ip().is_loopback()));
    // Alive across several timeouts by answering the server's pings.
    let until = Instant::now() + Duration::from_millis(1000);
    let mut pings = 0;
    while Instant::now() < until {
        match next_frame(&mut socket).await.expect("open") {
            Out::Ping(ping) => {
                pings += 1;
                socket
                    .send(encode(In::Pong(pb::Pong { seq: ping.seq })))
                    .await
                    .expect("pong");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pings >= 5, "{pings} pings in a second at 100 ms");
    socket
        .send(encode(In::Ping(pb::Ping { seq: 1 })))
        .await
        .expect("ping");
    loop {
        match next_frame(&mut socket).await.expect("open") {
            Out::Pong(pong) => {
                assert_eq!(pong.seq, 1);
                break;
            }
            Out::Ping(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    socket
        .send(encode(In::Goodbye(pb::Goodbye {
            reason: pb::GoodbyeReason::ClientShutdown.into(),
            ..Default::default()
        })))
        .await
        .expect("goodbye");
    let (goodbye, close) = until_close(&mut socket).await;
    assert_eq!(goodbye, None, "the client's own end needs no goodbye back");
    assert_eq!(close.code, CloseCode::Normal);
    let (reason, _) = closed(&mut sessions, &welcome.session_id).await;
    assert_eq!(reason, CloseReason::ClientGoodbye);
    server.shutdown().await.expect("clean shutdown");
}

/// Tests `heartbeat.v1.json`: frames in proto3 JSON both ways, and a close
/// frame without a Goodbye recorded as CLIENT_HALF_CLOSE.
#[tokio::test]
async fn a_json_session_speaks_proto3_json() {
    let (server, web) = web_server(|_| {}).await;
    let mut sessions = server.handle.subscribe();
    let mut socket = open(web, "heartbeat.v1.json", &[]).await.expect("upgrade");
    socket
        .send(Message::Text(
            r#"{"hello":{"clientId":"w-json","labels":{"tab":"two"}}}"#.into(),
        ))
        .await
        .expect("hello");
    let welcome = match within(WAIT, socket.next()).await {
        Some(Ok(Message::Text(text))) => {
            let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            assert_eq!(value["welcome"]["pingInterval"], "0.100s", "{text}");
            assert_eq!(value["welcome"]["timeout"], "0.300s", "{text}");
            value["welcome"]["sessionId"]
                .as_str()
                .expect("id")
                .to_owned()
        }
        other => panic!("expected a text Welcome, got {other:?}"),
    };
    socket
        .send(Message::Text(r#"{"ping":{"seq":"9"}}"#.into()))
        .await
        .expect("ping");
    loop {
        match within(WAIT, socket.next()).await {
            Some(Ok(Message::Text(text))) if text.contains("pong") => {
                assert_eq!(text.as_str(), r#"{"pong":{"seq":"9"}}"#);
                break;
            }
            Some(Ok(Message::Text(text))) => assert!(text.starts_with(r#"{"ping":"#), "{text}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    socket.close(None).await.expect("close");
    let (reason, _) = closed(&mut sessions, &welcome).await;
    assert_eq!(reason, CloseReason::ClientHalfClose);
    server.shutdown().await.expect("clean shutdown");
}

/// Tests the upgrade's refusals: no subprotocol of ours (400), a page origin
/// not allowed (403), and one that is (listed, or the listener's own).
#[tokio::test]
async fn upgrades_are_checked() {
    let (server, web) = web_server(|config| {
        if let Some(web) = &mut config.web {
            web.allowed_origins = vec!["https://app.example.com".into()];
        }
    })
    .await;
    assert_eq!(refused(web, "", &[]).await, 400);
    assert_eq!(refused(web, "chat", &[]).await, 400);
    assert_eq!(
        refused(
            web,
            "heartbeat.v1.proto",
            &[("origin", "https://evil.example.com")]
        )
        .await,
        403
    );
    open(
        web,
        "heartbeat.v1.proto",
        &[("origin", "https://app.example.com")],
    )
    .await
    .expect("an allowed origin");
    server.shutdown().await.expect("clean shutdown");

    // Without a list, a page served by the listener itself may connect.
    let (server, web) = web_server(|_| {}).await;
    let own = format!("http://{web}");
    open(web, "heartbeat.v1.proto", &[("origin", own.as_str())])
        .await
        .expect("the listener's own origin");
    assert_eq!(
        refused(
            web,
            "heartbeat.v1.proto",
            &[("origin", "http://elsewhere:1")]
        )
        .await,
        403
    );
    // A DNS name rebound to this listener is no "own" origin.
    assert_eq!(
        refused(
            web,
            "heartbeat.v1.proto",
            &[
                ("origin", "http://rebound.example"),
                ("host", "rebound.example")
            ]
        )
        .await,
        403
    );
    server.shutdown().await.expect("clean shutdown");
}

/// Tests the size limit: a ping padded to exactly the limit is read and
/// ponged, and a message one byte over it ends the session with
/// Goodbye{PROTOCOL_VIOLATION} and close code 4005, in both subprotocols.
#[tokio::test]
async fn a_message_over_the_limit_is_a_protocol_violation() {
    let (server, web) = web_server(|config| config.limits.max_message_size = 1024).await;
    let mut sessions = server.handle.subscribe();
    for (protocol, oversize) in [
        (
            "heartbeat.v1.proto",
            Message::Binary(vec![0u8; 1025].into()),
        ),
        (
            "heartbeat.v1.json",
            Message::Text(
                format!(
                    r#"{{"ping":{{"seq":"1"}},"pad":"{}"}}"#,
                    "x".repeat(1025 - 29)
                )
                .into(),
            ),
        ),
    ] {
        let mut socket = open(web, protocol, &[]).await.expect("upgrade");
        let hello = match protocol {
            "heartbeat.v1.proto" => encode(hello("w-big")),
            _ => Message::Text(r#"{"hello":{"clientId":"w-big"}}"#.into()),
        };
        socket.send(hello).await.expect("hello");
        let session_id = opened_by(&mut sessions, "w-big").await;
        socket.send(at_limit(protocol, 1024)).await.expect("send");
        let ponged = loop {
            match within(WAIT, socket.next()).await {
                Some(Ok(Message::Binary(bytes))) => {
                    let frame = pb::HeartbeatResponse::decode(bytes).expect("a frame").frame;
                    if let Some(Out::Pong(pong)) = frame {
                        break pong.seq;
                    }
                }
                Some(Ok(Message::Text(text))) if text.contains("pong") => {
                    assert_eq!(text.as_str(), r#"{"pong":{"seq":"7"}}"#);
                    break 7;
                }
                Some(Ok(_)) => {}
                other => panic!("{protocol}: unexpected {other:?}"),
            }
        };
        assert_eq!(ponged, 7, "{protocol}");
        assert_eq!(oversize.len(), 1025, "{protocol}");
        socket.send(oversize).await.expect("send");
        let close = loop {
            match within(WAIT, socket.next()).await {
                Some(Ok(Message::Close(close))) => break close.expect("a code"),
                Some(Ok(_)) => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(u16::from(close.code), 4005, "{protocol}: {close:?}");
        assert!(close.reason.contains("1025 bytes"), "{protocol}: {close:?}");
        let (reason, _) = closed(&mut sessions, &session_id).await;
        assert_eq!(reason, CloseReason::ProtocolViolation, "{protocol}");
    }
    server.shutdown().await.expect("clean shutdown");
}

/// Tests the deadline over WebSocket: a socket that says Hello and then
/// nothing is ended with Goodbye{TIMEOUT} and close code 4003, not before
/// the timeout; one that sends only WebSocket pings stays alive, since the
/// transport's keepalive counts as liveness.
#[tokio::test]
async fn silence_times_out_and_websocket_pings_count() {
    // Timing with room for a busy machine: pings every 100 ms against 1 s.
    let (server, web) = web_server(|config| {
        config.ping_interval = Duration::from_millis(300);
        config.timeout = Duration::from_secs(1);
        config.min_ping_interval = Duration::from_millis(50);
    })
    .await;
    let mut sessions = server.handle.subscribe();
    let mut silent = open(web, "heartbeat.v1.proto", &[]).await.expect("upgrade");
    let silent_id = say_hello(&mut silent, "w-silent").await.session_id;
    let said_hello = Instant::now();
    let mut pinging = open(web, "heartbeat.v1.proto", &[]).await.expect("upgrade");
    let pinging_id = say_hello(&mut pinging, "w-pinging").await.session_id;
    // The pinging socket sends WebSocket pings (no frames) every 100 ms.
    let keepalive = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        for _ in 0..30 {
            every.tick().await;
            if pinging
                .send(Message::Ping(Vec::new().into()))
                .await
                .is_err()
            {
                break;
            }
            // Drain what the server sends (its pings, the pongs) unanswered.
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(1), pinging.next()).await
            {}
        }
        pinging
    });
    let mut goodbye = None;
    let close = loop {
        match within(WAIT, silent.next()).await {
            Some(Ok(Message::Binary(bytes))) => {
                if let Some(Out::Goodbye(said)) =
                    pb::HeartbeatResponse::decode(bytes).expect("frame").frame
                {
                    goodbye = Some(said);
                }
            }
            Some(Ok(Message::Close(close))) => break close.expect("a code"),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(
        said_hello.elapsed() >= Duration::from_secs(1),
        "ended early"
    );
    assert_eq!(u16::from(close.code), 4003, "{close:?}");
    assert_eq!(
        goodbye.map(|said| said.reason()),
        Some(pb::GoodbyeReason::Timeout)
    );
    assert_eq!(
        closed(&mut sessions, &silent_id).await.0,
        CloseReason::Timeout
    );
    let mut pinging = keepalive.await.expect("keepalive task");
    assert!(
        server.handle.registry().session(&pinging_id).is_some(),
        "WebSocket pings kept the session alive past three timeouts"
    );
    // Once the pings stop, it times out like any other.
    let (goodbye, close) = until_close_silently(&mut pinging).await;
    assert_eq!(
        goodbye.map(|said| said.reason()),
        Some(pb::GoodbyeReason::Timeout)
    );
    assert_eq!(u16::from(close.code), 4003);
    server.shutdown().await.expect("clean shutdown");
}

/// Reads until the close frame without answering anything.
async fn until_close_silently(socket: &mut Socket) -> (Option<pb::Goodbye>, CloseFrame) {
    let mut goodbye = None;
    loop {
        match next_frame(socket).await {
            Ok(Out::Goodbye(said)) => goodbye = Some(said),
            Ok(_) => {}
            Err(close) => return (goodbye, close.expect("a close frame with a code")),
        }
    }
}

/// Tests the same credentials as gRPC: a token in the subprotocol list or
/// the authorization header opens, none is 401 at the upgrade, and a Hello
/// outside the token's ids closes with 1008 and never reaches presence.
#[tokio::test]
async fn client_credentials_apply_to_websockets() {
    let (server, web) = web_server(|config| {
        let table = tonic_heartbeat::credentials::CredentialTable::parse("page-token page-*\n")
            .expect("valid credentials");
        config.client_credentials = Some(
            tonic_heartbeat::credentials::ClientCredentials::from_table(table),
        );
    })
    .await;
    assert_eq!(refused(web, "heartbeat.v1.proto", &[]).await, 401);
    assert_eq!(
        refused(web, "heartbeat.v1.proto, bearer.guess", &[]).await,
        401
    );
    let mut by_protocol = open(web, "heartbeat.v1.proto, bearer.page-token", &[])
        .await
        .expect("a token in the subprotocol list");
    say_hello(&mut by_protocol, "page-1").await;
    let mut by_header = open(
        web,
        "heartbeat.v1.proto",
        &[("authorization", "Bearer page-token")],
    )
    .await
    .expect("a token in the header");
    say_hello(&mut by_header, "page-2").await;
    let mut outside = open(web, "heartbeat.v1.proto, bearer.page-token", &[])
        .await
        .expect("upgrade");
    outside.send(encode(hello("admin"))).await.expect("hello");
    let (goodbye, close) = until_close(&mut outside).await;
    assert_eq!(goodbye, None, "a denied Hello gets no frame");
    assert_eq!(close.code, CloseCode::Policy, "{close:?}");
    assert!(
        close.reason.contains("not one your credential allows"),
        "{close:?}"
    );
    let ids = server.client_ids();
    assert!(!ids.contains(&"admin".to_owned()), "{ids:?}");
    server.shutdown().await.expect("clean shutdown");
}

/// Tests replace and evict across transports: a gRPC Hello with a browser
/// session's client id replaces it (4007), and an eviction ends a socket
/// with 4006 and its message.
#[tokio::test]
async fn replace_and_evict_reach_websocket_sessions() {
    let (server, web) = web_server(|_| {}).await;
    let mut sessions = server.handle.subscribe();
    let mut replaced = open(web, "heartbeat.v1.proto", &[]).await.expect("upgrade");
    let replaced_id = say_hello(&mut replaced, "w-shared").await.session_id;
    let (_grpc, _) = support::RawSession::hello(server.addr, "w-shared").await;
    let (goodbye, close) = until_close(&mut replaced).await;
    assert_eq!(
        goodbye.map(|said| said.reason()),
        Some(pb::GoodbyeReason::Replaced)
    );
    assert_eq!(u16::from(close.code), 4007);
    assert_eq!(
        closed(&mut sessions, &replaced_id).await.0,
        CloseReason::Replaced
    );

    let mut evicted = open(web, "heartbeat.v1.json", &[]).await.expect("upgrade");
    evicted
        .send(Message::Text(
            r#"{"hello":{"clientId":"w-evicted"}}"#.into(),
        ))
        .await
        .expect("hello");
    let evicted_id = opened_by(&mut sessions, "w-evicted").await;
    assert!(server.handle.evict(&evicted_id, "make room"));
    let close = loop {
        match within(WAIT, evicted.next()).await {
            Some(Ok(Message::Text(text))) if text.contains("goodbye") => {
                assert!(text.contains("GOODBYE_REASON_EVICTED"), "{text}");
                assert!(text.contains("make room"), "{text}");
            }
            Some(Ok(Message::Close(close))) => break close.expect("a code"),
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 4006);
    assert_eq!(close.reason.as_str(), "make room");
    server.shutdown().await.expect("clean shutdown");
}

/// Tests the drain: open sockets get Goodbye{SERVER_SHUTDOWN} with the
/// reconnect hint and close code 4002, and the server then exits cleanly.
#[tokio::test]
async fn a_drain_closes_websockets_with_the_hint() {
    let (server, web) = web_server(|_| {}).await;
    let mut socket = open(web, "heartbeat.v1.proto", &[]).await.expect("upgrade");
    say_hello(&mut socket, "w-drained").await;
    let reader = tokio::spawn(async move { until_close(&mut socket).await });
    server.shutdown().await.expect("clean shutdown");
    let (goodbye, close) = within(WAIT, reader).await.expect("reader");
    let goodbye = goodbye.expect("a goodbye");
    assert_eq!(goodbye.reason(), pb::GoodbyeReason::ServerShutdown);
    assert_eq!(
        goodbye.reconnect_after,
        Some(tonic_heartbeat::protocol::duration_to_proto(
            Duration::from_secs(1)
        ))
    );
    assert_eq!(u16::from(close.code), 4002);
}

/// Tests how a connection that drops without a close frame ends
/// (DISCONNECTED), and that messages the session cannot take are protocol
/// violations with 4005: text on the binary subprotocol, and JSON that is
/// no frame.
#[tokio::test]
async fn drops_and_malformed_messages_end_sessions_with_their_reasons() {
    let (server, web) = web_server(|_| {}).await;
    let mut sessions = server.handle.subscribe();
    let mut dropped = open(web, "heartbeat.v1.proto", &[]).await.expect("upgrade");
    let dropped_id = say_hello(&mut dropped, "w-dropped").await.session_id;
    drop(dropped);
    assert_eq!(
        closed(&mut sessions, &dropped_id).await.0,
        CloseReason::Disconnected
    );

    for (protocol, hello, bad, expected) in [
        (
            "heartbeat.v1.proto",
            encode(hello("w-text")),
            Message::Text("{}".into()),
            "a text message on heartbeat.v1.proto",
        ),
        (
            "heartbeat.v1.json",
            Message::Text(r#"{"hello":{"clientId":"w-garbage"}}"#.into()),
            Message::Text(r#"{"ping":{"seq":"not a number"}}"#.into()),
            "is not a HeartbeatRequest",
        ),
        (
            "heartbeat.v1.json",
            Message::Text(r#"{"hello":{"clientId":"w-binary"}}"#.into()),
            Message::Binary(vec![1, 2, 3].into()),
            "a binary message on heartbeat.v1.json",
        ),
    ] {
        let mut socket = open(web, protocol, &[]).await.expect("upgrade");
        socket.send(hello).await.expect("hello");
        socket.send(bad).await.expect("send");
        let close = loop {
            match within(WAIT, socket.next()).await {
                Some(Ok(Message::Close(close))) => break close.expect("a code"),
                Some(Ok(_)) => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(u16::from(close.code), 4005, "{protocol}: {close:?}");
        assert!(close.reason.contains(expected), "{protocol}: {close:?}");
    }
    server.shutdown().await.expect("clean shutdown");
}

/// Tests the presence page's endpoints: the page only with --web-ui, the
/// watch as server-sent events of proto3 JSON that need the admin token and
/// resume by Last-Event-ID, and eviction by JSON.
#[tokio::test]
async fn the_presence_endpoints_follow_and_evict() {
    let (server, web) = web_server(|config| {
        config.admin_token = AdminToken::new("s3cret");
        if let Some(web) = &mut config.web {
            web.ui = true;
        }
    })
    .await;
    let page = http_get(web, "/", &[]).await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("<title>heartbeat · presence</title>"),
        "{page}"
    );
    let unauthorized = http_get(web, "/v1/presence/watch", &[]).await;
    assert!(unauthorized.starts_with("HTTP/1.1 401"), "{unauthorized}");
    assert!(
        unauthorized.contains(r#""code":"UNAUTHENTICATED""#),
        "{unauthorized}"
    );

    let mut socket = open(web, "heartbeat.v1.proto", &[]).await.expect("upgrade");
    let id = say_hello(&mut socket, "w-listed").await.session_id;
    let mut watch = SseStream::open(
        web,
        "/v1/presence/watch",
        &[("authorization", "Bearer s3cret")],
    )
    .await;
    let opened = watch.event_with(&id).await;
    assert_eq!(opened["opened"]["clientId"], "w-listed", "{opened}");
    assert_eq!(opened["opened"]["state"], "SESSION_STATE_LIVE", "{opened}");
    let synced = watch.event_with("synced").await;
    let last_id = watch
        .last_id
        .clone()
        .expect("events carry ids after synced");
    assert!(last_id.starts_with(
        &synced["synced"]["epoch"]
            .as_str()
            .expect("epoch")
            .to_string()
    ));

    let evict = http_post(
        web,
        "/v1/presence/evict",
        &[("authorization", "Bearer s3cret")],
        &format!(r#"{{"sessionId":"{id}","message":"from the page"}}"#),
    )
    .await;
    assert!(evict.starts_with("HTTP/1.1 200"), "{evict}");
    let closed_event = watch.event_with("CLOSE_REASON_EVICTED").await;
    assert_eq!(
        closed_event["closed"]["message"], "from the page",
        "{closed_event}"
    );
    let missing = http_post(
        web,
        "/v1/presence/evict",
        &[("authorization", "Bearer s3cret")],
        r#"{"sessionId":"nope"}"#,
    )
    .await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

    // A watch resumed from the synced event replays what came after it (the
    // eviction) before anything else: no reset, no snapshot.
    let mut resumed = SseStream::open(
        web,
        "/v1/presence/watch",
        &[
            ("authorization", "Bearer s3cret"),
            ("last-event-id", &last_id),
        ],
    )
    .await;
    let first = resumed.next_event().await;
    assert_eq!(first["closed"]["reason"], "CLOSE_REASON_EVICTED", "{first}");
    assert_eq!(
        first["closed"]["session"]["sessionId"],
        id.as_str(),
        "{first}"
    );
    server.shutdown().await.expect("clean shutdown");
}

/// One request over a fresh connection; the whole response as text.
async fn http_request(web: SocketAddr, head: String, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(web).await.expect("connect");
    stream
        .write_all(
            format!(
                "{head}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let mut response = Vec::new();
    within(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("read");
    String::from_utf8_lossy(&response).into_owned()
}

fn head(method: &str, web: SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {web}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head
}

async fn http_get(web: SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    http_request(web, head("GET", web, path, headers), "").await
}

async fn http_post(web: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut head = head("POST", web, path, headers);
    head.push_str("content-type: application/json\r\n");
    http_request(web, head, body).await
}

/// A server-sent event stream, read event by event.
struct SseStream {
    stream: tokio::io::BufReader<TcpStream>,
    last_id: Option<String>,
}

impl SseStream {
    async fn open(web: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Self {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(web).await.expect("connect");
        let request = format!("{}\r\n", head("GET", web, path, headers));
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut stream = tokio::io::BufReader::new(stream);
        let mut status = String::new();
        within(WAIT, stream.read_line(&mut status))
            .await
            .expect("status line");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        loop {
            let mut line = String::new();
            within(WAIT, stream.read_line(&mut line))
                .await
                .expect("header");
            if line == "\r\n" {
                break;
            }
        }
        Self {
            stream,
            last_id: None,
        }
    }

    /// The next event's data, as JSON (chunked framing and comments skipped).
    async fn next_event(&mut self) -> serde_json::Value {
        use tokio::io::AsyncBufReadExt;
        loop {
            let mut line = String::new();
            within(WAIT, self.stream.read_line(&mut line))
                .await
                .expect("a line");
            assert!(!line.is_empty(), "the stream ended");
            if let Some(id) = line.strip_prefix("id: ") {
                self.last_id = Some(id.trim().to_owned());
            } else if let Some(data) = line.strip_prefix("data: ") {
                return serde_json::from_str(data.trim()).expect("JSON data");
            }
        }
    }

    /// The next event whose JSON mentions `needle`.
    async fn event_with(&mut self, needle: &str) -> serde_json::Value {
        loop {
            let event = self.next_event().await;
            if event.to_string().contains(needle) {
                return event;
            }
        }
    }
}

/// Tests the rate rule on the transport's own pings: WebSocket pings closer
/// together than the minimum spacing, past the allowed strikes, end the
/// session as TOO_MANY_PINGS (4004); and pings before Hello prove nothing,
/// so a socket that never says Hello still ends at its deadline.
#[tokio::test]
async fn websocket_pings_obey_the_rate_rule_and_do_not_replace_hello() {
    let (server, web) = web_server(|_| {}).await;
    let mut sessions = server.handle.subscribe();
    let mut flooding = open(web, "heartbeat.v1.proto", &[]).await.expect("upgrade");
    let id = say_hello(&mut flooding, "w-flood").await.session_id;
    for _ in 0..4 {
        flooding
            .send(Message::Ping(Vec::new().into()))
            .await
            .expect("ping");
    }
    let (goodbye, close) = until_close_silently(&mut flooding).await;
    assert_eq!(
        goodbye.map(|said| said.reason()),
        Some(pb::GoodbyeReason::TooManyPings)
    );
    assert_eq!(u16::from(close.code), 4004, "{close:?}");
    assert!(close.reason.contains("WebSocket pings"), "{close:?}");
    assert_eq!(
        closed(&mut sessions, &id).await.0,
        CloseReason::TooManyPings
    );

    let mut nameless = open(web, "heartbeat.v1.proto", &[]).await.expect("upgrade");
    let opened_at = Instant::now();
    let pinger = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            if nameless
                .send(Message::Ping(Vec::new().into()))
                .await
                .is_err()
            {
                return;
            }
            let next = tokio::time::timeout(Duration::from_millis(1), nameless.next()).await;
            if let Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) = next {
                return;
            }
        }
    });
    within(WAIT, pinger).await.expect("the pinger");
    assert!(
        opened_at.elapsed() < Duration::from_secs(2),
        "a socket without Hello lived {:?} on WebSocket pings (timeout 300 ms)",
        opened_at.elapsed()
    );
    assert_eq!(server.handle.admitted(), 0, "its slot is free");
    server.shutdown().await.expect("clean shutdown");
}
