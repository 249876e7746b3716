//! The allow and block lists as the daemon holds them: CIDR files plus a
//! dynamic overlay (detections, the admin API, the fleet), in one
//! immutable snapshot behind an `ArcSwap`.
//!
//! A connection's lookup loads the snapshot and asks
//! [`mxguard_policy::PrefixLists::classify`]: no lock, no allocation. A
//! change (an add, a removal, a reload of the files) is made by one writer
//! at a time under `writer`: clone the table (cheap: 64-shard
//! copy-on-write, see `mxguard_policy::prefix`), change it, record it in the
//! state store, swap. Readers never wait for a writer.
//!
//! What the policy tables do not hold (who added an entry and when) lives
//! in a side map read only by the admin API, never on the data path.
//!
//! The public facade (`ListKind` .. `ListError` and the `Shared` methods at
//! the bottom) is what the admin API and `mxguard ctl` are written against:
//! keep its signatures.
// The admin API (issue 5) calls the facade; until it lands some of it is
// used by tests only.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use mxguard_policy::{
    canonical_ip, canonical_net, parse_prefix_list, EntrySource, ListVerdict, PrefixEntry,
    PrefixLists, PrefixMatch, PrefixTable, TimeAnchor,
};
use parking_lot::Mutex;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    Allow,
    Block,
}

impl ListKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Block => "block",
        }
    }
}

impl From<ListKind> for mxguard_policy::ListKind {
    fn from(k: ListKind) -> Self {
        match k {
            ListKind::Allow => Self::Allow,
            ListKind::Block => Self::Block,
        }
    }
}

impl From<mxguard_policy::ListKind> for ListKind {
    fn from(k: mxguard_policy::ListKind) -> Self {
        match k {
            mxguard_policy::ListKind::Allow => Self::Allow,
            mxguard_policy::ListKind::Block => Self::Block,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ListEntryView {
    /// Serialised as "192.0.2.0/24".
    pub net: IpNet,
    pub kind: ListKind,
    /// "file" | "detection" | "admin" | "cluster"
    pub source: &'static str,
    pub reason: String,
    /// Who: admin token name / "cli" / gateway id / test name.
    pub added_by: Option<String>,
    pub since_unix_ms: Option<u64>,
    /// None: no expiry.
    pub until_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// None: both.
    pub kind: Option<ListKind>,
    /// Only entries whose net contains this address.
    pub contains: Option<IpAddr>,
    pub source: Option<String>,
    pub offset: usize,
    /// 0 means a default of 100; capped at 1000.
    pub limit: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ListPage {
    pub total: usize,
    pub entries: Vec<ListEntryView>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Lookup {
    pub address: IpAddr,
    /// "allowed" | "blocked" | "unlisted"
    pub verdict: &'static str,
    /// The entry that decided it (longest match).
    pub matched: Option<ListEntryView>,
}

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// -> HTTP 400
    #[error("{0}")]
    Invalid(String),
    /// -> HTTP 404
    #[error("not found")]
    NotFound,
    /// -> HTTP 503 (nothing was changed)
    #[error("state store: {0}")]
    Store(String),
}

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// Who added a dynamic entry, and when: shown by the admin API only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    pub added_by: Option<String>,
    pub since_unix_ms: u64,
}

/// A change of the dynamic overlay, as the state store and the fleet see
/// it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicRecord {
    pub net: IpNet,
    pub kind: ListKind,
    pub source: EntrySource,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_by: Option<String>,
    pub since_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_unix_ms: Option<u64>,
}

/// Where dynamic changes go besides memory: the state store (durable
/// before an admin add is acknowledged) and the fleet. Implemented by the
/// daemon's `state` and `cluster` modules; tests use none.
pub trait ListSink: Send + Sync {
    /// Records an added entry. `sync`: on disk before returning (admin);
    /// otherwise within the store's flush window (detections).
    fn added(&self, record: &DynamicRecord, sync: bool) -> Result<(), String>;
    /// Records a removal, synchronously.
    fn removed(&self, kind: ListKind, net: IpNet) -> Result<(), String>;
    /// The list files were read again: entries came and went without a
    /// record each.
    fn files_loaded(&self) {}
    /// `record` is in the lists now (`added` ran before it was): what
    /// `listed` answers from here on includes it.
    fn published(&self, _record: &DynamicRecord) {}
}

/// The lists of one daemon.
pub struct Lists {
    snapshot: ArcSwap<PrefixLists>,
    /// One writer at a time; held across the store's write so the store's
    /// order is the memory's order.
    writer: Mutex<Writer>,
}

struct Writer {
    meta: HashMap<IpNet, EntryMeta>,
    max_dynamic: usize,
    files: ListFiles,
    sinks: Vec<Arc<dyn ListSink>>,
}

/// The list files of the configuration, and the extra static allow
/// networks of `allowlist.networks`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFiles {
    pub allow: Vec<PathBuf>,
    pub block: Vec<PathBuf>,
    pub allow_networks: Vec<IpNet>,
}

impl ListFiles {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            allow: config.lists.allow_files.clone(),
            block: config.lists.block_files.clone(),
            allow_networks: config.allowlist.networks.clone(),
        }
    }

    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.allow
            .iter()
            .chain(self.block.iter())
            .map(PathBuf::as_path)
    }
}

/// Wall clock now, in the form the policy's records use.
pub fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// One reading of both clocks, for converting expiries.
pub fn anchor_now() -> TimeAnchor {
    TimeAnchor::new(Instant::now().into_std(), unix_now())
}

impl Lists {
    /// Empty lists (no files read yet) holding at most `max_dynamic`
    /// dynamic entries.
    pub fn new(max_dynamic: usize) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(PrefixLists::default()),
            writer: Mutex::new(Writer {
                meta: HashMap::new(),
                max_dynamic: max_dynamic.max(1),
                files: ListFiles::default(),
                sinks: Vec::new(),
            }),
        }
    }

    /// Where changes are recorded from now on.
    pub fn add_sink(&self, sink: Arc<dyn ListSink>) {
        self.writer.lock().sinks.push(sink);
    }

    pub fn set_max_dynamic(&self, max: usize) {
        self.writer.lock().max_dynamic = max.max(1);
    }

    /// The current snapshot, for a lookup on the data path.
    pub fn load(&self) -> arc_swap::Guard<Arc<PrefixLists>> {
        self.snapshot.load()
    }

    /// What the lists say about `ip` now: the hot path, lock-free.
    pub fn classify_kind(&self, ip: IpAddr) -> Option<ListKind> {
        let now = Instant::now().into_std();
        match self.snapshot.load().classify(ip, now) {
            ListVerdict::Allowed(_) => Some(ListKind::Allow),
            ListVerdict::Blocked(_) => Some(ListKind::Block),
            ListVerdict::Unlisted => None,
        }
    }

    /// Reads the configured files and `allowlist.networks`; swaps them in
    /// only if every file is good. The error names the file and the lines.
    pub fn load_files(&self, files: &ListFiles) -> Result<usize, ListError> {
        let table = read_files(files)?;
        let n = table.len();
        let mut w = self.writer.lock();
        w.files = files.clone();
        let next = self.snapshot.load().with_files(table);
        self.snapshot.store(Arc::new(next));
        for sink in &w.sinks {
            sink.files_loaded();
        }
        Ok(n)
    }

    /// Re-reads the files last loaded.
    pub fn reload(&self) -> Result<usize, ListError> {
        let files = self.writer.lock().files.clone();
        self.load_files(&files)
    }

    pub fn files(&self) -> ListFiles {
        self.writer.lock().files.clone()
    }

    /// Puts a restored or fleet entry into the overlay without recording
    /// it again (it came from the store or the fleet).
    pub fn restore(&self, records: impl IntoIterator<Item = DynamicRecord>) -> usize {
        let anchor = anchor_now();
        let now = anchor.instant;
        let mut w = self.writer.lock();
        let mut dynamic = self.snapshot.load().dynamic().clone();
        let mut n = 0;
        for r in records {
            let Some(entry) = record_entry(&r, &anchor) else {
                continue;
            };
            let net = canonical_net(r.net);
            if dynamic
                .insert_bounded(net, entry, now, w.max_dynamic)
                .is_ok()
            {
                w.meta.insert(
                    net,
                    EntryMeta {
                        added_by: r.added_by.clone(),
                        since_unix_ms: r.since_unix_ms,
                    },
                );
                n += 1;
            }
        }
        let next = self.snapshot.load().with_dynamic(dynamic);
        self.snapshot.store(Arc::new(next));
        n
    }

    /// Adds (or replaces) a dynamic entry. With `sync`, the sinks have it
    /// on disk before this returns, and a sink failure changes nothing.
    /// A machine's block (`Detection`, `Cluster`) never replaces an
    /// operator's entry nor shortens a longer block.
    pub fn add(
        &self,
        record: DynamicRecord,
        sync: bool,
    ) -> Result<Option<ListEntryView>, ListError> {
        let anchor = anchor_now();
        let now = anchor.instant;
        let net = canonical_net(record.net);
        let record = DynamicRecord { net, ..record };
        let entry = record_entry(&record, &anchor)
            .ok_or_else(|| ListError::Invalid("the entry has already expired".into()))?;
        let mut w = self.writer.lock();
        let current = self.snapshot.load_full();
        if !record.source.is_deliberate() {
            if let Some(old) = current.dynamic().get(net) {
                let keeps = old.is_live(now)
                    && (old.source.is_deliberate()
                        || old.kind != entry.kind
                        || match (old.until, entry.until) {
                            (None, _) => true,
                            (Some(_), None) => false,
                            (Some(a), Some(b)) => a >= b,
                        });
                if keeps {
                    return Ok(None);
                }
            }
        }
        let mut dynamic = current.dynamic().clone();
        dynamic
            .insert_bounded(net, entry.clone(), now, w.max_dynamic)
            .map_err(|e| ListError::Invalid(e.to_string()))?;
        for sink in &w.sinks {
            if let Err(e) = sink.added(&record, sync) {
                if sync {
                    return Err(ListError::Store(e));
                }
                tracing::warn!("lists: cannot record {net}: {e}");
            }
        }
        // Entries pushed out by the bound keep no metadata.
        if w.meta.len() >= w.max_dynamic {
            w.meta.retain(|n, _| dynamic.get(*n).is_some());
        }
        w.meta.insert(
            net,
            EntryMeta {
                added_by: record.added_by.clone(),
                since_unix_ms: record.since_unix_ms,
            },
        );
        self.snapshot.store(Arc::new(current.with_dynamic(dynamic)));
        for sink in &w.sinks {
            sink.published(&record);
        }
        let meta = w.meta.get(&net).cloned();
        drop(w);
        Ok(Some(view_of(net, &entry, meta.as_ref(), &anchor)))
    }

    /// Removes the dynamic entry of exactly `net` if it is of `kind`.
    pub fn remove(
        &self,
        kind: ListKind,
        net: IpNet,
        sync: bool,
    ) -> Result<ListEntryView, ListError> {
        let anchor = anchor_now();
        let net = canonical_net(net);
        let mut w = self.writer.lock();
        let current = self.snapshot.load_full();
        let Some(old) = current.dynamic().get(net).cloned() else {
            if current
                .files()
                .get(net)
                .is_some_and(|e| ListKind::from(e.kind) == kind)
            {
                return Err(ListError::Invalid(format!(
                    "{net} comes from a list file: remove it there and reload"
                )));
            }
            return Err(ListError::NotFound);
        };
        if ListKind::from(old.kind) != kind {
            return Err(ListError::NotFound);
        }
        if sync {
            for sink in &w.sinks {
                sink.removed(kind, net).map_err(ListError::Store)?;
            }
        }
        let mut dynamic = current.dynamic().clone();
        dynamic.remove(net);
        let meta = w.meta.remove(&net);
        self.snapshot.store(Arc::new(current.with_dynamic(dynamic)));
        drop(w);
        Ok(view_of(net, &old, meta.as_ref(), &anchor))
    }

    /// Forgets expired dynamic entries; returns (removed, dynamic left).
    pub fn purge(&self) -> (usize, usize) {
        let now = Instant::now().into_std();
        let mut w = self.writer.lock();
        let current = self.snapshot.load_full();
        let expired = current.dynamic().iter().any(|(_, e)| !e.is_live(now));
        if !expired {
            return (0, current.dynamic().len());
        }
        let mut dynamic = current.dynamic().clone();
        let removed = dynamic.purge(now);
        w.meta.retain(|n, _| dynamic.get(*n).is_some());
        let left = dynamic.len();
        self.snapshot.store(Arc::new(current.with_dynamic(dynamic)));
        (removed, left)
    }

    /// Every live dynamic entry as a record (the state store's snapshot).
    pub fn dynamic_records(&self) -> Vec<DynamicRecord> {
        self.dynamic_records_with(|| ()).0
    }

    /// Every live dynamic entry, and what `f` returns, both read while no
    /// writer can change the lists (the state store's compaction reads its
    /// change number this way).
    pub fn dynamic_records_with<T>(&self, f: impl FnOnce() -> T) -> (Vec<DynamicRecord>, T) {
        let anchor = anchor_now();
        let w = self.writer.lock();
        let extra = f();
        let current = self.snapshot.load_full();
        let records = current
            .dynamic()
            .iter()
            .filter(|(_, e)| e.is_live(anchor.instant))
            .map(|(net, e)| {
                let meta = w.meta.get(&net);
                DynamicRecord {
                    net,
                    kind: e.kind.into(),
                    source: e.source,
                    reason: e.reason.clone(),
                    added_by: meta.and_then(|m| m.added_by.clone()),
                    since_unix_ms: meta.map_or(anchor.unix_ms(), |m| m.since_unix_ms),
                    until_unix_ms: e.until.map(|u| anchor.to_unix_ms(u)),
                }
            })
            .collect();
        (records, extra)
    }

    /// Runs `f` while no writer can change the lists (the state store's
    /// compaction: the snapshot it writes and the log it rotates agree).
    pub fn with_writer_held<T>(&self, f: impl FnOnce() -> T) -> T {
        let _w = self.writer.lock();
        f()
    }

    pub fn dynamic_len(&self) -> usize {
        self.snapshot.load().dynamic().len()
    }

    pub fn file_len(&self) -> usize {
        self.snapshot.load().files().len()
    }

    fn view(&self, m: &PrefixMatch<'_>, anchor: &TimeAnchor) -> ListEntryView {
        let meta = if m.entry.source == EntrySource::File {
            None
        } else {
            self.writer.lock().meta.get(&m.net).cloned()
        };
        view_of(m.net, m.entry, meta.as_ref(), anchor)
    }

    fn entries(&self, q: &ListQuery) -> ListPage {
        let anchor = anchor_now();
        let now = anchor.instant;
        let current = self.snapshot.load_full();
        let meta = self.writer.lock().meta.clone();
        let contains = q.contains.map(canonical_ip);
        let mut all: Vec<ListEntryView> = current
            .dynamic()
            .iter()
            .chain(current.files().iter())
            .filter(|(net, e)| {
                e.is_live(now)
                    && q.kind.is_none_or(|k| ListKind::from(e.kind) == k)
                    && q.source.as_deref().is_none_or(|s| e.source.as_str() == s)
                    && contains.is_none_or(|ip| net.contains(&ip))
            })
            .map(|(net, e)| {
                let m = (e.source != EntrySource::File)
                    .then(|| meta.get(&net))
                    .flatten();
                view_of(net, e, m, &anchor)
            })
            .collect();
        all.sort_by(|a, b| {
            (a.net.addr(), a.net.prefix_len(), a.source).cmp(&(
                b.net.addr(),
                b.net.prefix_len(),
                b.source,
            ))
        });
        let limit = match q.limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let total = all.len();
        let entries = all.into_iter().skip(q.offset).take(limit).collect();
        ListPage { total, entries }
    }

    fn lookup(&self, ip: IpAddr) -> Lookup {
        let anchor = anchor_now();
        let current = self.snapshot.load_full();
        let (verdict, matched) = match current.classify(ip, anchor.instant) {
            ListVerdict::Allowed(m) => ("allowed", Some(self.view(&m, &anchor))),
            ListVerdict::Blocked(m) => ("blocked", Some(self.view(&m, &anchor))),
            ListVerdict::Unlisted => ("unlisted", None),
        };
        Lookup {
            address: ip,
            verdict,
            matched,
        }
    }
}

fn record_entry(r: &DynamicRecord, anchor: &TimeAnchor) -> Option<PrefixEntry> {
    let mut entry = PrefixEntry::new(r.kind.into(), r.source, r.reason.clone());
    if let Some(ms) = r.until_unix_ms {
        entry = entry.until(anchor.future_instant(ms)?);
    }
    entry.is_live(anchor.instant).then_some(entry)
}

fn view_of(
    net: IpNet,
    e: &PrefixEntry,
    meta: Option<&EntryMeta>,
    anchor: &TimeAnchor,
) -> ListEntryView {
    ListEntryView {
        net,
        kind: e.kind.into(),
        source: e.source.as_str(),
        reason: e.reason.clone(),
        added_by: meta.and_then(|m| m.added_by.clone()),
        since_unix_ms: meta.map(|m| m.since_unix_ms),
        until_unix_ms: e.until.map(|u| anchor.to_unix_ms(u)),
    }
}

/// Parses every file; the first bad one is the error (file, lines).
pub fn read_files(files: &ListFiles) -> Result<PrefixTable, ListError> {
    let mut table = PrefixTable::new();
    if !files.allow_networks.is_empty() {
        let entry = Arc::new(PrefixEntry::new(
            mxguard_policy::ListKind::Allow,
            EntrySource::File,
            "allowlist.networks",
        ));
        for net in &files.allow_networks {
            table.insert(*net, Arc::clone(&entry));
        }
    }
    let kinds = files
        .allow
        .iter()
        .map(|p| (p, mxguard_policy::ListKind::Allow))
        .chain(
            files
                .block
                .iter()
                .map(|p| (p, mxguard_policy::ListKind::Block)),
        );
    for (path, kind) in kinds {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ListError::Invalid(format!("{}: cannot read: {e}", path.display())))?;
        let name = path.display().to_string();
        let entries = parse_prefix_list(&text, kind, EntrySource::File, &name)
            .map_err(|e| ListError::Invalid(format!("{name}: {e}")))?;
        // A block and an allow of the same prefix in two files: the allow
        // is kept (allow wins, as in `classify`).
        for (net, entry) in entries {
            let keep_old = table
                .get(net)
                .is_some_and(|old| old.kind == mxguard_policy::ListKind::Allow);
            if !keep_old {
                table.insert(net, entry);
            }
        }
    }
    Ok(table)
}

impl crate::server::Shared {
    pub fn list_entries(&self, q: &ListQuery) -> ListPage {
        self.lists.entries(q)
    }

    /// Durable before it returns (persisted, and published to the fleet when clustered).
    pub fn add_entry(
        &self,
        kind: ListKind,
        net: IpNet,
        ttl: Option<Duration>,
        reason: String,
        added_by: String,
    ) -> Result<ListEntryView, ListError> {
        if ttl.is_some_and(|t| t.is_zero()) {
            return Err(ListError::Invalid("ttl must be more than 0s".into()));
        }
        if reason.len() > 1024 {
            return Err(ListError::Invalid("reason: at most 1024 bytes".into()));
        }
        let now = unix_now();
        let until_unix_ms = ttl.map(|t| millis(now.saturating_add(t)));
        let record = DynamicRecord {
            net,
            kind,
            source: EntrySource::Admin,
            reason,
            added_by: Some(added_by),
            since_unix_ms: millis(now),
            until_unix_ms,
        };
        let view = self
            .lists
            .add(record, true)?
            .ok_or_else(|| ListError::Invalid("not added".into()))?;
        self.lists_changed();
        Ok(view)
    }

    pub fn remove_entry(&self, kind: ListKind, net: IpNet) -> Result<ListEntryView, ListError> {
        let view = self.lists.remove(kind, net, true)?;
        self.lists_changed();
        Ok(view)
    }

    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        self.lists.lookup(ip)
    }

    /// Re-reads the list files (also on SIGHUP and when the files change). Err keeps the old lists.
    pub fn reload_lists(&self) -> Result<(), ListError> {
        match self.lists.reload() {
            Ok(n) => {
                self.admission
                    .metrics
                    .list_reloads
                    .with_label_values(&["ok"])
                    .inc();
                tracing::info!("lists: {n} entries from the list files");
                self.lists_changed();
                Ok(())
            }
            Err(e) => {
                self.admission
                    .metrics
                    .list_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!("lists: reload failed, keeping the old lists: {e}");
                Err(e)
            }
        }
    }
}

pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        net: &str,
        kind: ListKind,
        source: EntrySource,
        ttl_ms: Option<u64>,
    ) -> DynamicRecord {
        let now = millis(unix_now());
        DynamicRecord {
            net: net.parse().unwrap(),
            kind,
            source,
            reason: "test".into(),
            added_by: Some("unit".into()),
            since_unix_ms: now,
            until_unix_ms: ttl_ms.map(|t| now + t),
        }
    }

    #[test]
    fn a_detection_never_replaces_an_admin_allow_nor_shortens_a_block() {
        let lists = Lists::new(100);
        lists
            .add(
                record("192.0.2.7/32", ListKind::Allow, EntrySource::Admin, None),
                true,
            )
            .unwrap();
        let r = lists
            .add(
                record(
                    "192.0.2.7/32",
                    ListKind::Block,
                    EntrySource::Detection,
                    Some(60_000),
                ),
                false,
            )
            .unwrap();
        assert!(r.is_none());
        assert_eq!(
            lists.classify_kind("192.0.2.7".parse().unwrap()),
            Some(ListKind::Allow)
        );
        lists
            .add(
                record(
                    "192.0.2.8/32",
                    ListKind::Block,
                    EntrySource::Detection,
                    Some(60_000),
                ),
                false,
            )
            .unwrap();
        let shorter = lists
            .add(
                record(
                    "192.0.2.8/32",
                    ListKind::Block,
                    EntrySource::Detection,
                    Some(1_000),
                ),
                false,
            )
            .unwrap();
        assert!(shorter.is_none());
        assert_eq!(
            lists.classify_kind("192.0.2.8".parse().unwrap()),
            Some(ListKind::Block)
        );
    }

    #[test]
    fn remove_takes_only_the_kind_asked_for() {
        let lists = Lists::new(100);
        lists
            .add(
                record("198.51.100.0/24", ListKind::Block, EntrySource::Admin, None),
                true,
            )
            .unwrap();
        let net: IpNet = "198.51.100.0/24".parse().unwrap();
        assert!(matches!(
            lists.remove(ListKind::Allow, net, true),
            Err(ListError::NotFound)
        ));
        let view = lists.remove(ListKind::Block, net, true).unwrap();
        assert_eq!(view.source, "admin");
        assert_eq!(view.added_by.as_deref(), Some("unit"));
        assert_eq!(lists.classify_kind("198.51.100.9".parse().unwrap()), None);
    }

    #[test]
    fn a_bad_file_keeps_the_old_lists_and_names_file_and_line() {
        let dir = std::env::temp_dir().join(format!("mxguard-lists-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("block.txt");
        std::fs::write(&path, "192.0.2.0/24\n").unwrap();
        let lists = Lists::new(100);
        let files = ListFiles {
            block: vec![path.clone()],
            ..ListFiles::default()
        };
        assert_eq!(lists.load_files(&files).unwrap(), 1);
        std::fs::write(&path, "192.0.2.0/24\n10.0.0.0/33\n").unwrap();
        let e = lists.reload().unwrap_err().to_string();
        assert!(e.contains("block.txt") && e.contains("line 2"), "{e}");
        assert_eq!(
            lists.classify_kind("192.0.2.1".parse().unwrap()),
            Some(ListKind::Block)
        );
        let page = lists.entries(&ListQuery {
            contains: Some("192.0.2.1".parse().unwrap()),
            ..ListQuery::default()
        });
        assert_eq!(page.total, 1);
        assert_eq!(page.entries[0].source, "file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn expired_entries_are_not_listed_and_purge_drops_them() {
        let lists = Lists::new(100);
        let mut r = record(
            "203.0.113.5/32",
            ListKind::Block,
            EntrySource::Detection,
            Some(60_000),
        );
        lists.add(r.clone(), false).unwrap();
        r.net = "203.0.113.6/32".parse().unwrap();
        r.until_unix_ms = Some(millis(unix_now()) + 1);
        let _ = lists.add(r, false);
        std::thread::sleep(Duration::from_millis(5));
        let page = lists.entries(&ListQuery::default());
        assert_eq!(page.total, 1);
        let (_, left) = lists.purge();
        assert_eq!(left, 1);
        let l = lists.lookup("203.0.113.5".parse().unwrap());
        assert_eq!(l.verdict, "blocked");
        assert_eq!(l.matched.unwrap().source, "detection");
    }
}
