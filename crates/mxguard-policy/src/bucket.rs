//! Token buckets and connection counters per client key, in bounded
//! memory.
//!
//! # Buckets
//!
//! A bucket holds up to `burst` tokens and gains `rate` tokens a second;
//! each connection takes one. It is kept in GCRA form (the "theoretical
//! arrival time" of ATM's generic cell rate algorithm): one timestamp per
//! key, the moment the bucket will be full again. That is the same rule as
//! a counter of tokens, in 8 bytes, with integer arithmetic (no drift from
//! float refills), and it makes "full" a comparison: a bucket whose
//! timestamp is not in the future is full, carries no information and is
//! not stored at all. In any window of length `t` a key is allowed at
//! most `burst + floor(t / interval)` times.
//!
//! A refused attempt takes no token: a client hammering at a closed door
//! gets through at exactly the rate, and a count of accepted connections
//! matches the bucket (what the end-to-end tests check).
//!
//! # Memory
//!
//! Each tracked key costs one hash-map slot: the key and the timestamp,
//! `size_of::<(ClientKey, u64)>()` = 32 bytes, plus one control byte, in a
//! table that is between 7/16 and 7/8 full (hashbrown keeps a power of two
//! of slots). That is 33 bytes per slot and 37.7 to 75.4 bytes per tracked
//! key: measured 43.3 at 100,000 keys and 69.2 at 1,000,000 (`cargo test
//! -p mxguard-policy memory_per_tracked_key -- --nocapture`, and the
//! `admission` bench). A table capped at `max_keys` never has more than
//! `max_keys * 8 / 7` slots rounded up to a power of two: 66 MiB for a cap
//! of 1,000,000, half that for a cap of 917,504 (7/8 of 2^20), which is
//! the better choice of cap.
//!
//! Full buckets are not stored, so the table holds only the clients seen
//! within the last `burst / rate` seconds; past `max_keys` an eighth of the
//! table is freed at once, full buckets first, then those closest to full
//! (see `bounded`). Losing a live bucket refills it early, so a flood of
//! distinct addresses buys its members a fresh burst: the prefix buckets
//! are what holds such a flood, and `EvictionStats::evicted_live` says
//! when the cap is too small.
//!
//! # Concurrent connections
//!
//! A count per key of connections open, with a cap. Keys at zero are
//! removed, so the table holds no more keys than connections are open.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bounded::{self, EvictionStats, Hasher};
use crate::key::ClientKey;
use crate::ticks::{nanos, Origin};
use crate::Error;

/// A rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "QuotaConfig", into = "QuotaConfig")]
pub struct Quota {
    /// Nanoseconds to earn one token.
    interval: u64,
    burst: u32,
}

/// How a quota is written in configuration: `{ rate = 2.0, burst = 10 }`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaConfig {
    /// Tokens a second; below 1 for one token every few seconds.
    rate: f64,
    burst: u32,
}

impl TryFrom<QuotaConfig> for Quota {
    type Error = Error;

    fn try_from(c: QuotaConfig) -> Result<Self, Error> {
        Quota::per_second(c.rate, c.burst)
    }
}

impl From<Quota> for QuotaConfig {
    fn from(q: Quota) -> Self {
        QuotaConfig {
            rate: q.rate_per_second(),
            burst: q.burst,
        }
    }
}

impl Quota {
    /// `rate` tokens a second (positive, at most 10^9), `burst` at once
    /// (at least 1).
    pub fn per_second(rate: f64, burst: u32) -> Result<Self, Error> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(Error::invalid(
                "rate",
                format!("{rate} is not a positive number of tokens a second"),
            ));
        }
        let interval = (1e9 / rate).round();
        if interval < 1.0 {
            return Err(Error::invalid(
                "rate",
                format!("{rate} a second is too fast to count"),
            ));
        }
        // A float above u64::MAX saturates in `as`; an interval of 584 years
        // is as good as never.
        Self::with_interval(interval as u64, burst)
    }

    /// One token every `interval`, `burst` at once: exact for rates that
    /// are not a whole number a second.
    pub fn per_interval(interval: Duration, burst: u32) -> Result<Self, Error> {
        Self::with_interval(nanos(interval), burst)
    }

    fn with_interval(interval: u64, burst: u32) -> Result<Self, Error> {
        if interval == 0 {
            return Err(Error::invalid(
                "rate",
                "the interval between tokens is zero",
            ));
        }
        if burst == 0 {
            return Err(Error::invalid(
                "burst",
                "a burst of 0 would refuse every client",
            ));
        }
        Ok(Self { interval, burst })
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval)
    }

    pub fn rate_per_second(&self) -> f64 {
        1e9 / self.interval as f64
    }

    /// How far ahead of `now` a bucket's full-again time may run: a whole
    /// burst's worth of intervals.
    fn tolerance(&self) -> u64 {
        self.interval.saturating_mul(u64::from(self.burst))
    }

    /// The new full-again time if one more token may be taken at `now`
    /// from a bucket full again at `tat`, or how long until it may.
    fn take(&self, tat: u64, now: u64) -> Result<u64, Duration> {
        let new_tat = tat.max(now).saturating_add(self.interval);
        let ahead = new_tat - now;
        let tolerance = self.tolerance();
        if ahead <= tolerance {
            Ok(new_tat)
        } else {
            Err(Duration::from_nanos(ahead - tolerance))
        }
    }
}

/// Whether a client may have one more token.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Refused; a token will be there after `retry_after`.
    Limited {
        retry_after: Duration,
    },
}

impl Decision {
    pub fn is_allowed(self) -> bool {
        matches!(self, Self::Allowed)
    }
}

/// One token bucket per key, all with the same quota.
#[derive(Debug, Clone)]
pub struct TokenBuckets<K = ClientKey> {
    quota: Quota,
    /// Full-again time per key; absent means full.
    tats: HashMap<K, u64, Hasher>,
    max_keys: usize,
    origin: Origin,
    stats: EvictionStats,
}

impl<K: Eq + Hash> TokenBuckets<K> {
    /// Buckets of `quota`, at most `max_keys` of them tracked (at least 1).
    pub fn new(quota: Quota, max_keys: usize) -> Self {
        Self {
            quota,
            tats: HashMap::default(),
            max_keys: max_keys.max(1),
            origin: Origin::default(),
            stats: EvictionStats::default(),
        }
    }

    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Applies a new quota (a configuration reload) keeping what each key
    /// has used: a client drained under the old quota waits at most the
    /// old burst's worth before the new one applies, rather than getting a
    /// fresh burst from every reload.
    pub fn set_quota(&mut self, quota: Quota) {
        self.quota = quota;
    }

    /// Takes a token from `key`'s bucket at `now` if there is one.
    pub fn check<Q>(&mut self, key: &Q, now: Instant) -> Decision
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned + ?Sized,
        Q::Owned: Into<K>,
    {
        let now = self.origin.ticks(now);
        let tat = self.tats.get(key).copied().unwrap_or(now);
        match self.quota.take(tat, now) {
            Err(retry_after) => Decision::Limited { retry_after },
            Ok(new_tat) => {
                if let Some(slot) = self.tats.get_mut(key) {
                    *slot = new_tat;
                } else {
                    let evicted = bounded::make_room(&mut self.tats, self.max_keys, now, |t| *t);
                    self.stats.count(evicted);
                    self.tats.insert(key.to_owned().into(), new_tat);
                }
                Decision::Allowed
            }
        }
    }

    /// What `check` would answer, without taking the token.
    pub fn peek<Q>(&self, key: &Q, now: Instant) -> Decision
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(now) = self.origin.peek(now) else {
            return Decision::Allowed;
        };
        let tat = self.tats.get(key).copied().unwrap_or(now);
        match self.quota.take(tat, now) {
            Ok(_) => Decision::Allowed,
            Err(retry_after) => Decision::Limited { retry_after },
        }
    }

    /// Tokens left in `key`'s bucket at `now`.
    pub fn tokens<Q>(&self, key: &Q, now: Instant) -> u32
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (Some(now), Some(tat)) = (self.origin.peek(now), self.tats.get(key)) else {
            return self.quota.burst;
        };
        let ahead = tat.saturating_sub(now);
        // Whole tokens: those not still owed to the future.
        let owed = ahead.div_ceil(self.quota.interval);
        u32::try_from(u64::from(self.quota.burst).saturating_sub(owed)).unwrap_or(0)
    }

    /// Forgets the buckets that are full at `now`; returns how many went.
    /// The daemon calls this now and then so memory shrinks after a burst
    /// of traffic even when no new key comes to trigger it.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let Some(now) = self.origin.peek(now) else {
            return 0;
        };
        let gone = bounded::sweep(&mut self.tats, now, |t| *t);
        self.stats.evicted_idle += gone as u64;
        gone
    }

    /// Keys tracked (buckets not full when last seen).
    pub fn len(&self) -> usize {
        self.tats.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tats.is_empty()
    }

    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    pub fn stats(&self) -> EvictionStats {
        self.stats
    }

    /// Heap bytes of the table (keys' own heap not included).
    pub fn memory_bytes(&self) -> usize {
        bounded::table_bytes(self.tats.capacity(), std::mem::size_of::<(K, u64)>())
    }
}

/// A connection counted against its key's cap; give it back with
/// `ConnectionCounts::release` when the connection ends. It is neither
/// `Clone` nor `Copy`, so it cannot be released twice.
#[must_use = "a permit that is never released holds its key's count up forever"]
#[derive(Debug, PartialEq, Eq)]
pub struct ConnectionPermit<K = ClientKey> {
    key: K,
    /// False when the connection was let in without being counted (no
    /// cap configured, or the table at its cap of keys).
    tracked: bool,
}

impl<K> ConnectionPermit<K> {
    pub fn key(&self) -> &K {
        &self.key
    }

    pub fn is_tracked(&self) -> bool {
        self.tracked
    }

    /// A permit for a connection nobody counts.
    pub fn untracked(key: K) -> Self {
        Self {
            key,
            tracked: false,
        }
    }
}

/// Connections open per key, each key capped.
#[derive(Debug, Clone)]
pub struct ConnectionCounts<K = ClientKey> {
    counts: HashMap<K, u32, Hasher>,
    cap: u32,
    max_keys: usize,
    untracked: u64,
}

impl<K: Eq + Hash + Clone> ConnectionCounts<K> {
    /// At most `cap` open connections per key (0 refuses every one), at
    /// most `max_keys` keys counted. A key at zero takes no room, so the
    /// table never holds more keys than connections are open; `max_keys`
    /// only matters if it is below the daemon's own connection limit, and
    /// then keys beyond it are let in uncounted (counted in
    /// `untracked_admissions`) rather than refused: an attacker holding
    /// many connections must not shut out everyone else.
    pub fn new(cap: u32, max_keys: usize) -> Self {
        Self {
            counts: HashMap::default(),
            cap,
            max_keys: max_keys.max(1),
            untracked: 0,
        }
    }

    pub fn cap(&self) -> u32 {
        self.cap
    }

    /// A new cap for new connections (a reload); open ones stay counted.
    pub fn set_cap(&mut self, cap: u32) {
        self.cap = cap;
    }

    /// Whether `acquire` would let one more connection of `key` in.
    pub fn has_room<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.count(key) < self.cap
    }

    /// Counts one more open connection of `key`, or `None` at its cap.
    pub fn acquire(&mut self, key: K) -> Option<ConnectionPermit<K>> {
        if let Some(n) = self.counts.get_mut(&key) {
            if *n >= self.cap {
                return None;
            }
            *n += 1;
            return Some(ConnectionPermit { key, tracked: true });
        }
        if self.cap == 0 {
            return None;
        }
        if self.counts.len() >= self.max_keys {
            self.untracked += 1;
            return Some(ConnectionPermit::untracked(key));
        }
        self.counts.insert(key.clone(), 1);
        Some(ConnectionPermit { key, tracked: true })
    }

    /// The connection of `permit` has ended.
    pub fn release(&mut self, permit: ConnectionPermit<K>) {
        if !permit.tracked {
            return;
        }
        if let Some(n) = self.counts.get_mut(&permit.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.counts.remove(&permit.key);
            }
        }
    }

    /// Connections of `key` open now.
    pub fn count<Q>(&self, key: &Q) -> u32
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.counts.get(key).copied().unwrap_or(0)
    }

    /// Keys with at least one connection open.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Connections let in uncounted because the table was at `max_keys`.
    pub fn untracked_admissions(&self) -> u64 {
        self.untracked
    }

    pub fn memory_bytes(&self) -> usize {
        bounded::table_bytes(self.counts.capacity(), std::mem::size_of::<(K, u32)>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::IpAddr;

    fn key(s: &str) -> ClientKey {
        ClientKey::address(s.parse::<IpAddr>().unwrap())
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    #[test]
    fn a_burst_is_allowed_whole_and_the_next_one_is_limited() {
        let t0 = Instant::now();
        let mut buckets: TokenBuckets = TokenBuckets::new(Quota::per_second(1.0, 5).unwrap(), 100);
        let client = key("192.0.2.1");
        for i in 0..5 {
            assert_eq!(
                buckets.check(&client, t0),
                Decision::Allowed,
                "connection {i}"
            );
        }
        assert_eq!(buckets.tokens(&client, t0), 0);
        assert_eq!(
            buckets.check(&client, t0),
            Decision::Limited {
                retry_after: secs(1)
            }
        );
        // A refusal takes nothing: 400 ms later the wait is 600 ms.
        assert_eq!(
            buckets.check(&client, t0 + ms(400)),
            Decision::Limited {
                retry_after: ms(600)
            }
        );
        // Another client is untouched.
        assert_eq!(buckets.check(&key("192.0.2.2"), t0), Decision::Allowed);
    }

    #[test]
    fn tokens_come_back_at_the_rate_and_never_beyond_the_burst() {
        let t0 = Instant::now();
        let mut buckets: TokenBuckets = TokenBuckets::new(Quota::per_second(2.0, 3).unwrap(), 100);
        let client = key("2001:db8::1");
        for _ in 0..3 {
            assert!(buckets.check(&client, t0).is_allowed());
        }
        assert!(!buckets.check(&client, t0).is_allowed());
        // One token every 500 ms.
        assert!(!buckets.check(&client, t0 + ms(499)).is_allowed());
        assert!(buckets.check(&client, t0 + ms(500)).is_allowed());
        assert!(!buckets.check(&client, t0 + ms(500)).is_allowed());
        // Ten seconds of quiet refill only the burst.
        let later = t0 + secs(10);
        assert_eq!(buckets.tokens(&client, later), 3);
        for _ in 0..3 {
            assert!(buckets.check(&client, later).is_allowed());
        }
        assert!(!buckets.check(&client, later).is_allowed());
    }

    #[test]
    fn slow_rates_are_exact() {
        let t0 = Instant::now();
        let quota = Quota::per_interval(secs(3), 1).unwrap();
        let mut buckets: TokenBuckets = TokenBuckets::new(quota, 10);
        let c = key("192.0.2.9");
        assert!(buckets.check(&c, t0).is_allowed());
        assert!(!buckets.check(&c, t0 + ms(2999)).is_allowed());
        assert!(buckets.check(&c, t0 + secs(3)).is_allowed());
        assert_eq!(Quota::per_second(0.5, 1).unwrap().interval(), secs(2));
    }

    #[test]
    fn quotas_reject_nonsense_and_read_from_config() {
        assert!(Quota::per_second(0.0, 1).is_err());
        assert!(Quota::per_second(f64::NAN, 1).is_err());
        assert!(Quota::per_second(-1.0, 1).is_err());
        assert!(Quota::per_second(1.0, 0).is_err());
        assert!(Quota::per_interval(Duration::ZERO, 1).is_err());
        let q: Quota = serde_json::from_str(r#"{"rate": 4.0, "burst": 20}"#).unwrap();
        assert_eq!(q, Quota::per_second(4.0, 20).unwrap());
        assert_eq!(q.interval(), ms(250));
        assert!(serde_json::from_str::<Quota>(r#"{"rate": 0, "burst": 20}"#).is_err());
        assert!(serde_json::from_str::<Quota>(r#"{"rate": 1, "burst": 2, "x": 1}"#).is_err());
        assert_eq!(
            serde_json::to_string(&q).unwrap(),
            r#"{"rate":4.0,"burst":20}"#
        );
    }

    #[test]
    fn full_buckets_are_not_stored_and_sweep_drops_refilled_ones() {
        let t0 = Instant::now();
        let mut buckets: TokenBuckets = TokenBuckets::new(Quota::per_second(1.0, 2).unwrap(), 100);
        assert!(buckets.peek(&key("192.0.2.1"), t0).is_allowed());
        assert!(buckets.is_empty(), "peek stores nothing");
        assert!(buckets.check(&key("192.0.2.1"), t0).is_allowed());
        assert!(buckets.check(&key("192.0.2.2"), t0 + ms(500)).is_allowed());
        assert_eq!(buckets.len(), 2);
        // The first is full again at t0+1s, the second at t0+1.5s.
        assert_eq!(buckets.sweep(t0 + secs(1)), 1);
        assert_eq!(buckets.len(), 1);
        assert_eq!(buckets.sweep(t0 + ms(1500)), 1);
        assert!(buckets.is_empty());
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_within_the_cap() {
        let t0 = Instant::now();
        let mut buckets: TokenBuckets = TokenBuckets::new(Quota::per_second(1.0, 5).unwrap(), 64);
        for i in 0..10_000u32 {
            let k = ClientKey::address(IpAddr::from(i.to_be_bytes()));
            assert!(buckets.check(&k, t0).is_allowed());
            assert!(buckets.len() <= 64);
        }
        let stats = buckets.stats();
        assert!(stats.evicted_live > 9_000, "{stats:?}");
        let bytes = buckets.memory_bytes();
        assert!(bytes < 64 * 2 * 40, "{bytes} bytes for 64 keys");
    }

    #[test]
    fn making_room_drops_refilled_buckets_before_a_drained_one() {
        let t0 = Instant::now();
        let mut buckets: TokenBuckets = TokenBuckets::new(Quota::per_second(1.0, 2).unwrap(), 8);
        let hot = key("198.51.100.1");
        assert!(buckets.check(&hot, t0).is_allowed());
        assert!(buckets.check(&hot, t0).is_allowed());
        // Seven one-off clients: full again at t0 + 1 s.
        for i in 2..9u8 {
            assert!(buckets
                .check(&key(&format!("198.51.100.{i}")), t0)
                .is_allowed());
        }
        assert_eq!(buckets.len(), 8);
        // At 1.5 s the one-offs are full; the hot one is still owed 0.5 s.
        let t = t0 + ms(1500);
        assert!(buckets.check(&key("203.0.113.1"), t).is_allowed());
        assert_eq!(
            buckets.stats(),
            EvictionStats {
                evicted_idle: 7,
                evicted_live: 0
            }
        );
        // The hot bucket kept its state: one token, not two.
        assert!(buckets.check(&hot, t).is_allowed());
        assert!(!buckets.check(&hot, t).is_allowed());
    }

    #[test]
    fn string_keys_look_up_without_allocating() {
        let t0 = Instant::now();
        let mut senders: TokenBuckets<Box<str>> =
            TokenBuckets::new(Quota::per_second(1.0, 1).unwrap(), 10);
        assert!(senders.check("example.org", t0).is_allowed());
        assert!(!senders.check("example.org", t0).is_allowed());
        assert!(senders.check("example.net", t0).is_allowed());
    }

    #[test]
    fn the_concurrency_cap_holds_until_a_connection_ends() {
        let mut open = ConnectionCounts::new(2, 100);
        let c = key("192.0.2.1");
        let first = open.acquire(c).unwrap();
        let second = open.acquire(c).unwrap();
        assert!(open.acquire(c).is_none());
        assert!(!open.has_room(&c));
        assert!(open.acquire(key("192.0.2.2")).is_some());
        open.release(first);
        assert_eq!(open.count(&c), 1);
        let third = open.acquire(c).unwrap();
        assert!(open.acquire(c).is_none());
        open.release(second);
        open.release(third);
        assert_eq!(open.count(&c), 0);
        assert_eq!(open.len(), 1, "a key at zero takes no room");
    }

    #[test]
    fn keys_past_the_table_cap_are_let_in_uncounted() {
        let mut open = ConnectionCounts::new(1, 2);
        let a = open.acquire(key("192.0.2.1")).unwrap();
        let _b = open.acquire(key("192.0.2.2")).unwrap();
        let c = open.acquire(key("192.0.2.3")).unwrap();
        assert!(!c.is_tracked());
        assert_eq!(open.untracked_admissions(), 1);
        open.release(c);
        open.release(a);
        assert_eq!(open.len(), 1);
        assert!(ConnectionCounts::new(0, 2)
            .acquire(key("192.0.2.1"))
            .is_none());
    }

    /// The figure the module doc quotes: run with `--nocapture` to see it.
    #[test]
    fn memory_per_tracked_key_is_small() {
        let t0 = Instant::now();
        let n = 100_000u32;
        let mut buckets: TokenBuckets =
            TokenBuckets::new(Quota::per_second(1.0, 5).unwrap(), n as usize);
        for i in 0..n {
            let k = ClientKey::address(IpAddr::from((0x0a00_0000 + i).to_be_bytes()));
            assert!(buckets.check(&k, t0).is_allowed());
        }
        let entry = std::mem::size_of::<(ClientKey, u64)>();
        assert_eq!(entry, 32);
        let per_key = buckets.memory_bytes() as f64 / f64::from(n);
        println!(
            "token buckets: {entry} B per entry + 1 control byte; {per_key:.1} B per tracked key \
             at {n} keys (capacity {})",
            buckets.tats.capacity()
        );
        assert!(per_key <= 2.0 * 33.0 * 8.0 / 7.0 + 1.0);
    }

    proptest! {
        /// GCRA's promise: in any window of length t, at most
        /// burst + floor(t / interval) connections get through.
        #[test]
        fn never_more_than_burst_plus_rate_times_t(
            interval_ms in 1u64..1000,
            burst in 1u32..10,
            gaps in proptest::collection::vec(0u64..1500, 1..200),
        ) {
            let t0 = Instant::now();
            let mut buckets: TokenBuckets = TokenBuckets::new(Quota::per_interval(ms(interval_ms), burst).unwrap(), 10);
            let c = key("192.0.2.1");
            let mut t = 0u64;
            let mut allowed = Vec::new();
            for gap in gaps {
                t += gap;
                if buckets.check(&c, t0 + ms(t)).is_allowed() {
                    allowed.push(t);
                }
            }
            for i in 0..allowed.len() {
                for j in i..allowed.len() {
                    let window = allowed[j] - allowed[i];
                    let most = u64::from(burst) + window / interval_ms;
                    prop_assert!((j - i + 1) as u64 <= most,
                        "{} allowed in {} ms, at most {}", j - i + 1, window, most);
                }
            }
        }

        /// And it never refuses a client that keeps to the rate.
        #[test]
        fn a_client_within_the_rate_is_never_refused(
            interval_ms in 1u64..1000,
            burst in 1u32..10,
            slack in proptest::collection::vec(0u64..500, 1..100),
        ) {
            let t0 = Instant::now();
            let mut buckets: TokenBuckets = TokenBuckets::new(Quota::per_interval(ms(interval_ms), burst).unwrap(), 10);
            let c = key("2001:db8::1");
            let mut t = 0u64;
            for extra in slack {
                prop_assert!(buckets.check(&c, t0 + ms(t)).is_allowed());
                t += interval_ms + extra;
            }
        }
    }
}
