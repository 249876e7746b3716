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

/// The watch of a session that greeted cleanly: nothing early, nothing
/// owed, action observe, no reply delays.
async fn watch_plain(
    shared: &Shared,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    record: &mut Record<'_>,
) -> WatchEnd {
    let runtime = shared.runtime.load_full();
    watch(
        shared,
        &runtime,
        client,
        upstream,
        Vec::new(),
        Vec::new(),
        Action::Observe,
        false,
        record,
    )
    .await
}

/// A client connected to the guard: the client's end, the guard's end
/// (tokio), the client's address and the guard's.
fn client_side() -> (std::net::TcpStream, TcpStream, SocketAddr, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let guard_addr = listener.local_addr().unwrap();
    let bot = std::net::TcpStream::connect(guard_addr).unwrap();
    let (accepted, peer) = listener.accept().unwrap();
    accepted.set_nonblocking(true).unwrap();
    (
        bot,
        TcpStream::from_std(accepted).unwrap(),
        peer,
        guard_addr,
    )
}

/// The guard connected to an MTA's listener (the MTA accepts from it).
fn upstream_side() -> (TcpStream, std::net::TcpListener) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to_mta = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    to_mta.set_nonblocking(true).unwrap();
    (TcpStream::from_std(to_mta).unwrap(), listener)
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
    let shared = Shared::for_test(config, guard_addr);
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
    let mut record = Record::new(shared.sessions.register(peer), peer);
    let watched = watch_plain(&shared, &mut client, &mut upstream, &mut record);
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
    let mut record = Record::new(shared.sessions.register(peer), peer);
    let end = tokio::time::timeout(
        Duration::from_secs(5),
        watch_plain(&shared, &mut client, &mut upstream, &mut record),
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

/// An MTA that answers by verb: it offers PIPELINING and CHUNKING, takes
/// `mail_delay` to answer MAIL (`None`: it answers nothing from MAIL on),
/// answers QUIT with 221 and closes. Gives back every byte it read.
fn scripted_mta(
    listener: std::net::TcpListener,
    mail_delay: Option<Duration>,
) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let (mut mta_side, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        let mut line_start = 0;
        let mut buf = [0u8; 4096];
        let mut silent = false;
        loop {
            let n = match mta_side.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => n,
            };
            got.extend_from_slice(&buf[..n]);
            while let Some(lf) = got[line_start..].iter().position(|b| *b == b'\n') {
                let line = got[line_start..line_start + lf + 1].to_ascii_uppercase();
                line_start += lf + 1;
                if silent {
                    continue;
                }
                let reply: &[u8] = if line.starts_with(b"EHLO") {
                    b"250-mta.example.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
                } else if line.starts_with(b"MAIL") {
                    let Some(delay) = mail_delay else {
                        silent = true;
                        continue;
                    };
                    std::thread::sleep(delay);
                    b"250 2.1.0 Ok\r\n"
                } else if line.starts_with(b"RCPT") || line.starts_with(b"RSET") {
                    b"250 2.1.5 Ok\r\n"
                } else if line.starts_with(b"QUIT") {
                    let _ = mta_side.write_all(b"221 2.0.0 Bye\r\n");
                    return got;
                } else {
                    b"500 5.5.2 Error: command not recognized\r\n"
                };
                if mta_side.write_all(reply).is_err() {
                    return got;
                }
            }
        }
    })
}

/// Reads one reply (its lines) from a blocking socket; its code, or `None`
/// at the end of the stream.
fn read_reply(stream: &mut std::net::TcpStream) -> Option<u16> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) | Err(_) => return None,
            Ok(_) => line.push(byte[0]),
        }
        if line.ends_with(b"\n") {
            if line.get(3) != Some(&b'-') {
                return std::str::from_utf8(line.get(..3)?).ok()?.parse().ok();
            }
            line.clear();
        }
    }
}

const BDAT_MESSAGE: &[u8] = b"Subject: held\r\n\r\nheld while the MTA answered\r\n";

/// What each side saw of a half-closing client's session.
struct HalfClosed {
    end: Option<WatchEnd>,
    end_reason: &'static str,
    /// The code of every reply the client got.
    replies: Vec<u16>,
    /// Every byte the MTA read.
    mta: String,
    /// What is in the quarantine: envelope recipients and message.
    stored: Vec<(Vec<String>, Vec<u8>)>,
}

/// A client that turned suspect after CHUNKING was offered (an unknown
/// command; `action` quarantines or discards) pipelines a whole message
/// (RFC 3030 §4.2) and QUIT, and half-closes. The guard holds the BDAT
/// until the MTA has answered MAIL and RCPT (which recipients were accepted
/// decides what the chunk means), so our RSET and the client's QUIT can
/// only go to the MTA after the client's FIN.
async fn pipelined_bdat_then_half_close(
    action: Action,
    mail_delay: Option<Duration>,
    idle_timeout: Duration,
) -> HalfClosed {
    let quarantine_dir = crate::quarantine::tests::TestDir::new("watch-half-close");
    let quarantine = crate::quarantine::Quarantine::open_at(&quarantine_dir.0, 1 << 20).unwrap();
    let mut config = Config::default();
    config.turns.unknown_command_limit = 1;
    config.actions.unknown_commands = action;
    config.relay.idle_timeout = Dur(idle_timeout);

    let (mut bot, mut client, peer, guard_addr) = client_side();
    let (mut upstream, listener) = upstream_side();
    let mta = scripted_mta(listener, mail_delay);

    let bot = std::thread::spawn(move || {
        let mut codes = Vec::new();
        bot.write_all(b"EHLO bot.example.test\r\n").unwrap();
        codes.extend(read_reply(&mut bot));
        bot.write_all(b"FROBNICATE\r\n").unwrap();
        codes.extend(read_reply(&mut bot));
        let mut batch = b"MAIL FROM:<s@example.test>\r\nRCPT TO:<r@example.test>\r\n".to_vec();
        batch.extend_from_slice(format!("BDAT {} LAST\r\n", BDAT_MESSAGE.len()).as_bytes());
        batch.extend_from_slice(BDAT_MESSAGE);
        batch.extend_from_slice(b"QUIT\r\n");
        bot.write_all(&batch).unwrap();
        bot.shutdown(std::net::Shutdown::Write).unwrap();
        while let Some(code) = read_reply(&mut bot) {
            codes.push(code);
        }
        codes
    });

    let shared = Arc::new(Shared::new(
        config,
        Metrics::new().unwrap(),
        vec![guard_addr],
        Some(quarantine.clone()),
    ));
    let mut record = Record::new(shared.sessions.register(peer), peer);
    let end = tokio::time::timeout(
        Duration::from_secs(10),
        watch_plain(&shared, &mut client, &mut upstream, &mut record),
    )
    .await
    .ok();
    let end_reason = record.end;
    drop(record);
    // The session closes both connections after the watch.
    drop(client);
    drop(upstream);

    let listing = quarantine.list().unwrap();
    assert!(listing.skipped.is_empty());
    let stored = listing
        .messages
        .iter()
        .map(|entry| {
            let (meta, message) = quarantine.show(&entry.id).unwrap();
            (meta.rcpt_to, message)
        })
        .collect();
    HalfClosed {
        end,
        end_reason,
        replies: bot.join().unwrap(),
        mta: String::from_utf8_lossy(&mta.join().unwrap()).into_owned(),
        stored,
    }
}

/// A BDAT message of a quarantined or discarded session, pipelined with
/// its envelope and QUIT before a half-close: the MTA side stays open
/// until our RSET and the client's QUIT went, the client gets every reply
/// (the BDAT's `250` among them) and the session ends as both sides
/// closed. Before, the MTA side was shut at the FIN, the RSET failed
/// (EPIPE), the session ended as `reset` with the message stored and the
/// client answered nothing: it sent the message again.
async fn half_closed_bdat_is_answered(action: Action) -> HalfClosed {
    let seen = pipelined_bdat_then_half_close(
        action,
        // Slow enough that the client's FIN is read before MAIL is answered.
        Some(Duration::from_millis(300)),
        Duration::from_secs(60),
    )
    .await;
    assert!(matches!(seen.end, Some(WatchEnd::Over { .. })));
    assert_eq!(
        seen.replies,
        [250, 500, 250, 250, 250, 221],
        "every command answered (end={})",
        seen.end_reason
    );
    assert_eq!(seen.end_reason, "eof");
    assert_eq!(
        seen.mta,
        "EHLO bot.example.test\r\nFROBNICATE\r\n\
         MAIL FROM:<s@example.test>\r\nRCPT TO:<r@example.test>\r\n\
         RSET\r\nQUIT\r\n",
        "the MTA got the envelope, our RSET and the client's QUIT, never the message"
    );
    seen
}

#[tokio::test]
async fn a_quarantined_bdat_message_pipelined_before_a_half_close_is_answered() {
    let seen = half_closed_bdat_is_answered(Action::Quarantine).await;
    assert_eq!(
        seen.stored,
        [(vec!["r@example.test".to_string()], BDAT_MESSAGE.to_vec())],
        "the message, once"
    );
}

#[tokio::test]
async fn a_discarded_bdat_message_pipelined_before_a_half_close_is_answered() {
    let seen = half_closed_bdat_is_answered(Action::Discard).await;
    assert!(seen.stored.is_empty());
}

/// Held bytes keep the MTA side open, not the session: an MTA that never
/// answers the envelope leaves the half-closed client idle, and it is
/// ended after `relay.idle_timeout` with a 421 (it retries; nothing was
/// stored, nothing went to the MTA but the envelope).
#[tokio::test]
async fn a_half_closed_client_whose_held_bytes_never_go_is_ended_as_idle() {
    let seen =
        pipelined_bdat_then_half_close(Action::Quarantine, None, Duration::from_millis(600)).await;
    assert!(
        matches!(seen.end, Some(WatchEnd::Over { .. })),
        "the watch did not end"
    );
    assert_eq!(seen.end_reason, "idle");
    assert_eq!(seen.replies, [250, 500, 421]);
    assert_eq!(
        seen.mta,
        "EHLO bot.example.test\r\nFROBNICATE\r\n\
         MAIL FROM:<s@example.test>\r\nRCPT TO:<r@example.test>\r\n"
    );
    assert!(seen.stored.is_empty());
}

/// The idle timer after activity: its first deadline finds a byte moved
/// since, so it is set again an idle period after that byte, and fires
/// then (the watch polls it only after a reset or once it has fired).
#[tokio::test]
async fn an_idle_period_after_the_last_byte_ends_the_session() {
    let idle = Duration::from_millis(600);
    let mut config = Config::default();
    config.relay.idle_timeout = Dur(idle);
    let (mut bot, mut client, peer, guard_addr) = client_side();
    let (mut upstream, listener) = upstream_side();
    let (mut mta_side, _) = listener.accept().unwrap();
    let mta = std::thread::spawn(move || {
        let mut line = [0u8; 64];
        let n = mta_side.read(&mut line).unwrap();
        assert_eq!(&line[..n], b"NOOP\r\n");
        mta_side.write_all(b"250 2.0.0 Ok\r\n").unwrap();
        mta_side
    });
    // One turn 400 ms in: the first deadline (600 ms) finds it.
    let talker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        bot.write_all(b"NOOP\r\n").unwrap();
        bot.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = bot.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    });
    let shared = Shared::for_test(config, guard_addr);
    let mut record = Record::new(shared.sessions.register(peer), peer);
    let started = tokio::time::Instant::now();
    let end = tokio::time::timeout(
        Duration::from_secs(5),
        watch_plain(&shared, &mut client, &mut upstream, &mut record),
    )
    .await;
    let took = started.elapsed();
    assert!(
        matches!(end, Ok(WatchEnd::Over { quit: true })),
        "the idle timer did not fire again after its reset"
    );
    assert_eq!(record.end, "idle");
    assert!(
        took >= Duration::from_millis(950),
        "ended {took:?} in, before an idle period after the last byte"
    );
    drop(client);
    let got = talker.join().unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("250 2.0.0 Ok\r\n"), "{text}");
    assert!(
        text.contains("421 4.4.2"),
        "the idle client is told: {text}"
    );
    drop(mta.join().unwrap());
}

/// Segments the kernel has sent on this socket (`tcpi_segs_out`).
fn segs_out(sock: &Socket) -> u32 {
    mxguard_net::tcp_info::tcp_info(sock).unwrap().tcpi_segs_out
}

/// What the client saw of the MTA's goodbye.
struct Goodbye {
    end: WatchEnd,
    end_reason: &'static str,
    /// Everything the client read until the end of the stream.
    got: Vec<u8>,
    /// Segments the guard's end of the client connection sent from the
    /// moment the MTA had the QUIT.
    segments: u32,
    /// From the client's QUIT to its end of stream.
    took: Duration,
}

/// The client says QUIT; the MTA answers 221 and closes, the reply and
/// its FIN in one segment, so the guard reads both at once. `delay`: the
/// guard's reply delay for QUIT (`turns.reply_delay.other`).
async fn goodbye(delay: Option<Duration>) -> Goodbye {
    let mut config = Config::default();
    if let Some(delay) = delay {
        config.turns.reply_delay.other = Dur(delay);
    }
    let (mut bot, mut client, peer, guard_addr) = client_side();
    let (mut upstream, listener) = upstream_side();
    // The guard's end of the client connection, to count its segments
    // (a second descriptor of the same socket).
    let guard_end = SockRef::from(&client).try_clone().unwrap();
    let mta = std::thread::spawn(move || {
        let (mut mta_side, _) = listener.accept().unwrap();
        let mut line = [0u8; 64];
        let n = mta_side.read(&mut line).unwrap();
        assert_eq!(&line[..n], b"QUIT\r\n");
        // The guard's ACK of the QUIT went when it arrived.
        let before = segs_out(&guard_end);
        // Corked: the reply waits for the shutdown's FIN.
        SockRef::from(&mta_side).set_tcp_cork(true).unwrap();
        mta_side.write_all(b"221 2.0.0 Bye\r\n").unwrap();
        mta_side.shutdown(std::net::Shutdown::Write).unwrap();
        (before, guard_end)
    });
    let shared = Shared::for_test(config, guard_addr);
    let runtime = shared.runtime.load_full();
    let mut record = Record::new(shared.sessions.register(peer), peer);
    let started = tokio::time::Instant::now();
    bot.write_all(b"QUIT\r\n").unwrap();
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
            delay.is_some(),
            &mut record,
        ),
    )
    .await
    .expect("the watch ended");
    let (before, guard_end) = mta.join().unwrap();
    let segments = segs_out(&guard_end) - before;
    let mut got = Vec::new();
    bot.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    bot.read_to_end(&mut got).unwrap();
    let took = started.elapsed();
    drop(client);
    Goodbye {
        end,
        end_reason: record.end,
        got,
        segments,
        took,
    }
}

/// The MTA's goodbye and the end of the stream reach the client together,
/// in one segment, as they left the MTA: no reply tail held back waiting
/// for a shutdown that does not come.
#[tokio::test]
async fn the_mtas_goodbye_and_its_fin_reach_the_client_in_one_segment() {
    let g = goodbye(None).await;
    assert!(matches!(g.end, WatchEnd::Over { quit: false }));
    assert_eq!(g.end_reason, "upstream");
    assert_eq!(g.got, b"221 2.0.0 Bye\r\n");
    assert_eq!(g.segments, 1, "the 221 and the FIN in one segment");
    assert!(g.took < Duration::from_millis(150), "{:?}", g.took);
}

/// The same with the 221 held back by a reply delay: released by its
/// timer, it still leaves with the FIN, at once.
#[tokio::test]
async fn a_delayed_goodbye_leaves_with_the_fin_when_it_is_due() {
    let delay = Duration::from_millis(300);
    let g = goodbye(Some(delay)).await;
    assert!(matches!(g.end, WatchEnd::Over { quit: false }));
    assert_eq!(g.end_reason, "upstream");
    assert_eq!(g.got, b"221 2.0.0 Bye\r\n");
    assert_eq!(g.segments, 1, "the 221 and the FIN in one segment");
    assert!(g.took >= delay, "{:?}", g.took);
    assert!(g.took < delay + Duration::from_millis(150), "{:?}", g.took);
}

/// A client that pipelines commands and reads none of the replies is read
/// only until it owes the tracker's bound of replies: the rest of its
/// commands wait in its own socket, instead of the guard forwarding them
/// and queueing the MTA's replies without end (memory, and a thread
/// scanning that queue per command).
#[tokio::test]
async fn a_client_that_pipelines_and_never_reads_is_not_read_without_end() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let guard_addr = listener.local_addr().unwrap();
    let bot = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    bot.set_recv_buffer_size(2048).unwrap();
    bot.connect(&guard_addr.into()).unwrap();
    let bot: std::net::TcpStream = bot.into();
    let (accepted, peer) = listener.accept().unwrap();
    // Small buffers towards the client: what the kernel holds of the
    // unread replies is bounded anyway (`net.ipv4.tcp_wmem`).
    SockRef::from(&accepted).set_send_buffer_size(2048).unwrap();
    accepted.set_nonblocking(true).unwrap();
    let mut client = TcpStream::from_std(accepted).unwrap();
    let (mut upstream, mta_listener) = upstream_side();
    let mta = scripted_mta(mta_listener, Some(Duration::ZERO));
    let writer = std::thread::spawn(move || {
        let mut bot = bot;
        // PIPELINING offered: the flood is legal pipelining, only unread.
        bot.write_all(b"EHLO bot.example\r\n").unwrap();
        assert_eq!(read_reply(&mut bot), Some(250));
        bot.set_nonblocking(true).unwrap();
        let chunk = b"RSET\r\n".repeat(1000);
        let until = tokio::time::Instant::now() + Duration::from_millis(1500);
        let mut sent = 0usize;
        while tokio::time::Instant::now() < until {
            match bot.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => break,
            }
        }
        (bot, sent / 6)
    });
    let shared = Shared::for_test(Config::default(), guard_addr);
    let mut record = Record::new(shared.sessions.register(peer), peer);
    let waited = tokio::time::timeout(
        Duration::from_secs(2),
        watch_plain(&shared, &mut client, &mut upstream, &mut record),
    )
    .await;
    assert!(
        waited.is_err(),
        "the watch ended with the client there: {}",
        record.end
    );
    let (bot, sent) = writer.join().unwrap();
    drop(upstream);
    let got = mta.join().unwrap();
    let forwarded = got.windows(6).filter(|w| w == b"RSET\r\n").count();
    // What the tracker may owe, one read of the thread's buffer, and the
    // replies the sockets' buffers hold.
    let bound = mxguard_smtp::tracker::MAX_OWED + mxguard_net::TURN_BUFFER / 6 + 1000;
    assert!(
        forwarded <= bound,
        "{forwarded} of the client's {sent} RSETs went to the MTA, replies unread"
    );
    assert!(sent > bound, "the client sent only {sent}");
    drop(bot);
}

/// An idle timeout too long to add to an instant means "never" (as in the
/// relay), not a panic in every watched session.
#[tokio::test]
async fn an_idle_timeout_with_no_end_is_never() {
    let mut config = Config::default();
    config.relay.idle_timeout = Dur(Duration::from_secs(u64::MAX));
    let (mut bot, mut client, peer, guard_addr) = client_side();
    let (mut upstream, listener) = upstream_side();
    let mta = scripted_mta(listener, Some(Duration::ZERO));
    let talker = std::thread::spawn(move || {
        bot.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        bot.write_all(b"RSET\r\n").unwrap();
        let first = read_reply(&mut bot);
        bot.write_all(b"QUIT\r\n").unwrap();
        (first, read_reply(&mut bot))
    });
    let shared = Shared::for_test(config, guard_addr);
    let mut record = Record::new(shared.sessions.register(peer), peer);
    let end = tokio::time::timeout(
        Duration::from_secs(5),
        watch_plain(&shared, &mut client, &mut upstream, &mut record),
    )
    .await;
    assert!(matches!(end, Ok(WatchEnd::Over { .. })), "did not end");
    assert_eq!(talker.join().unwrap(), (Some(250), Some(221)));
    drop(upstream);
    mta.join().unwrap();
}
