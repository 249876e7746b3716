//! `mxbench hold --target A --count N [--sources 127.0.1.1,...]`: open N
//! connections and keep them idle, as a botnet's clients waiting for a
//! greeting do. One descriptor per connection: the driver runs several
//! holders to stay under the per-process descriptor limit.
//!
//! Prints one JSON line when all are open, then obeys stdin: `check`
//! prints how many are still held (no EOF, no 4xx/5xx reply waiting), EOF
//! closes everything and exits.

use std::io::{self, BufRead, ErrorKind, Write};
use std::net::TcpStream;
use std::time::Instant;

use crate::args::Args;
use crate::smtp::{connect, sources};

pub fn main(args: &Args) -> Result<(), String> {
    let target = args.addr("target")?;
    let count: usize = args.required("count")?;
    let sources = sources(args.opt_str("sources"))?;
    let started = Instant::now();
    let mut held = Vec::with_capacity(count);
    let mut failed = 0usize;
    for i in 0..count {
        let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
        match connect(target, source) {
            Ok(stream) => held.push(stream),
            Err(e) => {
                failed += 1;
                if failed == 1 {
                    eprintln!("mxbench hold: connect {i}: {e}");
                }
            }
        }
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "{{\"event\":\"open\",\"opened\":{},\"failed\":{failed},\"seconds\":{took:.3}}}",
        held.len()
    );
    io::stdout().flush().map_err(|e| e.to_string())?;

    for line in io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.trim() == "check" {
            let (ok, closed, refused) = check(&held);
            println!(
                "{{\"event\":\"check\",\"held\":{ok},\"closed\":{closed},\"refused\":{refused}}}"
            );
            io::stdout().flush().map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Peeks at every connection: still held, closed by the server, or
/// answered with a refusal (a 4xx/5xx reply).
fn check(held: &[TcpStream]) -> (usize, usize, usize) {
    let (mut ok, mut closed, mut refused) = (0, 0, 0);
    let mut buf = [0u8; 64];
    for stream in held {
        let _ = stream.set_nonblocking(true);
        match stream.peek(&mut buf) {
            Ok(0) => closed += 1,
            // A greeting challenge (`220-`) or postscreen's banner: held.
            Ok(n) if buf[..n].starts_with(b"220") => ok += 1,
            Ok(_) => refused += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => ok += 1,
            Err(_) => closed += 1,
        }
        let _ = stream.set_nonblocking(false);
    }
    (ok, closed, refused)
}
