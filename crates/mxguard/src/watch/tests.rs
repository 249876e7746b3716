//! The watch loop against real sockets on loopback: a client that stops
//! reading its replies.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mxguard_policy::action::Action;
use nix::sys::resource::{getrusage, UsageWho};
use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::TcpStream;

use super::{watch, WatchEnd};
use crate::config::{Config, Dur};
use crate::metrics::Metrics;
use crate::server::Shared;
use crate::session::Record;

/// CPU time of the calling thread (the test's runtime runs the watch on it).
fn thread_cpu() -> Duration {
    let usage = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage");
    let us = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    us(usage.user_time()) + us(usage.system_time())
}

/// The MTA's answer to HELP: 40 KB, more than the socket buffers between
/// the guard and the client hold.
const HELP_LINES: usize = 500;
const HELP_LEN: usize = HELP_LINES * 82 + 9;

/// A watched session whose client asked for help and reads nothing.
struct Stuck {
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// The guard's end of each connection.
    client: TcpStream,
    upstream: TcpStream,
    /// The client's end (small receive buffer).
    bot: std::net::TcpStream,
    /// Gives back the MTA's end once it has sent the reply.
    mta: JoinHandle<std::net::TcpStream>,
}

fn stuck(config: Config) -> Stuck {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let guard_addr = listener.local_addr().unwrap();
    // Small buffers both ways so the reply cannot all be sent.
    let bot = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    bot.set_recv_buffer_size(2048).unwrap();
    bot.connect(&guard_addr.into()).unwrap();
    let mut bot: std::net::TcpStream = bot.into();
    let (accepted, peer) = listener.accept().unwrap();
    SockRef::from(&accepted).set_send_buffer_size(2048).unwrap();
    accepted.set_nonblocking(true).unwrap();
    let client = TcpStream::from_std(accepted).unwrap();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to_mta = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    to_mta.set_nonblocking(true).unwrap();
    let upstream = TcpStream::from_std(to_mta).unwrap();
    let (mut mta_side, _) = listener.accept().unwrap();
    let mta = std::thread::spawn(move || {
        let mut line = [0u8; 64];
        let n = mta_side.read(&mut line).unwrap();
        assert_eq!(&line[..n], b"HELP\r\n");
        let mut reply = Vec::new();
        for _ in 0..HELP_LINES {
            reply.extend_from_slice(b"214-");
            reply.extend_from_slice(&[b'x'; 76]);
            reply.extend_from_slice(b"\r\n");
        }
        reply.extend_from_slice(b"214 end\r\n");
        mta_side.write_all(&reply).unwrap();
        mta_side
    });
    bot.write_all(b"HELP\r\n").unwrap();
    let shared = Arc::new(Shared::new(
        config,
        Metrics::new().unwrap(),
        vec![guard_addr],
        None,
    ));
    Stuck {
        shared,
        peer,
        client,
        upstream,
        bot,
        mta,
    }
}

/// The reply is due, the client's socket is full: the watch waits for the
/// socket to drain (or the client to go), it does not spin on the reply's
/// release time. When the client reads at last, all of the reply comes.
#[tokio::test]
async fn a_client_that_reads_no_reply_costs_no_cpu() {
    let Stuck {
        shared,
        peer,
        mut client,
        mut upstream,
        mut bot,
        mta,
    } = stuck(Config::default());
    let runtime = shared.runtime.load_full();
    let mut record = Record::new(shared.sessions.register(peer), peer);
    let watched = watch(
        &shared,
        &runtime,
        &mut client,
        &mut upstream,
        Vec::new(),
        Vec::new(),
        Action::Observe,
        false,
        &mut record,
    );
    tokio::pin!(watched);
    let before = thread_cpu();
    let waited = tokio::time::timeout(Duration::from_secs(1), &mut watched).await;
    let spent = thread_cpu() - before;
    assert!(
        waited.is_err(),
        "the watch ended with the client still there"
    );
    assert!(
        spent < Duration::from_millis(300),
        "{spent:?} of CPU in 1s with a reply waiting for the client to read: spinning"
    );

    // The client reads at last: the whole reply comes (the watch woke for
    // the socket's room), then it hangs up, and so does the MTA.
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"214 end\r\n") {
            match bot.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got.len()
    });
    let mut mta_side = mta.join().unwrap();
    let mta_closer = std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = mta_side.read_to_end(&mut rest);
    });
    let end = tokio::time::timeout(Duration::from_secs(5), &mut watched).await;
    assert!(
        matches!(end, Ok(WatchEnd::Over { .. })),
        "the watch did not end after the client read and hung up"
    );
    assert_eq!(reader.join().unwrap(), HELP_LEN);
    mta_closer.join().unwrap();
}

/// No byte moves either way while the client reads nothing: the session
/// is idle (docs/configuration.md, `relay.idle_timeout`) and ends, instead
/// of holding its sockets and its MTA connection for as long as the
/// client likes.
#[tokio::test]
async fn a_client_that_reads_no_reply_is_ended_as_idle() {
    let mut config = Config::default();
    config.relay.idle_timeout = Dur(Duration::from_millis(600));
    let Stuck {
        shared,
        peer,
        mut client,
        mut upstream,
        bot,
        mta,
    } = stuck(config);
    let runtime = shared.runtime.load_full();
    let mut record = Record::new(shared.sessions.register(peer), peer);
    let end = tokio::time::timeout(
        Duration::from_secs(5),
        watch(
            &shared,
            &runtime,
            &mut client,
            &mut upstream,
            Vec::new(),
            Vec::new(),
            Action::Observe,
            false,
            &mut record,
        ),
    )
    .await;
    assert!(
        matches!(end, Ok(WatchEnd::Over { quit: true })),
        "a client reading nothing held its session past the idle timeout"
    );
    assert_eq!(record.end, "idle");
    drop(bot);
    drop(mta.join().unwrap());
}
