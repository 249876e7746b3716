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
    // The first look a whole period after the start (a tick at once would
    // find no beat yet and call every thread stuck); a late tick is not
    // made up for with a burst.
    let start = tokio::time::Instant::now() + every;
    let mut tick = tokio::time::interval_at(start, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    notify("WATCHDOG=1");
    let mut last = beats.read();
    let mut stuck_before = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = beats.read();
                let stuck = stuck_threads(&last, &now);
                if stuck.is_empty() {
                    notify("WATCHDOG=1");
                } else if !stuck_before {
                    tracing::error!(
                        "session thread(s) {stuck:?} made no progress for {:?}: no watchdog ping",
                        every
                    );
                }
                stuck_before = !stuck.is_empty();
                last = now;
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// One counter per session thread, bumped by a task on that thread.
pub struct Heartbeats(Vec<std::sync::atomic::AtomicU64>);

impl Heartbeats {
    pub fn new(threads: usize) -> Self {
        Self((0..threads).map(|_| Default::default()).collect())
    }

    /// Thread `index` is alive.
    pub fn beat(&self, index: usize) {
        if let Some(counter) = self.0.get(index) {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn read(&self) -> Vec<u64> {
        self.0
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    /// How often a thread beats when pings go out `every`: several beats
    /// per ping, so one late beat does not cost a ping.
    pub fn period(every: Duration) -> Duration {
        (every / 4).max(Duration::from_millis(10))
    }
}

/// The threads whose counter did not move since the last ping.
fn stuck_threads(last: &[u64], now: &[u64]) -> Vec<usize> {
    last.iter()
        .zip(now)
        .enumerate()
        .filter(|(_, (a, b))| a == b)
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_whose_counter_stands_still_is_stuck() {
        let beats = Heartbeats::new(3);
        let before = beats.read();
        beats.beat(0);
        beats.beat(2);
        beats.beat(7); // no such thread: ignored
        assert_eq!(stuck_threads(&before, &beats.read()), vec![1]);
        let before = beats.read();
        for i in 0..3 {
            beats.beat(i);
        }
        assert!(stuck_threads(&before, &beats.read()).is_empty());
    }
}
