//! The state store: dynamic list entries, reputation scores and sender
//! trends that survive a restart and a crash (`kill -9`).
//!
//! # Layout of `[state] dir`
//!
//! ```text
//! lists.log        append-only, one JSON line per change, numbered
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
        for line in read_log(&log_path)? {
            if line.seq() <= snapshot.seq {
                continue;
            }
            seq = seq.max(line.seq());
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
            }),
            metrics,
            _lock: lock,
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
        let file = {
            let mut log = self.log.lock();
            if !log.dirty {
                return;
            }
            match log.file.try_clone() {
                Ok(file) => {
                    log.dirty = false;
                    file
                }
                Err(e) => {
                    self.metrics.state_errors.inc();
                    tracing::error!("state: cannot flush {}: {e}", self.dir.join(LOG).display());
                    return;
                }
            }
        };
        match file.sync_data() {
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

    /// The last change number written (compaction reads it with the lists
    /// held still).
    pub fn seq(&self) -> u64 {
        self.log.lock().seq
    }

    /// Writes the snapshots and compacts the log: `entries` hold every
    /// change up to `seq`.
    pub fn snapshot(
        &self,
        entries: Vec<DynamicRecord>,
        seq: u64,
        reputation: &[ReputationRecord],
        trends: &[TrendRecord],
    ) -> Result<(), String> {
        let result = (|| {
            write_atomic(
                &self.dir.join(REPUTATION),
                &serde_json::to_vec(reputation).map_err(|e| e.to_string())?,
            )?;
            write_atomic(
                &self.dir.join(TRENDS),
                &serde_json::to_vec(trends).map_err(|e| e.to_string())?,
            )?;
            let snap = ListsSnapshot { seq, entries };
            write_atomic(
                &self.dir.join(LISTS),
                &serde_json::to_vec(&snap).map_err(|e| e.to_string())?,
            )?;
            self.compact(seq)
        })();
        match &result {
            Ok(()) => self
                .metrics
                .state_writes
                .with_label_values(&["snapshot"])
                .inc(),
            Err(_) => self.metrics.state_errors.inc(),
        }
        result
    }

    /// Rewrites the log with only the lines after `seq`.
    fn compact(&self, seq: u64) -> Result<(), String> {
        let path = self.dir.join(LOG);
        let mut log = self.log.lock();
        let rest: Vec<LogLine> = read_log(&path)?
            .into_iter()
            .filter(|l| l.seq() > seq)
            .collect();
        let mut text = Vec::new();
        for line in &rest {
            text.extend(serde_json::to_vec(line).map_err(|e| e.to_string())?);
            text.push(b'\n');
        }
        write_atomic(&path, &text)?;
        log.file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        log.dirty = false;
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
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mxguard_policy::EntrySource;

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
        let dir = std::env::temp_dir().join(format!("mxguard-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
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
        let seq = store.seq();
        store.added(&record("198.51.100.0/24"), true).unwrap();
        store.snapshot(loaded.entries, seq, &[], &[]).unwrap();
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

    #[test]
    fn a_second_store_on_the_same_directory_is_refused_while_the_first_is_open() {
        let dir = std::env::temp_dir().join(format!("mxguard-state-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
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
