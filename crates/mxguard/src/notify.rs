//! systemd's service protocol (sd_notify(3)): `READY=1` once the
//! listeners are bound, `WATCHDOG=1` pings, `RELOADING=1`/`READY=1` around
//! a reload, `STOPPING=1` at drain.
//!
//! Written by hand rather than with the `sd-notify` crate: the protocol is
//! one datagram to the socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name after `@`), which std's `UnixDatagram` sends safely in a
//! few lines; owning it keeps `unsafe` and another dependency out of the
//! daemon and lets the e2e test play systemd with a plain socket. Without
//! `$NOTIFY_SOCKET` (not started by systemd) every call is a no-op.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tokio::sync::watch;

/// Sends `state` (e.g. `READY=1`) to systemd; false when there is no
/// systemd to tell or the datagram could not be sent.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr)),
        None => socket.send_to(state.as_bytes(), &path),
    };
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("sd_notify {state:?}: {e}");
            false
        }
    }
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC`, when it is
/// set for this process (`$WATCHDOG_PID` absent or ours).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog until shutdown, as long as every session thread
/// shows it is alive: if the main runtime or one of the session threads
/// stops making progress, the pings stop and systemd restarts the guard.
pub async fn watchdog(
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
    beats: std::sync::Arc<Heartbeats>,
) {
    // The first look a whole period after the start; a late tick is not
    // made up for with a burst.
    let start = tokio::time::Instant::now() + every;
    let mut tick = tokio::time::interval_at(start, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    notify("WATCHDOG=1");
    let mut stuck_before = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let stuck = beats.stalled(every);
                if stuck.is_empty() {
                    notify("WATCHDOG=1");
                } else if !stuck_before {
                    tracing::error!(
                        "session thread(s) {stuck:?} made no progress for {:?}: no watchdog ping",
                        every
                    );
                }
                stuck_before = !stuck.is_empty();
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// When each session thread last showed it was alive: a task on the
/// thread beats every [`Heartbeats::period`]. Read by the systemd
/// watchdog and by `/readyz`.
pub struct Heartbeats {
    base: tokio::time::Instant,
    /// Milliseconds after `base` of each thread's last beat.
    last: Vec<std::sync::atomic::AtomicU64>,
}

impl Heartbeats {
    /// Beats of `threads` threads, all counted as just now.
    pub fn new(threads: usize) -> Self {
        Self {
            base: tokio::time::Instant::now(),
            last: (0..threads).map(|_| Default::default()).collect(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Thread `index` is alive.
    pub fn beat(&self, index: usize) {
        if let Some(last) = self.last.get(index) {
            last.store(self.now_ms(), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// How long ago each thread beat.
    pub fn ages(&self) -> Vec<Duration> {
        let now = self.now_ms();
        self.last
            .iter()
            .map(|l| {
                Duration::from_millis(
                    now.saturating_sub(l.load(std::sync::atomic::Ordering::Relaxed)),
                )
            })
            .collect()
    }

    /// The threads that have not beaten for `max` or more.
    pub fn stalled(&self, max: Duration) -> Vec<usize> {
        stalled(&self.ages(), max)
    }

    /// How often a thread beats when the watchdog wants pings `every`
    /// (unset: none): several beats per ping, so one late beat does not
    /// cost a ping, and at least once a second for `/readyz`.
    pub fn period(every: Option<Duration>) -> Duration {
        let second = Duration::from_secs(1);
        every
            .map_or(second, |e| (e / 4).min(second))
            .max(Duration::from_millis(10))
    }
}

fn stalled(ages: &[Duration], max: Duration) -> Vec<usize> {
    ages.iter()
        .enumerate()
        .filter(|(_, age)| **age >= max)
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_does_not_beat_is_stalled() {
        let beats = Heartbeats::new(3);
        std::thread::sleep(Duration::from_millis(30));
        beats.beat(0);
        beats.beat(2);
        beats.beat(7); // no such thread: ignored
        assert_eq!(beats.stalled(Duration::from_millis(20)), vec![1]);
        assert!(beats.stalled(Duration::from_secs(5)).is_empty());
        assert_eq!(
            stalled(
                &[Duration::from_secs(1), Duration::from_secs(9)],
                Duration::from_secs(5)
            ),
            vec![1]
        );
    }

    #[test]
    fn beats_come_several_times_per_ping_and_at_least_every_second() {
        assert_eq!(
            Heartbeats::period(Some(Duration::from_secs(15))),
            Duration::from_secs(1)
        );
        assert_eq!(
            Heartbeats::period(Some(Duration::from_millis(200))),
            Duration::from_millis(50)
        );
        assert_eq!(Heartbeats::period(None), Duration::from_secs(1));
    }
}
