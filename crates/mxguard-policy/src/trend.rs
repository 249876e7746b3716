//! Volume trends per sender: a moving baseline of each sender's messages
//! per interval, and a limit at a multiple of it.
//!
//! A hijacked account or a compromised web form shows as a sender that
//! suddenly sends many times its usual volume. Each sender (an address or a
//! domain, as the caller chooses) has a baseline: the exponentially
//! weighted moving average (EWMA) of its count per interval, weight `alpha`
//! on the newest interval. Once `min_intervals` intervals have passed
//! since its first message, a sender is limited at `multiple` times its
//! baseline per interval (never under `floor`); before that it is learning
//! and unlimited here (the fixed per-sender rates hold it).
//!
//! Only accepted messages count: a sender held at its limit does not
//! teach the baseline its flood. It can still ramp up patiently (each
//! interval at the limit raises the baseline by `alpha * (multiple - 1)`),
//! which is the nature of a trend limit: it catches jumps, not slopes.
//!
//! Intervals with no message count as zero, so a sender's baseline fades
//! while it is away; once it has faded under `NEGLIGIBLE_BASELINE` the
//! sender is forgotten (and learns again if it comes back). Past
//! `max_senders`, the senders that would be forgotten soonest go first.
//! An entry is the name (a `Box<str>`, at most `MAX_SENDER_LEN` bytes on
//! the heap) and 24 bytes of state: 40 bytes a slot plus a control byte,
//! plus the name's own allocation.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::anchor::TimeAnchor;
use crate::bounded::{self, EvictionStats, Hasher};
use crate::ticks::{nanos, Origin};
use crate::Error;

/// A baseline below this (messages per interval) is no history at all.
pub const NEGLIGIBLE_BASELINE: f64 = 0.1;

/// Longer sender names are cut to this many bytes: an RFC 5321 path is at
/// most 256 octets, so only abuse is cut, and an attacker's made-up names
/// cannot make entries large.
pub const MAX_SENDER_LEN: usize = 320;

/// How trends are kept and judged.
#[derive(Debug, Clone, PartialEq)]
pub struct TrendConfig {
    /// The length of one counting interval (e.g. an hour).
    pub interval: Duration,
    /// The EWMA weight of the newest interval, in (0, 1].
    pub alpha: f64,
    /// The limit as a multiple of the baseline, at least 1.
    pub multiple: f64,
    /// Completed intervals before a sender is judged at all.
    pub min_intervals: u32,
    /// The limit is never below this many messages per interval, so a
    /// sender with a tiny baseline is not stopped at its second message.
    pub floor: u32,
    /// The most senders tracked.
    pub max_senders: usize,
}

impl TrendConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if self.interval.is_zero() {
            return Err(Error::invalid("trend interval", "must be longer than zero"));
        }
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return Err(Error::invalid(
                "trend alpha",
                format!("{} is not in (0, 1]", self.alpha),
            ));
        }
        if !(self.multiple.is_finite() && self.multiple >= 1.0) {
            return Err(Error::invalid(
                "trend multiple",
                format!("{} is not a finite number of at least 1", self.multiple),
            ));
        }
        if self.floor == 0 {
            return Err(Error::invalid(
                "trend floor",
                "a floor of 0 would refuse every sender",
            ));
        }
        Ok(())
    }
}

/// What a sender's trend says about one more message.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrendDecision {
    /// Not enough history to judge: `intervals` completed so far.
    Learning { intervals: u32 },
    /// Counted: `count` this interval, of at most `limit`.
    Within { count: u32, limit: u32 },
    /// Over the limit; not counted.
    Limited {
        count: u32,
        limit: u32,
        baseline: f64,
    },
}

impl TrendDecision {
    pub fn is_limited(&self) -> bool {
        matches!(self, Self::Limited { .. })
    }
}

#[derive(Debug, Clone, Copy)]
struct SenderTrend {
    /// Start of the current interval.
    started: u64,
    /// Messages accepted in the current interval.
    count: u32,
    /// Completed intervals since the first message.
    intervals: u32,
    baseline: f32,
}

/// Baselines and current counts per sender.
#[derive(Debug, Clone)]
pub struct TrendTracker {
    config: TrendConfig,
    interval: u64,
    senders: HashMap<Box<str>, SenderTrend, Hasher>,
    origin: Origin,
    stats: EvictionStats,
}

impl TrendTracker {
    pub fn new(config: TrendConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            interval: nanos(config.interval),
            config,
            senders: HashMap::default(),
            origin: Origin::default(),
            stats: EvictionStats::default(),
        })
    }

    pub fn config(&self) -> &TrendConfig {
        &self.config
    }

    /// One more message from `sender` at `now`: judged, and counted unless
    /// limited.
    pub fn observe(&mut self, sender: &str, now: Instant) -> TrendDecision {
        let sender = clip(sender);
        let now = self.origin.ticks(now);
        if !self.senders.contains_key(sender) {
            self.make_room(now);
            self.senders.insert(
                sender.into(),
                SenderTrend {
                    started: now,
                    count: 0,
                    intervals: 0,
                    baseline: 0.0,
                },
            );
        }
        let (config, interval) = (&self.config, self.interval);
        let Some(trend) = self.senders.get_mut(sender) else {
            return TrendDecision::Learning { intervals: 0 };
        };
        roll(trend, now, interval, config.alpha);
        if trend.intervals < config.min_intervals {
            trend.count = trend.count.saturating_add(1);
            return TrendDecision::Learning {
                intervals: trend.intervals,
            };
        }
        let limit = limit(config, trend.baseline);
        if trend.count >= limit {
            return TrendDecision::Limited {
                count: trend.count,
                limit,
                baseline: f64::from(trend.baseline),
            };
        }
        trend.count += 1;
        TrendDecision::Within {
            count: trend.count,
            limit,
        }
    }

    /// `sender`'s baseline at `now` (messages per interval), if tracked.
    pub fn baseline(&self, sender: &str, now: Instant) -> Option<f64> {
        let mut trend = *self.senders.get(clip(sender))?;
        let now = self.origin.peek(now)?;
        roll(&mut trend, now, self.interval, self.config.alpha);
        Some(f64::from(trend.baseline))
    }

    fn make_room(&mut self, now: u64) {
        let (interval, alpha) = (self.interval, self.config.alpha);
        let max = self.config.max_senders.max(1);
        let evicted = bounded::make_room(&mut self.senders, max, now, |t| {
            forgotten_at(t, interval, alpha)
        });
        self.stats.count(evicted);
    }

    /// Forgets the senders whose baseline has faded at `now`.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let Some(now) = self.origin.peek(now) else {
            return 0;
        };
        let (interval, alpha) = (self.interval, self.config.alpha);
        let gone = bounded::sweep(&mut self.senders, now, |t| forgotten_at(t, interval, alpha));
        self.stats.evicted_idle += gone as u64;
        gone
    }

    pub fn len(&self) -> usize {
        self.senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    pub fn stats(&self) -> EvictionStats {
        self.stats
    }

    /// Heap bytes of the table and the names it holds.
    pub fn memory_bytes(&self) -> usize {
        bounded::table_bytes(
            self.senders.capacity(),
            std::mem::size_of::<(Box<str>, SenderTrend)>(),
        ) + self.senders.keys().map(|k| k.len()).sum::<usize>()
    }

    /// Every sender's trend, for persistence.
    pub fn to_records(&self, anchor: &TimeAnchor) -> Vec<TrendRecord> {
        self.senders
            .iter()
            .filter_map(|(sender, t)| {
                let started = self.origin.instant(t.started)?;
                Some(TrendRecord {
                    sender: sender.to_string(),
                    baseline: t.baseline,
                    intervals: t.intervals,
                    count: t.count,
                    started_unix_ms: anchor.to_unix_ms(started),
                })
            })
            .collect()
    }

    /// Loads persisted trends, replacing any the tracker holds for the same
    /// senders. The time the daemon was down is not counted as empty
    /// intervals (nobody watched them): an interval still running at the
    /// save goes on if it is not over yet, otherwise it is closed with what
    /// it had counted and a new one starts now.
    pub fn restore(&mut self, records: impl IntoIterator<Item = TrendRecord>, anchor: &TimeAnchor) {
        let interval = self.config.interval;
        for r in records {
            if !(r.baseline.is_finite() && r.baseline >= 0.0) {
                continue;
            }
            let age = anchor.age_of(r.started_unix_ms);
            let mut trend = SenderTrend {
                started: 0,
                count: r.count,
                intervals: r.intervals,
                baseline: r.baseline,
            };
            let started = if age < interval {
                anchor.instant.checked_sub(age).unwrap_or(anchor.instant)
            } else {
                close_interval(&mut trend, self.config.alpha);
                trend.intervals = trend.intervals.saturating_add(1);
                trend.count = 0;
                anchor.instant
            };
            trend.started = self.origin.ticks(started);
            let sender = clip(&r.sender);
            if !self.senders.contains_key(sender) {
                self.make_room(trend.started);
            }
            self.senders.insert(sender.into(), trend);
        }
    }
}

/// A sender's trend as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrendRecord {
    pub sender: String,
    pub baseline: f32,
    pub intervals: u32,
    pub count: u32,
    pub started_unix_ms: u64,
}

fn clip(sender: &str) -> &str {
    if sender.len() <= MAX_SENDER_LEN {
        return sender;
    }
    let mut end = MAX_SENDER_LEN;
    while !sender.is_char_boundary(end) {
        end -= 1;
    }
    &sender[..end]
}

fn limit(config: &TrendConfig, baseline: f32) -> u32 {
    // `as` saturates; the limit is a whole number of messages.
    let scaled = (config.multiple * f64::from(baseline)).floor() as u32;
    scaled.max(config.floor)
}

/// Folds the current interval's count into the baseline.
fn close_interval(t: &mut SenderTrend, alpha: f64) {
    let count = f64::from(t.count);
    t.baseline = if t.intervals == 0 {
        // The first interval is the whole history so far.
        count as f32
    } else {
        ((1.0 - alpha) * f64::from(t.baseline) + alpha * count) as f32
    };
}

/// Brings `t` up to the interval that holds `now`.
fn roll(t: &mut SenderTrend, now: u64, interval: u64, alpha: f64) {
    let elapsed = now.saturating_sub(t.started);
    if elapsed < interval {
        return;
    }
    let passed = elapsed / interval;
    close_interval(t, alpha);
    // The intervals after it had no message: each a zero.
    let empty = passed - 1;
    if empty > 0 {
        let exponent = i32::try_from(empty).unwrap_or(i32::MAX);
        t.baseline = (f64::from(t.baseline) * (1.0 - alpha).powi(exponent)) as f32;
    }
    t.intervals = t
        .intervals
        .saturating_add(u32::try_from(passed).unwrap_or(u32::MAX));
    t.started = t.started.saturating_add(passed.saturating_mul(interval));
    t.count = 0;
}

/// The tick at which `t`, left alone, fades under `NEGLIGIBLE_BASELINE`.
fn forgotten_at(t: &SenderTrend, interval: u64, alpha: f64) -> u64 {
    // What the baseline will be once the current interval closes.
    let level = f64::from(t.baseline).max(f64::from(t.count));
    let end_of_interval = t.started.saturating_add(interval);
    if level <= NEGLIGIBLE_BASELINE {
        return end_of_interval;
    }
    if alpha >= 1.0 {
        // The next empty interval zeroes it.
        return end_of_interval.saturating_add(interval);
    }
    let intervals = ((NEGLIGIBLE_BASELINE / level).ln() / (1.0 - alpha).ln()).ceil();
    // `as` saturates a float beyond u64's range.
    end_of_interval.saturating_add((intervals * interval as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn config() -> TrendConfig {
        TrendConfig {
            interval: HOUR,
            alpha: 0.5,
            multiple: 3.0,
            min_intervals: 3,
            floor: 5,
            max_senders: 1000,
        }
    }

    /// `n` messages from `sender` spread over the hour that starts `hour`
    /// hours after `t0`; the decisions.
    fn send(
        tr: &mut TrendTracker,
        sender: &str,
        t0: Instant,
        hour: u32,
        n: u32,
    ) -> Vec<TrendDecision> {
        (0..n)
            .map(|i| {
                let at = t0 + HOUR * hour + Duration::from_secs(u64::from(i));
                tr.observe(sender, at)
            })
            .collect()
    }

    #[test]
    fn quiet_without_history_however_much_is_sent() {
        let t0 = Instant::now();
        let mut tr = TrendTracker::new(config()).unwrap();
        let first = send(&mut tr, "news@example.org", t0, 0, 1000);
        assert!(first
            .iter()
            .all(|d| matches!(d, TrendDecision::Learning { intervals: 0 })));
        let third = send(&mut tr, "news@example.org", t0, 2, 10);
        assert_eq!(third[0], TrendDecision::Learning { intervals: 2 });
    }

    #[test]
    fn limits_at_the_multiple_of_the_baseline_once_history_exists() {
        let t0 = Instant::now();
        let mut tr = TrendTracker::new(config()).unwrap();
        for hour in 0..3 {
            send(&mut tr, "example.org", t0, hour, 10);
        }
        // Three hours of 10: baseline 10, limit 30 in hour four.
        let now = t0 + HOUR * 3;
        assert_eq!(tr.baseline("example.org", now), Some(10.0));
        let hour4 = send(&mut tr, "example.org", t0, 3, 31);
        assert_eq!(
            hour4[0],
            TrendDecision::Within {
                count: 1,
                limit: 30
            }
        );
        assert_eq!(
            hour4[29],
            TrendDecision::Within {
                count: 30,
                limit: 30
            }
        );
        assert_eq!(
            hour4[30],
            TrendDecision::Limited {
                count: 30,
                limit: 30,
                baseline: 10.0
            }
        );
        // The refused message was not counted: hour four closes at 30,
        // baseline 0.5 * 10 + 0.5 * 30 = 20, limit 60.
        assert_eq!(tr.baseline("example.org", t0 + HOUR * 4), Some(20.0));
        let hour5 = send(&mut tr, "example.org", t0, 4, 61);
        assert!(!hour5[59].is_limited());
        assert!(hour5[60].is_limited());
    }

    #[test]
    fn a_tiny_baseline_is_held_at_the_floor_and_absence_fades_it() {
        let t0 = Instant::now();
        let mut tr = TrendTracker::new(config()).unwrap();
        for hour in 0..3 {
            send(&mut tr, "rare@example.net", t0, hour, 1);
        }
        let d = send(&mut tr, "rare@example.net", t0, 3, 6);
        assert_eq!(d[4], TrendDecision::Within { count: 5, limit: 5 });
        assert!(d[5].is_limited());
        // The fourth hour closes at 5: baseline 0.5 * 1 + 0.5 * 5 = 3; then
        // three empty hours halve it thrice.
        let later = t0 + HOUR * 7;
        assert_eq!(tr.baseline("rare@example.net", later), Some(0.375));
        // Quiet long enough, it is forgotten and would learn again.
        assert_eq!(tr.sweep(t0 + HOUR * 9), 0);
        assert_eq!(tr.sweep(t0 + HOUR * 20), 1);
        assert!(tr.is_empty());
    }

    #[test]
    fn a_flood_of_senders_stays_within_the_cap_and_keeps_the_busy_one() {
        let t0 = Instant::now();
        let mut cfg = config();
        cfg.max_senders = 64;
        let mut tr = TrendTracker::new(cfg).unwrap();
        for hour in 0..3 {
            send(&mut tr, "busy.example", t0, hour, 100);
        }
        let now = t0 + HOUR * 3;
        for i in 0..5000 {
            let _ = tr.observe(&format!("spam{i}@example.com"), now);
            assert!(tr.len() <= 64);
        }
        assert_eq!(tr.baseline("busy.example", now), Some(100.0));
        assert!(tr.stats().evicted_live > 0);
        // Over-long names are cut, so they cannot make entries large.
        let long = "x".repeat(10_000);
        let _ = tr.observe(&long, now);
        assert!(tr.memory_bytes() < 64 * 2 * 41 + 64 * MAX_SENDER_LEN);
    }

    #[test]
    fn trends_survive_a_restart() {
        let t0 = Instant::now();
        let mut tr = TrendTracker::new(config()).unwrap();
        for hour in 0..3 {
            send(&mut tr, "example.org", t0, hour, 10);
        }
        send(&mut tr, "example.org", t0, 3, 4);
        // Saved half an hour into hour four.
        let saved = TimeAnchor::new(t0 + HOUR * 3 + HOUR / 2, Duration::from_secs(1_700_000_000));
        let records = tr.to_records(&saved);
        let json = serde_json::to_string(&records).unwrap();
        assert_eq!(
            json,
            r#"[{"sender":"example.org","baseline":10.0,"intervals":3,"count":4,"started_unix_ms":1699998200000}]"#
        );
        let back: Vec<TrendRecord> = serde_json::from_str(&json).unwrap();
        // Back ten minutes later: hour four goes on, 26 more fit.
        let t1 = Instant::now();
        let loaded = TimeAnchor::new(t1, Duration::from_secs(1_700_000_600));
        let mut fresh = TrendTracker::new(config()).unwrap();
        fresh.restore(back.clone(), &loaded);
        for _ in 0..26 {
            assert!(!fresh.observe("example.org", t1).is_limited());
        }
        assert!(fresh.observe("example.org", t1).is_limited());
        // Back a day later: hour four is closed with its 4, and no empty
        // hours are counted for the downtime: 0.5 * 10 + 0.5 * 4 = 7.
        let next_day = TimeAnchor::new(t1, Duration::from_secs(1_700_086_400));
        let mut fresh = TrendTracker::new(config()).unwrap();
        fresh.restore(back, &next_day);
        assert_eq!(fresh.baseline("example.org", t1), Some(7.0));
        assert_eq!(
            fresh.observe("example.org", t1),
            TrendDecision::Within {
                count: 1,
                limit: 21
            }
        );
    }

    #[test]
    fn nonsense_settings_are_refused() {
        let bad = [
            TrendConfig {
                interval: Duration::ZERO,
                ..config()
            },
            TrendConfig {
                alpha: 0.0,
                ..config()
            },
            TrendConfig {
                alpha: 1.5,
                ..config()
            },
            TrendConfig {
                multiple: 0.5,
                ..config()
            },
            TrendConfig {
                multiple: f64::INFINITY,
                ..config()
            },
            TrendConfig {
                floor: 0,
                ..config()
            },
        ];
        for c in bad {
            assert!(TrendTracker::new(c.clone()).is_err(), "{c:?}");
        }
    }
}
