//! How each server-initiated end looks on the wire: the `Goodbye` frame and the
//! status after it. The one place a close reason becomes a `tonic::Status`.

use std::time::Duration;

use http::HeaderMap;
use tonic::{Code, Status};

use crate::{
    config::ServerConfig,
    liveness::Ending,
    protocol::{duration_to_proto, grpc, pb, text, CloseReason},
};

/// The status a session ends with for `reason`; its message is cut to the
/// contract's 1 KiB.
pub(crate) fn status_for(reason: CloseReason, message: &str) -> Status {
    let message = text::truncate(message, text::MAX_MESSAGE_BYTES);
    let code = match reason {
        CloseReason::ClientGoodbye | CloseReason::ClientHalfClose => Code::Ok,
        CloseReason::Disconnected => Code::Cancelled,
        CloseReason::Timeout => Code::DeadlineExceeded,
        CloseReason::TooManyPings => Code::ResourceExhausted,
        CloseReason::ProtocolViolation => Code::InvalidArgument,
        CloseReason::Evicted | CloseReason::Replaced => Code::Aborted,
        CloseReason::ServerShutdown | CloseReason::NodeLost | CloseReason::Rotated => {
            Code::Unavailable
        }
        CloseReason::Unknown => Code::Unknown,
    };
    Status::new(code, message)
}

/// Why a silent session ended, as its goodbye and its close say.
pub(crate) fn silence_message(config: &ServerConfig) -> String {
    format!(
        "no frame from the client for {}",
        humantime::format_duration(config.timeout)
    )
}

/// Why a session with an oversized frame ended.
pub(crate) fn oversize_message(config: &ServerConfig) -> String {
    format!(
        "a frame is larger than {} bytes",
        config.limits.max_message_size
    )
}

/// The ending the liveness layer performs for `reason`: `Goodbye{reason}` (with
/// `reconnect_after` when given), then the status as trailers.
pub(crate) fn ending_for(
    reason: CloseReason,
    message: &str,
    reconnect_after: Option<Duration>,
) -> Ending {
    let message = text::truncate(message, text::MAX_MESSAGE_BYTES);
    let goodbye = reason
        .goodbye()
        .map(|goodbye_reason| pb::HeartbeatResponse {
            frame: Some(pb::heartbeat_response::Frame::Goodbye(pb::Goodbye {
                reason: goodbye_reason.into(),
                message: message.to_owned(),
                reconnect_after: reconnect_after.map(duration_to_proto),
            })),
        });
    // An end the client caused needs no explanation back: the status is a
    // bare OK (or CANCELLED, for a connection that is gone anyway).
    let status = status_for(reason, if goodbye.is_some() { message } else { "" });
    Ending::new(goodbye.as_ref().map(grpc::frame), status_trailers(&status))
}

/// An ending with no frame, only `status`: for a stream refused after it
/// opened, before it became a session.
pub(crate) fn refusal(status: &Status) -> Ending {
    Ending::new(None, status_trailers(status))
}

/// The trailers that carry `status`.
pub(crate) fn status_trailers(status: &Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        // Only a message that cannot be a header value fails; keep the code.
        trailers.insert("grpc-status", (status.code() as i32).into());
    }
    trailers
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Tests that the farewell for a timeout is a decodable Goodbye and a
    /// DEADLINE_EXCEEDED status.
    #[test]
    fn timeout_farewell_is_goodbye_then_deadline_exceeded() {
        let ending = ending_for(CloseReason::Timeout, "silent for 30s", None);
        let message = ending.message.expect("server ends carry a goodbye");
        let decoded = pb::HeartbeatResponse::decode(&message[5..]).expect("valid frame");
        let Some(pb::heartbeat_response::Frame::Goodbye(goodbye)) = decoded.frame else {
            panic!("expected a goodbye, got {decoded:?}");
        };
        assert_eq!(goodbye.reason(), pb::GoodbyeReason::Timeout);
        let status = Status::from_header_map(&ending.trailers).expect("status trailers");
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(status.message(), "silent for 30s");
    }
}
