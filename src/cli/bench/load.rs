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
use tokio::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use prost::Message;
use tokio::{net::TcpStream, sync::watch, time::MissedTickBehavior};
use tonic_heartbeat::{
    protocol::pb::{self, heartbeat_request::Frame as Out, heartbeat_response::Frame as In},
    CloseReason,
};

use super::report::Tally;

/// The path of the heartbeat method.
const HEARTBEAT_PATH: &str = "/heartbeat.v1.HeartbeatService/Heartbeat";

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
            _ = opener.tick(), if share.peek().is_some() && !connection_done => {
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
    if let Err(problem) = run_session(plan, tally.clone(), send_request, index, phase).await {
        tally.failed(&problem, 1);
    }
}

/// Runs a session; `Err` is a failure to establish it, by what went wrong.
async fn run_session(
    plan: Arc<Plan>,
    tally: Arc<Tally>,
    send_request: h2::client::SendRequest<Bytes>,
    index: u64,
    mut phase: watch::Receiver<Phase>,
) -> Result<(), String> {
    let started = Instant::now();
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
        .send_data(encode(&hello), false)
        .map_err(|error| format!("send Hello: {error}"))?;
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
    let mut reader = MessageReader::default();
    let welcome = loop {
        match reader.next().transpose()? {
            Some(In::Welcome(welcome)) => break welcome,
            Some(other) => return Err(format!("expected Welcome, got {}", frame_name(&other))),
            None => {}
        }
        match body.data().await {
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                reader.push(&chunk);
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
    };
    tally.established(started.elapsed());
    let interval = plan
        .interval
        .or_else(|| welcome.ping_interval.and_then(proto_duration))
        .unwrap_or(Duration::from_secs(10));
    let timeout = welcome
        .timeout
        .and_then(proto_duration)
        .unwrap_or(Duration::from_secs(30));
    tally.announce_timeout(timeout);
    let mut session = Session {
        plan,
        tally,
        index,
        stream,
        last_write: Instant::now(),
        pings: Default::default(),
        next_seq: 1,
        frozen: false,
        timeout,
    };
    // The first ping at a random point of the interval, so that pings spread.
    let first = interval.mul_f64(rand::random::<f64>());
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + first, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stopping = false;
    let mut goodbye: Option<CloseReason> = None;
    loop {
        // Whatever the last chunk brought, handle it before waiting again.
        while let Some(frame) = reader.next().transpose()? {
            if let Some(reason) = session.on_frame(frame) {
                goodbye = Some(reason);
            }
        }
        tokio::select! {
            chunk = body.data() => match chunk {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    reader.push(&chunk);
                }
                Some(Err(error)) => {
                    session.ended(goodbye, Some(format!("stream error: {error}")), stopping);
                    return Ok(());
                }
                None => {
                    let status = body.trailers().await.ok().flatten().as_ref().and_then(grpc_status);
                    session.ended(goodbye, status, stopping);
                    return Ok(());
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
                            // deadline falls at the same moment.
                            session.ping();
                        }
                        session.frozen = true;
                        session.tally.froze();
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
        let _ = self.stream.send_data(encode(&request), false);
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
            None if stopping => self.tally.wound_down(),
            None => self.tally.ended_by(&format!(
                "no goodbye ({})",
                status.as_deref().unwrap_or("stream ended")
            )),
        }
    }
}

/// Frames one message with gRPC's 5-byte prefix.
fn encode(message: &pb::HeartbeatRequest) -> Bytes {
    let length = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + length);
    buf.put_u8(0);
    buf.put_u32(length as u32);
    // The buffer was sized for the message: encoding cannot run out of room.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// Collects chunks and yields whole gRPC messages.
#[derive(Default)]
struct MessageReader {
    buf: BytesMut,
}

impl MessageReader {
    fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole frame, if one is buffered.
    fn next(&mut self) -> Option<Result<In, String>> {
        if self.buf.len() < 5 {
            return None;
        }
        let compressed = self.buf[0];
        let length = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if compressed != 0 {
            return Some(Err("the server sent a compressed message".to_owned()));
        }
        let length = length as usize;
        if self.buf.len() < 5 + length {
            return None;
        }
        self.buf.advance(5);
        let payload = self.buf.split_to(length);
        Some(
            pb::HeartbeatResponse::decode(payload)
                .map_err(|error| format!("undecodable frame: {error}"))
                .and_then(|response| {
                    response
                        .frame
                        .ok_or_else(|| "a response with no frame".to_owned())
                }),
        )
    }
}

/// The gRPC status in `headers`, as `CODE: message`, unless it is OK or absent.
fn grpc_status(headers: &http::HeaderMap) -> Option<String> {
    let code = headers.get("grpc-status")?.to_str().ok()?;
    let code: i32 = code.parse().ok()?;
    if code == 0 {
        return None;
    }
    Some(format!("{:?}", tonic::Code::from(code)))
}

fn frame_name(frame: &In) -> &'static str {
    match frame {
        In::Welcome(_) => "Welcome",
        In::Ping(_) => "Ping",
        In::Pong(_) => "Pong",
        In::Goodbye(_) => "Goodbye",
    }
}

fn proto_duration(duration: prost_types::Duration) -> Option<Duration> {
    let seconds = u64::try_from(duration.seconds).ok()?;
    let nanos = u32::try_from(duration.nanos).ok()?;
    Some(Duration::new(seconds, nanos)).filter(|duration| !duration.is_zero())
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

    /// Tests that the reader yields whole messages across chunk boundaries.
    #[test]
    fn reader_reassembles_split_messages() {
        let response = pb::HeartbeatResponse {
            frame: Some(In::Pong(pb::Pong { seq: 300 })),
        };
        let mut framed = vec![0];
        framed.extend_from_slice(&(response.encoded_len() as u32).to_be_bytes());
        framed.extend_from_slice(&response.encode_to_vec());
        let mut reader = MessageReader::default();
        let (first, rest) = framed.split_at(3);
        reader.push(first);
        assert!(reader.next().is_none());
        reader.push(rest);
        reader.push(&framed);
        for _ in 0..2 {
            match reader.next() {
                Some(Ok(In::Pong(pong))) => assert_eq!(pong.seq, 300),
                other => panic!("expected a pong, got {other:?}"),
            }
        }
        assert!(reader.next().is_none());
    }
}
