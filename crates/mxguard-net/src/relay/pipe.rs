//! Kernel pipes for splice(2), and a small pool of spare ones.
//!
//! A relayed SMTP session is idle most of the time, and a pipe costs two
//! file descriptors (and the process may hold only so many), so a session
//! holds a pipe only while bytes are on their way: the pump takes one when
//! a bulk burst starts (a small turn is copied, with no pipe) and gives it
//! back when it waits again with the pipe empty. The pool spares the pipe2(2)/close(2) round trip on every
//! burst.
//!
//! Big pipes. A default pipe holds 16 pages (64 KiB): a bulk transfer then
//! costs two splice calls, a TCP push and a wake-up of the receiver per
//! 64 KiB. A pump that has spliced 64 KiB and still fills half its pipe per
//! read grows its pipe to [`BIG_PIPE`] (`F_SETPIPE_SZ`), which cuts those
//! per-chunk costs by the ratio of the sizes. Pipe pages are accounted per user: once a user's
//! pipes hold more than `/proc/sys/fs/pipe-user-pages-soft` pages (16,384 by
//! default), an unprivileged user's *new* pipes get 2 pages instead of 16,
//! which would shrink every other session's pipe. So big pipes have a budget
//! of one eighth of that limit (8 pipes of 1 MiB by default), held by big
//! pipes in use and spare alike; past it, or when the kernel refuses
//! (`EPERM` over `pipe-max-size` or the limits, `ENOMEM`), a pump keeps the
//! pipe it has. Small sessions, the common case, never ask.
//!
//! An `EPERM` would come back on every burst, so after one no big pipe is
//! asked for until [`RETRY_REFUSED`] has passed or one of our big pipes was
//! closed (the user's pipes then hold fewer pages): the limits it hit move
//! with the user's other pipes and with sysctl, so a refusal is not for
//! good.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

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

/// How long big pipes are not asked for after the kernel refused one.
pub(crate) const RETRY_REFUSED: Duration = Duration::from_secs(10);

/// The kernel refused to grow a pipe for lack of privilege or over a limit:
/// stop asking for a while (each refusal costs a system call per burst).
#[cfg(not(test))]
static BIG_REFUSED: Refusal = Refusal::new();

/// When the kernel last refused a big pipe, in milliseconds of
/// [`clock_ms`] (0: it has not, or a big pipe was closed since).
pub(crate) struct Refusal {
    at_ms: AtomicU64,
}

impl Refusal {
    const fn new() -> Self {
        Self {
            at_ms: AtomicU64::new(0),
        }
    }

    /// A big pipe may be asked for (no refusal, or an old one).
    fn allows(&self, now_ms: u64) -> bool {
        let at = self.at_ms.load(Ordering::Relaxed);
        at == 0 || now_ms.saturating_sub(at) >= RETRY_REFUSED.as_millis() as u64
    }

    fn refused(&self, now_ms: u64) {
        self.at_ms.store(now_ms.max(1), Ordering::Relaxed);
    }

    /// One of our big pipes was closed: the user's pipes hold fewer pages.
    fn released(&self) {
        if self.at_ms.load(Ordering::Relaxed) != 0 {
            self.at_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// The refusal in force for this process (for each test thread its own,
/// so that a test's fake refusal does not stop another's big pipes).
fn refusal() -> &'static Refusal {
    #[cfg(test)]
    return tests::refusal();
    #[cfg(not(test))]
    &BIG_REFUSED
}

/// Milliseconds on a monotonic clock, from the first call (never 0).
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let ms = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
    #[cfg(test)]
    let ms = ms + tests::skew_ms();
    ms
}

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
        if self.big {
            return;
        }
        #[cfg(test)]
        if tests::cramped() {
            return;
        }
        debug_assert!(self.is_drained(), "pipe grown while holding bytes");
        // A spare big pipe needs no word from the kernel. (A test that
        // fakes the kernel's refusals leaves the shared pool alone.)
        #[cfg(test)]
        let pooled = !tests::faking_eperm();
        #[cfg(not(test))]
        let pooled = true;
        if pooled {
            if let Some(big) = lock(&BIG_SPARE).pop() {
                std::mem::replace(self, big).give_back();
                #[cfg(test)]
                tests::count_grown();
                return;
            }
        }
        let refused = refusal();
        if !refused.allows(clock_ms()) {
            return;
        }
        if !reserve_big() {
            return;
        }
        #[cfg(test)]
        let asked = tests::ask_kernel(&self.write);
        #[cfg(not(test))]
        let asked = fcntl(&self.write, FcntlArg::F_SETPIPE_SZ(BIG_PIPE as libc::c_int));
        match asked {
            Ok(n) => {
                self.capacity = usize::try_from(n).unwrap_or(BIG_PIPE);
                self.big = true;
                #[cfg(test)]
                tests::count_grown();
            }
            Err(e) => {
                BIG_PIPES.fetch_sub(1, Ordering::Relaxed);
                if matches!(e, nix::errno::Errno::EPERM) {
                    refused.refused(clock_ms());
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
            refusal().released();
        }
    }
}

/// Big pipes waiting in the pool.
#[cfg(test)]
pub(crate) fn big_spares() -> usize {
    lock(&BIG_SPARE).len()
}

/// The kernel refused a big pipe lately: none is asked for now.
#[cfg(test)]
pub(crate) fn big_pipes_refused() -> bool {
    !refusal().allows(clock_ms())
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
        /// This thread's refusal state (see [`super::refusal`]).
        static REFUSAL: &'static Refusal = Box::leak(Box::new(Refusal::new()));
        /// The kernel refuses this thread's big pipes with `EPERM`.
        static EPERM: Cell<bool> = const { Cell::new(false) };
        /// Times this thread asked the kernel for a big pipe.
        static ASKED: Cell<usize> = const { Cell::new(0) };
        /// How far this thread's clock is ahead.
        static SKEW_MS: Cell<u64> = const { Cell::new(0) };
    }

    pub(super) fn refusal() -> &'static Refusal {
        REFUSAL.with(|r| *r)
    }

    pub(super) fn faking_eperm() -> bool {
        EPERM.get()
    }

    pub(super) fn skew_ms() -> u64 {
        SKEW_MS.get()
    }

    /// `F_SETPIPE_SZ`, or the refusal this thread was told to fake.
    pub(super) fn ask_kernel(write: &OwnedFd) -> nix::Result<libc::c_int> {
        ASKED.set(ASKED.get() + 1);
        if EPERM.get() {
            return Err(nix::errno::Errno::EPERM);
        }
        fcntl(write, FcntlArg::F_SETPIPE_SZ(BIG_PIPE as libc::c_int))
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

    /// An `EPERM` (over `pipe-max-size`, or the user's pipes over their
    /// limits) stops the asking for a while, not until a restart: the
    /// kernel is asked again once [`RETRY_REFUSED`] has passed, or at once
    /// after one of our big pipes was closed.
    #[test]
    fn a_refused_big_pipe_is_asked_for_again_later_or_after_one_is_closed() {
        EPERM.set(true);
        let mut pipe = Pipe::take().unwrap();
        pipe.grow();
        assert_eq!(ASKED.get(), 1);
        assert!(!pipe.is_big());
        assert!(big_pipes_refused());
        pipe.grow();
        Pipe::take().unwrap().grow();
        assert_eq!(ASKED.get(), 1, "asked again at once after a refusal");

        SKEW_MS.set(RETRY_REFUSED.as_millis() as u64 - 100);
        pipe.grow();
        assert_eq!(ASKED.get(), 1, "asked again before the retry time");
        SKEW_MS.set(RETRY_REFUSED.as_millis() as u64);
        pipe.grow();
        assert_eq!(
            ASKED.get(),
            2,
            "never asked again: big pipes are off for good"
        );
        assert!(big_pipes_refused(), "refused again");

        // One of our big pipes closes: the user's pipes hold fewer pages.
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).unwrap();
        BIG_PIPES.fetch_add(1, Ordering::Relaxed);
        drop(Pipe {
            read,
            write,
            capacity: BIG_PIPE,
            big: true,
        });
        assert!(!big_pipes_refused());
        pipe.grow();
        assert_eq!(ASKED.get(), 3, "not asked after a big pipe was closed");
        EPERM.set(false);
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
