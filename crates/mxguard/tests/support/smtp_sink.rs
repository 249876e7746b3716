//! Postfix's `smtp-sink` as a real MTA for tests, written once: the
//! quarantine's unit tests include this file with `#[path]` and the CLI
//! tests with `mod`. It accepts everything and dumps each transaction to a
//! file of its own, which is what a test reads back.

// Each includer uses its own subset.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SMTP_SINK: &str = "/usr/sbin/smtp-sink";

/// One transaction as smtp-sink dumped it.
#[derive(Debug)]
pub struct SinkMessage {
    pub helo: Option<String>,
    /// The MAIL FROM arguments: `<addr> PARAM=...`.
    pub mail: String,
    /// The RCPT TO arguments, in order: `<addr>`.
    pub rcpts: Vec<String>,
    /// The message after dot-unstuffing; smtp-sink writes LF line ends.
    pub content: Vec<u8>,
}

pub struct SmtpSink {
    pub addr: SocketAddr,
    dump: PathBuf,
    child: Child,
}

impl SmtpSink {
    /// Starts smtp-sink on a free loopback port, dumping into
    /// `workdir/dump`. Fails loudly when Postfix is not installed: a
    /// release test that quietly skips would prove nothing.
    pub fn start(workdir: &Path) -> Self {
        assert!(
            Path::new(SMTP_SINK).exists(),
            "{SMTP_SINK} is missing: install Postfix to run the release tests"
        );
        let dump = workdir.join("dump");
        std::fs::create_dir_all(&dump).unwrap();
        let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        if root {
            // smtp-sink drops to `-u postfix` before it writes a dump.
            let status = Command::new("chown")
                .arg("postfix")
                .arg(&dump)
                .status()
                .unwrap();
            assert!(status.success(), "chown postfix {}", dump.display());
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(SMTP_SINK);
        if root {
            cmd.args(["-u", "postfix"]);
        }
        // `%M.`: smtp-sink appends a unique id, one file per transaction.
        cmd.arg("-d")
            .arg(format!("{}/%M.", dump.display()))
            .arg(addr.to_string())
            .arg("10")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        for _ in 0..100 {
            if TcpStream::connect(addr).is_ok() {
                return Self { addr, dump, child };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("smtp-sink exited at start: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        panic!("smtp-sink is not listening on {addr}");
    }

    /// The transactions dumped so far, oldest first.
    pub fn messages(&self) -> Vec<SinkMessage> {
        let mut paths: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&self.dump)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.metadata().unwrap().modified().unwrap(), e.path())
            })
            .collect();
        paths.sort();
        paths.iter().map(|(_, p)| parse_dump(p)).collect()
    }

    /// Waits up to two seconds for `n` transactions, then returns what
    /// there is.
    pub fn wait_for(&self, n: usize) -> Vec<SinkMessage> {
        for _ in 0..100 {
            let got = self.messages();
            if got.len() >= n {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.messages()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The dump: `X-Name: value` lines, a `Received:` header smtp-sink adds
/// (with tab-indented continuations), the message, and one empty line.
fn parse_dump(path: &Path) -> SinkMessage {
    let raw = std::fs::read(path).unwrap();
    let mut rest: &[u8] = &raw;
    let next_line = |rest: &mut &[u8]| -> Vec<u8> {
        let end = rest.iter().position(|&b| b == b'\n').expect("a line");
        let line = rest[..end].to_vec();
        *rest = &rest[end + 1..];
        line
    };
    let (mut helo, mut mail, mut rcpts) = (None, String::new(), Vec::new());
    loop {
        if !rest.starts_with(b"X-") {
            break;
        }
        let line = String::from_utf8(next_line(&mut rest)).unwrap();
        let (key, value) = line.split_once(": ").unwrap_or((&line, ""));
        match key {
            "X-Helo-Args" => helo = Some(value.to_string()),
            "X-Mail-Args" => mail = value.to_string(),
            "X-Rcpt-Args" => rcpts.push(value.to_string()),
            _ => {}
        }
    }
    assert!(
        rest.starts_with(b"Received: "),
        "unexpected dump format in {}",
        path.display()
    );
    next_line(&mut rest);
    while rest.starts_with(b"\t") {
        next_line(&mut rest);
    }
    let content = rest
        .strip_suffix(b"\n")
        .unwrap_or_else(|| panic!("unexpected dump tail in {}", path.display()))
        .to_vec();
    SinkMessage {
        helo,
        mail,
        rcpts,
        content,
    }
}
