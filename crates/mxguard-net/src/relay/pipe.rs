//! Kernel pipes for splice(2), and a small pool of spare ones.
//!
//! A relayed SMTP session is idle most of the time, and a pipe costs two
//! file descriptors (and the process may hold only so many), so a session
//! holds a pipe only while bytes are on their way: the pump takes one when
//! its source becomes readable and gives it back when it waits again with
//! the pipe empty. The pool spares the pipe2(2)/close(2) round trip on every
//! burst.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, PoisonError};

use nix::fcntl::OFlag;
use nix::unistd::pipe2;

/// Spare pipes kept for reuse; more than this are closed.
const MAX_SPARE: usize = 64;

static SPARE: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// A nonblocking, close-on-exec pipe.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A spare pipe, or a new one.
    pub(crate) fn take() -> io::Result<Pipe> {
        if let Some(pipe) = SPARE.lock().unwrap_or_else(PoisonError::into_inner).pop() {
            return Ok(pipe);
        }
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe { read, write })
    }

    /// Return an empty pipe to the pool.
    ///
    /// The pool is shared by every session, so a pipe that still held a byte
    /// would leak one client's data into another's stream. The caller's
    /// accounting says the pipe is empty; the kernel is asked as well, and a
    /// pipe it does not vouch for is closed instead.
    pub(crate) fn give_back(self) {
        let drained = self.is_drained();
        debug_assert!(drained, "pipe given back with bytes in it");
        if !drained {
            return;
        }
        let mut spare = SPARE.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.len() < MAX_SPARE {
            spare.push(self);
        }
    }

    pub(crate) fn read_end(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    pub(crate) fn write_end(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }

    /// The kernel says the pipe holds no byte.
    fn is_drained(&self) -> bool {
        matches!(self.queued(), Ok(0))
    }

    /// Bytes sitting in the pipe (`FIONREAD`).
    fn queued(&self) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: the fd is open (owned by `self`), and FIONREAD writes one
        // `c_int` through the pointer, which points at `n`.
        let rc = unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut n) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        usize::try_from(n).map_err(|_| io::Error::other("negative FIONREAD"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_with_bytes_in_it_is_not_drained() {
        let pipe = Pipe::take().unwrap();
        assert!(pipe.is_drained());
        nix::unistd::write(pipe.write_end(), b"secret").unwrap();
        assert_eq!(pipe.queued().unwrap(), 6);
        assert!(!pipe.is_drained());
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "pipe given back with bytes in it")]
    fn giving_back_a_full_pipe_is_an_accounting_bug() {
        let pipe = Pipe::take().unwrap();
        nix::unistd::write(pipe.write_end(), b"x").unwrap();
        pipe.give_back();
    }

    #[test]
    fn an_empty_pipe_is_reused() {
        Pipe::take().unwrap().give_back();
        assert!(Pipe::take().is_ok());
    }
}
