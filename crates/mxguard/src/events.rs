//! The event log: one JSON line per session verdict and per admin action,
//! in a file of its own (`[log] events`), for shipping to a log system.
//!
//! The daemon's own log (stderr) is for people; this file is for machines:
//! a stable, flat schema (`docs/operations.md`, "Event log"), one object
//! per line, nothing else in it.
//!
//! Sessions never wait on the disk: a line is handed to a writer thread
//! through a bounded channel and, when the writer falls behind (a full or
//! slow disk under attack), dropped and counted in
//! `mxguard_event_log_dropped_total` rather than queued without bound. The
//! writer flushes whenever the channel runs dry, so a line reaches the
//! file within moments of its event.
//!
//! Rotation: `logrotate` renames the file, then SIGHUP (or `POST
//! /api/v1/reload`) makes the writer reopen the path; no line is lost
//! across the rename, since the old descriptor stays valid until then.
//!
//! At exit ([`EventLog::close`]) the writer is told there is no more and
//! waited for, a bounded time: the verdicts of the sessions the drain
//! waited for are the last lines, and a thread still holding them when the
//! process ends would take them with it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use prometheus::{IntCounter, IntCounterVec};
use serde::Serialize;

/// Lines queued for the writer at most; past this they are dropped.
const QUEUE: usize = 16 * 1024;
/// Lines written between two flushes at most.
const BATCH: usize = 1024;

enum Msg {
    Line(String),
    Reopen,
}

struct Writer {
    path: PathBuf,
    tx: SyncSender<Msg>,
}

/// The event log; disabled until [`EventLog::configure`] names a file.
pub struct EventLog {
    writer: ArcSwapOption<Writer>,
    /// Writer threads not joined yet: the current one, and any a new path
    /// replaced that may still be draining.
    threads: parking_lot::Mutex<Vec<JoinHandle<()>>>,
    lines: IntCounterVec,
    dropped: IntCounter,
}

/// One finished session (the same facts as the `session` log line).
#[derive(Debug, Serialize)]
pub struct VerdictEvent<'a> {
    pub verdict: &'a str,
    /// The tests that fired, in order.
    pub tests: &'a [&'static str],
    /// The client's address and port.
    pub client: String,
    pub orig_dst: Option<String>,
    /// Seconds from accept to close.
    pub elapsed: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub end: &'a str,
    pub turns: u32,
    /// The shortest time the client took to answer a reply, in ms.
    pub min_gap_ms: Option<f64>,
}

/// One thing an operator did.
#[derive(Debug, Serialize)]
pub struct AdminEvent<'a> {
    /// The token's name, `cli` for the local `mxguard quarantine` command,
    /// `signal` for a SIGHUP.
    pub who: &'a str,
    /// `api`, `cli` or `signal`.
    pub via: &'a str,
    /// What was done: `block`, `unblock`, `allow`, `unallow`, `reload`,
    /// `quarantine.release`, `quarantine.delete`.
    pub action: &'a str,
    /// What it was done to: a network, a quarantine id; absent for reload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<&'a str>,
    /// `ok` or `error`.
    pub result: &'a str,
    /// The error, or what the action reported (a release's MTA reply).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
}

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    ts: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    event: &'a T,
}

impl EventLog {
    pub fn new(lines: IntCounterVec, dropped: IntCounter) -> Self {
        Self {
            writer: ArcSwapOption::empty(),
            threads: parking_lot::Mutex::new(Vec::new()),
            lines,
            dropped,
        }
    }

    /// Points the log at `path` (or turns it off with `None`). The same
    /// path as before reopens it: that is the rotation hook. A new path is
    /// opened before anything changes, so an error leaves the old file in
    /// use.
    pub fn configure(&self, path: Option<&Path>) -> io::Result<()> {
        let current = self.writer.load();
        match (path, current.as_deref()) {
            (None, _) => {
                self.writer.store(None);
                Ok(())
            }
            (Some(path), Some(w)) if w.path == path => {
                // Full queue: the writer is busy and will see the next
                // reopen; a missed reopen only delays the rotation.
                let _ = w.tx.try_send(Msg::Reopen);
                Ok(())
            }
            (Some(path), _) => {
                let file = open(path)?;
                let (tx, rx) = mpsc::sync_channel(QUEUE);
                let owned = path.to_owned();
                let dropped = self.dropped.clone();
                let thread = std::thread::Builder::new()
                    .name("mxguard-events".into())
                    .spawn(move || write_loop(owned, file, rx, dropped))?;
                {
                    let mut threads = self.threads.lock();
                    threads.retain(|t| !t.is_finished());
                    threads.push(thread);
                }
                // The old writer drains what it has and ends when its
                // sender goes with the swap.
                self.writer.store(Some(Arc::new(Writer {
                    path: path.to_owned(),
                    tx,
                })));
                Ok(())
            }
        }
    }

    /// At exit: no more lines are taken; those queued are written and
    /// flushed, waiting at most `limit` for the writer (a disk that hangs
    /// must not hold the exit up for good). False when the writer was
    /// still busy at the limit.
    pub fn close(&self, limit: Duration) -> bool {
        // The writer ends once it has drained its queue and the last
        // sender has gone with this swap (a session's emit holds it only
        // for a moment).
        self.writer.store(None);
        let deadline = tokio::time::Instant::now() + limit;
        let threads = std::mem::take(&mut *self.threads.lock());
        let mut done = true;
        for thread in threads {
            while !thread.is_finished() && tokio::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                done = false;
            }
        }
        if !done {
            tracing::warn!(
                "event log: the writer did not finish within {}s; its last lines may be lost",
                limit.as_secs()
            );
        }
        done
    }

    pub fn enabled(&self) -> bool {
        self.writer.load().is_some()
    }

    pub fn verdict(&self, event: &VerdictEvent<'_>) {
        self.emit("verdict", event);
    }

    pub fn admin(&self, event: &AdminEvent<'_>) {
        self.emit("admin", event);
    }

    fn emit<T: Serialize>(&self, kind: &'static str, event: &T) {
        let writer = self.writer.load();
        let Some(writer) = writer.as_deref() else {
            return;
        };
        let line = Line {
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            kind,
            event,
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            self.dropped.inc();
            return;
        };
        text.push('\n');
        match writer.tx.try_send(Msg::Line(text)) {
            Ok(()) => self.lines.with_label_values(&[kind]).inc(),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Appends, creating the file 0640 (the group may ship it).
fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn write_loop(path: PathBuf, file: File, rx: Receiver<Msg>, dropped: IntCounter) {
    let mut sink = Sink {
        path,
        out: BufWriter::with_capacity(64 * 1024, file),
        failing: false,
        dropped,
    };
    while let Ok(first) = rx.recv() {
        sink.handle(first);
        // Take what else is queued, then flush once: lines reach the file
        // promptly without a write(2) per line under load.
        for _ in 0..BATCH {
            match rx.try_recv() {
                Ok(msg) => sink.handle(msg),
                Err(_) => break,
            }
        }
        sink.flush();
    }
    sink.flush();
}

struct Sink {
    path: PathBuf,
    out: BufWriter<File>,
    /// Warn once per run of failures, not per line.
    failing: bool,
    dropped: IntCounter,
}

impl Sink {
    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Line(line) => {
                let result = self.out.write_all(line.as_bytes());
                self.check(result);
            }
            Msg::Reopen => {
                self.flush();
                match open(&self.path) {
                    Ok(file) => self.out = BufWriter::with_capacity(64 * 1024, file),
                    Err(e) => {
                        tracing::warn!("event log: cannot reopen, keeping the old file: {e}")
                    }
                }
            }
        }
    }

    fn flush(&mut self) {
        let result = self.out.flush();
        self.check(result);
    }

    fn check(&mut self, result: io::Result<()>) {
        match result {
            Ok(()) => self.failing = false,
            Err(e) => {
                self.dropped.inc();
                if !self.failing {
                    tracing::warn!("event log {}: {e}", self.path.display());
                    self.failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;
    use std::time::Duration;

    fn log() -> EventLog {
        EventLog::new(
            IntCounterVec::new(Opts::new("l", "l"), &["type"]).unwrap(),
            IntCounter::new("d", "d").unwrap(),
        )
    }

    fn read_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
        for _ in 0..200 {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<_> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() >= n {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("fewer than {n} lines in {}", path.display());
    }

    #[test]
    fn lines_are_json_and_a_reopen_follows_a_rename() {
        let dir = std::env::temp_dir().join(format!("mxguard-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let _ = std::fs::remove_file(&path);
        let events = log();
        events.configure(Some(&path)).unwrap();
        events.admin(&AdminEvent {
            who: "ops",
            via: "api",
            action: "block",
            target: Some("192.0.2.0/24"),
            result: "ok",
            detail: None,
        });
        let lines = read_lines(&path, 1);
        assert_eq!(lines[0]["type"], "admin");
        assert_eq!(lines[0]["who"], "ops");
        assert_eq!(lines[0]["target"], "192.0.2.0/24");
        assert!(lines[0]["ts"].as_str().unwrap().ends_with('Z'));

        // logrotate: rename, then reopen.
        let rotated = dir.join("events.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        events.configure(Some(&path)).unwrap();
        events.verdict(&VerdictEvent {
            verdict: "pass",
            tests: &["pipelining"],
            client: "192.0.2.1:4000".into(),
            orig_dst: None,
            elapsed: 1.5,
            bytes_up: 10,
            bytes_down: 20,
            end: "eof",
            turns: 3,
            min_gap_ms: Some(0.5),
        });
        let lines = read_lines(&path, 1);
        assert_eq!(lines[0]["type"], "verdict");
        assert_eq!(lines[0]["tests"][0], "pipelining");
        assert_eq!(read_lines(&rotated, 1).len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Closing waits for the writer: every line queued before is in the
    /// file when `close` returns, and none is taken after.
    #[test]
    fn close_writes_every_queued_line_before_it_returns() {
        let dir = std::env::temp_dir().join(format!("mxguard-events-close-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let _ = std::fs::remove_file(&path);
        let events = log();
        events.configure(Some(&path)).unwrap();
        let n = 10_000;
        for i in 0..n {
            events.verdict(&VerdictEvent {
                verdict: "pass",
                tests: &[],
                client: format!("192.0.2.1:{i}"),
                orig_dst: None,
                elapsed: 0.1,
                bytes_up: 1,
                bytes_down: 2,
                end: "eof",
                turns: 1,
                min_gap_ms: None,
            });
        }
        let queued = n - events.dropped.get() as usize;
        assert!(
            events.close(Duration::from_secs(10)),
            "the writer did not finish"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), queued, "lines lost at close");
        assert!(!events.enabled());
        events.admin(&AdminEvent {
            who: "ops",
            via: "api",
            action: "reload",
            target: None,
            result: "ok",
            detail: None,
        });
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().lines().count(),
            queued
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_that_cannot_be_opened_is_an_error_and_keeps_the_log_off() {
        let events = log();
        let e = events
            .configure(Some(Path::new("/nonexistent-dir/events.jsonl")))
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir"), "{e}");
        assert!(!events.enabled());
    }
}
