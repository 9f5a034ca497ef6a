//! The layer: liveness settings shared by every call it wraps.

use std::{sync::Arc, time::Duration};

use tower::Layer;

use super::{
    call::Ending,
    policy::{AdaptiveSuspicion, LivenessPolicy},
    service::Liveness,
    wheel::TimerWheel,
};

/// gRPC status code `DEADLINE_EXCEEDED`.
const DEADLINE_EXCEEDED: u8 = 4;
/// gRPC status code `RESOURCE_EXHAUSTED`.
const RESOURCE_EXHAUSTED: u8 = 8;

/// Wraps streaming calls so each ends by itself when its peer falls silent.
///
/// See the [module docs](super) for an example.
#[derive(Clone, Debug)]
pub struct LivenessLayer {
    policy: LivenessPolicy,
    wheel: TimerWheel,
}

impl LivenessLayer {
    /// A layer that ends a call when no whole message arrives for `timeout`.
    ///
    /// By default: no suspicion, a 4 MiB message limit, a 64 KiB read-ahead
    /// buffer, endings with a bare status (`DEADLINE_EXCEEDED` for silence,
    /// `RESOURCE_EXHAUSTED` for size) and a wheel of its own.
    pub fn new(timeout: Duration) -> Self {
        Self {
            policy: LivenessPolicy {
                timeout,
                suspect_after: None,
                adaptive: None,
                max_message_size: 4 * 1024 * 1024,
                inbound_buffer: 64 * 1024,
                on_silence: Ending::status(
                    DEADLINE_EXCEEDED,
                    "no message from the peer within the call's timeout",
                ),
                on_oversize: Ending::status(
                    RESOURCE_EXHAUSTED,
                    "a message from the peer is larger than the limit",
                ),
            },
            wheel: TimerWheel::new(),
        }
    }

    /// Marks a call suspect after this much silence (reported to its
    /// [`LivenessObserver`](super::LivenessObserver)). Ignored unless it is
    /// non-zero and shorter than the timeout. Default: never.
    #[must_use]
    pub fn suspect_after(mut self, after: Duration) -> Self {
        self.policy.suspect_after = Some(after);
        self
    }

    /// Suspects each call by its own rhythm instead: once its φ (the
    /// φ-accrual value of Hayashibara et al. over its recent inter-arrival
    /// times) reaches `threshold`, but never before `floor` of silence and
    /// always by [`suspect_after`](Self::suspect_after), which must be set.
    /// A steady peer is then suspected soon after it misses its rhythm, a
    /// jittery one not for its usual jitter. Each call keeps a window of its
    /// last 100 gaps (about 450 bytes); messages closer together than half
    /// of `floor` count as one beat of its rhythm, so a peer that sends two
    /// messages a round (a reply and its own ping) has one rhythm, not two.
    /// The estimate waits for 30 gaps; until then, `suspect_after` applies.
    /// `threshold` is kept within 0.1 to 40 (a NaN reads as 8).
    /// [`LivenessHandle::phi`] reads a call's φ. Default: off.
    ///
    /// [`LivenessHandle::phi`]: super::LivenessHandle::phi
    #[must_use]
    pub fn adaptive_suspicion(mut self, threshold: f64, floor: Duration) -> Self {
        self.policy.adaptive = Some(AdaptiveSuspicion::new(threshold, floor));
        self
    }

    /// Ends a call whose peer announces a message larger than `bytes`, before
    /// reading it. Default: 4 MiB.
    #[must_use]
    pub fn max_message_size(mut self, bytes: u32) -> Self {
        self.policy.max_message_size = bytes;
        self
    }

    /// How many bytes the layer reads ahead of the service before it stops
    /// reading and lets flow control push back. Default: 64 KiB.
    #[must_use]
    pub fn inbound_buffer(mut self, bytes: usize) -> Self {
        self.policy.inbound_buffer = bytes.max(1);
        self
    }

    /// How a silent call ends. Default: `DEADLINE_EXCEEDED` and no message.
    #[must_use]
    pub fn on_silence(mut self, ending: Ending) -> Self {
        self.policy.on_silence = ending;
        self
    }

    /// How a call with an oversized message ends. Default: `RESOURCE_EXHAUSTED`
    /// and no message.
    #[must_use]
    pub fn on_oversize(mut self, ending: Ending) -> Self {
        self.policy.on_oversize = ending;
        self
    }

    /// Checks deadlines on `wheel`, shared with other layers or timers. Default:
    /// a wheel of the layer's own.
    #[must_use]
    pub fn wheel(mut self, wheel: TimerWheel) -> Self {
        self.wheel = wheel;
        self
    }
}

impl<S> Layer<S> for LivenessLayer {
    type Service = Liveness<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Liveness::new(inner, Arc::new(self.policy.clone()), self.wheel.clone())
    }
}
