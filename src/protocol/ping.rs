//! Ping numbering, pong matching and round-trip smoothing.
//!
//! Both ends ping, so both number their pings from 1, remember the few still
//! unanswered, and turn a matching pong into a round-trip sample. Writing this
//! once keeps the two ends in agreement about what "answers an outstanding ping"
//! means, which the server's rate limit depends on.

use std::time::Duration;

use tokio::time::Instant;

/// How many unanswered pings are remembered; older ones are forgotten, so a
/// very late pong counts as unsolicited.
const OUTSTANDING: usize = 4;

/// Numbers outgoing pings and matches pongs to them.
#[derive(Debug, Clone, Default)]
pub struct PingLedger {
    /// The last sequence number sent; 0 before the first ping.
    last_seq: u64,
    /// Unanswered pings as (seq, sent at); seq 0 marks a free place.
    outstanding: [(u64, Option<Instant>); OUTSTANDING],
}

/// What a pong turned out to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PongMatch {
    /// It answers an outstanding ping sent this long ago.
    Answered(Duration),
    /// It answers no outstanding ping (never sent, already answered, or too old).
    Unsolicited,
}

impl PingLedger {
    /// Numbers a ping sent at `now` and remembers it; returns its `seq`.
    pub fn next_ping(&mut self, now: Instant) -> u64 {
        self.last_seq += 1;
        let slot = (self.last_seq % OUTSTANDING as u64) as usize;
        self.outstanding[slot] = (self.last_seq, Some(now));
        self.last_seq
    }

    /// Matches a pong for `seq` arriving at `now`.
    pub fn pong(&mut self, seq: u64, now: Instant) -> PongMatch {
        if seq == 0 {
            return PongMatch::Unsolicited;
        }
        let slot = (seq % OUTSTANDING as u64) as usize;
        match self.outstanding[slot] {
            (sent_seq, Some(sent_at)) if sent_seq == seq => {
                self.outstanding[slot] = (0, None);
                PongMatch::Answered(now.saturating_duration_since(sent_at))
            }
            _ => PongMatch::Unsolicited,
        }
    }
}

/// Smoothed round-trip time as TCP keeps it (RFC 6298): SRTT with gain 1/8 and
/// RTTVAR with gain 1/4.
#[derive(Debug, Clone, Copy, Default)]
pub struct RttEstimator {
    /// The latest sample.
    last: Option<Duration>,
    /// The smoothed round-trip time.
    srtt: Option<Duration>,
    /// The smoothed mean deviation.
    rttvar: Duration,
}

impl RttEstimator {
    /// Folds in one sample.
    pub fn sample(&mut self, rtt: Duration) {
        self.last = Some(rtt);
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let deviation = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + deviation) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    /// The latest sample, if any.
    pub fn last(&self) -> Option<Duration> {
        self.last
    }

    /// The smoothed round-trip time, if any sample arrived.
    pub fn smoothed(&self) -> Option<Duration> {
        self.srtt
    }

    /// The smoothed deviation (zero before the first sample).
    pub fn variance(&self) -> Duration {
        self.rttvar
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that pings are numbered from 1 and each pong matches once.
    #[test]
    fn numbers_from_one_and_matches_once() {
        let start = Instant::now();
        let mut ledger = PingLedger::default();
        assert_eq!(ledger.next_ping(start), 1);
        assert_eq!(ledger.next_ping(start), 2);
        let later = start + Duration::from_millis(5);
        assert_eq!(
            ledger.pong(2, later),
            PongMatch::Answered(Duration::from_millis(5))
        );
        assert_eq!(ledger.pong(2, later), PongMatch::Unsolicited);
        assert_eq!(
            ledger.pong(1, later),
            PongMatch::Answered(Duration::from_millis(5))
        );
        assert_eq!(ledger.pong(3, later), PongMatch::Unsolicited);
        assert_eq!(ledger.pong(0, later), PongMatch::Unsolicited);
    }

    /// Tests that a pong for a ping too old to remember is unsolicited.
    #[test]
    fn forgets_old_pings() {
        let now = Instant::now();
        let mut ledger = PingLedger::default();
        for _ in 0..=OUTSTANDING {
            ledger.next_ping(now);
        }
        assert_eq!(ledger.pong(1, now), PongMatch::Unsolicited);
        assert!(matches!(ledger.pong(2, now), PongMatch::Answered(_)));
    }

    /// Tests that smoothing follows RFC 6298 with gain 1/8.
    #[test]
    fn smooths_like_tcp() {
        let mut rtt = RttEstimator::default();
        assert_eq!(rtt.smoothed(), None);
        rtt.sample(Duration::from_millis(80));
        assert_eq!(rtt.smoothed(), Some(Duration::from_millis(80)));
        assert_eq!(rtt.variance(), Duration::from_millis(40));
        rtt.sample(Duration::from_millis(160));
        assert_eq!(rtt.smoothed(), Some(Duration::from_millis(90)));
        assert_eq!(rtt.variance(), Duration::from_millis(50));
        assert_eq!(rtt.last(), Some(Duration::from_millis(160)));
    }
}
