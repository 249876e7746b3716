//! Addresses refused at once, each for a while.
//!
//! A client caught talking early is refused on its next connections without
//! the upstream being touched, like postscreen's cache of failed tests. The
//! list is bounded: under a flood of distinct addresses the entries that
//! expire soonest make room, so memory stays flat.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Why and until when an address is listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry {
    pub since: Instant,
    pub until: Instant,
    /// The test that listed it, e.g. `pregreet`.
    pub reason: &'static str,
}

/// Listed addresses with an expiry each.
#[derive(Debug)]
pub struct Blocklist {
    entries: HashMap<IpAddr, BlockEntry>,
    max_entries: usize,
}

impl Blocklist {
    /// An empty list that holds at most `max_entries` addresses.
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max_entries: max_entries.max(1),
        }
    }

    /// Lists `addr` from `now` for `ttl`; a later expiry wins over an
    /// earlier one. A zero `ttl` lists nothing.
    pub fn insert(&mut self, addr: IpAddr, now: Instant, ttl: Duration, reason: &'static str) {
        if ttl.is_zero() {
            return;
        }
        let until = now + ttl;
        if let Some(entry) = self.entries.get_mut(&addr) {
            if entry.until < until {
                entry.until = until;
                entry.reason = reason;
            }
            return;
        }
        if self.entries.len() >= self.max_entries {
            self.purge(now);
        }
        if self.entries.len() >= self.max_entries {
            self.evict_soonest();
        }
        self.entries.insert(
            addr,
            BlockEntry {
                since: now,
                until,
                reason,
            },
        );
    }

    /// The entry for `addr` if it is listed at `now`.
    pub fn lookup(&self, addr: IpAddr, now: Instant) -> Option<&BlockEntry> {
        self.entries.get(&addr).filter(|e| e.until > now)
    }

    /// Forgets expired entries; returns how many went.
    pub fn purge(&mut self, now: Instant) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.until > now);
        before - self.entries.len()
    }

    /// Forgets every address `forget` says yes to; returns them.
    pub fn remove_where(&mut self, mut forget: impl FnMut(IpAddr) -> bool) -> Vec<IpAddr> {
        let mut gone = Vec::new();
        self.entries.retain(|addr, _| {
            let keep = !forget(*addr);
            if !keep {
                gone.push(*addr);
            }
            keep
        });
        gone
    }

    /// Forgets `addr`; whether it was there (live or not).
    pub fn remove(&mut self, addr: IpAddr) -> bool {
        self.entries.remove(&addr).is_some()
    }

    /// The addresses listed at `now`, with the time each has left.
    pub fn live(&self, now: Instant) -> impl Iterator<Item = (IpAddr, Duration)> + '_ {
        self.entries
            .iter()
            .filter(move |(_, e)| e.until > now)
            .map(move |(addr, e)| (*addr, e.until - now))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn evict_soonest(&mut self) {
        let soonest = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.until)
            .map(|(addr, _)| *addr);
        if let Some(addr) = soonest {
            self.entries.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_are_forgotten_one_by_one_or_by_a_test() {
        let t0 = Instant::now();
        let mut list = Blocklist::new(10);
        let minute = Duration::from_secs(60);
        for a in ["192.0.2.1", "192.0.2.2", "198.51.100.1"] {
            list.insert(ip(a), t0, minute, "pass");
        }
        assert!(list.remove(ip("192.0.2.1")));
        assert!(!list.remove(ip("192.0.2.1")));
        let mut gone = list.remove_where(|a| a.to_string().starts_with("192.0.2."));
        gone.sort();
        assert_eq!(gone, vec![ip("192.0.2.2")]);
        let live: Vec<_> = list.live(t0 + Duration::from_secs(20)).collect();
        assert_eq!(live, vec![(ip("198.51.100.1"), Duration::from_secs(40))]);
        assert_eq!(list.live(t0 + minute).count(), 0);
    }

    #[test]
    fn a_listed_address_is_found_until_it_expires() {
        let t0 = Instant::now();
        let mut list = Blocklist::new(10);
        list.insert(ip("127.0.0.2"), t0, Duration::from_secs(60), "pregreet");
        let entry = list
            .lookup(ip("127.0.0.2"), t0 + Duration::from_secs(59))
            .unwrap();
        assert_eq!(entry.reason, "pregreet");
        assert!(list.lookup(ip("127.0.0.3"), t0).is_none());
        assert!(list
            .lookup(ip("127.0.0.2"), t0 + Duration::from_secs(60))
            .is_none());
        assert_eq!(list.purge(t0 + Duration::from_secs(61)), 1);
        assert!(list.is_empty());
    }

    #[test]
    fn relisting_extends_but_never_shortens() {
        let t0 = Instant::now();
        let mut list = Blocklist::new(10);
        list.insert(ip("::1"), t0, Duration::from_secs(60), "pregreet");
        list.insert(ip("::1"), t0, Duration::from_secs(10), "pregreet");
        assert!(list
            .lookup(ip("::1"), t0 + Duration::from_secs(30))
            .is_some());
        list.insert(ip("::1"), t0, Duration::from_secs(120), "pregreet");
        assert!(list
            .lookup(ip("::1"), t0 + Duration::from_secs(90))
            .is_some());
    }

    #[test]
    fn zero_ttl_lists_nothing() {
        let t0 = Instant::now();
        let mut list = Blocklist::new(10);
        list.insert(ip("127.0.0.2"), t0, Duration::ZERO, "pregreet");
        assert!(list.is_empty());
    }

    #[test]
    fn a_full_list_stays_bounded_and_drops_the_soonest_to_expire() {
        let t0 = Instant::now();
        let mut list = Blocklist::new(2);
        list.insert(ip("10.0.0.1"), t0, Duration::from_secs(10), "pregreet");
        list.insert(ip("10.0.0.2"), t0, Duration::from_secs(100), "pregreet");
        list.insert(ip("10.0.0.3"), t0, Duration::from_secs(50), "pregreet");
        assert_eq!(list.len(), 2);
        assert!(list.lookup(ip("10.0.0.1"), t0).is_none());
        assert!(list.lookup(ip("10.0.0.2"), t0).is_some());
        assert!(list.lookup(ip("10.0.0.3"), t0).is_some());
    }
}
