//! Connections: closed when they never start or sit idle, capped per client
//! IP, and the metrics listener's own bounds.

mod support;

use std::time::Duration;

use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tonic::Code;
use tonic_heartbeat::ServerConfig;

/// Waits for the server to close `stream` (end-of-file or a reset).
async fn closed_by_server(stream: &mut TcpStream) -> Instant {
    let mut buffer = [0u8; 1024];
    loop {
        match within(WAIT, stream.read(&mut buffer)).await {
            Ok(0) | Err(_) => return Instant::now(),
            Ok(_) => {}
        }
    }
}

fn metric(server: &TestServer, name: &str) -> String {
    let text = server.handle.metrics().render(false).0;
    text.lines()
        .find(|line| line.starts_with(name))
        .unwrap_or_default()
        .to_owned()
}

/// Tests that a connection that never sends the HTTP/2 preface is closed at
/// the handshake timeout, not before, and counted.
#[tokio::test]
async fn a_silent_connection_is_closed_at_the_handshake_timeout() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let closed = closed_by_server(&mut stream).await;
    assert_on_time(
        "the handshake close",
        closed,
        started + Duration::from_millis(300),
        Duration::from_millis(500),
    );
    assert_eq!(
        metric(&server, "heartbeat_connections_closed_idle_total"),
        "heartbeat_connections_closed_idle_total 1"
    );
}

/// Tests that a connection that completes the HTTP/2 handshake but opens no
/// stream is closed at the handshake timeout too, and that one whose calls
/// have ended is closed at the idle timeout.
#[tokio::test]
async fn connections_without_calls_are_closed() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
        ..fast_config()
    };
    let server = TestServer::start(config).await;

    let started = Instant::now();
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let (_send, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    within(WAIT, connection).await.expect("closed cleanly");
    assert_on_time(
        "the close of a connection with no stream",
        Instant::now(),
        started + Duration::from_millis(300),
        Duration::from_millis(500),
    );

    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let (mut send, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let request = http::Request::post(format!("http://{}/heartbeat.v1.Nope/Call", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, _) = send.send_request(request, true).expect("send");
    let response = within(WAIT, response).await.expect("response");
    assert_eq!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"12"[..]),
        "an unknown method is UNIMPLEMENTED"
    );
    let call_ended = Instant::now();
    within(WAIT, connection)
        .await
        .expect("join")
        .expect("closed cleanly");
    assert_on_time(
        "the idle close",
        Instant::now(),
        call_ended + Duration::from_millis(600),
        Duration::from_millis(500),
    );
}

/// Tests that one client IP holds at most --max-connections-per-ip
/// connections: one more is closed at once, and counted.
#[tokio::test]
async fn connections_are_capped_per_ip() {
    let config = ServerConfig {
        max_connections_per_ip: 3,
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let (session, _) = RawSession::hello(server.addr, "").await;
        held.push(session);
    }
    let mut extra = TcpStream::connect(server.addr).await.expect("connect");
    let _ = extra.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let closed = closed_by_server(&mut extra).await;
    assert!(closed.elapsed() < Duration::from_secs(1));
    assert_eq!(
        metric(&server, "heartbeat_connections_refused_total"),
        "heartbeat_connections_refused_total 1"
    );
    // Those within the cap are untouched.
    held[0]
        .send(
            tonic_heartbeat::protocol::pb::heartbeat_request::Frame::Ping(
                tonic_heartbeat::protocol::pb::Ping { seq: 1 },
            ),
        )
        .await;
    assert!(held[0].next_frame().await.is_some());
}

/// Tests that one client IP holds at most --max-streams-per-ip calls: one
/// more is RESOURCE_EXHAUSTED, naming the setting, and a slot frees when a
/// call ends.
#[tokio::test]
async fn streams_are_capped_per_ip() {
    let config = ServerConfig {
        max_streams_per_ip: 2,
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let (mut first, _) = RawSession::hello(server.addr, "a").await;
    let (_second, _) = RawSession::hello(server.addr, "b").await;
    let refused = RawSession::open(server.addr).await.err().expect("refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-streams-per-ip"),
        "{refused:?}"
    );
    first.half_close();
    first.ended().await;
    within(WAIT, async {
        loop {
            if RawSession::open(server.addr).await.is_ok() {
                break;
            }
        }
    })
    .await;
}

/// Tests that the metrics listener closes a scrape whose headers never
/// finish, and answers a well-formed one and closes after it.
#[tokio::test]
async fn the_metrics_listener_bounds_its_connections() {
    let metrics_addr = free_port();
    let config = ServerConfig {
        metrics_listen: Some(metrics_addr),
        ..fast_config()
    };
    let _server = TestServer::start(config).await;
    let mut slow = within(WAIT, async {
        loop {
            if let Ok(stream) = TcpStream::connect(metrics_addr).await {
                break stream;
            }
        }
    })
    .await;
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("half a request");
    let started = Instant::now();
    closed_by_server(&mut slow).await;
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "a half-sent request is dropped after the header timeout"
    );

    let mut scrape = TcpStream::connect(metrics_addr).await.expect("connect");
    scrape
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let mut answer = Vec::new();
    within(WAIT, scrape.read_to_end(&mut answer))
        .await
        .expect("the server closes after one answer");
    assert!(String::from_utf8_lossy(&answer).contains("heartbeat_sessions_open"));
}
