//! Keeping per-key tables at a fixed size under a flood of distinct keys.
//!
//! Every table here (buckets, reputation, trends) gives each entry a rank:
//! the tick at which the entry stops carrying information (a bucket
//! refilled to full, a score decayed to nothing, a sender gone quiet).
//! Entries whose rank has passed are swept for free. When a table is full
//! of live entries, the lowest ranks go first: they are the ones closest
//! to forgetting themselves. Making room is O(n), so it frees a slice of
//! the table at once (`HEADROOM`), which keeps inserts amortised O(1) even
//! when every packet brings a new key.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

/// The share of a full table freed in one go: one eighth.
pub(crate) const HEADROOM_DIVISOR: usize = 8;

/// The hash state of every per-client table: fast on small fixed keys and
/// seeded per process, so an attacker who picks addresses or sender names
/// cannot aim them at one bucket chain.
pub(crate) type Hasher = foldhash::fast::RandomState;

/// What a round of making room removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Evicted {
    /// Entries that carried no information any more.
    pub(crate) idle: usize,
    /// Live entries given up to stay within bounds.
    pub(crate) live: usize,
}

/// What making room has cost so far, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvictionStats {
    /// Full or idle entries dropped: free, they carried nothing.
    pub evicted_idle: u64,
    /// Live entries dropped because the table was at its cap: each one a
    /// key whose state (a limit, a score, a baseline) restarted early.
    /// Non-zero means the cap is too small for the traffic, or a flood is
    /// on.
    pub evicted_live: u64,
}

impl EvictionStats {
    pub(crate) fn count(&mut self, e: Evicted) {
        self.evicted_idle += e.idle as u64;
        self.evicted_live += e.live as u64;
    }
}

/// The length a full table of `max` entries is brought down to.
pub(crate) fn target_len(max: usize) -> usize {
    max - (max / HEADROOM_DIVISOR).max(1)
}

/// Makes room in a table of at most `max` entries if it is full: brings
/// it down to `target_len(max)` entries, first everything whose rank is at
/// or before `now`, then the lowest ranks.
///
/// Then it rebuilds the table with exactly the slots `max` entries need:
/// removals leave tombstones, and a table that keeps losing and gaining
/// entries would otherwise grow past that (hashbrown grows rather than
/// cleans once more than half its room is live, and `shrink_to` keeps a
/// table of the same size as it is). So a table holds `max * 8 / 7` slots
/// rounded up to a power of two, twice that at worst between two rounds.
pub(crate) fn make_room<K, V, S>(
    map: &mut HashMap<K, V, S>,
    max: usize,
    now: u64,
    rank: impl Fn(&V) -> u64,
) -> Evicted
where
    K: Eq + Hash,
    S: BuildHasher + Clone,
{
    if map.len() < max {
        return Evicted::default();
    }
    let evicted = evict(map, target_len(max), now, rank);
    compact(map, max);
    evicted
}

/// Drops entries idle at `now` (a sweep) and, when a quarter or more
/// went, gives their memory back: after a flood has passed, its slots
/// should not stay allocated. (Smaller sweeps leave tombstones, cleared by
/// the next sweep or round of making room.)
pub(crate) fn sweep<K, V, S>(
    map: &mut HashMap<K, V, S>,
    now: u64,
    rank: impl Fn(&V) -> u64,
) -> usize
where
    K: Eq + Hash,
    S: BuildHasher + Clone,
{
    let before = map.len();
    map.retain(|_, v| rank(v) > now);
    let gone = before - map.len();
    if gone > 0 && gone >= before / 4 {
        compact(map, map.len());
    }
    gone
}

/// Moves the entries into a fresh table with room for `capacity`, leaving
/// no tombstones behind.
fn compact<K, V, S>(map: &mut HashMap<K, V, S>, capacity: usize)
where
    K: Eq + Hash,
    S: BuildHasher + Clone,
{
    let mut fresh =
        HashMap::with_capacity_and_hasher(capacity.max(map.len()), map.hasher().clone());
    fresh.extend(map.drain());
    *map = fresh;
}

fn evict<K, V, S>(
    map: &mut HashMap<K, V, S>,
    target: usize,
    now: u64,
    rank: impl Fn(&V) -> u64,
) -> Evicted
where
    K: Eq + Hash,
    S: BuildHasher,
{
    let before = map.len();
    map.retain(|_, v| rank(v) > now);
    let idle = before - map.len();
    if map.len() <= target {
        return Evicted { idle, live: 0 };
    }
    let excess = map.len() - target;
    let mut ranks: Vec<u64> = map.values().map(&rank).collect();
    let (_, cutoff, _) = ranks.select_nth_unstable(excess - 1);
    let cutoff = *cutoff;
    // Below the cutoff all go; at the cutoff only as many as still needed,
    // so ties cannot empty the table.
    let below = ranks.iter().filter(|r| **r < cutoff).count();
    let mut at_cutoff = excess - below;
    map.retain(|_, v| {
        let r = rank(v);
        if r < cutoff {
            false
        } else if r == cutoff && at_cutoff > 0 {
            at_cutoff -= 1;
            false
        } else {
            true
        }
    });
    Evicted { idle, live: excess }
}

/// Heap bytes of a std `HashMap` with room for `capacity` entries of
/// `entry` bytes: hashbrown keeps a power-of-two number of slots, at most
/// 7/8 of them used, each slot with one control byte, plus one SIMD group
/// of trailing control bytes. Heap owned by the keys themselves (a sender
/// name) is not included.
pub(crate) fn table_bytes(capacity: usize, entry: usize) -> usize {
    const GROUP_WIDTH: usize = 16;
    if capacity == 0 {
        return 0;
    }
    let slots = if capacity < 7 {
        capacity + 1
    } else {
        capacity / 7 * 8
    };
    slots * (entry + 1) + GROUP_WIDTH
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_entries_go_first_then_the_lowest_ranks_exactly() {
        let mut map: HashMap<u32, u64> = (0..10).map(|k| (k, u64::from(k) * 10)).collect();
        // Ranks 0,10,20 are at or before now=20: idle.
        let evicted = evict(&mut map, 5, 20, |v| *v);
        assert_eq!(evicted, Evicted { idle: 3, live: 2 });
        let mut left: Vec<u32> = map.keys().copied().collect();
        left.sort_unstable();
        assert_eq!(left, vec![5, 6, 7, 8, 9]);
    }

    #[test]
    fn ties_at_the_cutoff_do_not_empty_the_table() {
        let mut map: HashMap<u32, u64> = (0..10).map(|k| (k, 100)).collect();
        let evicted = evict(&mut map, 7, 0, |v| *v);
        assert_eq!(evicted, Evicted { idle: 0, live: 3 });
        assert_eq!(map.len(), 7);
    }

    #[test]
    fn a_table_that_churns_keeps_its_slot_count() {
        let mut map: HashMap<u32, u64> = HashMap::new();
        for k in 0..100_000u32 {
            make_room(&mut map, 64, u64::from(k), |v| *v + 1000);
            map.insert(k, u64::from(k));
            assert!(map.len() <= 64);
            assert!(map.capacity() <= 112, "{} at key {k}", map.capacity());
        }
    }

    #[test]
    fn a_sweep_gives_memory_back() {
        let mut map: HashMap<u32, u64> = (0..10_000).map(|k| (k, 1)).collect();
        map.insert(10_000, 100);
        assert_eq!(sweep(&mut map, 50, |v| *v), 10_000);
        assert!(map.capacity() < 10, "{}", map.capacity());
    }

    #[test]
    fn target_leaves_an_eighth_free() {
        assert_eq!(target_len(800), 700);
        assert_eq!(target_len(1), 0);
        assert_eq!(target_len(7), 6);
    }
}
