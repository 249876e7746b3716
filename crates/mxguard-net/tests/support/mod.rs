//! Real loopback peers for the mxguard-net tests, written once: a sending
//! client, the proxy's two sockets, an MTA stand-in, and a relay running
//! between them the way the daemon runs it.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mxguard_net::{relay, Direction, RelayError, RelayMode, RelayObserver, RelayStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The four sockets of one proxied connection on loopback.
pub struct Peers {
    /// What the sending client holds.
    pub client: TcpStream,
    /// The proxy's accepted socket from the client.
    pub proxy_client: TcpStream,
    /// The proxy's connection to the MTA.
    pub proxy_upstream: TcpStream,
    /// What the MTA holds.
    pub mta: TcpStream,
}

/// A connected loopback pair: (the connecting end, the accepted end).
pub async fn connected_pair(listen: SocketAddr) -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind(listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

pub async fn peers() -> Peers {
    let (client, proxy_client) = connected_pair("127.0.0.1:0".parse().unwrap()).await;
    let (proxy_upstream, mta) = connected_pair("127.0.0.1:0".parse().unwrap()).await;
    Peers {
        client,
        proxy_client,
        proxy_upstream,
        mta,
    }
}

/// Counts what the relay reports, per direction, and how much of it
/// went through a pipe.
#[derive(Debug, Default)]
pub struct Counting {
    pub up: AtomicU64,
    pub down: AtomicU64,
    pub spliced: AtomicU64,
}

impl RelayObserver for Counting {
    fn relayed(&self, mode: RelayMode, dir: Direction, n: u64) {
        let counter = match dir {
            Direction::Upstream => &self.up,
            Direction::Downstream => &self.down,
        };
        counter.fetch_add(n, Ordering::Relaxed);
        if mode == RelayMode::Splice {
            self.spliced.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl Counting {
    /// Bytes that went through a pipe (splice), either way.
    pub fn spliced(&self) -> u64 {
        self.spliced.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> RelayStats {
        RelayStats {
            up: self.up.load(Ordering::Relaxed),
            down: self.down.load(Ordering::Relaxed),
        }
    }
}

pub type Relayed = JoinHandle<Result<RelayStats, RelayError>>;

/// Run the relay between the proxy's sockets as the daemon does: on a task
/// of its own, closing both sockets when it ends. Returns the client and
/// MTA ends, the observer, and the relay's task.
pub fn start_relay(
    peers: Peers,
    mode: RelayMode,
    idle: Duration,
) -> (TcpStream, TcpStream, Arc<Counting>, Relayed) {
    let Peers {
        client,
        proxy_client,
        proxy_upstream,
        mta,
    } = peers;
    let observer = Arc::new(Counting::default());
    let seen = Arc::clone(&observer);
    let task =
        tokio::spawn(
            async move { relay(&proxy_client, &proxy_upstream, mode, idle, &*seen).await },
        );
    (client, mta, observer, task)
}

/// The relay's result, failing the test if it hangs.
pub async fn finished(task: Relayed) -> Result<RelayStats, RelayError> {
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("relay hung")
        .expect("relay task panicked")
}

/// Deterministic bytes that differ by seed and by position (xorshift).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Write all of `data`, then half-close; meanwhile read everything the
/// other side sends until its EOF. Returns what was read.
pub async fn send_and_receive(stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&data).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    });
    let mut got = Vec::new();
    rd.read_to_end(&mut got).await.unwrap();
    drop(writer.await.unwrap());
    got
}

/// Close with a reset (SO_LINGER 0) instead of a FIN.
pub fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

/// Segments the kernel has sent on this socket (`tcpi_segs_out`).
pub fn segs_out(sock: &impl AsFd) -> u32 {
    mxguard_net::tcp_info::tcp_info(sock).unwrap().tcpi_segs_out
}
