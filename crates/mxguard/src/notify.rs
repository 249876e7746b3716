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

/// Pings the watchdog from the runtime until shutdown: if the runtime
/// stops making progress, the pings stop and systemd restarts the guard.
pub async fn watchdog(every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => { notify("WATCHDOG=1"); }
            _ = shutdown.changed() => return,
        }
    }
}
