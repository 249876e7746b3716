//! An epoll set of our own, watched by tokio: the holding pen's (mxguard's
//! `pen` module) way to wait for thousands of idle sockets without
//! registering each with tokio.

use std::io;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A mio `Poll` (an epoll descriptor) that tokio wakes us for when any
/// socket in it is ready. Must be created inside a tokio runtime.
pub fn watched_poll() -> io::Result<AsyncFd<mio::Poll>> {
    let poll = mio::Poll::new()?;
    // SAFETY: the descriptor registered is the epoll fd that `poll` owns;
    // the `AsyncFd` owns `poll`, so the fd stays open and refers to the
    // same epoll instance until the `AsyncFd` is dropped (which
    // deregisters it first) or `into_inner` hands `poll` back.
    unsafe { AsyncFd::register_with_interest(poll, Interest::READABLE) }.map_err(|e| e.into())
}
