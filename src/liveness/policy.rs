//! The settings every call of one layer shares, and what follows from them.

use std::time::Duration;

use super::{call::Ending, phi};

/// The settings every call of one layer shares.
#[derive(Clone, Debug)]
pub(crate) struct LivenessPolicy {
    /// Silence after which a call ends.
    pub(super) timeout: Duration,
    /// Silence after which a call is suspect, if ever.
    pub(super) suspect_after: Option<Duration>,
    /// Suspicion by each call's own rhythm (φ-accrual) within bounds, if set.
    pub(super) adaptive: Option<AdaptiveSuspicion>,
    /// The largest message a peer may announce.
    pub(super) max_message_size: u32,
    /// How far the layer reads ahead of the service, in bytes.
    pub(super) inbound_buffer: usize,
    /// How a silent call ends.
    pub(super) on_silence: Ending,
    /// How a call with an oversized message ends.
    pub(super) on_oversize: Ending,
}

/// Suspicion by φ-accrual: a call is suspect once its φ reaches the
/// threshold, but never before `floor` of silence, and always by the fixed
/// `suspect_after`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdaptiveSuspicion {
    /// Standard deviations above the mean gap at which φ reaches it.
    pub(super) z: f64,
    /// The least silence ever suspected.
    pub(super) floor: Duration,
}

impl AdaptiveSuspicion {
    /// The thresholds taken; others are brought into this range.
    const THRESHOLDS: (f64, f64) = (0.1, 40.0);

    pub(super) fn new(threshold: f64, floor: Duration) -> Self {
        let threshold = if threshold.is_nan() {
            8.0
        } else {
            threshold.clamp(Self::THRESHOLDS.0, Self::THRESHOLDS.1)
        };
        Self {
            z: phi::quantile(threshold),
            floor,
        }
    }

    /// The shortest gap that is a beat of the peer's rhythm: messages closer
    /// together than half the floor count as one arrival. A client that
    /// both pings on its own and answers the server's pings then has one
    /// rhythm, not two interleaved ones that would read as jitter.
    pub(super) fn beat(&self) -> Duration {
        self.floor / 2
    }
}

impl LivenessPolicy {
    /// The suspicion threshold in force: only a non-zero one shorter than the
    /// timeout means anything (a longer one would never come first).
    pub(super) fn suspicion(&self) -> Option<Duration> {
        self.suspect_after
            .filter(|after| !after.is_zero() && *after < self.timeout)
    }
}
