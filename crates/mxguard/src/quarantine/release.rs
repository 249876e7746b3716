//! Releasing a quarantined message: the exact stored bytes go to the MTA
//! over SMTP with the stored envelope, and the quarantine lets go of the
//! message only once the MTA took responsibility for it (`250` to the end
//! of data, RFC 5321 §4.1.1.4). Any other outcome keeps it.
//!
//! The client is written here, on tokio, rather than taken from `lettre`:
//! the exchange is five commands without pipelining, the reply reader
//! already exists (`mxguard_smtp::ReplyReader`), and owning it keeps what
//! matters for a firewall in our hands: the body goes out byte for byte
//! with our own dot-stuffing (no re-encoding, no added headers), envelope
//! addresses go out as they were accepted (`lettre::Address` would refuse
//! some of them), every refusal is reported with the stage and the MTA's
//! words, and no TLS or connection-pool stack comes along.
//!
//! Delivery is at least once: if the connection dies after the final dot
//! and before the reply, the MTA may have queued the message while we keep
//! it, and a second release delivers it again. Keeping it is the side of
//! the doubt that loses nothing.

use std::net::SocketAddr;
use std::time::Duration;

use mxguard_smtp::{escape_capped, Reply, ReplyReader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Quarantine, QuarantineError, QuarantineId, QuarantineMeta};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
// RFC 5321 §4.5.3.2's client timeouts: an MTA under load may legitimately
// be this slow, and giving up early only risks a duplicate.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const DATA_INIT_TIMEOUT: Duration = Duration::from_secs(2 * 60);
const DATA_BLOCK_TIMEOUT: Duration = Duration::from_secs(3 * 60);
const DATA_END_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// After the message is safe (or refused), QUIT is a courtesy.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_REPLY: usize = 64 * 1024;
const CHUNK: usize = 64 * 1024;

/// What a successful release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseReceipt {
    pub id: QuarantineId,
    pub upstream: SocketAddr,
    pub recipients: Vec<String>,
    /// Message bytes sent (before dot-stuffing).
    pub size: u64,
    /// The MTA's reply to the end of data, e.g. `250 2.0.0 Ok: queued as
    /// 4Xy`: the operator's handle on the message in the MTA's log.
    pub reply: String,
}

/// Why a release did not happen. In every case but
/// [`ReleaseError::AcceptedNotRemoved`] the message was not delivered and
/// is still in the quarantine.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Store(#[from] QuarantineError),
    #[error("the stored envelope cannot be sent: {0}")]
    BadEnvelope(String),
    #[error("cannot connect to {upstream}: {source}")]
    Connect {
        upstream: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The MTA answered with a code that is not the one to go on with.
    #[error("the MTA refused {stage}: {reply}")]
    Refused {
        stage: String,
        code: u16,
        reply: String,
    },
    /// Timeout, hang-up or garbage: the MTA did not take the message.
    #[error("the SMTP conversation failed at {stage}: {reason}")]
    Conversation { stage: String, reason: String },
    /// Delivered, but still in the quarantine: releasing it again would
    /// deliver it twice; delete it instead.
    #[error("the MTA accepted the message ({reply}) but it could not be removed from the quarantine: {source}; delete it, do not release it again")]
    AcceptedNotRemoved {
        reply: String,
        #[source]
        source: QuarantineError,
    },
}

impl Quarantine {
    /// Delivers message `id` to the MTA at `upstream`, greeting it as
    /// `helo_name`, and removes it from the quarantine once the MTA said
    /// `250` to the end of data. The message is locked meanwhile: a
    /// concurrent release or delete of it fails with
    /// [`QuarantineError::Busy`].
    pub async fn release(
        &self,
        id: &QuarantineId,
        upstream: SocketAddr,
        helo_name: &str,
    ) -> Result<ReleaseReceipt, ReleaseError> {
        let q = self.clone();
        let wanted = id.clone();
        let locked = self.blocking(move || q.lock_message(&wanted)).await?;
        check_envelope(&locked.meta, helo_name)?;
        // A second descriptor on the same open file: shares the position
        // (at the first message byte) and keeps `locked` holding the lock.
        let body = locked
            .file
            .try_clone()
            .map_err(|e| QuarantineError::io(&locked.path, e))?;
        let body = tokio::fs::File::from_std(body);

        let mut smtp = Smtp::connect(upstream).await?;
        let reply = match smtp
            .transaction(helo_name, &locked.meta, locked.size, body)
            .await
        {
            Ok(reply) => reply,
            Err(e) => {
                if matches!(e, ReleaseError::Refused { .. }) {
                    smtp.quit().await;
                }
                return Err(e);
            }
        };

        let receipt = ReleaseReceipt {
            id: id.clone(),
            upstream,
            recipients: locked.meta.rcpt_to.clone(),
            size: locked.size,
            reply,
        };
        let q = self.clone();
        if let Err(source) = self.blocking(move || q.remove_locked(locked)).await {
            return Err(ReleaseError::AcceptedNotRemoved {
                reply: receipt.reply,
                source,
            });
        }
        smtp.quit().await;
        Ok(receipt)
    }
}

/// The envelope comes from a file: a damaged or hand-edited one must not
/// be able to inject SMTP commands (a CR or LF in an address) or break the
/// `<...>` syntax.
fn check_envelope(meta: &QuarantineMeta, helo_name: &str) -> Result<(), ReleaseError> {
    let unsafe_byte = |s: &str| {
        s.bytes()
            .any(|b| b < 0x20 || b == 0x7f || b == b'<' || b == b'>')
    };
    if meta.rcpt_to.is_empty() {
        return Err(ReleaseError::BadEnvelope("no recipients".into()));
    }
    for addr in std::iter::once(&meta.mail_from).chain(&meta.rcpt_to) {
        if unsafe_byte(addr) || addr.len() > 512 {
            return Err(ReleaseError::BadEnvelope(format!(
                "address `{}`",
                escape_capped(addr.as_bytes(), 80)
            )));
        }
    }
    if meta.rcpt_to.iter().any(String::is_empty) {
        return Err(ReleaseError::BadEnvelope("an empty recipient".into()));
    }
    if helo_name.is_empty() || helo_name.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(ReleaseError::BadEnvelope(format!(
            "helo name `{}`",
            escape_capped(helo_name.as_bytes(), 80)
        )));
    }
    Ok(())
}

/// One SMTP connection to the MTA, one command at a time.
struct Smtp {
    stream: TcpStream,
    replies: ReplyReader,
    buf: Vec<u8>,
}

impl Smtp {
    async fn connect(upstream: SocketAddr) -> Result<Self, ReleaseError> {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(ReleaseError::Connect { upstream, source }),
            Err(_) => {
                return Err(ReleaseError::Connect {
                    upstream,
                    source: std::io::ErrorKind::TimedOut.into(),
                })
            }
        };
        Ok(Self {
            stream,
            replies: ReplyReader::new(MAX_REPLY),
            buf: vec![0; 4096],
        })
    }

    /// Greeting to the reply to the final dot; returns that reply's text.
    async fn transaction(
        &mut self,
        helo_name: &str,
        meta: &QuarantineMeta,
        size: u64,
        mut body: tokio::fs::File,
    ) -> Result<String, ReleaseError> {
        let greeting = self.reply("the greeting", GREETING_TIMEOUT).await?;
        expect(&greeting, "the connection (greeting)", |c| c == 220)?;

        let ehlo = self
            .command(format!("EHLO {helo_name}"), "EHLO", COMMAND_TIMEOUT)
            .await?;
        let extensions = if ehlo.code == 250 {
            ehlo_keywords(&ehlo.raw)
        } else if (500..600).contains(&ehlo.code) {
            // An MTA without ESMTP (RFC 5321 §3.2): fall back to HELO.
            let helo = self
                .command(format!("HELO {helo_name}"), "HELO", COMMAND_TIMEOUT)
                .await?;
            expect(&helo, "HELO", |c| c == 250)?;
            Vec::new()
        } else {
            return Err(refused("EHLO", &ehlo));
        };
        let has = |k: &str| extensions.iter().any(|e| e == k);

        let mut mail = format!("MAIL FROM:<{}>", meta.mail_from);
        // The stored message is sent as it is, 8-bit bytes included;
        // declaring it is always allowed (RFC 6152) and spares the MTA a
        // guess.
        if has("8BITMIME") {
            mail.push_str(" BODY=8BITMIME");
        }
        let ascii_envelope = meta.mail_from.is_ascii() && meta.rcpt_to.iter().all(|r| r.is_ascii());
        if !ascii_envelope && has("SMTPUTF8") {
            mail.push_str(" SMTPUTF8");
        }
        if has("SIZE") {
            mail.push_str(&format!(" SIZE={size}"));
        }
        let reply = self.command(mail, "MAIL FROM", COMMAND_TIMEOUT).await?;
        expect(&reply, "MAIL FROM", |c| c == 250)?;

        // All or nothing: the message was quarantined for exactly these
        // recipients, and a partial release could not be finished later
        // without rewriting the envelope.
        for rcpt in &meta.rcpt_to {
            let stage = format!("RCPT TO:<{rcpt}>");
            let reply = self.command(stage.clone(), &stage, COMMAND_TIMEOUT).await?;
            expect(&reply, &stage, |c| c == 250 || c == 251)?;
        }

        let reply = self
            .command("DATA".into(), "DATA", DATA_INIT_TIMEOUT)
            .await?;
        expect(&reply, "DATA", |c| c == 354)?;

        let mut stuffer = DotStuffer::default();
        let mut chunk = vec![0; CHUNK];
        let mut out = Vec::with_capacity(CHUNK + CHUNK / 8);
        loop {
            let n = body
                .read(&mut chunk)
                .await
                .map_err(|e| conversation("reading the stored message", e.to_string()))?;
            if n == 0 {
                break;
            }
            out.clear();
            stuffer.push(&chunk[..n], &mut out);
            self.send(&out, "the message data", DATA_BLOCK_TIMEOUT)
                .await?;
        }
        out.clear();
        stuffer.finish(&mut out);
        self.send(&out, "the message data", DATA_BLOCK_TIMEOUT)
            .await?;

        let reply = self.reply("end of data", DATA_END_TIMEOUT).await?;
        expect(&reply, "the message (end of data)", |c| c == 250)?;
        Ok(reply_text(&reply.raw))
    }

    async fn command(
        &mut self,
        mut line: String,
        stage: &str,
        limit: Duration,
    ) -> Result<Reply, ReleaseError> {
        line.push_str("\r\n");
        self.send(line.as_bytes(), stage, limit).await?;
        self.reply(stage, limit).await
    }

    async fn send(
        &mut self,
        bytes: &[u8],
        stage: &str,
        limit: Duration,
    ) -> Result<(), ReleaseError> {
        match tokio::time::timeout(limit, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(conversation(stage, format!("sending: {e}"))),
            Err(_) => Err(conversation(
                stage,
                format!("sending timed out after {limit:?}"),
            )),
        }
    }

    async fn reply(&mut self, stage: &str, limit: Duration) -> Result<Reply, ReleaseError> {
        let deadline = tokio::time::Instant::now() + limit;
        // A reply may already be buffered behind the previous one.
        let mut got = self.replies.push(&[]);
        loop {
            match got {
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => {}
                Err(e) => return Err(conversation(stage, e.to_string())),
            }
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut self.buf)).await {
                Ok(Ok(0)) => {
                    return Err(conversation(stage, "the MTA closed the connection".into()))
                }
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(conversation(stage, format!("reading: {e}"))),
                Err(_) => return Err(conversation(stage, format!("no reply within {limit:?}"))),
            };
            got = self.replies.push(&self.buf[..n]);
        }
    }

    /// Says goodbye; what the MTA answers no longer matters.
    async fn quit(&mut self) {
        let _ = self.command("QUIT".into(), "QUIT", QUIT_TIMEOUT).await;
        let _ = self.stream.shutdown().await;
    }
}

fn expect(reply: &Reply, stage: &str, ok: impl Fn(u16) -> bool) -> Result<(), ReleaseError> {
    if ok(reply.code) {
        Ok(())
    } else {
        Err(refused(stage, reply))
    }
}

fn refused(stage: &str, reply: &Reply) -> ReleaseError {
    ReleaseError::Refused {
        stage: stage.to_owned(),
        code: reply.code,
        reply: reply_text(&reply.raw),
    }
}

fn conversation(stage: &str, reason: String) -> ReleaseError {
    ReleaseError::Conversation {
        stage: stage.to_owned(),
        reason,
    }
}

/// The reply's lines on one line, printable: it ends up in a terminal and
/// in logs, and the MTA's text is not ours to trust.
fn reply_text(raw: &[u8]) -> String {
    raw.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .map(|l| escape_capped(l, 512))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The EHLO keywords (RFC 5321 §4.1.1.1), upper-cased: every line but the
/// first, up to its first space.
fn ehlo_keywords(raw: &[u8]) -> Vec<String> {
    raw.split(|&b| b == b'\n')
        .skip(1)
        .filter_map(|line| line.get(4..))
        .filter_map(|rest| {
            let word = rest.split(|&b| b == b' ' || b == b'\r').next()?;
            (!word.is_empty()).then(|| String::from_utf8_lossy(word).to_ascii_uppercase())
        })
        .collect()
}

/// Dot-stuffing for DATA (RFC 5321 §4.5.2), streaming: a line that starts
/// with `.` gets one more, and the data ends with `CRLF.CRLF`.
///
/// A "line start" is the first byte and any byte after an LF, bare or not.
/// Messages from the session have CRLF lines only; for anything else,
/// stuffing after every LF means no MTA, lenient or strict about bare LF,
/// can ever read an end of data inside the message (the `<LF>.<LF>`
/// smuggling family, CVE-2023-51764): the worst case is one extra dot on
/// a malformed line at an MTA that only counts CRLF.
#[derive(Debug)]
pub(super) struct DotStuffer {
    at_line_start: bool,
    /// The last two bytes seen, to know whether the message ended its
    /// last line.
    tail: [u8; 2],
    empty: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        Self {
            at_line_start: true,
            tail: [0; 2],
            empty: true,
        }
    }
}

impl DotStuffer {
    pub(super) fn push(&mut self, mut chunk: &[u8], out: &mut Vec<u8>) {
        match chunk {
            [] => return,
            [b] => self.tail = [self.tail[1], *b],
            [.., a, b] => self.tail = [*a, *b],
        }
        self.empty = false;
        while let Some(&first) = chunk.first() {
            if self.at_line_start && first == b'.' {
                out.push(b'.');
            }
            match memchr::memchr(b'\n', chunk) {
                Some(lf) => {
                    out.extend_from_slice(&chunk[..=lf]);
                    chunk = &chunk[lf + 1..];
                    self.at_line_start = true;
                }
                None => {
                    out.extend_from_slice(chunk);
                    self.at_line_start = false;
                    return;
                }
            }
        }
    }

    /// The end of data. A message whose last line lacks its CRLF gets one:
    /// the terminator must start a line of its own, or the MTA would take
    /// the dot as part of the text and wait for more.
    pub(super) fn finish(self, out: &mut Vec<u8>) {
        if !self.empty && self.tail != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
#[path = "../../tests/support/smtp_sink.rs"]
mod smtp_sink;

#[cfg(test)]
mod tests {
    use super::super::tests::{meta, store, TestDir};
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    fn stuffed(message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = DotStuffer::default();
        s.push(message, &mut out);
        s.finish(&mut out);
        out
    }

    #[test]
    fn dots_at_line_starts_are_doubled_and_the_end_is_marked() {
        assert_eq!(stuffed(b""), b".\r\n");
        assert_eq!(stuffed(b"a\r\n"), b"a\r\n.\r\n");
        assert_eq!(stuffed(b".\r\n"), b"..\r\n.\r\n");
        assert_eq!(
            stuffed(b".top\r\nmid.dle\r\n..two\r\n.\r\nend"),
            b"..top\r\nmid.dle\r\n...two\r\n..\r\nend\r\n.\r\n"
        );
        // Smuggling look-alikes can never become an end of data.
        assert_eq!(stuffed(b"x\n.\ny\r\n"), b"x\n..\ny\r\n.\r\n");
        assert_eq!(stuffed(b"x\r\n.\ry\r\n"), b"x\r\n..\ry\r\n.\r\n");
        // A bare CR at the very end still needs the CRLF.
        assert_eq!(stuffed(b"x\r"), b"x\r\r\n.\r\n");
    }

    #[test]
    fn stuffing_does_not_depend_on_how_the_message_is_cut() {
        let message = b".a\r\n.\r\n\r\n..b\r\nc.\r\n.";
        let whole = stuffed(message);
        for cut in 0..=message.len() {
            for cut2 in cut..=message.len() {
                let mut out = Vec::new();
                let mut s = DotStuffer::default();
                s.push(&message[..cut], &mut out);
                s.push(&message[cut..cut2], &mut out);
                s.push(&message[cut2..], &mut out);
                s.finish(&mut out);
                assert_eq!(out, whole, "cut at {cut}, {cut2}");
            }
        }
    }

    #[test]
    fn ehlo_keywords_are_read_from_the_reply() {
        let raw = b"250-mx.test greets you\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8bitmime\r\n250 SMTPUTF8\r\n";
        assert_eq!(
            ehlo_keywords(raw),
            ["PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8"]
        );
    }

    #[test]
    fn a_damaged_envelope_is_not_sent() {
        let mut m = meta(&["x@example.test"]);
        m.rcpt_to
            .push("y@example.test>\r\nRCPT TO:<evil@example.test".into());
        assert!(matches!(
            check_envelope(&m, "guard.test"),
            Err(ReleaseError::BadEnvelope(_))
        ));
        let m = meta(&[]);
        assert!(matches!(
            check_envelope(&m, "guard.test"),
            Err(ReleaseError::BadEnvelope(_))
        ));
        let m = meta(&["x@example.test"]);
        assert!(check_envelope(&m, "guard.test").is_ok());
        assert!(check_envelope(&m, "guard test").is_err());
    }

    /// A message that exercises what a release can get wrong: lines that
    /// start with dots (one alone on a line, which unstuffed would end the
    /// data), 8-bit bytes, and enough size that the dots fall on chunk
    /// boundaries of the reader.
    fn tricky_message() -> Vec<u8> {
        let mut m = b"From: <sender@example.test>\r\nTo: <x@example.test>\r\nSubject: dots\r\n\r\n"
            .to_vec();
        m.extend_from_slice(b".\r\n..\r\n.leading dot\r\ncaf\xc3\xa9 \xe9\r\n");
        let mut i = 0;
        while m.len() < 3 * CHUNK {
            m.extend_from_slice(
                format!(".{i} a line that starts with a dot\r\nline {i}\r\n").as_bytes(),
            );
            i += 1;
        }
        m.extend_from_slice(b"the end\r\n");
        m
    }

    #[tokio::test]
    async fn a_release_delivers_the_exact_message_to_a_real_mta() {
        let dir = TestDir::new("release");
        let q = Quarantine::open_at(&dir.0.join("q"), 1 << 24).unwrap();
        let sink = smtp_sink::SmtpSink::start(&dir.0.join("sink"));
        let message = tricky_message();
        let m = meta(&["x@example.test", "y@example.test"]);
        let id = store(&q, m.clone(), &message);
        let other = store(
            &q,
            meta(&["z@example.test"]),
            b"Subject: stays\r\n\r\nhi\r\n",
        );

        let receipt = q
            .release(&id, sink.addr, "guard.example.test")
            .await
            .unwrap();
        assert_eq!(receipt.id, id);
        assert_eq!(receipt.size, message.len() as u64);
        assert_eq!(receipt.recipients, m.rcpt_to);
        assert!(receipt.reply.starts_with("250 "), "{}", receipt.reply);

        let got = sink.wait_for(1);
        assert_eq!(got.len(), 1);
        let got = &got[0];
        assert_eq!(got.helo.as_deref(), Some("guard.example.test"));
        // smtp-sink advertises 8BITMIME, not SIZE.
        assert_eq!(got.mail, "<sender@example.test> BODY=8BITMIME");
        assert_eq!(got.rcpts, ["<x@example.test>", "<y@example.test>"]);
        // smtp-sink writes lines with LF ends; the stored message has CRLF
        // lines only, so comparing with CRLF turned to LF is comparing the
        // exact bytes.
        let expected = String::from_utf8_lossy(&message).replace("\r\n", "\n");
        let got_text = String::from_utf8_lossy(&got.content);
        assert!(got_text == expected, "the MTA got a different message");
        assert_eq!(
            got.content.len(),
            message.len() - message.iter().filter(|&&b| b == b'\r').count()
        );

        // Released means gone from the quarantine; the other one stays.
        assert!(matches!(q.show(&id), Err(QuarantineError::NotFound(_))));
        let left: Vec<QuarantineId> = q
            .list()
            .unwrap()
            .messages
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(left, vec![other]);
        // And a second release of the same id finds nothing to send.
        assert!(matches!(
            q.release(&id, sink.addr, "guard.example.test").await,
            Err(ReleaseError::Store(QuarantineError::NotFound(_)))
        ));
        assert_eq!(sink.wait_for(1).len(), 1);
    }

    /// Where a scripted MTA says no.
    #[derive(Clone, Copy, PartialEq)]
    enum RefuseAt {
        Rcpt,
        EndOfData,
        Nothing,
    }

    /// A few lines standing in for an MTA that refuses: no real MTA can be
    /// told to refuse one given recipient or a message on cue. Returns its
    /// address and the commands it received.
    async fn refusing_mta(at: RefuseAt) -> (SocketAddr, Arc<parking_lot::Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"220 refuse.test ESMTP\r\n").await.unwrap();
            let mut in_data = false;
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).await.unwrap() == 0 {
                    return;
                }
                if in_data {
                    if line == ".\r\n" {
                        in_data = false;
                        log.lock().push("<end of data>".into());
                        let reply: &[u8] = if at == RefuseAt::EndOfData {
                            b"554 5.7.1 message refused\r\n"
                        } else {
                            b"250 2.0.0 queued\r\n"
                        };
                        w.write_all(reply).await.unwrap();
                    }
                    continue;
                }
                log.lock().push(line.trim_end().to_string());
                let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                let reply: &[u8] = match verb.as_str() {
                    "EHLO" => b"250-refuse.test\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n",
                    "RCPT" if at == RefuseAt::Rcpt && line.contains("y@") => {
                        b"554 5.7.1 <y@example.test>: Recipient address rejected\r\n"
                    }
                    "DATA" => {
                        in_data = true;
                        b"354 go ahead\r\n"
                    }
                    "QUIT" => {
                        w.write_all(b"221 bye\r\n").await.unwrap();
                        return;
                    }
                    _ => b"250 ok\r\n",
                };
                w.write_all(reply).await.unwrap();
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_refused_recipient_keeps_the_message() {
        let dir = TestDir::new("release");
        let q = Quarantine::open_at(&dir.0, 1 << 20).unwrap();
        let message = b"Subject: keep me\r\n\r\nbody\r\n";
        let id = store(&q, meta(&["x@example.test", "y@example.test"]), message);
        let (mta, seen) = refusing_mta(RefuseAt::Rcpt).await;

        let err = q.release(&id, mta, "guard.example.test").await.unwrap_err();
        match &err {
            ReleaseError::Refused { stage, code, reply } => {
                assert_eq!(stage, "RCPT TO:<y@example.test>");
                assert_eq!(*code, 554);
                assert!(reply.contains("Recipient address rejected"), "{reply}");
            }
            other => panic!("expected a refusal, got {other}"),
        }
        assert_eq!(q.show(&id).unwrap().1, message);
        assert_eq!(
            *seen.lock(),
            [
                "EHLO guard.example.test",
                &format!(
                    "MAIL FROM:<sender@example.test> BODY=8BITMIME SIZE={}",
                    message.len()
                ),
                "RCPT TO:<x@example.test>",
                "RCPT TO:<y@example.test>",
                "QUIT",
            ]
        );
    }

    #[tokio::test]
    async fn a_refused_message_at_the_end_of_data_is_kept() {
        let dir = TestDir::new("release");
        let q = Quarantine::open_at(&dir.0, 1 << 20).unwrap();
        let message = b"Subject: keep me too\r\n\r\nbody\r\n";
        let id = store(&q, meta(&["x@example.test"]), message);
        let (mta, seen) = refusing_mta(RefuseAt::EndOfData).await;

        let err = q.release(&id, mta, "guard.example.test").await.unwrap_err();
        assert!(
            matches!(&err, ReleaseError::Refused { code: 554, stage, .. } if stage.contains("end of data")),
            "{err}"
        );
        assert_eq!(q.show(&id).unwrap().1, message);
        assert!(seen.lock().contains(&"<end of data>".to_string()));
    }

    #[tokio::test]
    async fn an_unreachable_mta_keeps_the_message() {
        let dir = TestDir::new("release");
        let q = Quarantine::open_at(&dir.0, 1 << 20).unwrap();
        let id = store(&q, meta(&["x@example.test"]), b"x\r\n");
        // A port nobody listens on: bind, learn it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = q
            .release(&id, port, "guard.example.test")
            .await
            .unwrap_err();
        assert!(matches!(err, ReleaseError::Connect { .. }), "{err}");
        assert!(q.show(&id).is_ok());
    }

    #[tokio::test]
    async fn an_accepting_mta_gets_the_null_sender_and_the_message_goes() {
        let dir = TestDir::new("release");
        let q = Quarantine::open_at(&dir.0, 1 << 20).unwrap();
        let mut m = meta(&["x@example.test"]);
        m.mail_from = String::new();
        let id = store(&q, m, b"Subject: bounce\r\n\r\n.\r\n");
        let (mta, seen) = refusing_mta(RefuseAt::Nothing).await;
        let receipt = q.release(&id, mta, "guard.example.test").await.unwrap();
        assert_eq!(receipt.reply, "250 2.0.0 queued");
        assert!(seen.lock()[1].starts_with("MAIL FROM:<> "));
        assert!(matches!(q.show(&id), Err(QuarantineError::NotFound(_))));
    }
}
