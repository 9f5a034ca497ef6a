//! The settings every call of one layer shares, and what follows from them.

use std::time::Duration;

use super::call::Ending;

/// The settings every call of one layer shares.
#[derive(Clone, Debug)]
pub(crate) struct LivenessPolicy {
    /// Silence after which a call ends.
    pub(super) timeout: Duration,
    /// Silence after which a call is suspect, if ever.
    pub(super) suspect_after: Option<Duration>,
    /// The largest message a peer may announce.
    pub(super) max_message_size: u32,
    /// How far the layer reads ahead of the service, in bytes.
    pub(super) inbound_buffer: usize,
    /// How a silent call ends.
    pub(super) on_silence: Ending,
    /// How a call with an oversized message ends.
    pub(super) on_oversize: Ending,
}

impl LivenessPolicy {
    /// The suspicion threshold in force: only a non-zero one shorter than the
    /// timeout means anything (a longer one would never come first).
    pub(super) fn suspicion(&self) -> Option<Duration> {
        self.suspect_after
            .filter(|after| !after.is_zero() && *after < self.timeout)
    }

    /// How long after the last message the first deadline check is due.
    pub(super) fn first_check(&self) -> Duration {
        self.suspicion().unwrap_or(self.timeout)
    }
}
