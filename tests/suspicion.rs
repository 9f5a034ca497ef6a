//! Adaptive suspicion (the contract's "Adaptive suspicion") against a real
//! server: a steady client is suspected soon after it misses its rhythm, but
//! never before a ping interval of silence; a jittery one no later than the
//! fixed `suspect_after`; a real client process (which both pings and
//! answers the server's pings) frozen with SIGSTOP is suspected at its
//! rhythm, well before `suspect_after`; `Session.phi` and the φ histogram
//! report it. Fixed mode reports φ 0.

mod support;

use std::time::Duration;

use support::*;
use tonic_heartbeat::{
    config::Suspicion,
    protocol::{
        pb::{self, heartbeat_request::Frame as In},
        Phi,
    },
    registry::SessionEvent,
    ServerConfig,
};

const PING_INTERVAL: Duration = Duration::from_millis(100);
const SUSPECT_AFTER: Duration = Duration::from_secs(1);

fn adaptive() -> ServerConfig {
    ServerConfig {
        ping_interval: PING_INTERVAL,
        timeout: Duration::from_secs(2),
        suspect_after: Some(SUSPECT_AFTER),
        min_ping_interval: Duration::from_millis(10),
        suspicion: Suspicion::Adaptive {
            phi_threshold: Suspicion::DEFAULT_PHI_THRESHOLD,
        },
        ..ServerConfig::default()
    }
}

/// Sends a ping after each of `gaps`, then stops; returns when it stopped.
async fn rhythm(session: &mut RawSession, gaps: &[u64]) -> tokio::time::Instant {
    for (seq, gap) in gaps.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(*gap)).await;
        session
            .send(In::Ping(pb::Ping {
                seq: u64::try_from(seq).expect("small") + 1,
            }))
            .await;
    }
    tokio::time::Instant::now()
}

/// How long after `stopped` the session became suspect.
async fn suspected_after(
    sessions: &mut tonic_heartbeat::registry::Subscription,
    session_id: &str,
    stopped: tokio::time::Instant,
) -> Duration {
    event_for(sessions, session_id, |event| {
        matches!(event, SessionEvent::Suspected(_))
    })
    .await;
    stopped.elapsed()
}

/// Tests the floor: a client that pinged every 60 ms for over two seconds
/// has a φ that reaches 8 within milliseconds of silence, yet it is
/// suspected only once a whole ping interval passed, and well before
/// `suspect_after`; meanwhile `Session.phi` is high and the histogram counted
/// it.
#[tokio::test]
async fn a_steady_client_is_suspected_at_the_interval_not_before() {
    let server = TestServer::start(adaptive()).await;
    let mut sessions = server.handle.subscribe();
    let (mut session, welcome) = RawSession::hello(server.addr, "steady").await;
    let stopped = rhythm(&mut session, &[60; 50]).await;
    let after = suspected_after(&mut sessions, &welcome.session_id, stopped).await;
    assert!(
        after >= PING_INTERVAL,
        "suspected {after:?} after the last frame"
    );
    assert!(after < SUSPECT_AFTER / 2, "suspected only after {after:?}");
    let listed = list_sessions(server.addr).await;
    let phi = listed.sessions[0].phi;
    assert!(phi >= 8.0, "phi {phi} once suspect");
    let metrics = server.handle.metrics().render(false).0;
    assert!(
        metrics.contains("heartbeat_phi_at_suspicion_count 1\n"),
        "{metrics}"
    );
    server.shutdown().await.expect("clean shutdown");
}

/// Tests the ceiling: a client whose gaps swing between 60 ms and 400 ms has
/// a φ (known: presence reports it) that would not reach 8 for over a
/// second of silence, yet it is suspected by the fixed `suspect_after`, and
/// not much later.
#[tokio::test]
async fn a_jittery_client_is_suspected_by_suspect_after() {
    let server = TestServer::start(adaptive()).await;
    let mut sessions = server.handle.subscribe();
    let (mut session, welcome) = RawSession::hello(server.addr, "jittery").await;
    let stopped = rhythm(&mut session, &[60, 400].repeat(17)).await;
    let listed = list_sessions(server.addr).await;
    assert!(
        listed.sessions[0].phi > 0.0,
        "the rhythm is known: {:?}",
        listed.sessions[0]
    );
    let after = suspected_after(&mut sessions, &welcome.session_id, stopped).await;
    assert!(
        after >= SUSPECT_AFTER,
        "suspected {after:?} after the last frame"
    );
    assert!(
        after < SUSPECT_AFTER + Duration::from_millis(300),
        "suspected {after:?} after the last frame"
    );
    server.shutdown().await.expect("clean shutdown");
}

/// Tests a real client: `heartbeat connect` pings on its own and answers the
/// server's pings, two messages a round. Frozen with SIGSTOP after five
/// seconds of rhythm (the estimate needs 30 gaps), it is suspected at its
/// rhythm, well before the fixed `suspect_after` (which fixed mode would
/// wait for).
#[tokio::test]
async fn a_frozen_client_process_is_suspected_at_its_rhythm() {
    let server = TestServer::start(adaptive()).await;
    let mut sessions = server.handle.subscribe();
    let client = Continued(
        std::process::Command::new(env!("CARGO_BIN_EXE_heartbeat"))
            .args(["connect", &server.url(), "--client-id", "process"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn heartbeat connect"),
    );
    let opened = loop {
        if let SessionEvent::Opened(session) = next_change(&mut sessions).await.event {
            break session.identity.session_id.clone();
        }
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    signal(&client.0, "-STOP");
    let stopped = tokio::time::Instant::now();
    let after = suspected_after(&mut sessions, &opened, stopped).await;
    drop(client);
    assert!(
        after < SUSPECT_AFTER / 2,
        "suspected {after:?} after the freeze; fixed mode would take {SUSPECT_AFTER:?} from the last frame"
    );
    server.shutdown().await.expect("clean shutdown");
}

/// A client process that is continued, killed and reaped when dropped, so a
/// failing test leaves no stopped process behind.
struct Continued(std::process::Child);

impl Drop for Continued {
    fn drop(&mut self) {
        signal(&self.0, "-CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Tests that fixed mode (the default) reports φ 0.
#[tokio::test]
async fn fixed_mode_reports_phi_zero() {
    let server = TestServer::start(fast_config()).await;
    let (mut session, _) = RawSession::hello(server.addr, "fixed").await;
    rhythm(&mut session, &[30; 5]).await;
    let listed = list_sessions(server.addr).await;
    assert_eq!(Phi(listed.sessions[0].phi), Phi(0.0));
    server.shutdown().await.expect("clean shutdown");
}
