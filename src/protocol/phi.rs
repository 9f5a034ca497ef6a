//! φ, the suspicion level of adaptive suspicion, as a value that compares.

use std::fmt;

/// A φ-accrual value (Hayashibara et al., 2004): −log₁₀ of the probability
/// that a client this regular would fall silent this long. `Session.phi` on
/// the wire, and the server's threshold for suspicion.
///
/// A newtype over `f64` so that the types holding it stay `Eq`: two values
/// are equal when their bits are, which for the finite values the server
/// produces is plain equality.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phi(pub f64);

impl PartialEq for Phi {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Phi {}

impl fmt::Display for Phi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2}", self.0)
    }
}
