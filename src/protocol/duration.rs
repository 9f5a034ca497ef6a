//! Conversions between wire types and the crate's own.

use std::time::{Duration, SystemTime};

use super::pb::{self, watch_sessions_response::Event, GoodbyeReason};
use crate::registry::{Change, CloseReason, SessionEvent, SessionInfo, SessionState};

/// A `std` duration as a protobuf `Duration`; saturates at the protobuf maximum.
pub fn duration_to_proto(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        // Sub-second nanoseconds are below 1e9 and always fit an i32.
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf `Duration` as a `std` one; `None` if it is negative or malformed.
pub fn proto_to_duration(duration: &prost_types::Duration) -> Option<Duration> {
    let seconds = u64::try_from(duration.seconds).ok()?;
    let nanos = u32::try_from(duration.nanos).ok()?;
    (nanos < 1_000_000_000).then(|| Duration::new(seconds, nanos))
}

/// The goodbye a server sends when it ends a session for `reason`; `None` for
/// the reasons only the client causes (it said goodbye, half-closed, vanished).
pub fn goodbye_reason_of(reason: CloseReason) -> Option<GoodbyeReason> {
    Some(match reason {
        CloseReason::Timeout => GoodbyeReason::Timeout,
        CloseReason::TooManyPings => GoodbyeReason::TooManyPings,
        CloseReason::ProtocolViolation => GoodbyeReason::ProtocolViolation,
        CloseReason::Evicted => GoodbyeReason::Evicted,
        CloseReason::Replaced => GoodbyeReason::Replaced,
        CloseReason::ServerShutdown => GoodbyeReason::ServerShutdown,
        CloseReason::ClientGoodbye | CloseReason::ClientHalfClose | CloseReason::Disconnected => {
            return None
        }
    })
}

/// A wall-clock time as a protobuf `Timestamp`.
pub fn timestamp_to_proto(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

/// A close reason as the wire names it.
pub fn close_reason_to_proto(reason: CloseReason) -> pb::CloseReason {
    match reason {
        CloseReason::ClientGoodbye => pb::CloseReason::ClientGoodbye,
        CloseReason::ClientHalfClose => pb::CloseReason::ClientHalfClose,
        CloseReason::Disconnected => pb::CloseReason::Disconnected,
        CloseReason::Timeout => pb::CloseReason::Timeout,
        CloseReason::TooManyPings => pb::CloseReason::TooManyPings,
        CloseReason::ProtocolViolation => pb::CloseReason::ProtocolViolation,
        CloseReason::Evicted => pb::CloseReason::Evicted,
        CloseReason::Replaced => pb::CloseReason::Replaced,
        CloseReason::ServerShutdown => pb::CloseReason::ServerShutdown,
    }
}

/// A session as presence shows it.
pub fn session_to_proto(session: &SessionInfo) -> pb::Session {
    let identity = &session.identity;
    pb::Session {
        session_id: identity.session_id.clone(),
        client_id: identity.client_id.clone(),
        labels: identity.labels.clone(),
        peer: identity
            .peer
            .map(|peer| peer.to_string())
            .unwrap_or_default(),
        opened_at: Some(timestamp_to_proto(identity.opened_at)),
        last_seen: Some(timestamp_to_proto(session.last_seen)),
        rtt: session.rtt.map(duration_to_proto),
        frames_in: session.frames_in,
        frames_out: session.frames_out,
        state: match session.state {
            SessionState::Live => pb::SessionState::Live,
            SessionState::Suspect => pb::SessionState::Suspect,
        }
        .into(),
    }
}

/// A registry change as a watch event with its revision.
pub fn change_to_proto(change: &Change) -> pb::WatchSessionsResponse {
    let event = match &change.event {
        SessionEvent::Opened(session) => Event::Opened(session_to_proto(session)),
        SessionEvent::Suspected(session) => Event::Suspected(pb::SessionSuspected {
            session: Some(session_to_proto(session)),
        }),
        SessionEvent::Recovered(session) => Event::Recovered(pb::SessionRecovered {
            session: Some(session_to_proto(session)),
        }),
        SessionEvent::Closed {
            session,
            reason,
            message,
        } => Event::Closed(pb::SessionClosed {
            session: Some(session_to_proto(session)),
            reason: close_reason_to_proto(*reason).into(),
            message: message.clone(),
        }),
    };
    pb::WatchSessionsResponse {
        event: Some(event),
        revision: change.revision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that durations survive the round trip and negatives are refused.
    #[test]
    fn durations_round_trip() {
        let duration = Duration::from_millis(10_250);
        assert_eq!(
            proto_to_duration(&duration_to_proto(duration)),
            Some(duration)
        );
        let negative = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(proto_to_duration(&negative), None);
    }

    /// Tests that close reasons keep the contract's numbers (1 to 9 in order).
    #[test]
    fn close_reasons_keep_their_numbers() {
        let numbers: Vec<i32> = CloseReason::ALL
            .iter()
            .map(|reason| close_reason_to_proto(*reason) as i32)
            .collect();
        assert_eq!(numbers, (1..=9).collect::<Vec<_>>());
        for reason in CloseReason::ALL {
            let wire = close_reason_to_proto(reason).as_str_name().to_lowercase();
            assert_eq!(wire, format!("close_reason_{}", reason.as_str()));
        }
    }

    /// Tests that every server-caused reason has a goodbye.
    #[test]
    fn server_reasons_have_goodbyes() {
        let with_goodbye = CloseReason::ALL
            .iter()
            .filter(|reason| goodbye_reason_of(**reason).is_some())
            .count();
        assert_eq!(with_goodbye, 6);
    }
}
