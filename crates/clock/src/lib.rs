//! The platform's one clock. Every crate reads wall-clock time here, in
//! the unit it keeps: milliseconds for records and events, seconds for
//! tokens and certificates, nanoseconds for the ledger's entries. A clock
//! set before 1970 reads as the epoch rather than failing.

#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Milliseconds since the Unix epoch.
#[inline]
pub fn now_ms() -> i64 {
    since_epoch(SystemTime::now()).as_millis() as i64
}

/// Whole seconds since the Unix epoch.
#[inline]
pub fn now_secs() -> u64 {
    since_epoch(SystemTime::now()).as_secs()
}

/// Nanoseconds since the Unix epoch (good until 2554).
#[inline]
pub fn now_ns() -> u64 {
    since_epoch(SystemTime::now()).as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_units_agree_and_time_moves_forward() {
        let (s, ms, ns) = (now_secs(), now_ms(), now_ns());
        // After 2020-01-01 and in step with one another.
        assert!(ms > 1_577_836_800_000, "{ms}");
        assert!((ms / 1000 - s as i64).abs() <= 1);
        assert!((ns / 1_000_000) as i64 >= ms);
        assert!(now_ms() >= ms);
        assert_eq!(
            since_epoch(UNIX_EPOCH - Duration::from_secs(5)),
            Duration::ZERO
        );
    }
}
