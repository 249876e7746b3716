//! Instants kept as 8-byte nanosecond counts from a per-table origin.
//!
//! `std::time::Instant` is 16 bytes; the tables that track one entry per
//! client key store millions of timestamps, so they keep `u64` offsets
//! instead (584 years of range). The origin is the first instant a table
//! is shown, which keeps the crate free of a clock of its own. Instants
//! earlier than the origin (a caller that read the time before taking a
//! lock another caller held) count as the origin itself: a few microseconds
//! of error, never a panic.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Origin(Option<Instant>);

impl Origin {
    /// Ticks of `now`, fixing the origin on first use.
    pub(crate) fn ticks(&mut self, now: Instant) -> u64 {
        let origin = *self.0.get_or_insert(now);
        since(origin, now)
    }

    /// Ticks of `now` without fixing the origin; `None` before first use
    /// (the table is then empty anyway).
    pub(crate) fn peek(&self, now: Instant) -> Option<u64> {
        self.0.map(|origin| since(origin, now))
    }

    /// The instant a tick count stands for.
    pub(crate) fn instant(&self, ticks: u64) -> Option<Instant> {
        self.0
            .and_then(|origin| origin.checked_add(Duration::from_nanos(ticks)))
    }
}

fn since(origin: Instant, now: Instant) -> u64 {
    nanos(now.saturating_duration_since(origin))
}

/// A duration in ticks, saturating at the 584-year range.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
