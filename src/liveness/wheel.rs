//! A sharded, hashed timer wheel for many coarse deadlines.
//!
//! # Why not a `Sleep` per call
//!
//! A tokio `Sleep` per session, reset on every frame, costs a timer-driver lock on
//! each reset and each registration; at 100k sessions that lock is the bottleneck.
//! Here a frame costs nothing on the timer: callers record *when* they last saw
//! activity in an atomic, and an entry in the wheel only asks, when it comes due,
//! "is it really time?" ([`WheelTarget::fire`]). If not, the target answers with
//! the new due time and the wheel re-arms it. So each session touches the wheel
//! about once per deadline period, not once per frame.
//!
//! Each shard is a ring of [`SLOTS`] one-millisecond slots; an entry farther out
//! than the ring is kept in its slot and skipped until its round comes. One tokio
//! task per shard drives it: it sleeps until the next occupied slot (so an idle
//! server does not tick) and fires everything due, outside the shard's lock.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, OnceLock, Weak,
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{sync::Notify, time::Instant};

/// Slots per shard ring: 4096 one-millisecond slots, about four seconds.
const SLOTS: u64 = 4096;

/// Something the wheel calls back when one of its entries comes due.
pub trait WheelTarget: Send + Sync {
    /// Called at or after the due time of an entry inserted with `token`.
    ///
    /// Returns when to be called again with the same token, or `None` to drop the
    /// entry. Called outside the wheel's locks, so it may insert new entries.
    fn fire(&self, token: u64, now: Instant) -> Option<Instant>;
}

/// A cloneable handle to a timer wheel shared by many calls.
///
/// Cheap to clone; the driver tasks start on the first insert (so a wheel can be
/// built outside a runtime) and stop when the last handle is dropped.
#[derive(Clone)]
pub struct TimerWheel {
    shared: Arc<WheelShared>,
}

/// The state all handles of one wheel share.
struct WheelShared {
    /// Tick 0; every due time is counted in milliseconds from here.
    base: Instant,
    /// The shards; inserts spread over them round-robin.
    shards: Box<[Arc<Shard>]>,
    /// The shard the next insert goes to.
    next_shard: AtomicUsize,
    /// Set once the driver tasks are spawned.
    started: OnceLock<()>,
}

/// One ring of slots and the signal that wakes its driver.
struct Shard {
    /// The ring, behind a std mutex: nothing awaits while holding it.
    ring: Mutex<Ring>,
    /// Wakes the driver when an insert lands before its planned wake-up, and when
    /// the wheel is dropped.
    wake: Notify,
}

/// The slots of one shard.
struct Ring {
    /// `SLOTS` vectors of entries; an entry due at tick `t` sits in `t % SLOTS`.
    slots: Vec<Vec<Entry>>,
    /// The last tick the driver has processed.
    processed: u64,
    /// The tick the driver plans to wake at; `u64::MAX` while it waits for work.
    planned: u64,
    /// How many entries the ring holds.
    len: usize,
}

/// One pending callback.
struct Entry {
    /// The tick at which it is due.
    tick: u64,
    /// Passed back to the target, so it can tell stale entries from current ones.
    token: u64,
    /// Weak, so an entry never keeps a finished call alive; it just fizzles.
    target: Weak<dyn WheelTarget>,
}

// === impl TimerWheel ===

impl TimerWheel {
    /// Creates a wheel with one shard per available CPU.
    pub fn new() -> Self {
        let shards = std::thread::available_parallelism().map_or(1, usize::from);
        Self::with_shards(shards)
    }

    /// Creates a wheel with `shards` shards (at least one).
    pub fn with_shards(shards: usize) -> Self {
        let shards = (0..shards.max(1))
            .map(|_| {
                Arc::new(Shard {
                    ring: Mutex::new(Ring {
                        slots: (0..SLOTS).map(|_| Vec::new()).collect(),
                        processed: 0,
                        planned: u64::MAX,
                        len: 0,
                    }),
                    wake: Notify::new(),
                })
            })
            .collect();
        Self {
            shared: Arc::new(WheelShared {
                base: Instant::now(),
                shards,
                next_shard: AtomicUsize::new(0),
                started: OnceLock::new(),
            }),
        }
    }

    /// Asks the wheel to call `target.fire(token, now)` at or after `at`.
    ///
    /// Must be called within a tokio runtime (the first call spawns the drivers).
    pub fn insert(&self, at: Instant, token: u64, target: Weak<dyn WheelTarget>) {
        self.start();
        let index =
            self.shared.next_shard.fetch_add(1, Ordering::Relaxed) % self.shared.shards.len();
        let shard = &self.shared.shards[index];
        let tick = tick_at(self.shared.base, at);
        let mut ring = shard.ring.lock();
        let tick = tick.max(ring.processed + 1);
        ring.push(Entry {
            tick,
            token,
            target,
        });
        if tick < ring.planned {
            ring.planned = tick;
            drop(ring);
            shard.wake.notify_one();
        }
    }

    /// The instant of tick 0, against which targets may count time compactly.
    pub(crate) fn base(&self) -> Instant {
        self.shared.base
    }

    fn start(&self) {
        self.shared.started.get_or_init(|| {
            for shard in self.shared.shards.iter() {
                tokio::spawn(drive(
                    self.shared.base,
                    shard.clone(),
                    Arc::downgrade(&self.shared),
                ));
            }
        });
    }
}

impl Default for TimerWheel {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for TimerWheel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerWheel")
            .field("shards", &self.shared.shards.len())
            .finish()
    }
}

/// The first tick at or after `at`, so nothing fires early.
fn tick_at(base: Instant, at: Instant) -> u64 {
    let since = at.saturating_duration_since(base);
    let whole = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
    if since > Duration::from_millis(whole) {
        whole.saturating_add(1)
    } else {
        whole
    }
}

// === impl WheelShared ===

impl Drop for WheelShared {
    fn drop(&mut self) {
        // The drivers hold only weak references; waking them lets them see that
        // the wheel is gone and return.
        for shard in self.shards.iter() {
            shard.wake.notify_one();
        }
    }
}

// === impl Ring ===

impl Ring {
    fn push(&mut self, entry: Entry) {
        let slot = (entry.tick % SLOTS) as usize;
        self.slots[slot].push(entry);
        self.len += 1;
    }

    /// Moves every entry due at or before `now_tick` into `due`.
    fn take_due(&mut self, now_tick: u64, due: &mut Vec<Entry>) {
        let from = self.processed + 1;
        // Past a whole turn, every slot has been visited once.
        let to = now_tick.min(self.processed + SLOTS);
        for tick in from..=to {
            let slot = &mut self.slots[(tick % SLOTS) as usize];
            if slot.is_empty() {
                continue;
            }
            let mut index = 0;
            while index < slot.len() {
                if slot[index].tick <= now_tick {
                    due.push(slot.swap_remove(index));
                    self.len -= 1;
                } else {
                    index += 1;
                }
            }
        }
        self.processed = self.processed.max(now_tick);
    }

    /// The tick of the first occupied slot after the processed one, if any. It
    /// may hold only later rounds; then the driver wakes early and finds nothing.
    fn next_occupied(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        (self.processed + 1..=self.processed + SLOTS)
            .find(|tick| !self.slots[(tick % SLOTS) as usize].is_empty())
    }
}

/// Drives one shard until the wheel is dropped. It holds the shard but only a
/// weak reference to the wheel, so dropping the last handle stops it.
async fn drive(base: Instant, current: Arc<Shard>, wheel: Weak<WheelShared>) {
    let mut due = Vec::new();
    let mut rearm = Vec::new();
    loop {
        if wheel.strong_count() == 0 {
            return;
        }
        let now = Instant::now();
        let now_tick =
            u64::try_from(now.saturating_duration_since(base).as_millis()).unwrap_or(u64::MAX);
        {
            let mut ring = current.ring.lock();
            ring.take_due(now_tick, &mut due);
        }
        for entry in due.drain(..) {
            let Some(target) = entry.target.upgrade() else {
                continue;
            };
            // A panicking callback must not stop every other deadline of the
            // shard; the panic hook has reported it, and its entry is dropped.
            let fired = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                target.fire(entry.token, now)
            }));
            if let Ok(Some(at)) = fired {
                rearm.push((at, entry.token, entry.target));
            }
        }
        let wake_at = {
            let mut ring = current.ring.lock();
            for (at, token, target) in rearm.drain(..) {
                let tick = tick_at(base, at).max(ring.processed + 1);
                ring.push(Entry {
                    tick,
                    token,
                    target,
                });
            }
            let next = ring.next_occupied();
            ring.planned = next.unwrap_or(u64::MAX);
            next
        };
        let notified = current.wake.notified();
        match wake_at {
            Some(tick) => {
                let at = base + Duration::from_millis(tick);
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records when it fired; re-arms itself `again` times, `period` apart.
    struct Recorder {
        fired: Mutex<Vec<(u64, Instant)>>,
        again: Mutex<u32>,
        period: Duration,
    }

    impl WheelTarget for Recorder {
        fn fire(&self, token: u64, now: Instant) -> Option<Instant> {
            self.fired.lock().push((token, now));
            let mut again = self.again.lock();
            if *again == 0 {
                return None;
            }
            *again -= 1;
            Some(now + self.period)
        }
    }

    fn recorder(again: u32, period: Duration) -> Arc<Recorder> {
        Arc::new(Recorder {
            fired: Mutex::new(Vec::new()),
            again: Mutex::new(again),
            period,
        })
    }

    fn weak(target: &Arc<Recorder>) -> Weak<dyn WheelTarget> {
        let target: Arc<dyn WheelTarget> = target.clone();
        Arc::downgrade(&target)
    }

    async fn wait_for_fires(target: &Recorder, count: usize) {
        tokio::time::timeout(Duration::from_secs(600), async {
            while target.fired.lock().len() < count {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("fired in time");
    }

    /// Tests that an entry fires no earlier than its due time and within a tick of it.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn fires_on_time_not_before() {
        let wheel = TimerWheel::with_shards(2);
        let target = recorder(0, Duration::ZERO);
        let start = Instant::now();
        let at = start + Duration::from_micros(30_500);
        wheel.insert(at, 7, weak(&target));
        wait_for_fires(&target, 1).await;
        let (token, when) = target.fired.lock()[0];
        assert_eq!(token, 7);
        assert!(when >= at, "fired {:?} early", at - when);
        assert!(
            when - at <= Duration::from_millis(2),
            "fired {:?} late",
            when - at
        );
    }

    /// Tests that entries beyond one turn of the ring wait for their round.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn far_entries_wait_for_their_round() {
        let wheel = TimerWheel::with_shards(1);
        let target = recorder(0, Duration::ZERO);
        let at = Instant::now() + Duration::from_millis(SLOTS * 3 + 17);
        wheel.insert(at, 1, weak(&target));
        wait_for_fires(&target, 1).await;
        let (_, when) = target.fired.lock()[0];
        assert!(when >= at && when - at <= Duration::from_millis(2));
    }

    /// Tests that a target re-arms by returning its next due time.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn rearms_until_told_to_stop() {
        let wheel = TimerWheel::with_shards(1);
        let target = recorder(3, Duration::from_millis(100));
        wheel.insert(
            Instant::now() + Duration::from_millis(100),
            0,
            weak(&target),
        );
        wait_for_fires(&target, 4).await;
        let fired = target.fired.lock().clone();
        for pair in fired.windows(2) {
            assert!(pair[1].1 - pair[0].1 >= Duration::from_millis(100));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(target.fired.lock().len(), 4);
    }

    /// Fires by panicking.
    struct Panicker;

    impl WheelTarget for Panicker {
        fn fire(&self, _token: u64, _now: Instant) -> Option<Instant> {
            panic!("a broken timer callback");
        }
    }

    /// Tests that a panicking callback does not stop the shard's other deadlines.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_panicking_target_does_not_stop_the_shard() {
        let wheel = TimerWheel::with_shards(1);
        let broken: Arc<dyn WheelTarget> = Arc::new(Panicker);
        wheel.insert(
            Instant::now() + Duration::from_millis(5),
            0,
            Arc::downgrade(&broken),
        );
        let healthy = recorder(0, Duration::ZERO);
        wheel.insert(
            Instant::now() + Duration::from_millis(10),
            0,
            weak(&healthy),
        );
        wait_for_fires(&healthy, 1).await;
    }

    /// Tests that an entry whose target is gone fizzles without firing.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn dropped_targets_fizzle() {
        let wheel = TimerWheel::with_shards(1);
        let gone = recorder(0, Duration::ZERO);
        wheel.insert(Instant::now() + Duration::from_millis(5), 0, weak(&gone));
        let gone_weak = Arc::downgrade(&gone);
        drop(gone);
        let kept = recorder(0, Duration::ZERO);
        wheel.insert(Instant::now() + Duration::from_millis(10), 0, weak(&kept));
        wait_for_fires(&kept, 1).await;
        assert!(gone_weak.upgrade().is_none());
    }
}
