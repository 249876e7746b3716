//! The allow and block lists as the daemon consults them: static entries
//! from files and a dynamic overlay, combined into one answer.
//!
//! The daemon keeps a `PrefixLists` in an `ArcSwap`. A reload builds a new
//! file table and swaps in `with_files`; a detection, an admin command or
//! a fleet message clones the dynamic table (cheap, see `prefix`), changes
//! it and swaps in `with_dynamic`. Lookups take no lock.
//!
//! # Which entry decides
//!
//! Allow wins, because refusing a partner loses mail and a block is only a
//! guess about a stranger. The one exception is an operator's deliberate
//! carve-out: a block from a file or the admin that is *more specific*
//! than the allow (`allow 192.0.2.0/24`, `block 192.0.2.66`). A block
//! that a machine concluded (a detection here or on another gateway)
//! never overrides an allow: an allowlisted client skips the tests, and a
//! fleet-mate that did not allowlist it must not undo this gateway's
//! choice.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::prefix::{ListKind, PrefixMatch, PrefixTable};

/// What the lists say about a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListVerdict<'a> {
    /// Skip every test and limit.
    Allowed(PrefixMatch<'a>),
    /// Refuse before the MTA is touched.
    Blocked(PrefixMatch<'a>),
    Unlisted,
}

/// The file entries and the dynamic overlay, each an immutable snapshot.
#[derive(Debug, Clone, Default)]
pub struct PrefixLists {
    files: Arc<PrefixTable>,
    dynamic: Arc<PrefixTable>,
}

/// The deciding candidates found in one or more tables.
#[derive(Default)]
struct Candidates<'a> {
    allow: Option<PrefixMatch<'a>>,
    block: Option<PrefixMatch<'a>>,
    deliberate_block: Option<PrefixMatch<'a>>,
}

impl<'a> Candidates<'a> {
    fn scan(&mut self, table: &'a PrefixTable, ip: IpAddr, now: Instant) {
        for m in table.matches(ip, now) {
            let slot = match m.entry.kind {
                ListKind::Allow => &mut self.allow,
                ListKind::Block => &mut self.block,
            };
            keep_longer(slot, m);
            if m.entry.kind == ListKind::Block && m.entry.source.is_deliberate() {
                keep_longer(&mut self.deliberate_block, m);
            }
            if self.allow.is_some() && self.deliberate_block.is_some() {
                // Shorter matches of this table can change nothing.
                break;
            }
        }
    }

    fn verdict(self) -> ListVerdict<'a> {
        match (self.allow, self.block) {
            (None, None) => ListVerdict::Unlisted,
            (None, Some(block)) => ListVerdict::Blocked(block),
            (Some(allow), _) => match self.deliberate_block {
                Some(block) if block.net.prefix_len() > allow.net.prefix_len() => {
                    ListVerdict::Blocked(block)
                }
                _ => ListVerdict::Allowed(allow),
            },
        }
    }
}

/// Keeps the longer of two matches; on a tie the one already there (the
/// dynamic table is scanned first, so its fresher entry is reported).
fn keep_longer<'a>(slot: &mut Option<PrefixMatch<'a>>, m: PrefixMatch<'a>) {
    let longer = match slot {
        None => true,
        Some(old) => old.net.prefix_len() < m.net.prefix_len(),
    };
    if longer {
        *slot = Some(m);
    }
}

impl PrefixLists {
    pub fn new(files: PrefixTable, dynamic: PrefixTable) -> Self {
        Self {
            files: Arc::new(files),
            dynamic: Arc::new(dynamic),
        }
    }

    pub fn files(&self) -> &PrefixTable {
        &self.files
    }

    pub fn dynamic(&self) -> &PrefixTable {
        &self.dynamic
    }

    /// The same dynamic overlay over new file entries (a reload).
    pub fn with_files(&self, files: PrefixTable) -> Self {
        Self {
            files: Arc::new(files),
            dynamic: Arc::clone(&self.dynamic),
        }
    }

    /// The same file entries under a new dynamic overlay.
    pub fn with_dynamic(&self, dynamic: PrefixTable) -> Self {
        Self {
            files: Arc::clone(&self.files),
            dynamic: Arc::new(dynamic),
        }
    }

    /// What the lists say about `ip` at `now` (see the module doc for the
    /// rule).
    pub fn classify(&self, ip: IpAddr, now: Instant) -> ListVerdict<'_> {
        let mut c = Candidates::default();
        c.scan(&self.dynamic, ip, now);
        c.scan(&self.files, ip, now);
        c.verdict()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix::{EntrySource, PrefixEntry};
    use std::time::Duration;

    fn entry(kind: ListKind, source: EntrySource) -> PrefixEntry {
        PrefixEntry::new(kind, source, format!("{kind:?} {}", source.as_str()))
    }

    fn verdict(lists: &PrefixLists, addr: &str, now: Instant) -> String {
        match lists.classify(addr.parse().unwrap(), now) {
            ListVerdict::Allowed(m) => format!("allowed by {} ({})", m.net, m.entry.reason),
            ListVerdict::Blocked(m) => format!("blocked by {} ({})", m.net, m.entry.reason),
            ListVerdict::Unlisted => "unlisted".into(),
        }
    }

    fn lists() -> PrefixLists {
        use EntrySource::*;
        use ListKind::*;
        let files: PrefixTable = [
            ("192.0.2.0/24", entry(Allow, File)),
            ("192.0.2.66/32", entry(Block, File)),
            ("198.51.100.0/24", entry(Block, File)),
            ("10.0.0.0/8", entry(Allow, File)),
        ]
        .into_iter()
        .map(|(n, e)| (n.parse().unwrap(), e))
        .collect();
        PrefixLists::new(files, PrefixTable::new())
    }

    #[test]
    fn a_deliberate_block_inside_an_allowed_range_blocks() {
        let t0 = Instant::now();
        let l = lists();
        assert_eq!(
            verdict(&l, "192.0.2.1", t0),
            "allowed by 192.0.2.0/24 (Allow file)"
        );
        assert_eq!(
            verdict(&l, "192.0.2.66", t0),
            "blocked by 192.0.2.66/32 (Block file)"
        );
        assert_eq!(
            verdict(&l, "198.51.100.9", t0),
            "blocked by 198.51.100.0/24 (Block file)"
        );
        assert_eq!(verdict(&l, "203.0.113.1", t0), "unlisted");
    }

    #[test]
    fn a_detection_or_a_fleet_block_never_overrides_an_allow() {
        let t0 = Instant::now();
        let l = lists();
        let mut dynamic = l.dynamic().clone();
        dynamic.insert(
            "10.1.2.3/32".parse().unwrap(),
            entry(ListKind::Block, EntrySource::Detection),
        );
        dynamic.insert(
            "10.9.0.0/16".parse().unwrap(),
            entry(ListKind::Block, EntrySource::Cluster),
        );
        dynamic.insert(
            "203.0.113.5/32".parse().unwrap(),
            entry(ListKind::Block, EntrySource::Detection),
        );
        let l = l.with_dynamic(dynamic);
        assert_eq!(
            verdict(&l, "10.1.2.3", t0),
            "allowed by 10.0.0.0/8 (Allow file)"
        );
        assert_eq!(
            verdict(&l, "10.9.1.1", t0),
            "allowed by 10.0.0.0/8 (Allow file)"
        );
        assert_eq!(
            verdict(&l, "203.0.113.5", t0),
            "blocked by 203.0.113.5/32 (Block detection)"
        );
    }

    #[test]
    fn an_admin_block_carves_out_and_an_admin_allow_lifts_a_block_until_it_expires() {
        let t0 = Instant::now();
        let l = lists();
        let mut dynamic = l.dynamic().clone();
        dynamic.insert(
            "10.1.0.0/16".parse().unwrap(),
            entry(ListKind::Block, EntrySource::Admin),
        );
        // A false positive lifted for an hour.
        dynamic.insert(
            "198.51.100.9/32".parse().unwrap(),
            entry(ListKind::Allow, EntrySource::Admin).until(t0 + Duration::from_secs(3600)),
        );
        let l = l.with_dynamic(dynamic);
        assert_eq!(
            verdict(&l, "10.1.2.3", t0),
            "blocked by 10.1.0.0/16 (Block admin)"
        );
        assert_eq!(
            verdict(&l, "198.51.100.9", t0),
            "allowed by 198.51.100.9/32 (Allow admin)"
        );
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(
            verdict(&l, "198.51.100.9", later),
            "blocked by 198.51.100.0/24 (Block file)"
        );
    }

    #[test]
    fn at_equal_length_allow_wins_and_a_reload_keeps_the_overlay() {
        let t0 = Instant::now();
        let l = lists();
        let mut dynamic = l.dynamic().clone();
        dynamic.insert(
            "192.0.2.0/24".parse().unwrap(),
            entry(ListKind::Block, EntrySource::Admin),
        );
        dynamic.insert(
            "203.0.113.0/24".parse().unwrap(),
            entry(ListKind::Block, EntrySource::Detection),
        );
        let l = l.with_dynamic(dynamic);
        assert_eq!(
            verdict(&l, "192.0.2.1", t0),
            "allowed by 192.0.2.0/24 (Allow file)"
        );
        let reloaded = l.with_files(PrefixTable::new());
        assert_eq!(
            verdict(&reloaded, "192.0.2.1", t0),
            "blocked by 192.0.2.0/24 (Block admin)"
        );
        assert_eq!(
            verdict(&reloaded, "203.0.113.1", t0),
            "blocked by 203.0.113.0/24 (Block detection)"
        );
        assert!(std::ptr::eq(reloaded.dynamic(), l.dynamic()));
    }
}
