//! The state store: dynamic list entries, reputation scores and sender
//! trends that survive a restart and a crash (`kill -9`).
//!
//! # Layout of `[state] dir`
//!
//! ```text
//! lists.log        append-only, one JSON line per change, numbered
//! lists.log.1      the log as it was when a compaction began (only
//!                  until that compaction's lists.json is on disk)
//! lists.json       snapshot of the dynamic entries up to a number
//! reputation.json  snapshot of the scores
//! trends.json      snapshot of the sender trends
//! ```
//!
//! # Why a log and snapshots, not an embedded database
//!
//! The data is small (entries, scores and baselines: tens of bytes each),
//! written in two patterns: single list changes that must be durable
//! before an admin gets an answer, and whole tables that change
//! constantly and only need to be recent. A log with `fdatasync` is the
//! cheapest durable single write there is (one sequential append, one
//! flush), and a snapshot written to a temporary file, fsynced and
//! renamed is atomic on every Linux filesystem. Both are a few dozen
//! lines with no dependency, readable with `jq`, and their crash
//! behaviour is easy to state; an embedded B-tree (redb) would buy
//! transactions we do not need at the price of a file format nobody can
//! read by hand.
//!
//! # Durability
//!
//! - An admin add or removal is appended and `fdatasync`ed before the
//!   API answers; if that fails, nothing is changed and the API says 503.
//! - A detection's block is appended at once and flushed within
//!   `flush_interval` (1 s by default): a crash loses at most that window.
//! - Reputation and trends are snapshotted every `snapshot_interval`
//!   (30 s by default) and at a clean stop: a crash loses at most that
//!   window of score and volume changes.
//! - The log is compacted at each snapshot: entries up to a number go into
//!   `lists.json`, the log keeps what came after. A crash at any point
//!   leaves a snapshot and a log that together hold every change.
//! - A torn last line (a crash mid-write) is skipped with a warning.
//!
//! # Compaction without stopping the appends
//!
//! Detections are appended from the session threads, which must never wait
//! for a disk. So a compaction does not rewrite the log under its lock: with
//! the lists held still (the entries it snapshots and the log agree), it
//! *seals* the log — links it to `lists.log.1` and renames a fresh empty
//! file over `lists.log`, no fsync — and lets go; appends go on into the
//! fresh file while the snapshots are written and fsynced, and the sealed
//! log, all of whose lines the new `lists.json` holds, is removed after.
//! A start reads `lists.json`, then `lists.log.1` if it is there, then
//! `lists.log`, applying each change number once. A compaction that fails
//! leaves `lists.log.1` for the next one, which then does not seal (the
//! log grows until it succeeds).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use mxguard_policy::{canonical_net, ReputationRecord, TrendRecord};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::admission::AdmissionMetrics;
use crate::lists::{DynamicRecord, ListKind, ListSink};

const LOG: &str = "lists.log";
/// The log a compaction sealed: removed once its snapshot is on disk.
const SEALED: &str = "lists.log.1";
/// The fresh log, until it is renamed over `LOG`.
const NEXT: &str = "lists.log.next";
const LISTS: &str = "lists.json";
const LOCK: &str = "lock";
const REPUTATION: &str = "reputation.json";
const TRENDS: &str = "trends.json";

/// One line of the list log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum LogLine {
    Add {
        seq: u64,
        #[serde(flatten)]
        record: DynamicRecord,
    },
    Remove {
        seq: u64,
        kind: ListKind,
        net: IpNet,
    },
}

impl LogLine {
    fn seq(&self) -> u64 {
        match self {
            Self::Add { seq, .. } | Self::Remove { seq, .. } => *seq,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct ListsSnapshot {
    /// Every log line up to this number is in `entries`.
    seq: u64,
    entries: Vec<DynamicRecord>,
}

/// What the store held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub entries: Vec<DynamicRecord>,
    pub reputation: Vec<ReputationRecord>,
    pub trends: Vec<TrendRecord>,
}

struct Log {
    file: File,
    seq: u64,
    /// Appended but not yet flushed to disk.
    dirty: bool,
    /// `lists.log.1` is there (a compaction sealed the log and has not
    /// yet removed it).
    sealed: bool,
    /// Logs sealed so far: a fresh `lists.log` is durable only once the
    /// directory is synced, which `dir_synced` (the generation last
    /// synced) says.
    generation: u64,
    dir_synced: u64,
}

/// The open store.
pub struct StateStore {
    dir: PathBuf,
    log: Mutex<Log>,
    metrics: AdmissionMetrics,
    /// An exclusive lock on `dir/lock` for as long as the store is open:
    /// two guards writing one directory would clobber each other's
    /// snapshots (seen: an empty `lists.json` that the next start refused).
    _lock: File,
    /// One compaction at a time (the periodic one, the one at a stop).
    compacting: Mutex<()>,
    /// Runs while a compaction writes its snapshots (tests: a slow disk).
    #[cfg(test)]
    while_writing: Mutex<Option<Box<dyn FnMut() + Send>>>,
}

/// Takes the directory's lock, or says who holds it.
fn lock_dir(dir: &Path) -> Result<File, String> {
    let path = dir.join(LOCK);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            // Who holds it, for the next one to be told.
            let _ = file.set_len(0);
            let _ = writeln!(file, "{}", std::process::id());
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            Err(format!(
                "{} is in use by another mxguard (pid {}): each guard needs a state.dir of its own",
                dir.display(),
                holder.trim()
            ))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(format!("{}: {e}", path.display())),
    }
}

impl StateStore {
    /// Opens (creating) `dir` and reads what it holds.
    pub fn open(dir: &Path, metrics: AdmissionMetrics) -> Result<(Arc<Self>, Loaded), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let lock = lock_dir(dir)?;
        let snapshot: ListsSnapshot = read_json(&dir.join(LISTS))?.unwrap_or(ListsSnapshot {
            seq: 0,
            entries: Vec::new(),
        });
        let mut entries: HashMap<IpNet, DynamicRecord> = snapshot
            .entries
            .into_iter()
            .map(|r| (canonical_net(r.net), r))
            .collect();
        let mut seq = snapshot.seq;
        let log_path = dir.join(LOG);
        let sealed_path = dir.join(SEALED);
        let sealed = sealed_path.exists();
        // The sealed log, if a compaction did not finish, then the log:
        // each change once (a crash while sealing can leave both names on
        // one file), none the snapshot already holds.
        let mut lines = read_log(&sealed_path)?;
        lines.extend(read_log(&log_path)?);
        for line in lines {
            if line.seq() <= seq {
                continue;
            }
            seq = line.seq();
            match line {
                LogLine::Add { record, .. } => {
                    entries.insert(canonical_net(record.net), record);
                }
                LogLine::Remove { kind, net, .. } => {
                    let net = canonical_net(net);
                    if entries.get(&net).is_some_and(|r| r.kind == kind) {
                        entries.remove(&net);
                    }
                }
            }
        }
        let reputation = read_json(&dir.join(REPUTATION))?.unwrap_or_default();
        let trends = read_json(&dir.join(TRENDS))?.unwrap_or_default();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let store = Arc::new(Self {
            dir: dir.to_owned(),
            log: Mutex::new(Log {
                file,
                seq,
                dirty: false,
                sealed,
                generation: 0,
                dir_synced: 0,
            }),
            metrics,
            _lock: lock,
            compacting: Mutex::new(()),
            #[cfg(test)]
            while_writing: Mutex::new(None),
        });
        Ok((
            store,
            Loaded {
                entries: entries.into_values().collect(),
                reputation,
                trends,
            },
        ))
    }

    fn append(&self, line: impl FnOnce(u64) -> LogLine, sync: bool) -> Result<(), String> {
        let mut log = self.log.lock();
        let seq = log.seq + 1;
        let mut text = serde_json::to_vec(&line(seq)).map_err(|e| e.to_string())?;
        text.push(b'\n');
        let written =
            log.file.write_all(&text).and_then(
                |()| {
                    if sync {
                        log.file.sync_data()
                    } else {
                        Ok(())
                    }
                },
            );
        if let Err(e) = written {
            self.metrics.state_errors.inc();
            return Err(format!("{}: {e}", self.dir.join(LOG).display()));
        }
        // A log sealed a moment ago: its fresh file's name is durable only
        // with the directory (rare: once per compaction at most).
        if sync && log.dir_synced < log.generation {
            if let Err(e) = sync_dir(&self.dir) {
                self.metrics.state_errors.inc();
                return Err(e);
            }
            log.dir_synced = log.generation;
        }
        log.seq = seq;
        if sync {
            log.dirty = false;
            self.metrics.state_writes.with_label_values(&["sync"]).inc();
        } else {
            log.dirty = true;
        }
        Ok(())
    }

    /// Flushes appended detections to disk (the flush task, every
    /// `flush_interval`).
    ///
    /// The fsync runs without the log's lock: detections are appended from
    /// the session threads, which must not wait for a disk (a slow fsync
    /// held under the lock stalled every session of a thread that made a
    /// detection meanwhile). Lines appended during the fsync mark the log
    /// dirty again and go with the next flush.
    pub fn flush(&self) {
        let (file, generation) = {
            let mut log = self.log.lock();
            if !log.dirty {
                return;
            }
            let unsynced = (log.dir_synced < log.generation).then_some(log.generation);
            match log.file.try_clone() {
                Ok(file) => {
                    log.dirty = false;
                    (file, unsynced)
                }
                Err(e) => {
                    self.metrics.state_errors.inc();
                    tracing::error!("state: cannot flush {}: {e}", self.dir.join(LOG).display());
                    return;
                }
            }
        };
        let synced = file.sync_data().map_err(|e| e.to_string()).and_then(|()| {
            let Some(generation) = generation else {
                return Ok(());
            };
            sync_dir(&self.dir)?;
            let mut log = self.log.lock();
            log.dir_synced = log.dir_synced.max(generation);
            Ok(())
        });
        match synced {
            Ok(()) => {
                self.metrics
                    .state_writes
                    .with_label_values(&["flush"])
                    .inc();
            }
            Err(e) => {
                self.log.lock().dirty = true;
                self.metrics.state_errors.inc();
                tracing::error!("state: cannot flush {}: {e}", self.dir.join(LOG).display());
            }
        }
    }

    /// Starts a compaction (waiting for one under way): seal the log with
    /// the lists held still ([`Compaction::seal`]), then write the
    /// snapshots ([`Compaction::write`]).
    pub fn compaction(&self) -> Compaction<'_> {
        Compaction {
            store: self,
            _one: self.compacting.lock(),
            sealed_file: None,
        }
    }

    /// Makes a fresh, empty `lists.log`, the old one staying as
    /// `lists.log.1`: a create, a link and a rename, no fsync (called under
    /// the log's lock). Every step before the rename is undone on failure,
    /// so the log goes on as it was; a crash in between leaves both names
    /// on one file, which a start reads once.
    fn seal(&self, log: &mut Log) -> Result<File, String> {
        let at = |name: &str| self.dir.join(name);
        let err = |name: &str, e: std::io::Error| format!("{}: {e}", at(name).display());
        match std::fs::remove_file(at(NEXT)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(NEXT, e)),
        }
        let fresh = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(at(NEXT))
            .map_err(|e| err(NEXT, e))?;
        if let Err(e) = std::fs::hard_link(at(LOG), at(SEALED)) {
            let _ = std::fs::remove_file(at(NEXT));
            return Err(err(SEALED, e));
        }
        if let Err(e) = std::fs::rename(at(NEXT), at(LOG)) {
            let _ = std::fs::remove_file(at(SEALED));
            let _ = std::fs::remove_file(at(NEXT));
            return Err(err(LOG, e));
        }
        log.sealed = true;
        log.generation += 1;
        log.dirty = false;
        Ok(std::mem::replace(&mut log.file, fresh))
    }
}

/// One compaction of the state store, from [`StateStore::compaction`].
pub struct Compaction<'a> {
    store: &'a StateStore,
    _one: parking_lot::MutexGuard<'a, ()>,
    /// The log this compaction sealed: synced before the snapshot (its
    /// last detections may not have been flushed yet).
    sealed_file: Option<File>,
}

impl Compaction<'_> {
    /// Seals the log and returns the last change number: to be called
    /// while the lists are held still, so that every line of the sealed
    /// log is in the entries given to [`Compaction::write`]. Quick: the
    /// log's lock is held for a create, a link and a rename, no fsync.
    pub fn seal(&mut self) -> u64 {
        let store = self.store;
        let mut log = store.log.lock();
        // A sealed log that is still there (a compaction that failed, a
        // crash) holds only changes the snapshot about to be written holds
        // too: it is removed after it, and the log is sealed next time.
        if !log.sealed {
            match store.seal(&mut log) {
                Ok(old) => self.sealed_file = Some(old),
                Err(e) => {
                    store.metrics.state_errors.inc();
                    tracing::warn!("state: cannot seal the log for compaction: {e}");
                }
            }
        }
        log.seq
    }

    /// Writes the snapshots (`entries` hold every change up to `seq`),
    /// then removes the sealed log. Appends go on meanwhile.
    pub fn write(
        mut self,
        entries: Vec<DynamicRecord>,
        seq: u64,
        reputation: &[ReputationRecord],
        trends: &[TrendRecord],
    ) -> Result<(), String> {
        let store = self.store;
        let result = self.write_files(entries, seq, reputation, trends);
        match &result {
            Ok(()) => store
                .metrics
                .state_writes
                .with_label_values(&["snapshot"])
                .inc(),
            Err(_) => store.metrics.state_errors.inc(),
        }
        result
    }

    fn write_files(
        &mut self,
        entries: Vec<DynamicRecord>,
        seq: u64,
        reputation: &[ReputationRecord],
        trends: &[TrendRecord],
    ) -> Result<(), String> {
        let store = self.store;
        let dir = &store.dir;
        if let Some(sealed) = self.sealed_file.take() {
            sealed
                .sync_data()
                .map_err(|e| format!("{}: {e}", dir.join(SEALED).display()))?;
        }
        let generation = store.log.lock().generation;
        sync_dir(dir)?;
        {
            let mut log = store.log.lock();
            log.dir_synced = log.dir_synced.max(generation);
        }
        #[cfg(test)]
        if let Some(hook) = store.while_writing.lock().as_mut() {
            hook();
        }
        write_atomic(
            &dir.join(REPUTATION),
            &serde_json::to_vec(reputation).map_err(|e| e.to_string())?,
        )?;
        write_atomic(
            &dir.join(TRENDS),
            &serde_json::to_vec(trends).map_err(|e| e.to_string())?,
        )?;
        let snap = ListsSnapshot { seq, entries };
        write_atomic(
            &dir.join(LISTS),
            &serde_json::to_vec(&snap).map_err(|e| e.to_string())?,
        )?;
        if store.log.lock().sealed {
            match std::fs::remove_file(dir.join(SEALED)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", dir.join(SEALED).display())),
            }
            sync_dir(dir)?;
            store.log.lock().sealed = false;
        }
        Ok(())
    }
}

impl ListSink for StateStore {
    fn added(&self, record: &DynamicRecord, sync: bool) -> Result<(), String> {
        // Fleet entries are Redis's to keep: a gateway that restarts reads
        // them back from there.
        if record.source == mxguard_policy::EntrySource::Cluster {
            return Ok(());
        }
        let record = record.clone();
        self.append(|seq| LogLine::Add { seq, record }, sync)
    }

    fn removed(&self, kind: ListKind, net: IpNet) -> Result<(), String> {
        self.append(|seq| LogLine::Remove { seq, kind, net }, true)
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The log's lines; a line that does not parse is skipped (a torn write
/// at a crash is the last line; anything else is reported).
fn read_log(path: &Path) -> Result<Vec<LogLine>, String> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut lines = Vec::new();
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<LogLine>(&line) {
            Ok(l) => lines.push(l),
            Err(e) => tracing::warn!(
                "state: {} line {}: skipped ({e}; a write cut short by a crash?)",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(lines)
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename,
/// fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    {
        let mut f = File::create(&tmp).map_err(err)?;
        f.write_all(bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Makes the directory's entries (a created, renamed or removed file)
/// durable.
fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mxguard_policy::EntrySource;

    /// An empty directory of this test run's own.
    fn fresh_dir(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("mxguard-state-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn metrics() -> AdmissionMetrics {
        AdmissionMetrics::new(&crate::metrics::Metrics::new().unwrap()).unwrap()
    }

    fn record(net: &str) -> DynamicRecord {
        DynamicRecord {
            net: net.parse().unwrap(),
            kind: ListKind::Block,
            source: EntrySource::Admin,
            reason: "test".into(),
            added_by: Some("unit".into()),
            since_unix_ms: 1,
            until_unix_ms: None,
        }
    }

    #[test]
    fn changes_survive_a_reopen_and_a_compaction_and_a_torn_line_is_skipped() {
        let dir = fresh_dir("plain");
        let (store, loaded) = StateStore::open(&dir, metrics()).unwrap();
        assert!(loaded.entries.is_empty());
        store.added(&record("192.0.2.1/32"), true).unwrap();
        store.added(&record("192.0.2.2/32"), false).unwrap();
        store
            .removed(ListKind::Block, "192.0.2.1/32".parse().unwrap())
            .unwrap();
        store.flush();
        drop(store);
        let (store, loaded) = StateStore::open(&dir, metrics()).unwrap();
        let nets: Vec<String> = loaded.entries.iter().map(|r| r.net.to_string()).collect();
        assert_eq!(nets, ["192.0.2.2/32"]);
        // Compaction: the snapshot holds up to seq 3; one more change after.
        let mut compaction = store.compaction();
        let seq = compaction.seal();
        store.added(&record("198.51.100.0/24"), true).unwrap();
        compaction.write(loaded.entries, seq, &[], &[]).unwrap();
        assert!(
            !dir.join(SEALED).exists(),
            "the sealed log outlived its snapshot"
        );
        drop(store);
        let mut log = OpenOptions::new().append(true).open(dir.join(LOG)).unwrap();
        log.write_all(b"{\"op\":\"add\",\"seq\":99,\"net\":\"10.0")
            .unwrap();
        let (_, loaded) = StateStore::open(&dir, metrics()).unwrap();
        let mut nets: Vec<String> = loaded.entries.iter().map(|r| r.net.to_string()).collect();
        nets.sort();
        assert_eq!(nets, ["192.0.2.2/32", "198.51.100.0/24"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn nets(loaded: &Loaded) -> Vec<String> {
        let mut nets: Vec<String> = loaded.entries.iter().map(|r| r.net.to_string()).collect();
        nets.sort();
        nets
    }

    /// Session threads append detections while a compaction writes its
    /// snapshots: the appends go on meanwhile, and every one of them is
    /// there after a restart.
    ///
    /// In the middle of each compaction's write the hook asks another
    /// thread for a wave of appends and waits for them: they are made only
    /// if the log is not locked meanwhile (with the lock held through the
    /// write, the wave waits for the write and the hook times out). No
    /// timing in the outcome but that generous timeout.
    #[test]
    fn appends_go_on_during_a_compaction_and_none_is_lost() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::mpsc;
        use std::time::Duration;
        const ROUNDS: usize = 3;
        const BEFORE: usize = 100;
        const WAVE: usize = 50;
        let dir = fresh_dir("comp");
        let (store, _) = StateStore::open(&dir, metrics()).unwrap();
        // The lists: changed and read under their own lock, which each
        // change holds while the store appends it (as `Lists` does).
        let lists: Mutex<Vec<DynamicRecord>> = Mutex::new(Vec::new());
        let count = AtomicUsize::new(0);
        let append = |sync: bool| {
            let i = count.fetch_add(1, Ordering::Relaxed);
            let r = record(&format!("10.{}.{}.0/24", i / 256, i % 256));
            let mut l = lists.lock();
            store.added(&r, sync).unwrap();
            l.push(r);
        };
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (wave_tx, wave_rx) = mpsc::channel::<()>();
        let went_on = Arc::new(AtomicUsize::new(0));
        *store.while_writing.lock() = Some(Box::new({
            let went_on = went_on.clone();
            move || {
                if go_tx.send(()).is_ok() && wave_rx.recv_timeout(Duration::from_secs(10)).is_ok() {
                    went_on.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        std::thread::scope(|s| {
            let append = &append;
            s.spawn(move || {
                // A wave for each compaction that asks; some synced at
                // once, as an admin's change is.
                while go_rx.recv().is_ok() {
                    for k in 0..WAVE {
                        append(k % 25 == 0);
                    }
                    let _ = wave_tx.send(());
                }
            });
            for _ in 0..ROUNDS {
                for _ in 0..BEFORE {
                    append(false);
                }
                let mut compaction = store.compaction();
                let (entries, seq) = {
                    let l = lists.lock();
                    (l.clone(), compaction.seal())
                };
                compaction.write(entries, seq, &[], &[]).unwrap();
            }
            // The hook (and its sender) goes: the appender's loop ends.
            *store.while_writing.lock() = None;
        });
        assert_eq!(
            went_on.load(Ordering::Relaxed),
            ROUNDS,
            "appends waited for a compaction's write"
        );
        store.flush();
        drop(store);
        let (_, loaded) = StateStore::open(&dir, metrics()).unwrap();
        assert_eq!(
            loaded.entries.len(),
            ROUNDS * (BEFORE + WAVE),
            "entries lost across compactions"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A compaction that sealed the log and never wrote its snapshot (a
    /// crash, a full disk) loses nothing; the next one cleans up after it.
    #[test]
    fn a_compaction_cut_short_loses_nothing() {
        let dir = fresh_dir("cut");
        let (store, _) = StateStore::open(&dir, metrics()).unwrap();
        store.added(&record("192.0.2.1/32"), true).unwrap();
        let mut compaction = store.compaction();
        compaction.seal();
        drop(compaction);
        store.added(&record("192.0.2.2/32"), true).unwrap();
        assert!(dir.join(SEALED).exists());
        drop(store);
        let (store, loaded) = StateStore::open(&dir, metrics()).unwrap();
        assert_eq!(nets(&loaded), ["192.0.2.1/32", "192.0.2.2/32"]);

        // A crash between the link and the rename: both names on one file.
        let mut all = std::fs::read(dir.join(SEALED)).unwrap();
        all.extend(std::fs::read(dir.join(LOG)).unwrap());
        std::fs::remove_file(dir.join(SEALED)).unwrap();
        std::fs::write(dir.join(LOG), all).unwrap();
        std::fs::hard_link(dir.join(LOG), dir.join(SEALED)).unwrap();
        drop(store);
        let (store, loaded) = StateStore::open(&dir, metrics()).unwrap();
        assert_eq!(nets(&loaded), ["192.0.2.1/32", "192.0.2.2/32"]);

        // The next compaction does not seal again; it removes the old one.
        store.added(&record("192.0.2.3/32"), false).unwrap();
        let mut compaction = store.compaction();
        let seq = compaction.seal();
        compaction.write(loaded.entries, seq - 1, &[], &[]).unwrap();
        assert!(!dir.join(SEALED).exists());
        drop(store);
        let (_, loaded) = StateStore::open(&dir, metrics()).unwrap();
        assert_eq!(
            nets(&loaded),
            ["192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_store_on_the_same_directory_is_refused_while_the_first_is_open() {
        let dir = fresh_dir("lock");
        let (store, _) = StateStore::open(&dir, metrics()).unwrap();
        let Err(e) = StateStore::open(&dir, metrics()) else {
            panic!("a second store opened the same directory");
        };
        assert!(e.contains("in use by another mxguard"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(store);
        StateStore::open(&dir, metrics()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
