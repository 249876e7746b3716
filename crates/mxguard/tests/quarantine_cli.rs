//! `mxguard quarantine` as an operator uses it: the real binary, a real
//! configuration file, messages on disk in the documented format (written
//! here by hand, so the format in docs/quarantine.md is checked too), and
//! Postfix's smtp-sink as the MTA a release delivers to.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

#[path = "support/smtp_sink.rs"]
mod smtp_sink;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use smtp_sink::SmtpSink;

struct Workdir(PathBuf);

impl Workdir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("mxguard-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mxguard(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mxguard"))
        .arg("quarantine")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A message file exactly as docs/quarantine.md describes it: one JSON
/// line, then the message.
fn put_message(dir: &Path, id: &str, rcpts: &[&str], message: &[u8]) {
    let received = format!(
        "{}-{}-{}T{}:{}:{}.{}Z",
        &id[0..4],
        &id[4..6],
        &id[6..8],
        &id[9..11],
        &id[11..13],
        &id[13..15],
        &id[16..22]
    );
    let header = serde_json::json!({
        "format": "mxguard-quarantine/1",
        "id": id,
        "received": received,
        "client": "192.0.2.7:40123",
        "helo": "bot.example",
        "mail_from": "sender@example.test",
        "rcpt_to": rcpts,
        "tests": ["pipelining"],
        "action": "quarantine",
        "guard": "guard.example.test",
    });
    let mut file = serde_json::to_vec(&header).unwrap();
    file.push(b'\n');
    file.extend_from_slice(message);
    std::fs::create_dir_all(dir.join("new")).unwrap();
    std::fs::write(dir.join("new").join(id), file).unwrap();
}

const FIRST: &str = "20260501T101502.123456Z-9f86d081884c7d65";
const SECOND: &str = "20260501T101733.000001Z-0123456789abcdef";
const MESSAGE: &[u8] = b"From: <sender@example.test>\r\nSubject: dots\r\n\r\n.\r\n..two\r\nend\r\n";

#[test]
fn an_operator_lists_shows_releases_and_deletes() {
    let work = Workdir::new("quarantine-cli");
    let sink = SmtpSink::start(&work.0.join("sink"));
    let qdir = work.0.join("q");
    let config = work.0.join("mxguard.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"guard.example.test\"\n\
             [intercept]\nupstream = \"{}\"\n\
             [quarantine]\ndir = \"{}\"\n",
            sink.addr,
            qdir.display()
        ),
    )
    .unwrap();
    put_message(
        &qdir,
        SECOND,
        &["y@example.test"],
        b"Subject: second\r\n\r\nhi\r\n",
    );
    put_message(&qdir, FIRST, &["x@example.test", "z@example.test"], MESSAGE);

    // list: oldest first, one line each.
    let out = mxguard(&config, &["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("ID "), "{text}");
    assert!(lines[1].starts_with(FIRST), "{text}");
    assert!(lines[1].contains("<x@example.test> +1"), "{text}");
    assert!(lines[2].starts_with(SECOND), "{text}");

    let out = mxguard(&config, &["list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["id"], FIRST);
    assert_eq!(listed[0]["size"], MESSAGE.len());
    assert_eq!(listed[0]["rcpt_to"][1], "z@example.test");
    assert_eq!(listed[1]["id"], SECOND);

    // show: the metadata, then the message byte for byte.
    let out = mxguard(&config, &["show", FIRST]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.ends_with(MESSAGE));
    assert!(stdout(&out).contains("rcpt to:   <x@example.test>, <z@example.test>\n"));
    let out = mxguard(&config, &["show", FIRST, "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["meta"]["helo"], "bot.example");
    assert_eq!(shown["message"].as_str().unwrap().as_bytes(), MESSAGE);

    // Ids are checked before anything is opened.
    let out = mxguard(&config, &["show", "../../../etc/passwd"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = mxguard(
        &config,
        &["show", "20260501T101502.123456Z-aaaaaaaaaaaaaaaa"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no quarantined message"),
        "{}",
        stderr(&out)
    );

    // release to the configured upstream: the MTA gets the stored message.
    let out = mxguard(&config, &["release", FIRST]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with(&format!("released {FIRST} to {}", sink.addr)));
    let got = sink.wait_for(1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts, ["<x@example.test>", "<z@example.test>"]);
    let expected = String::from_utf8_lossy(MESSAGE).replace("\r\n", "\n");
    assert_eq!(String::from_utf8_lossy(&got[0].content), expected);
    let out = mxguard(&config, &["release", FIRST]);
    assert_eq!(out.status.code(), Some(1));

    // An MTA that is not there: exit 1, the message stays.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = mxguard(
        &config,
        &["release", SECOND, "--upstream", &closed.to_string()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("stays in the quarantine"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&mxguard(&config, &["list"])).contains(SECOND));

    // delete.
    let out = mxguard(&config, &["delete", SECOND]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("deleted {SECOND}\n"));
    assert!(stdout(&mxguard(&config, &["list"])).starts_with("no messages in "));
    assert_eq!(mxguard(&config, &["delete", SECOND]).status.code(), Some(1));
}

#[test]
fn a_bad_configuration_is_exit_code_2() {
    let work = Workdir::new("quarantine-cli-config");
    let config = work.0.join("mxguard.toml");
    std::fs::write(&config, "[quarantine]\ndirectory = \"/tmp/q\"\n").unwrap();
    let out = mxguard(&config, &["list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("directory"), "{}", stderr(&out));
}
