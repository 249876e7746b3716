//! The sk_lookup program on real sockets, in a network namespace of the
//! test's own (the program is attached to a namespace, and must not touch
//! the machine's). Needs root; without it, the clear permission error.

// Test code: a failed unwrap is a failed test (clippy only sees #[test] fns as tests).
#![allow(clippy::unwrap_used)]

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use mxguard_net::{bind_listener, Steer, SteerConfig};
use socket2::{Domain, Socket, Type};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread of its own in a new network namespace (with `lo`
/// up and a second IPv6 address on it). `None`: no namespace for us (not
/// root).
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) with CLONE_NEWNET only changes this thread's
        // network namespace; it takes no pointers.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            return None;
        }
        // Commands started from this thread run in its namespace.
        ip(&["link", "set", "lo", "up"]);
        ip(&["-6", "addr", "add", "fd00::1/128", "dev", "lo", "nodad"]);
        ip(&["-6", "addr", "add", "fd00::2/128", "dev", "lo", "nodad"]);
        Some(f())
    })
    .join()
    .unwrap()
}

/// Which of `listeners` accepts a connection from `from` to `to`.
fn who_accepts(from: &str, to: SocketAddr, listeners: &[&TcpListener]) -> (usize, SocketAddr) {
    let from = addr(from);
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).unwrap();
    socket.bind(&from.into()).unwrap();
    socket.connect(&to.into()).unwrap();
    let client: TcpStream = socket.into();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for (i, l) in listeners.iter().enumerate() {
            if let Ok((accepted, peer)) = l.accept() {
                assert_eq!(peer, client.local_addr().unwrap());
                return (i, accepted.local_addr().unwrap());
            }
        }
        assert!(Instant::now() < deadline, "nobody accepted {from} -> {to}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn nonblocking(addr: SocketAddr) -> TcpListener {
    let l = TcpListener::bind(addr).unwrap();
    l.set_nonblocking(true).unwrap();
    l
}

const MTA: usize = 0;
const GUARD: usize = 1;

#[test]
fn guarded_ports_go_to_the_guard_with_their_destination_and_passed_sources_to_the_mta() {
    let ran = in_new_netns(|| {
        let mta4 = nonblocking(addr("127.0.0.1:2525"));
        let mta6 = nonblocking(addr("[fd00::1]:2525"));
        let other = nonblocking(addr("127.0.0.1:2526"));
        let guard4 = bind_listener(addr("127.0.0.1:0"), false, 16).unwrap();
        let guard6 = bind_listener(addr("[::1]:0"), false, 16).unwrap();
        let config = SteerConfig {
            ports: vec![2525],
            interfaces: vec![],
            passes: 64,
        };
        let steer = match Steer::attach(&config, Some(&guard4), Some(&guard6)) {
            Ok(steer) => steer,
            Err(e) => panic!("{e}"),
        };
        assert!(steer.bypasses());
        let to4 = addr("127.0.0.1:2525");
        let to6 = addr("[fd00::1]:2525");

        // Another host's connection: the guard's, whatever listens on the
        // port, and it was going to port 2525.
        assert_eq!(
            who_accepts("127.0.0.2:0", to4, &[&mta4, &guard4]),
            (GUARD, to4)
        );
        assert_eq!(
            who_accepts("[fd00::2]:0", to6, &[&mta6, &guard6]),
            (GUARD, to6)
        );
        // From this host to itself (the guard's own connection to the MTA).
        assert_eq!(who_accepts("127.0.0.1:0", to4, &[&mta4, &guard4]).0, MTA);
        assert_eq!(who_accepts("[fd00::1]:0", to6, &[&mta6, &guard6]).0, MTA);
        // Another port.
        let to_other = addr("127.0.0.1:2526");
        assert_eq!(
            who_accepts("127.0.0.2:0", to_other, &[&other, &guard4]).0,
            0
        );

        // Passed: straight to the MTA, until taken out.
        let client4: IpAddr = "127.0.0.2".parse().unwrap();
        let client6: IpAddr = "fd00::2".parse().unwrap();
        steer.pass(client4, Duration::from_secs(60)).unwrap();
        steer.pass(client6, Duration::from_secs(60)).unwrap();
        assert_eq!(who_accepts("127.0.0.2:0", to4, &[&mta4, &guard4]).0, MTA);
        assert_eq!(who_accepts("[fd00::2]:0", to6, &[&mta6, &guard6]).0, MTA);
        // Another address is still guarded.
        assert_eq!(who_accepts("127.0.0.3:0", to4, &[&mta4, &guard4]).0, GUARD);
        steer.unpass(client4).unwrap();
        steer.unpass(client6).unwrap();
        steer.unpass(client6).unwrap(); // gone already: no error
        assert_eq!(who_accepts("127.0.0.2:0", to4, &[&mta4, &guard4]).0, GUARD);
        assert_eq!(who_accepts("[fd00::2]:0", to6, &[&mta6, &guard6]).0, GUARD);

        // A pass ends by itself (the program reads the deadline); an IPv4
        // client seen on a dual-stack socket is the IPv4 address.
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        steer.pass(mapped, Duration::from_millis(300)).unwrap();
        assert_eq!(who_accepts("127.0.0.2:0", to4, &[&mta4, &guard4]).0, MTA);
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(who_accepts("127.0.0.2:0", to4, &[&mta4, &guard4]).0, GUARD);

        // Gone with the guard: connections go where they were going.
        drop(steer);
        assert_eq!(who_accepts("127.0.0.2:0", to4, &[&mta4, &guard4]).0, MTA);
    });
    if ran.is_none() {
        eprintln!("not root: no network namespace of our own, nothing steered");
    }
}

#[test]
fn without_the_bypass_passes_are_not_kept_and_interfaces_filter() {
    let ran = in_new_netns(|| {
        let mta = nonblocking(addr("127.0.0.1:2525"));
        let guard = bind_listener(addr("127.0.0.1:0"), false, 16).unwrap();
        let to = addr("127.0.0.1:2525");
        // Only connections that came in on an interface that is not lo:
        // these (on lo) are not steered.
        let config = SteerConfig {
            ports: vec![25, 2525],
            interfaces: vec![u32::MAX],
            passes: 0,
        };
        let steer = Steer::attach(&config, Some(&guard), None::<&TcpListener>).unwrap();
        assert_eq!(who_accepts("127.0.0.2:0", to, &[&mta, &guard]).0, MTA);
        drop(steer);
        // Every interface; no bypass: a pass changes nothing.
        let config = SteerConfig {
            interfaces: vec![],
            ..config
        };
        let steer = Steer::attach(&config, Some(&guard), None::<&TcpListener>).unwrap();
        assert!(!steer.bypasses());
        steer
            .pass("127.0.0.2".parse().unwrap(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(who_accepts("127.0.0.2:0", to, &[&mta, &guard]), (GUARD, to));
        // No IPv6 listener: IPv6 is not steered.
        let mta6 = nonblocking(addr("[fd00::1]:2525"));
        let to6 = addr("[fd00::1]:2525");
        assert_eq!(who_accepts("[fd00::2]:0", to6, &[&mta6]).0, MTA);
    });
    if ran.is_none() {
        eprintln!("not root: no network namespace of our own, nothing steered");
    }
}
