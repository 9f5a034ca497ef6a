//! Micro-benchmarks of the per-heartbeat hot path, for repeatable numbers on
//! the pieces the load bench (`heartbeat bench`, `benches/run.py`) measures
//! together:
//!
//! - `frame`: framing a `Pong` as the server sends it, and taking a `Ping` out
//!   of a chunk and decoding it, as the server does;
//! - `liveness`: one message through the liveness layer (framing, the
//!   last-seen `touch`, the read-ahead queue, the service's read);
//! - `wheel`: arming an entry, and a slot of entries coming due;
//! - `registry`: a session's open and close.
//!
//! `cargo bench --bench hot_path`; `-- --quick` for a fast look.

use std::{
    collections::HashMap,
    convert::Infallible,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use prost::Message;
use tonic_heartbeat::{
    liveness::{InboundBody, LivenessLayer, TimerWheel, WheelTarget},
    metrics::Metrics,
    protocol::{
        grpc::{self, Deframer},
        pb::{self, heartbeat_request, heartbeat_response},
        CloseReason,
    },
    registry::{SessionIdentity, SessionLink, SessionRegistry, SessionStats},
};
use tower::{Layer, ServiceExt};

fn ping(seq: u64) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        frame: Some(heartbeat_request::Frame::Ping(pb::Ping { seq })),
    }
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode pong", |b| {
        let mut seq = 0u64;
        b.iter(|| {
            seq += 1;
            let mut out = BytesMut::new();
            grpc::put_message(
                &pb::HeartbeatResponse {
                    frame: Some(heartbeat_response::Frame::Pong(pb::Pong { seq })),
                },
                &mut out,
            );
            out.freeze()
        })
    });
    let wire = grpc::frame(&ping(1_234_567));
    group.bench_function("decode ping", |b| {
        let mut deframer = Deframer::default();
        b.iter(|| {
            deframer.push(wire.clone());
            let payload = deframer
                .next_message()
                .expect("whole")
                .expect("uncompressed");
            pb::HeartbeatRequest::decode(payload).expect("a ping decodes")
        })
    });
    group.finish();
}

/// A request body that yields `count` copies of one framed message.
struct Messages {
    message: Bytes,
    left: usize,
}

impl Body for Messages {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(self.message.clone()))))
    }
}

fn liveness(c: &mut Criterion) {
    const MESSAGES: usize = 1_000;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let message = grpc::frame(&ping(42));
    let mut group = c.benchmark_group("liveness");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group.bench_function("1000 messages through the layer", |b| {
        b.iter_batched(
            || {
                // A service that reads every message, then answers.
                let inner =
                    tower::service_fn(|request: http::Request<InboundBody<Messages>>| async move {
                        let mut body = request.into_body();
                        let mut seen = 0;
                        while let Some(Ok(frame)) = body.frame().await {
                            seen += frame.into_data().map_or(0, |data| data.len());
                        }
                        Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                            Bytes::from(seen.to_string()),
                        )))
                    });
                let service = runtime
                    .block_on(async { LivenessLayer::new(Duration::from_secs(30)).layer(inner) });
                let request = http::Request::new(Messages {
                    message: message.clone(),
                    left: MESSAGES,
                });
                (service, request)
            },
            |(service, request)| {
                runtime.block_on(async {
                    let response = service.oneshot(request).await.expect("answers");
                    response.into_body().collect().await.ok()
                })
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Counts fires; never re-arms.
struct Counter(AtomicUsize);

impl WheelTarget for Counter {
    fn fire(&self, _token: u64, _now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        self.0.fetch_add(1, Ordering::Relaxed);
        None
    }
}

// The tokio clock is paused here, so only std's clock measures real time.
#[allow(clippy::disallowed_types)]
fn wheel(c: &mut Criterion) {
    const ENTRIES: usize = 10_000;
    // A paused clock jumps to the next timer whenever nothing is ready, so
    // the time measured is the wheel's work, not the wait for its tick.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("wheel");
    group.throughput(Throughput::Elements(1));
    group.bench_function("arm an entry", |b| {
        b.iter_custom(|entries| {
            runtime.block_on(async {
                let wheel = TimerWheel::with_shards(2);
                let target: Arc<dyn WheelTarget> = Arc::new(Counter(AtomicUsize::new(0)));
                let far = tokio::time::Instant::now() + Duration::from_secs(3600);
                // The first insert starts the drivers; it is not what is measured.
                wheel.insert(far, 0, Arc::downgrade(&target));
                let started = std::time::Instant::now();
                for entry in 0..entries {
                    // Spread over the slots, as sessions' deadlines are.
                    let at = far + Duration::from_millis(entry % 4096);
                    wheel.insert(at, entry, Arc::downgrade(&target));
                }
                started.elapsed()
            })
        })
    });
    group.throughput(Throughput::Elements(ENTRIES as u64));
    group.bench_function("10k entries come due in one slot", |b| {
        b.iter_custom(|rounds| {
            let mut spent = Duration::ZERO;
            for _ in 0..rounds {
                spent += runtime.block_on(async {
                    let wheel = TimerWheel::with_shards(1);
                    let counter = Arc::new(Counter(AtomicUsize::new(0)));
                    let target: Arc<dyn WheelTarget> = counter.clone();
                    let due = tokio::time::Instant::now() + Duration::from_millis(2);
                    for token in 0..ENTRIES as u64 {
                        wheel.insert(due, token, Arc::downgrade(&target));
                    }
                    let started = std::time::Instant::now();
                    tokio::time::sleep_until(due + Duration::from_millis(1)).await;
                    let spent = started.elapsed();
                    assert_eq!(counter.0.load(Ordering::Relaxed), ENTRIES, "all fired");
                    spent
                });
            }
            spent
        })
    });
    group.finish();
}

/// A session that is never asked anything in these benchmarks.
struct Idle;

impl SessionLink for Idle {
    fn stats(&self) -> SessionStats {
        SessionStats {
            last_seen: tokio::time::Instant::now(),
            rtt: None,
            frames_in: 0,
            frames_out: 0,
            phi: tonic_heartbeat::protocol::Phi::default(),
        }
    }

    fn conclude(&self, _reason: CloseReason, _message: &str) {}
}

fn registry(c: &mut Criterion) {
    let metrics = Arc::new(Metrics::new(&["client_half_close"], &[]));
    let registry = SessionRegistry::new(10_000, 1024, metrics);
    let link: Arc<dyn SessionLink> = Arc::new(Idle);
    let mut next = 0u64;
    let mut group = c.benchmark_group("registry");
    group.throughput(Throughput::Elements(1));
    group.bench_function("open and close a session", |b| {
        b.iter(|| {
            next += 1;
            let session_id = format!("{next:016x}");
            let identity = SessionIdentity {
                session_id: session_id.clone(),
                client_id: format!("bench-{next}"),
                labels: HashMap::new(),
                peer: None,
                opened_at: SystemTime::now(),
                node: String::new(),
            };
            let _ = registry.open(identity, link.clone());
            registry.close(&session_id, CloseReason::ClientHalfClose, "")
        })
    });
    group.finish();
}

criterion_group!(benches, frames, liveness, wheel, registry);
criterion_main!(benches);
