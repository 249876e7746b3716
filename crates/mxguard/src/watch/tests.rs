//! The watch loop against real sockets on loopback: what it costs while
//! it waits.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use mxguard_policy::action::Action;
use nix::sys::resource::{getrusage, UsageWho};
use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::TcpStream;

use super::{watch, WatchEnd};
use crate::config::Config;
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

/// A client asks for help and never reads the answer, which is longer than
/// the socket buffers between the guard and the client: the reply is due,
/// the client's socket is full. The watch waits for the socket to drain
/// (or the client to go), it does not spin on the reply's release time.
#[tokio::test]
async fn a_client_that_reads_no_reply_costs_no_cpu() {
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
    let mut client = TcpStream::from_std(accepted).unwrap();

    let mta = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to_mta = std::net::TcpStream::connect(mta.local_addr().unwrap()).unwrap();
    to_mta.set_nonblocking(true).unwrap();
    let mut upstream = TcpStream::from_std(to_mta).unwrap();
    let (mut mta_side, _) = mta.accept().unwrap();
    // The MTA answers HELP with 40 KB and keeps the connection.
    let mta_thread = std::thread::spawn(move || {
        let mut line = [0u8; 64];
        let n = mta_side.read(&mut line).unwrap();
        assert_eq!(&line[..n], b"HELP\r\n");
        let mut reply = Vec::new();
        for _ in 0..500 {
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
        Config::default(),
        Metrics::new().unwrap(),
        vec![guard_addr],
        None,
    ));
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
    let mut mta_side = mta_thread.join().unwrap();
    let mta_closer = std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = mta_side.read_to_end(&mut rest);
    });
    let end = tokio::time::timeout(Duration::from_secs(5), &mut watched).await;
    assert!(
        matches!(end, Ok(WatchEnd::Over { .. })),
        "the watch did not end after the client read and hung up"
    );
    assert_eq!(reader.join().unwrap(), 500 * 82 + 9);
    mta_closer.join().unwrap();
}
