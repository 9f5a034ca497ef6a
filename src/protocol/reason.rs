//! Why sessions end: one vocabulary for clients, observers, logs and metrics.
//!
//! The contract names every way a session ends (`CloseReason`) and, for the
//! ends the server causes, the `Goodbye` it sends first (`GoodbyeReason`). The
//! server turns a [`CloseReason`] into its goodbye; the client turns a goodbye
//! back into the same [`CloseReason`]; observers read it from presence. This is
//! the one table that ties the three together.

use std::fmt;

use super::pb;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client said goodbye.
    ClientGoodbye,
    /// The client ended its stream without a goodbye.
    ClientHalfClose,
    /// The stream was reset or the connection lost (crash, kill, reset).
    Disconnected,
    /// The client went silent for the timeout (freeze, partition, dead network).
    Timeout,
    /// The client sent unsolicited frames too fast.
    TooManyPings,
    /// The client broke the protocol.
    ProtocolViolation,
    /// An administrator evicted the session.
    Evicted,
    /// A newer session with the same client id replaced it.
    Replaced,
    /// The server shut down.
    ServerShutdown,
    /// Cluster mode: the server that held the session died or was cut off
    /// from the cluster, and its sessions went with it.
    NodeLost,
    /// The session reached the server's maximum age, was asked to rotate,
    /// and no successor came within the grace.
    Rotated,
    /// A reason this version does not know, read from a newer peer (or an
    /// unspecified one). A server never records it; a client treats a goodbye
    /// with it like [`ServerShutdown`](Self::ServerShutdown), as the contract says.
    Unknown,
}

impl CloseReason {
    /// Every reason a server records, in the contract's order.
    pub const ALL: [CloseReason; 11] = [
        Self::ClientGoodbye,
        Self::ClientHalfClose,
        Self::Disconnected,
        Self::Timeout,
        Self::TooManyPings,
        Self::ProtocolViolation,
        Self::Evicted,
        Self::Replaced,
        Self::ServerShutdown,
        Self::NodeLost,
        Self::Rotated,
    ];

    /// The reason's name as logs and metric labels spell it (`timeout`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientGoodbye => "client_goodbye",
            Self::ClientHalfClose => "client_half_close",
            Self::Disconnected => "disconnected",
            Self::Timeout => "timeout",
            Self::TooManyPings => "too_many_pings",
            Self::ProtocolViolation => "protocol_violation",
            Self::Evicted => "evicted",
            Self::Replaced => "replaced",
            Self::ServerShutdown => "server_shutdown",
            Self::NodeLost => "node_lost",
            Self::Rotated => "rotated",
            Self::Unknown => "unknown",
        }
    }

    /// The goodbye a server sends when it ends a session for this reason;
    /// `None` for the reasons only the client causes (it said goodbye,
    /// half-closed, vanished).
    pub fn goodbye(self) -> Option<pb::GoodbyeReason> {
        use pb::GoodbyeReason as Goodbye;
        Some(match self {
            Self::Timeout => Goodbye::Timeout,
            Self::TooManyPings => Goodbye::TooManyPings,
            Self::ProtocolViolation => Goodbye::ProtocolViolation,
            Self::Evicted => Goodbye::Evicted,
            Self::Replaced => Goodbye::Replaced,
            Self::ServerShutdown => Goodbye::ServerShutdown,
            // The end after the grace repeats the request that went unheeded.
            Self::Rotated => Goodbye::Rotate,
            // A lost node's sessions are declared by the others; it sends nothing.
            Self::ClientGoodbye
            | Self::ClientHalfClose
            | Self::Disconnected
            | Self::NodeLost
            | Self::Unknown => return None,
        })
    }

    /// The reason a server's goodbye (as its wire number) gives for ending a
    /// session; [`Unknown`](Self::Unknown) for numbers this version does not know.
    pub fn from_goodbye(goodbye: i32) -> Self {
        use pb::GoodbyeReason as Goodbye;
        match Goodbye::try_from(goodbye) {
            Ok(Goodbye::Timeout) => Self::Timeout,
            Ok(Goodbye::TooManyPings) => Self::TooManyPings,
            Ok(Goodbye::ProtocolViolation) => Self::ProtocolViolation,
            Ok(Goodbye::Evicted) => Self::Evicted,
            Ok(Goodbye::Replaced) => Self::Replaced,
            Ok(Goodbye::ServerShutdown) => Self::ServerShutdown,
            Ok(Goodbye::Rotate) => Self::Rotated,
            // A server does not say CLIENT_SHUTDOWN; from one it means nothing known.
            Ok(Goodbye::ClientShutdown | Goodbye::Unspecified) | Err(_) => Self::Unknown,
        }
    }

    /// The reason a presence event gives, as its wire number;
    /// [`Unknown`](Self::Unknown) for numbers this version does not know.
    pub fn from_wire(reason: i32) -> Self {
        pb::CloseReason::try_from(reason).map_or(Self::Unknown, Self::from)
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<CloseReason> for pb::CloseReason {
    fn from(reason: CloseReason) -> Self {
        match reason {
            CloseReason::ClientGoodbye => Self::ClientGoodbye,
            CloseReason::ClientHalfClose => Self::ClientHalfClose,
            CloseReason::Disconnected => Self::Disconnected,
            CloseReason::Timeout => Self::Timeout,
            CloseReason::TooManyPings => Self::TooManyPings,
            CloseReason::ProtocolViolation => Self::ProtocolViolation,
            CloseReason::Evicted => Self::Evicted,
            CloseReason::Replaced => Self::Replaced,
            CloseReason::ServerShutdown => Self::ServerShutdown,
            CloseReason::NodeLost => Self::NodeLost,
            CloseReason::Rotated => Self::Rotated,
            CloseReason::Unknown => Self::Unspecified,
        }
    }
}

impl From<pb::CloseReason> for CloseReason {
    fn from(reason: pb::CloseReason) -> Self {
        match reason {
            pb::CloseReason::ClientGoodbye => Self::ClientGoodbye,
            pb::CloseReason::ClientHalfClose => Self::ClientHalfClose,
            pb::CloseReason::Disconnected => Self::Disconnected,
            pb::CloseReason::Timeout => Self::Timeout,
            pb::CloseReason::TooManyPings => Self::TooManyPings,
            pb::CloseReason::ProtocolViolation => Self::ProtocolViolation,
            pb::CloseReason::Evicted => Self::Evicted,
            pb::CloseReason::Replaced => Self::Replaced,
            pb::CloseReason::ServerShutdown => Self::ServerShutdown,
            pb::CloseReason::NodeLost => Self::NodeLost,
            pb::CloseReason::Rotated => Self::Rotated,
            pb::CloseReason::Unspecified => Self::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that close reasons keep the contract's numbers (1 to 10 in order)
    /// and names, and survive the round trip through the wire.
    #[test]
    fn close_reasons_keep_their_numbers_and_names() {
        let numbers: Vec<i32> = CloseReason::ALL
            .iter()
            .map(|reason| pb::CloseReason::from(*reason) as i32)
            .collect();
        assert_eq!(numbers, (1..=11).collect::<Vec<_>>());
        for reason in CloseReason::ALL {
            let wire = pb::CloseReason::from(reason);
            assert_eq!(
                wire.as_str_name().to_lowercase(),
                format!("close_reason_{}", reason.as_str())
            );
            assert_eq!(CloseReason::from_wire(wire as i32), reason);
        }
        assert_eq!(CloseReason::from_wire(0), CloseReason::Unknown);
        assert_eq!(CloseReason::from_wire(99), CloseReason::Unknown);
    }

    /// Tests that every server-caused reason has a goodbye that the client
    /// reads back as the same reason, and unknown goodbyes read as unknown.
    #[test]
    fn goodbyes_read_back_as_their_reason() {
        let with_goodbye: Vec<CloseReason> = CloseReason::ALL
            .into_iter()
            .filter(|reason| reason.goodbye().is_some())
            .collect();
        assert_eq!(with_goodbye.len(), 7);
        for reason in with_goodbye {
            let wire = reason.goodbye().map(|goodbye| goodbye as i32);
            assert_eq!(wire.map(CloseReason::from_goodbye), Some(reason));
        }
        assert_eq!(
            CloseReason::from_goodbye(pb::GoodbyeReason::ClientShutdown as i32),
            CloseReason::Unknown
        );
        assert_eq!(CloseReason::from_goodbye(99), CloseReason::Unknown);
    }
}
