//! `mxbench`: the load generators and the fast sink that `bench/run.py`
//! drives (see `docs/benchmarks.md`).
//!
//! - `hold`: open N idle connections and keep them (held sessions).
//! - `send`: bulk messages, the body written with sendfile(2), so the
//!   sender is not what limits a throughput figure (smtp-source tops out
//!   near 180 MB/s here).
//! - `sink`: an SMTP sink that reads DATA in 256 KiB reads (smtp-sink reads
//!   line by line).
//! - `rate`: sessions started at a fixed rate (open loop), each timed from
//!   its scheduled start, so a slow server cannot hide its queueing
//!   (coordinated omission).
//!
//! Blocking I/O and threads: simple to read, and the costs are the same on
//! every path measured, so ratios stay fair.
#![forbid(unsafe_code)]

mod args;
mod hold;
mod rate;
mod send;
mod sink;
mod smtp;

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let Some(command) = argv.next() else {
        eprintln!("usage: mxbench hold|send|sink|rate [--key value ...]");
        return ExitCode::from(2);
    };
    let args = match args::Args::parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mxbench: {e}");
            return ExitCode::from(2);
        }
    };
    raise_nofile_limit();
    let result = match command.as_str() {
        "hold" => hold::main(&args),
        "send" => send::main(&args),
        "sink" => sink::main(&args),
        "rate" => rate::main(&args),
        other => Err(format!("unknown command {other}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mxbench {command}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Held connections cost descriptors: take what the hard limit allows.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
