//! Kernel pipes for splice(2), and a small pool of spare ones.
//!
//! A relayed SMTP session is idle most of the time, and a pipe costs two
//! file descriptors (and the process may hold only so many), so a session
//! holds a pipe only while bytes are on their way: the pump takes one when
//! its source becomes readable and gives it back when it waits again with
//! the pipe empty. The pool spares the pipe2(2)/close(2) round trip on every
//! burst.
//!
//! Big pipes. A default pipe holds 16 pages (64 KiB): a bulk transfer then
//! costs two splice calls, a TCP push and a wake-up of the receiver per
//! 64 KiB. A pump that has moved a MiB and still fills half its pipe per
//! read grows its pipe to [`BIG_PIPE`] (`F_SETPIPE_SZ`), which cuts those
//! per-chunk costs by the ratio of the sizes. Pipe pages are accounted per user: once a user's
//! pipes hold more than `/proc/sys/fs/pipe-user-pages-soft` pages (16,384 by
//! default), an unprivileged user's *new* pipes get 2 pages instead of 16,
//! which would shrink every other session's pipe. So big pipes have a budget
//! of one eighth of that limit (8 pipes of 1 MiB by default), held by big
//! pipes in use and spare alike; past it, or when the kernel refuses
//! (`EPERM` over `pipe-max-size` or the limits, `ENOMEM`), a pump keeps the
//! pipe it has. Small sessions, the common case, never ask.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::unistd::pipe2;

/// Spare default pipes kept for reuse; more than this are closed.
const MAX_SPARE: usize = 64;

/// Spare big pipes kept for reuse (each still counts against the budget).
const MAX_BIG_SPARE: usize = 4;

/// The size a bulk pump's pipe grows to (also the default `pipe-max-size`,
/// the most an unprivileged process may ask for).
pub(crate) const BIG_PIPE: usize = 1 << 20;

/// The share of `pipe-user-pages-soft` big pipes may hold: 1/8.
const BUDGET_SHARE: usize = 8;

/// The budget when the soft limit cannot be read (kernel default 16,384
/// pages) or is 0 (no limit): 1/8 of the default either way.
const DEFAULT_SOFT_PAGES: usize = 16384;

/// What a pipe holds before and after F_SETPIPE_SZ is asked, when the
/// kernel is not asked: a default pipe (16 pages).
const DEFAULT_PIPE: usize = 64 * 1024;

static SPARE: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
static BIG_SPARE: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// Big pipes alive (in use or spare).
static BIG_PIPES: AtomicUsize = AtomicUsize::new(0);

/// The kernel refused to grow a pipe for lack of privilege or over a limit:
/// stop asking (each refusal costs a system call per burst).
static BIG_REFUSED: AtomicBool = AtomicBool::new(false);

/// A nonblocking, close-on-exec pipe.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the pipe can hold when its pages are full (`F_GETPIPE_SZ`).
    capacity: usize,
    /// Grown to a big pipe, counted in [`BIG_PIPES`].
    big: bool,
}

impl Pipe {
    /// A spare default pipe, or a new one.
    pub(crate) fn take() -> io::Result<Pipe> {
        #[cfg(test)]
        if tests::cramped() {
            return tests::cramped_pipe();
        }
        if let Some(pipe) = lock(&SPARE).pop() {
            return Ok(pipe);
        }
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A user over the soft limit gets smaller pipes than the default.
        let capacity = fcntl(&write, FcntlArg::F_GETPIPE_SZ)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(DEFAULT_PIPE);
        Ok(Pipe {
            read,
            write,
            capacity,
            big: false,
        })
    }

    /// Bytes the pipe can hold.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn is_big(&self) -> bool {
        self.big
    }

    /// Make this pipe a big one, if the budget and the kernel allow:
    /// exchanged for a spare big pipe when there is one, else grown in
    /// place. Only called with the pipe empty (an exchanged pipe goes back
    /// to the pool). On any refusal the pipe stays as it was: a smaller
    /// pipe only costs more system calls per byte.
    pub(crate) fn grow(&mut self) {
        if self.big || BIG_REFUSED.load(Ordering::Relaxed) {
            return;
        }
        #[cfg(test)]
        if tests::cramped() {
            return;
        }
        debug_assert!(self.is_drained(), "pipe grown while holding bytes");
        if let Some(big) = lock(&BIG_SPARE).pop() {
            std::mem::replace(self, big).give_back();
            #[cfg(test)]
            tests::count_grown();
            return;
        }
        if !reserve_big() {
            return;
        }
        match fcntl(&self.write, FcntlArg::F_SETPIPE_SZ(BIG_PIPE as libc::c_int)) {
            Ok(n) => {
                self.capacity = usize::try_from(n).unwrap_or(BIG_PIPE);
                self.big = true;
                #[cfg(test)]
                tests::count_grown();
            }
            Err(e) => {
                BIG_PIPES.fetch_sub(1, Ordering::Relaxed);
                if matches!(e, nix::errno::Errno::EPERM) {
                    BIG_REFUSED.store(true, Ordering::Relaxed);
                }
            }
        }
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
        #[cfg(test)]
        if tests::cramped() {
            return;
        }
        let (pool, max) = if self.big {
            (&BIG_SPARE, MAX_BIG_SPARE)
        } else {
            (&SPARE, MAX_SPARE)
        };
        let mut spare = lock(pool);
        if spare.len() < max {
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

impl Drop for Pipe {
    fn drop(&mut self) {
        if self.big {
            BIG_PIPES.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Big pipes waiting in the pool.
#[cfg(test)]
pub(crate) fn big_spares() -> usize {
    lock(&BIG_SPARE).len()
}

/// The kernel refused a big pipe once: no more are asked for.
#[cfg(test)]
pub(crate) fn big_pipes_refused() -> bool {
    BIG_REFUSED.load(Ordering::Relaxed)
}

fn lock(pool: &Mutex<Vec<Pipe>>) -> std::sync::MutexGuard<'_, Vec<Pipe>> {
    pool.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts one more big pipe if the budget has room.
fn reserve_big() -> bool {
    let max = big_budget();
    BIG_PIPES
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// How many big pipes the process may hold at once.
fn big_budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let soft = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        budget_for(soft)
    })
}

/// Big pipes allowed for a soft limit of `soft` pages (`None`: unreadable).
fn budget_for(soft: Option<usize>) -> usize {
    let soft = match soft {
        Some(0) | None => DEFAULT_SOFT_PAGES,
        Some(n) => n,
    };
    let page = 4096;
    soft / BUDGET_SHARE / (BIG_PIPE / page)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        /// This thread's pipes are as a user over `pipe-user-pages-soft`
        /// gets them: one page, never grown (the kernel's refusal).
        static CRAMPED: Cell<bool> = const { Cell::new(false) };
        /// Pipes this thread made big.
        static GROWN: Cell<usize> = const { Cell::new(0) };
    }

    /// Pipes made big on this thread so far.
    pub(crate) fn grown_here() -> usize {
        GROWN.get()
    }

    pub(super) fn count_grown() {
        GROWN.set(GROWN.get() + 1);
    }

    /// From now on, this thread's pipes are cramped (or not).
    pub(crate) fn set_cramped(on: bool) {
        CRAMPED.set(on);
    }

    pub(super) fn cramped() -> bool {
        CRAMPED.get()
    }

    pub(super) fn cramped_pipe() -> io::Result<Pipe> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(4096))?;
        Ok(Pipe {
            read,
            write,
            capacity: usize::try_from(capacity).unwrap_or(4096),
            big: false,
        })
    }

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

    #[test]
    fn a_new_pipe_knows_its_capacity() {
        let pipe = Pipe::take().unwrap();
        assert!(pipe.capacity() >= 4096, "{}", pipe.capacity());
        assert!(!pipe.is_big());
    }

    #[test]
    fn the_budget_is_an_eighth_of_the_soft_limit() {
        // 16,384 pages (the kernel's default) / 8 = 2,048 pages = 8 MiB.
        assert_eq!(budget_for(Some(16384)), 8);
        assert_eq!(budget_for(None), 8);
        assert_eq!(budget_for(Some(0)), 8, "no limit: still the default share");
        assert_eq!(budget_for(Some(2048)), 1);
        assert_eq!(
            budget_for(Some(1000)),
            0,
            "a tight limit: no big pipe at all"
        );
    }

    #[test]
    fn a_grown_pipe_holds_more_and_its_budget_comes_back() {
        let mut pipe = Pipe::take().unwrap();
        pipe.grow();
        if !pipe.is_big() {
            // Refused (unprivileged over pipe-max-size, or the budget is
            // used by other tests running at once): the pipe still works.
            nix::unistd::write(pipe.write_end(), b"x").unwrap();
            return;
        }
        assert!(pipe.capacity() >= BIG_PIPE);
        // A big pipe takes a whole big chunk without blocking.
        let chunk = vec![7u8; BIG_PIPE];
        let mut written = 0;
        while written < chunk.len() {
            written += nix::unistd::write(pipe.write_end(), &chunk[written..]).unwrap();
        }
        assert_eq!(pipe.queued().unwrap(), BIG_PIPE);
        let before = BIG_PIPES.load(Ordering::Relaxed);
        drop(pipe);
        assert_eq!(BIG_PIPES.load(Ordering::Relaxed), before - 1);
    }
}
