//! Writing one message into the quarantine, streaming: the session never
//! holds a whole message in memory.
//!
//! The order of [`QuarantineWriter::commit`] is what makes the `250` the
//! client hears true: data fsynced, then linked into `new/` (a name appears
//! only for a complete file), then `new/` fsynced (the name itself is on
//! disk), then return.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};

use super::{
    sync_dir, HeaderOut, Quarantine, QuarantineError, QuarantineId, QuarantineMeta, FORMAT,
    MAX_HEADER,
};

/// How much the async writer gathers before one trip to the blocking
/// pool: large enough that the hop costs nothing next to the write, small
/// enough that a thousand sessions in DATA hold 64 MiB, not their messages.
const CHUNK: usize = 64 * 1024;

/// A message being stored. Blocking; see [`AsyncQuarantineWriter`] for the
/// form the session uses.
pub struct QuarantineWriter {
    store: Quarantine,
    id: QuarantineId,
    /// The metadata as it will be committed.
    meta: QuarantineMeta,
    /// Bytes of the header line before its newline, padding included.
    header_room: usize,
    /// `meta` changed since the header was written.
    header_stale: bool,
    tmp_path: PathBuf,
    out: BufWriter<File>,
    /// Held until the file is committed or removed, so that
    /// [`Quarantine::open`] elsewhere knows it is not a crash leftover.
    /// Same open file description as `out`.
    _lock: Flock<File>,
    written: u64,
    over_limit: bool,
    committed: bool,
}

impl QuarantineWriter {
    pub(super) fn create(store: Quarantine, meta: QuarantineMeta) -> Result<Self, QuarantineError> {
        let header = header_line(&store, &meta, None)?;
        let header_room = header.len() - 1;

        let tmp_path = store.inner.tmp.join(meta.id.as_str());
        let (file, lock) = create_locked(&tmp_path)?;
        let mut out = BufWriter::with_capacity(CHUNK, file);
        out.write_all(&header)
            .map_err(|e| QuarantineError::io(&tmp_path, e))?;
        Ok(Self {
            store,
            id: meta.id.clone(),
            meta,
            header_room,
            header_stale: false,
            tmp_path,
            out,
            _lock: lock,
            written: 0,
            over_limit: false,
            committed: false,
        })
    }

    /// The id the message will have once committed.
    pub fn id(&self) -> &QuarantineId {
        &self.id
    }

    /// Replaces the names of the tests that fired (the message itself may
    /// fire more while it is stored). Written at commit if they fit the
    /// room the header line keeps; if not, commit fails (451, the sender
    /// retries) rather than store wrong metadata.
    pub fn set_tests(&mut self, tests: Vec<String>) {
        if tests != self.meta.tests {
            self.meta.tests = tests;
            self.header_stale = true;
        }
    }

    /// Message bytes stored so far.
    #[cfg(test)]
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether the message outgrew `max_message_size`: commit will fail
    /// with [`QuarantineError::TooLarge`].
    #[cfg(test)]
    pub fn is_over_limit(&self) -> bool {
        self.over_limit
    }

    /// Appends message bytes (dot-unstuffed, CRLF lines, exactly as the
    /// client meant them). Past the size limit the bytes are counted out
    /// and dropped rather than refused: the session still has to read the
    /// client's data up to the final dot before it can answer `552`, and a
    /// message we will refuse must not fill the disk meanwhile.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), QuarantineError> {
        if self.over_limit {
            return Ok(());
        }
        let total = self.written.saturating_add(bytes.len() as u64);
        if total > self.store.max_message_size() {
            self.over_limit = true;
            return Ok(());
        }
        self.out
            .write_all(bytes)
            .map_err(|e| QuarantineError::io(&self.tmp_path, e))?;
        self.written = total;
        Ok(())
    }

    /// Makes the message durable and returns its id. Only after this
    /// returns `Ok` may the client be told `250`.
    pub fn commit(mut self) -> Result<QuarantineId, QuarantineError> {
        if self.over_limit {
            return Err(QuarantineError::TooLarge {
                limit: self.store.max_message_size(),
            });
        }
        self.out
            .flush()
            .map_err(|e| QuarantineError::io(&self.tmp_path, e))?;
        if self.header_stale {
            // Tests the message itself fired (say, smuggling) join the
            // metadata: rewritten in place, in the room left for it.
            let header = header_line(&self.store, &self.meta, Some(self.header_room))?;
            std::os::unix::fs::FileExt::write_all_at(self.out.get_ref(), &header, 0)
                .map_err(|e| QuarantineError::io(&self.tmp_path, e))?;
        }
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| QuarantineError::io(&self.tmp_path, e))?;
        let final_path = self.store.message_path(&self.id);
        // link(2), not rename(2): it fails on an existing name, so even an
        // id collision could never overwrite a stored message.
        fs::hard_link(&self.tmp_path, &final_path)
            .map_err(|e| QuarantineError::io(&final_path, e))?;
        if let Err(e) = sync_dir(&self.store.inner.new) {
            // Not known to be durable: take it back, so that an error
            // means "not quarantined" and the client's retry is not a
            // duplicate. Failing that, a duplicate is still not a loss.
            let _ = fs::remove_file(&final_path);
            return Err(e);
        }
        self.committed = true;
        // The temp name is a second link to the stored file now; if this
        // unlink fails, the next open removes it, and new/ID stays.
        let _ = fs::remove_file(&self.tmp_path);
        Ok(self.id.clone())
    }
}

impl Drop for QuarantineWriter {
    fn drop(&mut self) {
        if !self.committed {
            // Runs before the fields drop, so the file is gone before the
            // lock is let go: a cleaner never sees it unlocked.
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

/// Creates `path` (0600, must not exist) and locks it. A cleaner in
/// another process can open a temp file in the instant between our create
/// and our lock and remove it; then the name no longer leads to our file,
/// and we start over.
fn create_locked(path: &std::path::Path) -> Result<(File, Flock<File>), QuarantineError> {
    let io_err = |e| QuarantineError::io(path, e);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        let lock_fd = file.try_clone().map_err(io_err)?;
        let lock = Flock::lock(lock_fd, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| io_err(errno.into()))?;
        let ours = file.metadata().map_err(io_err)?;
        match fs::symlink_metadata(path) {
            Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() => {
                return Ok((file, lock))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 3 => continue,
            Ok(_) | Err(_) => {
                return Err(io_err(io::Error::other(
                    "the temp file was removed while it was being created",
                )))
            }
        }
    }
}

/// The session's writer: the same steps as [`QuarantineWriter`], with the
/// file I/O on tokio's blocking pool so a slow disk never stalls the
/// runtime. Writes are gathered into 64 KiB chunks first.
///
/// Cancel-safe in the sense that matters: if a `write` or `commit` future
/// is dropped half-way, the blocking part finishes on its own and the
/// writer is dropped there, which removes the temp file; nothing
/// half-written is ever listed.
pub struct AsyncQuarantineWriter {
    inner: Option<QuarantineWriter>,
    id: QuarantineId,
    buf: Vec<u8>,
    total: u64,
    limit: u64,
}

impl AsyncQuarantineWriter {
    pub(super) fn new(writer: QuarantineWriter) -> Self {
        Self {
            id: writer.id().clone(),
            limit: writer.store.max_message_size(),
            inner: Some(writer),
            buf: Vec::with_capacity(CHUNK),
            total: 0,
        }
    }

    /// The id the message will have once committed.
    #[cfg(test)]
    pub fn id(&self) -> &QuarantineId {
        &self.id
    }

    /// Whether commit will fail with [`QuarantineError::TooLarge`].
    pub fn is_over_limit(&self) -> bool {
        self.total > self.limit
    }

    /// Appends message bytes; see [`QuarantineWriter::write`].
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), QuarantineError> {
        self.total = self.total.saturating_add(bytes.len() as u64);
        if self.is_over_limit() {
            // Counted, not stored: commit refuses it anyway.
            self.buf = Vec::new();
            return Ok(());
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK {
            let mut writer = self.take()?;
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            let store = writer.store.clone();
            let (writer, result) = store
                .blocking(move || {
                    let r = writer.write(&chunk);
                    Ok((writer, r))
                })
                .await?;
            self.inner = Some(writer);
            result?;
        }
        Ok(())
    }

    /// See [`QuarantineWriter::set_tests`].
    pub fn set_tests(&mut self, tests: Vec<String>) {
        if let Some(writer) = self.inner.as_mut() {
            writer.set_tests(tests);
        }
    }

    /// Makes the message durable and returns its id; see
    /// [`QuarantineWriter::commit`].
    pub async fn commit(mut self) -> Result<QuarantineId, QuarantineError> {
        let mut writer = self.take()?;
        if self.is_over_limit() {
            let limit = self.limit;
            drop_off_runtime(writer);
            return Err(QuarantineError::TooLarge { limit });
        }
        let chunk = std::mem::take(&mut self.buf);
        let store = writer.store.clone();
        store
            .blocking(move || {
                writer.write(&chunk)?;
                writer.commit()
            })
            .await
    }

    fn take(&mut self) -> Result<QuarantineWriter, QuarantineError> {
        // Only empty after a cancelled write (whose task removed the
        // file) or a failed hop to the blocking pool.
        self.inner.take().ok_or_else(|| {
            QuarantineError::io(
                std::path::Path::new(self.id.as_str()),
                io::Error::other("the quarantine writer was lost by an interrupted write"),
            )
        })
    }
}

impl Drop for AsyncQuarantineWriter {
    fn drop(&mut self) {
        if let Some(writer) = self.inner.take() {
            drop_off_runtime(writer);
        }
    }
}

/// Dropping a writer unlinks its temp file: blocking I/O, so on the
/// blocking pool when there is a runtime.
fn drop_off_runtime(writer: QuarantineWriter) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn_blocking(move || drop(writer));
        }
        Err(_) => drop(writer),
    }
}

/// Spare room in the header line for tests fired while the message is
/// stored: JSON allows the padding (whitespace) before the newline.
const HEADER_SPARE: usize = 256;

/// The header line with its newline. With `room`, padded to exactly that
/// many bytes before the newline (an error if it does not fit); without,
/// padded with [`HEADER_SPARE`] bytes.
fn header_line(
    store: &Quarantine,
    meta: &QuarantineMeta,
    room: Option<usize>,
) -> Result<Vec<u8>, QuarantineError> {
    let mut header = serde_json::to_vec(&HeaderOut {
        format: FORMAT,
        meta,
    })
    .map_err(|e| QuarantineError::io(&store.inner.tmp, io::Error::other(e)))?;
    let target = room.unwrap_or(header.len() + HEADER_SPARE);
    if header.len() > MAX_HEADER || header.len() > target {
        return Err(QuarantineError::io(
            &store.inner.tmp,
            io::Error::other(format!("metadata over {} bytes", target.min(MAX_HEADER))),
        ));
    }
    header.resize(target, b' ');
    header.push(b'\n');
    Ok(header)
}
