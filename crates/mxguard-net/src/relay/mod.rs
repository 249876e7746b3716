//! The relay: once inspection is over, move bytes both ways between the
//! client and the MTA until both sides are done, zero-copy where possible.
//!
//! Semantics (both modes):
//!
//! - Both directions run at once, in one future, without spawning.
//! - Half-close: EOF from one side is passed on as `shutdown(Write)` to the
//!   other, after every byte read before it has been written; the other
//!   direction keeps going until its own EOF. The relay returns
//!   `Ok(stats)` when both directions have ended this way. When the MTA's
//!   bytes end in its goodbye (a final `221` or `421` line), its FIN is
//!   looked for at once, and the bytes and the client's FIN leave in one
//!   segment (`pump::says_goodbye`).
//! - A reset or any other error on either socket ends the relay at once
//!   with a [`RelayError`] naming the side it came from.
//! - Idle timeout: no byte in either direction for `idle` ends the relay
//!   with [`RelayError::Idle`]. A byte either way resets it, so a slow
//!   one-way transfer is not idle.
//!
//! The future holds no pipe, buffer or heap allocation until bytes flow, and
//! gives them back whenever both sockets wait again (see `pipe.rs`), so tens
//! of thousands of idle sessions cost little more than their sockets.

mod pipe;
mod pump;

use std::future::{poll_fn, Future};
use std::io;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use pump::{Culprit, Fault, Pump};

/// How the relay moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayMode {
    /// splice(2) through a kernel pipe per direction: bytes never enter
    /// userspace.
    Splice,
    /// read/write through a 16 KiB userspace buffer per direction.
    Copy,
}

impl RelayMode {
    /// The metric label: `splice` or `copy`.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayMode::Splice => "splice",
            RelayMode::Copy => "copy",
        }
    }
}

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to MTA.
    Upstream,
    /// MTA to client.
    Downstream,
}

impl Direction {
    /// The metric label: `upstream` or `downstream`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Upstream => "upstream",
            Direction::Downstream => "downstream",
        }
    }
}

/// Bytes delivered by a relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Client to upstream (written to the upstream socket).
    pub up: u64,
    /// Upstream to client (written to the client socket).
    pub down: u64,
}

/// Told about bytes as they are written to their destination (once per
/// splice or write call), so counters move during long sessions, not only
/// at their end.
///
/// Called from inside the relay's poll: keep it cheap and non-blocking
/// (an atomic add).
pub trait RelayObserver: Sync {
    /// `n` more bytes went `dir`.
    fn relayed(&self, mode: RelayMode, dir: Direction, n: u64);
}

/// Observes nothing.
impl RelayObserver for () {
    fn relayed(&self, _mode: RelayMode, _dir: Direction, _n: u64) {}
}

/// Why a relay ended early, and whose doing it was. Each variant carries the
/// bytes delivered until then.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading from or writing to the client failed (typically: it reset
    /// the connection).
    #[error("client connection failed: {error}")]
    Client {
        /// The failed call's error.
        error: io::Error,
        /// Bytes delivered before it.
        stats: RelayStats,
    },
    /// Reading from or writing to the upstream failed.
    #[error("upstream connection failed: {error}")]
    Upstream {
        /// The failed call's error.
        error: io::Error,
        /// Bytes delivered before it.
        stats: RelayStats,
    },
    /// No byte in either direction for `idle`.
    #[error("session idle for {idle:?}")]
    Idle {
        /// The idle timeout that expired.
        idle: Duration,
        /// Bytes delivered before it.
        stats: RelayStats,
    },
    /// Our own plumbing failed, e.g. no file descriptor left for a pipe.
    #[error("relay plumbing failed: {error}")]
    Local {
        /// The failed call's error.
        error: io::Error,
        /// Bytes delivered before it.
        stats: RelayStats,
    },
}

impl RelayError {
    /// Bytes delivered before the relay ended.
    pub fn stats(&self) -> RelayStats {
        match self {
            RelayError::Client { stats, .. }
            | RelayError::Upstream { stats, .. }
            | RelayError::Idle { stats, .. }
            | RelayError::Local { stats, .. } => *stats,
        }
    }

    /// The `io::ErrorKind` of the failure; [`io::ErrorKind::TimedOut`] for
    /// an idle timeout.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            RelayError::Client { error, .. }
            | RelayError::Upstream { error, .. }
            | RelayError::Local { error, .. } => error.kind(),
            RelayError::Idle { .. } => io::ErrorKind::TimedOut,
        }
    }
}

impl From<RelayError> for io::Error {
    fn from(e: RelayError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// Relay bytes between `client` and `upstream` until both directions have
/// ended (`Ok`), either socket fails, or neither moved a byte for `idle`
/// (see the module docs for the exact semantics).
///
/// The sockets are only borrowed: the caller closes them after, and must
/// not read or write them while the relay runs. Dropping the future stops
/// the relay; bytes already in a pipe are then lost, as with any connection
/// that is torn down.
///
/// Splice mode relies on `SIGPIPE` being ignored, as the Rust runtime does
/// in every Rust binary: splice(2) has no `MSG_NOSIGNAL`.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    mode: RelayMode,
    idle: Duration,
    observer: &dyn RelayObserver,
) -> Result<RelayStats, RelayError> {
    let mut up = Pump::new(Direction::Upstream, mode, client, upstream);
    let mut down = Pump::new(Direction::Downstream, mode, upstream, client);
    let mut last_activity = Instant::now();
    // Reset lazily: moving bytes only records the instant; the timer is
    // re-armed when it fires early, so a busy session costs no timer work.
    let mut idle_timer = pin!(tokio::time::sleep_until(idle_deadline(last_activity, idle)));

    poll_fn(|cx| {
        let stats = |up: &Pump<'_>, down: &Pump<'_>| RelayStats {
            up: up.delivered(),
            down: down.delivered(),
        };
        let (up_before, down_before) = (up.delivered(), down.delivered());
        let up_result = up.poll(cx, observer);
        let down_result = down.poll(cx, observer);
        // A turn the other way ends a bulk burst (see `Pump::end_burst`).
        if down.delivered() > down_before {
            up.end_burst();
        }
        if up.delivered() > up_before {
            down.end_burst();
        }
        if up.take_activity() | down.take_activity() {
            last_activity = Instant::now();
        }
        for result in [up_result, down_result] {
            if let Poll::Ready(Err(fault)) = result {
                return Poll::Ready(Err(relay_error(fault, stats(&up, &down))));
            }
        }
        if up.is_done() && down.is_done() {
            return Poll::Ready(Ok(stats(&up, &down)));
        }
        while idle_timer.as_mut().poll(cx).is_ready() {
            let deadline = idle_deadline(last_activity, idle);
            if Instant::now() >= deadline {
                return Poll::Ready(Err(RelayError::Idle {
                    idle,
                    stats: stats(&up, &down),
                }));
            }
            idle_timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await
}

/// `idle` after `last_activity`: a year when that has no number.
pub fn idle_deadline(last_activity: Instant, idle: Duration) -> Instant {
    // An absurdly long `idle` means "never"; a year is never enough.
    last_activity
        .checked_add(idle)
        .unwrap_or_else(|| last_activity + Duration::from_secs(365 * 24 * 3600))
}

fn relay_error(fault: Fault, stats: RelayStats) -> RelayError {
    let Fault { culprit, error } = fault;
    match culprit {
        Culprit::Client => RelayError::Client { error, stats },
        Culprit::Upstream => RelayError::Upstream { error, stats },
        Culprit::Local => RelayError::Local { error, stats },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::pipe::tests::{grown_here, set_cramped};
    use super::*;

    /// Two loopback connections: (client app, guard's client side) and
    /// (guard's upstream side, MTA app).
    async fn two_pairs() -> [TcpStream; 4] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut out = Vec::new();
        for _ in 0..2 {
            let (near, far) = tokio::join!(TcpStream::connect(addr), listener.accept());
            out.push(near.unwrap());
            out.push(far.unwrap().0);
        }
        let [client, guard_client, guard_upstream, mta]: [TcpStream; 4] = out.try_into().unwrap();
        [client, guard_client, guard_upstream, mta]
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Writes `bytes` and half-closes, reading everything the other side
    /// sends meanwhile, to its EOF.
    async fn send_and_read(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
        let (mut rd, mut wr) = stream.split();
        let mut got = Vec::new();
        let ((), r) = tokio::join!(
            async {
                wr.write_all(bytes).await.unwrap();
                wr.shutdown().await.unwrap();
            },
            rd.read_to_end(&mut got)
        );
        r.unwrap();
        got
    }

    /// Client sends `mail` and half-closes, the MTA sends `reply` and
    /// half-closes; returns what each received and the relay's result.
    async fn exchange(mail: &[u8], reply: &[u8]) -> (Vec<u8>, Vec<u8>, RelayStats) {
        let [mut client, guard_client, guard_upstream, mut mta] = two_pairs().await;
        let relay = relay(
            &guard_client,
            &guard_upstream,
            RelayMode::Splice,
            Duration::from_secs(30),
            &(),
        );
        let (stats, client_got, mta_got) = tokio::join!(
            relay,
            send_and_read(&mut client, mail),
            send_and_read(&mut mta, reply)
        );
        (mta_got, client_got, stats.unwrap())
    }

    /// A service user over `pipe-user-pages-soft` gets one-page pipes that
    /// the kernel will not grow: a bulk transfer still arrives whole, in
    /// order, with the half-close passed on and every byte counted.
    #[tokio::test(flavor = "current_thread")]
    async fn cramped_pipes_still_carry_every_byte() {
        set_cramped(true);
        let mail = pattern(1, (3 << 20) + 77);
        let reply = pattern(2, (1 << 20) + 5);
        let (mta_got, client_got, stats) = exchange(&mail, &reply).await;
        set_cramped(false);
        assert!(mta_got == mail, "the MTA got different bytes");
        assert!(client_got == reply, "the client got different bytes");
        assert_eq!(
            stats,
            RelayStats {
                up: mail.len() as u64,
                down: reply.len() as u64
            }
        );
    }

    /// A bulk transfer grows its pump's pipe once it has spliced 64 KiB
    /// (where the kernel allows it), and the big pipe waits in the pool
    /// afterwards, empty.
    #[tokio::test(flavor = "current_thread")]
    async fn a_bulk_transfer_grows_its_pipe_and_gives_it_back() {
        let mail = pattern(3, 8 << 20);
        let (mta_got, client_got, stats) = exchange(&mail, b"250 ok\r\n").await;
        assert!(mta_got == mail, "the MTA got different bytes");
        assert_eq!(client_got, b"250 ok\r\n");
        assert_eq!(stats.up, mail.len() as u64);
        if !pipe::big_pipes_refused() {
            assert!(grown_here() >= 1, "an 8 MiB transfer kept a default pipe");
            assert!(pipe::big_spares() >= 1, "no big pipe came back to the pool");
        }
    }

    /// Mail under 64 KiB, the common case, never takes a big pipe from the
    /// budget.
    #[tokio::test(flavor = "current_thread")]
    async fn a_message_under_64_kib_keeps_a_default_pipe() {
        let mail = pattern(4, 60 << 10);
        let (mta_got, _, stats) = exchange(&mail, b"250 ok\r\n").await;
        assert!(mta_got == mail, "the MTA got different bytes");
        assert_eq!(stats.up, mail.len() as u64);
        assert_eq!(grown_here(), 0);
    }
}
