//! `mxbench sink --listen A`: an SMTP server that accepts every message and
//! keeps none. DATA is read in 256 KiB reads and searched for the end of
//! data with memchr's SIMD `memmem`, so the sink, like the sender, is not
//! what limits a throughput figure. A thread per connection.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};

use memchr::memmem;

use crate::args::Args;

const READ: usize = 256 * 1024;

pub fn main(args: &Args) -> Result<(), String> {
    let listen = args.addr("listen")?;
    let listener = TcpListener::bind(listen).map_err(|e| format!("{listen}: {e}"))?;
    println!(
        "{{\"listening\":\"{}\"}}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    io::stdout().flush().map_err(|e| e.to_string())?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            let _ = serve(stream);
        });
    }
    Ok(())
}

fn serve(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.write_all(b"220 sink.example ESMTP\r\n")?;
    let mut buf = vec![0u8; READ];
    // Bytes read and not yet handled.
    let mut pending: Vec<u8> = Vec::with_capacity(4096);
    let end = memmem::Finder::new(b"\r\n.\r\n");
    loop {
        // Command mode: one line.
        let line = loop {
            if let Some(pos) = memchr::memchr(b'\n', &pending) {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                break line;
            }
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&buf[..n]);
        };
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        match verb.as_slice() {
            b"EHLO" => {
                stream.write_all(b"250-sink.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n")?
            }
            b"HELO" | b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => {
                stream.write_all(b"250 2.0.0 Ok\r\n")?
            }
            b"QUIT" => {
                stream.write_all(b"221 2.0.0 Bye\r\n")?;
                return Ok(());
            }
            b"DATA" => {
                stream.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
                // The body: the end is "\r\n.\r\n", or ".\r\n" at its very
                // start; a CRLF is put in front so both look the same.
                let mut window: Vec<u8> = b"\r\n".to_vec();
                window.extend_from_slice(&pending);
                pending.clear();
                loop {
                    if let Some(pos) = end.find(&window) {
                        pending.extend_from_slice(&window[pos + 5..]);
                        break;
                    }
                    // Keep the last 4 bytes: the end may straddle reads.
                    let keep = window.len().min(4);
                    window.drain(..window.len() - keep);
                    let n = stream.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    window.extend_from_slice(&buf[..n]);
                }
                stream.write_all(b"250 2.0.0 Ok: queued\r\n")?;
            }
            _ => stream.write_all(b"502 5.5.2 Error: command not recognized\r\n")?,
        }
    }
}
