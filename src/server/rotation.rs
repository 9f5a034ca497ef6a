//! Rotation's pace: sessions that come of age together still leave one by
//! one.
//!
//! A fleet's sessions often open together (a deploy, a restart), so they
//! reach the maximum age together too. Asking them all to move at once would
//! send the whole fleet reconnecting in the same second, the herd rotation is
//! meant to avoid. Each session that comes of age reserves the next free slot
//! on one shared schedule, `1 / max_rotations_per_second` apart, and is asked
//! to rotate at its slot: at most that many rotations start in any second,
//! evenly spread, with no retries and no contention beyond one short lock.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// The shared schedule of rotation slots.
pub(crate) struct RotationPace {
    spacing: Duration,
    /// The first slot not yet reserved.
    next: Mutex<Option<Instant>>,
}

impl RotationPace {
    pub(crate) fn new(per_second: u32) -> Self {
        Self {
            spacing: Duration::from_secs(1) / per_second.max(1),
            next: Mutex::new(None),
        }
    }

    /// Reserves the first free slot at or after `now`: when this session is
    /// to be asked to rotate.
    pub(crate) fn reserve(&self, now: Instant) -> Instant {
        let mut next = self.next.lock();
        let slot = next.map_or(now, |next| next.max(now));
        *next = Some(slot + self.spacing);
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that a thousand sessions coming of age at once get slots 10 ms
    /// apart at 100 per second (no second holds more than 100), and that a
    /// session coming of age later, after the queue drained, goes at once.
    #[test]
    fn slots_are_spaced_and_never_bunch() {
        let pace = RotationPace::new(100);
        let start = Instant::now();
        let slots: Vec<Instant> = (0..1000).map(|_| pace.reserve(start)).collect();
        assert_eq!(slots[0], start);
        assert!(slots
            .windows(2)
            .all(|pair| pair[1] - pair[0] == Duration::from_millis(10)));
        for second in 0..10 {
            let from = start + Duration::from_secs(second);
            let within = slots
                .iter()
                .filter(|slot| **slot >= from && **slot < from + Duration::from_secs(1))
                .count();
            assert!(within <= 100, "{within} rotations in second {second}");
        }
        let later = start + Duration::from_secs(60);
        assert_eq!(pace.reserve(later), later);
    }
}
