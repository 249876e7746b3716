//! Translating monotonic instants to wall-clock time and back, for state
//! that outlives the process.
//!
//! Expiries and decay run on `Instant`, which means nothing after a
//! restart (and after a reboot it restarts near zero). Persisted records
//! therefore carry Unix milliseconds, converted through one anchor: a pair
//! of readings the daemon takes together (`Instant::now()` and
//! `SystemTime::now()`). This crate still owns no clock.

use std::time::{Duration, Instant};

/// One moment seen on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeAnchor {
    pub instant: Instant,
    /// The same moment as time since the Unix epoch.
    pub unix: Duration,
}

impl TimeAnchor {
    pub fn new(instant: Instant, unix: Duration) -> Self {
        Self { instant, unix }
    }

    /// The anchor's own moment in Unix milliseconds.
    pub fn unix_ms(&self) -> u64 {
        millis(self.unix)
    }

    /// `at` in Unix milliseconds.
    pub fn to_unix_ms(&self, at: Instant) -> u64 {
        if at >= self.instant {
            millis(self.unix.saturating_add(at - self.instant))
        } else {
            millis(self.unix.saturating_sub(self.instant - at))
        }
    }

    /// The instant of a Unix time that lies at or after the anchor; `None`
    /// for a time already past (a persisted expiry that ran out while the
    /// daemon was down), which is also what an `Instant` cannot always
    /// represent (before boot).
    pub fn future_instant(&self, unix_ms: u64) -> Option<Instant> {
        let ahead = Duration::from_millis(unix_ms).checked_sub(self.unix)?;
        self.instant.checked_add(ahead)
    }

    /// How long ago `unix_ms` was, zero for a time in the future (a clock
    /// stepped back between save and load).
    pub fn age_of(&self, unix_ms: u64) -> Duration {
        self.unix.saturating_sub(Duration::from_millis(unix_ms))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_through_unix_milliseconds() {
        let t0 = Instant::now();
        let anchor = TimeAnchor::new(t0, Duration::from_secs(1_700_000_000));
        let later = t0 + Duration::from_millis(1500);
        let ms = anchor.to_unix_ms(later);
        assert_eq!(ms, 1_700_000_001_500);
        assert_eq!(anchor.future_instant(ms), Some(later));
        assert_eq!(
            anchor.to_unix_ms(t0.checked_sub(Duration::from_secs(2)).unwrap_or(t0)),
            if t0.checked_sub(Duration::from_secs(2)).is_some() {
                1_699_999_998_000
            } else {
                1_700_000_000_000
            }
        );
        assert_eq!(anchor.future_instant(1_699_999_999_000), None);
        assert_eq!(anchor.age_of(1_699_999_990_000), Duration::from_secs(10));
        assert_eq!(anchor.age_of(1_800_000_000_000), Duration::ZERO);
    }
}
