//! `mxguard quarantine list|show|release|delete`: the operator's hands on
//! the quarantine until the admin API has its own.
//!
//! Exit codes: 0 done; 1 not found, busy, refused by the MTA or any other
//! failure (the message is then still there, unless the error says
//! otherwise); 2 a bad configuration or command line (a malformed id is a
//! command-line error: clap refuses it before anything is opened).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use mxguard_smtp::escape_capped;
use serde::Serialize;

use super::{
    Quarantine, QuarantineError, QuarantineId, QuarantineMeta, QuarantineSummary, ReleaseError,
    ReleaseReceipt,
};
use crate::config::{Config, Overrides};

#[derive(Debug, clap::Args)]
pub struct QuarantineArgs {
    /// The TOML configuration file: `[quarantine] dir`, and for release
    /// `hostname` and `intercept.upstream` (built-in defaults without it).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: QuarantineCommand,
}

#[derive(Debug, Subcommand)]
enum QuarantineCommand {
    /// List the quarantined messages, oldest first.
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print one message: its metadata, then its content as stored.
    Show {
        id: QuarantineId,
        /// One JSON object: the metadata, the size, and the message as
        /// `message_base64` (plus `message` when it is valid UTF-8).
        #[arg(long)]
        json: bool,
    },
    /// Deliver a message to the MTA over SMTP with its stored envelope;
    /// it leaves the quarantine only once the MTA accepted it.
    Release {
        id: QuarantineId,
        /// The MTA to deliver to [default: the config's intercept.upstream].
        #[arg(long, value_name = "ADDR")]
        upstream: Option<SocketAddr>,
    },
    /// Delete a message without delivering it.
    Delete { id: QuarantineId },
}

/// Runs one `mxguard quarantine` command.
pub fn main(args: QuarantineArgs) -> ExitCode {
    let config = match Config::load(args.config.as_deref(), &Overrides::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let store = Quarantine::open_existing(&config.quarantine);
    match args.command {
        QuarantineCommand::List { json } => list(&store, json),
        QuarantineCommand::Show { id, json } => show(&store, &id, json),
        QuarantineCommand::Release { id, upstream } => {
            let upstream = upstream.unwrap_or(config.intercept.upstream);
            release(&store, &id, upstream, &config.hostname)
        }
        QuarantineCommand::Delete { id } => match store.delete(&id) {
            Ok(()) => {
                println!("deleted {id}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string()),
        },
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn list(store: &Quarantine, json: bool) -> ExitCode {
    let listing = match store.list() {
        Ok(l) => l,
        Err(e) => return fail(&e.to_string()),
    };
    // Unreadable files may be mail: say so on every listing, on stderr so
    // the JSON on stdout stays clean.
    for problem in &listing.skipped {
        eprintln!("warning: {problem}");
    }
    if json {
        return print_json(&listing.messages);
    }
    if listing.messages.is_empty() {
        println!("no messages in {}", store.dir().display());
        return ExitCode::SUCCESS;
    }
    print!("{}", table(&listing.messages));
    ExitCode::SUCCESS
}

/// Columns sized to their widest cell. Every field but the id and the size
/// came from the client: escaped, and capped, so a sender cannot draw on
/// the operator's terminal.
fn table(messages: &[QuarantineSummary]) -> String {
    let head = ["ID", "RECEIVED", "CLIENT", "FROM", "RCPTS", "SIZE", "TESTS"];
    let rows: Vec<[String; 7]> = messages
        .iter()
        .map(|m| {
            [
                m.id.to_string(),
                m.received.clone(),
                m.client.to_string(),
                format!("<{}>", escape_capped(m.mail_from.as_bytes(), 64)),
                rcpts_cell(&m.rcpt_to),
                m.size.to_string(),
                escape_capped(m.tests.join(",").as_bytes(), 64),
            ]
        })
        .collect();
    let mut widths = head.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == 5 {
                l.push_str(&format!("{cell:>w$}  "));
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&head);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// The first recipient and a count of the others: the table stays one
/// line per message however many there are.
fn rcpts_cell(rcpts: &[String]) -> String {
    match rcpts {
        [] => "-".into(),
        [one] => format!("<{}>", escape_capped(one.as_bytes(), 64)),
        [first, rest @ ..] => format!("<{}> +{}", escape_capped(first.as_bytes(), 64), rest.len()),
    }
}

fn show(store: &Quarantine, id: &QuarantineId, json: bool) -> ExitCode {
    let (meta, message) = match store.show(id) {
        Ok(m) => m,
        Err(e) => return fail(&e.to_string()),
    };
    if json {
        #[derive(Serialize)]
        struct Shown<'a> {
            meta: &'a QuarantineMeta,
            size: usize,
            #[serde(skip_serializing_if = "Option::is_none")]
            message: Option<&'a str>,
            message_base64: String,
        }
        return print_json(&Shown {
            meta: &meta,
            size: message.len(),
            message: std::str::from_utf8(&message).ok(),
            message_base64: base64(&message),
        });
    }
    let esc = |s: &str| escape_capped(s.as_bytes(), 1024);
    let list = |v: &[String], bracket: bool| {
        v.iter()
            .map(|s| {
                if bracket {
                    format!("<{}>", esc(s))
                } else {
                    esc(s)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut head = String::new();
    head.push_str(&format!("id:        {}\n", meta.id));
    head.push_str(&format!("received:  {}\n", esc(&meta.received)));
    head.push_str(&format!("client:    {}\n", meta.client));
    head.push_str(&format!(
        "helo:      {}\n",
        meta.helo.as_deref().map(esc).unwrap_or_else(|| "-".into())
    ));
    head.push_str(&format!("mail from: <{}>\n", esc(&meta.mail_from)));
    head.push_str(&format!("rcpt to:   {}\n", list(&meta.rcpt_to, true)));
    head.push_str(&format!("tests:     {}\n", list(&meta.tests, false)));
    head.push_str(&format!(
        "action:    {}\n",
        serde_json::to_value(meta.action)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    ));
    head.push_str(&format!("guard:     {}\n", esc(&meta.guard)));
    head.push_str(&format!("size:      {} bytes\n\n", message.len()));
    // The content goes out as stored, byte for byte, so that
    // `show ID | tail -n +12 > msg.eml` gives the message back.
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(head.as_bytes())
        .and_then(|()| stdout.write_all(&message))
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("writing to stdout: {e}")),
    }
}

fn release(store: &Quarantine, id: &QuarantineId, upstream: SocketAddr, helo: &str) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    match rt.block_on(store.release(id, upstream, helo)) {
        Ok(receipt) => {
            println!("{}", receipt_line(&receipt));
            ExitCode::SUCCESS
        }
        Err(e @ ReleaseError::AcceptedNotRemoved { .. }) => fail(&e.to_string()),
        Err(ReleaseError::Store(e @ QuarantineError::NotFound(_))) => fail(&e.to_string()),
        Err(e) => fail(&format!("{e}; {id} stays in the quarantine")),
    }
}

/// The MTA's reply carries its queue id: the operator's handle on the
/// message in the MTA's log.
fn receipt_line(r: &ReleaseReceipt) -> String {
    format!(
        "released {} to {} ({} bytes, {} recipient{}): {}",
        r.id,
        r.upstream,
        r.size,
        r.recipients.len(),
        if r.recipients.len() == 1 { "" } else { "s" },
        r.reply
    )
}

fn print_json<T: Serialize>(value: &T) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("cannot render JSON: {e}")),
    }
}

/// Standard base64 with padding (RFC 4648 §4); a few lines rather than a
/// dependency for the one place that needs it.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Top,
    }

    #[derive(Subcommand)]
    enum Top {
        Quarantine(QuarantineArgs),
    }

    #[test]
    fn ids_that_could_be_paths_are_refused_on_the_command_line() {
        for bad in [
            "../../etc/passwd",
            "/etc/passwd",
            "..",
            "x",
            "20260501T101502.123456Z-9f86d081884c7d65/..",
        ] {
            for verb in ["show", "release", "delete"] {
                let e = Cli::try_parse_from(["mxguard", "quarantine", verb, bad])
                    .err()
                    .unwrap_or_else(|| panic!("{verb} {bad} was accepted"));
                assert_eq!(e.exit_code(), 2);
                assert!(e.to_string().contains("not a quarantine id"), "{e}");
            }
        }
        assert!(Cli::try_parse_from([
            "mxguard",
            "quarantine",
            "show",
            "20260501T101502.123456Z-9f86d081884c7d65",
            "--config",
            "/etc/mxguard.toml"
        ])
        .is_ok());
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn a_many_recipient_message_keeps_to_one_table_line() {
        let summary = QuarantineSummary {
            id: "20260501T101502.123456Z-9f86d081884c7d65".parse().unwrap(),
            received: "2026-05-01T10:15:02.123456Z".into(),
            client: "192.0.2.7:40123".parse().unwrap(),
            mail_from: "evil\x1b[2J@example.test".into(),
            rcpt_to: vec![
                "a@example.test".into(),
                "b@example.test".into(),
                "c@example.test".into(),
            ],
            size: 1234,
            tests: vec!["pregreet".into()],
        };
        let t = table(&[summary]);
        assert_eq!(t.lines().count(), 2, "{t}");
        assert!(t.contains("<a@example.test> +2"), "{t}");
        assert!(t.contains("evil\\x1b[2J@example.test"), "{t}");
        assert!(!t.contains('\x1b'));
    }
}
