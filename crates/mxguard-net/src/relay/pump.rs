//! One direction of a relayed session: bytes from `src` to `dst`, ending in
//! a half-close. A turn is read into the thread's read buffer and written
//! at once; in splice mode a bulk burst goes through a pipe (see
//! [`Holding`]).
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
//! sender), and lets the pump hand its pipe or spilled bytes' memory back
//! whenever it waits for the source, so an idle session holds neither.

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
use crate::sockets::{read_turn_to_close, send_before_shutdown, with_turn_buffer, TURN_BUFFER};

/// A direction that has spliced this much (a default pipe's worth), and
/// still fills half its pipe per read, is a bulk transfer, and its pipe
/// grows. Since small turns are copied, growing after the first 64 KiB
/// rather than the first MiB made 1 MB messages ~7 % faster at ~15 % less
/// CPU per GB, and 10 MB ones no slower (A/B in `bench/analysis.md`; with
/// every turn spliced it had made 1 MB messages 1-4 % slower).
const GROW_AFTER: u64 = 64 << 10;

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
///
/// Every turn is first read into the thread's read buffer and written
/// at once: one `recv` and one `send`, the fewest system calls a turn can
/// take (a pipe takes a splice each way, another to find the socket empty,
/// and a `FIONREAD` before it goes back to the pool). In splice mode a read
/// that fills the buffer is a bulk burst: the next reads go through
/// a pipe, zero-copy, until one brings less than that buffer holds (HAProxy's
/// `splice-auto` decides the same way).
#[derive(Debug)]
struct Holding {
    mode: RelayMode,
    /// Read into the thread's buffer but not yet written (a write fell
    /// short): `spill[sent..]` is still to go.
    spill: Vec<u8>,
    sent: usize,
    /// Splice mode: the burst goes through the pipe.
    bulk: bool,
    pipe: Option<Pipe>,
    /// Bytes spliced into the pipe and not yet out of it.
    piped: usize,
    /// The last splice into the pipe filled at least half of it.
    full: bool,
    /// Bytes spliced in this direction so far. Past [`GROW_AFTER`], a
    /// read that fills half the pipe is a bulk transfer, worth a big pipe
    /// (see `pipe.rs`).
    total: u64,
}

/// Which socket a copying turn's error came from.
enum Side {
    Src,
    Dst,
}

/// What a read did.
enum Filled {
    /// The end of the stream.
    Eof,
    /// `n` bytes read, of which `written` are already written to `dst`;
    /// `eof`: the end of the stream came with them.
    Moved { n: usize, written: usize, eof: bool },
}

impl Holding {
    fn new(mode: RelayMode) -> Holding {
        Holding {
            mode,
            spill: Vec::new(),
            sent: 0,
            bulk: false,
            pipe: None,
            piped: 0,
            full: false,
            total: 0,
        }
    }

    fn held(&self) -> usize {
        self.piped + (self.spill.len() - self.sent)
    }

    /// The next read goes through a pipe (taken lazily: a pump that never
    /// sees a bulk burst never takes one).
    fn splices(&self) -> bool {
        self.bulk && self.mode == RelayMode::Splice
    }

    fn acquire_pipe(&mut self) -> io::Result<()> {
        match &mut self.pipe {
            None => self.pipe = Some(Pipe::take()?),
            // Grown only between chunks, with the pipe empty.
            Some(pipe)
                if self.full && self.total >= GROW_AFTER && self.piped == 0 && !pipe.is_big() =>
            {
                pipe.grow()
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Hand back the pipe and the spill's memory; only called with nothing
    /// held.
    fn release(&mut self) {
        debug_assert_eq!(self.held(), 0, "released while holding bytes");
        if self.held() != 0 {
            return;
        }
        if let Some(pipe) = self.pipe.take() {
            pipe.give_back();
        }
        self.spill = Vec::new();
        self.sent = 0;
    }

    /// One splice from `src` into the pipe (0: EOF). To be called inside
    /// `src.try_io(READABLE, ..)` with nothing held and a pipe acquired.
    fn splice_from(&mut self, src: &TcpStream) -> io::Result<usize> {
        debug_assert_eq!(self.held(), 0);
        let pipe = self.pipe.as_ref().ok_or_else(not_acquired)?;
        // As much as the pipe holds: one splice each way per pipe full.
        // (The kernel may still stop short: a pipe has a page per slot, and
        // a socket's small fragments use whole slots.)
        let n = splice(
            src.as_fd(),
            None,
            pipe.write_end(),
            None,
            pipe.capacity(),
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )?;
        self.piped += n;
        self.full = n >= pipe.capacity() / 2;
        self.total = self.total.saturating_add(n as u64);
        // A small chunk: the burst is over, the next turn is copied.
        if n < TURN_BUFFER {
            self.bulk = false;
        }
        Ok(n)
    }

    /// One read from `src` into the thread's read buffer, written to
    /// `dst` at once as far as it takes it; the rest is spilled, to be
    /// written when `dst` is writable. With nothing held. An error says
    /// which side it came from.
    ///
    /// `goodbyes`: `src` is the MTA. When a read ends in its goodbye (see
    /// [`says_goodbye`]), one more read looks for its FIN; found, the bytes
    /// go with `MSG_MORE` and the caller's shutdown of `dst` follows at
    /// once, so the client gets the reply and the end of the stream in
    /// one segment, as the MTA sent them, not two.
    fn copy(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        goodbyes: bool,
    ) -> Result<Filled, (Side, io::Error)> {
        debug_assert_eq!(self.held(), 0);
        // The bytes are in it only during this call: what a short write
        // leaves is copied out.
        with_turn_buffer(|buf| self.copy_via(src, dst, buf, goodbyes))
    }

    fn copy_via(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        buf: &mut [u8],
        goodbyes: bool,
    ) -> Result<Filled, (Side, io::Error)> {
        // A short read clears the socket's readiness (see `read_turn`).
        let (n, eof) = read_turn_to_close(src, buf, |bytes| goodbyes && says_goodbye(bytes))
            .map_err(|e| (Side::Src, e))?;
        if n == 0 {
            return Ok(Filled::Eof);
        }
        self.bulk = n == buf.len();
        // Written at once if `dst` was writable when last seen (tokio's
        // readiness: no system call if it was not).
        let sent = if eof {
            send_before_shutdown(dst, &buf[..n])
        } else {
            dst.try_io(Interest::WRITABLE, || {
                Ok(send(dst.as_raw_fd(), &buf[..n], MsgFlags::MSG_NOSIGNAL)?)
            })
        };
        let written = match sent {
            Ok(m) => m,
            Err(e) if is_retry(&e) => 0,
            Err(e) => return Err((Side::Dst, e)),
        };
        if written < n {
            self.spill.extend_from_slice(&buf[written..n]);
            self.sent = 0;
        }
        Ok(Filled::Moved { n, written, eof })
    }

    /// One write of held bytes to `dst`, and how they went (copied from
    /// the spill or spliced from the pipe). To be called inside
    /// `dst.try_io(WRITABLE, ..)` with bytes held.
    fn drain_into(&mut self, dst: &TcpStream) -> io::Result<(usize, RelayMode)> {
        debug_assert!(self.held() > 0);
        if self.sent < self.spill.len() {
            let n = send(
                dst.as_raw_fd(),
                &self.spill[self.sent..],
                MsgFlags::MSG_NOSIGNAL,
            )?;
            self.sent += n;
            if self.sent == self.spill.len() {
                self.spill.clear();
                self.sent = 0;
            }
            return Ok((n, RelayMode::Copy));
        }
        let pipe = self.pipe.as_ref().ok_or_else(not_acquired)?;
        // A peer that is gone makes this EPIPE; SIGPIPE is ignored by the
        // Rust runtime, as in every Rust binary.
        let n = splice(
            pipe.read_end(),
            None,
            dst.as_fd(),
            None,
            self.piped,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )?;
        debug_assert!(n <= self.piped, "spliced out more than went in");
        self.piped -= n;
        Ok((n, RelayMode::Splice))
    }
}

/// Whether `bytes` end with the MTA's last words: a final reply line
/// (`221` or `421` and a space, or the bare code) ending in CRLF. RFC 5321
/// (4.2.2, 3.8): a server sends 221 only to close the channel (the answer
/// to QUIT), and closes after a 421. The relay does not parse the session
/// (after STARTTLS it is not even text), so this looks at one read's
/// bytes only; a wrong guess costs one `EAGAIN` read, and a missed one the
/// FIN in its own segment: the bytes go through either way.
pub(super) fn says_goodbye(bytes: &[u8]) -> bool {
    let Some(body) = bytes.strip_suffix(b"\r\n") else {
        return false;
    };
    let line = match body.iter().rposition(|&b| b == b'\n') {
        Some(i) => &body[i + 1..],
        None => body,
    };
    matches!(line.get(..3), Some(b"221" | b"421")) && matches!(line.get(3), None | Some(b' '))
}

fn not_acquired() -> io::Error {
    io::Error::other("relay pump used before acquiring its pipe or buffer")
}

/// One direction of the relay.
#[derive(Debug)]
pub(super) struct Pump<'a> {
    dir: Direction,
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

    /// The other direction answered: a bulk burst this way is over, and
    /// the next turn is read and written at once, as small turns are. (A
    /// burst's last splice may bring 16 KiB or more and leave the flag on;
    /// an SMTP turn after a message body comes after the MTA's reply.)
    pub(super) fn end_burst(&mut self) {
        self.holding.bulk = false;
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
                    Ok((n, how)) => self.delivered_now(n, how, observer),
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
            if self.holding.splices() {
                if let Err(e) = self.holding.acquire_pipe() {
                    return Poll::Ready(Err(self.fault(Culprit::Local, e)));
                }
                let holding = &mut self.holding;
                let src = self.src;
                match src.try_io(Interest::READABLE, || holding.splice_from(src)) {
                    Ok(0) => self.src_eof = true,
                    Ok(n) => {
                        self.taken += n as u64;
                        self.active = true;
                    }
                    Err(e) if is_retry(&e) => {}
                    Err(e) => return Poll::Ready(Err(self.fault(self.src_culprit(), e))),
                }
                continue;
            }
            let goodbyes = self.dir == Direction::Downstream;
            match self.holding.copy(self.src, self.dst, goodbyes) {
                Ok(Filled::Eof) => self.src_eof = true,
                Ok(Filled::Moved { n, written, eof }) => {
                    self.taken += n as u64;
                    self.active = true;
                    // The shutdown follows in the next round, with nothing
                    // held, right after this write.
                    self.src_eof = eof;
                    if written > 0 {
                        self.delivered_now(written, RelayMode::Copy, observer);
                    }
                }
                Err((_, e)) if is_retry(&e) => {}
                Err((Side::Src, e)) => return Poll::Ready(Err(self.fault(self.src_culprit(), e))),
                Err((Side::Dst, e)) => return Poll::Ready(Err(self.fault(self.dst_culprit(), e))),
            }
        }
    }

    fn delivered_now(&mut self, n: usize, how: RelayMode, observer: &dyn RelayObserver) {
        self.delivered += n as u64;
        debug_assert!(self.delivered <= self.taken);
        self.active = true;
        observer.relayed(how, self.dir, n as u64);
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

#[cfg(test)]
mod tests {
    use super::says_goodbye;

    /// A final 221 or 421 line ending the bytes is a goodbye; anything
    /// else is not.
    #[test]
    fn only_a_final_221_or_421_line_is_a_goodbye() {
        let cases: [(&[u8], bool); 13] = [
            (b"221 2.0.0 Bye\r\n", true),
            (b"221\r\n", true),
            (b"421 4.4.2 mx.example Error: timeout exceeded\r\n", true),
            (b"250 2.0.0 Ok: queued as 1234\r\n221 2.0.0 Bye\r\n", true),
            (b"221-mx.example\r\n221 2.0.0 Bye\r\n", true),
            (b"", false),
            (b"250 2.0.0 Ok\r\n", false),
            // Not yet the final line, or not a whole line.
            (b"221-mx.example\r\n", false),
            (b"221 2.0.0 Bye", false),
            (b"221 2.0.0 Bye\n", false),
            (b"2210 x\r\n", false),
            (b"221 2.0.0 Bye\r\n250 ok\r\n", false),
            (b"\r\n", false),
        ];
        for (bytes, goodbye) in cases {
            assert_eq!(
                says_goodbye(bytes),
                goodbye,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
