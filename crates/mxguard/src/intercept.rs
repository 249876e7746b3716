//! Where was this connection going? One small interface, three answers.
//!
//! `fixed` forwards to the configured MTA; `redirect` asks the kernel for
//! the destination iptables REDIRECT rewrote (`SO_ORIGINAL_DST`); `tproxy`
//! and `sk_lookup` read it off the accepted socket, whose local address
//! *is* the original destination. Tests on loopback use `fixed` and need
//! no root; the real modes are tested in network namespaces.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use tokio::net::TcpStream;

use crate::config::{Config, Mode};

/// Why a connection has nowhere to go.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// The destination is the guard itself: proxying would loop.
    #[error("original destination {0} is the guard itself")]
    Loop(SocketAddr),
    /// The kernel has no original destination (not redirected, or NAT state
    /// gone).
    #[error("no original destination: {0}")]
    Unknown(io::Error),
    /// The accepted socket has no local address any more (reset already).
    #[error("accepted connection gone: {0}")]
    Gone(io::Error),
}

pub trait OriginalDestination: Send + Sync {
    /// Where `accepted` was going. `local` is its local address.
    fn original_dst(&self, accepted: &TcpStream, local: SocketAddr) -> io::Result<SocketAddr>;

    /// The source address for the upstream connection, when the MTA should
    /// see the client's own address.
    fn upstream_source(&self, _client: SocketAddr) -> Option<SocketAddr> {
        None
    }

    /// The destination is read off the accepted socket's local address (so
    /// "destination equals local address" is no sign of a loop).
    fn dst_is_local_addr(&self) -> bool {
        false
    }

    /// The one destination of every connection, whatever its addresses.
    fn fixed(&self) -> Option<SocketAddr> {
        None
    }
}

/// One configured MTA.
pub struct Fixed(pub SocketAddr);

impl OriginalDestination for Fixed {
    fn original_dst(&self, _: &TcpStream, _: SocketAddr) -> io::Result<SocketAddr> {
        Ok(self.0)
    }

    fn fixed(&self) -> Option<SocketAddr> {
        Some(self.0)
    }
}

/// Behind iptables/ip6tables `-j REDIRECT`.
pub struct Redirect;

impl OriginalDestination for Redirect {
    fn original_dst(&self, accepted: &TcpStream, local: SocketAddr) -> io::Result<SocketAddr> {
        mxguard_net::original_dst(accepted, local)
    }
}

/// Behind `-j TPROXY` on an `IP_TRANSPARENT` listener.
pub struct Tproxy {
    pub transparent_upstream: bool,
}

impl OriginalDestination for Tproxy {
    fn original_dst(&self, _: &TcpStream, local: SocketAddr) -> io::Result<SocketAddr> {
        Ok(local)
    }

    fn dst_is_local_addr(&self) -> bool {
        true
    }

    fn upstream_source(&self, client: SocketAddr) -> Option<SocketAddr> {
        // Port 0: the kernel picks a free port on the client's address.
        self.transparent_upstream
            .then(|| SocketAddr::new(client.ip(), 0))
    }
}

pub fn from_config(config: &Config) -> Box<dyn OriginalDestination> {
    match config.intercept.mode {
        Mode::Fixed => Box::new(Fixed(config.intercept.upstream)),
        Mode::Redirect => Box::new(Redirect),
        Mode::Tproxy => Box::new(Tproxy {
            transparent_upstream: config.intercept.transparent_upstream,
        }),
        // Steered to our socket as TPROXY does, by the guard's own program:
        // the local address is the destination.
        Mode::SkLookup => Box::new(Tproxy {
            transparent_upstream: false,
        }),
    }
}

/// Resolves the destination and refuses loops: a connection made straight
/// to one of our listeners (not diverted to it) would be proxied to itself.
///
/// A fixed upstream is a loop or not whatever the connection: its answer
/// needs no system call (`getsockname`) per connection.
pub fn resolve(
    intercept: &dyn OriginalDestination,
    accepted: &TcpStream,
    listeners: &[SocketAddr],
) -> Result<SocketAddr, InterceptError> {
    if let Some(dst) = intercept.fixed() {
        if is_loop(dst, listeners, &is_local_ip) {
            return Err(InterceptError::Loop(dst));
        }
        return Ok(dst);
    }
    let local = accepted.local_addr().map_err(InterceptError::Gone)?;
    let dst = intercept
        .original_dst(accepted, local)
        .map_err(InterceptError::Unknown)?;
    let direct = !intercept.dst_is_local_addr() && same(dst, local);
    if direct && listeners.iter().any(|l| l.port() == local.port()) {
        // Not diverted at all: a client connected straight to our port.
        return Err(InterceptError::Loop(dst));
    }
    if is_loop(dst, listeners, &is_local_ip) {
        return Err(InterceptError::Loop(dst));
    }
    Ok(dst)
}

/// The destination is one of our own listeners: on a local address (or
/// an address a listener is bound to) at a listening port.
fn is_loop(dst: SocketAddr, listeners: &[SocketAddr], is_local: &dyn Fn(IpAddr) -> bool) -> bool {
    let dst = canonical(dst);
    listeners.iter().any(|l| {
        let l = canonical(*l);
        l.port() == dst.port()
            && (l.ip() == dst.ip() || (l.ip().is_unspecified() && is_local(dst.ip())))
    })
}

fn same(a: SocketAddr, b: SocketAddr) -> bool {
    canonical(a) == canonical(b)
}

/// This host's addresses, read once (getifaddrs): an upstream on another
/// host at our listening port is no loop, one on this host is.
fn is_local_ip(ip: IpAddr) -> bool {
    static LOCAL: OnceLock<Vec<IpAddr>> = OnceLock::new();
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    LOCAL
        .get_or_init(|| {
            nix::ifaddrs::getifaddrs()
                .map(|addrs| {
                    addrs
                        .filter_map(|a| a.address)
                        .filter_map(|a| {
                            a.as_sockaddr_in()
                                .map(|v4| IpAddr::V4(v4.ip()))
                                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
        .contains(&ip)
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 they are.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn local_if_loopback(ip: IpAddr) -> bool {
        ip.is_loopback() || ip == "192.0.2.1".parse::<IpAddr>().unwrap()
    }

    #[test]
    fn a_connection_to_our_own_listener_is_a_loop() {
        let listeners = [a("0.0.0.0:10025")];
        assert!(is_loop(
            a("192.0.2.1:10025"),
            &listeners,
            &local_if_loopback
        ));
        assert!(is_loop(
            a("127.0.0.1:10025"),
            &listeners,
            &local_if_loopback
        ));
        let listeners = [a("127.0.0.1:2525")];
        assert!(is_loop(a("127.0.0.1:2525"), &listeners, &local_if_loopback));
    }

    #[test]
    fn a_diverted_connection_to_the_mta_is_not_a_loop() {
        let listeners = [a("0.0.0.0:10025")];
        assert!(!is_loop(a("192.0.2.25:25"), &listeners, &local_if_loopback));
        let listeners = [a("127.0.0.1:2525")];
        assert!(!is_loop(
            a("127.0.0.2:2525"),
            &listeners,
            &local_if_loopback
        ));
    }

    #[test]
    fn an_mta_on_another_host_at_our_port_is_not_a_loop() {
        // fixed mode: listen on 0.0.0.0:25, the MTA is 198.51.100.25:25.
        let listeners = [a("0.0.0.0:25")];
        assert!(!is_loop(
            a("198.51.100.25:25"),
            &listeners,
            &local_if_loopback
        ));
        assert!(is_loop(a("192.0.2.1:25"), &listeners, &local_if_loopback));
    }

    #[test]
    fn mapped_addresses_are_compared_as_ipv4() {
        let listeners = [a("127.0.0.1:2525")];
        assert!(is_loop(
            a("[::ffff:127.0.0.1]:2525"),
            &listeners,
            &local_if_loopback
        ));
        assert!(same(a("[::ffff:127.0.0.1]:2525"), a("127.0.0.1:2525")));
    }

    #[tokio::test]
    async fn a_fixed_upstream_is_resolved_without_the_local_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(ours), listener.accept());
        let (accepted, _) = accepted.unwrap();
        let _connected = connected.unwrap();
        let mta = a("127.0.0.1:2525");
        assert_eq!(resolve(&Fixed(mta), &accepted, &[ours]).ok(), Some(mta));
        // The upstream is the guard's own listener: every connection loops.
        assert!(matches!(
            resolve(&Fixed(ours), &accepted, &[ours]),
            Err(InterceptError::Loop(dst)) if dst == ours
        ));
        assert!(matches!(
            resolve(&Fixed(a("127.0.0.9:4000")), &accepted, &[a("0.0.0.0:4000")]),
            Err(InterceptError::Loop(_))
        ));
    }

    #[test]
    fn tproxy_binds_upstream_to_the_client_only_when_asked() {
        let client = a("198.51.100.7:40000");
        let plain = Tproxy {
            transparent_upstream: false,
        };
        assert_eq!(plain.upstream_source(client), None);
        let transparent = Tproxy {
            transparent_upstream: true,
        };
        assert_eq!(
            transparent.upstream_source(client),
            Some(a("198.51.100.7:0"))
        );
    }
}
