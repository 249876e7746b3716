//! Listeners, upstream connections, original destination and TCP_INFO on
//! real loopback sockets. Transparent (TPROXY) options need CAP_NET_ADMIN;
//! without it those checks only assert the clear permission error. The
//! NATed original-destination case needs iptables and belongs to the
//! end-to-end tests in network namespaces.

// Test code: a failed unwrap is a failed test (clippy only sees #[test] fns as tests).
#![allow(clippy::unwrap_used)]

mod support;

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use mxguard_net::{bind_listener, bind_listeners, connect_upstream, original_dst, tcp_rtt};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use socket2::{Domain, SockRef, Socket, Type};
use support::{connected_pair, segs_out};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn is_cloexec(fd: impl AsFd) -> bool {
    let flags = fcntl(fd, FcntlArg::F_GETFD).unwrap();
    FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC)
}

/// Accepts one connection on a `bind_listener` socket and returns the
/// client's address as the listener saw it.
async fn accept_one(listener: std::net::TcpListener) -> (TcpStream, SocketAddr) {
    let listener = TcpListener::from_std(listener).unwrap();
    listener.accept().await.unwrap()
}

#[tokio::test]
async fn ipv4_listener_is_nonblocking_reusable_and_cloexec() {
    let listener = bind_listener(addr("127.0.0.1:0"), false, 128).unwrap();
    let local = listener.local_addr().unwrap();
    assert_eq!(local.ip(), addr("127.0.0.1:0").ip());
    assert_ne!(local.port(), 0);
    let sock = SockRef::from(&listener);
    assert!(sock.nonblocking().unwrap());
    assert!(sock.reuse_address().unwrap());
    assert!(is_cloexec(&listener));

    assert!(sock.tcp_nodelay().unwrap());

    let (connected, (accepted, peer)) =
        tokio::join!(TcpStream::connect(local), accept_one(listener));
    assert_eq!(peer, connected.unwrap().local_addr().unwrap());
    // The guard sets no option on an accepted socket: it has the
    // listener's TCP_NODELAY.
    assert!(accepted.nodelay().unwrap());
}

#[tokio::test]
async fn ipv6_listener_is_v6_only() {
    let listener = bind_listener(addr("[::1]:0"), false, 128).unwrap();
    let local = listener.local_addr().unwrap();
    assert!(local.is_ipv6());
    let sock = SockRef::from(&listener);
    assert!(sock.only_v6().unwrap());
    assert!(sock.reuse_address().unwrap());
    assert!(sock.nonblocking().unwrap());

    let (connected, (_accepted, peer)) =
        tokio::join!(TcpStream::connect(local), accept_one(listener));
    assert_eq!(peer, connected.unwrap().local_addr().unwrap());
}

#[tokio::test]
async fn a_restart_rebinds_the_port_despite_time_wait() {
    let listener = bind_listener(addr("127.0.0.1:0"), false, 128).unwrap();
    let local = listener.local_addr().unwrap();
    let (connected, (accepted, _)) = tokio::join!(TcpStream::connect(local), accept_one(listener));
    // The proxy closes first, so its end of the connection sits in TIME_WAIT.
    drop(accepted);
    let mut connected = connected.unwrap();
    let mut rest = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut connected, &mut rest)
        .await
        .unwrap();
    drop(connected);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let plain = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let e = plain.bind(&local.into()).unwrap_err();
    assert_eq!(
        e.kind(),
        io::ErrorKind::AddrInUse,
        "TIME_WAIT blocks a plain bind"
    );

    bind_listener(local, false, 128).expect("rebinding after a restart");
}

#[tokio::test]
async fn transparent_listener_sets_ip_transparent_or_says_it_needs_cap_net_admin() {
    for listen in ["127.0.0.1:0", "[::1]:0"] {
        match bind_listener(addr(listen), true, 128) {
            Ok(listener) => {
                let sock = SockRef::from(&listener);
                let transparent = if listener.local_addr().unwrap().is_ipv4() {
                    sock.ip_transparent_v4().unwrap()
                } else {
                    sock.ip_transparent_v6().unwrap()
                };
                assert!(transparent, "{listen}");
            }
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
                assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
            }
        }
    }
}

#[tokio::test]
async fn upstream_connection_has_nodelay() {
    for listen in ["127.0.0.1:0", "[::1]:0"] {
        let listener = TcpListener::bind(listen).await.unwrap();
        let mta = listener.local_addr().unwrap();
        let (stream, accepted) = tokio::join!(
            connect_upstream(mta, None, Duration::from_secs(5)),
            listener.accept()
        );
        let stream = stream.unwrap();
        assert!(stream.nodelay().unwrap());
        assert_eq!(accepted.unwrap().1, stream.local_addr().unwrap());
    }
}

#[tokio::test]
async fn refused_upstream_is_connection_refused() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let e = connect_upstream(port, None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn unanswered_upstream_times_out() {
    // A listener whose accept queue is full drops further SYNs: the next
    // connection hangs in SYN_SENT, as with an MTA behind a dead link.
    let listener = bind_listener(addr("127.0.0.1:0"), false, 0).unwrap();
    let mta = listener.local_addr().unwrap();
    let timeout = Duration::from_millis(200);
    let mut queued = Vec::new();
    for _ in 0..8 {
        let started = Instant::now();
        match connect_upstream(mta, None, timeout).await {
            Ok(stream) => queued.push(stream),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
                let elapsed = started.elapsed();
                assert!(elapsed >= timeout, "{elapsed:?}");
                assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
                return;
            }
        }
    }
    panic!(
        "the accept queue never filled: {} connections",
        queued.len()
    );
}

#[tokio::test]
async fn transparent_upstream_connects_from_the_clients_address() {
    // In TPROXY mode the upstream socket is bound to the client's address;
    // on loopback 127.0.0.2 stands in for the client.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mta = listener.local_addr().unwrap();
    let client = addr("127.0.0.2:0");
    let (stream, accepted) = tokio::join!(
        connect_upstream(mta, Some(client), Duration::from_secs(5)),
        async { tokio::time::timeout(Duration::from_secs(5), listener.accept()).await }
    );
    match stream {
        Ok(stream) => {
            assert!(SockRef::from(&stream).ip_transparent_v4().unwrap());
            let (_, seen) = accepted.unwrap().unwrap();
            assert_eq!(seen.ip(), client.ip(), "the MTA sees the client's address");
        }
        Err(e) => {
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        }
    }
}

#[tokio::test]
async fn transparent_bind_must_match_the_upstream_family() {
    let e = connect_upstream(
        addr("[::1]:25"),
        Some(addr("127.0.0.2:0")),
        Duration::from_secs(1),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
}

/// What a socket that was never NATed answers: ENOENT from conntrack, or
/// ENOPROTOOPT where the conntrack module is not loaded. Never a panic.
fn assert_no_original_dst(result: io::Result<SocketAddr>) {
    let e = result.expect_err("a loopback connection has no NAT original destination");
    assert!(
        e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOPROTOOPT),
        "{e}"
    );
}

#[tokio::test]
async fn original_dst_of_a_connection_that_was_not_redirected_is_an_error() {
    for listen in ["127.0.0.1:0", "[::1]:0"] {
        let (_client, accepted) = connected_pair(addr(listen)).await;
        let local = accepted.local_addr().unwrap();
        assert_no_original_dst(original_dst(&accepted, local));
    }
}

#[tokio::test]
async fn original_dst_of_an_ipv4_client_on_a_dual_stack_socket_is_an_error() {
    // A dual-stack listener on the IPv4-mapped loopback address: the
    // accepted socket is AF_INET6 with a local address of ::ffff:127.0.0.1.
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
    socket.set_only_v6(false).unwrap();
    socket.bind(&addr("[::ffff:127.0.0.1]:0").into()).unwrap();
    socket.listen(8).unwrap();
    socket.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(socket.into()).unwrap();
    let port = listener.local_addr().unwrap().port();

    let (client, accepted) = tokio::join!(
        TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))),
        listener.accept()
    );
    let _client = client.unwrap();
    let (accepted, _) = accepted.unwrap();
    let local = accepted.local_addr().unwrap();
    assert_eq!(local.ip().to_canonical(), addr("127.0.0.1:0").ip());
    assert!(local.is_ipv6());
    assert_no_original_dst(original_dst(&accepted, local));
}

#[tokio::test]
async fn tcp_rtt_of_a_loopback_connection_is_small() {
    let (client, accepted) = connected_pair(addr("127.0.0.1:0")).await;
    for sock in [&client, &accepted] {
        let rtt = tcp_rtt(sock).unwrap();
        assert!(rtt < Duration::from_secs(1), "{rtt:?}");
    }
}

#[tokio::test]
async fn tcp_rtt_of_a_listener_is_zero_not_an_error() {
    let listener = bind_listener(addr("127.0.0.1:0"), false, 8).unwrap();
    assert_eq!(tcp_rtt(&listener).unwrap(), Duration::ZERO);
}

#[test]
fn a_listener_group_shares_one_port_and_every_socket_accepts() {
    let group = bind_listeners(addr("127.0.0.1:0"), false, 128, 3).unwrap();
    assert_eq!(group.len(), 3);
    let port = group[0].local_addr().unwrap().port();
    assert_ne!(port, 0);
    for l in &group {
        assert_eq!(l.local_addr().unwrap().port(), port, "one port for all");
        assert!(SockRef::from(l).reuse_port().unwrap());
        assert!(is_cloexec(l));
    }
    // The kernel hashes connections over the group: from enough source
    // ports, every socket gets some.
    let clients: Vec<_> = (0..60)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let mut total = 0;
    for l in &group {
        let mut got = 0;
        while let Ok((accepted, _)) = l.accept() {
            assert!(SockRef::from(&accepted).tcp_nodelay().unwrap());
            got += 1;
        }
        assert!(got > 0, "a socket of the group accepted nothing");
        total += got;
    }
    assert_eq!(total, clients.len());
}

#[test]
fn a_group_of_one_is_a_plain_listener() {
    let group = bind_listeners(addr("127.0.0.1:0"), false, 128, 1).unwrap();
    assert_eq!(group.len(), 1);
    assert!(!SockRef::from(&group[0]).reuse_port().unwrap());
    // A second plain listener on its port is refused, as before.
    let port = group[0].local_addr().unwrap().port();
    let taken = bind_listener(SocketAddr::from(([127, 0, 0, 1], port)), false, 128);
    assert_eq!(taken.unwrap_err().kind(), io::ErrorKind::AddrInUse);
}

#[test]
fn a_group_does_not_join_a_port_already_listened_on() {
    // Another group of the same user on the port (a second guard started
    // by mistake) is refused, not joined.
    let first = bind_listeners(addr("127.0.0.1:0"), false, 128, 2).unwrap();
    let port = first[0].local_addr().unwrap().port();
    let again = bind_listeners(SocketAddr::from(([127, 0, 0, 1], port)), false, 128, 2);
    assert_eq!(again.unwrap_err().kind(), io::ErrorKind::AddrInUse);
    // Once the first is gone the port can be listened on again.
    drop(first);
    bind_listeners(SocketAddr::from(([127, 0, 0, 1], port)), false, 128, 2).unwrap();
}

/// Our end of a connection whose peer (the MTA) wrote `last` and closed,
/// once its FIN has reached us (`CLOSE_WAIT`).
async fn said_and_closed(last: &[u8]) -> TcpStream {
    const TCP_CLOSE_WAIT: u8 = 8;
    let (ours, mta) = connected_pair(addr("127.0.0.1:0")).await;
    mta.try_write(last).unwrap();
    SockRef::from(&mta)
        .shutdown(std::net::Shutdown::Write)
        .unwrap();
    readable(&ours).await;
    for _ in 0..5000 {
        if mxguard_net::tcp_info::tcp_info(&ours).unwrap().tcpi_state == TCP_CLOSE_WAIT {
            return ours;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("no FIN in 5 s");
}

/// Waits until `stream` is readable (bytes or the end of the stream).
async fn readable(stream: &TcpStream) {
    tokio::time::timeout(Duration::from_secs(5), stream.readable())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_closing_peers_fin_is_read_with_its_last_bytes() {
    let ours = said_and_closed(b"221 bye\r\n").await;
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    let read = mxguard_net::read_turn_to_close(&ours, &mut buf, |bytes| {
        got.extend_from_slice(bytes);
        got.starts_with(b"221 ")
    });
    assert_eq!(read.unwrap(), (9, true), "the FIN with the reply");
    assert_eq!(got, b"221 bye\r\n");

    // Not closing: one read, as read_turn, and the FIN for the next one.
    let ours = said_and_closed(b"250 ok\r\n").await;
    let read = mxguard_net::read_turn_to_close(&ours, &mut buf, |_| false);
    assert_eq!(read.unwrap(), (8, false));
    readable(&ours).await;
    assert_eq!(
        mxguard_net::read_turn_to_close(&ours, &mut buf, |_| false).unwrap(),
        (0, true)
    );

    // Closing but the FIN not there yet: the bytes, and the readiness
    // cleared by the second read's EAGAIN (the FIN raises it again).
    let (ours, mta) = connected_pair(addr("127.0.0.1:0")).await;
    mta.try_write(b"221 bye\r\n").unwrap();
    readable(&ours).await;
    let read = mxguard_net::read_turn_to_close(&ours, &mut buf, |_| true);
    assert_eq!(read.unwrap(), (9, false));
    drop(mta);
    readable(&ours).await;
    assert_eq!(
        mxguard_net::read_turn_to_close(&ours, &mut buf, |_| true).unwrap(),
        (0, true)
    );
}

#[tokio::test]
async fn the_last_bytes_and_the_fin_leave_in_one_segment() {
    // The guard's way: MSG_MORE, then the shutdown.
    let (client, ours) = connected_pair(addr("127.0.0.1:0")).await;
    let before = segs_out(&ours);
    let n = mxguard_net::send_before_shutdown(&ours, b"221 bye\r\n").unwrap();
    assert_eq!(n, 9);
    SockRef::from(&ours)
        .shutdown(std::net::Shutdown::Write)
        .unwrap();
    let mut got = Vec::new();
    let mut reader = client;
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut got)
        .await
        .unwrap();
    assert_eq!(got, b"221 bye\r\n", "the bytes, then the end of the stream");
    assert_eq!(segs_out(&ours) - before, 1, "data and FIN in one segment");

    // A plain write then the shutdown: two.
    let (mut client, ours) = connected_pair(addr("127.0.0.1:0")).await;
    let before = segs_out(&ours);
    ours.try_write(b"221 bye\r\n").unwrap();
    SockRef::from(&ours)
        .shutdown(std::net::Shutdown::Write)
        .unwrap();
    let mut got = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut client, &mut got)
        .await
        .unwrap();
    assert_eq!(got, b"221 bye\r\n");
    assert_eq!(segs_out(&ours) - before, 2);
}

/// An accepted socket is not taken as readable before its client sent a
/// byte (no `EAGAIN` read in every session), yet bytes sent before the
/// accept, or after, are reported.
#[tokio::test]
async fn an_accepted_socket_is_readable_only_once_its_client_wrote() {
    use std::io::Write;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();

    let mut quiet = std::net::TcpStream::connect(at).unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    mxguard_net::forget_assumed_readable(&accepted);
    let waited = tokio::time::timeout(Duration::from_millis(100), accepted.readable()).await;
    assert!(waited.is_err(), "readable with nothing sent");
    quiet.write_all(b"EHLO late\r\n").unwrap();
    readable(&accepted).await;
    let mut buf = [0u8; 64];
    assert_eq!(accepted.try_read(&mut buf).unwrap(), 11);

    // Early talk queued before the accept is reported all the same.
    let mut early = std::net::TcpStream::connect(at).unwrap();
    early.write_all(b"EHLO early\r\n").unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (accepted, _) = listener.accept().await.unwrap();
    mxguard_net::forget_assumed_readable(&accepted);
    readable(&accepted).await;
    assert_eq!(accepted.try_read(&mut buf).unwrap(), 12);
}
