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
    server.shutdown().await.expect("clean shutdown");
}

/// Tests the size limit: a message one byte over it ends the session with
/// Goodbye{PROTOCOL_VIOLATION} and close code 4005, in both subprotocols;
/// one at the limit is read (and, being no frame, is a violation of its own).
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
