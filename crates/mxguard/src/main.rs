//! mxguard: an inline SMTP guard in front of a real MTA.
//!
//! `mxguard run` guards; `mxguard check-config` validates and prints the
//! effective configuration; `mxguard demo` shows the guard at work on
//! loopback with nothing else installed.
#![forbid(unsafe_code)]

mod admin;
mod admission;
mod admission_config;
mod alert;
mod api;
mod cluster;
mod config;
mod ctl;
mod deadline;
mod demo;
mod events;
mod intercept;
mod lists;
mod logging;
mod metrics;
mod nft;
mod notify;
mod pen;
mod quarantine;
mod reload;
mod server;
mod session;
mod sessions;
mod sk_lookup;
mod state;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, Overrides};

/// malloc, with tokio's cache-padded blocks served from its fast path
/// (see `mxguard_net::alloc`).
#[global_allocator]
static ALLOCATOR: mxguard_net::Allocator = mxguard_net::Allocator;

#[derive(Parser)]
#[command(
    name = "mxguard",
    version,
    about = "An inline SMTP guard: greet pause, early-talker catch, zero-copy relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the guard.
    Run {
        /// The TOML configuration file (built-in defaults without it).
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Validate the configuration and print the effective result.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// List, show, release or delete quarantined messages.
    Quarantine(quarantine::QuarantineArgs),
    /// Operate a running guard over its admin API: block, unblock, allow,
    /// lookup, sessions, quarantine, reload, stats, config.
    Ctl(ctl::CtlArgs),
    /// Show the guard at work on loopback: a built-in MTA stand-in, the
    /// guard in front of it, a polite client and an early talker.
    Demo {
        /// The greet delay to demonstrate.
        #[arg(long, default_value = "2s")]
        greet_delay: config::Dur,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config, overrides } => {
            match Config::load(config.as_deref(), &overrides) {
                Ok(c) => {
                    print!("{}", c.to_toml());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run { config, overrides } => {
            let loaded = match Config::load(config.as_deref(), &overrides) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            logging::init(&loaded.log);
            // The daemon's own tasks (signals, admin API, holding pen,
            // state, fleet): sessions run on the session threads
            // (`intercept.workers`), so two threads are plenty here.
            let main_threads = std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(2);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(main_threads)
                .thread_name("mxguard-main")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(server::run(config, overrides, loaded)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Quarantine(args) => quarantine::cli_main(args),
        Command::Ctl(args) => ctl::main(args),
        Command::Demo { greet_delay } => demo::main(greet_delay),
    }
}
