//! The registry's session types as PresenceService's messages, and back.
//!
//! The server's presence service turns sessions and changes into messages;
//! the [`PresenceClient`](super::PresenceClient) and its
//! [`Watcher`](super::Watcher) turn messages back into the same types, so an
//! embedder reads a remote server's sessions exactly as it would read its own
//! registry's.

use std::{net::SocketAddr, time::SystemTime};

use crate::{
    error::PresenceError,
    protocol::{duration_to_proto, pb, proto_to_duration, CloseReason, Phi},
    registry::{Change, SessionEvent, SessionIdentity, SessionInfo, SessionState},
};

use pb::watch_sessions_response::Event;

// === domain → wire ===

impl From<&SessionInfo> for pb::Session {
    fn from(session: &SessionInfo) -> Self {
        let identity = &session.identity;
        pb::Session {
            session_id: identity.session_id.clone(),
            client_id: identity.client_id.clone(),
            labels: identity.labels.clone(),
            peer: identity
                .peer
                .map(|peer| peer.to_string())
                .unwrap_or_default(),
            opened_at: Some(identity.opened_at.into()),
            last_seen: Some(session.last_seen.into()),
            rtt: session.rtt.map(duration_to_proto),
            frames_in: session.frames_in,
            frames_out: session.frames_out,
            state: pb::SessionState::from(session.state).into(),
            node: identity.node.clone(),
            phi: session.phi.0,
        }
    }
}

impl From<SessionState> for pb::SessionState {
    fn from(state: SessionState) -> Self {
        match state {
            SessionState::Live => Self::Live,
            SessionState::Suspect => Self::Suspect,
        }
    }
}

impl From<&Change> for pb::WatchSessionsResponse {
    fn from(change: &Change) -> Self {
        let session = |session: &SessionInfo| Some(pb::Session::from(session));
        let event = match &change.event {
            SessionEvent::Opened(opened) => Event::Opened(pb::Session::from(opened)),
            SessionEvent::Suspected(suspected) => Event::Suspected(pb::SessionSuspected {
                session: session(suspected),
            }),
            SessionEvent::Recovered(recovered) => Event::Recovered(pb::SessionRecovered {
                session: session(recovered),
            }),
            SessionEvent::Closed {
                session: closed,
                reason,
                message,
            } => Event::Closed(pb::SessionClosed {
                session: session(closed),
                reason: pb::CloseReason::from(*reason).into(),
                message: message.clone(),
            }),
        };
        pb::WatchSessionsResponse {
            event: Some(event),
            revision: change.revision,
        }
    }
}

// === wire → domain ===

impl TryFrom<pb::Session> for SessionInfo {
    type Error = PresenceError;

    /// A session as the server reported it. An address that is not an IP
    /// socket address (a transport without one) reads as no address.
    fn try_from(session: pb::Session) -> Result<Self, PresenceError> {
        let time = |time: Option<prost_types::Timestamp>, missing: &'static str| {
            time.and_then(|time| SystemTime::try_from(time).ok())
                .ok_or(PresenceError::Malformed(missing))
        };
        let state = match session.state() {
            pb::SessionState::Suspect => SessionState::Suspect,
            // An unset state (an older server) is an open session.
            pb::SessionState::Live | pb::SessionState::Unspecified => SessionState::Live,
        };
        Ok(SessionInfo {
            last_seen: time(session.last_seen, "a session without a valid last_seen")?,
            rtt: session.rtt.as_ref().and_then(proto_to_duration),
            state,
            frames_in: session.frames_in,
            frames_out: session.frames_out,
            phi: Phi(session.phi),
            identity: SessionIdentity {
                opened_at: time(session.opened_at, "a session without a valid opened_at")?,
                peer: session.peer.parse::<SocketAddr>().ok(),
                session_id: session.session_id,
                client_id: session.client_id,
                labels: session.labels,
                node: session.node,
            }
            .into(),
        })
    }
}

/// The session change an event reports; `None` for the markers (`synced`,
/// `reset`), which are not changes.
pub(crate) fn session_event(event: Event) -> Result<Option<SessionEvent>, PresenceError> {
    let session = |session: Option<pb::Session>| {
        session
            .ok_or(PresenceError::Malformed("an event without its session"))
            .and_then(SessionInfo::try_from)
    };
    Ok(Some(match event {
        Event::Opened(opened) => SessionEvent::Opened(opened.try_into()?),
        Event::Suspected(suspected) => SessionEvent::Suspected(session(suspected.session)?),
        Event::Recovered(recovered) => SessionEvent::Recovered(session(recovered.session)?),
        Event::Closed(closed) => SessionEvent::Closed {
            reason: CloseReason::from_wire(closed.reason),
            session: session(closed.session)?,
            message: closed.message,
        },
        Event::Synced(_) | Event::Reset(_) => return Ok(None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{collections::HashMap, sync::Arc, time::Duration};

    fn session(state: SessionState) -> SessionInfo {
        let opened_at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        SessionInfo {
            identity: Arc::new(SessionIdentity {
                session_id: "00ff".into(),
                client_id: "worker-1".into(),
                labels: HashMap::from([("zone".into(), "eu-1".into())]),
                peer: Some("127.0.0.1:4000".parse().expect("address")),
                opened_at,
                node: "node-1".into(),
            }),
            last_seen: opened_at + Duration::from_secs(5),
            rtt: Some(Duration::from_micros(1500)),
            state,
            frames_in: 7,
            frames_out: 9,
            phi: Phi(2.5),
        }
    }

    /// Tests that a session and each kind of change survive the trip to the
    /// wire and back unchanged.
    #[test]
    fn sessions_and_changes_round_trip() {
        for state in [SessionState::Live, SessionState::Suspect] {
            let info = session(state);
            let back = SessionInfo::try_from(pb::Session::from(&info)).expect("readable");
            assert_eq!(back, info);
        }
        let info = session(SessionState::Live);
        let events = [
            SessionEvent::Opened(info.clone()),
            SessionEvent::Suspected(info.clone()),
            SessionEvent::Recovered(info.clone()),
            SessionEvent::Closed {
                session: info,
                reason: CloseReason::Evicted,
                message: "bye".into(),
            },
        ];
        for event in events {
            let change = Change {
                revision: 42,
                event,
            };
            let wire = pb::WatchSessionsResponse::from(&change);
            assert_eq!(wire.revision, 42);
            let back = session_event(wire.event.expect("an event")).expect("readable");
            assert_eq!(back, Some(change.event));
        }
    }

    /// Tests that a session without its times, or an event without its
    /// session, is refused as malformed, naming what is missing.
    #[test]
    fn malformed_messages_are_refused() {
        let mut wire = pb::Session::from(&session(SessionState::Live));
        wire.opened_at = None;
        let error = SessionInfo::try_from(wire).expect_err("no opened_at");
        assert!(error.to_string().contains("opened_at"), "{error}");
        let error = session_event(Event::Suspected(pb::SessionSuspected { session: None }))
            .expect_err("no session");
        assert!(error.to_string().contains("without its session"), "{error}");
    }
}
