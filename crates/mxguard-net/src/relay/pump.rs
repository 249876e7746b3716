//! One direction of a relayed session: bytes from `src` to `dst`, through a
//! pipe (splice) or a small userspace buffer (copy), ending in a half-close.
//!
//! Lifecycle of a pump (`poll` drives it; it never blocks):
//!
//! ```text
//!   Reading ──src readable──► bytes held ──dst writable──► … until none held ──► Reading
//!   Reading ──src EOF───────► (held bytes flushed first) ──► shutdown(dst, Write) ──► Done
//!   any I/O error ──► Fault, blamed on src, dst, or our own plumbing
//! ```
//!
//! The pump only reads when nothing is held. That keeps the splice EAGAIN
//! unambiguous (with an empty pipe it can only mean "socket has no data"),
//! gives natural backpressure (a slow receiver stops us reading its
//! sender), and lets the pump hand its pipe or buffer back whenever it waits
//! for the source, so an idle session holds neither.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::task::{ready, Context, Poll};

use nix::fcntl::{splice, SpliceFFlags};
use nix::sys::socket::{send, MsgFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::pipe::Pipe;
use super::{Direction, RelayMode, RelayObserver};

/// A direction that has moved this much, and still fills half its pipe per
/// read, is a bulk transfer, and its pipe grows. Not sooner: most mail is
/// smaller, and 1 MB messages were 1-4 % slower with the pipe grown after
/// their first 64 KiB, while 10 MB ones gain as much either way (A/B in
/// `bench/analysis.md`).
const GROW_AFTER: u64 = 1 << 20;

/// Userspace buffer per direction in copy mode.
const COPY_BUFFER: usize = 16 * 1024;

/// Who a failed I/O call is blamed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Culprit {
    Client,
    Upstream,
    /// Our own plumbing (no pipe: out of file descriptors).
    Local,
}

#[derive(Debug)]
pub(super) struct Fault {
    pub(super) culprit: Culprit,
    pub(super) error: io::Error,
}

/// Where the bytes wait between the read from `src` and the write to `dst`.
#[derive(Debug)]
enum Holding {
    Splice {
        pipe: Option<Pipe>,
        /// Bytes spliced into the pipe and not yet out of it.
        held: usize,
        /// The last read filled at least half the pipe.
        full: bool,
        /// Bytes read in this direction so far. Past [`GROW_AFTER`], a read
        /// that fills half the pipe is a bulk transfer, worth a big pipe
        /// (see `pipe.rs`).
        total: u64,
    },
    Copy {
        buf: Option<Box<[u8]>>,
        /// `buf[start..end]` is still to be written.
        start: usize,
        end: usize,
    },
}

impl Holding {
    fn new(mode: RelayMode) -> Holding {
        match mode {
            RelayMode::Splice => Holding::Splice {
                pipe: None,
                held: 0,
                full: false,
                total: 0,
            },
            RelayMode::Copy => Holding::Copy {
                buf: None,
                start: 0,
                end: 0,
            },
        }
    }

    fn held(&self) -> usize {
        match self {
            Holding::Splice { held, .. } => *held,
            Holding::Copy { start, end, .. } => end - start,
        }
    }

    /// Get a pipe or a buffer, lazily: a pump that never sees a byte never
    /// allocates one.
    fn acquire(&mut self) -> io::Result<()> {
        match self {
            Holding::Splice {
                pipe,
                held,
                full,
                total,
            } => match pipe {
                None => *pipe = Some(Pipe::take()?),
                // Grown only between chunks, with the pipe empty.
                Some(pipe) if *full && *total >= GROW_AFTER && *held == 0 && !pipe.is_big() => {
                    pipe.grow()
                }
                Some(_) => {}
            },
            Holding::Copy { buf, .. } => {
                if buf.is_none() {
                    *buf = Some(vec![0; COPY_BUFFER].into_boxed_slice());
                }
            }
        }
        Ok(())
    }

    /// Hand back the pipe or buffer; only called with nothing held.
    fn release(&mut self) {
        debug_assert_eq!(self.held(), 0, "released while holding bytes");
        match self {
            Holding::Splice { pipe, held: 0, .. } => {
                if let Some(pipe) = pipe.take() {
                    pipe.give_back();
                }
            }
            Holding::Copy {
                buf, start, end, ..
            } if start == end => {
                *buf = None;
                *start = 0;
                *end = 0;
            }
            _ => {}
        }
    }

    /// One read from `src` into the pipe or buffer (0: EOF). To be called
    /// inside `src.try_io(READABLE, ..)` with nothing held.
    fn fill_from(&mut self, src: &TcpStream) -> io::Result<usize> {
        debug_assert_eq!(self.held(), 0);
        match self {
            Holding::Splice {
                pipe,
                held,
                full,
                total,
            } => {
                let pipe = pipe.as_ref().ok_or_else(not_acquired)?;
                // As much as the pipe holds: one splice each way per pipe
                // full. (The kernel may still stop short: a pipe has a page
                // per slot, and a socket's small fragments use whole slots.)
                let n = splice(
                    src.as_fd(),
                    None,
                    pipe.write_end(),
                    None,
                    pipe.capacity(),
                    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
                )?;
                *held += n;
                *full = n >= pipe.capacity() / 2;
                *total = total.saturating_add(n as u64);
                Ok(n)
            }
            Holding::Copy { buf, start, end } => {
                let buf = buf.as_mut().ok_or_else(not_acquired)?;
                let n = nix::unistd::read(src.as_fd(), buf)?;
                *start = 0;
                *end = n;
                Ok(n)
            }
        }
    }

    /// One write of held bytes to `dst`. To be called inside
    /// `dst.try_io(WRITABLE, ..)` with bytes held.
    fn drain_into(&mut self, dst: &TcpStream) -> io::Result<usize> {
        debug_assert!(self.held() > 0);
        match self {
            Holding::Splice { pipe, held, .. } => {
                let pipe = pipe.as_ref().ok_or_else(not_acquired)?;
                // A peer that is gone makes this EPIPE; SIGPIPE is ignored
                // by the Rust runtime, as in every Rust binary.
                let n = splice(
                    pipe.read_end(),
                    None,
                    dst.as_fd(),
                    None,
                    *held,
                    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
                )?;
                debug_assert!(n <= *held, "spliced out more than went in");
                *held -= n;
                Ok(n)
            }
            Holding::Copy { buf, start, end } => {
                let buf = buf.as_ref().ok_or_else(not_acquired)?;
                let n = send(
                    dst.as_fd().as_raw_fd(),
                    &buf[*start..*end],
                    MsgFlags::MSG_NOSIGNAL,
                )?;
                *start += n;
                Ok(n)
            }
        }
    }
}

fn not_acquired() -> io::Error {
    io::Error::other("relay pump used before acquiring its pipe or buffer")
}

/// One direction of the relay.
#[derive(Debug)]
pub(super) struct Pump<'a> {
    dir: Direction,
    mode: RelayMode,
    src: &'a TcpStream,
    dst: &'a TcpStream,
    holding: Holding,
    /// Bytes read from `src`.
    taken: u64,
    /// Bytes written to `dst`.
    delivered: u64,
    src_eof: bool,
    done: bool,
    /// A byte moved since [`Pump::take_activity`] last asked.
    active: bool,
}

impl<'a> Pump<'a> {
    pub(super) fn new(
        dir: Direction,
        mode: RelayMode,
        src: &'a TcpStream,
        dst: &'a TcpStream,
    ) -> Pump<'a> {
        Pump {
            dir,
            mode,
            src,
            dst,
            holding: Holding::new(mode),
            taken: 0,
            delivered: 0,
            src_eof: false,
            done: false,
            active: false,
        }
    }

    pub(super) fn delivered(&self) -> u64 {
        self.delivered
    }

    pub(super) fn is_done(&self) -> bool {
        self.done
    }

    /// Whether a byte moved since the last call.
    pub(super) fn take_activity(&mut self) -> bool {
        std::mem::take(&mut self.active)
    }

    fn src_culprit(&self) -> Culprit {
        match self.dir {
            Direction::Upstream => Culprit::Client,
            Direction::Downstream => Culprit::Upstream,
        }
    }

    fn dst_culprit(&self) -> Culprit {
        match self.dir {
            Direction::Upstream => Culprit::Upstream,
            Direction::Downstream => Culprit::Client,
        }
    }

    fn fault(&self, culprit: Culprit, error: io::Error) -> Fault {
        Fault { culprit, error }
    }

    /// Move bytes until both sockets would block (Pending), or the source
    /// ended and the destination was half-closed (Ready(Ok)), or an error.
    ///
    /// Each readiness poll spends tokio's cooperative budget, so a firehose
    /// in one direction cannot starve the other or the rest of the runtime.
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        observer: &dyn RelayObserver,
    ) -> Poll<Result<(), Fault>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }

            if self.holding.held() > 0 {
                if let Err(e) = ready!(self.dst.poll_write_ready(cx)) {
                    return Poll::Ready(Err(self.fault(self.dst_culprit(), e)));
                }
                let holding = &mut self.holding;
                let dst = self.dst;
                match dst.try_io(Interest::WRITABLE, || holding.drain_into(dst)) {
                    Ok(n) => {
                        self.delivered += n as u64;
                        debug_assert!(self.delivered <= self.taken);
                        self.active = true;
                        observer.relayed(self.mode, self.dir, n as u64);
                    }
                    Err(e) if is_retry(&e) => {}
                    Err(e) => return Poll::Ready(Err(self.fault(self.dst_culprit(), e))),
                }
                continue;
            }

            if self.src_eof {
                // Everything read has been written: pass the EOF on, and
                // leave the other direction running (SMTP servers answer
                // QUIT after the client stopped sending).
                debug_assert_eq!(self.taken, self.delivered, "bytes lost at EOF");
                self.holding.release();
                if let Err(e) = SockRef::from(self.dst).shutdown(Shutdown::Write) {
                    return Poll::Ready(Err(self.fault(self.dst_culprit(), e)));
                }
                self.done = true;
                continue;
            }

            match self.src.poll_read_ready(cx) {
                Poll::Pending => {
                    self.holding.release();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.fault(self.src_culprit(), e))),
                Poll::Ready(Ok(())) => {}
            }
            if let Err(e) = self.holding.acquire() {
                return Poll::Ready(Err(self.fault(Culprit::Local, e)));
            }
            let holding = &mut self.holding;
            let src = self.src;
            match src.try_io(Interest::READABLE, || holding.fill_from(src)) {
                Ok(0) => self.src_eof = true,
                Ok(n) => {
                    self.taken += n as u64;
                    self.active = true;
                }
                Err(e) if is_retry(&e) => {}
                Err(e) => return Poll::Ready(Err(self.fault(self.src_culprit(), e))),
            }
        }
    }
}

/// WouldBlock (try_io has cleared the readiness; the next poll registers
/// interest) or EINTR: go round again.
fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}
