//! A minimal blocking SMTP client side: connect from a chosen source
//! address, read replies (multi-line included), send commands.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};

use socket2::{Domain, Protocol, Socket, Type};

/// Connects to `target`, from `source` when given (any 127.0.0.0/8
/// address is a distinct client on loopback, with its own port range).
pub fn connect(target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if let Some(ip) = source {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    socket.connect(&target.into())?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket.into())
}

/// One client connection with its read buffer.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(1024),
        }
    }

    /// Reads one complete reply (all its lines); returns its code.
    pub fn reply(&mut self) -> io::Result<u16> {
        loop {
            let mut start = 0;
            while let Some(pos) = memchr::memchr(b'\n', &self.buf[start..]) {
                let line = &self.buf[start..start + pos + 1];
                start += pos + 1;
                if line.len() >= 4 && line[3] != b'-' {
                    let code = std::str::from_utf8(&line[..3])
                        .ok()
                        .and_then(|c| c.parse().ok())
                        .ok_or_else(|| io::Error::other("not a reply"))?;
                    self.buf.drain(..start);
                    return Ok(code);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends `line` and expects a reply with `code`.
    pub fn command(&mut self, line: &[u8], code: u16) -> io::Result<()> {
        self.stream.write_all(line)?;
        self.expect(code)
    }

    pub fn expect(&mut self, code: u16) -> io::Result<()> {
        let got = self.reply()?;
        if got != code {
            return Err(io::Error::other(format!("expected {code}, got {got}")));
        }
        Ok(())
    }

    /// Greeting, EHLO, MAIL, RCPT, DATA up to the 354.
    pub fn open_transaction(&mut self) -> io::Result<()> {
        self.expect(220)?;
        self.command(b"EHLO bench.example\r\n", 250)?;
        self.command(b"MAIL FROM:<bench@example.org>\r\n", 250)?;
        self.command(b"RCPT TO:<sink@example.net>\r\n", 250)?;
        self.command(b"DATA\r\n", 354)
    }
}

/// A message body of about `size` bytes: 76-character lines (none starts
/// with a dot), CRLF, then the end-of-data line.
pub fn message(size: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(size + 128);
    body.extend_from_slice(
        b"From: bench@example.org\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n",
    );
    let line: Vec<u8> = (0..76u8).map(|i| b'a' + (i % 26)).collect();
    while body.len() + 78 <= size {
        body.extend_from_slice(&line);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b".\r\n");
    body
}

/// `p`-th percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Comma-separated source addresses, or none.
pub fn sources(list: Option<&str>) -> Result<Vec<IpAddr>, String> {
    match list {
        None => Ok(Vec::new()),
        Some(s) => s
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().map_err(|_| format!("bad source address {p}")))
            .collect(),
    }
}
