//! Fleet figures for docs/fleet.md: decisions/s through a real local
//! redis-server with the guard's own GCRA script, the latency a decision
//! adds, and Redis memory per tracked bucket key.
//!
//! `cargo bench -p mxguard --bench fleet` (release build). Starts its own
//! `redis-server` on a free loopback port (`--save ''`); without one it
//! says so and measures nothing. Plain timing loops: figures for sizing
//! (tokio's `Instant`, as the crate's lint asks: it is the std clock
//! outside paused-time tests).

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

const GCRA: &str = include_str!("../src/gcra.lua");

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(16379)
}

/// Keys and arguments of one decision for a client address: its address
/// bucket and its /24 bucket (the default shape).
fn decision(script: &redis::Script, n: u32) -> redis::ScriptInvocation<'_> {
    decision_every(script, n, 1_000_000, 100)
}

/// The same with one token every `interval_us` per address and a burst
/// of `prefix_burst` per /24 (a key lives
/// until its bucket is full again: `interval * tokens taken`).
fn decision_every(
    script: &redis::Script,
    n: u32,
    interval_us: u64,
    prefix_burst: u32,
) -> redis::ScriptInvocation<'_> {
    let ip = Ipv4Addr::from(0x0a00_0000 + n);
    let o = ip.octets();
    let mut inv = script.prepare_invoke();
    inv.key(format!("bench:b:address:{ip}"))
        .arg(interval_us)
        .arg(30u32)
        .key(format!("bench:b:ipv4/24:{}.{}.{}.0/24", o[0], o[1], o[2]))
        .arg(200_000u64)
        .arg(prefix_burst);
    inv
}

fn used_memory(con: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query(con)
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn main() {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = child else {
        println!(
            "fleet: redis-server not found; nothing measured (tests/install-deps.sh installs it)"
        );
        return;
    };
    let _server = Server(child);
    let url = format!("redis://127.0.0.1:{port}/");
    let client = redis::Client::open(url.as_str()).expect("a valid URL");
    let mut con = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match client.get_connection() {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("redis-server did not come up: {e}"),
            }
        }
    };
    let script = redis::Script::new(GCRA);

    // One gateway deciding one connection at a time: the latency a
    // decision adds to accept.
    let n = 20_000u32;
    let mut took = Vec::with_capacity(n as usize);
    let t0 = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let _: (u64, u64) = decision(&script, i % 5000)
            .invoke(&mut con)
            .expect("the script runs");
        took.push(t.elapsed());
    }
    let total = t0.elapsed();
    took.sort();
    println!(
        "fleet: sequential decisions: {:.0}/s; added latency p50 {:?}, p99 {:?}, max {:?}",
        f64::from(n) / total.as_secs_f64(),
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        took.last().copied().unwrap_or_default()
    );

    // Many sessions deciding at once over one multiplexed connection (how
    // the daemon's connection manager is shared).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let per_task = 2_000u32;
    let tasks = 64u32;
    let elapsed = rt.block_on(async {
        let manager = client
            .get_connection_manager()
            .await
            .expect("a connection manager");
        let t0 = Instant::now();
        let mut handles = Vec::new();
        for t in 0..tasks {
            let mut m = manager.clone();
            handles.push(tokio::spawn(async move {
                let script = redis::Script::new(GCRA);
                for i in 0..per_task {
                    let _: Result<(u64, u64), _> = decision(&script, (t * per_task + i) % 50_000)
                        .invoke_async(&mut m)
                        .await;
                }
            }));
        }
        for h in handles {
            let _ = h.await;
        }
        t0.elapsed()
    });
    println!(
        "fleet: concurrent decisions ({tasks} sessions, one multiplexed connection): {:.0}/s",
        f64::from(tasks * per_task) / elapsed.as_secs_f64()
    );

    // Memory per tracked key: distinct addresses, each leaving its address
    // bucket (and 1/256 of a /24 bucket) behind.
    let _: () = redis::cmd("FLUSHALL").query(&mut con).unwrap_or(());
    let before = used_memory(&mut con);
    let keys = 100_000u32;
    for i in 0..keys {
        let _: Result<(u64, u64), _> =
            decision_every(&script, 1_000_000 + i, 600_000_000, 1000).invoke(&mut con);
    }
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut con).unwrap_or(0);
    let after = used_memory(&mut con);
    println!(
        "fleet: {dbsize} bucket keys take {:.1} MiB in Redis: {:.0} bytes per tracked key",
        (after.saturating_sub(before)) as f64 / 1048576.0,
        after.saturating_sub(before) as f64 / dbsize.max(1) as f64
    );
}
