//! The client's task: one session after another until it is closed.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use rand::{rngs::StdRng, SeedableRng};
use tokio::{
    sync::{broadcast, mpsc, watch},
    time::{sleep_until, Instant},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{metadata::MetadataMap, transport::Endpoint, Request, Streaming};

use super::{Backoff, ClientEvent, ClientState, LossReason};
use crate::backoff::jitter;
use crate::protocol::{
    pb::{
        self, heartbeat_request::Frame as Out, heartbeat_response::Frame as In,
        heartbeat_service_client::HeartbeatServiceClient, GoodbyeReason,
    },
    proto_to_duration, CloseReason, PingLedger, PongMatch, RttEstimator,
};

/// Frames queued towards the server; a full queue means the transport is stuck,
/// which the timeout will notice.
const OUTBOUND_QUEUE: usize = 16;

/// The interval used if `Welcome` has none, and the bounds on any it has.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const MIN_INTERVAL: Duration = Duration::from_millis(10);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// The longest `reconnect_after` hint the client honours.
const MAX_RECONNECT_HINT: Duration = Duration::from_secs(600);

/// Everything the task needs; built by [`super::ClientBuilder::connect`].
pub(super) struct SessionTask {
    /// The servers to try, in order; never empty.
    pub(super) endpoints: Vec<Endpoint>,
    /// Which of them the next attempt uses.
    pub(super) current: AtomicUsize,
    pub(super) hello: pb::Hello,
    pub(super) metadata: MetadataMap,
    pub(super) backoff: Backoff,
    pub(super) handshake_timeout: Duration,
    pub(super) close_timeout: Duration,
    pub(super) state: watch::Sender<ClientState>,
    pub(super) events: broadcast::Sender<ClientEvent>,
    pub(super) close: watch::Receiver<bool>,
}

/// How one session ended.
enum SessionEnd {
    /// It was lost; `live_for` is how long it had been live (zero if it never was).
    Lost {
        reason: LossReason,
        live_for: Duration,
    },
    /// Its owner closed it.
    Closed,
}

/// How a live session's loop ended.
enum Live {
    /// The session ended (or its owner closed it).
    Ended(SessionEnd),
    /// The server asked it to rotate; it is still open.
    Rotate,
}

/// The longest the old session of a rotation waits for its goodbye to be
/// heard when the client closes mid-rotation.
const RETIRING_GOODBYE: Duration = Duration::from_millis(500);

/// Sends `Goodbye{CLIENT_SHUTDOWN}`, half-closes, and waits (until
/// `deadline`) for the server to finish the call.
async fn say_goodbye(
    outbound: mpsc::Sender<pb::HeartbeatRequest>,
    inbound: &mut Streaming<pb::HeartbeatResponse>,
    deadline: Instant,
) {
    say_goodbye_now(outbound);
    drained(inbound, deadline).await;
}

/// Queues `Goodbye{CLIENT_SHUTDOWN}` and half-closes (dropping the sender).
fn say_goodbye_now(outbound: mpsc::Sender<pb::HeartbeatRequest>) {
    let _ = outbound.try_send(request(Out::Goodbye(pb::Goodbye {
        reason: GoodbyeReason::ClientShutdown.into(),
        message: "the client is closing".into(),
        reconnect_after: None,
    })));
}

/// Reads `inbound` to its end, or until `deadline`.
async fn drained(inbound: &mut Streaming<pb::HeartbeatResponse>, deadline: Instant) {
    let _ = tokio::time::timeout_at(deadline, async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
}

/// Answers the server on `open` (pongs to its pings, its goodbye noted in
/// `exchange`) until the stream ends; the status it ended with, if any. What
/// the old session of a rotation does while its successor says Hello.
async fn keep_answering(open: &mut Open, exchange: &mut Exchange) -> Option<tonic::Status> {
    loop {
        match open.inbound.message().await {
            Ok(Some(response)) => {
                if let Step::Send(frame) = exchange.on_frame(response.frame, Instant::now()) {
                    let _ = open.outbound.try_send(request(frame));
                }
            }
            Ok(None) => return None,
            Err(status) => return Some(status),
        }
    }
}

/// A session that was asked to rotate and has a successor: answers its pings
/// until the server ends it (`REPLACED` once the successor's Hello arrives, or
/// `ROTATED` after the grace), at most `timeout` long. Its end is no loss.
async fn retire(old: Open, timeout: Duration) {
    let Open {
        outbound,
        mut inbound,
        ..
    } = old;
    let _ = tokio::time::timeout(timeout, async {
        while let Ok(Some(response)) = inbound.message().await {
            if let Some(In::Ping(ping)) = response.frame {
                let _ = outbound.try_send(request(Out::Pong(pb::Pong { seq: ping.seq })));
            }
        }
    })
    .await;
}

/// What to do after a loss.
enum Retry {
    /// Wait, then try again.
    After(Duration),
    /// Do not reconnect (a newer session with the same client id took over).
    Never,
}

impl SessionTask {
    pub(super) async fn run(self) {
        let mut rng = StdRng::from_os_rng();
        let mut attempt = 0u32;
        loop {
            self.state.send_replace(ClientState::Connecting);
            let (reason, live_for) = match self.session().await {
                SessionEnd::Closed => break,
                SessionEnd::Lost { reason, live_for } => (reason, live_for),
            };
            // State first, then the event, so a subscriber reading the state on
            // an event sees the state that event announced.
            self.state.send_replace(ClientState::Lost {
                reason: reason.clone(),
            });
            self.emit(ClientEvent::Lost {
                reason: reason.clone(),
            });
            // The next attempt goes to the next server; with one, the same.
            let next = (self.current.load(Ordering::Relaxed) + 1) % self.endpoints.len();
            self.current.store(next, Ordering::Relaxed);
            if live_for >= self.backoff.reset_after() {
                attempt = 0;
            }
            attempt = attempt.saturating_add(1);
            let delay = match self.retry(&reason, attempt, &mut rng) {
                Retry::After(delay) => delay,
                Retry::Never => break,
            };
            if *self.close.borrow() {
                break;
            }
            self.emit(ClientEvent::Reconnecting { attempt, delay });
            if self.closed_within(delay).await {
                break;
            }
        }
        self.state.send_replace(ClientState::Closed);
        self.emit(ClientEvent::Closed);
    }

    fn emit(&self, event: ClientEvent) {
        // No subscriber is fine: events are for whoever listens.
        let _ = self.events.send(event);
    }

    /// Waits `delay`; true if a close was asked for meanwhile.
    async fn closed_within(&self, delay: Duration) -> bool {
        let mut close = self.close.clone();
        tokio::select! {
            () = tokio::time::sleep(delay) => false,
            // An error means the handle was dropped: close too.
            () = close_asked(&mut close) => true,
        }
    }

    /// How long to wait after `reason`, honouring the server's goodbye.
    fn retry(&self, reason: &LossReason, attempt: u32, rng: &mut StdRng) -> Retry {
        let backoff = &self.backoff;
        match reason {
            LossReason::Goodbye {
                reason: CloseReason::Replaced,
                ..
            } => Retry::Never,
            // Spread a fleet told the same hint over half as long again.
            LossReason::Goodbye {
                reconnect_after: Some(after),
                ..
            } => Retry::After(*after + jitter((*after / 2).max(backoff.base()), rng)),
            // The server objected to this client's behaviour or evicted it:
            // coming straight back would only repeat it.
            LossReason::Goodbye {
                reason:
                    CloseReason::TooManyPings | CloseReason::ProtocolViolation | CloseReason::Evicted,
                ..
            } => Retry::After(backoff.cap() / 2 + jitter(backoff.cap() / 2, rng)),
            // Anything else, including a reason newer than this client (which
            // the contract says to treat like a shutdown): the usual backoff.
            _ => Retry::After(backoff.delay(attempt, rng)),
        }
    }

    /// Runs one session from connect to loss or close, moving to a
    /// successor whenever the server asks the session to rotate.
    async fn session(&self) -> SessionEnd {
        let mut open = match self.handshake().await {
            Ok(open) => open,
            Err(end) => return end,
        };
        // Old sessions of rotations, answering the server until it ends
        // them; aborted when this session ends, so a closed client leaves
        // nothing behind.
        let mut retiring = tokio::task::JoinSet::new();
        let mut rotated_from = None;
        loop {
            let (ping_interval, timeout) = adopt(&open.welcome);
            let session_id = open.welcome.session_id.clone();
            self.state.send_replace(ClientState::Live {
                session_id: session_id.clone(),
            });
            self.emit(match rotated_from.take() {
                None => ClientEvent::Connected {
                    session_id: session_id.clone(),
                    ping_interval,
                    timeout,
                },
                Some(from) => ClientEvent::Rotated {
                    from,
                    to: session_id.clone(),
                    ping_interval,
                    timeout,
                },
            });
            let mut exchange = Exchange::new(ping_interval, timeout);
            let old = loop {
                match self.live(&mut open, &mut exchange).await {
                    Live::Ended(end) => return end,
                    Live::Rotate => {}
                }
                if *self.close.borrow() {
                    let deadline = Instant::now() + self.close_timeout;
                    say_goodbye(open.outbound, &mut open.inbound, deadline).await;
                    return SessionEnd::Closed;
                }
                // Make before break: the successor's Hello replaces the old
                // session, which meanwhile goes on answering the server.
                let (successor, old_end) = {
                    let handshake = self.handshake();
                    let answering = keep_answering(&mut open, &mut exchange);
                    tokio::pin!(handshake, answering);
                    let mut old_end = None;
                    let successor = loop {
                        tokio::select! {
                            successor = &mut handshake => break successor,
                            end = &mut answering, if old_end.is_none() => old_end = Some(end),
                        }
                    };
                    (successor, old_end)
                };
                match successor {
                    Ok(successor) => break std::mem::replace(&mut open, successor),
                    // The successor heard the goodbye within the close's
                    // budget; the old session gets a short one of its own, so
                    // the close stays bounded as `Client::close` expects.
                    Err(SessionEnd::Closed) => {
                        let deadline =
                            Instant::now() + (self.close_timeout / 4).min(RETIRING_GOODBYE);
                        say_goodbye(open.outbound, &mut open.inbound, deadline).await;
                        return SessionEnd::Closed;
                    }
                    // No successor now: carry on with the old session (the end
                    // of its grace, a second ROTATE, is its end), unless it
                    // ended meanwhile.
                    Err(SessionEnd::Lost { .. }) => {
                        if let Some(status) = old_end {
                            return exchange.lost(status);
                        }
                    }
                }
            };
            if self.hello.client_id.is_empty() {
                // Nothing replaces an anonymous session: leave it now. The
                // goodbye goes out here; only the wait for the server's
                // answer is a task, which a close may cut short.
                let Open {
                    outbound,
                    mut inbound,
                    ..
                } = old;
                let deadline = Instant::now() + self.close_timeout;
                say_goodbye_now(outbound);
                retiring.spawn(async move { drained(&mut inbound, deadline).await });
            } else {
                retiring.spawn(retire(old, timeout));
            }
            while retiring.try_join_next().is_some() {}
            rotated_from = Some(session_id);
        }
    }

    /// One live session's frames, until it ends (or its owner closes it) or
    /// the server asks it to rotate.
    async fn live(&self, open: &mut Open, exchange: &mut Exchange) -> Live {
        // `wait_for` checks the current value first, so a clone sees a close
        // asked for at any time, and this borrows nothing of `self` mutably.
        let mut close = self.close.clone();
        loop {
            let deadline = exchange.deadline();
            let step = tokio::select! {
                // Frames first: a frame that arrived is never taken for silence.
                biased;
                message = open.inbound.message() => match message {
                    Ok(Some(response)) => exchange.on_frame(response.frame, Instant::now()),
                    Ok(None) => Step::Lost(None),
                    Err(status) => Step::Lost(Some(status)),
                },
                () = close_asked(&mut close) => {
                    let deadline = Instant::now() + self.close_timeout;
                    // The sender itself, so that dropping it half-closes.
                    let outbound = std::mem::replace(&mut open.outbound, mpsc::channel(1).0);
                    say_goodbye(outbound, &mut open.inbound, deadline).await;
                    return Live::Ended(SessionEnd::Closed);
                }
                () = sleep_until(deadline) => exchange.on_deadline(),
                () = sleep_until(exchange.next_ping), if exchange.goodbye.is_none() => {
                    exchange.ping(Instant::now())
                }
            };
            match step {
                Step::Send(frame) => {
                    // A full queue means a stuck transport, which the deadline notices.
                    let _ = open.outbound.try_send(request(frame));
                }
                Step::Measured(event) => self.emit(event),
                Step::Wait => {}
                Step::Recheck => {
                    // This task may have been held up (on a shared runtime):
                    // let the connection deliver what has arrived, then look at
                    // the frames once more before declaring silence.
                    tokio::task::yield_now().await;
                }
                Step::Rotate => return Live::Rotate,
                Step::Lost(status) => return Live::Ended(exchange.lost(status)),
                Step::Silent => {
                    return Live::Ended(SessionEnd::Lost {
                        reason: LossReason::Timeout {
                            silence: exchange.last_frame.elapsed(),
                        },
                        live_for: exchange.opened_at.elapsed(),
                    })
                }
            }
        }
    }

    /// Connects, says Hello and waits for Welcome, within the handshake
    /// timeout. A close asked for meanwhile still lets the server hear why:
    /// the server opens the session at Hello.
    async fn handshake(&self) -> Result<Open, SessionEnd> {
        let mut close = self.close.clone();
        let handshake = tokio::time::timeout(self.handshake_timeout, self.open());
        tokio::pin!(handshake);
        let opened = tokio::select! {
            opened = &mut handshake => opened,
            () = close_asked(&mut close) => {
                // One deadline covers both waits, as `Client::close` expects.
                let deadline = Instant::now() + self.close_timeout;
                if let Ok(Ok(Ok(mut open))) = tokio::time::timeout_at(deadline, &mut handshake).await {
                    say_goodbye(open.outbound, &mut open.inbound, deadline).await;
                }
                return Err(SessionEnd::Closed);
            }
        };
        let lost = |reason| SessionEnd::Lost {
            reason,
            live_for: Duration::ZERO,
        };
        match opened {
            Ok(Ok(open)) => Ok(open),
            Ok(Err(reason)) => Err(lost(reason)),
            Err(_) => Err(lost(LossReason::Transport {
                message: format!(
                    "no Welcome within {}",
                    humantime::format_duration(self.handshake_timeout)
                ),
            })),
        }
    }

    /// Connects, sends Hello and waits for Welcome.
    async fn open(&self) -> Result<Open, LossReason> {
        let channel = self.endpoints[self.current.load(Ordering::Relaxed)]
            .connect()
            .await
            .map_err(|error| LossReason::Transport {
                message: error_chain(&error),
            })?;
        let mut client = HeartbeatServiceClient::new(channel);
        let (outbound, requests) = mpsc::channel(OUTBOUND_QUEUE);
        let _ = outbound.try_send(request(Out::Hello(self.hello.clone())));
        let mut call = Request::new(ReceiverStream::new(requests));
        *call.metadata_mut() = self.metadata.clone();
        let mut inbound = client
            .heartbeat(call)
            .await
            .map_err(status_loss)?
            .into_inner();
        match inbound.message().await {
            Ok(Some(pb::HeartbeatResponse {
                frame: Some(In::Welcome(welcome)),
            })) => Ok(Open {
                outbound,
                inbound,
                welcome,
            }),
            Ok(Some(pb::HeartbeatResponse {
                frame: Some(In::Goodbye(goodbye)),
            })) => Err(goodbye_loss(goodbye)),
            Ok(Some(other)) => Err(LossReason::Transport {
                message: format!("expected Welcome, got {other:?}"),
            }),
            Ok(None) => Err(LossReason::Status {
                code: tonic::Code::Ok,
                message: "the server ended the call before Welcome".into(),
            }),
            Err(status) => Err(status_loss(status)),
        }
    }
}

/// An open session's two directions, and the server's `Welcome`.
struct Open {
    outbound: mpsc::Sender<pb::HeartbeatRequest>,
    inbound: Streaming<pb::HeartbeatResponse>,
    welcome: pb::Welcome,
}

/// What one turn of a live session calls for.
enum Step {
    /// Send this frame to the server.
    Send(Out),
    /// Report this round-trip sample.
    Measured(ClientEvent),
    /// Nothing to do.
    Wait,
    /// The deadline passed once: look at the frames again before declaring silence.
    Recheck,
    /// The server asked the session to rotate: open a successor.
    Rotate,
    /// The session is over: the server's goodbye says why, else this status
    /// (none when the call ended cleanly, or a goodbye's status is late).
    Lost(Option<tonic::Status>),
    /// No frame from the server for the timeout.
    Silent,
}

/// One live session between frames: ping numbering, RTT, and the deadline.
/// The client's counterpart of the server's per-frame step.
struct Exchange {
    ping_interval: Duration,
    timeout: Duration,
    /// When the session became live.
    opened_at: Instant,
    pings: PingLedger,
    rtt: RttEstimator,
    /// When the last server frame arrived.
    last_frame: Instant,
    /// When the client's next ping is due.
    next_ping: Instant,
    /// The server's goodbye, once it said one; the status follows.
    goodbye: Option<pb::Goodbye>,
    /// Set when the deadline passed once and the frames are being looked at again.
    rechecked: bool,
    /// Set once the server asked this session to rotate.
    rotating: bool,
}

impl Exchange {
    fn new(ping_interval: Duration, timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            ping_interval,
            timeout,
            opened_at: now,
            pings: PingLedger::default(),
            rtt: RttEstimator::default(),
            last_frame: now,
            next_ping: now + ping_interval,
            goodbye: None,
            rechecked: false,
            rotating: false,
        }
    }

    /// When the server counts as lost if it stays silent.
    fn deadline(&self) -> Instant {
        self.last_frame + self.timeout
    }

    /// Takes one server frame arriving at `now`.
    fn on_frame(&mut self, frame: Option<In>, now: Instant) -> Step {
        self.last_frame = now;
        self.rechecked = false;
        match frame {
            Some(In::Ping(ping)) => Step::Send(Out::Pong(pb::Pong { seq: ping.seq })),
            Some(In::Pong(pong)) => match self.pings.pong(pong.seq, now) {
                PongMatch::Answered(sample) => {
                    self.rtt.sample(sample);
                    Step::Measured(ClientEvent::Rtt {
                        sample,
                        smoothed: self.rtt.smoothed().unwrap_or(sample),
                        variance: self.rtt.variance(),
                    })
                }
                PongMatch::Unsolicited => Step::Wait,
            },
            // Asked to rotate: the stream stays open for the grace, so this
            // is no end; a second ask is the end of the grace.
            Some(In::Goodbye(goodbye))
                if goodbye.reason == i32::from(GoodbyeReason::Rotate) && !self.rotating =>
            {
                self.rotating = true;
                Step::Rotate
            }
            Some(In::Goodbye(goodbye)) => {
                self.goodbye = Some(goodbye);
                Step::Wait
            }
            Some(In::Welcome(_)) | None => Step::Wait,
        }
    }

    /// The deadline passed with no frame.
    fn on_deadline(&mut self) -> Step {
        if self.goodbye.is_some() {
            // The server said why; its status is just late.
            return Step::Lost(None);
        }
        if self.rechecked {
            return Step::Silent;
        }
        self.rechecked = true;
        Step::Recheck
    }

    /// The client's own ping, numbered, due again one interval from `now`
    /// (not from the missed tick: a late loop must not catch up with a burst
    /// the server would count as a flood).
    fn ping(&mut self, now: Instant) -> Step {
        let seq = self.pings.next_ping(now);
        self.next_ping = now + self.ping_interval;
        Step::Send(Out::Ping(pb::Ping { seq }))
    }

    /// How the session was lost when the call ended: the server's goodbye if
    /// it said one, else its status.
    fn lost(&mut self, status: Option<tonic::Status>) -> SessionEnd {
        let reason = match (self.goodbye.take(), status) {
            // A rotating session replaced by its own successor, whose
            // handshake then failed: no newer session holds the id, so this
            // is a rotation to try again, not a replacement to stop for.
            (Some(goodbye), _)
                if self.rotating && goodbye.reason == i32::from(GoodbyeReason::Replaced) =>
            {
                LossReason::Goodbye {
                    reason: CloseReason::Rotated,
                    message: format!(
                        "replaced by this client's successor, whose handshake failed: {}",
                        goodbye.message
                    ),
                    reconnect_after: Some(Duration::ZERO),
                }
            }
            (Some(goodbye), _) => goodbye_loss(goodbye),
            (None, Some(status)) => status_loss(status),
            (None, None) => LossReason::Status {
                code: tonic::Code::Ok,
                message: "the server ended the session without a goodbye".into(),
            },
        };
        SessionEnd::Lost {
            reason,
            live_for: self.opened_at.elapsed(),
        }
    }
}

/// Timing the client adopts from `Welcome`, kept within sane bounds: a server
/// cannot make it spin (a tiny interval), overflow its clock (a huge one), or
/// wait for a timeout that is not longer than the interval.
fn adopt(welcome: &pb::Welcome) -> (Duration, Duration) {
    let interval = welcome
        .ping_interval
        .as_ref()
        .and_then(proto_to_duration)
        .unwrap_or(DEFAULT_INTERVAL)
        .clamp(MIN_INTERVAL, MAX_INTERVAL);
    let timeout = welcome
        .timeout
        .as_ref()
        .and_then(proto_to_duration)
        .filter(|timeout| *timeout > interval)
        .unwrap_or(interval * 3)
        .min(MAX_INTERVAL * 3);
    (interval, timeout)
}

/// Completes once a close is asked for, or the handle is dropped.
async fn close_asked(close: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across the caller's awaits.
    let _ = close.wait_for(|close| *close).await;
}

fn request(frame: Out) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest { frame: Some(frame) }
}

fn goodbye_loss(goodbye: pb::Goodbye) -> LossReason {
    LossReason::Goodbye {
        reason: CloseReason::from_goodbye(goodbye.reason),
        reconnect_after: goodbye
            .reconnect_after
            .as_ref()
            .and_then(proto_to_duration)
            .map(|after| after.min(MAX_RECONNECT_HINT)),
        message: goodbye.message,
    }
}

/// A status without a goodbye. A status the server sent (from trailers) has no
/// source; one tonic made from a broken connection or stream carries the
/// transport error as its source.
fn status_loss(status: tonic::Status) -> LossReason {
    if std::error::Error::source(&status).is_some() {
        LossReason::Transport {
            message: error_chain(&status),
        }
    } else {
        LossReason::Status {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// An error with its sources, on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
