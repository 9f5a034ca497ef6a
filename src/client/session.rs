//! The client's task: one session after another until it is closed.

use std::time::Duration;

use rand::{rngs::StdRng, SeedableRng};
use tokio::{
    sync::{broadcast, mpsc, watch},
    time::{sleep_until, Instant},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{metadata::MetadataMap, transport::Endpoint, Request, Streaming};

use super::{backoff::jitter, Backoff, ClientEvent, ClientState, LossReason};
use crate::protocol::{
    pb::{
        self, heartbeat_request::Frame as Out, heartbeat_response::Frame as In,
        heartbeat_service_client::HeartbeatServiceClient, GoodbyeReason,
    },
    proto_to_duration, PingLedger, PongMatch, RttEstimator,
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
    pub(super) endpoint: Endpoint,
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
                reason: GoodbyeReason::Replaced,
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
                    GoodbyeReason::TooManyPings
                    | GoodbyeReason::ProtocolViolation
                    | GoodbyeReason::Evicted,
                ..
            } => Retry::After(backoff.cap() / 2 + jitter(backoff.cap() / 2, rng)),
            _ => Retry::After(backoff.delay(attempt, rng)),
        }
    }

    /// Runs one session from connect to loss or close.
    async fn session(&self) -> SessionEnd {
        // `wait_for` checks the current value first, so a clone sees a close
        // asked for at any time, and this borrows nothing of `self` mutably.
        let mut close = self.close.clone();
        let handshake = tokio::time::timeout(self.handshake_timeout, self.open());
        tokio::pin!(handshake);
        let opened = tokio::select! {
            opened = &mut handshake => opened,
            () = close_asked(&mut close) => {
                // The server may have opened the session already (it does at
                // Hello): finish the handshake briefly so it hears why. One
                // deadline covers both waits, as `Client::close` expects.
                let deadline = Instant::now() + self.close_timeout;
                if let Ok(Ok(Ok((outbound, mut inbound, _)))) =
                    tokio::time::timeout_at(deadline, &mut handshake).await
                {
                    self.say_goodbye(outbound, &mut inbound, deadline).await;
                }
                return SessionEnd::Closed;
            }
        };
        let (outbound, mut inbound, welcome) = match opened {
            Ok(Ok(open)) => open,
            Ok(Err(reason)) => {
                return SessionEnd::Lost {
                    reason,
                    live_for: Duration::ZERO,
                }
            }
            Err(_) => {
                return SessionEnd::Lost {
                    reason: LossReason::Transport {
                        message: format!(
                            "no Welcome within {}",
                            humantime::format_duration(self.handshake_timeout)
                        ),
                    },
                    live_for: Duration::ZERO,
                }
            }
        };
        let (ping_interval, timeout) = adopt(&welcome);
        let opened_at = Instant::now();
        self.state.send_replace(ClientState::Live {
            session_id: welcome.session_id.clone(),
        });
        self.emit(ClientEvent::Connected {
            session_id: welcome.session_id,
            ping_interval,
            timeout,
        });

        let mut pings = PingLedger::default();
        let mut rtt = RttEstimator::default();
        let mut last_frame = Instant::now();
        let mut next_ping = last_frame + ping_interval;
        let mut goodbye: Option<pb::Goodbye> = None;
        // Set when the deadline passed once and the frames were checked again.
        let mut rechecked = false;
        loop {
            let deadline = last_frame + timeout;
            tokio::select! {
                // Frames first: a frame that arrived is never taken for silence.
                biased;
                message = inbound.message() => {
                    let frame = match message {
                        Ok(Some(response)) => response.frame,
                        Ok(None) => {
                            return self.lost(goodbye, None, opened_at);
                        }
                        Err(status) => {
                            return self.lost(goodbye, Some(status), opened_at);
                        }
                    };
                    last_frame = Instant::now();
                    rechecked = false;
                    match frame {
                        Some(In::Ping(ping)) => {
                            let _ = outbound.try_send(request(Out::Pong(pb::Pong { seq: ping.seq })));
                        }
                        Some(In::Pong(pong)) => {
                            if let PongMatch::Answered(sample) = pings.pong(pong.seq, last_frame) {
                                rtt.sample(sample);
                                self.emit(ClientEvent::Rtt {
                                    sample,
                                    smoothed: rtt.smoothed().unwrap_or(sample),
                                    variance: rtt.variance(),
                                });
                            }
                        }
                        Some(In::Goodbye(frame)) => goodbye = Some(frame),
                        Some(In::Welcome(_)) | None => {}
                    }
                }
                () = close_asked(&mut close) => {
                    let deadline = Instant::now() + self.close_timeout;
                    self.say_goodbye(outbound, &mut inbound, deadline).await;
                    return SessionEnd::Closed;
                }
                () = sleep_until(deadline) => {
                    if let Some(goodbye) = goodbye {
                        // The server said why; its status is just late.
                        return self.lost(Some(goodbye), None, opened_at);
                    }
                    if !rechecked {
                        // This task may have been held up (on a shared runtime):
                        // let the connection deliver what has arrived, then look
                        // at the frames once more before declaring silence.
                        rechecked = true;
                        tokio::task::yield_now().await;
                        continue;
                    }
                    return SessionEnd::Lost {
                        reason: LossReason::Timeout { silence: last_frame.elapsed() },
                        live_for: opened_at.elapsed(),
                    };
                }
                () = sleep_until(next_ping), if goodbye.is_none() => {
                    let now = Instant::now();
                    let seq = pings.next_ping(now);
                    let _ = outbound.try_send(request(Out::Ping(pb::Ping { seq })));
                    // From now, not from the missed tick: a late loop must not
                    // catch up with a burst the server would count as a flood.
                    next_ping = now + ping_interval;
                }
            }
        }
    }

    /// Connects, sends Hello and waits for Welcome.
    async fn open(
        &self,
    ) -> Result<
        (
            mpsc::Sender<pb::HeartbeatRequest>,
            Streaming<pb::HeartbeatResponse>,
            pb::Welcome,
        ),
        LossReason,
    > {
        let channel = self
            .endpoint
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
            })) => Ok((outbound, inbound, welcome)),
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

    /// Sends `Goodbye{CLIENT_SHUTDOWN}`, half-closes, and waits (bounded) for
    /// the server to finish the call.
    async fn say_goodbye(
        &self,
        outbound: mpsc::Sender<pb::HeartbeatRequest>,
        inbound: &mut Streaming<pb::HeartbeatResponse>,
        deadline: Instant,
    ) {
        let _ = outbound.try_send(request(Out::Goodbye(pb::Goodbye {
            reason: GoodbyeReason::ClientShutdown.into(),
            message: "the client is closing".into(),
            reconnect_after: None,
        })));
        drop(outbound);
        let _ = tokio::time::timeout_at(deadline, async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await;
    }

    fn lost(
        &self,
        goodbye: Option<pb::Goodbye>,
        status: Option<tonic::Status>,
        opened_at: Instant,
    ) -> SessionEnd {
        let reason = match (goodbye, status) {
            (Some(goodbye), _) => goodbye_loss(goodbye),
            (None, Some(status)) => status_loss(status),
            (None, None) => LossReason::Status {
                code: tonic::Code::Ok,
                message: "the server ended the session without a goodbye".into(),
            },
        };
        SessionEnd::Lost {
            reason,
            live_for: opened_at.elapsed(),
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
        reason: goodbye.reason(),
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
