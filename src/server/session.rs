//! One heartbeat session: the server's side of one `Heartbeat` stream.
//!
//! [`SessionStream`] is the response stream tonic polls. It is polled on the
//! HTTP/2 stream's own task, so it needs no task of its own: each poll reads
//! whatever client frames are ready (answering a `Ping` at once), and sends the
//! server's own `Ping` when the shared timer wheel says one is due. Deadlines,
//! suspicion and every forced end belong to the liveness layer in front of it;
//! the session decides *what* to say, the layer makes sure the call ends.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Weak,
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::{Status, Streaming};
use tracing::debug;

use super::{admission::AdmissionPermit, drain, farewell, shared::ServerShared};
use crate::{
    config::FrameLimits,
    liveness::{EndCause, LivenessHandle, LivenessObserver, WheelTarget},
    protocol::{
        duration_to_proto,
        pb::{self, heartbeat_request::Frame as In, heartbeat_response::Frame as Out},
        CloseReason, PingLedger, PongMatch, RttEstimator,
    },
    registry::{SessionIdentity, SessionLink, SessionStats},
};

/// Client frames handled in one poll before yielding to other sessions, so a
/// flood on one stream never monopolises a worker thread.
const FRAMES_PER_POLL: usize = 32;

/// The part of a session that its timer, its observer and the registry share.
pub(crate) struct SessionShared {
    /// The server-assigned id.
    id: String,
    /// The call's liveness, to read counters and to end it.
    handle: LivenessHandle,
    /// Settings, registry, and the rest of the server.
    server: Arc<ServerShared>,
    /// Smoothed RTT in microseconds; `u64::MAX` before the first sample.
    srtt_micros: AtomicU64,
    /// Set by the timer wheel when the next server ping is due.
    ping_due: AtomicBool,
    /// The stream's admission slot, freed the moment the call ends.
    permit: AdmissionPermit,
}

/// The response stream of one `Heartbeat` call.
pub(crate) struct SessionStream {
    inbound: Streaming<pb::HeartbeatRequest>,
    shared: Arc<SessionShared>,
    /// Whether `Hello` has arrived and the session is in the registry.
    open: bool,
    /// The client's address, for presence.
    peer: Option<SocketAddr>,
    pings: PingLedger,
    rtt: RttEstimator,
    strikes: StrikeCounter,
    /// Set once the close is recorded: the stream yields nothing more.
    closed: bool,
}

/// What one client frame calls for.
enum Step {
    /// Send this frame now.
    Reply(Out),
    /// Nothing to send.
    Continue,
    /// The client ended the session: record why and finish the call with `OK`.
    ClientEnded(CloseReason, String),
    /// The server ends the session: a goodbye, then an error status.
    ServerEnds(CloseReason, String),
}

/// Counts unsolicited client frames that come too close together.
#[derive(Debug)]
struct StrikeCounter {
    min_spacing: Duration,
    allowed: u32,
    strikes: u32,
    last: Option<Instant>,
}

// === impl SessionStream ===

impl SessionStream {
    pub(crate) fn new(
        server: Arc<ServerShared>,
        handle: LivenessHandle,
        permit: AdmissionPermit,
        peer: Option<SocketAddr>,
        inbound: Streaming<pb::HeartbeatRequest>,
    ) -> Self {
        let config = &server.config;
        let strikes = StrikeCounter {
            min_spacing: config.min_ping_interval,
            allowed: config.ping_strikes,
            strikes: 0,
            last: None,
        };
        let shared = Arc::new(SessionShared {
            id: format!("{:016x}", rand::random::<u64>()),
            handle,
            server,
            srtt_micros: AtomicU64::new(u64::MAX),
            ping_due: AtomicBool::new(false),
            permit,
        });
        // Observed from admission on, so that any end frees the slot at once.
        shared.handle.observe(Arc::new(SessionObserver {
            session: Arc::downgrade(&shared),
        }));
        Self {
            inbound,
            shared,
            open: false,
            peer,
            pings: PingLedger::default(),
            rtt: RttEstimator::default(),
            strikes,
            closed: false,
        }
    }

    fn on_frame(&mut self, frame: Option<In>, now: Instant) -> Step {
        match (self.open, frame) {
            (false, Some(In::Hello(hello))) => {
                match validate_hello(&hello, &self.shared.server.config.limits) {
                    Ok(()) => self.open_session(hello, now),
                    Err(problem) => Step::ServerEnds(CloseReason::ProtocolViolation, problem),
                }
            }
            (false, _) => Step::ServerEnds(
                CloseReason::ProtocolViolation,
                "the first frame must be Hello".into(),
            ),
            (true, Some(In::Hello(_))) => Step::ServerEnds(
                CloseReason::ProtocolViolation,
                "Hello may only be the first frame".into(),
            ),
            (true, Some(In::Ping(ping))) => self
                .unsolicited(now)
                .unwrap_or(Step::Reply(Out::Pong(pb::Pong { seq: ping.seq }))),
            (true, Some(In::Pong(pong))) => match self.pings.pong(pong.seq, now) {
                PongMatch::Answered(rtt) => {
                    self.shared.server.metrics.rtt(rtt);
                    self.rtt.sample(rtt);
                    if let Some(srtt) = self.rtt.smoothed() {
                        let micros = u64::try_from(srtt.as_micros()).unwrap_or(u64::MAX - 1);
                        self.shared.srtt_micros.store(micros, Ordering::Relaxed);
                    }
                    Step::Continue
                }
                PongMatch::Unsolicited => self.unsolicited(now).unwrap_or(Step::Continue),
            },
            (true, Some(In::Goodbye(goodbye))) => {
                Step::ClientEnded(CloseReason::ClientGoodbye, goodbye.message)
            }
            (true, None) => self.unsolicited(now).unwrap_or(Step::Continue),
        }
    }

    /// Counts an unsolicited frame; `Some` ends the session for too many.
    fn unsolicited(&mut self, now: Instant) -> Option<Step> {
        let (struck, over) = self.strikes.record(now);
        if struck {
            self.shared.server.metrics.ping_strike();
        }
        over.then(|| {
            Step::ServerEnds(
                CloseReason::TooManyPings,
                format!(
                    "unsolicited frames closer together than {} more than {} times",
                    humantime::format_duration(self.strikes.min_spacing),
                    self.strikes.allowed
                ),
            )
        })
    }

    /// Registers the session and answers with its `Welcome`.
    fn open_session(&mut self, hello: pb::Hello, now: Instant) -> Step {
        let shared = &self.shared;
        let server = &shared.server;
        let opened = server.registry.open(
            SessionIdentity {
                session_id: shared.id.clone(),
                client_id: hello.client_id,
                labels: hello.labels,
                peer: self.peer,
                opened_at: SystemTime::now(),
            },
            shared.clone(),
        );
        if opened.is_err() {
            // The Hello raced a drain: this session never opens.
            return Step::ServerEnds(CloseReason::ServerShutdown, drain::SHUTDOWN_MESSAGE.into());
        }
        self.open = true;
        let ping_timer: Arc<dyn WheelTarget> = shared.clone();
        server.wheel.insert(
            now + server.config.ping_interval,
            0,
            Arc::downgrade(&ping_timer),
        );
        Step::Reply(Out::Welcome(pb::Welcome {
            session_id: shared.id.clone(),
            ping_interval: Some(duration_to_proto(server.config.ping_interval)),
            timeout: Some(duration_to_proto(server.config.timeout)),
        }))
    }

    /// Wraps a frame for sending, and counts it.
    fn send(&self, frame: Out) -> pb::HeartbeatResponse {
        self.shared.server.metrics.frame_sent();
        pb::HeartbeatResponse { frame: Some(frame) }
    }

    /// Records in the registry why the session closed; the stream yields
    /// nothing more. Used alone when the client ended it.
    fn record_close(&mut self, reason: CloseReason, message: &str) {
        self.closed = true;
        if self.open {
            self.shared
                .server
                .registry
                .close(&self.shared.id, reason, message);
        }
    }

    /// Ends the session from the server's side: the registry first, then the
    /// liveness layer, which sends the goodbye and the status.
    fn end_from_server(&mut self, reason: CloseReason, message: &str) {
        if !self.open {
            debug!(%reason, message, "stream ended before Hello");
        }
        self.record_close(reason, message);
        self.shared.end_stream(reason, message);
    }
}

impl Stream for SessionStream {
    type Item = Result<pb::HeartbeatResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.closed {
            return Poll::Ready(None);
        }
        let mut budget = FRAMES_PER_POLL;
        loop {
            if budget == 0 {
                // Let other sessions run; come back for the rest.
                cx.waker().wake_by_ref();
                break;
            }
            budget -= 1;
            match Pin::new(&mut this.inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(request))) => {
                    this.shared.server.metrics.frame_received();
                    match this.on_frame(request.frame, Instant::now()) {
                        Step::Reply(frame) => return Poll::Ready(Some(Ok(this.send(frame)))),
                        Step::Continue => {}
                        Step::ClientEnded(reason, message) => {
                            this.record_close(reason, &message);
                            return Poll::Ready(None);
                        }
                        Step::ServerEnds(reason, message) => {
                            // The layer performs the ending when it next polls.
                            this.end_from_server(reason, &message);
                            return Poll::Pending;
                        }
                    }
                }
                Poll::Ready(Some(Err(status))) => {
                    if this.shared.handle.inbound_failed() {
                        this.record_close(CloseReason::Disconnected, status.message());
                        return Poll::Ready(None);
                    }
                    // The bytes arrived but are not a HeartbeatRequest.
                    this.end_from_server(
                        CloseReason::ProtocolViolation,
                        &format!("a frame could not be decoded: {}", status.message()),
                    );
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    this.record_close(CloseReason::ClientHalfClose, "");
                    return Poll::Ready(None);
                }
                Poll::Pending => break,
            }
        }
        if this.open && this.shared.ping_due.swap(false, Ordering::AcqRel) {
            let seq = this.pings.next_ping(Instant::now());
            return Poll::Ready(Some(Ok(this.send(Out::Ping(pb::Ping { seq })))));
        }
        Poll::Pending
    }
}

impl Drop for SessionStream {
    fn drop(&mut self) {
        self.shared.permit.release();
        if !self.open || self.closed {
            return;
        }
        // Dropped without a reason of its own: the layer ended it, or the
        // stream or connection went away under it.
        let reason = match self.shared.handle.end_cause() {
            Some(EndCause::Silence) => CloseReason::Timeout,
            Some(EndCause::Oversize) => CloseReason::ProtocolViolation,
            Some(EndCause::Requested) | None => CloseReason::Disconnected,
        };
        self.shared
            .server
            .registry
            .close(&self.shared.id, reason, "");
    }
}

/// Checks a `Hello` against the limits; the error says which and by how much.
fn validate_hello(hello: &pb::Hello, limits: &FrameLimits) -> Result<(), String> {
    if hello.client_id.len() > limits.max_client_id {
        return Err(format!(
            "client_id is {} bytes; the limit is {}",
            hello.client_id.len(),
            limits.max_client_id
        ));
    }
    if hello.labels.len() > limits.max_labels {
        return Err(format!(
            "Hello has {} labels; the limit is {}",
            hello.labels.len(),
            limits.max_labels
        ));
    }
    for (key, value) in &hello.labels {
        if key.is_empty() || key.len() > limits.max_label_key {
            return Err(format!(
                "label key {key:?} is {} bytes; keys must be 1 to {} bytes",
                key.len(),
                limits.max_label_key
            ));
        }
        if value.len() > limits.max_label_value {
            return Err(format!(
                "label {key:?} has a value of {} bytes; the limit is {}",
                value.len(),
                limits.max_label_value
            ));
        }
    }
    Ok(())
}

// === impl StrikeCounter ===

impl StrikeCounter {
    /// Records an unsolicited frame at `now`: whether it earned a strike, and
    /// whether the strikes now exceed the allowance. A frame that keeps its
    /// distance forgives earlier strikes.
    fn record(&mut self, now: Instant) -> (bool, bool) {
        let struck = self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.min_spacing);
        if struck {
            self.strikes = self.strikes.saturating_add(1);
        } else {
            self.strikes = 0;
        }
        self.last = Some(now);
        (struck, self.strikes > self.allowed)
    }
}

// === impl SessionShared ===

impl SessionLink for SessionShared {
    fn stats(&self) -> SessionStats {
        let srtt = self.srtt_micros.load(Ordering::Relaxed);
        SessionStats {
            last_seen: self.handle.last_seen(),
            rtt: (srtt != u64::MAX).then(|| Duration::from_micros(srtt)),
            frames_in: self.handle.frames_in(),
            frames_out: self.handle.frames_out(),
        }
    }

    fn end_stream(&self, reason: CloseReason, message: &str) {
        let reconnect_after =
            (reason == CloseReason::ServerShutdown).then_some(self.server.config.reconnect_after);
        self.handle
            .end(farewell::ending_for(reason, message, reconnect_after));
    }
}

impl WheelTarget for SessionShared {
    /// The server's ping timer: flags a ping as due and wakes the stream.
    fn fire(&self, _token: u64, now: Instant) -> Option<Instant> {
        if self.handle.end_cause().is_some() {
            return None;
        }
        self.ping_due.store(true, Ordering::Release);
        self.handle.wake();
        Some(now + self.server.config.ping_interval)
    }
}

/// Forwards liveness changes to the registry. Holds the session weakly: the
/// call's state owns the observer, and the session owns the call's handle.
struct SessionObserver {
    session: Weak<SessionShared>,
}

impl LivenessObserver for SessionObserver {
    fn suspected(&self) {
        if let Some(session) = self.session.upgrade() {
            session.server.registry.suspect(&session.id);
        }
    }

    fn recovered(&self) {
        if let Some(session) = self.session.upgrade() {
            session.server.registry.recover(&session.id);
        }
    }

    fn ended(&self, cause: EndCause) {
        let Some(session) = self.session.upgrade() else {
            return;
        };
        session.permit.release();
        let (reason, message) = match cause {
            EndCause::Silence => (
                CloseReason::Timeout,
                format!(
                    "no frame from the client for {}",
                    humantime::format_duration(session.server.config.timeout)
                ),
            ),
            EndCause::Oversize => (
                CloseReason::ProtocolViolation,
                format!(
                    "a frame is larger than {} bytes",
                    session.server.config.limits.max_message_size
                ),
            ),
            // Whoever asked for the end has recorded its reason already.
            EndCause::Requested => return,
        };
        session.server.registry.close(&session.id, reason, &message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Tests that strikes accrue only for frames closer than the spacing, and
    /// that the allowance is exceeded on the third close frame.
    #[test]
    fn strikes_accrue_for_close_frames_only() {
        let start = Instant::now();
        let mut counter = StrikeCounter {
            min_spacing: Duration::from_secs(1),
            allowed: 2,
            strikes: 0,
            last: None,
        };
        let mut over_limit = |ms| counter.record(start + Duration::from_millis(ms)).1;
        assert!(!over_limit(0));
        assert!(!over_limit(100));
        assert!(!over_limit(200));
        assert!(!over_limit(1300), "a spaced frame forgives");
        assert!(!over_limit(1400));
        assert!(!over_limit(1500));
        assert!(over_limit(1600));
    }

    /// Tests that each Hello limit is enforced with a message naming it.
    #[test]
    fn hello_limits_are_enforced() {
        let limits = FrameLimits::default();
        let ok = pb::Hello {
            client_id: "a".repeat(256),
            labels: HashMap::from([("k".repeat(63), "v".repeat(256))]),
        };
        assert_eq!(validate_hello(&ok, &limits), Ok(()));
        let cases = [
            (
                pb::Hello {
                    client_id: "a".repeat(257),
                    ..Default::default()
                },
                "client_id is 257 bytes",
            ),
            (
                pb::Hello {
                    labels: (0..33).map(|i| (i.to_string(), String::new())).collect(),
                    ..Default::default()
                },
                "33 labels",
            ),
            (
                pb::Hello {
                    labels: HashMap::from([(String::new(), "v".into())]),
                    ..Default::default()
                },
                "keys must be 1 to 63 bytes",
            ),
            (
                pb::Hello {
                    labels: HashMap::from([("k".into(), "v".repeat(257))]),
                    ..Default::default()
                },
                "value of 257 bytes",
            ),
        ];
        for (hello, expected) in cases {
            let problem = validate_hello(&hello, &limits).expect_err(expected);
            assert!(problem.contains(expected), "{problem}");
        }
    }
}
