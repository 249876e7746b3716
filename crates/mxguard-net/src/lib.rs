//! Linux plumbing for mxguard: the socket options, listeners, upstream
//! connections and the zero-copy relay the daemon needs.
//!
//! This is the only mxguard crate allowed `unsafe`; every `unsafe` block says
//! why it is sound in a `// SAFETY:` comment, and safe `nix`/`socket2` calls
//! are used wherever they exist.
//!
//! # API
//!
//! ```text
//! // intercept: where the client meant to go (iptables REDIRECT)
//! pub fn original_dst(sock: &impl AsFd, local: SocketAddr) -> io::Result<SocketAddr>
//!
//! // listeners and upstream connections
//! pub fn bind_listener(addr: SocketAddr, transparent: bool, backlog: i32)
//!     -> io::Result<std::net::TcpListener>
//! pub fn bind_listeners(addr: SocketAddr, transparent: bool, backlog: i32, count: usize)
//!     -> io::Result<Vec<std::net::TcpListener>>   // SO_REUSEPORT group, one per thread
//! pub async fn connect_upstream(dst: SocketAddr, bind: Option<SocketAddr>, timeout: Duration)
//!     -> io::Result<tokio::net::TcpStream>
//! pub fn read_turn(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize>
//!     // one read; a short one clears the socket's readiness (no EAGAIN read)
//! // ...and for a peer about to close: the FIN looked for with its last bytes,
//! // which then leave with our own FIN in one segment
//! pub fn read_turn_to_close(stream, buf, take: impl FnMut(&[u8]) -> bool) -> io::Result<(usize, bool)>
//! pub fn send_before_shutdown(stream: &TcpStream, buf: &[u8]) -> io::Result<usize>
//! pub fn forget_assumed_readable(stream: &TcpStream)
//!     // an accepted socket is not read before the runtime reports it readable
//! pub fn with_turn_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R
//!     // the thread's one 16 KiB read buffer (TURN_BUFFER), for the watch and the relay
//!
//! // the relay, once inspection is over
//! pub async fn relay(client: &TcpStream, upstream: &TcpStream, mode: RelayMode,
//!                    idle: Duration, observer: &dyn RelayObserver)
//!     -> Result<RelayStats, RelayError>
//! pub enum RelayMode { Splice, Copy }
//! pub enum Direction { Upstream, Downstream }
//! pub struct RelayStats { pub up: u64, pub down: u64 }
//! pub trait RelayObserver: Sync { fn relayed(&self, mode: RelayMode, dir: Direction, n: u64); }
//! pub fn idle_deadline(last_activity: Instant, idle: Duration) -> Instant  // a year if no number
//! pub enum RelayError { Client{..}, Upstream{..}, Idle{..}, Local{..} }  // who caused it
//!
//! // steering without NAT: a BPF sk_lookup program hands new connections for
//! // the guarded ports to the guard's listeners (passed sources left to the MTA)
//! pub struct Steer; fn attach(&SteerConfig, v4, v6), fn pass(ip, ttl), fn unpass(ip)
//!
//! // the holding pen's epoll set, woken through tokio
//! pub fn watched_poll() -> io::Result<AsyncFd<mio::Poll>>
//! // nanosecond waits where tokio's 1 ms wheel is too coarse (timerfd)
//! pub struct FineTimer; fn new(), fn arm(after), async fn fired()
//!
//! // the global allocator: malloc, over-aligned blocks without posix_memalign
//! pub struct Allocator;
//!
//! // timing features
//! pub fn tcp_rtt(sock: &impl AsFd) -> io::Result<Duration>
//! ```
//!
//! `relay` returns a [`RelayError`] rather than a bare `io::Error` so that the
//! caller knows *who* ended the session (client, upstream, idle timeout, or
//! our own plumbing) and still gets the byte counts; it converts into an
//! `io::Error` with the same [`kind`](RelayError::kind) (an idle timeout is
//! `TimedOut`), so `?` in an `io::Result` function keeps working.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod alloc;
pub mod epoll;
pub mod fine_timer;
pub mod orig_dst;
pub mod relay;
pub mod sockets;
pub mod steer;
pub mod tcp_info;

pub use alloc::Allocator;
pub use epoll::watched_poll;
pub use fine_timer::FineTimer;
pub use orig_dst::original_dst;
pub use relay::{
    idle_deadline, relay, Direction, RelayError, RelayMode, RelayObserver, RelayStats,
};
pub use sockets::{
    bind_listener, bind_listeners, connect_upstream, forget_assumed_readable, read_turn,
    read_turn_to_close, send_before_shutdown, with_turn_buffer, TURN_BUFFER,
};
pub use steer::{Steer, SteerConfig};
pub use tcp_info::tcp_rtt;
