//! One heartbeat session: the server's side of one `Heartbeat` stream.
//!
//! [`SessionBody`] is the response body hyper polls. It is polled on the
//! HTTP/2 stream's own task, so it needs no task of its own: each poll reads
//! whatever client frames are ready (answering a `Ping` at once), and sends the
//! server's own `Ping` when the shared timer wheel says one is due. Deadlines,
//! suspicion and every forced end belong to the liveness layer in front of it;
//! the session decides *what* to say, the layer makes sure the call ends.
//!
//! It frames gRPC itself (see `heartbeat.rs` for why): whole messages are
//! decoded straight from the layer's chunks (`protocol::grpc::Deframer`), and
//! only a message split across chunks is ever copied.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, OnceLock, Weak,
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use prost::Message;
use tokio::time::Instant;
use tonic::Status;
use tracing::debug;

use super::{
    admission::AdmissionPermit,
    drain, farewell,
    heartbeat::{RefusedFrame, RequestBody},
    shared::ServerShared,
};
use crate::credentials::IdPermit;
use crate::{
    config::{FrameLimits, Suspicion},
    liveness::{EndCause, LivenessHandle, LivenessObserver, LivenessState, WheelTarget},
    protocol::{
        duration_to_proto,
        grpc::{self, Deframer},
        pb::{self, heartbeat_request::Frame as In, heartbeat_response::Frame as Out},
        text::{first_control, Escaped, QUOTE_BYTES},
        CloseReason, Phi, PingLedger, PongMatch, RttEstimator,
    },
    registry::{SessionIdentity, SessionLink, SessionStats},
};

/// Client frames handled in one poll before yielding to other sessions, so a
/// flood on one stream never monopolises a worker thread.
const FRAMES_PER_POLL: usize = 32;

/// The wheel token of a session's ping timer.
const PING_TIMER: u64 = 0;
/// The wheel token of the deadline for `Hello`.
const HELLO_DEADLINE: u64 = 1;
/// The wheel token of rotation: first the session's maximum age, when it
/// reserves a slot, then the slot, when it is asked to rotate.
const ROTATION: u64 = 2;
/// The wheel token of the end of the rotation grace.
const ROTATION_GRACE: u64 = 3;

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
    /// Set by the timer wheel when the session is to be asked to rotate.
    rotate_due: AtomicBool,
    /// Whether the session came of age and holds a rotation slot.
    rotation_slot: AtomicBool,
    /// When the session comes of age, in microseconds since the wheel's
    /// base; `u64::MAX` without rotation (or before Hello).
    rotate_at: AtomicU64,
    /// Where in each ping interval this session's pings fall, in microseconds:
    /// the same for every stream of one connection (see [`ping_phase`]).
    ping_phase: u64,
    /// The stream's admission slot, freed the moment the call ends.
    permit: AdmissionPermit,
    /// Set when `Hello` arrives, so the deadline for it stands down.
    said_hello: AtomicBool,
    /// How the session ended, once that is decided and recorded: a Hello
    /// still on its way when the end was decided closes with this.
    outcome: OnceLock<(CloseReason, String)>,
}

/// The response body of one `Heartbeat` call: a session's frames, or nothing
/// for a stream refused before its session began (its status is in the
/// response's headers: a trailers-only response). Opaque: it is
/// what [`HeartbeatServer`](super::HeartbeatServer) answers with, behind its
/// liveness layer.
pub struct SessionBody(Option<Session>);

impl std::fmt::Debug for SessionBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionBody").finish_non_exhaustive()
    }
}

/// The server's side of one session.
pub(crate) struct Session {
    /// The request as the liveness layer queued it.
    inbound: RequestBody,
    /// Whole messages out of the queued chunks.
    deframer: Deframer,
    shared: Arc<SessionShared>,
    /// Whether `Hello` has arrived and the session is in the registry.
    open: bool,
    /// Set once the session asked for its end: the stream yields nothing more.
    ending: bool,
    /// The client's address, for presence.
    peer: Option<SocketAddr>,
    /// The client ids the stream's credential allows; `None` when client
    /// credentials are off.
    allowed: Option<IdPermit>,
    pings: PingLedger,
    rtt: RttEstimator,
    strikes: StrikeCounter,
}

/// What one client frame calls for.
enum Step {
    /// Send this frame now.
    Reply(Out),
    /// Nothing to send.
    Continue,
    /// The session ends for this reason: the client's doing (a goodbye, a
    /// half-close: status `OK`), or the server's (a goodbye, then an error).
    Conclude(CloseReason, String),
    /// The Hello names a client id its credential does not allow: the session
    /// never opens, and the stream ends with `PERMISSION_DENIED` and no frame.
    Deny(String),
}

/// Counts unsolicited client frames that come too close together (and,
/// on a WebSocket, the transport's own pings).
#[derive(Debug)]
pub(crate) struct StrikeCounter {
    min_spacing: Duration,
    allowed: u32,
    strikes: u32,
    last: Option<Instant>,
}

// === impl SessionBody ===

impl SessionBody {
    /// The body of an admitted stream: its session's frames.
    pub(crate) fn session(session: Session) -> Self {
        Self(Some(session))
    }

    /// The empty body of a stream refused before its session began.
    pub(crate) fn refused() -> Self {
        Self(None)
    }
}

impl Body for SessionBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.0 {
            Some(session) => session
                .poll_replies(cx)
                .map(|message| Some(Ok(Frame::data(message)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

// === impl Session ===

impl Session {
    /// Starts the session of an admitted stream; it opens at `Hello`.
    pub(crate) fn new(
        server: Arc<ServerShared>,
        handle: LivenessHandle,
        permit: AdmissionPermit,
        peer: Option<SocketAddr>,
        ping_group: Option<PingGroup>,
        allowed: Option<IdPermit>,
        inbound: RequestBody,
    ) -> Self {
        let config = &server.config;
        let strikes = StrikeCounter::new(config);
        let ping_phase = ping_phase(ping_group, config.ping_interval);
        let shared = Arc::new(SessionShared {
            id: format!("{:016x}", rand::random::<u64>()),
            handle,
            server,
            srtt_micros: AtomicU64::new(u64::MAX),
            ping_due: AtomicBool::new(false),
            rotate_due: AtomicBool::new(false),
            rotation_slot: AtomicBool::new(false),
            rotate_at: AtomicU64::new(u64::MAX),
            ping_phase,
            permit,
            said_hello: AtomicBool::new(false),
            outcome: OnceLock::new(),
        });
        // Observed from admission on, so that any end frees the slot at once.
        shared.handle.observe(Arc::new(SessionObserver {
            session: Arc::downgrade(&shared),
        }));
        // The silence deadline already runs; a shorter one holds until Hello.
        let config = &shared.server.config;
        if config.hello_timeout < config.timeout {
            let target: Arc<dyn WheelTarget> = shared.clone();
            shared.server.wheel.insert(
                Instant::now() + config.hello_timeout,
                HELLO_DEADLINE,
                Arc::downgrade(&target),
            );
        }
        Self {
            inbound,
            deframer: Deframer::default(),
            shared,
            open: false,
            ending: false,
            peer,
            allowed,
            pings: PingLedger::default(),
            rtt: RttEstimator::default(),
            strikes,
        }
    }

    fn on_frame(&mut self, frame: Option<In>, now: Instant) -> Step {
        match (self.open, frame) {
            (false, Some(In::Hello(hello))) => {
                match validate_hello(&hello, &self.shared.server.config.limits) {
                    Err(problem) => Step::Conclude(CloseReason::ProtocolViolation, problem),
                    Ok(())
                        if self
                            .allowed
                            .as_ref()
                            .is_some_and(|allowed| !allowed.allows(&hello.client_id)) =>
                    {
                        Step::Deny(format!(
                            "client_id \"{}\" is not one your credential allows: use one it names, or ask for a credential that allows it",
                            Escaped::quote(&hello.client_id, QUOTE_BYTES)
                        ))
                    }
                    Ok(()) => self.open_session(hello, now),
                }
            }
            (false, _) => Step::Conclude(
                CloseReason::ProtocolViolation,
                "the first frame must be Hello".into(),
            ),
            (true, Some(In::Hello(_))) => Step::Conclude(
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
                Step::Conclude(CloseReason::ClientGoodbye, goodbye.message)
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
            Step::Conclude(
                CloseReason::TooManyPings,
                self.strikes.exceeded("unsolicited frames"),
            )
        })
    }

    /// Registers the session and answers with its `Welcome`.
    fn open_session(&mut self, hello: pb::Hello, now: Instant) -> Step {
        let shared = &self.shared;
        let server = &shared.server;
        shared.said_hello.store(true, Ordering::Release);
        if shared.handle.end_cause().is_some() {
            // The end was decided while this Hello was on its way: the
            // session never opens (and so never replaces an older one).
            self.ending = true;
            return Step::Continue;
        }
        let opened = server.registry.open(
            SessionIdentity {
                session_id: shared.id.clone(),
                client_id: hello.client_id,
                labels: hello.labels,
                peer: self.peer,
                opened_at: SystemTime::now(),
                node: server.node.clone(),
            },
            shared.clone(),
        );
        if opened.is_err() {
            // The Hello raced a drain: this session never opens.
            return Step::Conclude(CloseReason::ServerShutdown, drain::SHUTDOWN_MESSAGE.into());
        }
        self.open = true;
        if let Some((reason, message)) = shared.outcome.get() {
            // The end was decided while this Hello was on its way, and
            // recorded before the session was in the registry: close it now,
            // for the same reason.
            server.registry.close(&shared.id, *reason, message);
        }
        let timers: Arc<dyn WheelTarget> = shared.clone();
        server
            .wheel
            .insert(shared.next_ping(now), PING_TIMER, Arc::downgrade(&timers));
        if let Some(age) = server.config.max_session_age {
            // ±10 %, drawn per session, so a fleet opened together does not
            // come of age together.
            let at = now + age.mul_f64(rand::random_range(0.9..=1.1));
            shared.rotate_at.store(
                micros(at.saturating_duration_since(server.wheel.base())),
                Ordering::Release,
            );
            server
                .wheel
                .insert(shared.rotation_hop(now), ROTATION, Arc::downgrade(&timers));
        }
        Step::Reply(Out::Welcome(pb::Welcome {
            session_id: shared.id.clone(),
            ping_interval: Some(duration_to_proto(server.config.ping_interval)),
            timeout: Some(duration_to_proto(server.config.timeout)),
        }))
    }

    /// Sends `Goodbye{ROTATE, reconnect_after = 0}` and keeps the stream for
    /// the grace: the client opens its successor, whose Hello replaces this
    /// session (`REPLACED`, which it expects), so presence never shows its
    /// client id missing. A client that never comes back is ended as
    /// `ROTATED` when the grace is over.
    fn ask_to_rotate(&self, out: &mut BytesMut) {
        let server = &self.shared.server;
        server.metrics.rotation();
        let grace = server.config.rotation_grace;
        self.send(
            Out::Goodbye(pb::Goodbye {
                reason: pb::GoodbyeReason::Rotate.into(),
                message: format!(
                    "this session reached the server's maximum age: open a new session with the same client_id within {}",
                    humantime::format_duration(grace)
                ),
                reconnect_after: Some(duration_to_proto(Duration::ZERO)),
            }),
            out,
        );
        let timers: Arc<dyn WheelTarget> = self.shared.clone();
        server.wheel.insert(
            Instant::now() + grace,
            ROTATION_GRACE,
            Arc::downgrade(&timers),
        );
    }

    /// Frames a message onto `out`, and counts it.
    fn send(&self, frame: Out, out: &mut BytesMut) {
        self.shared.server.metrics.frame_sent();
        grpc::put_message(&pb::HeartbeatResponse { frame: Some(frame) }, out);
    }

    /// Ends the session for `reason` (see [`SessionShared::conclude`]); the
    /// stream yields nothing more, and the liveness layer performs the end.
    fn conclude(&mut self, reason: CloseReason, message: &str) {
        if !self.open {
            debug!(%reason, detail = %Escaped::new(message), "stream ended before Hello");
        }
        self.ending = true;
        self.shared.conclude(reason, message);
    }
}

// === impl Session: the frames ===

impl Session {
    /// What to send next: every reply to the frames that were ready, and a
    /// ping if one is due, framed back to back in one chunk (so a client that
    /// pipelines pings gets its pongs in one HTTP/2 frame, not one each).
    /// Never ends by itself: every end of a session is performed by the
    /// liveness layer, which then stops polling this.
    fn poll_replies(&mut self, cx: &mut Context<'_>) -> Poll<Bytes> {
        if self.ending {
            // The liveness layer performs the end when it next polls.
            return Poll::Pending;
        }
        let mut out = BytesMut::new();
        let mut budget = FRAMES_PER_POLL;
        while !self.ending {
            if budget == 0 {
                // Let other sessions run; come back for the rest.
                cx.waker().wake_by_ref();
                break;
            }
            let Some(message) = self.next_message(cx) else {
                break;
            };
            budget -= 1;
            let request = match message.map(pb::HeartbeatRequest::decode) {
                Ok(Ok(request)) => request,
                Ok(Err(error)) => {
                    // The bytes arrived but are not a HeartbeatRequest.
                    self.conclude(
                        CloseReason::ProtocolViolation,
                        &format!("a frame could not be decoded: {error}"),
                    );
                    break;
                }
                Err(problem) => {
                    self.conclude(problem.0, &problem.1);
                    break;
                }
            };
            self.shared.server.metrics.frame_received();
            match self.on_frame(request.frame, Instant::now()) {
                Step::Reply(frame) => self.send(frame, &mut out),
                Step::Continue => {}
                Step::Conclude(reason, message) => self.conclude(reason, &message),
                Step::Deny(message) => {
                    self.ending = true;
                    self.shared
                        .handle
                        .end(farewell::refusal(&Status::permission_denied(message)));
                }
            }
        }
        if !self.ending && self.open && self.shared.ping_due.swap(false, Ordering::AcqRel) {
            let seq = self.pings.next_ping(Instant::now());
            self.send(Out::Ping(pb::Ping { seq }), &mut out);
        }
        if !self.ending && self.open && self.shared.rotate_due.swap(false, Ordering::AcqRel) {
            self.ask_to_rotate(&mut out);
        }
        if out.is_empty() {
            Poll::Pending
        } else {
            // Sent even when the end was just decided: the layer performs it
            // on its next poll, after these replies.
            Poll::Ready(out.freeze())
        }
    }

    /// The next whole message from the client: `None` when none is ready
    /// (or the stream ended, and the session concluded); `Err` with the
    /// close a broken stream calls for.
    fn next_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Option<Result<Bytes, (CloseReason, String)>> {
        loop {
            match self.deframer.next_message() {
                Some(Ok(message)) => return Some(Ok(message)),
                Some(Err(problem)) => {
                    return Some(Err((CloseReason::ProtocolViolation, problem.to_string())))
                }
                None => {}
            }
            match Pin::new(&mut self.inbound).poll_frame(cx) {
                // The client's trailers, if any, say nothing to us.
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.deframer.push(data);
                    }
                }
                // The layer hands on only a failed request: a reset or a
                // lost connection (the client is gone), or a bridge that
                // refused what the client sent (see `RefusedFrame`).
                Poll::Ready(Some(Err(status))) => {
                    let refused = std::error::Error::source(&status)
                        .and_then(|source| source.downcast_ref::<RefusedFrame>());
                    return Some(Err(match refused {
                        Some(refused) => (refused.reason, refused.message.clone()),
                        None => (CloseReason::Disconnected, status.message().to_owned()),
                    }));
                }
                Poll::Ready(None) if self.deframer.is_empty() => {
                    self.conclude(CloseReason::ClientHalfClose, "");
                    return None;
                }
                Poll::Ready(None) => {
                    return Some(Err((
                        CloseReason::ProtocolViolation,
                        "the stream ended inside a message".into(),
                    )))
                }
                Poll::Pending => return None,
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.permit.release();
        // Dropped with its end undecided: the stream was reset or the
        // connection lost under it. Otherwise this changes nothing.
        self.shared.conclude(CloseReason::Disconnected, "");
    }
}

/// Sessions of one connection whose pings fall due together.
const PING_GROUP: u64 = 64;

/// Which connection a session is on, and which of its sessions it is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PingGroup {
    /// The connection's peer address.
    pub(crate) peer: SocketAddr,
    /// The session's place among the connection's sessions: 0, 1, 2, …
    pub(crate) ordinal: u64,
}

/// Where in each ping interval a session's pings fall, in microseconds.
///
/// Sessions of one connection share a phase in groups of [`PING_GROUP`], so
/// their pings come due in the same tick of the wheel: the streams queue them
/// together and HTTP/2 sends them in one write, and their pongs come back in
/// one read. A client that multiplexes many sessions on one connection (an
/// agent, a proxy) costs the server one write per group and interval, not one
/// per session. Groups are small, so that one burst of pings stays short and
/// never holds up other sessions' pongs for long; different groups and
/// connections get different phases, which spreads the pings of many clients
/// over the interval. Without a connection (the service mounted in another
/// server), the phase is random.
fn ping_phase(group: Option<PingGroup>, interval: Duration) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let spread = match group {
        Some(group) => BuildHasherDefault::<DefaultHasher>::default()
            .hash_one((group.peer, group.ordinal / PING_GROUP)),
        None => rand::random(),
    };
    spread % micros(interval).max(1)
}

/// The first instant after `now` on the grid `base + phase + k × interval`.
///
/// So a session's first ping comes within one interval of its Welcome, and
/// every later one exactly one interval after the one before.
fn next_on_grid(base: Instant, now: Instant, phase: u64, interval: Duration) -> Instant {
    let interval = micros(interval).max(1);
    let since = micros(now.saturating_duration_since(base));
    let rounds = match since.checked_sub(phase) {
        None => 0,
        Some(past) => past / interval + 1,
    };
    base + Duration::from_micros(phase.saturating_add(rounds.saturating_mul(interval)))
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Checks a `Hello` against the limits; the error says which and by how
/// much, quoting at most a few bytes of the offending value, escaped.
fn validate_hello(hello: &pb::Hello, limits: &FrameLimits) -> Result<(), String> {
    let quote = |text| Escaped::quote(text, QUOTE_BYTES);
    let controls = std::iter::once(("client_id", hello.client_id.as_str())).chain(
        hello.labels.iter().flat_map(|(key, value)| {
            [("label key", key.as_str()), ("label value", value.as_str())]
        }),
    );
    for (what, text) in controls {
        if let Some((at, c)) = first_control(text) {
            return Err(format!(
                "{what} \"{}\" has the control character U+{:04X} at byte {at}; control characters are not allowed",
                quote(text),
                u32::from(c)
            ));
        }
    }
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
                "label key \"{}\" is {} bytes; keys must be 1 to {} bytes",
                quote(key),
                key.len(),
                limits.max_label_key
            ));
        }
        if value.len() > limits.max_label_value {
            return Err(format!(
                "label \"{}\" has a value of {} bytes; the limit is {}",
                quote(key),
                value.len(),
                limits.max_label_value
            ));
        }
    }
    Ok(())
}

// === impl StrikeCounter ===

impl StrikeCounter {
    /// The rate rule of `config`: its minimum spacing and allowed strikes.
    pub(crate) fn new(config: &crate::config::ServerConfig) -> Self {
        Self {
            min_spacing: config.min_ping_interval,
            allowed: config.ping_strikes,
            strikes: 0,
            last: None,
        }
    }

    /// Why a session that exceeded the allowance with `what` ends.
    pub(crate) fn exceeded(&self, what: &str) -> String {
        format!(
            "{what} closer together than {} more than {} times",
            humantime::format_duration(self.min_spacing),
            self.allowed
        )
    }

    /// Records an unsolicited frame at `now`: whether it earned a strike, and
    /// whether the strikes now exceed the allowance. A frame that keeps its
    /// distance forgives earlier strikes.
    pub(crate) fn record(&mut self, now: Instant) -> (bool, bool) {
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
            phi: Phi(self.handle.phi()),
        }
    }

    /// The one place a session's end is decided, whoever asks (the session
    /// itself, the registry for an eviction, a replacement or a drain, the
    /// hello deadline). The first cause wins, in the liveness layer's one
    /// decision per call; everything else follows from it: the goodbye and
    /// status the client gets, and the close that presence, the log and the
    /// metrics record. If the layer decided first (silence, an oversized
    /// frame), this changes nothing and the observer records that cause.
    fn conclude(&self, reason: CloseReason, message: &str) {
        // A drain's hint is the server's setting; a rotation's is "now",
        // at the ask and again at the end of the grace.
        let reconnect_after = match reason {
            CloseReason::ServerShutdown => Some(self.server.config.reconnect_after),
            CloseReason::Rotated => Some(Duration::ZERO),
            _ => None,
        };
        if self
            .handle
            .end(farewell::ending_for(reason, message, reconnect_after))
        {
            self.record(reason, message);
        }
    }
}

impl SessionShared {
    /// When a suspect session's silence will have been judged (its timeout,
    /// counted from its last frame), if it is suspect and that is later than
    /// `now`: rotation waits for it, once, rather than ask a silent client
    /// to move or end it as `ROTATED`.
    fn silence_judged_at(&self, now: Instant) -> Option<Instant> {
        let judged = self.handle.last_seen() + self.server.config.timeout;
        (self.handle.state() == LivenessState::Suspect && judged > now).then_some(judged)
    }

    /// When the rotation timer next looks: at the session's age, or one
    /// timeout from `now` if that is sooner, so that the entry of a session
    /// that ended early leaves the wheel within a timeout, as its deadline's
    /// does, rather than at an age hours away.
    fn rotation_hop(&self, now: Instant) -> Instant {
        let hop = now + self.server.config.timeout;
        let due = self.rotate_at.load(Ordering::Acquire);
        self.server
            .wheel
            .base()
            .checked_add(Duration::from_micros(due))
            .map_or(hop, |due| due.min(hop))
    }

    /// When the server's next ping after `now` is due: see [`next_on_grid`].
    fn next_ping(&self, now: Instant) -> Instant {
        next_on_grid(
            self.server.wheel.base(),
            now,
            self.ping_phase,
            self.server.config.ping_interval,
        )
    }

    /// Records the decided end: in the registry if the session is open, and
    /// here for a Hello still on its way (see `open_session`).
    fn record(&self, reason: CloseReason, message: &str) {
        let _ = self.outcome.set((reason, message.to_owned()));
        self.server.registry.close(&self.id, reason, message);
    }
}

impl WheelTarget for SessionShared {
    /// The session's timers: the server's pings (flag one as due and wake
    /// the stream), the deadline for `Hello`, and rotation (coming of age,
    /// the reserved slot, the end of the grace).
    fn fire(&self, token: u64, now: Instant) -> Option<Instant> {
        if self.handle.end_cause().is_some() {
            return None;
        }
        let config = &self.server.config;
        match token {
            HELLO_DEADLINE => {
                if !self.said_hello.load(Ordering::Acquire) {
                    let waited = humantime::format_duration(config.hello_timeout);
                    self.conclude(CloseReason::Timeout, &format!("no Hello within {waited}"));
                }
                None
            }
            ROTATION => {
                let since_base = micros(now.saturating_duration_since(self.server.wheel.base()));
                if since_base < self.rotate_at.load(Ordering::Acquire) {
                    return Some(self.rotation_hop(now));
                }
                // A late client is not asked to move: its silence is for
                // suspicion and the timeout to judge, not rotation.
                if let Some(judged) = self.silence_judged_at(now) {
                    return Some(judged);
                }
                // Come of age: take the next slot of the server's pace, and
                // wait for it (in hops) if it is later.
                if !self.rotation_slot.swap(true, Ordering::AcqRel) {
                    let slot = self.server.rotations.reserve(now);
                    if slot > now {
                        let slot_micros =
                            micros(slot.saturating_duration_since(self.server.wheel.base()));
                        self.rotate_at.store(slot_micros, Ordering::Release);
                        return Some(self.rotation_hop(now));
                    }
                }
                self.rotate_due.store(true, Ordering::Release);
                self.handle.wake();
                None
            }
            ROTATION_GRACE => {
                // A client that fell silent since the ask ends by the
                // timeout, as TIMEOUT, which is what happened to it.
                if let Some(judged) = self.silence_judged_at(now) {
                    return Some(judged);
                }
                self.conclude(
                    CloseReason::Rotated,
                    &format!(
                        "asked to rotate {} ago, and no successor said Hello",
                        humantime::format_duration(config.rotation_grace)
                    ),
                );
                None
            }
            PING_TIMER => {
                self.ping_due.store(true, Ordering::Release);
                self.handle.wake();
                Some(self.next_ping(now))
            }
            _ => None,
        }
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
            if session.server.config.suspicion != Suspicion::Fixed {
                session
                    .server
                    .metrics
                    .phi_at_suspicion(session.handle.phi());
            }
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
        let config = &session.server.config;
        match cause {
            // The layer decided: record its cause, as the client heard it.
            EndCause::Silence => {
                session.record(CloseReason::Timeout, &farewell::silence_message(config))
            }
            EndCause::Oversize => session.record(
                CloseReason::ProtocolViolation,
                &farewell::oversize_message(config),
            ),
            // The session decided, in `conclude`, and records it there.
            EndCause::Requested => {}
        }
    }

    fn silence_ended(&self, lateness: Duration) {
        if let Some(session) = self.session.upgrade() {
            session.server.metrics.deadline_lateness(lateness);
        }
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

    /// Tests that the ping grid's next point is strictly after now and at
    /// most one interval away, before the phase, on it, and between points.
    #[test]
    fn the_ping_grid_is_at_most_one_interval_ahead() {
        let base = Instant::now();
        let interval = Duration::from_millis(100);
        let phase = 30_000;
        let at = |ms| base + Duration::from_millis(ms);
        for (now, due) in [
            (0, 30),
            (29, 30),
            (30, 130),
            (31, 130),
            (129, 130),
            (130, 230),
        ] {
            assert_eq!(
                next_on_grid(base, at(now), phase, interval),
                at(due),
                "now {now} ms"
            );
        }
    }

    /// Tests that the sessions of one connection share a phase in groups,
    /// and that groups differ.
    #[test]
    fn a_connection_pings_in_groups() {
        let interval = Duration::from_secs(10);
        let peer = SocketAddr::from(([127, 0, 0, 1], 4000));
        let phase = |ordinal| ping_phase(Some(PingGroup { peer, ordinal }), interval);
        assert!((1..PING_GROUP).all(|ordinal| phase(ordinal) == phase(0)));
        let groups: std::collections::HashSet<u64> =
            (0..8).map(|group| phase(group * PING_GROUP)).collect();
        assert!(groups.len() > 1, "every group on one phase");
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
