//! The relay between a real client and a real MTA stand-in on loopback, in
//! both modes: bulk data, SMTP-like dialogue, half-close, resets, idleness.

// Test code: a failed unwrap is a failed test (clippy only sees #[test] fns as tests).
#![allow(clippy::unwrap_used)]

mod support;

use std::io;
use std::time::Duration;

use mxguard_net::{relay, RelayError, RelayMode, RelayStats};
use socket2::SockRef;
use support::{finished, pattern, peers, reset, segs_out, send_and_receive, start_relay};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;

const LONG_IDLE: Duration = Duration::from_secs(60);

/// Every scenario, once per mode.
macro_rules! in_both_modes {
    ($($scenario:ident),* $(,)?) => {
        mod splice {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(mxguard_net::RelayMode::Splice).await;
                }
            )*
        }
        mod copy {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(mxguard_net::RelayMode::Copy).await;
                }
            )*
        }
    };
}

in_both_modes!(
    carries_twelve_mib_each_way_intact,
    slow_mta_still_gets_every_byte_before_eof,
    smtp_dialogue_turn_by_turn,
    client_half_close_still_gets_the_mtas_reply,
    client_reset_ends_the_relay,
    mta_reset_ends_the_relay,
    silence_ends_the_relay_after_the_idle_timeout,
    a_trickle_one_way_is_not_idle,
    the_mtas_goodbye_and_its_fin_reach_the_client_in_one_segment,
    a_goodbye_without_its_fin_is_relayed_at_once,
);

async fn carries_twelve_mib_each_way_intact(mode: RelayMode) {
    let mail = pattern(1, 12 << 20);
    let replies = pattern(2, 12 << 20 | 12345);
    let (client, mta, observer, relayed) = start_relay(peers().await, mode, LONG_IDLE);

    let (mta_got, client_got) = tokio::join!(
        send_and_receive(mta, replies.clone()),
        send_and_receive(client, mail.clone()),
    );

    assert!(mta_got == mail, "MTA received different bytes");
    assert!(client_got == replies, "client received different bytes");
    let stats = finished(relayed).await.unwrap();
    let expected = RelayStats {
        up: mail.len() as u64,
        down: replies.len() as u64,
    };
    assert_eq!(stats, expected);
    assert_eq!(observer.stats(), expected, "observer saw every byte");
}

async fn slow_mta_still_gets_every_byte_before_eof(mode: RelayMode) {
    // The client sends and half-closes at once; the MTA only starts reading
    // later, so the relay holds bytes when the client's EOF is next in line.
    let mail = pattern(3, 8 << 20);
    let (client, mut mta, _observer, relayed) = start_relay(peers().await, mode, LONG_IDLE);
    let sender = tokio::spawn(send_and_receive(client, mail.clone()));

    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = Vec::new();
    mta.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), mail.len());
    assert!(got == mail, "MTA received different bytes");

    mta.shutdown().await.unwrap();
    assert_eq!(sender.await.unwrap(), b"");
    let stats = finished(relayed).await.unwrap();
    assert_eq!(stats.up, mail.len() as u64);
    assert_eq!(stats.down, 0);
}

async fn smtp_dialogue_turn_by_turn(mode: RelayMode) {
    let (client, mta, _observer, relayed) = start_relay(peers().await, mode, LONG_IDLE);
    let turns = 500;

    let mta_side = tokio::spawn(async move {
        let (rd, mut wr) = mta.into_split();
        let mut lines = BufReader::new(rd).lines();
        wr.write_all(b"220 mta ESMTP\r\n").await.unwrap();
        let mut n = 0;
        while let Some(line) = lines.next_line().await.unwrap() {
            if line == "QUIT" {
                wr.write_all(b"221 bye\r\n").await.unwrap();
                break;
            }
            assert_eq!(line, format!("RCPT TO:<u{n}@example.org>"));
            wr.write_all(format!("250 ok {n}\r\n").as_bytes())
                .await
                .unwrap();
            n += 1;
        }
        n
    });

    let (rd, mut wr) = client.into_split();
    let mut replies = BufReader::new(rd).lines();
    assert_eq!(replies.next_line().await.unwrap().unwrap(), "220 mta ESMTP");
    for n in 0..turns {
        wr.write_all(format!("RCPT TO:<u{n}@example.org>\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(
            replies.next_line().await.unwrap().unwrap(),
            format!("250 ok {n}")
        );
    }
    wr.write_all(b"QUIT\r\n").await.unwrap();
    assert_eq!(replies.next_line().await.unwrap().unwrap(), "221 bye");

    // The MTA hangs up after 221; the client then closes too.
    assert_eq!(mta_side.await.unwrap(), turns);
    assert_eq!(replies.next_line().await.unwrap(), None);
    drop(wr);
    finished(relayed).await.unwrap();
}

async fn client_half_close_still_gets_the_mtas_reply(mode: RelayMode) {
    let tail = pattern(4, 1 << 20);
    let (mut client, mut mta, _observer, relayed) = start_relay(peers().await, mode, LONG_IDLE);

    client.write_all(b"QUIT\r\n").await.unwrap();
    client.shutdown().await.unwrap();

    // The MTA sees the command, then the EOF ...
    let mut got = Vec::new();
    mta.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"QUIT\r\n");
    // ... and its answer still reaches the client, which is only half closed.
    mta.write_all(b"221 2.0.0 bye\r\n").await.unwrap();
    mta.write_all(&tail).await.unwrap();
    mta.shutdown().await.unwrap();

    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    assert_eq!(&answer[..15], b"221 2.0.0 bye\r\n");
    assert!(answer[15..] == tail[..], "client received different bytes");

    let stats = finished(relayed).await.unwrap();
    assert_eq!(stats.up, 6);
    assert_eq!(stats.down, answer.len() as u64);
}

async fn client_reset_ends_the_relay(mode: RelayMode) {
    let (mut client, mut mta, _observer, relayed) = start_relay(peers().await, mode, LONG_IDLE);
    client.write_all(b"EHLO bot\r\n").await.unwrap();
    let mut line = [0; 10];
    mta.read_exact(&mut line).await.unwrap();

    reset(client);

    match finished(relayed).await {
        Err(RelayError::Client { error, stats }) => {
            assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
            assert_eq!(stats.up, 10);
        }
        other => panic!("expected a client error, got {other:?}"),
    }
    // The proxy closed its side: the MTA sees the end, not a hang.
    let mut rest = Vec::new();
    let _ = mta.read_to_end(&mut rest).await;
}

async fn mta_reset_ends_the_relay(mode: RelayMode) {
    let (mut client, mut mta, _observer, relayed) = start_relay(peers().await, mode, LONG_IDLE);
    mta.write_all(b"220 mta\r\n").await.unwrap();
    let mut line = [0; 9];
    client.read_exact(&mut line).await.unwrap();

    reset(mta);

    match finished(relayed).await {
        Err(e @ RelayError::Upstream { .. }) => {
            assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
            assert_eq!(e.stats().down, 9);
        }
        other => panic!("expected an upstream error, got {other:?}"),
    }
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest).await;
}

async fn silence_ends_the_relay_after_the_idle_timeout(mode: RelayMode) {
    let idle = Duration::from_millis(200);
    let started = Instant::now();
    let (_client, _mta, _observer, relayed) = start_relay(peers().await, mode, idle);

    let error = finished(relayed).await.unwrap_err();

    let elapsed = started.elapsed();
    assert!(matches!(error, RelayError::Idle { .. }), "{error:?}");
    assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    assert_eq!(io::Error::from(error).kind(), io::ErrorKind::TimedOut);
    assert!(elapsed >= idle, "ended after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "ended after {elapsed:?}");
}

async fn a_trickle_one_way_is_not_idle(mode: RelayMode) {
    // One byte every 100 ms for a second, with a 300 ms idle timeout: the
    // session lives as long as bytes move, and ends 300 ms after the last.
    let idle = Duration::from_millis(300);
    let (mut client, mut mta, _observer, relayed) = start_relay(peers().await, mode, idle);
    let started = Instant::now();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(b".").await.unwrap();
    }
    let last_byte = Instant::now();

    let error = finished(relayed).await.unwrap_err();

    assert!(matches!(error, RelayError::Idle { .. }), "{error:?}");
    assert_eq!(error.stats().up, 10);
    assert!(last_byte.elapsed() >= idle - Duration::from_millis(20));
    assert!(started.elapsed() >= Duration::from_millis(1250));
    let mut got = Vec::new();
    mta.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"..........");
}

#[tokio::test]
async fn the_relay_future_is_small_and_send() {
    let support::Peers {
        proxy_client,
        proxy_upstream,
        ..
    } = peers().await;
    let future = relay(
        &proxy_client,
        &proxy_upstream,
        RelayMode::Splice,
        LONG_IDLE,
        &(),
    );
    fn assert_send<T: Send>(_: &T) {}
    assert_send(&future);
    let size = std::mem::size_of_val(&future);
    println!("relay future: {size} bytes");
    assert!(size <= 512, "relay future grew to {size} bytes");
}

/// In splice mode a turn smaller than the thread's read buffer is read and
/// written at once (one recv, one send: the fewest system calls), with no
/// pipe; a bulk burst goes through the pipe, zero-copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_mode_copies_small_turns_and_splices_bulk() {
    tokio::time::timeout(Duration::from_secs(20), small_turns_and_bulk())
        .await
        .expect("the relay stalled");
}

async fn small_turns_and_bulk() {
    let (client, mta, observer, relayed) = start_relay(peers().await, RelayMode::Splice, LONG_IDLE);
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mta_rd, mut mta_wr) = mta.into_split();
    let mut mta_rd = BufReader::new(mta_rd);

    mta_wr.write_all(b"220 mta ESMTP\r\n").await.unwrap();
    let mut banner = [0u8; 15];
    client_rd.read_exact(&mut banner).await.unwrap();
    for command in ["EHLO c.example", "MAIL FROM:<a@b.example>", "DATA"] {
        client_wr
            .write_all(format!("{command}\r\n").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        mta_rd.read_line(&mut line).await.unwrap();
        assert_eq!(line, format!("{command}\r\n"));
        mta_wr.write_all(b"250 ok\r\n").await.unwrap();
        client_rd.read_exact(&mut [0u8; 8]).await.unwrap();
    }
    assert!(observer.stats().up > 0 && observer.stats().down > 0);
    assert_eq!(observer.spliced(), 0, "small turns went through a pipe");

    // A 4 MiB body: read at once, as a bulk sender writes it.
    let body = pattern(9, 4 << 20);
    let (got, ()) = tokio::join!(
        async {
            let mut got = vec![0u8; body.len()];
            mta_rd.read_exact(&mut got).await.unwrap();
            got
        },
        async { client_wr.write_all(&body).await.unwrap() }
    );
    assert!(got == body, "the MTA got different bytes");
    let spliced = observer.spliced();
    assert!(
        spliced >= body.len() as u64 * 9 / 10,
        "only {spliced} of {} body bytes spliced",
        body.len()
    );
    drop((client_wr, mta_wr));
    finished(relayed).await.unwrap();
}

/// A burst whose last splice brings 16 KiB or more still ends with it: the
/// MTA's reply, then the client's next command, small, copied. The body
/// is queued whole before the relay first runs (one thread), so the burst
/// ends on a 48 KiB splice: 16 KiB copied, the rest at once.
#[tokio::test(flavor = "current_thread")]
async fn the_turn_after_a_burst_is_copied() {
    let (client, mta, observer, relayed) = start_relay(peers().await, RelayMode::Splice, LONG_IDLE);
    let body = pattern(5, 64 << 10);
    let mut queued = 0;
    while queued < body.len() {
        match client.try_write(&body[queued..]) {
            Ok(n) => queued += n,
            // The rest, if the socket takes no more, with the relay running.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mta_rd, mut mta_wr) = mta.into_split();
    let mut mta_rd = BufReader::new(mta_rd);
    let turns = async {
        let mut got = vec![0u8; body.len()];
        let ((), read) = tokio::join!(
            async { client_wr.write_all(&body[queued..]).await.unwrap() },
            mta_rd.read_exact(&mut got)
        );
        read.unwrap();
        assert!(got == body, "the MTA got different bytes");
        let spliced = observer.spliced();
        assert!(spliced > 0, "the burst was not spliced");
        mta_wr.write_all(b"250 ok\r\n").await.unwrap();
        client_rd.read_exact(&mut [0u8; 8]).await.unwrap();
        client_wr.write_all(b"QUIT\r\n").await.unwrap();
        let mut line = String::new();
        mta_rd.read_line(&mut line).await.unwrap();
        assert_eq!(line, "QUIT\r\n");
        assert_eq!(
            observer.spliced(),
            spliced,
            "the QUIT after the burst was spliced"
        );
        drop((client_wr, mta_wr));
    };
    tokio::time::timeout(Duration::from_secs(20), turns)
        .await
        .expect("the relay stalled");
    finished(relayed).await.unwrap();
}

/// The client says QUIT; the MTA answers 221 and closes, reply and FIN in
/// one segment (corked). The relay reads both at once and passes them on
/// the same way: one segment from the proxy to the client, not the reply
/// and then, a wake-up later, the FIN.
async fn the_mtas_goodbye_and_its_fin_reach_the_client_in_one_segment(mode: RelayMode) {
    let peers = peers().await;
    // A second descriptor of the proxy's client socket, to count its segments.
    let proxy_end = SockRef::from(&peers.proxy_client).try_clone().unwrap();
    let (mut client, mut mta, _observer, relayed) = start_relay(peers, mode, LONG_IDLE);

    client.write_all(b"QUIT\r\n").await.unwrap();
    let mut quit = [0u8; 6];
    mta.read_exact(&mut quit).await.unwrap();
    assert_eq!(&quit, b"QUIT\r\n");
    // The proxy's ACK of the QUIT went when it arrived.
    let before = segs_out(&proxy_end);
    SockRef::from(&mta).set_tcp_cork(true).unwrap();
    mta.write_all(b"221 2.0.0 Bye\r\n").await.unwrap();
    mta.shutdown().await.unwrap();

    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
        .await
        .expect("the client got the end of the stream")
        .unwrap();
    assert_eq!(got, b"221 2.0.0 Bye\r\n");
    assert_eq!(
        segs_out(&proxy_end) - before,
        1,
        "the 221 and the FIN in one segment"
    );
    drop(client);
    let stats = finished(relayed).await.unwrap();
    assert_eq!(stats, RelayStats { up: 6, down: 15 });
}

/// A goodbye whose FIN is not there yet is not held for it: the client
/// gets the 221 at once, and the end of the stream when the MTA closes.
async fn a_goodbye_without_its_fin_is_relayed_at_once(mode: RelayMode) {
    let (mut client, mut mta, _observer, relayed) = start_relay(peers().await, mode, LONG_IDLE);
    client.write_all(b"QUIT\r\n").await.unwrap();
    let mut quit = [0u8; 6];
    mta.read_exact(&mut quit).await.unwrap();
    mta.write_all(b"221 2.0.0 Bye\r\n").await.unwrap();

    let mut reply = [0u8; 15];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut reply))
        .await
        .expect("the 221 came without the FIN")
        .unwrap();
    assert_eq!(&reply, b"221 2.0.0 Bye\r\n");

    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(mta);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .expect("the end of the stream followed")
        .unwrap();
    assert!(rest.is_empty());
    drop(client);
    let stats = finished(relayed).await.unwrap();
    assert_eq!(stats, RelayStats { up: 6, down: 15 });
}
