//! Admission figures for the docs: prefix lookups/s at 10^6 prefixes,
//! limiter decisions/s, and memory per tracked key.
//!
//! `cargo bench -p mxguard-policy --bench admission` (one core, release
//! build). Plain timing loops over `std::time::Instant`: the numbers are
//! for sizing, not for catching small regressions.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use mxguard_policy::{
    Admission, EntrySource, LimiterConfig, ListKind, PrefixEntry, PrefixLength, PrefixLists,
    PrefixQuota, PrefixTable, Quota, Reputation, TokenBuckets,
};
use mxguard_policy::{ClientKey, Limiter};

/// xorshift64*: reproducible, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn v4(bits: u32, len: u8) -> IpNet {
    IpNet::new(IpAddr::from(bits.to_be_bytes()), len)
        .map(|n| n.trunc())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn v6(bits: u128, len: u8) -> IpNet {
    IpNet::new(IpAddr::from(bits.to_be_bytes()), len)
        .map(|n| n.trunc())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A million distinct prefixes shaped like a large real block list:
/// mostly single addresses and /24s, a few thousand shorter IPv4 prefixes
/// with every length from /8 to /31 present (the worst case for probing:
/// 25 IPv4 lengths), and IPv6 /128, /64 and /48.
fn million(rng: &mut Rng) -> Vec<IpNet> {
    let mut seen = std::collections::HashSet::new();
    let mut nets = Vec::with_capacity(1_000_000);
    let mut add = |nets: &mut Vec<IpNet>, net: IpNet| {
        if seen.insert(net) {
            nets.push(net);
        }
    };
    // Short prefixes: few, as in real lists (a /8 covers 1/256 of the
    // space; a random address should mostly miss).
    for len in 8u8..=31 {
        let count = match len {
            8..=15 => 4,
            16..=23 => 200,
            _ => 2000,
        };
        for _ in 0..count {
            add(&mut nets, v4(rng.next() as u32, len));
        }
    }
    for i in 0..100_000u32 {
        let len = [128, 64, 48][(i % 3) as usize];
        let addr = (0x2001_0db8u128 << 96) | u128::from(rng.next()) << 32 | u128::from(rng.next());
        add(&mut nets, v6(addr, len));
    }
    while nets.len() < 1_000_000 {
        let len = if rng.next() & 3 == 0 { 24 } else { 32 };
        add(&mut nets, v4(rng.next() as u32, len));
    }
    nets
}

fn rate(n: usize, took: Duration) -> String {
    let per_s = n as f64 / took.as_secs_f64();
    format!("{:.2} M/s ({:.0} ns each)", per_s / 1e6, 1e9 / per_s)
}

fn main() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let now = Instant::now();

    // -- prefix table ------------------------------------------------------
    let nets = million(&mut rng);
    let shared = std::sync::Arc::new(PrefixEntry::new(
        ListKind::Block,
        EntrySource::File,
        "bench",
    ));
    let started = Instant::now();
    let table: PrefixTable = nets.iter().map(|n| (*n, shared.clone())).collect();
    let build = started.elapsed();
    let (l4, l6) = table.lengths_present();
    println!(
        "prefix table: {} prefixes ({l4} IPv4 lengths, {l6} IPv6 lengths) built in {:.0} ms, {:.1} MiB of maps",
        table.len(),
        build.as_secs_f64() * 1e3,
        table.memory_bytes() as f64 / (1 << 20) as f64
    );

    let n = 2_000_000;
    let hits: Vec<IpAddr> = (0..n)
        .map(|i| {
            let net = nets[(rng.next() as usize) % nets.len()];
            match net {
                IpNet::V4(_) if i % 2 == 0 => net.addr(),
                _ => net.network(),
            }
        })
        .collect();
    let misses: Vec<IpAddr> = (0..n)
        .map(|_| IpAddr::from((rng.next() as u32).to_be_bytes()))
        .collect();
    let misses6: Vec<IpAddr> = (0..n)
        .map(|_| IpAddr::from(((0x2a00u128 << 112) | u128::from(rng.next())).to_be_bytes()))
        .collect();

    for (name, probes) in [
        ("listed", &hits),
        ("random IPv4", &misses),
        ("random IPv6", &misses6),
    ] {
        let started = Instant::now();
        let mut found = 0usize;
        for ip in probes.iter() {
            found += usize::from(table.lookup(black_box(*ip), now).is_some());
        }
        let took = started.elapsed();
        println!(
            "  lookup, {name} addresses: {} ({found} of {} matched)",
            rate(probes.len(), took),
            probes.len()
        );
    }

    // The common shape: only /32 and /24 (two probes a lookup).
    let mut typical = PrefixTable::new();
    while typical.len() < 1_000_000 {
        let len = if rng.next() & 3 == 0 { 24 } else { 32 };
        typical.insert(v4(rng.next() as u32, len), shared.clone());
    }
    let started = Instant::now();
    let mut found = 0usize;
    for ip in misses.iter() {
        found += usize::from(typical.lookup(black_box(*ip), now).is_some());
    }
    println!(
        "  lookup in 10^6 /32 and /24 only, random IPv4 addresses: {} ({found} matched)",
        rate(misses.len(), started.elapsed())
    );

    let lists = PrefixLists::new(table.clone(), PrefixTable::new());
    let started = Instant::now();
    let mut blocked = 0usize;
    for ip in misses.iter().chain(hits.iter()) {
        blocked += usize::from(matches!(
            lists.classify(black_box(*ip), now),
            mxguard_policy::ListVerdict::Blocked(_)
        ));
    }
    println!(
        "  classify (files + empty overlay), half listed: {} ({blocked} blocked)",
        rate(2 * n, started.elapsed())
    );

    // Copy-on-write: a detection adds one entry to a 100k-entry overlay.
    let overlay: PrefixTable = (0..100_000u32)
        .map(|_| (v4(rng.next() as u32, 32), shared.clone()))
        .collect();
    let rounds = 1000;
    let started = Instant::now();
    let mut current = overlay;
    for i in 0..rounds {
        let mut next = current.clone();
        next.insert(
            v4(0x0b00_0000 + i, 32),
            PrefixEntry::new(ListKind::Block, EntrySource::Detection, "x"),
        );
        current = next;
    }
    println!(
        "  clone + insert + drop old, overlay of 100k /32s: {:.1} µs each",
        started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
    );
    let started = Instant::now();
    let copy = table.clone();
    println!(
        "  clone of the 10^6 table: {:.1} µs",
        started.elapsed().as_secs_f64() * 1e6
    );
    drop(copy);

    // -- limiter -----------------------------------------------------------
    let q = |rate, burst| Quota::per_second(rate, burst).unwrap_or_else(|e| panic!("{e}"));
    let len =
        |l: Result<PrefixLength, _>| l.unwrap_or_else(|e: mxguard_policy::Error| panic!("{e}"));
    let config = LimiterConfig {
        address: Some(q(1.0, 10)),
        prefixes: vec![
            PrefixQuota {
                length: len(PrefixLength::v4(24)),
                quota: q(5.0, 50),
            },
            PrefixQuota {
                length: len(PrefixLength::v6(64)),
                quota: q(5.0, 50),
            },
            PrefixQuota {
                length: len(PrefixLength::v6(48)),
                quota: q(20.0, 200),
            },
        ],
        max_connections_per_address: Some(20),
        max_tracked_keys: 1_000_000,
    };
    let mut limiter = Limiter::new(&config);
    let clients: Vec<IpAddr> = (0..1_000_000)
        .map(|i| {
            if i % 4 == 0 {
                IpAddr::from(
                    ((0x2001_0db8u128 << 96) | u128::from(rng.next() % 100_000)).to_be_bytes(),
                )
            } else {
                IpAddr::from((0x0a00_0000 + (rng.next() % 100_000) as u32).to_be_bytes())
            }
        })
        .collect();
    let started = Instant::now();
    let mut admitted = 0usize;
    for (i, ip) in clients.iter().enumerate() {
        let t = now + Duration::from_micros(i as u64);
        if let Admission::Admitted(p) = limiter.admit(black_box(*ip), t) {
            admitted += 1;
            limiter.release(p);
        }
    }
    println!(
        "limiter, most refused: admit + release over 100k addresses: {} ({admitted} admitted); {} keys tracked, {:.1} MiB",
        rate(clients.len(), started.elapsed()),
        limiter.tracked_keys(),
        limiter.memory_bytes() as f64 / (1 << 20) as f64
    );
    // The same traffic under quotas it never reaches: every decision takes
    // tokens from three or four buckets and counts a connection.
    let generous = LimiterConfig {
        address: Some(q(1e6, 1_000_000)),
        prefixes: config
            .prefixes
            .iter()
            .map(|p| PrefixQuota {
                length: p.length,
                quota: q(1e6, 1_000_000),
            })
            .collect(),
        ..config.clone()
    };
    let mut limiter = Limiter::new(&generous);
    let started = Instant::now();
    let mut admitted = 0usize;
    for (i, ip) in clients.iter().enumerate() {
        let t = now + Duration::from_micros(i as u64);
        if let Admission::Admitted(p) = limiter.admit(black_box(*ip), t) {
            admitted += 1;
            limiter.release(p);
        }
    }
    println!(
        "limiter, all admitted: admit + release over 100k addresses: {} ({admitted} admitted); {} keys tracked, {:.1} MiB",
        rate(clients.len(), started.elapsed()),
        limiter.tracked_keys(),
        limiter.memory_bytes() as f64 / (1 << 20) as f64
    );

    // -- memory per tracked key -------------------------------------------
    for keys in [100_000u32, 1_000_000] {
        let mut buckets: TokenBuckets = TokenBuckets::new(q(1.0, 5), keys as usize);
        let mut rep = Reputation::new(Duration::from_secs(3600), keys as usize)
            .unwrap_or_else(|e| panic!("{e}"));
        let started = Instant::now();
        for i in 0..keys {
            let ip = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            let _ = buckets.check(&ClientKey::address(ip), now);
            rep.add(ip, 1.0, now);
        }
        let took = started.elapsed();
        println!(
            "memory at {keys} tracked keys: buckets {:.1} B/key, reputation {:.1} B/key \
             (filled at {})",
            buckets.memory_bytes() as f64 / f64::from(keys),
            rep.memory_bytes() as f64 / f64::from(keys),
            rate(keys as usize * 2, took)
        );
    }
}
