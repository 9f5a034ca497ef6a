//! The liveness of one call: when the peer was last heard, whether it is live or
//! suspect, and how the call is to end.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc, OnceLock, Weak,
    },
    task::{Context, Waker},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::{
    phi::ArrivalWindow,
    policy::LivenessPolicy,
    wheel::{TimerWheel, WheelTarget},
};

/// Whether the peer of a call is keeping up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LivenessState {
    /// Messages keep arriving.
    Live,
    /// No message for the suspicion threshold: still open, but late.
    Suspect,
    /// The call is ending or has ended.
    Ended,
}

/// Why the layer ended a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCause {
    /// No message arrived for the timeout.
    Silence,
    /// A message announced more bytes than the limit.
    Oversize,
    /// Someone called [`LivenessHandle::end`].
    Requested,
}

/// How a call ends: an optional last message, then trailers.
///
/// `message` must be one whole gRPC message including its 5-byte prefix; it is
/// sent only if the response stream is at a message boundary. `trailers` end the
/// stream and should carry `grpc-status` (tonic's `Status::add_header` builds them).
#[derive(Debug, Clone)]
pub struct Ending {
    /// The last message, already framed.
    pub message: Option<Bytes>,
    /// The trailers that finish the call.
    pub trailers: HeaderMap,
}

impl Ending {
    /// An ending with this last message and these trailers.
    pub fn new(message: Option<Bytes>, trailers: HeaderMap) -> Self {
        Self { message, trailers }
    }

    /// An ending with no last message and a bare `grpc-status`/`grpc-message`.
    ///
    /// `message` should be printable ASCII without `%`, as it is sent verbatim.
    pub fn status(code: u8, message: &'static str) -> Self {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from(u16::from(code)));
        trailers.insert("grpc-message", http::HeaderValue::from_static(message));
        Self {
            message: None,
            trailers,
        }
    }
}

/// Told about a call's liveness changes. Set with [`LivenessHandle::observe`].
///
/// Callbacks run on the timer or the connection's task: they must be quick and
/// must not block.
pub trait LivenessObserver: Send + Sync {
    /// No message arrived for the suspicion threshold.
    fn suspected(&self) {}
    /// A message arrived while the call was suspect.
    fn recovered(&self) {}
    /// The layer began to end the call, and why.
    fn ended(&self, _cause: EndCause) {}
    /// The response side is sending the ending of a call that was silent for
    /// the timeout, `lateness` after its deadline (its last message plus the
    /// timeout): how late the layer was.
    fn silence_ended(&self, _lateness: Duration) {}
}

/// A handle to one call's liveness, found in the request's extensions.
///
/// The service behind [`LivenessLayer`](super::LivenessLayer) reads it with
/// `request.extensions().get::<LivenessHandle>()`.
#[derive(Clone)]
pub struct LivenessHandle {
    pub(crate) core: Arc<CallCore>,
}

/// The state shared by the layer's future, bodies, timer entries and handles.
pub(crate) struct CallCore {
    /// The timeouts and endings of the layer that made this call.
    policy: Arc<LivenessPolicy>,
    /// The wheel that checks the deadlines.
    wheel: TimerWheel,
    /// When a message last arrived, in microseconds since the wheel's base.
    last_seen: AtomicU64,
    /// The deadline a silent call was ended for, in microseconds since the
    /// wheel's base: fixed when the wheel decides, so a message arriving
    /// after the decision cannot move it.
    missed_deadline: AtomicU64,
    /// `LIVE`, `SUSPECT` or `ENDED`.
    state: AtomicU8,
    /// Bumped whenever the deadline entry is replaced; older entries fizzle.
    generation: AtomicU64,
    /// Whole messages received from the peer.
    frames_in: AtomicU64,
    /// Whole messages sent to the peer.
    frames_out: AtomicU64,
    /// The ending to perform, until the response side takes it. Boxed: every
    /// call carries this slot, few calls fill it.
    ending: Mutex<Option<Box<Ending>>>,
    /// Why the call ends: set once, by the first cause. The one decision that
    /// every end of the call follows.
    cause: OnceLock<EndCause>,
    /// The task polling the response; woken to perform an ending.
    waker: Mutex<Option<Waker>>,
    /// Serialises suspect/recover transitions with their callbacks, so an
    /// observer hears them in the order they happened.
    transitions: Mutex<()>,
    /// Who hears of suspicion, recovery and endings.
    observer: OnceLock<Arc<dyn LivenessObserver>>,
    /// The recent gaps between messages, for adaptive suspicion only: boxed,
    /// so that a call without it pays one pointer, not the window.
    arrivals: Option<Box<Mutex<ArrivalWindow>>>,
    /// A weak self-reference for timer entries.
    this: Weak<CallCore>,
}

const LIVE: u8 = 0;
const SUSPECT: u8 = 1;
const ENDED: u8 = 2;

// === impl LivenessHandle ===

impl LivenessHandle {
    /// The current state of the call.
    pub fn state(&self) -> LivenessState {
        match self.core.state.load(Ordering::Acquire) {
            LIVE => LivenessState::Live,
            SUSPECT => LivenessState::Suspect,
            _ => LivenessState::Ended,
        }
    }

    /// When the last whole message arrived (the call's start before any).
    pub fn last_seen(&self) -> Instant {
        self.core
            .instant(self.core.last_seen.load(Ordering::Acquire))
    }

    /// Whole messages received so far.
    pub fn frames_in(&self) -> u64 {
        self.core.frames_in.load(Ordering::Relaxed)
    }

    /// Whole messages sent so far.
    pub fn frames_out(&self) -> u64 {
        self.core.frames_out.load(Ordering::Relaxed)
    }

    /// Why the call ends, once that is decided.
    pub fn end_cause(&self) -> Option<EndCause> {
        self.core.cause.get().copied()
    }

    /// Sets the observer of this call's liveness; only the first call has effect.
    pub fn observe(&self, observer: Arc<dyn LivenessObserver>) {
        // A second observer is ignored by design: one owner per call.
        let _ = self.core.observer.set(observer);
    }

    /// Ends the call: the response stream yields `ending` and the service's own
    /// response is dropped. The first cause wins: returns false, and changes
    /// nothing, if the call's end was already decided (by silence, an oversized
    /// message, or an earlier `end`). A call whose response already finished
    /// by itself sends nothing more, but the first `end` still decides its cause.
    pub fn end(&self, ending: Ending) -> bool {
        self.core.request_ending(EndCause::Requested, ending)
    }

    /// The call's φ now: how surprising its current silence is given its
    /// recent rhythm (see [`LivenessLayer::adaptive_suspicion`]); 0 without
    /// adaptive suspicion, or before a few messages have set a rhythm.
    ///
    /// [`LivenessLayer::adaptive_suspicion`]: super::LivenessLayer::adaptive_suspicion
    pub fn phi(&self) -> f64 {
        let core = &self.core;
        let Some(estimate) = core
            .arrivals
            .as_ref()
            .and_then(|window| window.lock().estimate())
        else {
            return 0.0;
        };
        let silence = Instant::now()
            .saturating_duration_since(core.instant(core.last_seen.load(Ordering::Acquire)));
        estimate.phi(silence).max(0.0)
    }

    /// Records that the peer was heard from without a whole message: a
    /// keepalive of the transport under the call (a WebSocket ping or pong
    /// carried by a bridge) proves it alive. No message is counted.
    pub fn heard(&self) {
        self.core.touch(0);
    }

    /// Wakes the task that polls the response, so the service's response stream
    /// is polled again (for instance when a timer of the service's own is due).
    pub fn wake(&self) {
        self.core.wake();
    }

    /// The wheel that checks this call's deadlines, to share with the service's
    /// own periodic work.
    pub fn wheel(&self) -> &TimerWheel {
        &self.core.wheel
    }
}

impl fmt::Debug for LivenessHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LivenessHandle")
            .field("state", &self.state())
            .field("frames_in", &self.frames_in())
            .field("frames_out", &self.frames_out())
            .finish()
    }
}

// === impl CallCore ===

impl CallCore {
    /// Starts tracking a call that begins now, with its deadline entry armed.
    pub(crate) fn start(policy: Arc<LivenessPolicy>, wheel: TimerWheel) -> Arc<Self> {
        let now = Instant::now();
        let arrivals = policy
            .adaptive
            .map(|adaptive| Box::new(Mutex::new(ArrivalWindow::new(adaptive.beat()))));
        let core = Arc::new_cyclic(|this| CallCore {
            last_seen: AtomicU64::new(micros_since(wheel.base(), now)),
            missed_deadline: AtomicU64::new(0),
            policy,
            wheel,
            state: AtomicU8::new(LIVE),
            generation: AtomicU64::new(0),
            frames_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            ending: Mutex::new(None),
            cause: OnceLock::new(),
            waker: Mutex::new(None),
            transitions: Mutex::new(()),
            observer: OnceLock::new(),
            arrivals,
            this: this.clone(),
        });
        core.arm(0, now + core.first_check());
        core
    }

    fn arm(&self, generation: u64, at: Instant) {
        let target: Weak<dyn WheelTarget> = self.this.clone();
        self.wheel.insert(at, generation, target);
    }

    fn instant(&self, micros: u64) -> Instant {
        self.wheel.base() + Duration::from_micros(micros)
    }

    /// Records `messages` whole messages arriving now. The hot path: two atomic
    /// writes and a load, unless the call was suspect.
    pub(crate) fn touch(&self, messages: u64) {
        let now = Instant::now();
        let at = micros_since(self.wheel.base(), now);
        if let Some(arrivals) = &self.arrivals {
            arrivals.lock().record(at);
        }
        // SeqCst pairs with `suspect`: either this load sees SUSPECT and
        // recovers, or `suspect` sees this store and takes suspicion back.
        self.last_seen.store(at, Ordering::SeqCst);
        self.frames_in.fetch_add(messages, Ordering::Relaxed);
        if self.state.load(Ordering::SeqCst) != SUSPECT {
            return;
        }
        let _transition = self.transitions.lock();
        if self
            .state
            .compare_exchange(SUSPECT, LIVE, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            // The entry armed for the timeout would check suspicion too late:
            // replace it with one at the new suspicion time.
            let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            self.arm(generation, now + self.first_check());
            if let Some(observer) = self.observer.get() {
                observer.recovered();
            }
        }
    }

    /// Marks the call suspect if no message arrived since `seen` (microseconds
    /// since the wheel's base); a message racing in takes the suspicion back.
    /// Whether the call is suspect now: false when a message raced in.
    fn suspect(&self, seen: u64) -> bool {
        let _transition = self.transitions.lock();
        if self
            .state
            .compare_exchange(LIVE, SUSPECT, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        if self.last_seen.load(Ordering::SeqCst) != seen {
            // `touch` ran in between and saw LIVE; the peer is not late.
            let _ = self
                .state
                .compare_exchange(SUSPECT, LIVE, Ordering::SeqCst, Ordering::SeqCst);
            return false;
        }
        if let Some(observer) = self.observer.get() {
            observer.suspected();
        }
        true
    }

    pub(crate) fn count_sent(&self, messages: u64) {
        self.frames_out.fetch_add(messages, Ordering::Relaxed);
    }

    /// Decides how the call ends, unless that is decided already: the first
    /// cause wins, for good. Leaves `ending` for the response side (which
    /// performs it unless the response has already finished) and moves the
    /// call to `ENDED`, so its timers stop.
    pub(crate) fn request_ending(&self, cause: EndCause, ending: Ending) -> bool {
        if self.cause.set(cause).is_err() {
            return false;
        }
        *self.ending.lock() = Some(Box::new(ending));
        self.state.swap(ENDED, Ordering::AcqRel);
        if let Some(observer) = self.observer.get() {
            observer.ended(cause);
        }
        self.wake();
        true
    }

    /// Marks a call whose response finished (or was dropped), so its timers
    /// stop. It decides nothing: the first `request_ending` after it still
    /// records the call's cause.
    pub(crate) fn mark_complete(&self) {
        self.state.store(ENDED, Ordering::Release);
    }

    /// Takes the pending ending, if one was asked for.
    pub(crate) fn take_ending(&self) -> Option<Box<Ending>> {
        if self.state.load(Ordering::Acquire) != ENDED {
            return None;
        }
        self.ending.lock().take()
    }

    /// The response side took the ending and sends it now: a silent call's
    /// observer hears how late that is.
    pub(crate) fn ending_taken(&self) {
        if self.cause.get() != Some(&EndCause::Silence) {
            return;
        }
        let Some(observer) = self.observer.get() else {
            return;
        };
        let deadline = self.instant(self.missed_deadline.load(Ordering::Acquire));
        observer.silence_ended(Instant::now().saturating_duration_since(deadline));
    }

    /// Remembers the task to wake for an ending.
    pub(crate) fn register(&self, cx: &Context<'_>) {
        let mut waker = self.waker.lock();
        match &*waker {
            Some(current) if current.will_wake(cx.waker()) => {}
            _ => *waker = Some(cx.waker().clone()),
        }
    }

    /// The settings of the layer that made this call.
    pub(crate) fn policy(&self) -> &LivenessPolicy {
        &self.policy
    }

    /// The silence after which this call is suspect now, if ever: the fixed
    /// threshold, or under adaptive suspicion where its φ reaches the
    /// threshold, kept between the floor and the fixed threshold.
    fn suspect_after(&self) -> Option<Duration> {
        let fixed = self.policy.suspicion()?;
        let (Some(adaptive), Some(arrivals)) = (&self.policy.adaptive, &self.arrivals) else {
            return Some(fixed);
        };
        Some(match arrivals.lock().estimate() {
            Some(estimate) => estimate.reaches(adaptive.z).max(adaptive.floor).min(fixed),
            None => fixed,
        })
    }

    /// How long after the last message the first deadline check is due.
    fn first_check(&self) -> Duration {
        self.suspect_after().unwrap_or(self.policy.timeout)
    }

    pub(crate) fn wake(&self) {
        if let Some(waker) = self.waker.lock().as_ref() {
            waker.wake_by_ref();
        }
    }
}

impl WheelTarget for CallCore {
    fn fire(&self, generation: u64, now: Instant) -> Option<Instant> {
        if generation != self.generation.load(Ordering::Acquire) {
            return None;
        }
        let state = self.state.load(Ordering::Acquire);
        if state == ENDED {
            return None;
        }
        let seen = self.last_seen.load(Ordering::SeqCst);
        let last_seen = self.instant(seen);
        let silence = now.saturating_duration_since(last_seen);
        let policy = &self.policy;
        if silence >= policy.timeout {
            self.missed_deadline.store(
                micros_since(self.wheel.base(), last_seen + policy.timeout),
                Ordering::Release,
            );
            self.request_ending(EndCause::Silence, policy.on_silence.clone());
            return None;
        }
        match self.suspect_after() {
            Some(suspect_after) if state == LIVE && silence >= suspect_after => {
                if self.suspect(seen) {
                    // Check again at the deadline; a recovery re-arms earlier.
                    Some(last_seen + policy.timeout)
                } else {
                    // A message raced in: its own suspicion time is next.
                    let seen = self.instant(self.last_seen.load(Ordering::SeqCst));
                    Some(seen + self.suspect_after().unwrap_or(suspect_after))
                }
            }
            Some(suspect_after) if state == LIVE => Some(last_seen + suspect_after),
            _ => Some(last_seen + policy.timeout),
        }
    }
}

fn micros_since(base: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(base).as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the lateness it is told of.
    #[derive(Default)]
    struct Lateness(Mutex<Vec<Duration>>);

    impl LivenessObserver for Lateness {
        fn silence_ended(&self, lateness: Duration) {
            self.0.lock().push(lateness);
        }
    }

    /// Tests that the lateness of a silent call counts from the deadline the
    /// wheel decided on, even when a message arrives between the decision
    /// and the ending going out.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn lateness_counts_from_the_decided_deadline() {
        let policy = LivenessPolicy {
            timeout: Duration::from_millis(100),
            suspect_after: None,
            adaptive: None,
            max_message_size: 1024,
            inbound_buffer: 1024,
            on_silence: Ending::status(4, "silent"),
            on_oversize: Ending::status(8, "too big"),
        };
        let core = CallCore::start(Arc::new(policy), TimerWheel::with_shards(1));
        let lateness = Arc::new(Lateness::default());
        let _ = core.observer.set(lateness.clone());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(core.cause.get(), Some(&EndCause::Silence));
        // A message too late to count, then the ending goes out 20 ms later.
        core.touch(1);
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(core.take_ending().is_some());
        core.ending_taken();
        let recorded = lateness.0.lock().clone();
        assert_eq!(recorded.len(), 1);
        assert!(
            recorded[0] >= Duration::from_millis(60),
            "lateness {:?} counted from the late message",
            recorded[0]
        );
    }

    /// Records when it was suspected.
    #[derive(Default)]
    struct Suspicions(Mutex<Vec<Instant>>);

    impl LivenessObserver for Suspicions {
        fn suspected(&self) {
            self.0.lock().push(Instant::now());
        }
    }

    impl Suspicions {
        /// Asserts one suspicion, `after` the last message (within the
        /// wheel's 10 ms of rounding), and never before.
        fn once_at(&self, last: Instant, after: Duration) {
            let suspected = self.0.lock().clone();
            assert_eq!(suspected.len(), 1, "{suspected:?}");
            let took = suspected[0] - last;
            assert!(
                took >= after && took <= after + Duration::from_millis(10),
                "suspected {took:?} after the last message, not {after:?}"
            );
        }
    }

    fn adaptive_call() -> (Arc<CallCore>, Arc<Suspicions>) {
        let policy = LivenessPolicy {
            timeout: Duration::from_millis(2000),
            suspect_after: Some(Duration::from_millis(900)),
            adaptive: Some(super::super::policy::AdaptiveSuspicion::new(
                8.0,
                Duration::from_millis(150),
            )),
            max_message_size: 1024,
            inbound_buffer: 1024,
            on_silence: Ending::status(4, "silent"),
            on_oversize: Ending::status(8, "too big"),
        };
        let core = CallCore::start(Arc::new(policy), TimerWheel::with_shards(1));
        let suspicions = Arc::new(Suspicions::default());
        let _ = core.observer.set(suspicions.clone());
        (core, suspicions)
    }

    /// Tests φ on a paused clock, message by message: gaps alternating 100
    /// and 110 ms give φ = log₁₀ 2 at the mean gap of silence and 2.8697
    /// three deviations later, the values of the paper's formula; and the
    /// call is suspected at the floor (150 ms of silence), where φ has long
    /// passed 8, not earlier.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn phi_of_a_steady_peer_and_the_floor() {
        let (core, suspicions) = adaptive_call();
        let handle = LivenessHandle { core: core.clone() };
        core.touch(1);
        // Past the 30 gaps the estimate needs, and past the fixed threshold
        // after them, so the wheel's entry has been re-armed by it.
        for gap in [100, 110].repeat(25) {
            tokio::time::advance(Duration::from_millis(gap)).await;
            core.touch(1);
        }
        let last = Instant::now();
        tokio::time::advance(Duration::from_millis(105)).await;
        let phi = handle.phi();
        assert!((phi - std::f64::consts::LOG10_2).abs() < 1e-3, "φ {phi}");
        tokio::time::advance(Duration::from_millis(15)).await;
        let phi = handle.phi();
        assert!((phi - 2.869_699).abs() < 1e-3, "φ {phi}");
        tokio::time::sleep(Duration::from_millis(400)).await;
        suspicions.once_at(last, Duration::from_millis(150));
    }

    /// Tests the ceiling on a paused clock: gaps swinging between 150 and
    /// 600 ms put φ = 8 over a second away, but the call is suspected at the
    /// fixed 900 ms.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_jittery_peer_is_suspected_by_the_fixed_threshold() {
        let (core, suspicions) = adaptive_call();
        core.touch(1);
        for gap in [150, 600].repeat(15) {
            tokio::time::advance(Duration::from_millis(gap)).await;
            core.touch(1);
        }
        // The rhythm is known (φ is computed); only the ceiling stops it.
        assert!(LivenessHandle { core: core.clone() }.phi() > 0.0);
        let last = Instant::now();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        suspicions.once_at(last, Duration::from_millis(900));
    }

    /// Tests the beat: a peer that sends two messages each round (a pong
    /// and, 10 ms later, its own ping, as the project's clients may) has one
    /// rhythm, the round's, so it is suspected at the floor (150 ms); its
    /// gaps of 10 and 90 ms, read as one rhythm, would put suspicion at
    /// 274 ms.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn two_messages_a_round_are_one_beat() {
        let (core, suspicions) = adaptive_call();
        core.touch(1);
        for _ in 0..45 {
            tokio::time::advance(Duration::from_millis(10)).await;
            core.touch(1);
            tokio::time::advance(Duration::from_millis(90)).await;
            core.touch(1);
        }
        let last = Instant::now();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        suspicions.once_at(last, Duration::from_millis(150));
    }
}
