//! Admission by rate and concurrency: one decision per new connection
//! over the client's address and prefix buckets and its open connections.
//!
//! All or nothing: a connection takes a token from every bucket only if
//! every bucket has one and the address is under its connection cap. A
//! client refused by its /24 bucket therefore keeps its own tokens, and
//! counts of admitted connections match each bucket exactly.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::bounded::EvictionStats;
use crate::bucket::{ConnectionCounts, ConnectionPermit, Decision, Quota, TokenBuckets};
use crate::key::{ClientKey, PrefixLength};

/// Which of a client's keys a limit was hit on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Address,
    Prefix(PrefixLength),
}

impl std::fmt::Display for Scope {
    /// `address`, `ipv4/24`, `ipv6/64`: a bounded set, fit for a metric
    /// label.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Address => f.write_str("address"),
            Self::Prefix(len) => len.fmt(f),
        }
    }
}

/// Which kind of limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Rate,
    Concurrency,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rate => "rate",
            Self::Concurrency => "concurrency",
        }
    }
}

/// A limit a connection ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub scope: Scope,
    pub kind: LimitKind,
    /// The key whose limit it was (the address or its prefix).
    pub key: ClientKey,
    /// For a rate limit, when a token will be there; `None` for the
    /// concurrency cap, which frees when a connection ends.
    pub retry_after: Option<Duration>,
}

/// The answer to a new connection.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Let in; hand the permit back to `Limiter::release` when it ends.
    Admitted(ConnectionPermit),
    Limited(Limited),
}

/// A rate for every prefix of one length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixQuota {
    pub length: PrefixLength,
    pub quota: Quota,
}

/// What the limiter enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimiterConfig {
    /// The rate per address; `None` for none.
    pub address: Option<Quota>,
    /// Rates per prefix, checked in this order after the address (a
    /// length of the other family is skipped for a client).
    pub prefixes: Vec<PrefixQuota>,
    /// Open connections per address; `None` for no cap.
    pub max_connections_per_address: Option<u32>,
    /// The most keys each table tracks (the address table, each prefix
    /// table, the connection table): memory is bounded by this times the
    /// number of tables times ~38-76 bytes.
    pub max_tracked_keys: usize,
}

/// Rate and concurrency limits per address and prefix.
#[derive(Debug, Clone)]
pub struct Limiter {
    address: Option<TokenBuckets>,
    prefixes: Vec<(PrefixLength, TokenBuckets)>,
    connections: Option<ConnectionCounts>,
}

impl Limiter {
    pub fn new(config: &LimiterConfig) -> Self {
        let max = config.max_tracked_keys;
        Self {
            address: config.address.map(|q| TokenBuckets::new(q, max)),
            prefixes: config
                .prefixes
                .iter()
                .map(|p| (p.length, TokenBuckets::new(p.quota, max)))
                .collect(),
            connections: config
                .max_connections_per_address
                .map(|cap| ConnectionCounts::new(cap, max)),
        }
    }

    /// Applies a reloaded configuration without forgetting the state:
    /// buckets of a scope that stays keep what each key has used (under
    /// the new quota), open connections stay counted so their permits
    /// release correctly. A scope that goes loses its state; a new one
    /// starts empty. `max_tracked_keys` applies to tables created from now
    /// on.
    pub fn reconfigure(&mut self, config: &LimiterConfig) {
        let max = config.max_tracked_keys;
        self.address = match (self.address.take(), config.address) {
            (Some(mut buckets), Some(quota)) => {
                buckets.set_quota(quota);
                Some(buckets)
            }
            (_, quota) => quota.map(|q| TokenBuckets::new(q, max)),
        };
        let mut old = std::mem::take(&mut self.prefixes);
        self.prefixes = config
            .prefixes
            .iter()
            .map(|p| {
                let buckets = match old.iter().position(|(len, _)| *len == p.length) {
                    Some(i) => {
                        let (_, mut buckets) = old.swap_remove(i);
                        buckets.set_quota(p.quota);
                        buckets
                    }
                    None => TokenBuckets::new(p.quota, max),
                };
                (p.length, buckets)
            })
            .collect();
        self.connections = match (self.connections.take(), config.max_connections_per_address) {
            (Some(mut conns), Some(cap)) => {
                conns.set_cap(cap);
                Some(conns)
            }
            (_, cap) => cap.map(|cap| ConnectionCounts::new(cap, max)),
        };
    }

    /// Decides on a new connection from `ip` at `now`: checks the
    /// connection cap, then the address bucket, then the prefix buckets in
    /// configured order, and reports the first limit hit. Only when none is
    /// hit does it take a token from each bucket and count the connection.
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> Admission {
        let address = ClientKey::address(ip);
        if let Some(conns) = &self.connections {
            if !conns.has_room(&address) {
                return Admission::Limited(Limited {
                    scope: Scope::Address,
                    kind: LimitKind::Concurrency,
                    key: address,
                    retry_after: None,
                });
            }
        }
        if let Some(limited) = self.first_rate_limit(ip, address, now) {
            return Admission::Limited(limited);
        }
        if let Some(buckets) = &mut self.address {
            let _taken = buckets.check(&address, now);
        }
        for (length, buckets) in &mut self.prefixes {
            if let Some(key) = ClientKey::prefix(ip, *length) {
                let _taken = buckets.check(&key, now);
            }
        }
        let permit = match &mut self.connections {
            Some(conns) => conns.acquire(address),
            None => None,
        };
        Admission::Admitted(permit.unwrap_or_else(|| ConnectionPermit::untracked(address)))
    }

    fn first_rate_limit(&self, ip: IpAddr, address: ClientKey, now: Instant) -> Option<Limited> {
        let limited = |scope, key, d: Decision| match d {
            Decision::Allowed => None,
            Decision::Limited { retry_after } => Some(Limited {
                scope,
                kind: LimitKind::Rate,
                key,
                retry_after: Some(retry_after),
            }),
        };
        if let Some(buckets) = &self.address {
            if let Some(l) = limited(Scope::Address, address, buckets.peek(&address, now)) {
                return Some(l);
            }
        }
        self.prefixes.iter().find_map(|(length, buckets)| {
            let key = ClientKey::prefix(ip, *length)?;
            limited(Scope::Prefix(*length), key, buckets.peek(&key, now))
        })
    }

    /// The connection of `permit` has ended.
    pub fn release(&mut self, permit: ConnectionPermit) {
        if let Some(conns) = &mut self.connections {
            conns.release(permit);
        }
    }

    /// Open connections of `ip` (0 when no cap is configured).
    pub fn connections(&self, ip: IpAddr) -> u32 {
        self.connections
            .as_ref()
            .map_or(0, |c| c.count(&ClientKey::address(ip)))
    }

    /// Forgets full buckets; returns how many went.
    pub fn sweep(&mut self, now: Instant) -> usize {
        self.buckets_mut().map(|b| b.sweep(now)).sum()
    }

    /// Keys tracked across every table.
    pub fn tracked_keys(&self) -> usize {
        self.buckets().map(TokenBuckets::len).sum::<usize>()
            + self.connections.as_ref().map_or(0, ConnectionCounts::len)
    }

    /// Heap bytes of every table.
    pub fn memory_bytes(&self) -> usize {
        self.buckets()
            .map(TokenBuckets::memory_bytes)
            .sum::<usize>()
            + self
                .connections
                .as_ref()
                .map_or(0, ConnectionCounts::memory_bytes)
    }

    /// Evictions summed over the bucket tables.
    pub fn stats(&self) -> EvictionStats {
        self.buckets().fold(EvictionStats::default(), |mut acc, b| {
            let s = b.stats();
            acc.evicted_idle += s.evicted_idle;
            acc.evicted_live += s.evicted_live;
            acc
        })
    }

    fn buckets(&self) -> impl Iterator<Item = &TokenBuckets> {
        self.address
            .iter()
            .chain(self.prefixes.iter().map(|(_, b)| b))
    }

    fn buckets_mut(&mut self) -> impl Iterator<Item = &mut TokenBuckets> {
        self.address
            .iter_mut()
            .chain(self.prefixes.iter_mut().map(|(_, b)| b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    /// Per address 1/s burst 3; per /24 (and /64) 1/s burst 5; per /48
    /// 1/s burst 8; two connections open per address.
    fn limiter() -> Limiter {
        let q = |burst| Quota::per_second(1.0, burst).unwrap();
        Limiter::new(&LimiterConfig {
            address: Some(q(3)),
            prefixes: vec![
                PrefixQuota {
                    length: PrefixLength::v4(24).unwrap(),
                    quota: q(5),
                },
                PrefixQuota {
                    length: PrefixLength::v6(64).unwrap(),
                    quota: q(5),
                },
                PrefixQuota {
                    length: PrefixLength::v6(48).unwrap(),
                    quota: q(8),
                },
            ],
            max_connections_per_address: Some(2),
            max_tracked_keys: 1000,
        })
    }

    /// Admits and releases at once, as a burst of short connections.
    fn connect(l: &mut Limiter, addr: &str, now: Instant) -> Result<(), Limited> {
        match l.admit(ip(addr), now) {
            Admission::Admitted(p) => {
                l.release(p);
                Ok(())
            }
            Admission::Limited(x) => Err(x),
        }
    }

    #[test]
    fn a_burst_from_one_address_is_limited_by_its_own_bucket() {
        let t0 = Instant::now();
        let mut l = limiter();
        for _ in 0..3 {
            assert!(connect(&mut l, "192.0.2.1", t0).is_ok());
        }
        let hit = connect(&mut l, "192.0.2.1", t0).unwrap_err();
        assert_eq!(hit.scope, Scope::Address);
        assert_eq!(hit.kind, LimitKind::Rate);
        assert_eq!(hit.key.to_string(), "192.0.2.1");
        assert_eq!(hit.retry_after, Some(ms(1000)));
        // Another network is untouched.
        assert!(connect(&mut l, "198.51.100.1", t0).is_ok());
        // A second later, one more.
        assert!(connect(&mut l, "192.0.2.1", t0 + ms(1000)).is_ok());
        assert!(connect(&mut l, "192.0.2.1", t0 + ms(1000)).is_err());
    }

    #[test]
    fn neighbours_in_a_slash_24_share_the_prefix_bucket() {
        let t0 = Instant::now();
        let mut l = limiter();
        for _ in 0..3 {
            assert!(connect(&mut l, "192.0.2.1", t0).is_ok());
        }
        assert!(connect(&mut l, "192.0.2.2", t0).is_ok());
        assert!(connect(&mut l, "192.0.2.2", t0).is_ok());
        // The /24 has given its five; a fresh neighbour is refused by it.
        let hit = connect(&mut l, "192.0.2.3", t0).unwrap_err();
        assert_eq!(hit.scope, Scope::Prefix(PrefixLength::v4(24).unwrap()));
        assert_eq!(hit.key.to_string(), "192.0.2.0/24");
        assert_eq!(hit.scope.to_string(), "ipv4/24");
        // The next /24 is not.
        assert!(connect(&mut l, "192.0.3.3", t0).is_ok());
        // The refusal took nothing from 192.0.2.3's own bucket: after one
        // token's time the /24 has one, and .3 gets it.
        assert!(connect(&mut l, "192.0.2.3", t0 + ms(1000)).is_ok());
    }

    #[test]
    fn ipv6_clients_meet_the_64_and_then_the_48() {
        let t0 = Instant::now();
        let mut l = limiter();
        // Five from five addresses of one /64 use up the /64.
        for i in 1..=5 {
            assert!(connect(&mut l, &format!("2001:db8:0:1::{i}"), t0).is_ok());
        }
        let hit = connect(&mut l, "2001:db8:0:1::6", t0).unwrap_err();
        assert_eq!(hit.scope, Scope::Prefix(PrefixLength::v6(64).unwrap()));
        // Three more from another /64 of the same /48, then the /48 is dry.
        for i in 1..=3 {
            assert!(connect(&mut l, &format!("2001:db8:0:2::{i}"), t0).is_ok());
        }
        let hit = connect(&mut l, "2001:db8:0:3::1", t0).unwrap_err();
        assert_eq!(hit.scope, Scope::Prefix(PrefixLength::v6(48).unwrap()));
        assert_eq!(hit.key.to_string(), "2001:db8::/48");
    }

    #[test]
    fn ipv4_mapped_clients_share_the_ipv4_buckets() {
        let t0 = Instant::now();
        let mut l = limiter();
        for _ in 0..3 {
            assert!(connect(&mut l, "::ffff:192.0.2.1", t0).is_ok());
        }
        let hit = connect(&mut l, "192.0.2.1", t0).unwrap_err();
        assert_eq!(hit.scope, Scope::Address);
    }

    #[test]
    fn the_connection_cap_holds_until_one_ends_and_takes_no_token() {
        let t0 = Instant::now();
        let mut l = limiter();
        let Admission::Admitted(a) = l.admit(ip("192.0.2.1"), t0) else {
            panic!("first connection refused")
        };
        let Admission::Admitted(b) = l.admit(ip("192.0.2.1"), t0) else {
            panic!("second connection refused")
        };
        assert_eq!(l.connections(ip("192.0.2.1")), 2);
        let Admission::Limited(hit) = l.admit(ip("192.0.2.1"), t0) else {
            panic!("third connection let in")
        };
        assert_eq!(hit.kind, LimitKind::Concurrency);
        assert_eq!(hit.retry_after, None);
        l.release(a);
        // The refused attempt took no token: the third of the burst is left.
        let Admission::Admitted(c) = l.admit(ip("192.0.2.1"), t0) else {
            panic!("connection after a release refused")
        };
        l.release(b);
        l.release(c);
        assert_eq!(l.connections(ip("192.0.2.1")), 0);
        assert_eq!(
            connect(&mut l, "192.0.2.1", t0).unwrap_err().kind,
            LimitKind::Rate
        );
    }

    #[test]
    fn a_reload_keeps_what_clients_have_used_and_open_connections() {
        let t0 = Instant::now();
        let mut l = limiter();
        let Admission::Admitted(held) = l.admit(ip("192.0.2.1"), t0) else {
            panic!("refused")
        };
        for _ in 0..2 {
            assert!(connect(&mut l, "192.0.2.1", t0).is_ok());
        }
        // A reload raises the address burst to 4 and the cap to 3.
        let mut config = LimiterConfig {
            address: Some(Quota::per_second(1.0, 4).unwrap()),
            prefixes: vec![PrefixQuota {
                length: PrefixLength::v4(24).unwrap(),
                quota: Quota::per_second(1.0, 5).unwrap(),
            }],
            max_connections_per_address: Some(3),
            max_tracked_keys: 1000,
        };
        l.reconfigure(&config);
        // Three used of four: one more, not a fresh burst.
        assert!(connect(&mut l, "192.0.2.1", t0).is_ok());
        assert_eq!(
            connect(&mut l, "192.0.2.1", t0).unwrap_err().scope,
            Scope::Address
        );
        assert_eq!(l.connections(ip("192.0.2.1")), 1);
        // Dropping the cap drops the count; the held permit still releases.
        config.max_connections_per_address = None;
        l.reconfigure(&config);
        l.release(held);
        assert_eq!(l.connections(ip("192.0.2.1")), 0);
    }

    #[test]
    fn without_limits_everyone_is_admitted_and_nothing_is_tracked() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&LimiterConfig {
            address: None,
            prefixes: vec![],
            max_connections_per_address: None,
            max_tracked_keys: 10,
        });
        for _ in 0..100 {
            let Admission::Admitted(p) = l.admit(ip("192.0.2.1"), t0) else {
                panic!("refused without limits")
            };
            assert!(!p.is_tracked());
        }
        assert_eq!(l.tracked_keys(), 0);
    }

    #[test]
    fn a_flood_of_addresses_keeps_every_table_within_its_cap() {
        let t0 = Instant::now();
        let mut l = limiter();
        for i in 0..20_000u32 {
            let addr = IpAddr::from((0x0a00_0000u32 + i * 7).to_be_bytes());
            let _ = l.admit(addr, t0);
        }
        // Address, /24, /64, /48 tables and the connection table.
        assert!(l.tracked_keys() <= 5 * 1000, "{}", l.tracked_keys());
        assert!(l.stats().evicted_live > 0);
        assert!(l.memory_bytes() < 5 * 1000 * 80);
        assert!(l.sweep(t0 + Duration::from_secs(60)) > 0);
        assert_eq!(
            l.tracked_keys(),
            1000,
            "only the never-released connections are left"
        );
    }
}
