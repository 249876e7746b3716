//! The kernel's view of a connection (`TCP_INFO`), so timing tests can tell a
//! slow link from a client that talks out of turn.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

/// The kernel's smoothed round-trip time estimate (`tcpi_rtt`) of a TCP socket.
///
/// It is zero until the kernel has a sample (the handshake gives the first).
pub fn tcp_rtt(sock: &impl AsFd) -> io::Result<Duration> {
    Ok(Duration::from_micros(u64::from(tcp_info(sock)?.tcpi_rtt)))
}

/// The kernel's whole `TCP_INFO` of a TCP socket (tests count its
/// segments, `tcpi_segs_out`, with it).
pub fn tcp_info(sock: &impl AsFd) -> io::Result<libc::tcp_info> {
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = libc::socklen_t::try_from(size_of::<libc::tcp_info>())
        .map_err(|_| io::Error::other("tcp_info larger than socklen_t"))?;
    // SAFETY: the fd is valid for the call (borrowed through `AsFd`); the
    // pointer and `len` describe `info`, which lives across the call, and the
    // kernel writes at most `len` bytes into it.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `tcp_info` is plain integers, so the all-zero bytes we started
    // from are a valid value; an older kernel that fills fewer bytes leaves
    // the rest zero.
    Ok(unsafe { info.assume_init() })
}
