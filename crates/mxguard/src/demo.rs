//! `mxguard demo`: the guard at work on loopback, nothing else installed.
//!
//! Starts a small MTA stand-in (it speaks enough SMTP to take a message and
//! counts what it took), runs the real guard (`mxguard run`, this same
//! binary, as a child process with the built-in defaults plus the demo's
//! addresses), then a polite client and an early talker, and shows what
//! each saw, what the MTA received and what the guard logged and counted.

use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};

use crate::config::Dur;

pub fn main(greet_delay: Dur) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(demo(greet_delay)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            println!("\nDEMO FAILED: the guard did not behave as shown above.");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(greet_delay: Dur) -> anyhow::Result<bool> {
    let mta = TcpListener::bind("127.0.0.1:0").await?;
    let mta_addr = mta.local_addr()?;
    let delivered = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn(stand_in_mta(mta, delivered.clone(), connections.clone()));

    // A state of its own: a blocklist persisted by an earlier run (or by a
    // guard installed on this host) must not change what the demo shows.
    let scratch = std::env::temp_dir().join(format!("mxguard-demo-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let config = scratch.join("demo.toml");
    std::fs::write(
        &config,
        format!(
            "[state]\ndir = {:?}\n\n[quarantine]\ndir = {:?}\n",
            scratch.join("state").display().to_string(),
            scratch.join("quarantine").display().to_string(),
        ),
    )?;
    let result = run_demo(greet_delay, mta_addr, &config, delivered, connections).await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

async fn run_demo(
    greet_delay: Dur,
    mta_addr: SocketAddr,
    config: &std::path::Path,
    delivered: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
) -> anyhow::Result<bool> {
    let guard_addr = free_port().await?;
    let admin_addr = free_port().await?;
    println!("== mxguard demo ==");
    println!("MTA stand-in on {mta_addr}; guard on {guard_addr} (greet delay {greet_delay}); admin on {admin_addr}\n");

    let exe = std::env::current_exe()?;
    let mut guard = tokio::process::Command::new(exe)
        .args(["run", "--config"])
        .arg(config)
        .args(["--mode", "fixed"])
        .args(["--listen", &guard_addr.to_string()])
        .args(["--upstream", &mta_addr.to_string()])
        .args(["--greet-delay", &greet_delay.to_string()])
        .args(["--admin-listen", &admin_addr.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(stderr) = guard.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                println!("    [guard log] {line}");
            }
        });
    }
    wait_listening(guard_addr).await?;

    println!("1. A polite client waits for the whole greeting, then sends a message:");
    let polite = polite_client("127.0.0.1", guard_addr).await?;
    let delivered_ok = delivered.load(Ordering::SeqCst) == 1;
    println!(
        "   -> MTA received {} message(s){}\n",
        delivered.load(Ordering::SeqCst),
        if delivered_ok {
            ": clean delivery passed"
        } else {
            ""
        }
    );

    let before = connections.load(Ordering::SeqCst);
    println!("2. An early talker (127.0.0.2) sends EHLO the moment it connects:");
    let early = raw_client("127.0.0.2", guard_addr, b"EHLO bot.example\r\n").await?;
    println!("3. It comes back at once:");
    let again = raw_client("127.0.0.2", guard_addr, b"").await?;
    let mta_untouched = connections.load(Ordering::SeqCst) == before;
    println!(
        "   -> the MTA saw {} connection(s) from the early talker\n",
        connections.load(Ordering::SeqCst) - before
    );

    let metrics = http_get(admin_addr, "/metrics").await.unwrap_or_default();
    println!("4. What the guard counted (GET /metrics):");
    for line in metrics.lines().filter(|l| {
        (l.starts_with("mxguard_connections_total") || l.starts_with("mxguard_detections_total"))
            && !l.ends_with(" 0")
    }) {
        println!("   {line}");
    }

    if let Some(pid) = guard.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = timeout(Duration::from_secs(5), guard.wait()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let ok = polite
        && delivered_ok
        && early.starts_with("220-")
        && early.contains("554 5.7.1")
        && again.starts_with("554 5.7.1")
        && mta_untouched;
    println!(
        "\n{}",
        if ok {
            "DEMO OK: clean mail delivered, the early talker caught and then refused at once."
        } else {
            "unexpected results above"
        }
    );
    Ok(ok)
}

/// A port that was free a moment ago.
async fn free_port() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?)
}

async fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    // A probe connection would be a session of its own (and a hang-up):
    // instead wait for the port to stop being bindable.
    while Instant::now() < deadline {
        if std::net::TcpListener::bind(addr).is_err() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the guard did not start listening on {addr}")
}

async fn connect_from(source: &str, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse()?, 0))?;
    Ok(socket.connect(to).await?)
}

/// Reads one whole reply, printing each line with the time since `t0`.
async fn read_reply(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    t0: Instant,
) -> anyhow::Result<String> {
    loop {
        let mut line = String::new();
        if timeout(Duration::from_secs(30), reader.read_line(&mut line)).await?? == 0 {
            anyhow::bail!("connection closed");
        }
        println!(
            "   {:>5.2}s S: {}",
            t0.elapsed().as_secs_f64(),
            line.trim_end()
        );
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(line);
        }
    }
}

async fn polite_client(source: &str, guard: SocketAddr) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let (read, mut write) = connect_from(source, guard).await?.into_split();
    let mut reader = BufReader::new(read);
    let mut ok = read_reply(&mut reader, t0).await?.starts_with("220");
    let steps: [(&str, &str); 6] = [
        ("EHLO client.example\r\n", "250"),
        ("MAIL FROM:<alice@client.example>\r\n", "250"),
        ("RCPT TO:<bob@mta.example>\r\n", "250"),
        ("DATA\r\n", "354"),
        (
            "Subject: hello\r\n\r\nA message that waited its turn.\r\n.\r\n",
            "250",
        ),
        ("QUIT\r\n", "221"),
    ];
    for (command, expect) in steps {
        for line in command.trim_end().split("\r\n") {
            println!("   {:>5.2}s C: {line}", t0.elapsed().as_secs_f64());
        }
        write.write_all(command.as_bytes()).await?;
        ok &= read_reply(&mut reader, t0).await?.starts_with(expect);
    }
    Ok(ok)
}

/// Connects, sends `early` at once, prints everything it gets back.
async fn raw_client(source: &str, guard: SocketAddr, early: &[u8]) -> anyhow::Result<String> {
    let t0 = Instant::now();
    let mut stream = connect_from(source, guard).await?;
    if !early.is_empty() {
        println!(
            "   {:>5.2}s C: {}",
            t0.elapsed().as_secs_f64(),
            String::from_utf8_lossy(early).trim_end()
        );
        stream.write_all(early).await?;
    }
    let mut got = Vec::new();
    let _ = timeout(Duration::from_secs(15), stream.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    for line in text.lines() {
        println!("   {:>5.2}s S: {line}", t0.elapsed().as_secs_f64());
    }
    println!("   {:>5.2}s (closed)", t0.elapsed().as_secs_f64());
    Ok(text)
}

async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await??;
    Ok(body)
}

/// The MTA stand-in: greets, takes envelopes and messages, counts them.
async fn stand_in_mta(
    listener: TcpListener,
    delivered: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        connections.fetch_add(1, Ordering::SeqCst);
        let delivered = delivered.clone();
        tokio::spawn(async move {
            let _ = mta_session(stream, &delivered).await;
        });
    }
}

async fn mta_session(stream: TcpStream, delivered: &AtomicUsize) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    write
        .write_all(b"220 mta.example ESMTP stand-in\r\n")
        .await?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let verb = line
            .get(..4)
            .unwrap_or(line.trim_end())
            .to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-mta.example\r\n250 PIPELINING\r\n",
            "HELO" => b"250 mta.example\r\n",
            "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 2.0.0 Ok\r\n",
            "DATA" => {
                write
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                loop {
                    line.clear();
                    if reader.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" || line == ".\n" {
                        break;
                    }
                }
                delivered.fetch_add(1, Ordering::SeqCst);
                b"250 2.0.0 Ok: queued\r\n"
            }
            "QUIT" => {
                write.write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 5.5.2 Command not recognized\r\n",
        };
        write.write_all(reply).await?;
    }
}
