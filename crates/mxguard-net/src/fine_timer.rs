//! A timer with nanosecond resolution, for the few waits where tokio's
//! millisecond wheel is too coarse: tokio rounds every deadline up to its
//! next 1 ms tick and parks in whole milliseconds, so a wait ends 0–2 ms
//! late. The end of the greet delay is on every client's path.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A nonblocking `timerfd` on `CLOCK_MONOTONIC` (the clock of `Instant`),
/// watched by tokio. Must be created inside a tokio runtime.
pub struct FineTimer {
    fd: AsyncFd<Fd>,
}

struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl FineTimer {
    /// A disarmed timer.
    pub fn new() -> io::Result<Self> {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        // SAFETY: the descriptor registered is the timerfd that `Fd` owns;
        // the `AsyncFd` owns the `Fd`, so the descriptor stays open and
        // refers to the same timer until the `AsyncFd` is dropped (which
        // deregisters it first).
        let fd = unsafe { AsyncFd::register_with_interest(Fd(timer), Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Fires once, `after` from now (at least a nanosecond).
    pub fn arm(&self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        self.fd
            .get_ref()
            .0
            .set(
                Expiration::OneShot(TimeSpec::from_duration(after)),
                TimerSetTimeFlags::empty(),
            )
            .map_err(io::Error::from)
    }

    /// Waits until the armed time has passed.
    pub async fn fired(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}
