//! What an idle relayed session costs: its sockets, and no pipe. Its own
//! test binary, because it counts the process's file descriptors.

// Test code: a failed unwrap is a failed test (clippy only sees #[test] fns as tests).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use mxguard_net::RelayMode;
use support::{peers, start_relay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn open_pipe_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_spliced_sessions_hold_no_pipes() {
    let before = open_pipe_fds();
    let mut sessions = Vec::new();
    for _ in 0..50 {
        let (mut client, mut mta, observer, relayed) =
            start_relay(peers().await, RelayMode::Splice, Duration::from_secs(60));
        // One SMTP turn each way and a bulk burst (spliced: small turns
        // take no pipe at all), then the session sits idle.
        mta.write_all(b"220 mta\r\n").await.unwrap();
        client.read_exact(&mut [0; 9]).await.unwrap();
        client.write_all(b"NOOP\r\n").await.unwrap();
        mta.read_exact(&mut [0; 6]).await.unwrap();
        let burst = vec![b'x'; 256 << 10];
        let mut arrived = vec![0; burst.len()];
        let (wrote, read) = tokio::join!(client.write_all(&burst), mta.read_exact(&mut arrived));
        wrote.unwrap();
        read.unwrap();
        assert!(observer.spliced() > 0, "the burst was not spliced");
        sessions.push((client, mta, relayed));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Held per session, the pipes would be 50 sessions x 2 directions x 2 fds.
    let pipes = open_pipe_fds() - before;
    assert!(pipes <= 8, "{pipes} pipe fds open for 50 idle sessions");

    for (_, _, relayed) in sessions {
        relayed.abort();
    }
}
