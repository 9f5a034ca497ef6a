//! The baseline of the benchmarks: a plain tonic 0.14 bidirectional stream that
//! answers the heartbeat protocol and does nothing else.
//!
//! It answers `Hello` with a `Welcome` and every `Ping` with a `Pong`, through
//! tonic's own prost codec and server with their defaults: no liveness layer, no
//! registry, no server pings, no deadlines. `heartbeat bench` drives it exactly
//! as it drives `heartbeat serve`, so each figure of the server has a plain-tonic
//! figure beside it from the same run.
//!
//! ```text
//! cargo run --release --example echo-server -- 127.0.0.1:50052 --ping-interval 1s
//! ```

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio_stream::{Stream, StreamExt};
use tonic::{
    server::{Grpc, NamedService, StreamingService},
    Request, Response, Status, Streaming,
};
use tonic_heartbeat::protocol::{
    duration_to_proto, grpc,
    pb::{
        heartbeat_request::Frame as In, heartbeat_response::Frame as Out, HeartbeatRequest,
        HeartbeatResponse, Pong, Welcome,
    },
};
use tonic_prost::ProstCodec;

/// The echo service: the Welcome it announces, nothing else.
#[derive(Clone)]
struct Echo {
    interval: Duration,
    timeout: Duration,
}

type Responses = Pin<Box<dyn Stream<Item = Result<HeartbeatResponse, Status>> + Send>>;

impl StreamingService<HeartbeatRequest> for Echo {
    type Response = HeartbeatResponse;
    type ResponseStream = Responses;
    type Future = std::future::Ready<Result<Response<Responses>, Status>>;

    fn call(&mut self, request: Request<Streaming<HeartbeatRequest>>) -> Self::Future {
        let welcome = Welcome {
            session_id: "echo".into(),
            ping_interval: Some(duration_to_proto(self.interval)),
            timeout: Some(duration_to_proto(self.timeout)),
        };
        let replies = request.into_inner().filter_map(move |request| {
            let frame = match request {
                Ok(request) => request.frame,
                Err(status) => return Some(Err(status)),
            };
            let reply = match frame? {
                In::Hello(_) => Out::Welcome(welcome.clone()),
                In::Ping(ping) => Out::Pong(Pong { seq: ping.seq }),
                In::Pong(_) | In::Goodbye(_) => return None,
            };
            Some(Ok(HeartbeatResponse { frame: Some(reply) }))
        });
        std::future::ready(Ok(Response::new(Box::pin(replies) as Responses)))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let echo = self.clone();
        Box::pin(async move {
            if request.uri().path() != grpc::HEARTBEAT_PATH {
                return Ok(Status::unimplemented("only Heartbeat is served here").into_http());
            }
            let mut grpc = Grpc::new(ProstCodec::<HeartbeatResponse, HeartbeatRequest>::default());
            Ok(grpc.streaming(echo, request).await)
        })
    }
}

impl NamedService for Echo {
    const NAME: &'static str = "heartbeat.v1.HeartbeatService";
}

/// `echo-server [ADDR] [--ping-interval D] [--timeout D]`; the durations only
/// fill the Welcome, so the bench pings at the same interval as against the
/// real server.
fn parse_args() -> Result<(SocketAddr, Echo), String> {
    let mut addr: SocketAddr = ([127, 0, 0, 1], 50052).into();
    let mut echo = Echo {
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(30),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut duration = |name: &str| -> Result<Duration, String> {
            let value = args
                .next()
                .ok_or_else(|| format!("{name} needs a value, like 10s"))?;
            humantime::parse_duration(&value)
                .map_err(|_| format!("{name} {value:?} is not a duration: write 10s or 500ms"))
        };
        match arg.as_str() {
            "--ping-interval" => echo.interval = duration("--ping-interval")?,
            "--timeout" => echo.timeout = duration("--timeout")?,
            other => {
                addr = other.parse().map_err(|_| {
                    format!("{other:?} is not an address to listen on: write 127.0.0.1:50052")
                })?
            }
        }
    }
    Ok((addr, echo))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (addr, echo) = parse_args()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("echo-server listening on {}", listener.local_addr()?);
    // Heartbeats are a few bytes that must leave now, as in the server.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(echo)
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
