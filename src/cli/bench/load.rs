//! The load generator: sessions that say Hello, answer every server ping, and
//! ping every interval.
//!
//! # Why it is built this way
//!
//! One 2-core machine must drive 100k sessions with the server beside it, so a
//! session must cost little more than its bytes on the wire. Each HTTP/2
//! connection gets one task, which polls the connection itself and every
//! session on it: a session is a future in that task's `FuturesUnordered` (woken
//! on its own, polled only when it has work) and one timer, not a task. It
//! speaks HTTP/2 through `h2` and frames gRPC messages by hand, so none of its
//! CPU goes to a general-purpose client stack.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use prost::Message;
use tokio::{
    net::TcpStream,
    sync::watch,
    time::{Instant, MissedTickBehavior},
};
use tonic_heartbeat::{
    protocol::{
        grpc::{self, Deframer, HEARTBEAT_PATH},
        pb::{self, heartbeat_request::Frame as Out, heartbeat_response::Frame as In},
        proto_to_duration,
    },
    CloseReason,
};

use super::report::Tally;

/// Framing overhead of unread small DATA frames the generator's HTTP/2 may
/// hold per connection (h2 allows half the connection window, at least 25 KiB).
const DATA_FRAME_BUDGET: usize = 64 * 1024 * 1024;

/// Where the run is: every session watches this and acts on its changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Sessions open and heartbeat.
    Running,
    /// The chosen sessions stop writing (and, with `--freeze-all`, every one
    /// sends a last ping first, so that all deadlines coincide).
    Frozen,
    /// Every session half-closes and winds down.
    Stopping,
}

/// What every connection task needs to know, shared.
#[derive(Debug)]
pub(super) struct Plan {
    /// The server's socket address.
    pub(super) addr: SocketAddr,
    /// The `:authority` of each request.
    pub(super) authority: String,
    /// Sessions in all.
    pub(super) sessions: u64,
    /// HTTP/2 connections they share.
    pub(super) connections: u64,
    /// Sessions opened per second, over all connections.
    pub(super) rate: f64,
    /// The client's own ping interval; `None` follows the server's `Welcome`.
    pub(super) interval: Option<Duration>,
    /// Which sessions freeze.
    pub(super) freeze: Freeze,
    /// The prefix of each session's client id.
    pub(super) client_id_prefix: String,
}

/// Which sessions stop writing when the run freezes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Freeze {
    /// None.
    None,
    /// This many, spread evenly over the sessions (and so over connections).
    Some(u64),
    /// Every session, at once.
    All,
}

impl Plan {
    /// Whether session `index` freezes.
    pub(super) fn freezes(&self, index: u64) -> bool {
        match self.freeze {
            Freeze::None => false,
            Freeze::All => true,
            Freeze::Some(count) => {
                let stride = (self.sessions / count.max(1)).max(1);
                index % stride == 0 && index / stride < count
            }
        }
    }
}

/// Drives connection `index` and all of its sessions until the run stops.
pub(super) async fn connection(
    plan: Arc<Plan>,
    tally: Arc<Tally>,
    index: u64,
    phase: watch::Receiver<Phase>,
) {
    let share = (index..plan.sessions).step_by(plan.connections as usize);
    let expected = share.clone().count() as u64;
    // This connection opens its share at its part of the rate, starting when
    // its first session is due: connections open as the ramp reaches them,
    // not all at once (a burst of connects overflows the server's accept
    // backlog, and the SYNs dropped then come back seconds later).
    let started = tokio::time::Instant::now();
    let period = Duration::from_secs_f64(plan.connections as f64 / plan.rate);
    let offset = Duration::from_secs_f64(index as f64 / plan.rate);
    tokio::time::sleep_until(started + offset).await;
    let client = match open_connection(&plan).await {
        Ok(client) => client,
        Err(problem) => {
            tally.failed(&problem, expected);
            return;
        }
    };
    let (send_request, connection) = client;
    let mut connection = std::pin::pin!(connection);
    let mut connection_done = false;
    let mut opener = tokio::time::interval_at(started + offset, period);
    opener.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut share = share.peekable();
    let mut sessions = FuturesUnordered::new();
    let mut own_phase = phase.clone();
    let mut stopping = false;
    loop {
        tokio::select! {
            result = &mut connection, if !connection_done => {
                connection_done = true;
                let unopened = share.by_ref().count() as u64;
                if unopened > 0 {
                    let problem = match result {
                        Ok(()) => "connection closed by the server".to_owned(),
                        Err(error) => format!("connection lost: {error}"),
                    };
                    tally.failed(&problem, unopened);
                }
            }
            Some(()) = sessions.next(), if !sessions.is_empty() => {
                if sessions.is_empty() && share.peek().is_none() {
                    // Every session of this connection has ended.
                    break;
                }
            }
            () = stopped(&mut own_phase), if !stopping => {
                stopping = true;
                let unopened = share.by_ref().count() as u64;
                if unopened > 0 {
                    tally.failed("not opened before the run ended", unopened);
                }
                if sessions.is_empty() {
                    break;
                }
            }
            _ = opener.tick(), if share.peek().is_some() && !connection_done && !stopping => {
                if let Some(session_index) = share.next() {
                    sessions.push(session(
                        plan.clone(),
                        tally.clone(),
                        send_request.clone(),
                        session_index,
                        phase.clone(),
                    ));
                }
            }
            else => break,
        }
    }
}

type Connection = (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<TcpStream, Bytes>,
);

async fn open_connection(plan: &Plan) -> Result<Connection, String> {
    let tcp = TcpStream::connect(plan.addr)
        .await
        .map_err(|error| format!("connect: {}", error.kind()))?;
    // A heartbeat is a few bytes that must leave now.
    let _ = tcp.set_nodelay(true);
    h2::client::Builder::new()
        // h2 counts the small DATA frames it holds unread against a budget,
        // to stop a hostile peer; a busy generator holding many heartbeats
        // from a trusted server must not trip it.
        .data_frame_budget(DATA_FRAME_BUDGET)
        .handshake(tcp)
        .await
        .map_err(|error| format!("HTTP/2 handshake: {error}"))
}

/// What a session remembers while it runs.
struct Session {
    plan: Arc<Plan>,
    tally: Arc<Tally>,
    index: u64,
    stream: h2::SendStream<Bytes>,
    /// When this session last wrote a frame.
    last_write: Instant,
    /// Its own pings in flight: (seq, sent at), oldest first.
    pings: std::collections::VecDeque<(u64, Instant)>,
    next_seq: u64,
    /// Set once it stops writing.
    frozen: bool,
    /// The silence the server announced in `Welcome`.
    timeout: Duration,
}

/// One session from Hello to its end; every outcome goes to the tally.
async fn session(
    plan: Arc<Plan>,
    tally: Arc<Tally>,
    send_request: h2::client::SendRequest<Bytes>,
    index: u64,
    phase: watch::Receiver<Phase>,
) {
    let started = Instant::now();
    // A session still opening when the run stops (held back by the server's
    // stream limit, say) fails, and is counted as such.
    // A watcher of its own: waiting for the stop must not mark a freeze
    // that came meanwhile as seen, or the session would never freeze.
    let mut watching = phase.clone();
    let opened = tokio::select! {
        opened = establish(&plan, send_request, index) => opened,
        () = stopped(&mut watching) => Err("not established before the run ended".to_owned()),
    };
    match opened {
        Ok(opened) => {
            tally.established(started.elapsed());
            run(plan, tally, index, phase, opened).await;
        }
        Err(problem) => tally.failed(&problem, 1),
    }
}

/// Completes once the run is stopping.
async fn stopped(phase: &mut watch::Receiver<Phase>) {
    // A closed channel means the run is over as well.
    let _ = phase.wait_for(|now| *now == Phase::Stopping).await;
}

/// A session the server has welcomed.
struct Opened {
    stream: h2::SendStream<Bytes>,
    body: h2::RecvStream,
    reader: Deframer,
    welcome: pb::Welcome,
    /// When the Hello was written: the session's last frame until it pings
    /// or answers a ping.
    hello_sent: Instant,
}

/// Opens a stream, says Hello and reads the Welcome; `Err` says what went wrong.
async fn establish(
    plan: &Plan,
    send_request: h2::client::SendRequest<Bytes>,
    index: u64,
) -> Result<Opened, String> {
    let mut send_request = send_request
        .ready()
        .await
        .map_err(|error| format!("no stream: {error}"))?;
    let request = http::Request::post(format!("http://{}{HEARTBEAT_PATH}", plan.authority))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|error| format!("request: {error}"))?;
    let (response, mut stream) = send_request
        .send_request(request, false)
        .map_err(|error| format!("no stream: {error}"))?;
    let hello = pb::HeartbeatRequest {
        frame: Some(Out::Hello(pb::Hello {
            client_id: format!("{}-{index}", plan.client_id_prefix),
            labels: Default::default(),
        })),
    };
    stream
        .send_data(grpc::frame(&hello), false)
        .map_err(|error| format!("send Hello: {error}"))?;
    let hello_sent = Instant::now();
    let response = response
        .await
        .map_err(|error| format!("response: {error}"))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("HTTP status {}", response.status().as_u16()));
    }
    if let Some(code) = grpc_status(response.headers()) {
        return Err(code);
    }
    let mut body = response.into_body();
    let mut reader = Deframer::default();
    loop {
        match next_frame(&mut reader)? {
            Some(In::Welcome(welcome)) => {
                return Ok(Opened {
                    stream,
                    body,
                    reader,
                    welcome,
                    hello_sent,
                })
            }
            Some(other) => return Err(format!("expected Welcome, got {}", frame_name(&other))),
            None => {}
        }
        match body.data().await {
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                reader.push(chunk);
            }
            Some(Err(error)) => return Err(format!("before Welcome: {error}")),
            None => {
                let trailers = body.trailers().await.ok().flatten();
                return Err(trailers
                    .as_ref()
                    .and_then(grpc_status)
                    .unwrap_or_else(|| "ended before Welcome".to_owned()));
            }
        }
    }
}

/// Heartbeats until the server ends the session or the run stops.
async fn run(
    plan: Arc<Plan>,
    tally: Arc<Tally>,
    index: u64,
    mut phase: watch::Receiver<Phase>,
    opened: Opened,
) {
    let Opened {
        stream,
        mut body,
        mut reader,
        welcome,
        hello_sent,
    } = opened;
    let interval = plan
        .interval
        .or_else(|| welcome.ping_interval.as_ref().and_then(proto_to_duration))
        .filter(|interval| !interval.is_zero())
        .unwrap_or(Duration::from_secs(10));
    let timeout = welcome
        .timeout
        .as_ref()
        .and_then(proto_to_duration)
        .unwrap_or(Duration::from_secs(30));
    tally.announce_timeout(timeout);
    let mut session = Session {
        plan,
        tally,
        index,
        stream,
        last_write: hello_sent,
        pings: Default::default(),
        next_seq: 1,
        frozen: false,
        timeout,
    };
    // The first ping at a random point of the interval, so that pings spread.
    let first = Instant::now().checked_add(interval.mul_f64(rand::random::<f64>()));
    let mut ticker = tokio::time::interval_at(first.unwrap_or_else(Instant::now), interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stopping = false;
    let mut goodbye: Option<CloseReason> = None;
    loop {
        // Whatever the last chunk brought, handle it before waiting again.
        loop {
            match next_frame(&mut reader) {
                Ok(Some(frame)) => {
                    if let Some(reason) = session.on_frame(frame) {
                        goodbye = Some(reason);
                    }
                }
                Ok(None) => break,
                Err(problem) => {
                    session.ended(goodbye, Some(problem), stopping);
                    return;
                }
            }
        }
        tokio::select! {
            chunk = body.data() => match chunk {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    reader.push(chunk);
                }
                Some(Err(error)) => {
                    session.ended(goodbye, Some(format!("stream error: {error}")), stopping);
                    return;
                }
                None => {
                    let status = body.trailers().await.ok().flatten().as_ref().and_then(grpc_status);
                    session.ended(goodbye, status, stopping);
                    return;
                }
            },
            _ = ticker.tick(), if !session.frozen && !stopping => session.ping(),
            changed = phase.changed(), if !stopping => {
                if changed.is_err() {
                    stopping = true;
                    continue;
                }
                let now = *phase.borrow_and_update();
                match now {
                    Phase::Running => {}
                    Phase::Frozen if session.plan.freezes(session.index) && !session.frozen => {
                        if session.plan.freeze == Freeze::All {
                            // One last frame for every session at once: every
                            // deadline falls at about the same moment.
                            session.ping();
                        }
                        session.frozen = true;
                        session.tally.froze(session.last_write);
                    }
                    Phase::Frozen => {}
                    Phase::Stopping => {
                        stopping = true;
                        // A half-close: the server ends the session cleanly.
                        let _ = session.stream.send_data(Bytes::new(), true);
                    }
                }
            }
        }
    }
}

impl Session {
    /// Acts on one frame from the server; `Some` for a goodbye.
    fn on_frame(&mut self, frame: In) -> Option<CloseReason> {
        match frame {
            In::Ping(ping) => {
                if !self.frozen {
                    self.write(Out::Pong(pb::Pong { seq: ping.seq }));
                    self.tally.round_trip();
                }
                None
            }
            In::Pong(pong) => {
                while let Some(&(seq, sent)) = self.pings.front() {
                    if seq > pong.seq {
                        break;
                    }
                    self.pings.pop_front();
                    if seq == pong.seq {
                        self.tally.rtt(sent.elapsed());
                        self.tally.round_trip();
                    }
                }
                None
            }
            In::Goodbye(goodbye) => {
                let reason = CloseReason::from_goodbye(goodbye.reason);
                if reason == CloseReason::Timeout && self.frozen {
                    let silent = self.last_write.elapsed();
                    self.tally
                        .detected(silent.as_secs_f64() - self.timeout.as_secs_f64());
                }
                Some(reason)
            }
            In::Welcome(_) => None,
        }
    }

    fn ping(&mut self) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.write(Out::Ping(pb::Ping { seq }));
        self.pings.push_back((seq, Instant::now()));
        // A server that stopped answering must not grow this without bound.
        if self.pings.len() > 64 {
            self.pings.pop_front();
        }
    }

    fn write(&mut self, frame: Out) {
        let request = pb::HeartbeatRequest { frame: Some(frame) };
        // A failed send shows up as the stream's end on the read side.
        let _ = self.stream.send_data(grpc::frame(&request), false);
        self.last_write = Instant::now();
    }

    /// Records how the session ended: by the server's goodbye, or by a status
    /// alone. Ends the run asked for are not counted.
    fn ended(&self, goodbye: Option<CloseReason>, status: Option<String>, stopping: bool) {
        if self.frozen {
            self.tally.frozen_end();
        }
        match goodbye {
            Some(reason) => self.tally.ended_by(reason.as_str()),
            None if stopping && status.is_none() => self.tally.wound_down(),
            None => self.tally.ended_by(&format!(
                "no goodbye ({})",
                status.as_deref().unwrap_or("stream ended")
            )),
        }
    }
}

/// The next frame the server sent, if a whole one is in; `Err` for a
/// message that is not a `HeartbeatResponse`.
fn next_frame(reader: &mut Deframer) -> Result<Option<In>, String> {
    let Some(payload) = reader.next_message() else {
        return Ok(None);
    };
    let payload = payload.map_err(|error| error.to_string())?;
    let response = pb::HeartbeatResponse::decode(payload)
        .map_err(|error| format!("undecodable frame: {error}"))?;
    response
        .frame
        .map(Some)
        .ok_or_else(|| "a response with no frame".to_owned())
}

/// The name of the gRPC status in `headers` (`Unavailable`, …), by which
/// failures are grouped; `None` when it is OK or absent.
fn grpc_status(headers: &http::HeaderMap) -> Option<String> {
    tonic::Status::from_header_map(headers)
        .filter(|status| status.code() != tonic::Code::Ok)
        .map(|status| format!("{:?}", status.code()))
}

fn frame_name(frame: &In) -> &'static str {
    match frame {
        In::Welcome(_) => "Welcome",
        In::Ping(_) => "Ping",
        In::Pong(_) => "Pong",
        In::Goodbye(_) => "Goodbye",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(sessions: u64, freeze: Freeze) -> Plan {
        Plan {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            authority: "127.0.0.1:1".into(),
            sessions,
            connections: 7,
            rate: 1000.0,
            interval: None,
            freeze,
            client_id_prefix: "bench".into(),
        }
    }

    /// Tests that `--freeze K` picks exactly K sessions, spread over all.
    #[test]
    fn freeze_picks_exactly_k_spread_sessions() {
        for (sessions, count) in [(100, 10), (100, 100), (10, 3), (1000, 7), (5, 5)] {
            let plan = plan(sessions, Freeze::Some(count));
            let picked: Vec<u64> = (0..sessions).filter(|&i| plan.freezes(i)).collect();
            assert_eq!(picked.len() as u64, count, "{sessions} sessions, {count}");
            if count > 1 {
                assert!(picked.last() > Some(&(sessions / 2)), "spread: {picked:?}");
            }
        }
        let all = plan(10, Freeze::All);
        assert!((0..10).all(|i| all.freezes(i)));
        assert!(!(0..10).any(|i| plan(10, Freeze::None).freezes(i)));
    }
}
