//! Durations between `std` and protobuf's well-known `Duration`.

use std::time::Duration;

/// A `std` duration as a protobuf `Duration`; saturates at the protobuf maximum.
pub fn duration_to_proto(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        // Sub-second nanoseconds are below 1e9 and always fit an i32.
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf `Duration` as a `std` one; `None` if it is negative or malformed.
pub fn proto_to_duration(duration: &prost_types::Duration) -> Option<Duration> {
    let seconds = u64::try_from(duration.seconds).ok()?;
    let nanos = u32::try_from(duration.nanos).ok()?;
    (nanos < 1_000_000_000).then(|| Duration::new(seconds, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that durations survive the round trip and negatives are refused.
    #[test]
    fn durations_round_trip() {
        let duration = Duration::from_millis(10_250);
        assert_eq!(
            proto_to_duration(&duration_to_proto(duration)),
            Some(duration)
        );
        let negative = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(proto_to_duration(&negative), None);
    }
}
