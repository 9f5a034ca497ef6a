//! The liveness layer on its own: in front of an unrelated echo service, and in
//! front of heartbeat handlers that are stuck.

mod support;

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use prost::Message;
use support::{assert_on_time, within, WAIT};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    codegen::http::uri::PathAndQuery,
    server::NamedService,
    transport::{server::TcpIncoming, Endpoint, Server},
    Code, Request, Response, Status, Streaming,
};
use tonic_heartbeat::{
    liveness::{Ending, InboundBody, LivenessLayer},
    protocol::pb::{
        self,
        heartbeat_request::Frame as In,
        heartbeat_response::Frame as Out,
        heartbeat_service_client::HeartbeatServiceClient,
        heartbeat_service_server::{HeartbeatService, HeartbeatServiceServer},
        GoodbyeReason,
    },
};
use tower::{util::BoxCloneSyncService, Layer, ServiceExt};

const TIMEOUT: Duration = Duration::from_millis(300);

type HttpService = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    Infallible,
>;

/// Mounts a boxed service under a fixed gRPC service name.
macro_rules! mount {
    ($ty:ident, $name:literal) => {
        #[derive(Clone)]
        struct $ty(HttpService);

        impl NamedService for $ty {
            const NAME: &'static str = $name;
        }

        impl tower::Service<http::Request<tonic::body::Body>> for $ty {
            type Response = http::Response<tonic::body::Body>;
            type Error = Infallible;
            type Future = <HttpService as tower::Service<http::Request<tonic::body::Body>>>::Future;

            fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                self.0.poll_ready(cx)
            }

            fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
                self.0.call(request)
            }
        }
    };
}

mount!(EchoMount, "toy.Echo");
mount!(HeartbeatMount, "heartbeat.v1.HeartbeatService");

async fn spawn<S>(service: S) -> SocketAddr
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().expect("address")).expect("bind");
    let addr = incoming.local_addr().expect("bound");
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    addr
}

// === the echo toy ===

/// The toy's only message.
#[derive(Clone, PartialEq, Message)]
struct Note {
    #[prost(string, tag = "1")]
    text: String,
}

/// Sends the request's bytes straight back, then `grpc-status: 0`.
struct EchoBody {
    inner: InboundBody<tonic::body::Body>,
    finished: bool,
}

impl Body for EchoBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Ok(_))) => Poll::Pending,
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error))),
            Poll::Ready(None) => {
                self.finished = true;
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", 0.into());
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

async fn echo_server(layer: LivenessLayer) -> SocketAddr {
    let echo = tower::service_fn(
        |request: http::Request<InboundBody<tonic::body::Body>>| async move {
            let body = EchoBody {
                inner: request.into_body(),
                finished: false,
            };
            let mut response = http::Response::new(tonic::body::Body::new(body));
            response
                .headers_mut()
                .insert("content-type", "application/grpc".parse().expect("header"));
            Ok::<_, Infallible>(response)
        },
    );
    let service = layer
        .layer(echo)
        .map_response(|response: http::Response<_>| response.map(tonic::body::Body::new));
    spawn(EchoMount(BoxCloneSyncService::new(service))).await
}

async fn open_echo(addr: SocketAddr) -> (mpsc::Sender<Note>, Streaming<Note>) {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let (notes, requests) = mpsc::channel(16);
    let response = grpc
        .streaming(
            Request::new(ReceiverStream::new(requests)),
            PathAndQuery::from_static("/toy.Echo/Chat"),
            tonic_prost::ProstCodec::<Note, Note>::default(),
        )
        .await
        .expect("call accepted");
    (notes, response.into_inner())
}

/// Waits, silent, for the call to end with DEADLINE_EXCEEDED on time.
async fn assert_silence_ends_the_call(replies: &mut Streaming<Note>) {
    let last = Instant::now();
    let status = within(WAIT, replies.message())
        .await
        .expect_err("call ends");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_on_time(
        "the deadline",
        Instant::now(),
        last + TIMEOUT,
        Duration::from_millis(100),
    );
}

/// Tests that the layer passes an unrelated streaming service's messages both
/// ways, and ends its silent call with the default DEADLINE_EXCEEDED on time.
#[tokio::test]
async fn ends_a_silent_call_of_an_unrelated_service() {
    let addr = echo_server(LivenessLayer::new(TIMEOUT)).await;
    let (notes, mut replies) = open_echo(addr).await;
    for text in ["one", "two"] {
        notes.send(Note { text: text.into() }).await.expect("send");
        let reply = within(WAIT, replies.message()).await.expect("reply");
        assert_eq!(reply.map(|note| note.text), Some(text.to_string()));
    }
    assert_silence_ends_the_call(&mut replies).await;
}

/// Tests that a suspicion threshold longer than the timeout never delays the deadline.
#[tokio::test]
async fn a_long_suspicion_does_not_delay_the_deadline() {
    let addr = echo_server(LivenessLayer::new(TIMEOUT).suspect_after(TIMEOUT * 3)).await;
    let (notes, mut replies) = open_echo(addr).await;
    notes
        .send(Note {
            text: "only".into(),
        })
        .await
        .expect("send");
    within(WAIT, replies.message()).await.expect("reply");
    assert_silence_ends_the_call(&mut replies).await;
}

/// Tests that messages keep an unrelated service's call alive past its timeout.
#[tokio::test]
async fn messages_keep_a_call_alive() {
    let addr = echo_server(LivenessLayer::new(TIMEOUT)).await;
    let (notes, mut replies) = open_echo(addr).await;
    let mut cadence = tokio::time::interval(TIMEOUT / 3);
    for round in 0..12 {
        cadence.tick().await;
        notes
            .send(Note {
                text: format!("{round}"),
            })
            .await
            .expect("send");
        let reply = within(WAIT, replies.message()).await;
        assert!(matches!(reply, Ok(Some(_))), "round {round}: {reply:?}");
    }
}

/// Tests that a message announcing more than the limit ends the call with the
/// oversize ending, before its payload is read.
#[tokio::test]
async fn oversized_message_ends_the_call() {
    let addr = echo_server(LivenessLayer::new(TIMEOUT).max_message_size(64)).await;
    let (notes, mut replies) = open_echo(addr).await;
    notes
        .send(Note {
            text: "z".repeat(100),
        })
        .await
        .expect("send");
    let status = within(WAIT, replies.message())
        .await
        .expect_err("call ends");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

// === stuck heartbeat handlers ===

/// How a stuck handler is stuck.
#[derive(Clone, Copy)]
enum Stuck {
    /// It never answers the call: it waits on a lock that is never released.
    BeforeAnswering,
    /// It answers with a stream that never yields and never reads the request.
    InItsStream,
}

#[derive(Clone)]
struct StuckHandler {
    how: Stuck,
    lock: Arc<tokio::sync::Mutex<()>>,
    _held: Arc<tokio::sync::OwnedMutexGuard<()>>,
}

#[tonic::async_trait]
impl HeartbeatService for StuckHandler {
    type HeartbeatStream = tokio_stream::Pending<Result<pb::HeartbeatResponse, Status>>;

    async fn heartbeat(
        &self,
        _request: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        if let Stuck::BeforeAnswering = self.how {
            let _never = self.lock.lock().await;
        }
        Ok(Response::new(tokio_stream::pending()))
    }
}

fn timeout_goodbye() -> Ending {
    let goodbye = pb::HeartbeatResponse {
        frame: Some(Out::Goodbye(pb::Goodbye {
            reason: GoodbyeReason::Timeout.into(),
            ..Default::default()
        })),
    };
    let payload = goodbye.encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
    framed.extend_from_slice(&payload);
    let mut trailers = HeaderMap::new();
    Status::deadline_exceeded("silent")
        .add_header(&mut trailers)
        .expect("valid status");
    Ending::new(Some(Bytes::from(framed)), trailers)
}

async fn stuck_server(how: Stuck) -> SocketAddr {
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    let held = Arc::new(lock.clone().lock_owned().await);
    let handler = StuckHandler {
        how,
        lock,
        _held: held,
    };
    let service = LivenessLayer::new(TIMEOUT)
        .on_silence(timeout_goodbye())
        .layer(HeartbeatServiceServer::new(handler));
    let service = tower::ServiceExt::<http::Request<tonic::body::Body>>::map_response(
        service,
        |response: http::Response<_>| response.map(tonic::body::Body::new),
    );
    spawn(HeartbeatMount(BoxCloneSyncService::new(service))).await
}

/// Opens a heartbeat call without waiting for its response headers (a handler
/// stuck before answering sends none), sends frames every `every` until `stop`,
/// and returns how the call ended and when the last frame went out.
async fn drive_stuck_call(
    addr: SocketAddr,
    every: Duration,
    frames: usize,
) -> (Option<pb::Goodbye>, Status, Instant, Instant) {
    let mut client = HeartbeatServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let (outbound, requests) = mpsc::channel(64);
    let call = tokio::spawn(async move {
        let mut inbound = client
            .heartbeat(ReceiverStream::new(requests))
            .await?
            .into_inner();
        let mut goodbye = None;
        loop {
            match inbound.message().await {
                Ok(Some(pb::HeartbeatResponse {
                    frame: Some(Out::Goodbye(frame)),
                })) => goodbye = Some(frame),
                Ok(Some(_)) => {}
                Ok(None) => return Ok((goodbye, Status::ok(""), Instant::now())),
                Err(status) => return Ok((goodbye, status, Instant::now())),
            }
        }
    });
    let hello = pb::HeartbeatRequest {
        frame: Some(In::Hello(pb::Hello::default())),
    };
    outbound.send(hello).await.expect("send hello");
    let mut last = Instant::now();
    let mut cadence = tokio::time::interval(every);
    cadence.tick().await;
    for _ in 0..frames {
        cadence.tick().await;
        assert!(
            !call.is_finished(),
            "the call ended while the client kept talking"
        );
        outbound
            .send(pb::HeartbeatRequest { frame: None })
            .await
            .expect("send");
        last = Instant::now();
    }
    let ended: Result<_, Status> = within(WAIT, call).await.expect("call task");
    let (goodbye, status, at) = ended.expect("call opened");
    drop(outbound);
    (goodbye, status, at, last)
}

async fn assert_stuck_handler_does_not_matter(how: Stuck) {
    let addr = stuck_server(how).await;
    // Talking for three timeouts keeps the call alive although nobody reads.
    let (goodbye, status, ended, last) = drive_stuck_call(addr, TIMEOUT / 3, 9).await;
    assert_eq!(goodbye.map(|g| g.reason()), Some(GoodbyeReason::Timeout));
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // Falling silent ends it on time although the handler never returns.
    assert_on_time(
        "the deadline",
        ended,
        last + TIMEOUT,
        Duration::from_millis(100),
    );
}

/// Tests that a handler stuck before answering neither makes a talking client
/// look dead nor keeps a silent one alive.
#[tokio::test]
async fn handler_stuck_before_answering_does_not_matter() {
    assert_stuck_handler_does_not_matter(Stuck::BeforeAnswering).await;
}

/// Tests that a handler whose stream never yields or reads neither makes a
/// talking client look dead nor keeps a silent one alive.
#[tokio::test]
async fn handler_stuck_in_its_stream_does_not_matter() {
    assert_stuck_handler_does_not_matter(Stuck::InItsStream).await;
}
