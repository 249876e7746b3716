//! The quarantine: suspect mail the guard accepted from the client, stored
//! apart and never delivered unless an operator releases it.
//!
//! Layout under `[quarantine] dir` (docs/quarantine.md has the full story):
//!
//! ```text
//! tmp/ID   a message being written; its writer holds an flock(2) on it
//! new/ID   a committed message, one file each
//! ```
//!
//! A file is one line of JSON metadata ending in LF (`{"format":
//! "mxguard-quarantine/1", ...}`), then the message bytes exactly as the
//! client meant them (dot-unstuffed, CRLF lines).
//!
//! Durability: [`QuarantineWriter::commit`] fsyncs the file, links it into
//! `new/`, fsyncs `new/` and only then returns, so the `250` the session
//! sends after it is backed by the disk. A crash before that leaves a temp
//! file nobody holds a lock on; [`Quarantine::open`] removes those.
//!
//! Blocking: the methods of [`Quarantine`] and [`QuarantineWriter`] do
//! plain blocking file I/O. Inside the daemon call them through
//! `tokio::task::spawn_blocking`, or use the async forms, which do exactly
//! that: [`Quarantine::begin_async`] and [`AsyncQuarantineWriter`] (buffers
//! 64 KiB, then hands the chunk to the blocking pool), and
//! [`Quarantine::release`], which is async throughout.

// The session's `quarantine` action (issue 3) is being wired up alongside;
// until it calls the writer, only the tests do. Remove once it does.

mod cli;
mod id;
mod release;
mod writer;

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

pub use cli::{base64, main as cli_main, QuarantineArgs};
pub use id::QuarantineId;
pub use release::{ReleaseError, ReleaseReceipt};
pub use writer::{AsyncQuarantineWriter, QuarantineWriter};

/// The first field of every file's header line: names the format and its
/// version, so a future layout can be told apart and a stray file is not
/// mistaken for a message.
pub const FORMAT: &str = "mxguard-quarantine/1";

/// The header line is read before anything else is known about a file; a
/// bound keeps a corrupt or foreign file from being slurped whole. A
/// thousand recipients of 256 bytes still fit.
const MAX_HEADER: usize = 1 << 20;

/// Why a quarantine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    /// The message grew past `[quarantine] max_message_size`; nothing was
    /// stored. The session answers `552`.
    #[error("message larger than the quarantine's limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("no quarantined message {0}")]
    NotFound(QuarantineId),
    /// Another process (a release or delete) holds the message's lock.
    #[error("quarantined message {0} is being released or deleted by another process")]
    Busy(QuarantineId),
    #[error("{}: not a quarantine file: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl QuarantineError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

/// What the policy decided for the message. Only `quarantine` stores
/// anything today; the field exists so a later action (say, an oversize
/// hold) can share the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuarantineAction {
    Quarantine,
}

/// Everything known about a quarantined message besides its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineMeta {
    pub id: QuarantineId,
    /// RFC 3339, UTC, microseconds: when the guard began storing it.
    pub received: String,
    /// The client's address and port as the guard saw it.
    pub client: SocketAddr,
    /// The HELO/EHLO argument, if the client gave one.
    pub helo: Option<String>,
    /// The reverse-path without angle brackets; `""` for the null sender.
    pub mail_from: String,
    /// The recipients the MTA accepted, without angle brackets: a release
    /// sends to exactly these.
    pub rcpt_to: Vec<String>,
    /// The names of the tests that fired.
    pub tests: Vec<String>,
    pub action: QuarantineAction,
    /// The guard's host name (`hostname` in the config).
    pub guard: String,
}

impl QuarantineMeta {
    /// Metadata for a message received now, with a fresh id.
    pub fn new(
        client: SocketAddr,
        helo: Option<String>,
        mail_from: String,
        rcpt_to: Vec<String>,
        tests: Vec<String>,
        guard: String,
    ) -> Self {
        let (id, received) = QuarantineId::generate(SystemTime::now());
        Self {
            id,
            received,
            client,
            helo,
            mail_from,
            rcpt_to,
            tests,
            action: QuarantineAction::Quarantine,
            guard,
        }
    }
}

/// The header line as written: the format tag first, then the metadata.
#[derive(Serialize)]
struct HeaderOut<'a> {
    format: &'static str,
    #[serde(flatten)]
    meta: &'a QuarantineMeta,
}

#[derive(Deserialize)]
struct HeaderIn {
    format: String,
    #[serde(flatten)]
    meta: QuarantineMeta,
}

/// One line of `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuarantineSummary {
    pub id: QuarantineId,
    pub received: String,
    pub client: SocketAddr,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// Message bytes (without the header line).
    pub size: u64,
    pub tests: Vec<String>,
}

/// The messages in the quarantine, oldest first, and the files in `new/`
/// that could not be read as messages. Those are reported, never hidden:
/// they may be mail.
#[derive(Debug, Default)]
pub struct Listing {
    pub messages: Vec<QuarantineSummary>,
    pub skipped: Vec<QuarantineError>,
}

/// The quarantine directory. Cheap to clone; share one per daemon.
#[derive(Debug, Clone)]
pub struct Quarantine {
    inner: Arc<Dirs>,
}

#[derive(Debug)]
struct Dirs {
    root: PathBuf,
    tmp: PathBuf,
    new: PathBuf,
    max_message_size: u64,
}

/// A committed message opened for release or deletion, holding its lock:
/// no other process can release or delete it meanwhile. The file is
/// positioned at the first message byte.
struct LockedMessage {
    path: PathBuf,
    meta: QuarantineMeta,
    size: u64,
    file: Flock<File>,
}

impl Quarantine {
    /// Opens (creating if needed) the quarantine the configuration names,
    /// and removes what crashed writers left in `tmp/`.
    pub fn open(config: &crate::config::Quarantine) -> Result<Self, QuarantineError> {
        Self::open_at(&config.dir, config.max_message_size)
    }

    pub fn open_at(dir: &Path, max_message_size: u64) -> Result<Self, QuarantineError> {
        let q = Self::at(dir, max_message_size);
        // 0700: quarantined mail is other people's mail.
        for d in [&q.inner.root, &q.inner.tmp, &q.inner.new] {
            if !d.is_dir() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(d)
                    .map_err(|e| QuarantineError::io(d, e))?;
                // The new directory's own entry must survive a crash too,
                // or a committed message could vanish with it.
                if let Some(parent) = d.parent() {
                    sync_dir(parent)?;
                }
            }
        }
        let removed = q.clean_tmp()?;
        if removed > 0 {
            tracing::info!(
                dir = %q.inner.tmp.display(),
                removed,
                "removed unfinished quarantine files left by a crash"
            );
        }
        Ok(q)
    }

    /// The quarantine for the admin side (the CLI, later the admin API):
    /// creates nothing and cleans nothing. An operator's `list`, run as
    /// root before the daemon ever started, must not leave a root-owned
    /// directory the daemon then cannot write to; the daemon's own
    /// [`Quarantine::open`] does the creating and cleaning.
    pub fn open_existing(config: &crate::config::Quarantine) -> Self {
        Self::at(&config.dir, config.max_message_size)
    }

    fn at(dir: &Path, max_message_size: u64) -> Self {
        Self {
            inner: Arc::new(Dirs {
                root: dir.to_owned(),
                tmp: dir.join("tmp"),
                new: dir.join("new"),
                max_message_size,
            }),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.inner.root
    }

    pub fn max_message_size(&self) -> u64 {
        self.inner.max_message_size
    }

    /// Removes the temp files no live writer holds. A writer keeps an
    /// exclusive flock on its temp file until it is committed or dropped,
    /// and the kernel drops the lock when the process dies, so an unlocked
    /// temp file is a crash's leftover, while a daemon that is writing (or
    /// a second daemon sharing the directory) keeps its files even when
    /// the CLI opens the quarantine at the same moment.
    fn clean_tmp(&self) -> Result<usize, QuarantineError> {
        let tmp = &self.inner.tmp;
        let mut removed = 0;
        for entry in fs::read_dir(tmp).map_err(|e| QuarantineError::io(tmp, e))? {
            let entry = entry.map_err(|e| QuarantineError::io(tmp, e))?;
            let path = entry.path();
            let file = match File::open(&path) {
                Ok(f) => f,
                // Committed or dropped by its writer meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(QuarantineError::io(&path, e)),
            };
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(_held) => match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(QuarantineError::io(&path, e)),
                },
                Err((_, Errno::EWOULDBLOCK)) => {}
                Err((_, errno)) => return Err(QuarantineError::io(&path, errno.into())),
            }
        }
        Ok(removed)
    }

    /// Starts storing a message: creates `tmp/ID` (0600) and writes the
    /// metadata line. Feed the message with [`QuarantineWriter::write`],
    /// then [`QuarantineWriter::commit`]; dropping the writer instead
    /// removes the temp file.
    pub fn begin(&self, meta: QuarantineMeta) -> Result<QuarantineWriter, QuarantineError> {
        QuarantineWriter::create(self.clone(), meta)
    }

    /// [`Quarantine::begin`] on the blocking pool.
    pub async fn begin_async(
        &self,
        meta: QuarantineMeta,
    ) -> Result<AsyncQuarantineWriter, QuarantineError> {
        let q = self.clone();
        let writer = self.blocking(move || q.begin(meta)).await?;
        Ok(AsyncQuarantineWriter::new(writer))
    }

    /// Runs blocking store work off the runtime's threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, QuarantineError> + Send + 'static,
    ) -> Result<T, QuarantineError> {
        tokio::task::spawn_blocking(f).await.map_err(|e| {
            QuarantineError::io(
                &self.inner.root,
                io::Error::other(format!("blocking task: {e}")),
            )
        })?
    }

    fn message_path(&self, id: &QuarantineId) -> PathBuf {
        self.inner.new.join(id.as_str())
    }

    /// The committed messages, oldest first. A quarantine that was never
    /// created is empty.
    pub fn list(&self) -> Result<Listing, QuarantineError> {
        let new = &self.inner.new;
        let mut listing = Listing::default();
        let entries = match fs::read_dir(new) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(listing),
            Err(e) => return Err(QuarantineError::io(new, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| QuarantineError::io(new, e))?;
            let path = entry.path();
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<QuarantineId>().ok())
            else {
                listing.skipped.push(QuarantineError::corrupt(
                    &path,
                    "the name is not a quarantine id",
                ));
                continue;
            };
            match self.summary(&id, &path) {
                Ok(s) => listing.messages.push(s),
                // Released or deleted while we looked.
                Err(QuarantineError::NotFound(_)) => {}
                Err(e) => listing.skipped.push(e),
            }
        }
        listing
            .messages
            .sort_by(|a, b| (&a.received, &a.id).cmp(&(&b.received, &b.id)));
        Ok(listing)
    }

    fn summary(
        &self,
        id: &QuarantineId,
        path: &Path,
    ) -> Result<QuarantineSummary, QuarantineError> {
        let mut file = open_message(id, path)?;
        let len = file
            .metadata()
            .map_err(|e| QuarantineError::io(path, e))?
            .len();
        let (meta, header_len) = read_header(id, path, &mut file)?;
        Ok(QuarantineSummary {
            id: meta.id,
            received: meta.received,
            client: meta.client,
            mail_from: meta.mail_from,
            rcpt_to: meta.rcpt_to,
            size: len.saturating_sub(header_len),
            tests: meta.tests,
        })
    }

    /// One message's metadata and its exact bytes (read whole: for the
    /// CLI and the admin API, not for streaming).
    pub fn show(&self, id: &QuarantineId) -> Result<(QuarantineMeta, Vec<u8>), QuarantineError> {
        let path = self.message_path(id);
        let mut file = open_message(id, &path)?;
        let (meta, header_len) = read_header(id, &path, &mut file)?;
        file.seek(SeekFrom::Start(header_len))
            .map_err(|e| QuarantineError::io(&path, e))?;
        let mut message = Vec::new();
        file.read_to_end(&mut message)
            .map_err(|e| QuarantineError::io(&path, e))?;
        Ok((meta, message))
    }

    /// How many committed messages there are, and their bytes on disk: a
    /// directory scan with one stat per file and no header read (for the
    /// metrics and the admin API's stats). A quarantine never created is
    /// empty.
    pub fn usage(&self) -> Result<(u64, u64), QuarantineError> {
        let new = &self.inner.new;
        let entries = match fs::read_dir(new) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => return Err(QuarantineError::io(new, e)),
        };
        let (mut messages, mut bytes) = (0, 0);
        for entry in entries.flatten() {
            if let Ok(meta) = entry.metadata() {
                if meta.is_file() {
                    messages += 1;
                    bytes += meta.len();
                }
            }
        }
        Ok((messages, bytes))
    }

    /// Removes a message for good.
    pub fn delete(&self, id: &QuarantineId) -> Result<(), QuarantineError> {
        let locked = self.lock_message(id)?;
        self.remove_locked(locked)
    }

    /// Opens a committed message and takes its lock without waiting: two
    /// operators releasing the same message at once must not deliver it
    /// twice; the second one is told it is busy.
    fn lock_message(&self, id: &QuarantineId) -> Result<LockedMessage, QuarantineError> {
        let path = self.message_path(id);
        let file = open_message(id, &path)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((_, Errno::EWOULDBLOCK)) => return Err(QuarantineError::Busy(id.clone())),
            Err((_, errno)) => return Err(QuarantineError::io(&path, errno.into())),
        };
        // Between our open and our lock another process may have released
        // the message and unlinked it: we would then hold the lock of a
        // file that is no longer in the quarantine. The name must still be
        // this inode.
        let ours = file.metadata().map_err(|e| QuarantineError::io(&path, e))?;
        match fs::symlink_metadata(&path) {
            Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() => {}
            Ok(_) => return Err(QuarantineError::NotFound(id.clone())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(QuarantineError::NotFound(id.clone()))
            }
            Err(e) => return Err(QuarantineError::io(&path, e)),
        }
        let (meta, header_len) = read_header(id, &path, &mut file)?;
        file.seek(SeekFrom::Start(header_len))
            .map_err(|e| QuarantineError::io(&path, e))?;
        Ok(LockedMessage {
            path,
            meta,
            size: ours.len().saturating_sub(header_len),
            file,
        })
    }

    /// Unlinks a locked message and makes the removal durable, then lets
    /// the lock go.
    fn remove_locked(&self, locked: LockedMessage) -> Result<(), QuarantineError> {
        fs::remove_file(&locked.path).map_err(|e| QuarantineError::io(&locked.path, e))?;
        sync_dir(&self.inner.new)?;
        drop(locked);
        Ok(())
    }
}

fn open_message(id: &QuarantineId, path: &Path) -> Result<File, QuarantineError> {
    File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => QuarantineError::NotFound(id.clone()),
        _ => QuarantineError::io(path, e),
    })
}

/// Reads and checks the header line; returns the metadata and the length
/// of the line with its LF, which is where the message starts. The file's
/// position afterwards is unspecified (the reader reads ahead).
fn read_header(
    id: &QuarantineId,
    path: &Path,
    file: &mut File,
) -> Result<(QuarantineMeta, u64), QuarantineError> {
    let mut line = Vec::new();
    BufReader::new(file.by_ref())
        .take(MAX_HEADER as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| QuarantineError::io(path, e))?;
    if line.last() != Some(&b'\n') {
        return Err(QuarantineError::corrupt(
            path,
            format!("no header line ending in LF within {MAX_HEADER} bytes"),
        ));
    }
    let header: HeaderIn = serde_json::from_slice(&line[..line.len() - 1])
        .map_err(|e| QuarantineError::corrupt(path, format!("bad header line: {e}")))?;
    if header.format != FORMAT {
        return Err(QuarantineError::corrupt(
            path,
            format!("format `{}`, expected `{FORMAT}`", header.format),
        ));
    }
    if &header.meta.id != id {
        return Err(QuarantineError::corrupt(
            path,
            format!("the header names id {}", header.meta.id),
        ));
    }
    // A file under the bound: the cast from usize cannot truncate.
    Ok((header.meta, line.len() as u64))
}

/// Makes a directory's entries (a link, an unlink) durable.
fn sync_dir(dir: &Path) -> Result<(), QuarantineError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| QuarantineError::io(dir, e))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A directory under the system temp dir, removed when dropped.
    pub(crate) struct TestDir(pub PathBuf);

    impl TestDir {
        pub(crate) fn new(name: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "mxguard-{name}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn meta(rcpts: &[&str]) -> QuarantineMeta {
        QuarantineMeta::new(
            "192.0.2.7:40123".parse().unwrap(),
            Some("bot.example".into()),
            "sender@example.test".into(),
            rcpts.iter().map(|r| r.to_string()).collect(),
            vec!["pregreet".into(), "pipelining".into()],
            "guard.example.test".into(),
        )
    }

    pub(crate) fn store(q: &Quarantine, meta: QuarantineMeta, message: &[u8]) -> QuarantineId {
        let mut w = q.begin(meta).unwrap();
        for piece in message.chunks(7) {
            w.write(piece).unwrap();
        }
        w.commit().unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    const MESSAGE: &[u8] =
        b"From: a@example.test\r\nSubject: hi\r\n\r\n.a line with a dot\r\nbye\r\n";

    #[test]
    fn a_committed_message_is_listed_shown_and_deleted() {
        let dir = TestDir::new("quarantine");
        let q = Quarantine::open_at(&dir.0, 1 << 20).unwrap();
        let m = meta(&["x@example.test", "y@example.test"]);
        let id = store(&q, m.clone(), MESSAGE);
        assert_eq!(id, m.id);

        // One file in new/, nothing left in tmp/, private to the guard.
        assert_eq!(names(&dir.0.join("new")), vec![id.to_string()]);
        assert!(names(&dir.0.join("tmp")).is_empty());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.0.join("new").join(id.as_str())), 0o600);
        assert_eq!(mode(&dir.0.join("new")), 0o700);

        // The documented format: a JSON line, then the message as it is.
        let raw = fs::read(dir.0.join("new").join(id.as_str())).unwrap();
        assert!(raw.starts_with(b"{\"format\":\"mxguard-quarantine/1\",\"id\":\""));
        let lf = raw.iter().position(|&b| b == b'\n').unwrap();
        assert_eq!(&raw[lf + 1..], MESSAGE);

        let listing = q.list().unwrap();
        assert!(listing.skipped.is_empty());
        assert_eq!(
            listing.messages,
            vec![QuarantineSummary {
                id: id.clone(),
                received: m.received.clone(),
                client: m.client,
                mail_from: m.mail_from.clone(),
                rcpt_to: m.rcpt_to.clone(),
                size: MESSAGE.len() as u64,
                tests: m.tests.clone(),
            }]
        );

        let (shown, bytes) = q.show(&id).unwrap();
        assert_eq!(shown, m);
        assert_eq!(bytes, MESSAGE);

        q.delete(&id).unwrap();
        assert!(q.list().unwrap().messages.is_empty());
        assert!(matches!(q.show(&id), Err(QuarantineError::NotFound(_))));
        assert!(matches!(q.delete(&id), Err(QuarantineError::NotFound(_))));
    }

    #[test]
    fn the_admin_side_creates_nothing() {
        let dir = TestDir::new("quarantine");
        let config = crate::config::Quarantine {
            dir: dir.0.join("not-yet"),
            max_message_size: 1 << 20,
        };
        let q = Quarantine::open_existing(&config);
        assert!(q.list().unwrap().messages.is_empty());
        let (id, _) = QuarantineId::generate(SystemTime::now());
        assert!(matches!(q.show(&id), Err(QuarantineError::NotFound(_))));
        assert!(matches!(q.delete(&id), Err(QuarantineError::NotFound(_))));
        assert!(!config.dir.exists());
        // The daemon's open creates it; then both see the same messages.
        let daemon = Quarantine::open(&config).unwrap();
        let id = store(&daemon, meta(&["x@example.test"]), MESSAGE);
        assert_eq!(q.show(&id).unwrap().1, MESSAGE);
    }

    #[test]
    fn list_is_oldest_first() {
        let dir = TestDir::new("quarantine");
        let q = Quarantine::open_at(&dir.0, 1 << 20).unwrap();
        let mut metas: Vec<QuarantineMeta> = (0..3).map(|_| meta(&["x@example.test"])).collect();
        // Received times in reverse order of writing.
        for (i, m) in metas.iter_mut().enumerate() {
            let at =
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(2_000_000_000 - i as u64);
            (m.id, m.received) = QuarantineId::generate(at);
        }
        for m in &metas {
            store(&q, m.clone(), b"x\r\n");
        }
        let listed: Vec<QuarantineId> = q
            .list()
            .unwrap()
            .messages
            .into_iter()
            .map(|s| s.id)
            .collect();
        let expected: Vec<QuarantineId> = metas.iter().rev().map(|m| m.id.clone()).collect();
        assert_eq!(listed, expected);
    }

    #[test]
    fn an_empty_message_is_stored_as_empty() {
        let dir = TestDir::new("quarantine");
        let q = Quarantine::open_at(&dir.0, 1 << 20).unwrap();
        let id = store(&q, meta(&["x@example.test"]), b"");
        assert_eq!(q.show(&id).unwrap().1, b"");
        assert_eq!(q.list().unwrap().messages[0].size, 0);
    }

    #[test]
    fn an_abandoned_writer_leaves_nothing() {
        let dir = TestDir::new("quarantine");
        let q = Quarantine::open_at(&dir.0, 1 << 20).unwrap();
        let mut w = q.begin(meta(&["x@example.test"])).unwrap();
        w.write(MESSAGE).unwrap();
        assert_eq!(names(&dir.0.join("tmp")).len(), 1);
        drop(w);
        assert!(names(&dir.0.join("tmp")).is_empty());
        assert!(q.list().unwrap().messages.is_empty());
    }

    #[test]
    fn a_crash_leftover_is_not_listed_and_is_cleaned_at_open() {
        let dir = TestDir::new("quarantine");
        let q = Quarantine::open_at(&dir.0, 1 << 20).unwrap();
        // What a writer killed mid-message leaves: a complete-looking file
        // in tmp/ that no process holds a lock on.
        let m = meta(&["x@example.test"]);
        let mut header = serde_json::to_vec(&HeaderOut {
            format: FORMAT,
            meta: &m,
        })
        .unwrap();
        header.push(b'\n');
        header.extend_from_slice(b"Subject: half a mess");
        fs::write(dir.0.join("tmp").join(m.id.as_str()), &header).unwrap();
        // A writer still at work in this process (as the daemon would be
        // while the CLI opens the same directory).
        let mut live = q.begin(meta(&["y@example.test"])).unwrap();
        live.write(b"Subject: still coming\r\n").unwrap();

        assert!(q.list().unwrap().messages.is_empty());
        let again = Quarantine::open_at(&dir.0, 1 << 20).unwrap();
        assert_eq!(names(&dir.0.join("tmp")), vec![live.id().to_string()]);
        let live_id = live.commit().unwrap();
        let listed: Vec<QuarantineId> = again
            .list()
            .unwrap()
            .messages
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(listed, vec![live_id]);
    }

    #[test]
    fn an_oversize_message_is_refused_and_not_kept() {
        let dir = TestDir::new("quarantine");
        let q = Quarantine::open_at(&dir.0, 100).unwrap();
        let mut w = q.begin(meta(&["x@example.test"])).unwrap();
        w.write(&[b'a'; 60]).unwrap();
        assert_eq!(w.written(), 60);
        w.write(&[b'b'; 60]).unwrap();
        assert!(w.is_over_limit());
        assert!(matches!(
            w.commit(),
            Err(QuarantineError::TooLarge { limit: 100 })
        ));
        assert!(names(&dir.0.join("tmp")).is_empty());
        assert!(q.list().unwrap().messages.is_empty());

        // Exactly at the limit is fine.
        let id = store(&q, meta(&["x@example.test"]), &[b'c'; 100]);
        assert_eq!(q.show(&id).unwrap().1.len(), 100);
    }

    #[test]
    fn foreign_and_damaged_files_are_reported_not_hidden() {
        let dir = TestDir::new("quarantine");
        let q = Quarantine::open_at(&dir.0, 1 << 20).unwrap();
        let good = store(&q, meta(&["x@example.test"]), MESSAGE);
        let new = dir.0.join("new");
        fs::write(new.join("notes.txt"), b"hello").unwrap();
        let (other, _) = QuarantineId::generate(SystemTime::now());
        fs::write(
            new.join(other.as_str()),
            b"{\"format\":\"something-else\"}\nxx",
        )
        .unwrap();
        // A good file under another id's name (renamed by hand?).
        let (renamed, _) = QuarantineId::generate(SystemTime::now());
        fs::copy(new.join(good.as_str()), new.join(renamed.as_str())).unwrap();

        let listing = q.list().unwrap();
        assert_eq!(listing.messages.len(), 1);
        assert_eq!(listing.messages[0].id, good);
        assert_eq!(listing.skipped.len(), 3, "{:?}", listing.skipped);
        assert!(listing
            .skipped
            .iter()
            .all(|e| matches!(e, QuarantineError::Corrupt { .. })));
    }

    #[test]
    fn a_message_being_released_cannot_be_deleted() {
        let dir = TestDir::new("quarantine");
        let q = Quarantine::open_at(&dir.0, 1 << 20).unwrap();
        let id = store(&q, meta(&["x@example.test"]), MESSAGE);
        let held = q.lock_message(&id).unwrap();
        assert!(matches!(q.delete(&id), Err(QuarantineError::Busy(_))));
        drop(held);
        q.delete(&id).unwrap();
    }

    #[tokio::test]
    async fn the_async_writer_streams_without_holding_the_message() {
        let dir = TestDir::new("quarantine");
        let q = Quarantine::open_at(&dir.0, 1 << 20).unwrap();
        let message: Vec<u8> = (0..300_000u32)
            .map(|i| b"abcdefgh\r\n"[(i % 10) as usize])
            .collect();
        let m = meta(&["x@example.test"]);
        let mut w = q.begin_async(m.clone()).await.unwrap();
        assert_eq!(w.id(), &m.id);
        for piece in message.chunks(1500) {
            w.write(piece).await.unwrap();
        }
        let id = w.commit().await.unwrap();
        assert!(q.show(&id).unwrap().1 == message, "stored bytes differ");

        // Over the limit: refused, nothing left behind.
        let mut w = q.begin_async(meta(&["x@example.test"])).await.unwrap();
        for _ in 0..20 {
            w.write(&[b'z'; 65536]).await.unwrap();
        }
        assert!(matches!(
            w.commit().await,
            Err(QuarantineError::TooLarge { .. })
        ));

        // Dropped: the temp file goes (on the blocking pool).
        let mut w = q.begin_async(meta(&["x@example.test"])).await.unwrap();
        w.write(b"abandoned\r\n").await.unwrap();
        drop(w);
        for _ in 0..100 {
            if names(&dir.0.join("tmp")).is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(names(&dir.0.join("tmp")).is_empty());
        assert_eq!(q.list().unwrap().messages.len(), 1);
    }
}
