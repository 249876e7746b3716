//! A score per client that the tests add to and that fades with time.
//!
//! A client caught once (a pregreet, a limit crossed) is suspect for a
//! while, not forever: its score halves every `half_life`, so a later
//! test can weigh it (refuse sooner, tarpit longer) while an address
//! reassigned to an innocent by its ISP recovers by itself. Scores may be
//! negative (a client that passed tests) and fade towards zero the same
//! way.
//!
//! Memory is bounded like the buckets': a score under `NEGLIGIBLE` carries
//! no information and is dropped; past `max_tracked` keys, those that will
//! fade soonest go first. An entry is a `ClientKey`, an `f32` and a `u64`
//! tick: `size_of::<(ClientKey, Score)>()` = 40 bytes plus a control byte
//! per slot, 47 to 94 bytes per tracked key.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::anchor::TimeAnchor;
use crate::bounded::{self, EvictionStats, Hasher};
use crate::key::ClientKey;
use crate::ticks::{nanos, Origin};
use crate::Error;

/// A score this close to zero is zero, and its entry can go.
pub const NEGLIGIBLE: f64 = 0.01;

#[derive(Debug, Clone, Copy)]
struct Score {
    value: f32,
    /// When `value` was true.
    at: u64,
}

/// Decaying scores per client key.
#[derive(Debug, Clone)]
pub struct Reputation {
    half_life: u64,
    scores: HashMap<ClientKey, Score, Hasher>,
    max_tracked: usize,
    origin: Origin,
    stats: EvictionStats,
}

impl Reputation {
    /// Scores that halve every `half_life` (not zero), at most
    /// `max_tracked` keys.
    pub fn new(half_life: Duration, max_tracked: usize) -> Result<Self, Error> {
        let half_life = nanos(half_life);
        if half_life == 0 {
            return Err(Error::invalid(
                "reputation half-life",
                "must be longer than zero",
            ));
        }
        Ok(Self {
            half_life,
            scores: HashMap::default(),
            max_tracked: max_tracked.max(1),
            origin: Origin::default(),
            stats: EvictionStats::default(),
        })
    }

    pub fn half_life(&self) -> Duration {
        Duration::from_nanos(self.half_life)
    }

    fn decayed(&self, score: Score, now: u64) -> f64 {
        let age = now.saturating_sub(score.at) as f64;
        f64::from(score.value) * (-age / self.half_life as f64).exp2()
    }

    /// The tick at which `score` fades under `NEGLIGIBLE`.
    fn fades_at(half_life: u64, score: &Score) -> u64 {
        let magnitude = f64::from(score.value).abs();
        if magnitude <= NEGLIGIBLE {
            return score.at;
        }
        let half_lives = (magnitude / NEGLIGIBLE).log2();
        // `as` saturates a float beyond u64's range.
        score
            .at
            .saturating_add((half_lives * half_life as f64) as u64)
    }

    /// Adds `points` (negative to reward) to `key`'s score at `now` and
    /// returns the new score. A non-finite `points` adds nothing.
    pub fn add(&mut self, key: impl Into<ClientKey>, points: f64, now: Instant) -> f64 {
        let key = key.into();
        let now = self.origin.ticks(now);
        let current = self.scores.get(&key).map_or(0.0, |s| self.decayed(*s, now));
        if !points.is_finite() {
            return current;
        }
        let value = current + points;
        if value.abs() <= NEGLIGIBLE {
            self.scores.remove(&key);
            return value;
        }
        let score = Score {
            // f32 keeps the entry small; seven digits are plenty for a
            // score.
            value: value as f32,
            at: now,
        };
        if let Some(slot) = self.scores.get_mut(&key) {
            *slot = score;
        } else {
            self.make_room(now);
            self.scores.insert(key, score);
        }
        value
    }

    fn make_room(&mut self, now: u64) {
        let half_life = self.half_life;
        let evicted = bounded::make_room(&mut self.scores, self.max_tracked, now, |s| {
            Self::fades_at(half_life, s)
        });
        self.stats.count(evicted);
    }

    /// `key`'s score at `now` (0 for a client never scored).
    pub fn score(&self, key: impl Into<ClientKey>, now: Instant) -> f64 {
        let (Some(now), Some(score)) = (self.origin.peek(now), self.scores.get(&key.into())) else {
            return 0.0;
        };
        self.decayed(*score, now)
    }

    /// Forgets `key`'s score (an admin's pardon); whether it had one.
    pub fn forget(&mut self, key: impl Into<ClientKey>) -> bool {
        self.scores.remove(&key.into()).is_some()
    }

    /// Drops the scores faded to nothing at `now`; returns how many went.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let Some(now) = self.origin.peek(now) else {
            return 0;
        };
        let half_life = self.half_life;
        let gone = bounded::sweep(&mut self.scores, now, |s| Self::fades_at(half_life, s));
        self.stats.evicted_idle += gone as u64;
        gone
    }

    pub fn len(&self) -> usize {
        self.scores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    pub fn stats(&self) -> EvictionStats {
        self.stats
    }

    pub fn memory_bytes(&self) -> usize {
        bounded::table_bytes(
            self.scores.capacity(),
            std::mem::size_of::<(ClientKey, Score)>(),
        )
    }

    /// Every score, as of the anchor's moment, for persistence.
    pub fn to_records(&self, anchor: &TimeAnchor) -> Vec<ReputationRecord> {
        let Some(now) = self.origin.peek(anchor.instant) else {
            return Vec::new();
        };
        let at_unix_ms = anchor.unix_ms();
        self.scores
            .iter()
            .filter_map(|(key, s)| {
                let score = self.decayed(*s, now);
                (score.abs() > NEGLIGIBLE).then_some(ReputationRecord {
                    key: *key,
                    score,
                    at_unix_ms,
                })
            })
            .collect()
    }

    /// Adds persisted scores, faded by the time since they were saved
    /// (downtime included: a client's past fades whether or not we watch).
    pub fn restore(
        &mut self,
        records: impl IntoIterator<Item = ReputationRecord>,
        anchor: &TimeAnchor,
    ) {
        let half_life = self.half_life as f64;
        for r in records {
            let age = nanos(anchor.age_of(r.at_unix_ms)) as f64;
            let points = r.score * (-age / half_life).exp2();
            if points.abs() > NEGLIGIBLE {
                self.add(r.key, points, anchor.instant);
            }
        }
    }
}

/// A score as persisted: its value at a wall-clock moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReputationRecord {
    pub key: ClientKey,
    pub score: f64,
    pub at_unix_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-4
    }

    #[test]
    fn a_score_halves_every_half_life() {
        let t0 = Instant::now();
        let mut rep = Reputation::new(secs(60), 100).unwrap();
        assert_eq!(rep.add(ip("192.0.2.1"), 8.0, t0), 8.0);
        assert!(close(rep.score(ip("192.0.2.1"), t0 + secs(60)), 4.0));
        assert!(close(rep.score(ip("192.0.2.1"), t0 + secs(120)), 2.0));
        assert!(close(
            rep.score(ip("192.0.2.1"), t0 + secs(30)),
            8.0 / 2f64.sqrt()
        ));
        // Points add to what is left.
        assert!(close(rep.add(ip("192.0.2.1"), 1.0, t0 + secs(120)), 3.0));
        assert!(close(rep.score(ip("192.0.2.1"), t0 + secs(180)), 1.5));
        assert_eq!(rep.score(ip("192.0.2.2"), t0), 0.0);
    }

    #[test]
    fn mapped_and_plain_ipv4_share_a_score() {
        let t0 = Instant::now();
        let mut rep = Reputation::new(secs(60), 100).unwrap();
        rep.add(ip("::ffff:192.0.2.1"), 5.0, t0);
        assert_eq!(rep.score(ip("192.0.2.1"), t0), 5.0);
    }

    #[test]
    fn faded_scores_are_swept_and_negligible_ones_never_stored() {
        let t0 = Instant::now();
        let mut rep = Reputation::new(secs(60), 100).unwrap();
        rep.add(ip("192.0.2.1"), 0.005, t0);
        assert!(rep.is_empty());
        rep.add(ip("192.0.2.2"), 1.0, t0);
        rep.add(ip("192.0.2.3"), -100.0, t0);
        // 1.0 fades under 0.01 after log2(100) = 6.64 half-lives; 100 after 13.3.
        assert_eq!(rep.sweep(t0 + secs(60 * 6)), 0);
        assert_eq!(rep.sweep(t0 + secs(60 * 7)), 1);
        assert!(rep.score(ip("192.0.2.3"), t0 + secs(60 * 7)) < 0.0);
        assert_eq!(rep.sweep(t0 + secs(60 * 14)), 1);
        assert!(rep.is_empty());
        // Cancelling a score out removes it.
        rep.add(ip("192.0.2.4"), 2.0, t0);
        rep.add(ip("192.0.2.4"), -2.0, t0);
        assert!(rep.is_empty());
        assert!(!rep.forget(ip("192.0.2.4")));
    }

    #[test]
    fn a_flood_keeps_the_table_bounded_and_the_strongest_scores() {
        let t0 = Instant::now();
        let mut rep = Reputation::new(secs(600), 64).unwrap();
        rep.add(ip("198.51.100.1"), 1000.0, t0);
        for i in 0..10_000u32 {
            rep.add(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), 1.0, t0);
            assert!(rep.len() <= 64);
        }
        assert_eq!(rep.score(ip("198.51.100.1"), t0), 1000.0);
        assert!(rep.stats().evicted_live > 9_000);
        assert_eq!(std::mem::size_of::<(ClientKey, Score)>(), 40);
    }

    #[test]
    fn scores_survive_a_restart_and_fade_over_the_downtime() {
        let t0 = Instant::now();
        let mut rep = Reputation::new(secs(3600), 100).unwrap();
        rep.add(ip("192.0.2.1"), 8.0, t0);
        rep.add(ip("2001:db8::1"), 2.0, t0);
        let saved_at = TimeAnchor::new(t0 + secs(3600), secs(1_700_000_000));
        let records = rep.to_records(&saved_at);
        assert_eq!(records.len(), 2);
        let json = serde_json::to_string(&records).unwrap();
        assert!(
            json.contains(r#"{"key":"192.0.2.1","score":4.0,"at_unix_ms":1700000000000}"#),
            "{json}"
        );
        let back: Vec<ReputationRecord> = serde_json::from_str(&json).unwrap();
        // Back up an hour later, on a fresh monotonic clock.
        let t1 = Instant::now();
        let loaded_at = TimeAnchor::new(t1, secs(1_700_003_600));
        let mut fresh = Reputation::new(secs(3600), 100).unwrap();
        fresh.restore(back, &loaded_at);
        assert!(close(fresh.score(ip("192.0.2.1"), t1), 2.0));
        assert!(close(fresh.score(ip("192.0.2.1"), t1 + secs(3600)), 1.0));
    }

    #[test]
    fn a_zero_half_life_is_refused() {
        assert!(Reputation::new(Duration::ZERO, 10).is_err());
    }
}
