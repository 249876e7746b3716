//! Allow and block prefix tables: longest-prefix match over IPv4 and IPv6
//! CIDR entries, each with a reason, a source and an optional expiry.
//!
//! # Layout, and why
//!
//! One hash map per prefix length, probed from the longest length present
//! to the shortest. A lookup costs one hash probe per distinct length in
//! the table (not per entry): real lists use a dozen or two (/32 and /24
//! dominate), so a lookup is a handful of cache misses however many
//! entries there are. The alternatives were weighed:
//!
//! - a sorted array of disjoint ranges with binary search: ~20 dependent
//!   cache misses at 10^6 entries, nested prefixes must be flattened at
//!   build time, and one dynamic insert means a rebuild;
//! - a radix trie (poptrie, DIR-24-8): fastest lookups but large build
//!   cost and memory, and no cheap copy-on-write update.
//!
//! The daemon holds tables as immutable snapshots behind `ArcSwap`, so an
//! update is clone, modify, swap. Each length's map is split into 64
//! shards behind `Arc`s: cloning a table copies only those pointers, and
//! an insert or removal copies the one shard it touches (1/64 of that
//! length's entries). Static file entries are rebuilt whole on reload; the
//! dynamic overlay (detections, admin, cluster) takes single updates.
//! Values are `Arc<PrefixEntry>`: the entries of one file share one, so a
//! million-line list costs a key and a pointer per line.
//!
//! Measured with `cargo bench -p mxguard-policy --bench admission` (one
//! core of the 2-core development machine, release build) on 10^6
//! prefixes: with all 25 IPv4 lengths /8../32 present (the worst case),
//! ~2.8 M lookups/s (~350 ns) for random IPv4 addresses; with only /32
//! and /24, ~9-11 M/s (~100 ns); IPv6 with three lengths ~15 M/s. The
//! maps take 27 MiB; building the table takes ~80 ms; cloning it ~30 µs;
//! clone + insert into a 100k-entry overlay ~20 µs. A per-/16 bitmap of
//! the longer lengths present would halve the worst case; a connection's
//! admission does not need it.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::anchor::TimeAnchor;
use crate::bounded::{self, Hasher};
use crate::key::{canonical_ip, canonical_net, mask_u128, mask_u32};
use crate::Error;

/// Which list an entry is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    /// Skips every test and limit.
    Allow,
    /// Refused before the MTA is touched.
    Block,
}

/// Who put an entry there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntrySource {
    /// A CIDR list file of the configuration.
    File,
    /// A detection on this gateway (pregreet, a limit crossed...).
    Detection,
    /// The admin API or CLI.
    Admin,
    /// Another gateway of the fleet.
    Cluster,
}

impl EntrySource {
    /// Whether an operator chose this entry (a file or the admin), as
    /// opposed to a machine's conclusion. Only deliberate blocks may carve
    /// an exception out of an allowed range (see `lists`).
    pub fn is_deliberate(self) -> bool {
        matches!(self, Self::File | Self::Admin)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Detection => "detection",
            Self::Admin => "admin",
            Self::Cluster => "cluster",
        }
    }
}

/// What a table says about one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixEntry {
    pub kind: ListKind,
    pub source: EntrySource,
    /// Free text for logs and the admin API: the detection, the file's
    /// comment on the line, the admin's note.
    pub reason: String,
    /// When the entry stops counting; `None` for never.
    pub until: Option<Instant>,
}

impl PrefixEntry {
    pub fn new(kind: ListKind, source: EntrySource, reason: impl Into<String>) -> Self {
        Self {
            kind,
            source,
            reason: reason.into(),
            until: None,
        }
    }

    pub fn until(mut self, until: Instant) -> Self {
        self.until = Some(until);
        self
    }

    /// Whether the entry counts at `now`.
    pub fn is_live(&self, now: Instant) -> bool {
        match self.until {
            None => true,
            Some(until) => until > now,
        }
    }
}

/// A live entry found for an address, with the prefix it was found under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixMatch<'a> {
    pub net: IpNet,
    pub entry: &'a PrefixEntry,
}

const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;

/// An address family's integer form.
trait Bits: Copy + Eq + Hash + fmt::Debug {
    const WIDTH: u8;
    fn masked(self, len: u8) -> Self;
    /// A shard index from the masked address, independent of the maps'
    /// own hash (Fibonacci hashing of the folded bits).
    fn shard(self) -> usize;
    fn net(self, len: u8) -> IpNet;
}

const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;

impl Bits for u32 {
    const WIDTH: u8 = 32;

    fn masked(self, len: u8) -> Self {
        self & mask_u32(len)
    }

    fn shard(self) -> usize {
        (u64::from(self).wrapping_mul(FIBONACCI) >> (64 - SHARD_BITS)) as usize
    }

    fn net(self, len: u8) -> IpNet {
        let addr = IpAddr::from(self.to_be_bytes());
        IpNet::new(addr, len).unwrap_or_else(|_| IpNet::from(addr))
    }
}

impl Bits for u128 {
    const WIDTH: u8 = 128;

    fn masked(self, len: u8) -> Self {
        self & mask_u128(len)
    }

    fn shard(self) -> usize {
        let folded = (self as u64) ^ ((self >> 64) as u64);
        (folded.wrapping_mul(FIBONACCI) >> (64 - SHARD_BITS)) as usize
    }

    fn net(self, len: u8) -> IpNet {
        let addr = IpAddr::from(self.to_be_bytes());
        IpNet::new(addr, len).unwrap_or_else(|_| IpNet::from(addr))
    }
}

type Shard<A> = Arc<HashMap<A, Arc<PrefixEntry>, Hasher>>;

/// The entries of one prefix length, sharded for cheap copy-on-write.
#[derive(Clone)]
struct LengthMap<A> {
    shards: Vec<Shard<A>>,
    len: usize,
}

impl<A: Bits> LengthMap<A> {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Arc::default()).collect(),
            len: 0,
        }
    }

    fn shard(&self, addr: A) -> &HashMap<A, Arc<PrefixEntry>, Hasher> {
        &self.shards[addr.shard()]
    }

    fn shard_mut(&mut self, addr: A) -> &mut HashMap<A, Arc<PrefixEntry>, Hasher> {
        Arc::make_mut(&mut self.shards[addr.shard()])
    }
}

/// The length maps of one family, and which lengths are present.
#[derive(Clone)]
struct FamilyTable<A> {
    /// Lengths with at least one entry, longest first: the probe order.
    lengths: Vec<u8>,
    /// Indexed by prefix length.
    maps: Vec<Option<LengthMap<A>>>,
}

impl<A: Bits> Default for FamilyTable<A> {
    fn default() -> Self {
        Self {
            lengths: Vec::new(),
            maps: (0..=A::WIDTH).map(|_| None).collect(),
        }
    }
}

impl<A: Bits> FamilyTable<A> {
    fn get(&self, addr: A, len: u8) -> Option<&Arc<PrefixEntry>> {
        self.maps
            .get(usize::from(len))?
            .as_ref()?
            .shard(addr)
            .get(&addr)
    }

    fn insert(&mut self, addr: A, len: u8, entry: Arc<PrefixEntry>) -> Option<Arc<PrefixEntry>> {
        let slot = self.maps.get_mut(usize::from(len))?;
        let map = slot.get_or_insert_with(|| {
            // A new length joins the probe order.
            let at = self.lengths.partition_point(|l| *l > len);
            self.lengths.insert(at, len);
            LengthMap::new()
        });
        let old = map.shard_mut(addr).insert(addr, entry);
        if old.is_none() {
            map.len += 1;
        }
        old
    }

    fn remove(&mut self, addr: A, len: u8) -> Option<Arc<PrefixEntry>> {
        let slot = self.maps.get_mut(usize::from(len))?;
        let map = slot.as_mut()?;
        if !map.shard(addr).contains_key(&addr) {
            return None;
        }
        let old = map.shard_mut(addr).remove(&addr);
        map.len -= 1;
        if map.len == 0 {
            *slot = None;
            self.lengths.retain(|l| *l != len);
        }
        old
    }

    /// Live entries covering `addr`, longest prefix first.
    fn matches(&self, addr: A, now: Instant) -> impl Iterator<Item = PrefixMatch<'_>> + '_ {
        self.lengths.iter().filter_map(move |&len| {
            let net = addr.masked(len);
            let map = self.maps[usize::from(len)].as_ref()?;
            let entry = map.shard(net).get(&net)?;
            entry.is_live(now).then(|| PrefixMatch {
                net: net.net(len),
                entry,
            })
        })
    }

    /// Keeps the entries `keep` says yes to; copies only the shards that
    /// lose one. Returns how many went. `keep` is asked twice about some
    /// entries, so it must not count.
    fn retain(&mut self, keep: impl Fn(&PrefixEntry) -> bool) -> usize {
        let mut removed = 0;
        for len in self.lengths.clone() {
            let slot = &mut self.maps[usize::from(len)];
            let Some(map) = slot.as_mut() else { continue };
            for shard in &mut map.shards {
                if shard.values().all(|e| keep(e)) {
                    continue;
                }
                let shard = Arc::make_mut(shard);
                let before = shard.len();
                shard.retain(|_, e| keep(e));
                removed += before - shard.len();
                map.len -= before - shard.len();
            }
            if map.len == 0 {
                *slot = None;
                self.lengths.retain(|l| *l != len);
            }
        }
        removed
    }

    fn iter(&self) -> impl Iterator<Item = (IpNet, &Arc<PrefixEntry>)> + '_ {
        self.lengths.iter().flat_map(move |&len| {
            self.maps[usize::from(len)]
                .iter()
                .flat_map(|m| m.shards.iter())
                .flat_map(move |shard| shard.iter().map(move |(a, e)| (a.net(len), e)))
        })
    }

    fn shard_bytes(&self) -> usize {
        self.maps
            .iter()
            .flatten()
            .flat_map(|m| m.shards.iter())
            .map(|s| {
                bounded::table_bytes(s.capacity(), std::mem::size_of::<(A, Arc<PrefixEntry>)>())
            })
            .sum()
    }
}

/// A set of prefixes with an entry each, for longest-prefix match.
///
/// Cheap to clone (a few thousand `Arc` increments at most); see the
/// module doc for the layout.
#[derive(Clone, Default)]
pub struct PrefixTable {
    v4: FamilyTable<u32>,
    v6: FamilyTable<u128>,
    len: usize,
}

impl fmt::Debug for PrefixTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrefixTable")
            .field("len", &self.len)
            .field("ipv4_lengths", &self.v4.lengths)
            .field("ipv6_lengths", &self.v6.lengths)
            .finish()
    }
}

impl PrefixTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the entry of `net` (host bits cleared, IPv4-mapped ranges as
    /// IPv4); returns the entry it replaced.
    pub fn insert(
        &mut self,
        net: IpNet,
        entry: impl Into<Arc<PrefixEntry>>,
    ) -> Option<Arc<PrefixEntry>> {
        let entry = entry.into();
        let old = match canonical_net(net) {
            IpNet::V4(n) => self
                .v4
                .insert(u32::from(n.network()), n.prefix_len(), entry),
            IpNet::V6(n) => self
                .v6
                .insert(u128::from(n.network()), n.prefix_len(), entry),
        };
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// `insert` for a table that must stay within `max_entries` (the
    /// dynamic overlay, where detections add entries at an attacker's
    /// pace). When full: expired entries go first, then those expiring
    /// soonest, an eighth of the table at once; entries without an expiry
    /// are never pushed out, and if nothing else is left the insert fails.
    pub fn insert_bounded(
        &mut self,
        net: IpNet,
        entry: impl Into<Arc<PrefixEntry>>,
        now: Instant,
        max_entries: usize,
    ) -> Result<Option<Arc<PrefixEntry>>, Error> {
        let max_entries = max_entries.max(1);
        if self.len >= max_entries && self.get(net).is_none() {
            self.purge(now);
            if self.len >= max_entries {
                self.evict_soonest(self.len - bounded::target_len(max_entries));
            }
            if self.len >= max_entries {
                return Err(Error::ListFull { max: max_entries });
            }
        }
        Ok(self.insert(net, entry))
    }

    fn evict_soonest(&mut self, count: usize) {
        let mut expiring: Vec<(Instant, IpNet)> = self
            .iter()
            .filter_map(|(net, e)| e.until.map(|until| (until, net)))
            .collect();
        let count = count.min(expiring.len());
        if count == 0 {
            return;
        }
        expiring.select_nth_unstable(count - 1);
        for (_, net) in expiring.into_iter().take(count) {
            self.remove(net);
        }
    }

    /// Removes the entry of exactly `net`.
    pub fn remove(&mut self, net: IpNet) -> Option<Arc<PrefixEntry>> {
        let old = match canonical_net(net) {
            IpNet::V4(n) => self.v4.remove(u32::from(n.network()), n.prefix_len()),
            IpNet::V6(n) => self.v6.remove(u128::from(n.network()), n.prefix_len()),
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The entry of exactly `net`, live or not.
    pub fn get(&self, net: IpNet) -> Option<&PrefixEntry> {
        match canonical_net(net) {
            IpNet::V4(n) => self.v4.get(u32::from(n.network()), n.prefix_len()),
            IpNet::V6(n) => self.v6.get(u128::from(n.network()), n.prefix_len()),
        }
        .map(|e| &**e)
    }

    /// The live entry of the longest prefix covering `ip`.
    pub fn lookup(&self, ip: IpAddr, now: Instant) -> Option<PrefixMatch<'_>> {
        self.matches(ip, now).next()
    }

    /// Every live entry covering `ip`, longest prefix first.
    pub fn matches(&self, ip: IpAddr, now: Instant) -> impl Iterator<Item = PrefixMatch<'_>> + '_ {
        let (v4, v6) = match canonical_ip(ip) {
            IpAddr::V4(a) => (Some(self.v4.matches(u32::from(a), now)), None),
            IpAddr::V6(a) => (None, Some(self.v6.matches(u128::from(a), now))),
        };
        v4.into_iter().flatten().chain(v6.into_iter().flatten())
    }

    /// Drops the entries expired at `now`; returns how many went.
    pub fn purge(&mut self, now: Instant) -> usize {
        let removed = self.v4.retain(|e| e.is_live(now)) + self.v6.retain(|e| e.is_live(now));
        self.len -= removed;
        removed
    }

    /// Every entry, live or not, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &PrefixEntry)> + '_ {
        self.v4
            .iter()
            .chain(self.v6.iter())
            .map(|(net, e)| (net, &**e))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many distinct prefix lengths a lookup probes at most, IPv4 and
    /// IPv6: the figure lookup cost follows.
    pub fn lengths_present(&self) -> (usize, usize) {
        (self.v4.lengths.len(), self.v6.lengths.len())
    }

    /// Heap bytes of the hash maps (the shared entries they point to are
    /// not counted: one per file, one per dynamic entry).
    pub fn memory_bytes(&self) -> usize {
        self.v4.shard_bytes() + self.v6.shard_bytes()
    }

    /// Every entry as a record for persistence.
    pub fn to_records(&self, anchor: &TimeAnchor) -> Vec<PrefixRecord> {
        self.iter()
            .map(|(net, e)| PrefixRecord::new(net, e, anchor))
            .collect()
    }
}

impl<E: Into<Arc<PrefixEntry>>> FromIterator<(IpNet, E)> for PrefixTable {
    fn from_iter<I: IntoIterator<Item = (IpNet, E)>>(iter: I) -> Self {
        let mut table = Self::new();
        table.extend(iter);
        table
    }
}

impl<E: Into<Arc<PrefixEntry>>> Extend<(IpNet, E)> for PrefixTable {
    fn extend<I: IntoIterator<Item = (IpNet, E)>>(&mut self, iter: I) {
        for (net, entry) in iter {
            self.insert(net, entry);
        }
    }
}

/// A prefix entry as persisted: expiry in Unix milliseconds, since an
/// `Instant` means nothing after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixRecord {
    pub net: IpNet,
    pub kind: ListKind,
    pub source: EntrySource,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_unix_ms: Option<u64>,
}

impl PrefixRecord {
    pub fn new(net: IpNet, entry: &PrefixEntry, anchor: &TimeAnchor) -> Self {
        Self {
            net: canonical_net(net),
            kind: entry.kind,
            source: entry.source,
            reason: entry.reason.clone(),
            until_unix_ms: entry.until.map(|u| anchor.to_unix_ms(u)),
        }
    }

    /// The entry back, or `None` if it expired in the meantime.
    pub fn into_entry(self, anchor: &TimeAnchor) -> Option<(IpNet, PrefixEntry)> {
        let until = match self.until_unix_ms {
            None => None,
            Some(ms) => Some(anchor.future_instant(ms)?),
        };
        let entry = PrefixEntry {
            kind: self.kind,
            source: self.source,
            reason: self.reason,
            until,
        };
        // An expiry exactly at the anchor is already past.
        entry
            .is_live(anchor.instant)
            .then(|| (canonical_net(self.net), entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn block(reason: &str) -> PrefixEntry {
        PrefixEntry::new(ListKind::Block, EntrySource::File, reason)
    }

    fn found(t: &PrefixTable, addr: &str, now: Instant) -> Option<String> {
        t.lookup(ip(addr), now).map(|m| m.entry.reason.clone())
    }

    #[test]
    fn the_longest_prefix_wins() {
        let t0 = Instant::now();
        let table: PrefixTable = [
            (net("10.0.0.0/8"), block("eight")),
            (net("10.1.0.0/16"), block("sixteen")),
            (net("10.1.2.0/24"), block("twenty-four")),
            (net("10.1.2.3/32"), block("host")),
            (net("2001:db8::/32"), block("v6 32")),
            (net("2001:db8:1::/48"), block("v6 48")),
        ]
        .into_iter()
        .collect();
        assert_eq!(table.len(), 6);
        assert_eq!(table.lengths_present(), (4, 2));
        assert_eq!(found(&table, "10.1.2.3", t0).as_deref(), Some("host"));
        assert_eq!(
            found(&table, "10.1.2.4", t0).as_deref(),
            Some("twenty-four")
        );
        assert_eq!(found(&table, "10.1.3.4", t0).as_deref(), Some("sixteen"));
        assert_eq!(found(&table, "10.2.3.4", t0).as_deref(), Some("eight"));
        assert_eq!(found(&table, "11.0.0.1", t0), None);
        assert_eq!(found(&table, "2001:db8:1::9", t0).as_deref(), Some("v6 48"));
        assert_eq!(found(&table, "2001:db8:2::9", t0).as_deref(), Some("v6 32"));
        assert_eq!(found(&table, "2001:db9::1", t0), None);
        let m = table.lookup(ip("10.1.2.200"), t0).unwrap();
        assert_eq!(m.net, net("10.1.2.0/24"));
        let all: Vec<u8> = table
            .matches(ip("10.1.2.3"), t0)
            .map(|m| m.net.prefix_len())
            .collect();
        assert_eq!(all, [32, 24, 16, 8]);
    }

    #[test]
    fn ipv4_mapped_addresses_and_ranges_are_ipv4() {
        let t0 = Instant::now();
        let mut table = PrefixTable::new();
        table.insert(net("::ffff:192.0.2.0/120"), block("mapped range"));
        assert_eq!(table.lengths_present(), (1, 0));
        assert_eq!(
            found(&table, "192.0.2.9", t0).as_deref(),
            Some("mapped range")
        );
        assert_eq!(
            found(&table, "::ffff:192.0.2.9", t0).as_deref(),
            Some("mapped range")
        );
        let m = table.lookup(ip("::ffff:192.0.2.9"), t0).unwrap();
        assert_eq!(m.net, net("192.0.2.0/24"));
        table.insert(net("198.51.100.7/32"), block("v4 host"));
        assert_eq!(
            found(&table, "::ffff:198.51.100.7", t0).as_deref(),
            Some("v4 host")
        );
    }

    #[test]
    fn an_expired_entry_gives_way_to_a_shorter_live_one_and_purges() {
        let t0 = Instant::now();
        let mut table = PrefixTable::new();
        table.insert(net("192.0.2.0/24"), block("file"));
        table.insert(
            net("192.0.2.7/32"),
            PrefixEntry::new(ListKind::Block, EntrySource::Detection, "pregreet")
                .until(t0 + Duration::from_secs(60)),
        );
        let just_before = t0 + Duration::from_secs(59);
        assert_eq!(
            found(&table, "192.0.2.7", just_before).as_deref(),
            Some("pregreet")
        );
        let at_expiry = t0 + Duration::from_secs(60);
        assert_eq!(
            found(&table, "192.0.2.7", at_expiry).as_deref(),
            Some("file")
        );
        assert_eq!(table.purge(at_expiry), 1);
        assert_eq!(table.len(), 1);
        assert_eq!(
            table.lengths_present(),
            (1, 0),
            "an empty length is no longer probed"
        );
    }

    #[test]
    fn clones_share_until_one_of_them_changes() {
        let t0 = Instant::now();
        let base: PrefixTable = (0..1000u32)
            .map(|i| {
                (
                    IpNet::from(IpAddr::from((0x0a00_0000 + i).to_be_bytes())),
                    block("base"),
                )
            })
            .collect();
        let mut next = base.clone();
        next.insert(net("10.0.0.5/32"), block("changed"));
        next.remove(net("10.0.0.6/32"));
        assert_eq!(found(&base, "10.0.0.5", t0).as_deref(), Some("base"));
        assert_eq!(found(&next, "10.0.0.5", t0).as_deref(), Some("changed"));
        assert!(found(&base, "10.0.0.6", t0).is_some());
        assert!(found(&next, "10.0.0.6", t0).is_none());
        assert_eq!((base.len(), next.len()), (1000, 999));
        // Only the touched shards were copied.
        let (bs, ns) = (&base.v4.maps[32], &next.v4.maps[32]);
        let shared = bs
            .as_ref()
            .unwrap()
            .shards
            .iter()
            .zip(&ns.as_ref().unwrap().shards)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert!(shared >= SHARDS - 2, "{shared} of {SHARDS} shards shared");
    }

    #[test]
    fn replace_and_remove_keep_the_count() {
        let mut table = PrefixTable::new();
        assert!(table.insert(net("192.0.2.0/24"), block("a")).is_none());
        let old = table.insert(net("192.0.2.99/24"), block("b")).unwrap();
        assert_eq!(old.reason, "a");
        assert_eq!(table.len(), 1);
        assert_eq!(table.get(net("192.0.2.0/24")).unwrap().reason, "b");
        assert!(table.remove(net("192.0.3.0/24")).is_none());
        assert!(table.remove(net("192.0.2.0/24")).is_some());
        assert!(table.is_empty());
        assert_eq!(table.lengths_present(), (0, 0));
    }

    #[test]
    fn a_bounded_table_pushes_out_the_soonest_to_expire_never_permanent_ones() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let mut table = PrefixTable::new();
        let detect = |s: u64| {
            PrefixEntry::new(ListKind::Block, EntrySource::Detection, format!("{s}"))
                .until(t0 + secs(s))
        };
        table.insert(
            net("10.0.0.1/32"),
            PrefixEntry::new(ListKind::Block, EntrySource::Admin, "forever"),
        );
        for i in 2..=8u64 {
            table
                .insert_bounded(net(&format!("10.0.0.{i}/32")), detect(100 + i), t0, 8)
                .unwrap();
        }
        assert_eq!(table.len(), 8);
        // Full: the next one pushes out an eighth (one), the soonest: .2.
        table
            .insert_bounded(net("10.0.0.9/32"), detect(500), t0, 8)
            .unwrap();
        assert_eq!(table.len(), 8);
        assert!(table.get(net("10.0.0.2/32")).is_none());
        assert!(table.get(net("10.0.0.1/32")).is_some());
        // Replacing an entry needs no room.
        table
            .insert_bounded(net("10.0.0.9/32"), detect(600), t0, 8)
            .unwrap();
        // A table of permanent entries refuses.
        let mut permanent = PrefixTable::new();
        permanent.insert(net("10.0.0.1/32"), block("x"));
        assert_eq!(
            permanent.insert_bounded(net("10.0.0.2/32"), detect(10), t0, 1),
            Err(Error::ListFull { max: 1 })
        );
        // Expired entries make room before live ones.
        let mut expiring = PrefixTable::new();
        expiring.insert(net("10.0.0.1/32"), detect(1));
        expiring.insert(net("10.0.0.2/32"), detect(1000));
        expiring
            .insert_bounded(net("10.0.0.3/32"), detect(1000), t0 + secs(5), 2)
            .unwrap();
        assert!(expiring.get(net("10.0.0.1/32")).is_none());
        assert_eq!(expiring.len(), 2);
    }

    #[test]
    fn records_round_trip_and_expired_ones_stay_gone() {
        let t0 = Instant::now();
        let anchor = TimeAnchor::new(t0, Duration::from_secs(1_700_000_000));
        let entry = PrefixEntry::new(ListKind::Block, EntrySource::Detection, "pregreet")
            .until(t0 + Duration::from_secs(3600));
        let record = PrefixRecord::new(net("192.0.2.7/32"), &entry, &anchor);
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(
            json,
            r#"{"net":"192.0.2.7/32","kind":"block","source":"detection","reason":"pregreet","until_unix_ms":1700003600000}"#
        );
        let back: PrefixRecord = serde_json::from_str(&json).unwrap();
        // Restarted half an hour later, on a new monotonic clock.
        let t1 = Instant::now() + Duration::from_secs(5);
        let later = TimeAnchor::new(t1, Duration::from_secs(1_700_001_800));
        let (n, e) = back.clone().into_entry(&later).unwrap();
        assert_eq!(n, net("192.0.2.7/32"));
        assert_eq!(e.until, Some(t1 + Duration::from_secs(1800)));
        // Two hours later it has run out.
        let much_later = TimeAnchor::new(t1, Duration::from_secs(1_700_007_200));
        assert!(back.into_entry(&much_later).is_none());
        // A permanent entry stays permanent.
        let forever = PrefixRecord::new(net("2001:db8::/32"), &block("file"), &anchor);
        assert!(!serde_json::to_string(&forever).unwrap().contains("until"));
        assert_eq!(forever.into_entry(&later).unwrap().1.until, None);
    }

    /// A random table over a small space, so that prefixes nest and
    /// overlap; some entries expired.
    fn arb_entries() -> impl Strategy<Value = Vec<(u32, u8, bool)>> {
        proptest::collection::vec(
            (0u32..4096, 20u8..=32, proptest::bool::weighted(0.8)),
            0..200,
        )
    }

    proptest! {
        #[test]
        fn lookup_agrees_with_a_linear_scan(entries in arb_entries(), probes in proptest::collection::vec(0u32..4096, 1..50)) {
            let t0 = Instant::now();
            let now = t0 + Duration::from_secs(10);
            let base = 0x0a00_0000u32;
            let mut table = PrefixTable::new();
            let mut naive: Vec<(IpNet, u8, bool, String)> = Vec::new();
            for (i, (offset, len, live)) in entries.iter().enumerate() {
                let n = IpNet::new(IpAddr::from((base + offset).to_be_bytes()), *len).unwrap().trunc();
                let until = if *live { t0 + Duration::from_secs(60) } else { t0 };
                let reason = format!("{i}");
                table.insert(n, PrefixEntry::new(ListKind::Block, EntrySource::File, reason.clone()).until(until));
                naive.retain(|(m, _, _, _)| *m != n);
                naive.push((n, *len, *live, reason));
            }
            prop_assert_eq!(table.len(), naive.len());
            for p in probes {
                let addr = IpAddr::from((base + p).to_be_bytes());
                let want = naive.iter()
                    .filter(|(n, _, live, _)| *live && n.contains(&addr))
                    .max_by_key(|(_, len, _, _)| *len)
                    .map(|(n, _, _, r)| (*n, r.clone()));
                let got = table.lookup(addr, now).map(|m| (m.net, m.entry.reason.clone()));
                prop_assert_eq!(got, want);
            }
        }

        #[test]
        fn ipv6_lookup_agrees_with_a_linear_scan(
            entries in proptest::collection::vec((0u128..4096, 100u8..=128), 0..100),
            probes in proptest::collection::vec(0u128..4096, 1..50),
        ) {
            let t0 = Instant::now();
            let base = 0x2001_0db8u128 << 96;
            let mut table = PrefixTable::new();
            let mut naive: Vec<IpNet> = Vec::new();
            for (offset, len) in entries {
                let n = IpNet::new(IpAddr::from((base + offset).to_be_bytes()), len).unwrap().trunc();
                table.insert(n, block("x"));
                if !naive.contains(&n) { naive.push(n); }
            }
            for p in probes {
                let addr = IpAddr::from((base + p).to_be_bytes());
                let want = naive.iter().filter(|n| n.contains(&addr)).max_by_key(|n| n.prefix_len()).copied();
                prop_assert_eq!(table.lookup(addr, t0).map(|m| m.net), want);
            }
        }
    }
}
