//! Reconnect delays: exponential, capped, with full jitter.
//!
//! Full jitter (a uniform draw between zero and the exponential ceiling) spreads
//! a fleet of clients that lost the same server over the whole window, so the
//! server is not hit by all of them at once when it returns.

use std::time::Duration;

use rand::Rng;

use crate::error::InvalidBackoff;

/// How long to wait between reconnect attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    reset_after: Duration,
}

impl Default for Backoff {
    /// 200 ms base, 15 s cap, reset after 30 s of stable session.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(15),
            reset_after: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// Delays drawn from `[0, min(cap, base × 2^(attempt-1))]`; a session that
    /// stayed live for `reset_after` starts the count again.
    pub fn try_new(
        base: Duration,
        cap: Duration,
        reset_after: Duration,
    ) -> Result<Self, InvalidBackoff> {
        if base.is_zero() {
            return Err(InvalidBackoff("base must be greater than zero"));
        }
        if cap < base {
            return Err(InvalidBackoff("cap must not be less than base"));
        }
        Ok(Self {
            base,
            cap,
            reset_after,
        })
    }

    /// The smallest ceiling, also the jitter added to a server's reconnect hint.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The largest delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// How long a session must stay live for the attempt count to reset.
    pub fn reset_after(&self) -> Duration {
        self.reset_after
    }

    /// The ceiling of attempt `attempt` (1-based): `min(cap, base × 2^(attempt-1))`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.base
            .checked_mul(1 << doublings)
            .map_or(self.cap, |ceiling| ceiling.min(self.cap))
    }

    /// A delay for attempt `attempt`, drawn uniformly from `[0, ceiling]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        jitter(self.ceiling(attempt), rng)
    }
}

/// A uniform draw from `[0, up_to]`.
pub(crate) fn jitter(up_to: Duration, rng: &mut impl Rng) -> Duration {
    let nanos = u64::try_from(up_to.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    /// Tests that ceilings double from the base up to the cap.
    #[test]
    fn ceilings_double_up_to_the_cap() {
        let backoff = Backoff::try_new(
            Duration::from_millis(100),
            Duration::from_millis(700),
            Duration::from_secs(1),
        )
        .expect("valid");
        let ceilings: Vec<u128> = (1..=6).map(|a| backoff.ceiling(a).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 700, 700, 700]);
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_millis(700));
    }

    /// Tests that delays stay under their ceiling and are spread, not fixed.
    #[test]
    fn delays_are_jittered_under_the_ceiling() {
        let backoff = Backoff::default();
        let mut rng = StdRng::seed_from_u64(7);
        let delays: Vec<Duration> = (0..50).map(|_| backoff.delay(3, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= backoff.ceiling(3)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 40, "delays should be spread: {delays:?}");
    }

    /// Tests that impossible settings are refused with the reason.
    #[test]
    fn refuses_bad_settings() {
        let second = Duration::from_secs(1);
        assert_eq!(
            Backoff::try_new(Duration::ZERO, second, second),
            Err(InvalidBackoff("base must be greater than zero"))
        );
        assert_eq!(
            Backoff::try_new(second * 2, second, second),
            Err(InvalidBackoff("cap must not be less than base"))
        );
    }
}
