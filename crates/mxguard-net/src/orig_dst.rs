//! Where a REDIRECTed client meant to connect: `SO_ORIGINAL_DST` /
//! `IP6T_SO_ORIGINAL_DST`, read from the conntrack entry of an accepted socket.
//!
//! In TPROXY mode this is not needed: there the accepted socket's local
//! address already *is* the original destination.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt};

/// The destination the client addressed before NAT rewrote it to us.
///
/// `local` is the accepted socket's local address; its family picks the
/// option. A dual-stack socket that accepted an IPv4 client has an
/// IPv4-mapped local address (`::ffff:a.b.c.d`), and its conntrack entry is
/// an IPv4 one, so the IPv4 option is used and the answer is a
/// [`SocketAddr::V4`] (compare addresses with [`std::net::IpAddr::to_canonical`]).
///
/// A socket that was not NATed has no conntrack destination: the kernel
/// answers `ENOENT` ([`io::ErrorKind::NotFound`]); without the conntrack
/// module loaded it answers `ENOPROTOOPT`.
pub fn original_dst(sock: &impl AsFd, local: SocketAddr) -> io::Result<SocketAddr> {
    if tracked_as_ipv4(local) {
        let sin = getsockopt(sock, sockopt::OriginalDst)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        )))
    } else {
        let sin6 = getsockopt(sock, sockopt::Ip6tOriginalDst)?;
        // Same field conversions as std's own sockaddr_in6 -> SocketAddrV6.
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(sin6.sin6_addr.s6_addr),
            u16::from_be(sin6.sin6_port),
            sin6.sin6_flowinfo,
            sin6.sin6_scope_id,
        )))
    }
}

/// Whether the connection accepted on `local` has an IPv4 conntrack entry:
/// IPv4 sockets, and dual-stack IPv6 sockets that accepted an IPv4 client.
fn tracked_as_ipv4(local: SocketAddr) -> bool {
    match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conntrack_family_follows_the_clients_real_family() {
        let tracked = |s: &str| tracked_as_ipv4(s.parse().unwrap());
        assert!(tracked("192.0.2.1:25"));
        assert!(tracked("[::ffff:192.0.2.1]:25"));
        assert!(!tracked("[2001:db8::1]:25"));
        assert!(!tracked("[::1]:25"));
        // IPv4-compatible (deprecated, ::a.b.c.d) is not IPv4-mapped.
        assert!(!tracked("[::192.0.2.1]:25"));
    }
}
