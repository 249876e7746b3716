//! `mxbench rate --target A --rate R --seconds S`: start R sessions a
//! second for S seconds, each a whole small transaction (greeting, EHLO,
//! MAIL, RCPT, DATA, QUIT), and time each from the instant it was due to
//! start, not from when a thread got to it: a server that falls behind
//! shows its queueing in the figures (no coordinated omission).
//!
//! `--wait MS`: each client waits that long after connecting before it
//! reads the greeting, as it waits out a guard's greet delay (a direct
//! run's baseline for the delayed one).
//!
//! Prints one JSON line: sessions done and failed, the rate achieved (of
//! session starts: a run's last sessions end a greet delay after their
//! start, which is not a slower rate), and
//! p50/p90/p99/max in milliseconds of the time to the greeting's final line
//! and to the end of the session. With `MXBENCH_SLOWEST=1` in the
//! environment, the 30 slowest sessions go to stderr (`=N`: the N slowest)
//! with the instant they were due: a burst of them at one instant is a
//! stall, of the server or of the machine.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::args::Args;
use crate::smtp::{connect, percentile, sources, Client};

const BODY: &[u8] = b"From: bench@example.org\r\nTo: sink@example.net\r\nSubject: rate\r\n\r\nA small message.\r\n.\r\n";

pub fn main(args: &Args) -> Result<(), String> {
    let target = args.addr("target")?;
    let rate: f64 = args.required("rate")?;
    let seconds: f64 = args.get("seconds", 5.0)?;
    let threads: usize = args.get("threads", 64)?;
    // The client waits this long after connecting before it reads the
    // greeting, as it waits out a greet delay: a direct run's baseline for
    // what that wait costs the client itself.
    let wait = Duration::from_millis(args.get("wait", 0u64)?);
    let sources = Arc::new(sources(args.opt_str("sources"))?);
    let total = (rate * seconds).round() as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(50);
    let next = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let failed = Arc::new(AtomicUsize::new(0));

    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (next, samples, failed, sources) = (
                next.clone(),
                samples.clone(),
                failed.clone(),
                sources.clone(),
            );
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let due = start + interval.mul_f64(i as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let began = start.elapsed();
                let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
                match session(target, source, due, wait) {
                    Ok((greeted, done)) => samples
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(Sample {
                            greeted,
                            done,
                            due: (due - start).as_secs_f64() * 1e3,
                            began,
                        }),
                    Err(e) => {
                        if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("mxbench rate: session {i}: {e}");
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let samples = samples.lock().unwrap_or_else(PoisonError::into_inner);
    // Starts per second: from the first due instant to the last start,
    // plus the interval that start was given.
    let last_start = samples.iter().map(|s| s.began).max().unwrap_or_default();
    let took = (last_start + interval).as_secs_f64();
    if let Some(count) = std::env::var_os("MXBENCH_SLOWEST") {
        // How many: the number given, or 30.
        let count = count
            .to_str()
            .and_then(|c| c.parse().ok())
            .filter(|&c| c > 1)
            .unwrap_or(30);
        // Which sessions were slow, by when they were due (ms from start):
        // stalls that recur at an interval point at a periodic task.
        let mut slow: Vec<&Sample> = samples.iter().collect();
        slow.sort_by(|a, b| b.done.total_cmp(&a.done));
        for s in slow.iter().take(count) {
            eprintln!(
                "due {:9.3} ms: greeting {:7.3} ms, session {:7.3} ms",
                s.due, s.greeted, s.done
            );
        }
    }
    let mut greet: Vec<f64> = samples.iter().map(|s| s.greeted).collect();
    let mut done: Vec<f64> = samples.iter().map(|s| s.done).collect();
    greet.sort_by(f64::total_cmp);
    done.sort_by(f64::total_cmp);
    let pct = |v: &[f64]| {
        format!(
            "{{\"p50\":{:.3},\"p90\":{:.3},\"p99\":{:.3},\"max\":{:.3}}}",
            percentile(v, 50.0),
            percentile(v, 90.0),
            percentile(v, 99.0),
            percentile(v, 100.0)
        )
    };
    println!(
        "{{\"sessions\":{},\"failed\":{},\"rate\":{:.1},\"greeting_ms\":{},\"session_ms\":{}}}",
        samples.len(),
        failed.load(Ordering::Relaxed),
        samples.len() as f64 / took,
        pct(&greet),
        pct(&done)
    );
    std::io::stdout().flush().map_err(|e| e.to_string())
}

/// One session's timings.
struct Sample {
    /// Milliseconds from the instant it was due to its greeting, and to
    /// its end.
    greeted: f64,
    done: f64,
    /// When it was due, in milliseconds from the run's start.
    due: f64,
    /// When a thread began it, from the run's start.
    began: Duration,
}

/// One transaction; returns (greeting, end) in milliseconds after `due`.
fn session(
    target: SocketAddr,
    source: Option<IpAddr>,
    due: Instant,
    wait: Duration,
) -> std::io::Result<(f64, f64)> {
    let mut client = Client::new(connect(target, source)?);
    if !wait.is_zero() {
        std::thread::sleep(wait);
    }
    client.expect(220)?;
    let greeted = due.elapsed().as_secs_f64() * 1e3;
    client.command(b"EHLO bench.example\r\n", 250)?;
    client.command(b"MAIL FROM:<bench@example.org>\r\n", 250)?;
    client.command(b"RCPT TO:<sink@example.net>\r\n", 250)?;
    client.command(b"DATA\r\n", 354)?;
    client.command(BODY, 250)?;
    client.command(b"QUIT\r\n", 221)?;
    Ok((greeted, due.elapsed().as_secs_f64() * 1e3))
}
