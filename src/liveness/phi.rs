//! φ-accrual suspicion (Hayashibara et al., 2004) over one call's recent
//! inter-arrival times.
//!
//! A fixed threshold treats every peer alike: set it low and jittery peers
//! (a phone on a bad network, a process with GC pauses) are suspected for
//! their usual jitter; set it high and a steady peer that stops is noticed
//! late. φ-accrual asks instead how surprising the current silence is given
//! this peer's own rhythm: φ(t) = −log₁₀ P(gap > t), with the gaps modelled as
//! a normal distribution of the recent window's mean and standard deviation,
//! as Akka and Cassandra do for cluster members. φ = 8 means a silence this
//! long would come once in 10⁸ gaps.
//!
//! The threshold is fixed per server, so its quantile z (the number of
//! standard deviations at which φ reaches it) is computed once; a call's
//! suspicion time is then `mean + z × std`, with no search per check. The
//! window is a ring of 100 gaps with running sums, allocated when the call
//! starts: a message costs a subtraction and an addition, never an
//! allocation.

use std::time::Duration;

/// Gaps kept per call.
const WINDOW: usize = 100;
/// Gaps needed before the estimate means anything; before, the fixed
/// threshold applies. A deviation from a handful of gaps is too often
/// small by chance, which would suspect a jittery client early (measured:
/// with 4, adaptive mode suspected a jittery population 10 % more often
/// than fixed mode did).
const MIN_SAMPLES: usize = 30;
/// The smallest standard deviation used, as a fraction of the mean: a peer
/// whose gaps were identical so far would otherwise be suspected the moment
/// one came a microsecond late.
const MIN_STD_FRACTION: f64 = 0.01;

/// The recent gaps between one call's arrivals, in microseconds.
pub(crate) struct ArrivalWindow {
    gaps: [u32; WINDOW],
    /// Arrivals closer than this to the last recorded one are not recorded.
    beat_micros: u64,
    /// Where the next gap goes.
    next: usize,
    /// Gaps held, up to [`WINDOW`].
    len: usize,
    sum: u64,
    sum_of_squares: u128,
    /// The last arrival, in microseconds on the call's clock.
    last: Option<u64>,
}

/// A window's mean and standard deviation, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GapEstimate {
    mean: f64,
    std: f64,
}

impl ArrivalWindow {
    /// A window that records arrivals at least `beat` apart.
    pub(crate) fn new(beat: Duration) -> Self {
        Self {
            gaps: [0; WINDOW],
            beat_micros: u64::try_from(beat.as_micros()).unwrap_or(u64::MAX),
            next: 0,
            len: 0,
            sum: 0,
            sum_of_squares: 0,
            last: None,
        }
    }

    /// Records an arrival at `at` microseconds, unless it comes within a
    /// beat of the last one recorded.
    pub(crate) fn record(&mut self, at: u64) {
        match self.last {
            Some(last) if at.saturating_sub(last) < self.beat_micros => {}
            Some(last) => {
                let gap = u32::try_from(at.saturating_sub(last)).unwrap_or(u32::MAX);
                self.push(gap);
                self.last = Some(at);
            }
            None => self.last = Some(at),
        }
    }

    fn push(&mut self, gap: u32) {
        if self.len == WINDOW {
            let old = self.gaps[self.next];
            self.sum -= u64::from(old);
            self.sum_of_squares -= u128::from(old) * u128::from(old);
        } else {
            self.len += 1;
        }
        self.gaps[self.next] = gap;
        self.sum += u64::from(gap);
        self.sum_of_squares += u128::from(gap) * u128::from(gap);
        self.next = (self.next + 1) % WINDOW;
    }

    /// The estimate, once enough gaps are known.
    pub(crate) fn estimate(&self) -> Option<GapEstimate> {
        if self.len < MIN_SAMPLES {
            return None;
        }
        // Rounding only once the sums pass 2^53 (squares of gaps of ten
        // seconds and more): far below anything φ can tell apart.
        #[allow(clippy::cast_precision_loss)]
        let (len, sum, squares) = (self.len as f64, self.sum as f64, self.sum_of_squares as f64);
        let mean = sum / len;
        let variance = (squares / len - mean * mean).max(0.0);
        Some(GapEstimate {
            mean,
            std: variance.sqrt().max(mean * MIN_STD_FRACTION).max(1.0),
        })
    }
}

impl GapEstimate {
    /// φ after `silence`.
    pub(crate) fn phi(&self, silence: Duration) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let silence = silence.as_micros() as f64;
        -log10_upper_tail((silence - self.mean) / self.std)
    }

    /// The silence at which φ reaches the threshold whose quantile is `z`
    /// (see [`quantile`]).
    pub(crate) fn reaches(&self, z: f64) -> Duration {
        let micros = (self.mean + z * self.std).max(0.0);
        Duration::from_secs_f64(micros / 1e6)
    }
}

/// The number of standard deviations above the mean at which φ reaches
/// `threshold`: the standard normal quantile of 1 − 10^−threshold.
pub(crate) fn quantile(threshold: f64) -> f64 {
    let (mut low, mut high) = (-10.0_f64, 40.0_f64);
    for _ in 0..200 {
        let middle = (low + high) / 2.0;
        if -log10_upper_tail(middle) < threshold {
            low = middle;
        } else {
            high = middle;
        }
    }
    low
}

/// log₁₀ P(X > y) for a standard normal X, accurate far into the tail (where
/// the probability itself would underflow).
fn log10_upper_tail(y: f64) -> f64 {
    // P(X > y) = erfc(y / √2) / 2.
    let x = y / std::f64::consts::SQRT_2;
    let ln_tail = if x >= 0.0 {
        ln_erfc_nonnegative(x) - std::f64::consts::LN_2
    } else {
        // erfc(x) = 2 − erfc(−x) for x < 0: no underflow there.
        ((2.0 - ln_erfc_nonnegative(-x).exp()) / 2.0).ln()
    };
    ln_tail / std::f64::consts::LN_10
}

/// ln erfc(x) for x ≥ 0, by the Chebyshev fit of Numerical Recipes (§6.2;
/// relative error under 1.2 × 10⁻⁷ everywhere), kept in logarithms.
fn ln_erfc_nonnegative(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * x);
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t.ln() - x * x + poly
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window_of(gaps_ms: &[u64]) -> ArrivalWindow {
        let mut window = ArrivalWindow::new(Duration::ZERO);
        let mut at = 0;
        window.record(at);
        for gap in gaps_ms {
            at += gap * 1000;
            window.record(at);
        }
        window
    }

    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= 1e-4 * expected.abs().max(1.0)
    }

    /// Tests φ for a steady peer (gaps alternating 100 and 110 ms: mean 105,
    /// standard deviation 5) against the paper's formula, −log₁₀ of the normal
    /// upper tail, evaluated exactly: at the mean φ is log₁₀ 2, three
    /// deviations later 2.8697, five later 6.5426.
    #[test]
    fn phi_of_a_steady_peer() {
        let estimate = window_of(&[100, 110].repeat(15))
            .estimate()
            .expect("enough gaps");
        assert!(
            close(estimate.mean, 105_000.0) && close(estimate.std, 5_000.0),
            "{estimate:?}"
        );
        for (silence_ms, expected) in [
            (105, std::f64::consts::LOG10_2),
            (120, 2.869_699_035_929_368_6),
            (130, 6.542_645_672_390_658),
        ] {
            let phi = estimate.phi(Duration::from_millis(silence_ms));
            assert!(
                close(phi, expected),
                "φ({silence_ms} ms) = {phi}, expected {expected}"
            );
        }
    }

    /// Tests φ for a jittery peer (gaps 80, 120, 100, 60, 140 ms: mean 100,
    /// standard deviation √800 ≈ 28.3) against the same formula: a silence
    /// that would make a steady peer's φ enormous is unremarkable here.
    #[test]
    fn phi_of_a_jittery_peer() {
        let estimate = window_of(&[80, 120, 100, 60, 140].repeat(6))
            .estimate()
            .expect("enough gaps");
        for (silence_ms, expected) in [
            (100, std::f64::consts::LOG10_2),
            (150, 1.413_976_340_065_921_3),
            (200, 3.691_486_789_847_462),
        ] {
            let phi = estimate.phi(Duration::from_millis(silence_ms));
            assert!(
                close(phi, expected),
                "φ({silence_ms} ms) = {phi}, expected {expected}"
            );
        }
    }

    /// Tests the quantile: φ = 8 at 5.6120 standard deviations, and the
    /// suspicion time that follows is where φ reaches 8.
    #[test]
    fn the_threshold_quantile() {
        let z = quantile(8.0);
        assert!(close(z, 5.612_001_244_174_788), "{z}");
        let estimate = window_of(&[80, 120, 100, 60, 140].repeat(6))
            .estimate()
            .expect("enough gaps");
        let at = estimate.reaches(z);
        assert!(
            close(estimate.phi(at), 8.0),
            "φ at {at:?} = {}",
            estimate.phi(at)
        );
    }

    /// Tests the window: it slides (old gaps leave the sums), needs a few
    /// gaps first, and floors the deviation of identical gaps.
    #[test]
    fn the_window_slides_and_floors() {
        assert_eq!(window_of(&[100; MIN_SAMPLES - 1]).estimate(), None);
        let mut gaps = vec![1000; WINDOW];
        gaps.extend(std::iter::repeat_n(100, WINDOW));
        let estimate = window_of(&gaps).estimate().expect("full");
        assert!(close(estimate.mean, 100_000.0), "{estimate:?}");
        assert!(
            close(estimate.std, 1_000.0),
            "1 % of the mean: {estimate:?}"
        );
    }
}
