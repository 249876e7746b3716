//! Listening sockets and upstream connections, including the transparent
//! (TPROXY) variants.

use std::cell::RefCell;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes asked of one read of a turn: more than an SMTP turn, so that a
/// read that comes back short took all the socket had.
pub const TURN_BUFFER: usize = 16 * 1024;

thread_local! {
    /// The read buffer of every session on this thread, watched or
    /// relayed: a read's bytes are taken (the tracker keeps what it must,
    /// the relay writes them or spills the rest) before anything else runs
    /// on the thread, so a session needs no buffer of its own (it was
    /// 16 KiB of every watched session's memory, allocated and zeroed for
    /// each one; the relay's copy mode allocated one per turn).
    static TURN_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; TURN_BUFFER].into_boxed_slice());
}

/// Runs `f` with this thread's read buffer ([`TURN_BUFFER`] bytes, what the
/// last user left in it).
pub fn with_turn_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    TURN_BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        // Never nested; if it were, a buffer of its own rather than a panic.
        Err(_) => f(&mut vec![0u8; TURN_BUFFER]),
    })
}

/// One read of what a readable socket holds into `buf`, without waiting:
/// its count (0: end of stream), or `WouldBlock` if there was nothing.
///
/// A read shorter than `buf` took all a TCP socket had, so its readiness
/// is cleared now rather than by the `EAGAIN` of one more read (a system
/// call saved per turn); bytes or a FIN arriving later raise a new edge,
/// and tokio keeps readiness newer than the one it cleared. A FIN already
/// seen is not lost either: tokio never clears a socket's read-closed
/// readiness, so the next poll is ready at once and its read returns the
/// end of the stream.
pub fn read_turn(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    read_turn_to_close(stream, buf, |_| false).map(|(n, _)| n)
}

/// Drops the readability tokio assumes of an accepted socket. tokio marks
/// a socket from `accept` readable before any event, so that its first read
/// tries the socket at once — right where the client speaks first. In SMTP
/// the server does, so that read would be an `EAGAIN` in every session. No
/// byte is missed: registering the socket (`epoll_ctl(ADD)`) already queued
/// an event for anything the client sent before, which the runtime reports
/// at its next turn, and a later arrival raises its own.
pub fn forget_assumed_readable(stream: &TcpStream) {
    let _ = stream.try_io(Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

/// [`read_turn`] for a peer that may be about to close: `take` gets each
/// read's bytes and says whether they end the peer's side (an SMTP server
/// that answered `QUIT` closes next). If they do and the read was short,
/// one more read looks for the FIN that follows, so the end of the stream
/// comes with the last bytes — returned as `(bytes, true)` — and their
/// relay and our own FIN can leave in one segment ([`send_before_shutdown`])
/// instead of waiting for another wake-up. Where the FIN is not there yet
/// that read is the `EAGAIN` that clears the readiness, one system call
/// more than [`read_turn`]; `take` saying `false` makes it exactly
/// [`read_turn`] (which is this, so the short-read rule lives here once).
///
/// Each read appends to what the ones before left in `buf`: all the bytes
/// returned are in `buf[..bytes]`, and `take` sees each read's share of
/// them once. A read that fills what is left of `buf` leaves the readiness
/// set: more may be waiting.
pub fn read_turn_to_close(
    stream: &TcpStream,
    buf: &mut [u8],
    mut take: impl FnMut(&[u8]) -> bool,
) -> io::Result<(usize, bool)> {
    let mut total = 0;
    let mut eof = false;
    let read = stream.try_io(Interest::READABLE, || loop {
        let room = &mut buf[total..];
        let n = match (&*SockRef::from(stream)).read(room) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Nothing more for now: readiness cleared, the bytes returned.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
            // An error after bytes (a reset): the bytes first. The failed
            // read consumed the error, so the next one reads the end of the
            // stream.
            Err(_) if total > 0 => return Ok(()),
            Err(e) => return Err(e),
        };
        if n == 0 {
            // The end of the stream, or no room left (an empty `buf`).
            eof = !room.is_empty();
            return Ok(());
        }
        let full = n == room.len();
        let closing = take(&room[..n]);
        total += n;
        if full {
            // More may be waiting: the readiness stays.
            return Ok(());
        }
        if !closing {
            return Err(io::ErrorKind::WouldBlock.into());
        }
    });
    match read {
        Ok(()) => Ok((total, eof)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && total > 0 => Ok((total, false)),
        Err(e) => Err(e),
    }
}

/// Writes what may be written of `buf` without waiting, as the last bytes
/// before a `shutdown(SHUT_WR)` that the caller makes at once: `MSG_MORE`
/// keeps the tail of `buf` in the socket until the shutdown, whose FIN then
/// leaves in the same segment (one segment, and one receive on the peer,
/// less per session). Without that shutdown the tail would wait for the
/// peer's next ACK or the kernel's probe (~200 ms later): it must follow.
pub fn send_before_shutdown(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    stream.try_io(Interest::WRITABLE, || {
        SockRef::from(stream).send_with_flags(buf, libc::MSG_MORE | libc::MSG_NOSIGNAL)
    })
}

/// A nonblocking, close-on-exec TCP listener, ready to hand to
/// `tokio::net::TcpListener::from_std`.
///
/// `SO_REUSEADDR` is always set (a restart must not wait out TIME_WAIT);
/// so is `TCP_NODELAY`, which every accepted socket inherits from its
/// listener (the kernel clones the listener's options into the new
/// socket), so a session needs no `setsockopt` of its own; IPv6 listeners are `IPV6_V6ONLY`, so `[::]:25` and `0.0.0.0:25` can be
/// listened on side by side and an IPv6 socket only ever sees IPv6 clients.
/// `transparent` sets `IP_TRANSPARENT` / `IPV6_TRANSPARENT`, which TPROXY
/// needs to deliver connections for foreign addresses to this socket; it
/// requires `CAP_NET_ADMIN`.
pub fn bind_listener(
    addr: SocketAddr,
    transparent: bool,
    backlog: i32,
) -> io::Result<std::net::TcpListener> {
    bind(addr, transparent, backlog, false)
}

/// `count` listeners on one address, for `count` threads that each accept
/// their own share: with more than one, every socket is `SO_REUSEPORT` and
/// the kernel spreads new connections over them (by a hash of the
/// addresses), so a connection is accepted and served by one thread and
/// no wake-up crosses threads. Port 0 is resolved by the first socket and
/// the rest bind the port it got. Otherwise as [`bind_listener`].
///
/// `SO_REUSEPORT` would let a socket of the same user join the group (the
/// kernel checks the effective UID); a port already listened on is refused
/// with `AddrInUse` first, so a second guard on the same port fails to
/// start rather than taking a share of the connections.
pub fn bind_listeners(
    addr: SocketAddr,
    transparent: bool,
    backlog: i32,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let shared = count > 1;
    if shared && addr.port() != 0 {
        // A socket of our own user with SO_REUSEPORT on the port would let
        // this group join it and share its connections: a second guard
        // started by mistake would take half the traffic unnoticed. A plain
        // socket cannot bind beside a listener, so it finds one (and fails
        // with "address in use", as a single socket would) before the group
        // is bound.
        drop(bind(addr, transparent, backlog, false)?);
    }
    let first = bind(addr, transparent, backlog, shared)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(bind(bound, transparent, backlog, shared)?);
    }
    Ok(listeners)
}

fn bind(
    addr: SocketAddr,
    transparent: bool,
    backlog: i32,
    reuse_port: bool,
) -> io::Result<std::net::TcpListener> {
    // socket2 opens the socket with SOCK_CLOEXEC on Linux.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if transparent {
        set_transparent(&socket, addr)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Connect to the MTA, giving up with [`io::ErrorKind::TimedOut`] after
/// `timeout`. `TCP_NODELAY` is on: SMTP is a dialogue of short lines and
/// the replies we hold back must not be delayed once released.
///
/// With `bind` set, the socket is made transparent and bound to that
/// address before connecting, so that in TPROXY setups the MTA sees the
/// client's real address (pass port 0 to let the kernel pick the port).
/// This needs `CAP_NET_ADMIN` and a routing rule that brings the MTA's
/// replies back to this host; `bind` must be of the same family as `dst`.
///
/// The outcome of the non-blocking connect is read off the readiness the
/// kernel reports: writable with no error or hang-up is connected. Only a
/// failed connect asks for `SO_ERROR` (tokio's own connect asks every
/// time: one system call more per session).
pub async fn connect_upstream(
    dst: SocketAddr,
    bind: Option<SocketAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    // socket2 opens it with SOCK_CLOEXEC; SOCK_NONBLOCK in the same call.
    let socket = Socket::new(
        Domain::for_address(dst),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if let Some(src) = bind {
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot connect from {src} to {dst}: address families differ"),
            ));
        }
        set_transparent(&socket, src)?;
        socket.bind(&src.into())?;
    }
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    match tokio::time::timeout(timeout, stream.ready(Interest::WRITABLE)).await {
        Ok(ready) => {
            let ready = ready?;
            if ready.is_error() || ready.is_write_closed() {
                if let Some(e) = stream.take_error()? {
                    return Err(e);
                }
            }
            Ok(stream)
        }
        Err(_elapsed) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out after {timeout:?}"),
        )),
    }
}

/// `IP_TRANSPARENT` or `IPV6_TRANSPARENT`, by the family of `addr`.
fn set_transparent(socket: &Socket, addr: SocketAddr) -> io::Result<()> {
    let set = if addr.is_ipv4() {
        socket.set_ip_transparent_v4(true)
    } else {
        socket.set_ip_transparent_v6(true)
    };
    set.map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            io::Error::new(
                e.kind(),
                format!("transparent socket for {addr} needs CAP_NET_ADMIN: {e}"),
            )
        } else {
            e
        }
    })
}
