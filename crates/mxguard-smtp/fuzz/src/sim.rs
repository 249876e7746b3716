//! A client, the turn tracker and an upstream in memory, on a fake clock,
//! driven by a script, with the guard's promises checked after every step.
//!
//! Shared by the property tests (`tests/properties.rs` includes this file by
//! path) and the cargo-fuzz targets, so a case either of them finds replays
//! in the other. Scripts are made of SMTP-shaped tokens, not raw bytes: a
//! random byte string almost never gets past `EHLO`, while
//! `MAIL FROM:<a@b>\r\n` + `DATA\r\n` + `\n.\n` reaches the body scanner and
//! the diversion paths at once (stalwartlabs/smtp-proto fuzzes the same
//! way).
//!
//! The upstream is one of two kinds:
//! - *chaos*: replies from an alphabet at random instants, unrelated to the
//!   commands, garbage included. What must hold: no panic, bounded buffers,
//!   replies in the order sent.
//! - a *model MTA*: a strict, Postfix-like server (a message ends only at
//!   `<CRLF>.<CRLF>`; nested MAIL, DATA without recipients and a bare `EHLO`
//!   are refused without resetting the transaction). Then the guard and the
//!   MTA must agree on every turn, no end-of-data look-alike may reach it,
//!   and a quarantined session's mail must never reach it.
//!
//! Every MTA reply carries a unique `#id`, so the client's transcript says
//! which reply answered what.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mxguard_smtp::{
    Disposition, Event, ReplyDelays, ReplyReader, SmugglingPolicy, TrackerConfig, TurnTracker,
    Verb, Violation,
};

/// The header a tagged session's messages get.
pub const TAG: &[u8] = b"X-MXGuard: suspect; tests=sim\r\n";
/// What the sim answers when it stored a diverted message.
pub const STORED: &[u8] = b"250 2.0.0 Ok: stored\r\n";
/// What the sim answers when storing a diverted message failed.
pub const STORE_FAILED: &[u8] = b"451 4.3.0 store failed\r\n";
/// The tracker's own reply to STARTTLS in a session that must stay in sight.
const NO_TLS: &[u8] = b"454 4.7.0 TLS not available\r\n";

/// Client tokens: commands, body pieces, line-break fragments, foreign
/// protocols.
pub const CLIENT_TOKENS: &[&[u8]] = &[
    b"EHLO x\r\n",
    b"HELO x\r\n",
    b"EHLO\r\n",
    b"MAIL FROM:<a@b>\r\n",
    b"RCPT TO:<c@d>\r\n",
    b"RCPT TO:<nobody@d>\r\n",
    b"DATA\r\n",
    b"data\r\n",
    b"BDAT 5 LAST\r\n",
    b"BDAT 3\r\n",
    b"BDAT 0 LAST\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n",
    b"dGVzdA==\r\n",
    b"bW9yZQ==\r\n",
    b"*\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"VRFY x\r\n",
    b"XCLIENT A=1\r\n",
    b"FOO\r\n",
    b".\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"..",
    b"x",
    b"Subject: hi\r\n",
    b"MAIL FROM:<a@b>\n",
    b"GET / HTTP/1.1\r\n",
    b"Host: x\r\n",
    b"\x16\x03\x01",
    b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
    b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabcBDAT 2 LAST\r\nde",
    b"\n.\n",
    b"\r\n.\r\n",
];

/// Upstream reply tokens for the chaos upstream; `#` becomes `#<id>;`.
pub const REPLY_TOKENS: &[&[u8]] = &[
    b"250 ok #\r\n",
    b"250-x #\r\n250 PIPELINING\r\n",
    b"250-mx #\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 STARTTLS\r\n",
    b"354 go #\r\n",
    b"220 go #\r\n",
    b"334 x #\r\n",
    b"235 ok #\r\n",
    b"554 no #\r\n",
    b"451 later #\r\n",
    b"421 bye #\r\n",
    b"502 what #\r\n",
    b"HTTP/1.1 200 OK\r\n",
    b"25",
    b"\r\n",
    b"250-",
];

/// What to set when a violation is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disp {
    Keep,
    Pass,
    Tag,
    Quarantine,
    Discard,
}

impl Disp {
    pub const ALL: [Disp; 5] = [
        Disp::Keep,
        Disp::Pass,
        Disp::Tag,
        Disp::Quarantine,
        Disp::Discard,
    ];

    fn to_disposition(self) -> Option<Disposition> {
        match self {
            Disp::Keep => None,
            Disp::Pass => Some(Disposition::Pass),
            Disp::Tag => Some(Disposition::Tag(TAG.to_vec())),
            Disp::Quarantine => Some(Disposition::Quarantine),
            Disp::Discard => Some(Disposition::Discard),
        }
    }
}

fn rank(d: &Disposition) -> u8 {
    match d {
        Disposition::Pass => 0,
        Disposition::Tag(_) => 1,
        Disposition::Quarantine | Disposition::Discard => 2,
    }
}

fn diverts(d: &Disposition) -> bool {
    matches!(d, Disposition::Quarantine | Disposition::Discard)
}

/// One step of a script.
#[derive(Clone, PartialEq, Eq)]
pub enum Op {
    /// The client sends these bytes (they wait in its socket).
    Send(Vec<u8>),
    /// The guard reads up to this many client bytes, if it wants input.
    ClientRead(usize),
    /// The chaos upstream sends these bytes (`#` becomes `#<id>;`).
    Reply(Vec<u8>),
    /// The guard reads up to this many upstream bytes.
    UpstreamRead(usize),
    /// The guard writes up to this many bytes to the upstream.
    UpstreamWrite(usize),
    /// The guard writes up to this many bytes to the client.
    ClientWrite(usize),
    /// Time passes (ms).
    Wait(u64),
    /// The daemon applies its policy to a violation, then reads on.
    Proceed(Disp),
    /// The disposition changes at any instant, paused or not (the daemon
    /// changes it only at a violation; the tracker must not care when).
    Policy(Disp),
    /// The daemon stored (or failed to store) a diverted message.
    DivertDone(bool),
}

/// Shown as Rust source, so a shrunk case pastes straight into a test.
impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = |b: &[u8]| b.escape_ascii().to_string().replace('"', "\\\"");
        match self {
            Op::Send(b) => write!(f, "Send(b\"{}\".to_vec())", text(b)),
            Op::Reply(b) => write!(f, "Reply(b\"{}\".to_vec())", text(b)),
            Op::ClientRead(n) => write!(f, "ClientRead({n})"),
            Op::UpstreamRead(n) => write!(f, "UpstreamRead({n})"),
            Op::UpstreamWrite(n) => write!(f, "UpstreamWrite({n})"),
            Op::ClientWrite(n) => write!(f, "ClientWrite({n})"),
            Op::Wait(ms) => write!(f, "Wait({ms})"),
            Op::Proceed(d) => write!(f, "Proceed(Disp::{d:?})"),
            Op::Policy(d) => write!(f, "Policy(Disp::{d:?})"),
            Op::DivertDone(ok) => write!(f, "DivertDone({ok})"),
        }
    }
}

/// What a run is set up with.
#[derive(Debug, Clone)]
pub struct Setup {
    pub smuggling: SmugglingPolicy,
    pub strip_pipelining: bool,
    pub max_command_line: usize,
    pub max_held: usize,
    pub unknown_limit: u32,
    /// Reply delays in ms: EHLO, MAIL, RCPT, 354, end of data, other.
    pub delays: [u64; 6],
    pub tarpit_ms: u64,
    pub initial: Disp,
    /// Violations are handled at once, like the daemon does, with the next
    /// of `decisions`; otherwise only by [`Op::Proceed`].
    pub auto_proceed: bool,
    pub decisions: Vec<Disp>,
    /// The upstream is the model MTA (else chaos).
    pub model_mta: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            smuggling: SmugglingPolicy::Reject,
            strip_pipelining: false,
            max_command_line: 2048,
            max_held: 64 * 1024,
            unknown_limit: 3,
            delays: [0; 6],
            tarpit_ms: 0,
            initial: Disp::Pass,
            auto_proceed: true,
            decisions: vec![Disp::Keep],
            model_mta: true,
        }
    }
}

impl Setup {
    fn config(&self) -> TrackerConfig {
        let ms = Duration::from_millis;
        TrackerConfig {
            strip_pipelining: self.strip_pipelining,
            max_command_line: self.max_command_line,
            unknown_command_limit: self.unknown_limit,
            smuggling: self.smuggling,
            delays: ReplyDelays {
                ehlo: ms(self.delays[0]),
                helo: ms(self.delays[0]),
                mail: ms(self.delays[1]),
                rcpt: ms(self.delays[2]),
                data: ms(self.delays[3]),
                end_of_data: ms(self.delays[4]),
                other: ms(self.delays[5]),
            },
            max_held: self.max_held,
            // Held MAILs (sender limits) are the daemon's business; the
            // model passes every MAIL on.
            hold_mail: false,
        }
    }
}

/// Which promises a run checks (each property test looks at one family, so
/// that one bug does not hide another).
#[derive(Debug, Clone, Copy, Default)]
pub struct Checks {
    /// Held input, the command line and the upstream buffer stay bounded;
    /// `wants_client_input()` is false when it must be.
    pub bounds: bool,
    /// Whenever both pipes are empty, the guard is in a message exactly when
    /// the MTA is (model MTA).
    pub agreement: bool,
    /// Each reply the client gets answers the turn it is paired with
    /// (model MTA); chaos: MTA replies keep their order.
    pub replies: bool,
    /// No end-of-data look-alike in what the MTA reads; with `Normalize` no
    /// bare CR or LF either (model MTA).
    pub wire: bool,
    /// Quarantine/Discard: no body byte of a later message reaches the MTA;
    /// Tag: later messages start with the header, which is never anywhere
    /// else (model MTA).
    pub disposition: bool,
    /// After the drain nothing is stuck (model MTA).
    pub liveness: bool,
}

impl Checks {
    pub fn all() -> Self {
        Self {
            bounds: true,
            agreement: true,
            replies: true,
            wire: true,
            disposition: true,
            liveness: true,
        }
    }
}

// ---------------------------------------------------------------------------
// The model MTA
// ---------------------------------------------------------------------------

/// What an MTA reply answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answered {
    Command(Vec<u8>),
    Sasl(Vec<u8>),
    EndOfData,
    Chunk { last: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtaMode {
    Command,
    Sasl,
    Body,
    Chunk { remaining: u64, last: bool },
    Closed,
    Tls,
}

/// A message as the MTA received it.
#[derive(Debug, Clone)]
pub struct MtaBody {
    /// The number of the DATA/BDAT command that started it (1-based).
    pub index: u32,
    /// DATA: the raw body with its terminator; BDAT: the chunks' octets.
    pub raw: Vec<u8>,
    pub complete: bool,
    pub bdat: bool,
    /// The MTA took it (a transaction with a recipient).
    pub accepted: bool,
}

impl MtaBody {
    /// The message as delivered: DATA unstuffed, without the final dot.
    pub fn content(&self) -> Vec<u8> {
        if self.bdat {
            return self.raw.clone();
        }
        let end = if self.complete {
            self.raw.len() - 3
        } else {
            self.raw.len()
        };
        unstuff(&self.raw[..end])
    }
}

/// Removes the transparency dots of a CRLF-only body (no terminator).
pub fn unstuff(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut at_line_start = true;
    for (i, &b) in raw.iter().enumerate() {
        if at_line_start && b == b'.' {
            at_line_start = false;
            continue;
        }
        at_line_start = b == b'\n' && i > 0 && raw[i - 1] == b'\r';
        out.push(b);
    }
    out
}

/// A strict, Postfix-like MTA.
#[derive(Debug, Clone)]
pub struct Mta {
    pub mode: MtaMode,
    line: Vec<u8>,
    has_mail: bool,
    rcpts: u32,
    /// An open BDAT message (index into `bodies`).
    bdat_open: Option<usize>,
    /// DATA and valid BDAT commands seen.
    pub data_commands: u32,
    pub answered: BTreeMap<u32, Answered>,
    /// Ids of replies to RSET.
    pub rset_ids: Vec<u32>,
    pub bodies: Vec<MtaBody>,
    /// Bytes received after the `220` to STARTTLS (must be the handshake,
    /// never a command pipelined before it).
    pub after_tls: Vec<u8>,
}

impl Default for Mta {
    fn default() -> Self {
        Self {
            mode: MtaMode::Command,
            line: Vec::new(),
            has_mail: false,
            rcpts: 0,
            bdat_open: None,
            data_commands: 0,
            answered: BTreeMap::new(),
            rset_ids: Vec::new(),
            bodies: Vec::new(),
            after_tls: Vec::new(),
        }
    }
}

/// `BDAT <digits> [LAST]`, as Postfix reads it (digits only).
pub fn mta_bdat(line: &[u8]) -> Option<(u64, bool)> {
    let mut words = strip_eol(line).split(|b| matches!(b, b' ' | b'\t'));
    // The verb starts the line, as in `Mta::line_in`.
    if !words.next()?.eq_ignore_ascii_case(b"BDAT") {
        return None;
    }
    let mut words = words.filter(|w| !w.is_empty());
    let size = words.next()?;
    if size.is_empty() || size.len() > 18 || !size.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = std::str::from_utf8(size).ok()?.parse().ok()?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return None,
    };
    words.next().is_none().then_some((size, last))
}

fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

impl Mta {
    /// Reads what the guard wrote; replies go to `out`, numbered from `ids`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>, ids: &mut u32) {
        while !data.is_empty() {
            match self.mode {
                MtaMode::Closed => return,
                MtaMode::Tls => {
                    self.after_tls.extend_from_slice(data);
                    return;
                }
                MtaMode::Command | MtaMode::Sasl => match memchr::memchr(b'\n', data) {
                    None => {
                        self.line.extend_from_slice(data);
                        return;
                    }
                    Some(lf) => {
                        self.line.extend_from_slice(&data[..=lf]);
                        data = &data[lf + 1..];
                        let line = std::mem::take(&mut self.line);
                        self.line_in(line, out, ids);
                    }
                },
                MtaMode::Body => {
                    let body = self.bodies.last_mut().expect("a body is open");
                    body.raw.push(data[0]);
                    data = &data[1..];
                    if body.raw == b".\r\n" || body.raw.ends_with(b"\r\n.\r\n") {
                        body.complete = true;
                        self.mode = MtaMode::Command;
                        self.reset();
                        self.reply(out, ids, "250 2.0.0 queued", Answered::EndOfData);
                    }
                }
                MtaMode::Chunk { remaining, last } => {
                    let take = data
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    if let Some(i) = self.bdat_open {
                        self.bodies[i].raw.extend_from_slice(&data[..take]);
                    }
                    data = &data[take..];
                    let remaining = remaining - take as u64;
                    self.mode = MtaMode::Chunk { remaining, last };
                    if remaining == 0 {
                        self.chunk_end(last, out, ids);
                    }
                }
            }
        }
    }

    fn reset(&mut self) {
        self.has_mail = false;
        self.rcpts = 0;
        self.bdat_open = None;
    }

    fn reply(&mut self, out: &mut Vec<u8>, ids: &mut u32, text: &str, answered: Answered) {
        *ids += 1;
        let id = *ids;
        out.extend_from_slice(format!("{text} #{id}\r\n").as_bytes());
        self.answered.insert(id, answered);
    }

    fn chunk_end(&mut self, last: bool, out: &mut Vec<u8>, ids: &mut u32) {
        self.mode = MtaMode::Command;
        let accepted = self.bdat_open.is_some_and(|i| self.bodies[i].accepted);
        let text = match (accepted, last) {
            (true, true) => "250 2.0.0 queued",
            (true, false) => "250 2.0.0 chunk ok",
            (false, _) => "554 5.5.1 no valid recipients",
        };
        if last {
            if let Some(i) = self.bdat_open {
                self.bodies[i].complete = true;
            }
            self.reset();
        }
        self.reply(out, ids, text, Answered::Chunk { last });
    }

    fn line_in(&mut self, line: Vec<u8>, out: &mut Vec<u8>, ids: &mut u32) {
        let text = strip_eol(&line).to_vec();
        if self.mode == MtaMode::Sasl {
            let (reply, next) = match text.as_slice() {
                b"*" => ("501 5.7.0 cancelled", MtaMode::Command),
                b"dGVzdA==" => ("235 2.7.0 ok", MtaMode::Command),
                b"bW9yZQ==" => ("334 more", MtaMode::Sasl),
                _ => ("535 5.7.8 failed", MtaMode::Command),
            };
            self.mode = next;
            self.reply(out, ids, reply, Answered::Sasl(line));
            return;
        }
        let split = text
            .iter()
            .position(|b| matches!(b, b' ' | b'\t'))
            .unwrap_or(text.len());
        let verb = text[..split].to_ascii_uppercase();
        let arg = text.get(split + 1..).unwrap_or_default().trim_ascii();
        let answered = Answered::Command(line.clone());
        let reply = match verb.as_slice() {
            b"EHLO" | b"HELO" | b"LHLO" => {
                if arg.is_empty() {
                    "501 5.5.4 Syntax: EHLO hostname"
                } else {
                    self.reset();
                    if verb != b"HELO" {
                        *ids += 1;
                        let id = *ids;
                        out.extend_from_slice(
                            format!(
                                "250-mx.example #{id}\r\n250-PIPELINING\r\n250-CHUNKING\r\n\
                                 250-STARTTLS\r\n250 AUTH PLAIN\r\n"
                            )
                            .as_bytes(),
                        );
                        self.answered.insert(id, answered);
                        return;
                    }
                    "250 mx.example"
                }
            }
            b"MAIL" => {
                if !starts_with_ci(&text, b"MAIL FROM:") {
                    "501 5.5.4 Syntax: MAIL FROM:<address>"
                } else if self.has_mail {
                    "503 5.5.1 Error: nested MAIL command"
                } else {
                    self.has_mail = true;
                    "250 2.1.0 Ok"
                }
            }
            b"RCPT" => {
                if !starts_with_ci(&text, b"RCPT TO:") {
                    "501 5.5.4 Syntax: RCPT TO:<address>"
                } else if !self.has_mail {
                    "503 5.5.1 Error: need MAIL command"
                } else if memchr::memmem::find(&text, b"nobody").is_some() {
                    "550 5.1.1 unknown user"
                } else {
                    self.rcpts += 1;
                    "250 2.1.5 Ok"
                }
            }
            b"DATA" => {
                if !arg.is_empty() {
                    "501 5.5.4 Syntax: DATA"
                } else if !self.has_mail {
                    self.data_commands += 1;
                    "503 5.5.1 Error: need RCPT command"
                } else if self.rcpts == 0 {
                    self.data_commands += 1;
                    "554 5.5.1 Error: no valid recipients"
                } else {
                    self.data_commands += 1;
                    self.bodies.push(MtaBody {
                        index: self.data_commands,
                        raw: Vec::new(),
                        complete: false,
                        bdat: false,
                        accepted: true,
                    });
                    self.mode = MtaMode::Body;
                    "354 End data with <CR><LF>.<CR><LF>"
                }
            }
            b"BDAT" => match mta_bdat(&text) {
                None => "501 5.5.4 Syntax: BDAT count [LAST]",
                Some((size, last)) => {
                    self.data_commands += 1;
                    if self.bdat_open.is_none() {
                        self.bodies.push(MtaBody {
                            index: self.data_commands,
                            raw: Vec::new(),
                            complete: false,
                            bdat: true,
                            accepted: self.has_mail && self.rcpts > 0,
                        });
                        self.bdat_open = Some(self.bodies.len() - 1);
                    }
                    self.mode = MtaMode::Chunk {
                        remaining: size,
                        last,
                    };
                    if size == 0 {
                        self.chunk_end(last, out, ids);
                    }
                    // The reply comes at the end of the chunk.
                    return;
                }
            },
            b"RSET" => {
                self.reset();
                self.reply(out, ids, "250 2.0.0 Ok", answered);
                self.rset_ids.push(*ids);
                return;
            }
            b"NOOP" => "250 2.0.0 Ok",
            b"QUIT" => {
                self.mode = MtaMode::Closed;
                "221 2.0.0 Bye"
            }
            b"STARTTLS" => {
                if arg.is_empty() {
                    self.mode = MtaMode::Tls;
                    "220 2.0.0 Ready to start TLS"
                } else {
                    "501 5.5.4 Syntax: STARTTLS"
                }
            }
            b"AUTH" => {
                if self.has_mail {
                    "503 5.5.1 Error: MAIL transaction in progress"
                } else if arg.is_empty() {
                    "501 5.5.4 Syntax: AUTH mechanism"
                } else if arg.contains(&b' ') {
                    "535 5.7.8 failed"
                } else {
                    self.mode = MtaMode::Sasl;
                    "334 "
                }
            }
            b"VRFY" => "252 2.0.0 maybe",
            b"" => "500 5.5.2 Error: bad syntax",
            _ => "502 5.5.2 Error: command not recognized",
        };
        self.reply(out, ids, reply, answered);
    }
}

// ---------------------------------------------------------------------------
// Body helpers shared with the scanner properties
// ---------------------------------------------------------------------------

/// Where a strict reader ends a body that starts at `body[0]`: after the
/// first `<CRLF>.<CRLF>` (the start of the body counts as a CRLF).
pub fn strict_end(body: &[u8]) -> Option<usize> {
    if body.starts_with(b".\r\n") {
        return Some(3);
    }
    memchr::memmem::find(body, b"\r\n.\r\n").map(|i| i + 5)
}

/// The first dot line with any other line break around it (the SMTP
/// smuggling look-alikes: `<LF>.<LF>`, `<CR>.<CR>`, `<CRLF>.<LF>`, ...)
/// before `limit`, the position of the dot of the real end.
pub fn first_lookalike(body: &[u8], limit: usize) -> Option<usize> {
    let brk = |b: u8| b == b'\r' || b == b'\n';
    (0..limit.min(body.len())).find(|&p| {
        body[p] == b'.' && (p == 0 || brk(body[p - 1])) && body.get(p + 1).is_some_and(|b| brk(*b))
    })
}

/// Every CR is followed by LF and every LF follows a CR.
pub fn only_crlf(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        _ => true,
    })
}

// ---------------------------------------------------------------------------
// The simulation
// ---------------------------------------------------------------------------

/// A reply as the client got it.
#[derive(Debug, Clone)]
pub struct Got {
    pub code: u16,
    pub raw: Vec<u8>,
    /// The MTA reply id, if it came from the upstream.
    pub id: Option<u32>,
    /// All ids in it (chaos).
    pub ids: Vec<u32>,
}

/// Every `#<id>` in a reply, in order (garbage from a chaos upstream can
/// glue two replies into one).
fn reply_ids(raw: &[u8]) -> Vec<u32> {
    memchr::memchr_iter(b'#', raw)
        .filter_map(|hash| {
            let digits: Vec<u8> = raw[hash + 1..]
                .iter()
                .copied()
                .take_while(u8::is_ascii_digit)
                .collect();
            std::str::from_utf8(&digits).ok()?.parse().ok()
        })
        .collect()
}

/// A turn as the client took it, read from what it sent and the replies it
/// got (RFC 5321: each reply answers the oldest unanswered turn).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientTurn {
    Command(Vec<u8>),
    Sasl(Vec<u8>),
    EndOfData,
    Chunk { last: bool },
}

pub struct Sim {
    pub setup: Setup,
    pub checks: Checks,
    pub t: TurnTracker,
    pub now: Instant,
    /// Sent by the client, not yet read by the guard.
    client_pipe: Vec<u8>,
    /// Everything the guard read from the client, in order.
    pub client_fed: Vec<u8>,
    max_read: usize,
    /// Sent by the upstream, not yet read by the guard.
    upstream_pipe: Vec<u8>,
    pub mta: Mta,
    /// Chaos: everything the guard wrote to the upstream.
    pub upstream_rx: Vec<u8>,
    /// Everything the client received.
    pub client_rx: Vec<u8>,
    pub events: Vec<Event>,
    next_id: u32,
    /// Chaos: everything the upstream sent.
    chaos_sent: Vec<u8>,
    decisions: usize,
    divert_owed: bool,
    diverting: bool,
    pub divert_dones: u32,
    /// Contents of diverted messages (from `take_diverted`).
    pub diverted: Vec<Vec<u8>>,
    current_divert: Vec<u8>,
    /// The DATA/BDAT count the MTA had got (or was sent) when the session
    /// was first told to quarantine/discard, and to tag.
    pub pre_divert: Option<u32>,
    pub pre_tag: Option<u32>,
    /// The upstream sent garbage: the daemon ends the session.
    pub upstream_error: bool,
    /// A smuggling look-alike under `Reject`: the tracker reads no more.
    pub stopped: bool,
    /// The session is over (blind, garbage).
    pub over: bool,
}

impl Sim {
    pub fn new(setup: Setup, checks: Checks) -> Self {
        let now = Instant::now();
        let mut t = TurnTracker::new(setup.config(), now);
        t.set_tarpit(Duration::from_millis(setup.tarpit_ms));
        let mut sim = Self {
            setup,
            checks,
            t,
            now,
            client_pipe: Vec::new(),
            client_fed: Vec::new(),
            max_read: 0,
            upstream_pipe: Vec::new(),
            mta: Mta::default(),
            upstream_rx: Vec::new(),
            client_rx: Vec::new(),
            events: Vec::new(),
            next_id: 0,
            chaos_sent: Vec::new(),
            decisions: 0,
            divert_owed: false,
            diverting: false,
            divert_dones: 0,
            diverted: Vec::new(),
            current_divert: Vec::new(),
            pre_divert: None,
            pre_tag: None,
            upstream_error: false,
            stopped: false,
            over: false,
        };
        let initial = sim.setup.initial;
        sim.set_disposition(initial);
        sim
    }

    /// Runs a script and the drain after it, checking as it goes.
    pub fn run(setup: Setup, checks: Checks, ops: &[Op]) -> Sim {
        let mut sim = Sim::new(setup, checks);
        for op in ops {
            sim.step(op);
        }
        sim.finish();
        sim
    }

    fn model(&self) -> bool {
        self.setup.model_mta
    }

    /// How many DATA/BDAT commands the MTA got or will get from what was
    /// already written for it.
    fn forwarded_data_commands(&self) -> u32 {
        let mut mta = self.mta.clone();
        let mut ids = 0;
        mta.feed(self.t.upstream_output(), &mut Vec::new(), &mut ids);
        mta.data_commands
    }

    /// Sets a disposition the way the daemon does (model MTA: the
    /// strongest wins).
    pub fn set_disposition(&mut self, d: Disp) {
        let Some(new) = d.to_disposition() else {
            return;
        };
        if self.model() {
            // Like the daemon: the strongest action wins.
            if rank(&new) < rank(self.t.disposition()) {
                return;
            }
            if diverts(&new) && self.pre_divert.is_none() {
                self.pre_divert = Some(self.forwarded_data_commands());
            }
            if matches!(new, Disposition::Tag(_)) && self.pre_tag.is_none() {
                self.pre_tag = Some(self.forwarded_data_commands());
            }
        }
        self.t.set_disposition(new);
    }

    pub fn step(&mut self, op: &Op) {
        if self.over {
            return;
        }
        match op {
            Op::Send(bytes) => self.client_pipe.extend_from_slice(bytes),
            Op::ClientRead(n) => self.client_read(*n),
            Op::Reply(bytes) => {
                if !self.model() {
                    self.chaos_reply(bytes);
                }
            }
            Op::UpstreamRead(n) => self.upstream_read(*n),
            Op::UpstreamWrite(n) => self.upstream_write(*n),
            Op::ClientWrite(n) => {
                if let Some(out) = self.t.client_output(self.now) {
                    let k = (*n).clamp(1, out.len());
                    self.client_rx.extend_from_slice(&out[..k]);
                    self.t.client_written(self.now, k);
                }
            }
            Op::Wait(ms) => self.now += Duration::from_millis(*ms),
            Op::Proceed(d) => {
                if self.t.is_paused() {
                    self.set_disposition(*d);
                    self.t.proceed(self.now);
                }
            }
            Op::Policy(d) => self.set_disposition(*d),
            Op::DivertDone(ok) => self.divert_done(*ok),
        }
        self.poll();
        self.check_step();
    }

    fn client_read(&mut self, n: usize) {
        if self.client_pipe.is_empty() || !self.t.wants_client_input() {
            return;
        }
        let k = n.clamp(1, self.client_pipe.len());
        let bytes: Vec<u8> = self.client_pipe.drain(..k).collect();
        self.max_read = self.max_read.max(k);
        self.client_fed.extend_from_slice(&bytes);
        self.t.on_client(self.now, &bytes);
    }

    fn chaos_reply(&mut self, token: &[u8]) {
        let mut bytes = Vec::with_capacity(token.len() + 8);
        for &b in token {
            bytes.push(b);
            if b == b'#' {
                self.next_id += 1;
                bytes.extend_from_slice(self.next_id.to_string().as_bytes());
                // Ends the id: a token that follows with digits (`250...`)
                // must not run into it (`#1` + `250` read as `#1250`).
                bytes.push(b';');
            }
        }
        self.upstream_pipe.extend_from_slice(&bytes);
        self.chaos_sent.extend_from_slice(&bytes);
    }

    fn upstream_read(&mut self, n: usize) {
        if self.upstream_pipe.is_empty() {
            return;
        }
        let k = n.clamp(1, self.upstream_pipe.len());
        let bytes: Vec<u8> = self.upstream_pipe.drain(..k).collect();
        if self.t.on_upstream(self.now, &bytes).is_err() {
            self.upstream_error = true;
            self.over = true;
        }
    }

    fn upstream_write(&mut self, n: usize) {
        let out = self.t.upstream_output();
        if out.is_empty() {
            return;
        }
        let k = n.clamp(1, out.len());
        let bytes = out[..k].to_vec();
        self.t.upstream_written(k);
        if self.model() {
            let mut replies = Vec::new();
            self.mta.feed(&bytes, &mut replies, &mut self.next_id);
            self.upstream_pipe.extend_from_slice(&replies);
        } else {
            self.upstream_rx.extend_from_slice(&bytes);
        }
    }

    fn divert_done(&mut self, ok: bool) {
        // A DivertFinished may be waiting in the queue.
        self.poll();
        let reply = if ok { STORED } else { STORE_FAILED };
        if self.divert_owed {
            self.divert_owed = false;
            self.diverting = false;
            self.divert_dones += 1;
            self.diverted.push(std::mem::take(&mut self.current_divert));
            self.t.divert_done(self.now, reply.to_vec());
        } else if !self.model() {
            // Out of turn: the tracker must ignore it.
            self.t.divert_done(self.now, reply.to_vec());
        }
    }

    fn poll(&mut self) {
        loop {
            while let Some(e) = self.t.poll_event() {
                match &e {
                    Event::DivertStarted => self.diverting = true,
                    Event::DivertFinished => self.divert_owed = true,
                    // The client abandoned it (RSET, EHLO, QUIT between its
                    // chunks): the daemon drops what it stored.
                    Event::DivertAborted => {
                        self.diverting = false;
                        self.current_divert.clear();
                    }
                    Event::Violation(Violation::Smuggling(_))
                        if self.setup.smuggling == SmugglingPolicy::Reject =>
                    {
                        self.stopped = true;
                    }
                    _ => {}
                }
                self.events.push(e);
            }
            self.current_divert
                .extend_from_slice(&self.t.take_diverted());
            if self.t.is_blind() && self.t.upstream_output().is_empty() {
                // The daemon relays TLS blind from here on.
                self.over = true;
            }
            if !(self.setup.auto_proceed && self.t.is_paused()) {
                return;
            }
            let d = self
                .setup
                .decisions
                .get(self.decisions % self.setup.decisions.len().max(1))
                .copied()
                .unwrap_or(Disp::Keep);
            self.decisions += 1;
            self.set_disposition(d);
            self.t.proceed(self.now);
        }
    }

    /// Settles, then checks the end state.
    pub fn finish(&mut self) {
        self.settle();
        self.check_end();
    }

    /// Lets everything settle: the daemon proceeds, stores diverted mail,
    /// writes and reads both ways, and held replies come due.
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            if self.over {
                break;
            }
            let before = (
                self.client_pipe.len(),
                self.upstream_pipe.len(),
                self.t.upstream_output().len(),
                self.client_rx.len(),
                self.divert_dones,
                self.t.is_paused(),
                self.events.len(),
            );
            if self.t.is_paused() {
                self.t.proceed(self.now);
            }
            self.divert_done(true);
            self.poll();
            self.client_read(4096);
            self.poll();
            while !self.over && !self.t.upstream_output().is_empty() {
                self.upstream_write(usize::MAX);
                self.poll();
            }
            while !self.over && !self.upstream_pipe.is_empty() {
                self.upstream_read(usize::MAX);
                self.poll();
            }
            self.now += Duration::from_secs(3600);
            while let Some(out) = self.t.client_output(self.now) {
                let out = out.to_vec();
                self.client_rx.extend_from_slice(&out);
                self.t.client_written(self.now, out.len());
            }
            self.poll();
            self.check_step();
            let after = (
                self.client_pipe.len(),
                self.upstream_pipe.len(),
                self.t.upstream_output().len(),
                self.client_rx.len(),
                self.divert_dones,
                self.t.is_paused(),
                self.events.len(),
            );
            if before == after {
                break;
            }
        }
    }

    // -- checks -------------------------------------------------------------

    fn check_step(&mut self) {
        if self.checks.bounds {
            self.check_bounds();
        }
        if !self.model() {
            return;
        }
        assert!(
            !self.checks.wire || self.mta.after_tls.is_empty(),
            "bytes pipelined after STARTTLS reached the MTA: {:?}",
            String::from_utf8_lossy(&self.mta.after_tls)
        );
        if self.checks.disposition {
            self.check_divert();
        }
        // A message the MTA holds is finished there or aborted before the
        // guard diverts anything: else the quarantine stores the rest of a
        // message whose start the MTA then drops at our RSET, and the client
        // is told 250 for it.
        if self.checks.agreement && !self.over && self.diverting {
            assert!(
                !self.mta_holds_mail(),
                "the guard diverts a message while the MTA holds one open (MTA: {:?})",
                self.mta.mode
            );
        }
        if self.checks.agreement
            && !self.over
            && !self.stopped
            && self.upstream_pipe.is_empty()
            && self.t.upstream_output().is_empty()
            && matches!(
                self.mta.mode,
                MtaMode::Command | MtaMode::Sasl | MtaMode::Body | MtaMode::Chunk { .. }
            )
        {
            let mta_in_message = matches!(self.mta.mode, MtaMode::Body | MtaMode::Chunk { .. });
            if self.diverting {
                assert!(
                    !mta_in_message,
                    "the MTA is in a message the guard is diverting"
                );
            } else {
                assert_eq!(
                    self.t.in_message(),
                    mta_in_message,
                    "guard and MTA disagree on whether a message is open (MTA: {:?})",
                    self.mta.mode
                );
            }
        }
    }

    /// The MTA holds a message it would deliver, or will once it has read
    /// what the guard already wrote for it: inside a DATA body or a chunk,
    /// or between the chunks of a BDAT message with a recipient.
    fn mta_holds_mail(&self) -> bool {
        let mut mta = self.mta.clone();
        let mut ids = self.next_id;
        mta.feed(self.t.upstream_output(), &mut Vec::new(), &mut ids);
        matches!(mta.mode, MtaMode::Body | MtaMode::Chunk { .. })
            || mta.bdat_open.is_some_and(|i| mta.bodies[i].accepted)
    }

    fn check_bounds(&self) {
        let debug = format!("{:?}", self.t);
        let cap = self.setup.max_held;
        let read = self.max_read;
        // The tracker shows its held bytes and command line only in its
        // Debug output.
        let held = debug_vec_len(&debug, "held").expect("held in Debug");
        let line = debug_vec_len(&debug, "line").expect("line in Debug");
        assert!(
            held <= cap + read,
            "{held} held bytes, cap {cap}, largest read {read}"
        );
        // A SASL response may be 12288 octets (RFC 4954 §4).
        let line_cap = self.setup.max_command_line.max(12_288);
        assert!(line <= line_cap + read, "command line buffer of {line}");
        let up = self.t.upstream_output().len();
        // Reads stop at 4 × the cap; one read and one release of held
        // bytes may come on top, each at most doubled by normalisation.
        let limit = 6 * cap + 4 * read + TAG.len() + 64;
        assert!(up <= limit, "upstream buffer {up} > {limit}");
        let must_stop = held >= cap
            || up >= 4 * cap
            || self.t.is_blind()
            || self.stopped
            || debug.contains("client: Stopped");
        if must_stop {
            assert!(
                !self.t.wants_client_input(),
                "wants input with {held} held (cap {cap}), {up} for the upstream"
            );
        }
    }

    fn check_divert(&self) {
        let Some(pre) = self.pre_divert else {
            return;
        };
        for body in &self.mta.bodies {
            if body.index > pre && body.accepted {
                assert!(
                    body.raw.is_empty(),
                    "message {} of a quarantined session reached the MTA: {:?}",
                    body.index,
                    String::from_utf8_lossy(&body.raw)
                );
            }
        }
    }

    fn check_end(&mut self) {
        if !self.model() {
            if self.checks.replies {
                self.check_chaos_order();
            }
            return;
        }
        if self.checks.wire {
            self.check_wire();
        }
        if self.checks.disposition {
            self.check_divert();
            self.check_tags();
        }
        if self.checks.replies {
            self.check_pairs();
        }
        let settled = !self.over
            && !self.stopped
            && matches!(
                self.mta.mode,
                MtaMode::Command | MtaMode::Sasl | MtaMode::Body | MtaMode::Chunk { .. }
            );
        if self.checks.liveness && settled {
            assert!(!self.t.is_paused(), "still paused after the drain");
            assert!(
                self.client_pipe.is_empty(),
                "the guard stopped reading the client: {} bytes unread",
                self.client_pipe.len()
            );
            if matches!(self.mta.mode, MtaMode::Command | MtaMode::Sasl) {
                assert!(
                    self.t.is_quiet(),
                    "stuck: the MTA waits for a command, the guard still owes or \
                     awaits something (in message: {})",
                    self.t.in_message()
                );
            } else {
                // The client stopped inside a message.
                assert!(
                    self.t.in_message(),
                    "the MTA is in a message, the guard is not"
                );
            }
        }
    }

    fn check_wire(&self) {
        for body in self.mta.bodies.iter().filter(|b| !b.bdat) {
            let limit = if body.complete {
                body.raw.len() - 3
            } else {
                body.raw.len()
            };
            assert_eq!(
                first_lookalike(&body.raw, limit),
                None,
                "an end-of-data look-alike reached the MTA: {:?}",
                String::from_utf8_lossy(&body.raw)
            );
            if self.setup.smuggling == SmugglingPolicy::Normalize {
                assert!(
                    only_crlf(&body.raw),
                    "a bare CR or LF reached the MTA under Normalize: {:?}",
                    String::from_utf8_lossy(&body.raw)
                );
            }
        }
    }

    fn check_tags(&self) {
        for body in self.mta.bodies.iter().filter(|b| b.complete && b.accepted) {
            let content = body.content();
            let found = memchr::memmem::find_iter(&content, TAG).count();
            assert!(
                found == 0 || (found == 1 && content.starts_with(TAG)),
                "the tag header is not (only) on top of message {}: {:?}",
                body.index,
                String::from_utf8_lossy(&content)
            );
            // A session that went on to quarantine may have had a message
            // in flight (its DATA forwarded) when it did: that one can be
            // neither diverted nor, as the disposition is no longer Tag,
            // tagged. Only sessions that stayed at Tag are held to it.
            let after_tag = self.pre_tag.is_some_and(|p| body.index > p);
            if after_tag && self.pre_divert.is_none() {
                assert!(
                    content.starts_with(TAG),
                    "message {} of a tagged session has no tag: {:?}",
                    body.index,
                    String::from_utf8_lossy(&content)
                );
            }
        }
    }

    /// The replies the client got, in order.
    pub fn client_replies(&self) -> Vec<Got> {
        let mut reader = ReplyReader::new(usize::MAX);
        let mut got = Vec::new();
        let mut input: &[u8] = &self.client_rx;
        while let Ok(Some(reply)) = reader.push(input) {
            input = &[];
            let ids = reply_ids(&reply.raw);
            got.push(Got {
                code: reply.code,
                id: ids.first().copied(),
                ids,
                raw: reply.raw,
            });
        }
        got
    }

    fn check_chaos_order(&self) {
        let ids: Vec<u32> = self
            .client_replies()
            .into_iter()
            .flat_map(|g| g.ids)
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "replies reached the client out of order: {ids:?}"
        );
        let Some(&last) = ids.last() else {
            return;
        };
        // The replies as the tracker read them (garbage can glue two).
        let mut reader = ReplyReader::new(usize::MAX);
        let mut input: &[u8] = &self.chaos_sent;
        let mut sent = Vec::new();
        while let Ok(Some(reply)) = reader.push(input) {
            input = &[];
            sent.push(reply_ids(&reply.raw));
        }
        let skipped = sent
            .iter()
            .filter(|r| r.first().is_some_and(|id| *id < last))
            .filter(|r| !r.iter().any(|id| ids.contains(id)))
            .count();
        assert!(
            skipped <= self.divert_dones as usize,
            "{skipped} upstream replies never reached the client, only {} were \
             owed to our own RSET",
            self.divert_dones
        );
    }

    /// The turns the client took, read with the replies it got.
    pub fn client_turns(&self, got: &[Got]) -> Vec<ClientTurn> {
        let s = &self.client_fed;
        let mut turns = Vec::new();
        let mut pos = 0;
        let mut sasl = false;
        loop {
            let i = turns.len();
            let lf = match memchr::memchr(b'\n', &s[pos..]) {
                Some(lf) => pos + lf,
                None => return turns,
            };
            let line = s[pos..=lf].to_vec();
            pos = lf + 1;
            if sasl {
                turns.push(ClientTurn::Sasl(line));
                let Some(reply) = got.get(i) else {
                    return turns;
                };
                sasl = reply.code == 334;
                continue;
            }
            // A BDAT the guard refused itself (the MTA offered no
            // CHUNKING, or the size has no number with the tag header) is
            // a command, and what follows it more commands.
            let refused = got.get(i).is_some_and(|r| {
                r.id.is_none()
                    && (r.raw == mxguard_smtp::tracker::BDAT_NOT_OFFERED
                        || r.raw == mxguard_smtp::tracker::BDAT_TOO_BIG)
            });
            if let Some((size, last)) = mta_bdat(&line).filter(|_| !refused) {
                let Ok(size) = usize::try_from(size) else {
                    return turns;
                };
                if s.len() - pos < size {
                    return turns;
                }
                pos += size;
                turns.push(ClientTurn::Chunk { last });
                continue;
            }
            let verb = Verb::parse(&line);
            turns.push(ClientTurn::Command(line));
            if verb == Verb::Quit {
                return turns;
            }
            let Some(reply) = got.get(i) else {
                return turns;
            };
            match reply.code {
                354 => {
                    let Some(end) = strict_end(&s[pos..]) else {
                        return turns;
                    };
                    if self.setup.smuggling == SmugglingPolicy::Reject
                        && first_lookalike(&s[pos..], end - 3).is_some()
                    {
                        return turns;
                    }
                    pos += end;
                    turns.push(ClientTurn::EndOfData);
                }
                334 => sasl = true,
                220 if verb == Verb::StartTls => return turns,
                _ => {}
            }
        }
    }

    fn check_pairs(&self) {
        let got = self.client_replies();
        let turns = self.client_turns(&got);
        let show = |i: usize| {
            let context: Vec<String> = turns
                .iter()
                .zip(got.iter())
                .take(i + 1)
                .map(|(t, g)| format!("{t:?} -> {:?}", String::from_utf8_lossy(&g.raw)))
                .collect();
            context.join("\n")
        };
        for (i, (turn, reply)) in turns.iter().zip(got.iter()).enumerate() {
            let ok = match reply.id {
                Some(id) => match (self.mta.answered.get(&id), turn) {
                    (Some(Answered::Command(sent)), ClientTurn::Command(line)) => {
                        let verb = Verb::parse(line);
                        if matches!(verb, Verb::Data | Verb::Bdat) {
                            Verb::parse(sent) == verb
                        } else {
                            sent == line
                        }
                    }
                    (Some(Answered::Sasl(sent)), ClientTurn::Sasl(line)) => sent == line,
                    (Some(Answered::EndOfData), ClientTurn::EndOfData) => true,
                    (Some(Answered::Chunk { last: a }), ClientTurn::Chunk { last: b }) => a == b,
                    _ => false,
                },
                None => {
                    let raw = reply.raw.as_slice();
                    match turn {
                        ClientTurn::Command(line) => match Verb::parse(line) {
                            Verb::StartTls => raw == NO_TLS,
                            Verb::Data => {
                                raw.starts_with(b"354 End data")
                                    || raw == mxguard_smtp::tracker::BDAT_BUSY
                            }
                            Verb::Rcpt => raw == mxguard_smtp::tracker::BDAT_BUSY,
                            Verb::Bdat => {
                                raw == mxguard_smtp::tracker::BDAT_NOT_OFFERED
                                    || raw == mxguard_smtp::tracker::BDAT_TOO_BIG
                            }
                            _ => false,
                        },
                        ClientTurn::Chunk { last: false } => raw.ends_with(b" octets received\r\n"),
                        ClientTurn::EndOfData | ClientTurn::Chunk { last: true } => {
                            raw == STORED || raw == STORE_FAILED
                        }
                        ClientTurn::Sasl(_) => false,
                    }
                }
            };
            assert!(
                ok,
                "reply {i} does not answer the client's turn {i}:\n{}\n(MTA: {:?})",
                show(i),
                reply.id.and_then(|id| self.mta.answered.get(&id))
            );
        }
        let rset_swallowed = self
            .mta
            .answered
            .keys()
            .filter(|id| !got.iter().any(|g| g.id == Some(**id)))
            .filter(|id| self.mta.rset_ids.contains(id))
            .count();
        assert!(
            rset_swallowed <= self.divert_dones as usize,
            "{rset_swallowed} RSET replies never reached the client, only {} were ours",
            self.divert_dones
        );
    }
}

/// The length of a `Vec<u8>` field in a `{:?}` rendering.
fn debug_vec_len(debug: &str, field: &str) -> Option<usize> {
    let key = format!(", {field}: [");
    let start = debug.find(&key)? + key.len();
    let rest = &debug[start..];
    let inner = &rest[..rest.find(']')?];
    Some(if inner.is_empty() {
        0
    } else {
        inner.matches(", ").count() + 1
    })
}

// ---------------------------------------------------------------------------
// Fuzz input → script
// ---------------------------------------------------------------------------

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[usize::from(self.byte()) % from.len()]
    }

    fn size(&mut self) -> usize {
        // Mostly small, sometimes large.
        match self.byte() {
            b @ 0..=199 => usize::from(b % 16) + 1,
            b => usize::from(b) * 16,
        }
    }
}

/// Maps fuzz input onto a setup and a script over the SMTP alphabets.
pub fn decode(data: &[u8], model_mta: bool) -> (Setup, Vec<Op>) {
    let mut b = Bytes(data);
    let flags = b.byte();
    let setup = Setup {
        smuggling: if flags & 1 == 0 {
            SmugglingPolicy::Reject
        } else {
            SmugglingPolicy::Normalize
        },
        strip_pipelining: flags & 2 != 0,
        auto_proceed: flags & 4 == 0,
        max_command_line: b.pick(&[2048, 16, 64]),
        max_held: b.pick(&[64 * 1024, 64, 512]),
        unknown_limit: b.pick(&[3, 1]),
        delays: [
            b.pick(&[0, 10, 1000]),
            b.pick(&[0, 10]),
            b.pick(&[0, 10]),
            b.pick(&[0, 10, 1000]),
            b.pick(&[0, 10]),
            b.pick(&[0, 10]),
        ],
        tarpit_ms: b.pick(&[0, 0, 0, 50]),
        initial: b.pick(&[
            Disp::Pass,
            Disp::Pass,
            Disp::Pass,
            Disp::Tag,
            Disp::Quarantine,
        ]),
        decisions: (0..4).map(|_| b.pick(&Disp::ALL)).collect(),
        model_mta,
    };
    let mut ops = Vec::new();
    while !b.0.is_empty() {
        let op = match b.byte() % 16 {
            0..=4 => Op::Send(b.pick(CLIENT_TOKENS).to_vec()),
            5 => match b.byte() % 4 {
                0 => Op::Send(vec![b'a'; b.size() * 8]),
                _ => {
                    let n = usize::from(b.byte() % 8) + 1;
                    Op::Send((0..n).map(|_| b.byte()).collect())
                }
            },
            6 | 7 => Op::ClientRead(b.size()),
            8 => Op::Reply(b.pick(REPLY_TOKENS).to_vec()),
            9 => Op::UpstreamRead(b.size()),
            10 => Op::UpstreamWrite(b.size()),
            11 => Op::ClientWrite(b.size()),
            12 => Op::Wait(b.pick(&[1, 10, 100, 1000])),
            13 => Op::Proceed(b.pick(&Disp::ALL)),
            14 => Op::DivertDone(b.byte() % 4 != 0),
            _ => Op::Reply(vec![b.byte(), b.byte(), b'\r', b'\n']),
        };
        ops.push(op);
    }
    (setup, ops)
}

// ---------------------------------------------------------------------------
// The body scanner on its own
// ---------------------------------------------------------------------------

/// What scanning one body gave, however it was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    pub wire: Vec<u8>,
    pub content: Vec<u8>,
    /// Where the body ended (input offset after `.<CRLF>`).
    pub ended_at: Option<usize>,
    /// Where a `Reject` scanner stopped.
    pub stopped_at: Option<usize>,
    pub bare_breaks: u32,
    pub smuggling: Option<mxguard_smtp::Smuggling>,
}

/// Feeds `input` to a scanner cut at `cuts` (offsets, any order).
pub fn scan(policy: SmugglingPolicy, input: &[u8], cuts: &[usize]) -> Scanned {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(0);
    points.push(input.len());
    points.sort_unstable();
    points.dedup();
    let mut scanner = mxguard_smtp::BodyScanner::new(policy);
    let mut out = Scanned {
        wire: Vec::new(),
        content: Vec::new(),
        ended_at: None,
        stopped_at: None,
        bare_breaks: 0,
        smuggling: None,
    };
    for w in points.windows(2) {
        let piece = &input[w[0]..w[1]];
        let s = scanner.feed(piece, &mut out.wire, Some(&mut out.content));
        assert!(s.consumed <= piece.len());
        out.bare_breaks += s.bare_breaks;
        out.smuggling = out.smuggling.or(s.smuggling);
        if s.ended {
            out.ended_at = Some(w[0] + s.consumed);
            break;
        }
        if s.smuggling.is_some() && policy == SmugglingPolicy::Reject {
            out.stopped_at = Some(w[0] + s.consumed);
            break;
        }
        assert_eq!(s.consumed, piece.len(), "an open body takes all input");
    }
    out
}

/// The scanner's promises for one input: the same result however the input
/// is cut, and the end exactly where a strict reader ends the body.
pub fn check_scanner(policy: SmugglingPolicy, input: &[u8], cuts: &[usize]) {
    let whole = scan(policy, input, &[]);
    let cut = scan(policy, input, cuts);
    assert_eq!(whole, cut, "the result depends on how the input is cut");
    let byte_by_byte = scan(policy, input, &(0..input.len()).collect::<Vec<_>>());
    assert_eq!(whole, byte_by_byte, "byte by byte differs");

    let end = strict_end(input);
    let look = first_lookalike(input, end.map_or(input.len(), |e| e - 3));
    // `.<CR>` at the very end of an open body: end or look-alike, the next
    // byte decides.
    let undecided = end.is_none()
        && look.is_some_and(|p| p + 2 >= input.len() && input.get(p + 1) == Some(&b'\r'));
    let s = whole;
    match policy {
        SmugglingPolicy::Normalize => {
            assert_eq!(
                s.ended_at, end,
                "Normalize must end where a strict reader does"
            );
            assert!(
                only_crlf(&s.wire),
                "bare CR or LF on the wire: {:?}",
                s.wire
            );
            let body_end = if s.ended_at.is_some() {
                assert!(s.wire.ends_with(b".\r\n"));
                s.wire.len() - 3
            } else {
                s.wire.len()
            };
            assert_eq!(
                first_lookalike(&s.wire, body_end),
                None,
                "a look-alike on the wire"
            );
            if s.ended_at.is_some() {
                assert_eq!(
                    unstuff(&s.wire[..body_end]),
                    s.content,
                    "what the MTA delivers differs from what a quarantine stores"
                );
            }
            if !undecided {
                assert_eq!(
                    s.smuggling.is_some(),
                    look.is_some(),
                    "look-alike at {look:?}"
                );
            }
        }
        SmugglingPolicy::Reject => match look {
            Some(p) if !undecided => {
                assert!(s.smuggling.is_some(), "look-alike at {p} not reported");
                assert_eq!(s.ended_at, None);
                assert_eq!(
                    s.wire,
                    &input[..p],
                    "Reject passes exactly what came before"
                );
            }
            Some(_) => {}
            None => {
                assert_eq!(s.smuggling, None);
                assert_eq!(s.ended_at, end);
                match end {
                    Some(e) => assert_eq!(s.wire, &input[..e], "Reject passes the body as it is"),
                    // An open body may keep back a `.` or `.<CR>` it cannot
                    // judge yet.
                    None => assert!(
                        input.starts_with(&s.wire) && input.len() - s.wire.len() <= 2,
                        "Reject passes the body as it is"
                    ),
                }
            }
        },
    }
}
