//! `mxbench send --target A --size BYTES --count N`: N messages of about
//! BYTES each, one session per message, one session at a time. The body
//! goes out with sendfile(2) from a file, so the sender costs almost no
//! CPU and never limits the figure.
//!
//! Prints one JSON line: bytes, seconds (sessions included: connect,
//! greeting, envelope, DATA, the 250 and QUIT), MB/s (10^6 bytes).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::time::Instant;

use crate::args::Args;
use crate::smtp::{connect, message, sources, Client};

pub fn main(args: &Args) -> Result<(), String> {
    let target = args.addr("target")?;
    let size: usize = args.required("size")?;
    let count: usize = args.get("count", 1)?;
    let source = sources(args.opt_str("source"))?.first().copied();

    // The message lives in an unlinked temp file: sendfile needs a file.
    let path = std::env::temp_dir().join(format!("mxbench-msg-{}", std::process::id()));
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&path);
    let body = message(size);
    file.write_all(&body).map_err(|e| e.to_string())?;
    let len = body.len();
    drop(body);

    let mut per_message = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let t = Instant::now();
        one(target, source, &file, len).map_err(|e| format!("message {i}: {e}"))?;
        per_message.push(t.elapsed().as_secs_f64());
    }
    let seconds = started.elapsed().as_secs_f64();
    let bytes = (len * count) as f64;
    per_message.sort_by(f64::total_cmp);
    println!(
        "{{\"bytes\":{bytes},\"messages\":{count},\"seconds\":{seconds:.6},\"mb_per_s\":{:.1},\"median_message_ms\":{:.3}}}",
        bytes / 1e6 / seconds,
        crate::smtp::percentile(&per_message, 50.0) * 1e3
    );
    Ok(())
}

fn one(
    target: std::net::SocketAddr,
    source: Option<std::net::IpAddr>,
    file: &File,
    len: usize,
) -> std::io::Result<()> {
    let mut client = Client::new(connect(target, source)?);
    client.open_transaction()?;
    let mut offset: i64 = 0;
    while (offset as usize) < len {
        let left = len - offset as usize;
        let n = nix::sys::sendfile::sendfile(
            client.stream.as_fd(),
            file.as_fd(),
            Some(&mut offset),
            left,
        )
        .map_err(std::io::Error::from)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
    }
    client.expect(250)?;
    client.command(b"QUIT\r\n", 221)
}
