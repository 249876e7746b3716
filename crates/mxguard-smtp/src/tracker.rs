//! The turn tracker: who may speak when, after the greeting.
//!
//! Sans-IO. The daemon feeds it what each side sent and when
//! ([`TurnTracker::on_client`], [`TurnTracker::on_upstream`]); it says what
//! to forward each way and when a held reply may be released
//! ([`TurnTracker::upstream_output`], [`TurnTracker::client_output`],
//! [`TurnTracker::poll_timeout`]), and what it noticed
//! ([`TurnTracker::poll_event`]).
//!
//! A real MTA waits for each reply it needs; a bot fires and forgets. So:
//! - a command that arrives while the reply to a command that must end a
//!   pipeline group (RFC 2920 §3.1) is held back or not yet received is a
//!   pipelining violation; without PIPELINING offered, every command must
//!   wait for its reply;
//! - body bytes before the client saw `354` are data before the reply;
//! - bytes after `STARTTLS` before its `220` are an injection attempt
//!   (CVE-2011-0411 and kin) and are discarded;
//! - HTTP, a TLS ClientHello, bare LF, over-long lines and unknown verbs are
//!   noted; SMTP smuggling look-alikes in a body are refused or normalised
//!   ([`crate::body`]).
//!
//! Bytes the client sends while the tracker waits for a reply that decides
//! how to read them (354 or not, 334 or not) are held, bounded, and read
//! once the reply is in: the guard and the MTA then always agree on what is
//! a command and what is mail.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::body::{BodyScanner, Smuggling, SmugglingPolicy};
use crate::command::{envelope_address, foreign, parse_bdat, Foreign, Verb, FOREIGN_NEEDS};
use crate::ehlo::{edit_ehlo_reply, EhloEdit, Offered};
use crate::escape::escape_capped;
use crate::reply::{ReplyError, ReplyReader};

/// Our answer to DATA or RCPT while a diverted BDAT message is open.
pub const BDAT_BUSY: &[u8] = b"503 5.5.1 Error: BDAT transaction in progress\r\n";

/// Our answer to BDAT when the MTA did not offer CHUNKING (in a greeting
/// the tracker saw): what such an MTA says. Forwarded, the BDAT would be
/// refused there and its chunk taken as commands by the MTA while the
/// guard counted it as data, unread; kept here, the bytes after it are
/// commands to both. (When only
/// the client was not shown CHUNKING, hidden from a suspect session, the
/// MTA takes the chunk as a chunk, and so does the guard: it is tagged or
/// diverted like any message.)
pub const BDAT_NOT_OFFERED: &[u8] = b"502 5.5.1 Error: command not implemented\r\n";
/// Our answer to a BDAT chunk whose size, with the tag header added, has
/// no number (over 2^64 octets).
pub const BDAT_TOO_BIG: &[u8] = b"552 5.3.4 Error: message too big\r\n";

/// Replies owed to the client (sent to the MTA and not yet answered, or
/// answered and not yet read by the client) past which the client is not
/// read: a client that pipelines without reading its replies would
/// otherwise queue them here without end (RFC 2920 §3.1 leaves such a
/// client to block on its own writes). Only back-pressure: reading goes
/// on as the client takes its replies.
pub const MAX_OWED: usize = 256;

/// A command line buffer up to this size is kept for the next command.
const LINE_KEEP: usize = 1024;
/// The first allocation of the bytes owed to the MTA.
const UPSTREAM_FIRST: usize = 256;

/// How long to hold the upstream's reply to each kind of command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyDelays {
    pub ehlo: Duration,
    pub helo: Duration,
    pub mail: Duration,
    pub rcpt: Duration,
    /// The `354` to DATA.
    pub data: Duration,
    /// The reply to the end of a message.
    pub end_of_data: Duration,
    pub other: Duration,
}

/// What a sender waits for the reply to most commands (RFC 5321
/// §4.5.3.2: the greeting, MAIL, RCPT; the RFC names no other, and 5
/// minutes is what Postfix and Exim wait for any command).
const SENDER_WAITS: Duration = Duration::from_secs(5 * 60);
/// ... for the `354` to DATA (§4.5.3.2.3).
const SENDER_WAITS_DATA: Duration = Duration::from_secs(2 * 60);
/// ... for the reply to the end of a message (§4.5.3.2.6).
const SENDER_WAITS_END: Duration = Duration::from_secs(10 * 60);

/// Whether a line's first bytes hold its whole verb: a blank, CR or LF
/// after it (blanks before it skipped, as [`Verb::parse`] skips them).
fn verb_is_whole(data: &[u8]) -> bool {
    let start = data
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(data.len());
    data[start..]
        .iter()
        .any(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// The longest a reply to `turn` is held, its reply delay and the tarpit
/// together: half of what a sender waits for it (RFC 5321 §4.5.3.2). The
/// other half is for the MTA's own time and for senders that give up
/// sooner than the RFC says; a reply held past the sender's timeout would
/// turn a slowed session into a failed delivery and a retry.
fn max_hold(turn: Turn) -> Duration {
    let waits = match turn {
        Turn::Command(Verb::Data) => SENDER_WAITS_DATA,
        Turn::EndOfData | Turn::Chunk { last: true } | Turn::PrdrPart => SENDER_WAITS_END,
        _ => SENDER_WAITS,
    };
    waits / 2
}

impl ReplyDelays {
    fn for_turn(&self, turn: Turn) -> Duration {
        match turn {
            Turn::Command(Verb::Ehlo | Verb::Lhlo) => self.ehlo,
            Turn::Command(Verb::Helo) => self.helo,
            Turn::Command(Verb::Mail) => self.mail,
            Turn::Command(Verb::Rcpt) => self.rcpt,
            Turn::Command(Verb::Data) => self.data,
            Turn::EndOfData | Turn::Chunk { last: true } => self.end_of_data,
            _ => self.other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Hide PIPELINING from the client: then any pipelining is a violation.
    pub strip_pipelining: bool,
    /// Longest command line before it counts as over-long.
    pub max_command_line: usize,
    /// Unknown verbs tolerated before it counts.
    pub unknown_command_limit: u32,
    pub smuggling: SmugglingPolicy,
    pub delays: ReplyDelays,
    /// Client bytes held while waiting for a reply; past this the daemon
    /// stops reading the client.
    pub max_held: usize,
    /// Hold each MAIL command until the caller has looked at its sender
    /// ([`Event::MailFrom`]): it then either lets it go on
    /// ([`TurnTracker::proceed`]) or answers it itself
    /// ([`TurnTracker::refuse_mail`]).
    pub hold_mail: bool,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            strip_pipelining: false,
            max_command_line: 2048,
            unknown_command_limit: 3,
            smuggling: SmugglingPolicy::Reject,
            delays: ReplyDelays::default(),
            max_held: 64 * 1024,
            hold_mail: false,
        }
    }
}

/// What happens to the mail of this session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Disposition {
    /// Relay as it is.
    #[default]
    Pass,
    /// Insert this header line (with its CRLF) at the top of each message.
    Tag(Vec<u8>),
    /// Keep each message away from the MTA: the caller stores it.
    Quarantine,
    /// Keep each message away from the MTA: the caller drops it.
    Discard,
}

impl Disposition {
    fn diverts(&self) -> bool {
        matches!(self, Disposition::Quarantine | Disposition::Discard)
    }

    /// TLS or BDAT would take the mail out of our hands.
    fn needs_sight(&self) -> bool {
        !matches!(self, Disposition::Pass)
    }
}

/// Something the client did that a test looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A command sent before the reply it had to wait for.
    Pipelining { verb: Verb, waiting_for: Verb },
    /// Message bytes sent before the client saw `354`.
    DataBeforeReply,
    /// An HTTP request or header.
    NonSmtp { first_bytes: String },
    /// A TLS ClientHello on the plaintext port.
    TlsHandshake,
    /// A command line ended with a bare LF.
    BareLf,
    /// A command line longer than the limit.
    LongLine { len: usize },
    /// Too many unknown verbs.
    UnknownCommands { count: u32 },
    /// A dot line with a non-standard line break in a message body.
    Smuggling(Smuggling),
    /// Bytes sent after STARTTLS before its reply; discarded.
    StartTlsInjection { bytes: usize },
}

impl Violation {
    /// The test's name, for logs and metric labels (a closed set).
    pub fn test(&self) -> &'static str {
        match self {
            Violation::Pipelining { .. } => "pipelining",
            Violation::DataBeforeReply => "early-data",
            Violation::NonSmtp { .. } => "non-smtp",
            Violation::TlsHandshake => "tls-on-plaintext",
            Violation::BareLf => "bare-lf",
            Violation::LongLine { .. } => "long-line",
            Violation::UnknownCommands { .. } => "unknown-commands",
            Violation::Smuggling(_) => "smuggling",
            Violation::StartTlsInjection { .. } => "starttls-injection",
        }
    }

    pub const TESTS: [&'static str; 9] = [
        "pipelining",
        "early-data",
        "non-smtp",
        "tls-on-plaintext",
        "bare-lf",
        "long-line",
        "unknown-commands",
        "smuggling",
        "starttls-injection",
    ];
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Pipelining { verb, waiting_for } => write!(
                f,
                "{} sent before the reply to {}",
                verb.as_str(),
                waiting_for.as_str()
            ),
            Violation::DataBeforeReply => f.write_str("message data sent before 354"),
            Violation::NonSmtp { first_bytes } => write!(f, "non-SMTP command: {first_bytes}"),
            Violation::TlsHandshake => f.write_str("TLS handshake on the plaintext port"),
            Violation::BareLf => f.write_str("command line ended with a bare LF"),
            Violation::LongLine { len } => write!(f, "command line of {len}+ bytes"),
            Violation::UnknownCommands { count } => write!(f, "{count} unknown commands"),
            Violation::Smuggling(seq) => write!(f, "end-of-data look-alike {seq} in a message"),
            Violation::StartTlsInjection { bytes } => {
                write!(f, "{bytes} bytes pipelined after STARTTLS (discarded)")
            }
        }
    }
}

/// What the tracker tells the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Violation(Violation),
    /// The client started a command `gap` after the last byte of our last
    /// reply (for the timing classifier).
    Turn {
        verb: Verb,
        gap: Duration,
    },
    /// AUTH succeeded (`235`).
    Authenticated,
    /// A MAIL command with this reverse-path (empty for `<>`) is held, the
    /// tracker paused (only with [`TrackerConfig::hold_mail`]).
    MailFrom(String),
    /// A message is being diverted (quarantine/discard): its content comes
    /// through [`TurnTracker::take_diverted`].
    DivertStarted,
    /// The diverted message is complete: store it, then call
    /// [`TurnTracker::divert_done`].
    DivertFinished,
    /// The client abandoned the diverted message: drop what was stored.
    DivertAborted,
    /// STARTTLS was accepted and its `220` delivered: the stream is TLS from
    /// here on; relay it blind.
    Blind,
}

/// The transaction as far as the guard saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    pub helo: Option<String>,
    pub mail_from: Option<String>,
    /// Recipients the MTA accepted.
    pub rcpt_to: Vec<String>,
}

/// One step of the conversation that is owed a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    Command(Verb),
    /// The end of a DATA body.
    EndOfData,
    /// A BDAT chunk.
    Chunk {
        last: bool,
    },
    /// A SASL response line during AUTH.
    SaslResponse,
    /// Our own RSET after a diverted message: its reply is not the client's.
    InternalRset,
    /// One of the replies PRDR (per-recipient data responses) sends after
    /// its `353`: one per accepted recipient, then the final one.
    PrdrPart,
}

impl Turn {
    fn ends_group(self) -> bool {
        match self {
            Turn::Command(v) => v.ends_group(),
            Turn::EndOfData | Turn::Chunk { .. } | Turn::InternalRset | Turn::PrdrPart => false,
            Turn::SaslResponse => true,
        }
    }

    fn verb(self) -> Verb {
        match self {
            Turn::Command(v) => v,
            Turn::EndOfData | Turn::PrdrPart => Verb::Data,
            Turn::Chunk { .. } => Verb::Bdat,
            Turn::SaslResponse | Turn::InternalRset => Verb::Auth,
        }
    }
}

#[derive(Debug)]
struct Pending {
    turn: Turn,
    /// The argument that counts if the MTA accepts: the HELO name, the
    /// MAIL reverse-path, the RCPT recipient. The envelope follows the MTA's
    /// replies, never the client's claims.
    arg: Option<String>,
    /// Our own reply to this turn (the MTA never saw it): released when
    /// every earlier reply has gone, so replies stay in order.
    local: Option<Vec<u8>>,
    /// A chunk's BDAT message (its number in the session): a failed chunk
    /// ends its own message, not a later one already open.
    message: u32,
}

impl Pending {
    fn of(turn: Turn) -> Self {
        Self {
            turn,
            arg: None,
            local: None,
            message: 0,
        }
    }

    /// A reply the client waits for from the MTA (not ours, not our RSET's).
    fn is_upstream(&self) -> bool {
        self.local.is_none() && self.turn != Turn::InternalRset
    }
}

#[derive(Debug)]
struct Outgoing {
    bytes: Vec<u8>,
    sent: usize,
    release_at: Instant,
    turn: Turn,
    /// The stream turns to TLS once this reply is out.
    then_blind: bool,
}

/// How client bytes are read right now.
#[derive(Debug)]
enum ClientState {
    /// Command lines.
    Command,
    /// Waiting for the reply to this turn before the next bytes can be read
    /// (354 or not; 334 or not; our own decision to divert).
    AwaitReply(Turn),
    /// After STARTTLS: anything before the 220 is injected and dropped.
    AwaitTls,
    /// One SASL response line, then back to waiting for the AUTH reply.
    SaslLine,
    /// A DATA body.
    Body(Box<BodyScanner>),
    /// A BDAT chunk with this many octets to go.
    Chunk { remaining: u64, last: bool },
    /// A diverted message is complete; waiting for the caller to store it.
    AwaitDivert,
    /// Waiting for every reply the MTA owes before deciding what the held
    /// command (BDAT in a diverting session) means.
    AwaitPending,
    /// TLS: nothing more to read here.
    Blind,
    /// A smuggled message was refused: nothing more is read.
    Stopped,
}

/// Follows one session after its greeting. See the module docs.
#[derive(Debug)]
pub struct TurnTracker {
    cfg: TrackerConfig,
    client: ClientState,
    /// The current command line (bounded).
    line: Vec<u8>,
    /// The current line went past the limit: the rest of it is passed on.
    line_overflow: bool,
    held: Vec<u8>,
    replies: ReplyReader,
    pending: VecDeque<Pending>,
    out_client: VecDeque<Outgoing>,
    to_upstream: Vec<u8>,
    upstream_sent: usize,
    diverted: Vec<u8>,
    /// The current message is being diverted.
    diverting: bool,
    /// The current message already got its tag header.
    tagged: bool,
    /// A BDAT message is open (its first chunk went).
    in_bdat: bool,
    /// BDAT messages forwarded so far (numbers [`Pending::message`]).
    bdat_messages: u32,
    offered: Offered,
    disposition: Disposition,
    tarpit: Duration,
    envelope: Envelope,
    unknown: u32,
    /// When the last byte of our last reply went out.
    last_reply_at: Instant,
    last_release: Instant,
    events: VecDeque<Event>,
    /// Violations reported once per session each.
    reported: u16,
    blind: bool,
    /// A violation was reported: nothing more is read until the caller has
    /// applied its policy and called [`TurnTracker::proceed`], so that the
    /// action (say, quarantine) covers the very command that fired it.
    paused: bool,
    /// A MAIL line waiting for the caller's word (`hold_mail`).
    held_mail: Option<Vec<u8>>,
    /// The current line's turn was already checked (before a pause).
    turn_checked: bool,
    /// The current line's first read was too short for [`foreign`] to be
    /// sure: it looks again as the line's next bytes come (a client that
    /// writes `GE`, then `T / HTTP/1.1`, is still seen).
    foreign_unsure: bool,
    /// The MTA's last reply ends its side: `221` to `QUIT`, or a `421`.
    upstream_closing: bool,
    /// The MTA's answer to a greeting (EHLO, LHLO, HELO) went through the
    /// tracker, so [`Offered::upstream_chunking`] is known. Not when the
    /// client's EHLO went early (PIPECONNECT, with the pregreet test only
    /// observed or tagging): the MTA's offer is then unknown, and its
    /// BDAT is forwarded as before.
    greeted: bool,
    /// The current line's first read ended inside its verb (`MA`, then
    /// `IL FROM:…`): its [`Event::Turn`], with the gap measured at that
    /// first byte, waits for the verb to be whole.
    turn_gap: Option<Duration>,
}

impl TurnTracker {
    /// Starts tracking right after the final greeting line went out at
    /// `now`.
    pub fn new(cfg: TrackerConfig, now: Instant) -> Self {
        Self {
            cfg,
            client: ClientState::Command,
            line: Vec::new(),
            line_overflow: false,
            held: Vec::new(),
            replies: ReplyReader::new(64 * 1024),
            pending: VecDeque::new(),
            out_client: VecDeque::new(),
            to_upstream: Vec::new(),
            upstream_sent: 0,
            diverted: Vec::new(),
            diverting: false,
            tagged: false,
            in_bdat: false,
            bdat_messages: 0,
            offered: Offered::default(),
            disposition: Disposition::Pass,
            tarpit: Duration::ZERO,
            envelope: Envelope::default(),
            unknown: 0,
            last_reply_at: now,
            last_release: now,
            events: VecDeque::new(),
            reported: 0,
            blind: false,
            paused: false,
            held_mail: None,
            turn_checked: false,
            foreign_unsure: false,
            upstream_closing: false,
            greeted: false,
            turn_gap: None,
        }
    }

    /// Waiting for [`TurnTracker::proceed`] after a violation.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The caller applied its policy to the reported violations: read on.
    pub fn proceed(&mut self, now: Instant) {
        if !self.paused {
            return;
        }
        self.paused = false;
        if let Some(line) = self.held_mail.take() {
            let arg = envelope_address(&line);
            self.to_upstream.extend_from_slice(&line);
            self.pending.push_back(Pending {
                arg,
                ..Pending::of(Turn::Command(Verb::Mail))
            });
        }
        if !self.held.is_empty() && !self.waits_for_reply() {
            let held = std::mem::take(&mut self.held);
            self.process(now, &held);
        }
    }

    /// Answers the held MAIL with `reply` (say, `451 4.7.1` for a sender
    /// over its limit) instead of passing it on; the MTA never sees it.
    /// Then reads on, as [`TurnTracker::proceed`].
    pub fn refuse_mail(&mut self, now: Instant, reply: Vec<u8>) {
        if self.held_mail.take().is_some() {
            self.local_reply(now, reply, Turn::Command(Verb::Mail));
        }
        self.proceed(now);
    }

    fn waits_for_reply(&self) -> bool {
        matches!(
            self.client,
            ClientState::AwaitReply(_) | ClientState::AwaitDivert | ClientState::AwaitPending
        )
    }

    /// The MTA still owes a reply the client waits for.
    fn upstream_owes(&self) -> bool {
        self.pending.iter().any(Pending::is_upstream)
    }

    /// Our own reply to `turn`, in its place after the MTA's owed replies.
    fn local_reply(&mut self, now: Instant, bytes: Vec<u8>, turn: Turn) {
        if self.upstream_owes() {
            self.pending.push_back(Pending {
                local: Some(bytes),
                ..Pending::of(turn)
            });
        } else {
            self.queue_reply(now, bytes, turn, false);
        }
    }

    /// Releases our own replies that have come to the front.
    fn release_locals(&mut self, now: Instant) {
        while self.pending.front().is_some_and(|p| p.local.is_some()) {
            if let Some(Pending {
                turn,
                local: Some(bytes),
                ..
            }) = self.pending.pop_front()
            {
                self.queue_reply(now, bytes, turn, false);
            }
        }
    }

    /// What happens to the mail from here on. A message already started
    /// (its DATA or first BDAT forwarded, or being diverted) keeps its
    /// fate: the change takes effect at the next message.
    pub fn set_disposition(&mut self, disposition: Disposition) {
        self.disposition = disposition;
    }

    pub fn disposition(&self) -> &Disposition {
        &self.disposition
    }

    /// Slows every reply from now on by `extra` (tarpit).
    pub fn set_tarpit(&mut self, extra: Duration) {
        self.tarpit = extra;
    }

    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// What the client was offered in the last EHLO reply it got.
    pub fn offered(&self) -> Offered {
        self.offered
    }

    /// The stream is TLS now; relay it blind.
    pub fn is_blind(&self) -> bool {
        self.blind
    }

    /// The MTA's last reply was one after which an SMTP server closes the
    /// connection (`221` to `QUIT`, or a `421`) and nothing sent since
    /// waits for its answer: its end of stream is due.
    pub fn upstream_closing(&self) -> bool {
        self.upstream_closing && self.pending.is_empty()
    }

    /// A message is in flight (DATA body or BDAT chunks): cutting the
    /// upstream connection now makes the MTA drop it.
    pub fn in_message(&self) -> bool {
        matches!(
            self.client,
            ClientState::Body(_) | ClientState::Chunk { .. } | ClientState::AwaitDivert
        )
    }

    /// Nothing is owed either way: no reply pending or held, no bytes
    /// waiting to be written.
    pub fn is_quiet(&self) -> bool {
        self.pending.is_empty()
            && self.out_client.is_empty()
            && self.upstream_output().is_empty()
            && self.held.is_empty()
    }

    /// Client input taken but not yet passed on: bytes held until a reply
    /// or the caller's word (after a violation, behind a DATA or an EHLO,
    /// a BDAT waiting for the MTA's verdict on its recipients), a held
    /// MAIL, a diverted message not yet stored (our RSET follows it), a
    /// diverted DATA waiting for earlier replies (it may go on as DATA).
    /// While this holds, more may go to the upstream with no more bytes
    /// from the client: a client's end of stream is passed on to the
    /// upstream only once this is false and
    /// [`upstream_output`](Self::upstream_output) is empty.
    pub fn holds_client_bytes(&self) -> bool {
        !self.held.is_empty()
            || self.held_mail.is_some()
            || matches!(
                self.client,
                ClientState::AwaitDivert | ClientState::AwaitPending
            )
            || (self.diverting
                && matches!(
                    self.client,
                    ClientState::AwaitReply(Turn::Command(Verb::Data))
                ))
    }

    /// Whether the daemon should read more from the client.
    pub fn wants_client_input(&self) -> bool {
        !matches!(self.client, ClientState::Blind | ClientState::Stopped)
            && self.held.len() < self.cfg.max_held
            && self.upstream_output().len() < self.cfg.max_held * 4
            && self.pending.len() + self.out_client.len() < MAX_OWED
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes to write to the upstream.
    pub fn upstream_output(&self) -> &[u8] {
        &self.to_upstream[self.upstream_sent..]
    }

    /// `n` bytes of [`upstream_output`](Self::upstream_output) were written.
    pub fn upstream_written(&mut self, n: usize) {
        self.upstream_sent += n;
        debug_assert!(self.upstream_sent <= self.to_upstream.len());
        if self.upstream_sent >= self.to_upstream.len() {
            self.to_upstream.clear();
            self.upstream_sent = 0;
        }
    }

    /// The reply bytes that may go to the client at `now`, if any.
    pub fn client_output(&self, now: Instant) -> Option<&[u8]> {
        let first = self.out_client.front()?;
        (first.release_at <= now).then(|| &first.bytes[first.sent..])
    }

    /// `n` bytes of [`client_output`](Self::client_output) were written at
    /// `now`.
    pub fn client_written(&mut self, now: Instant, n: usize) {
        let Some(first) = self.out_client.front_mut() else {
            return;
        };
        first.sent += n;
        debug_assert!(first.sent <= first.bytes.len());
        if first.sent < first.bytes.len() {
            return;
        }
        self.last_reply_at = now;
        if let Some(done) = self.out_client.pop_front() {
            if done.then_blind {
                self.blind = true;
                self.client = ClientState::Blind;
                self.events.push_back(Event::Blind);
            }
            // Its buffer reads the next reply.
            self.replies.recycle(done.bytes);
        }
    }

    /// Replies queued for the client, due or held back.
    pub fn replies_queued(&self) -> usize {
        self.out_client.len()
    }

    /// When a held reply becomes due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.out_client.front().map(|o| o.release_at)
    }

    /// Content of a diverted message so far (unstuffed, CRLF lines).
    pub fn take_diverted(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.diverted)
    }

    /// The caller stored (or dropped) the diverted message; `reply` is what
    /// the client gets for it (`250 ...`, or a `4xx` if storing failed).
    /// The MTA gets `RSET` so its transaction is cleared.
    pub fn divert_done(&mut self, now: Instant, reply: Vec<u8>) {
        if !matches!(self.client, ClientState::AwaitDivert) {
            return;
        }
        self.diverting = false;
        self.in_bdat = false;
        self.local_reply(now, reply, Turn::EndOfData);
        // The MTA's transaction (MAIL, RCPT) is cleared; its reply is ours.
        self.to_upstream.extend_from_slice(b"RSET\r\n");
        self.pending.push_back(Pending::of(Turn::InternalRset));
        self.envelope.mail_from = None;
        self.envelope.rcpt_to.clear();
        self.tagged = false;
        self.client = ClientState::Command;
        self.resume(now);
    }

    /// Client bytes arrived at `now`.
    pub fn on_client(&mut self, now: Instant, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.paused {
            self.held.extend_from_slice(data);
            return;
        }
        // Room for all of it at once: commands grown from nothing a few
        // bytes at a time took ~8 reallocations a session, and a body's
        // lines, copied one by one, three more (256 to 2,048 bytes for a
        // 1 KB message).
        self.to_upstream.reserve(data.len().max(UPSTREAM_FIRST));
        self.process(now, data);
    }

    /// Bytes that came while the reply to `turn` was awaited.
    fn early_bytes(&mut self, turn: Turn, data: &[u8]) {
        match turn {
            Turn::Command(Verb::Data) => self.violation(Violation::DataBeforeReply),
            turn if turn.ends_group() => {
                let verb = Verb::parse(data);
                self.violation(Violation::Pipelining {
                    verb,
                    waiting_for: turn.verb(),
                });
            }
            _ => {}
        }
    }

    /// Reads client bytes in the current state until they run out or the
    /// state says to hold them.
    fn process(&mut self, now: Instant, mut data: &[u8]) {
        while !data.is_empty() {
            if self.paused {
                // Keep the rest, in order, ahead of anything held later.
                let mut rest = data.to_vec();
                rest.append(&mut self.held);
                self.held = rest;
                return;
            }
            let used = match &mut self.client {
                ClientState::Command | ClientState::SaslLine => self.command_bytes(now, data),
                ClientState::Body(_) => self.body_bytes(data),
                ClientState::Chunk { .. } => self.chunk_bytes(data),
                ClientState::AwaitPending => {
                    self.held.extend_from_slice(data);
                    data.len()
                }
                ClientState::AwaitReply(_) | ClientState::AwaitDivert => {
                    if self.held.is_empty() {
                        let turn = match &self.client {
                            ClientState::AwaitReply(turn) => *turn,
                            _ => Turn::EndOfData,
                        };
                        self.early_bytes(turn, data);
                    }
                    self.held.extend_from_slice(data);
                    data.len()
                }
                ClientState::AwaitTls => {
                    self.violation(Violation::StartTlsInjection { bytes: data.len() });
                    data.len()
                }
                ClientState::Blind | ClientState::Stopped => data.len(),
            };
            data = &data[used..];
        }
    }

    /// Reads (part of) a command line; returns bytes used.
    fn command_bytes(&mut self, now: Instant, data: &[u8]) -> usize {
        if self.line.is_empty() && !self.line_overflow && !self.turn_checked {
            self.turn_checked = true;
            self.turn_starts(now, data);
            if self.paused {
                return 0;
            }
        }
        let (take, complete) = match memchr::memchr(b'\n', data) {
            Some(lf) => (lf + 1, true),
            None => (data.len(), false),
        };
        if self.line_overflow {
            // Past the limit: pass the rest of the line on untouched, the
            // MTA answers it (and the test already fired).
            self.to_upstream.extend_from_slice(&data[..take]);
            if complete {
                self.line_overflow = false;
                self.turn_checked = false;
                if matches!(self.client, ClientState::SaslLine) {
                    self.pending.push_back(Pending::of(Turn::SaslResponse));
                    self.client = ClientState::AwaitReply(Turn::Command(Verb::Auth));
                } else {
                    self.pending
                        .push_back(Pending::of(Turn::Command(Verb::Unknown)));
                }
            }
            return take;
        }
        if self.foreign_unsure && self.split_line_is_foreign(&data[..take], complete) {
            // Held, with the rest, until the caller has applied its policy.
            return 0;
        }
        self.line.extend_from_slice(&data[..take]);
        // RFC 4954 §4: a SASL response line may be up to 12288 octets.
        let limit = if matches!(self.client, ClientState::SaslLine) {
            self.cfg.max_command_line.max(12_288)
        } else {
            self.cfg.max_command_line
        };
        if !complete {
            if self.line.len() > limit {
                self.violation(Violation::LongLine {
                    len: self.line.len(),
                });
                let line = std::mem::take(&mut self.line);
                self.turn_read(&line);
                self.line = line;
                self.to_upstream.append(&mut self.line);
                self.line_overflow = true;
            }
            return take;
        }
        if self.line.len() > limit {
            self.violation(Violation::LongLine {
                len: self.line.len(),
            });
        }
        let line = std::mem::take(&mut self.line);
        self.turn_checked = false;
        self.command(now, line);
        take
    }

    /// The first byte of a command arrived: is it its turn?
    fn turn_starts(&mut self, now: Instant, data: &[u8]) {
        match foreign(data) {
            Some(kind) => {
                self.foreign_unsure = false;
                self.foreign_violation(kind, data);
            }
            None => {
                self.foreign_unsure =
                    data.len() < FOREIGN_NEEDS && memchr::memchr(b'\n', data).is_none();
            }
        }
        let sasl = matches!(self.client, ClientState::SaslLine);
        let verb = if sasl { Verb::Auth } else { Verb::parse(data) };
        if let Some(waiting_for) = self.waiting_for() {
            self.violation(Violation::Pipelining { verb, waiting_for });
        }
        if sasl {
            return;
        }
        let gap = now.saturating_duration_since(self.last_reply_at);
        if verb_is_whole(data) {
            self.events.push_back(Event::Turn { verb, gap });
        } else {
            self.turn_gap = Some(gap);
        }
    }

    /// More of a line whose first read was too short for [`foreign`]:
    /// whether its start, now longer, is not SMTP (reported, and the
    /// tracker paused before these bytes are taken).
    fn split_line_is_foreign(&mut self, more: &[u8], complete: bool) -> bool {
        let mut start = [0u8; FOREIGN_NEEDS];
        let old = self.line.len().min(FOREIGN_NEEDS);
        start[..old].copy_from_slice(&self.line[..old]);
        let new = more.len().min(FOREIGN_NEEDS - old);
        start[old..old + new].copy_from_slice(&more[..new]);
        let start = &start[..old + new];
        if complete || start.len() == FOREIGN_NEEDS {
            self.foreign_unsure = false;
        }
        match foreign(start) {
            Some(kind) => {
                self.foreign_unsure = false;
                // Shown as a line read whole is: its first 64 bytes.
                let mut shown = self.line.clone();
                shown.extend_from_slice(&more[..more.len().min(64)]);
                self.foreign_violation(kind, &shown);
                self.paused
            }
            None => false,
        }
    }

    fn foreign_violation(&mut self, kind: Foreign, first_bytes: &[u8]) {
        match kind {
            Foreign::Http => self.violation(Violation::NonSmtp {
                first_bytes: escape_capped(first_bytes, 64),
            }),
            Foreign::TlsHandshake => self.violation(Violation::TlsHandshake),
        }
    }

    /// The unanswered step the client should have waited for, if any: a
    /// group-ender, or any step when PIPELINING was not offered.
    fn waiting_for(&self) -> Option<Verb> {
        let strict = !self.offered.pipelining;
        let owed = |turn: Turn| turn != Turn::InternalRset && (strict || turn.ends_group());
        self.pending
            .iter()
            .map(|p| p.turn)
            .chain(self.out_client.iter().map(|o| o.turn))
            .find(|t| owed(*t))
            .map(Turn::verb)
    }

    /// A command line's buffer, done with, becomes the next line's (one
    /// allocation per session instead of one per command); a long one (a
    /// SASL response) is let go.
    fn recycle_line(&mut self, mut line: Vec<u8>) {
        if self.line.capacity() == 0 && line.capacity() <= LINE_KEEP {
            line.clear();
            self.line = line;
        }
    }

    /// The verb of a line whose first read was too short to name it is
    /// whole now: its turn is reported.
    fn turn_read(&mut self, line: &[u8]) {
        if let Some(gap) = self.turn_gap.take() {
            self.events.push_back(Event::Turn {
                verb: Verb::parse(line),
                gap,
            });
        }
    }

    /// A whole command line.
    fn command(&mut self, now: Instant, line: Vec<u8>) {
        self.turn_read(&line);
        if matches!(self.client, ClientState::SaslLine) {
            self.to_upstream.extend_from_slice(&line);
            self.recycle_line(line);
            self.pending.push_back(Pending::of(Turn::SaslResponse));
            self.client = ClientState::AwaitReply(Turn::Command(Verb::Auth));
            return;
        }
        if !line.ends_with(b"\r\n") {
            self.violation(Violation::BareLf);
        }
        let verb = Verb::parse(&line);
        if verb == Verb::Unknown {
            self.unknown += 1;
            if self.unknown == self.cfg.unknown_command_limit.max(1) {
                self.violation(Violation::UnknownCommands {
                    count: self.unknown,
                });
            }
        }
        if self.diverting && self.in_bdat {
            // A diverted BDAT message is open: the MTA never saw it.
            match verb {
                Verb::Bdat => {
                    self.bdat(now, line);
                    return;
                }
                Verb::Rset | Verb::Quit => self.abort_divert(),
                // EHLO ends the message only if the MTA takes it (its reply).
                // The MTA's transaction stands at its recipients: DATA or
                // another RCPT would find it open where the client's is not.
                Verb::Data | Verb::Rcpt => {
                    self.local_reply(now, BDAT_BUSY.to_vec(), Turn::Command(verb));
                    return;
                }
                // Anything else the MTA answers as it would mid-BDAT (MAIL:
                // nested; NOOP, VRFY, unknown verbs: as usual).
                _ => {}
            }
        }
        let mut arg = None;
        match verb {
            Verb::Ehlo | Verb::Helo | Verb::Lhlo => {
                let name = line.trim_ascii_start().get(5..).unwrap_or_default();
                arg = Some(String::from_utf8_lossy(name).trim().to_string());
                if !self.in_bdat {
                    self.tagged = false;
                }
            }
            Verb::Mail if self.cfg.hold_mail && !self.in_bdat => {
                self.tagged = false;
                let sender = envelope_address(&line).unwrap_or_default();
                self.held_mail = Some(line);
                self.events.push_back(Event::MailFrom(sender));
                self.paused = true;
                return;
            }
            Verb::Mail => {
                arg = envelope_address(&line);
                // A new transaction gets its own tag; a MAIL inside an open
                // BDAT message is nested, refused by the MTA, and changes
                // nothing.
                if !self.in_bdat {
                    self.tagged = false;
                }
            }
            Verb::Rcpt => arg = envelope_address(&line),
            Verb::Rset => {
                self.tagged = false;
                self.in_bdat = false;
            }
            Verb::StartTls if self.disposition.needs_sight() => {
                // A suspect session must stay in sight: no TLS.
                self.local_reply(
                    now,
                    b"454 4.7.0 TLS not available\r\n".to_vec(),
                    Turn::Command(verb),
                );
                return;
            }
            // A message's fate is decided where it starts (DATA, or its
            // first BDAT): the MTA holds this BDAT message's first chunks, so
            // it ends there. A diverted DATA message beside it would leave it
            // to our RSET. RFC 3030 §2: DATA does not mix with BDAT (503).
            Verb::Data if self.in_bdat && self.disposition.diverts() => {
                self.local_reply(now, BDAT_BUSY.to_vec(), Turn::Command(verb));
                return;
            }
            Verb::Data if self.disposition.diverts() => {
                self.client = ClientState::AwaitReply(Turn::Command(Verb::Data));
                self.diverting = true;
                self.try_divert(now);
                return;
            }
            Verb::Bdat => {
                self.bdat(now, line);
                return;
            }
            _ => {}
        }
        self.to_upstream.extend_from_slice(&line);
        self.recycle_line(line);
        self.pending.push_back(Pending {
            arg,
            ..Pending::of(Turn::Command(verb))
        });
        match verb {
            // Inside a BDAT message, EHLO ends it only if the MTA takes it
            // (a refused one, `501` to a bare EHLO, leaves the transaction
            // as it was): what follows waits for its reply. EHLO ends a
            // pipeline group (RFC 2920), so a polite client waits anyway.
            Verb::Ehlo | Verb::Helo | Verb::Lhlo if self.in_bdat => {
                self.client = ClientState::AwaitReply(Turn::Command(verb));
            }
            Verb::Data => self.client = ClientState::AwaitReply(Turn::Command(Verb::Data)),
            Verb::Auth => self.client = ClientState::AwaitReply(Turn::Command(Verb::Auth)),
            Verb::StartTls => self.client = ClientState::AwaitTls,
            _ => {}
        }
    }

    /// DATA in a diverting session: once every earlier reply is in, either
    /// take the message ourselves (some recipient was accepted) or let the
    /// MTA refuse the DATA.
    fn try_divert(&mut self, now: Instant) {
        if self.upstream_owes() {
            return;
        }
        if self.envelope.rcpt_to.is_empty() {
            self.diverting = false;
            self.to_upstream.extend_from_slice(b"DATA\r\n");
            self.pending
                .push_back(Pending::of(Turn::Command(Verb::Data)));
            return;
        }
        self.local_reply(
            now,
            b"354 End data with <CR><LF>.<CR><LF>\r\n".to_vec(),
            Turn::Command(Verb::Data),
        );
        self.events.push_back(Event::DivertStarted);
        self.client = ClientState::Body(Box::new(BodyScanner::new(self.cfg.smuggling)));
        self.resume(now);
    }

    /// `BDAT n [LAST]`: forwarded (with the tag header added to the first
    /// chunk when tagging), or diverted.
    fn bdat(&mut self, now: Instant, line: Vec<u8>) {
        if self.greeted && !self.offered.upstream_chunking {
            self.local_reply(now, BDAT_NOT_OFFERED.to_vec(), Turn::Command(Verb::Bdat));
            return;
        }
        let Some((size, last)) = parse_bdat(&line) else {
            // Malformed: the MTA answers it; nothing follows it.
            self.to_upstream.extend_from_slice(&line);
            self.pending
                .push_back(Pending::of(Turn::Command(Verb::Bdat)));
            return;
        };
        // Only a new message is diverted: one whose first chunks the MTA
        // holds ends at the MTA, as a DATA body in flight does when the
        // disposition changes. Diverting the rest stored a fragment, and our
        // RSET after it dropped the MTA's part of a message the client was
        // told 250 for.
        if self.disposition.diverts() && !self.diverting && !self.in_bdat {
            if self.upstream_owes() {
                // Which recipients were accepted decides what this chunk
                // means: wait for the MTA's replies, holding the line.
                let mut held = line;
                held.append(&mut self.held);
                self.held = held;
                self.client = ClientState::AwaitPending;
                return;
            }
            if !self.envelope.rcpt_to.is_empty() {
                self.diverting = true;
                self.in_bdat = true;
                self.events.push_back(Event::DivertStarted);
            }
        }
        if self.diverting {
            if !last {
                self.local_reply(
                    now,
                    format!("250 2.0.0 {size} octets received\r\n").into_bytes(),
                    Turn::Chunk { last },
                );
            }
            self.client = ClientState::Chunk {
                remaining: size,
                last,
            };
            if size == 0 {
                self.chunk_done(last);
            }
            return;
        }
        let first = !self.in_bdat;
        let header = match &self.disposition {
            Disposition::Tag(header) if first && !self.tagged => Some(header.clone()),
            _ => None,
        };
        let tagged_size = match &header {
            Some(header) => match size.checked_add(header.len() as u64) {
                Some(n) => n,
                None => {
                    // Not forwarded: what follows is commands to both.
                    self.local_reply(now, BDAT_TOO_BIG.to_vec(), Turn::Command(Verb::Bdat));
                    return;
                }
            },
            None => size,
        };
        self.in_bdat = true;
        if first {
            self.bdat_messages += 1;
        }
        match header {
            Some(header) => {
                self.tagged = true;
                let rewritten = format!(
                    "BDAT {}{}\r\n",
                    tagged_size,
                    if last { " LAST" } else { "" }
                );
                self.forward_chunk_command(rewritten.as_bytes(), last);
                self.to_upstream.extend_from_slice(&header);
            }
            None => self.forward_chunk_command(&line, last),
        }
        self.client = ClientState::Chunk {
            remaining: size,
            last,
        };
        if size == 0 {
            self.chunk_done(last);
        }
    }

    /// A BDAT chunk is complete.
    fn chunk_done(&mut self, last: bool) {
        if self.diverting && last {
            self.events.push_back(Event::DivertFinished);
            self.client = ClientState::AwaitDivert;
            return;
        }
        if last {
            self.tagged = false;
            self.in_bdat = false;
        }
        self.client = ClientState::Command;
    }

    /// The MTA took an EHLO sent inside a BDAT message: the message is
    /// gone there, and a diverted one is abandoned.
    fn bdat_reset(&mut self) {
        if self.diverting {
            self.abort_divert();
        }
        self.in_bdat = false;
        self.tagged = false;
    }

    /// Drops a diverted message the client abandoned (RSET, QUIT, an EHLO
    /// the MTA took, in the middle of its chunks).
    fn abort_divert(&mut self) {
        self.diverting = false;
        self.in_bdat = false;
        self.tagged = false;
        self.diverted.clear();
        self.events.push_back(Event::DivertAborted);
    }

    fn forward_chunk_command(&mut self, line: &[u8], last: bool) {
        self.to_upstream.extend_from_slice(line);
        self.pending.push_back(Pending {
            message: self.bdat_messages,
            ..Pending::of(Turn::Chunk { last })
        });
    }

    fn chunk_bytes(&mut self, data: &[u8]) -> usize {
        let ClientState::Chunk { remaining, last } = &mut self.client else {
            return 0;
        };
        let take = data
            .len()
            .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
        *remaining -= take as u64;
        let (done, last) = (*remaining == 0, *last);
        if self.diverting {
            self.diverted.extend_from_slice(&data[..take]);
        } else {
            self.to_upstream.extend_from_slice(&data[..take]);
        }
        if done {
            self.chunk_done(last);
        }
        take
    }

    fn body_bytes(&mut self, data: &[u8]) -> usize {
        let ClientState::Body(scanner) = &mut self.client else {
            return 0;
        };
        let diverting = self.diverting;
        let scan = if diverting {
            let mut discard = Vec::new();
            scanner.feed(data, &mut discard, Some(&mut self.diverted))
        } else {
            scanner.feed(data, &mut self.to_upstream, None)
        };
        if let Some(seq) = scan.smuggling {
            self.violation(Violation::Smuggling(seq));
            if self.cfg.smuggling == SmugglingPolicy::Reject {
                self.client = ClientState::Stopped;
                return data.len();
            }
        }
        if scan.ended {
            if diverting {
                self.events.push_back(Event::DivertFinished);
                self.client = ClientState::AwaitDivert;
            } else {
                self.pending.push_back(Pending::of(Turn::EndOfData));
                self.tagged = false;
                self.client = ClientState::Command;
            }
        }
        scan.consumed
    }

    /// Upstream bytes arrived at `now`. An error means the upstream does not
    /// speak SMTP: the caller ends the session with a tempfail.
    pub fn on_upstream(&mut self, now: Instant, data: &[u8]) -> Result<(), ReplyError> {
        let mut input = data;
        loop {
            let Some(reply) = self.replies.push(input)? else {
                return Ok(());
            };
            input = &[];
            self.reply(now, reply.code, reply.raw);
        }
    }

    fn reply(&mut self, now: Instant, code: u16, raw: Vec<u8>) {
        self.release_locals(now);
        let answers_quit = matches!(
            self.pending.front(),
            Some(p) if matches!(p.turn, Turn::Command(Verb::Quit))
        );
        self.upstream_closing = code == 421 || (code == 221 && answers_quit);
        let Some(pending) = self.pending.pop_front() else {
            // Unsolicited (a 421 before closing): pass it on.
            self.queue_reply(now, raw, Turn::Command(Verb::Quit), false);
            return;
        };
        let positive = (200..400).contains(&code);
        let mut bytes = raw;
        let mut then_blind = false;
        let greeting = |t: Turn| matches!(t, Turn::Command(Verb::Ehlo | Verb::Helo | Verb::Lhlo));
        // The reply to the EHLO sent inside a BDAT message (the last one
        // owed: an earlier, pipelined one answers nothing about it).
        if greeting(pending.turn)
            && !self.pending.iter().any(|p| greeting(p.turn))
            && matches!(self.client, ClientState::AwaitReply(t) if t == pending.turn)
        {
            self.client = ClientState::Command;
            if positive {
                self.bdat_reset();
            }
        }
        match pending.turn {
            Turn::InternalRset => {
                // Our RSET after a diverted message: not the client's.
                return;
            }
            Turn::Command(Verb::Ehlo | Verb::Lhlo) if code == 250 => {
                let edit = EhloEdit {
                    pipelining: self.cfg.strip_pipelining,
                    starttls: self.disposition.needs_sight(),
                    chunking: self.disposition.needs_sight(),
                };
                let (edited, offered) = edit_ehlo_reply(&bytes, edit);
                bytes = edited;
                self.offered = offered;
                self.greeted = true;
                self.envelope = Envelope {
                    helo: pending.arg,
                    ..Envelope::default()
                };
            }
            // PRDR: the end of a message is answered by 353, then a reply
            // per accepted recipient, then a final one. They all answer the
            // same turn; none answers a later, pipelined command.
            Turn::EndOfData | Turn::Chunk { last: true } if code == 353 => {
                for _ in 0..=self.envelope.rcpt_to.len() {
                    self.pending.push_front(Pending::of(Turn::PrdrPart));
                }
            }
            Turn::Command(Verb::Helo) if code == 250 => {
                self.offered = Offered::default();
                self.greeted = true;
                self.envelope = Envelope {
                    helo: pending.arg,
                    ..Envelope::default()
                };
            }
            Turn::Command(Verb::Mail) if positive => {
                self.envelope.mail_from = pending.arg;
                self.envelope.rcpt_to.clear();
            }
            Turn::Command(Verb::Rset) if positive => {
                self.envelope.mail_from = None;
                self.envelope.rcpt_to.clear();
            }
            // RFC 3030 §2: after a failed chunk the transaction is over.
            // The `554` to the end of an earlier message may come in once
            // the client opened the next: that one stays open.
            Turn::Chunk { .. } if !positive && pending.message == self.bdat_messages => {
                self.in_bdat = false;
                self.tagged = false;
            }
            Turn::Command(Verb::Rcpt) if positive => {
                if let Some(rcpt) = pending.arg {
                    self.envelope.rcpt_to.push(rcpt);
                }
            }
            Turn::Command(Verb::StartTls) => {
                if code == 220 {
                    then_blind = true;
                } else {
                    self.client = ClientState::Command;
                }
            }
            Turn::Command(Verb::Data) => {
                if code == 354 {
                    let mut scanner = BodyScanner::new(self.cfg.smuggling);
                    if let Disposition::Tag(header) = &self.disposition {
                        if !self.tagged {
                            self.tagged = true;
                            // The header is a line of its own at the very top:
                            // no dot-stuffing needed (it starts with `X`).
                            let mut wire = Vec::new();
                            let _ = scanner.feed(header, &mut wire, None);
                            self.to_upstream.extend_from_slice(&wire);
                        }
                    }
                    self.client = ClientState::Body(Box::new(scanner));
                } else {
                    self.client = ClientState::Command;
                }
            }
            Turn::Command(Verb::Auth) | Turn::SaslResponse => {
                if code == 334 {
                    self.client = ClientState::SaslLine;
                } else {
                    if code == 235 {
                        self.events.push_back(Event::Authenticated);
                    }
                    self.client = ClientState::Command;
                }
            }
            _ => {}
        }
        self.queue_reply(now, bytes, pending.turn, then_blind);
        self.release_locals(now);
        self.resume(now);
    }

    /// Reads held client bytes if the state allows it now.
    fn resume(&mut self, now: Instant) {
        if matches!(self.client, ClientState::AwaitPending) && !self.upstream_owes() {
            self.client = ClientState::Command;
        }
        if matches!(
            self.client,
            ClientState::AwaitReply(Turn::Command(Verb::Data))
        ) && self.diverting
        {
            self.try_divert(now);
            return;
        }
        if self.paused || self.waits_for_reply() || self.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        self.process(now, &held);
    }

    fn queue_reply(&mut self, now: Instant, bytes: Vec<u8>, turn: Turn, then_blind: bool) {
        let delay = (self.cfg.delays.for_turn(turn) + self.tarpit).min(max_hold(turn));
        // A later reply never overtakes an earlier held one.
        let release_at = (now + delay).max(self.last_release);
        self.last_release = release_at;
        self.out_client.push_back(Outgoing {
            bytes,
            sent: 0,
            release_at,
            turn,
            then_blind,
        });
    }

    /// Reports each kind of violation once per session.
    fn violation(&mut self, v: Violation) {
        let bit = Violation::TESTS
            .iter()
            .position(|t| *t == v.test())
            .map_or(0, |i| 1u16 << i);
        if self.reported & bit != 0 {
            return;
        }
        self.reported |= bit;
        self.paused = true;
        self.events.push_back(Event::Violation(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EHLO_REPLY: &[u8] =
        b"250-mx.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250-CHUNKING\r\n250 8BITMIME\r\n";

    /// A client, the tracker and an MTA, on a fake clock.
    struct Sim {
        t: TurnTracker,
        now: Instant,
        /// Everything the MTA received.
        mta: Vec<u8>,
        /// Everything the client received.
        client: Vec<u8>,
        events: Vec<Event>,
        /// With `hold_mail`: our answer to every held MAIL (None: pass it).
        refuse_mail: Option<Vec<u8>>,
    }

    impl Sim {
        fn new(cfg: TrackerConfig) -> Self {
            let now = Instant::now();
            Self {
                t: TurnTracker::new(cfg, now),
                now,
                mta: Vec::new(),
                client: Vec::new(),
                events: Vec::new(),
                refuse_mail: None,
            }
        }

        fn after(&mut self, ms: u64) -> &mut Self {
            self.now += Duration::from_millis(ms);
            self.flush();
            self
        }

        fn flush(&mut self) {
            let up = self.t.upstream_output().to_vec();
            self.t.upstream_written(up.len());
            self.mta.extend_from_slice(&up);
            while let Some(out) = self.t.client_output(self.now) {
                let out = out.to_vec();
                self.t.client_written(self.now, out.len());
                self.client.extend_from_slice(&out);
            }
            while let Some(e) = self.t.poll_event() {
                self.events.push(e);
            }
            if self.t.is_paused() {
                let held_mail = matches!(self.events.last(), Some(Event::MailFrom(_)));
                match &self.refuse_mail {
                    Some(reply) if held_mail => self.t.refuse_mail(self.now, reply.clone()),
                    _ => self.t.proceed(self.now),
                }
                self.flush();
            }
        }

        fn client_sends(&mut self, bytes: &[u8]) -> &mut Self {
            self.t.on_client(self.now, bytes);
            self.flush();
            self
        }

        fn mta_says(&mut self, bytes: &[u8]) -> &mut Self {
            self.t.on_upstream(self.now, bytes).unwrap();
            self.flush();
            self
        }

        fn violations(&self) -> Vec<&'static str> {
            self.events
                .iter()
                .filter_map(|e| match e {
                    Event::Violation(v) => Some(v.test()),
                    _ => None,
                })
                .collect()
        }

        fn take_mta(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.mta)
        }

        fn take_client(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.client)
        }

        /// EHLO and its reply, the polite way.
        fn ehlo(&mut self) -> &mut Self {
            self.client_sends(b"EHLO client.example\r\n")
                .mta_says(EHLO_REPLY);
            self.take_mta();
            self.take_client();
            self
        }
    }

    #[test]
    fn legal_pipelining_passes_without_a_violation_and_bytes_are_untouched() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        let group = b"MAIL FROM:<a@client.example>\r\nRCPT TO:<b@mx.example>\r\nRCPT TO:<c@mx.example>\r\nDATA\r\n";
        s.client_sends(group);
        assert_eq!(s.take_mta(), group);
        s.mta_says(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no such user\r\n354 go\r\n");
        assert_eq!(
            s.take_client(),
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no such user\r\n354 go\r\n"
        );
        let body = b"Subject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n";
        s.client_sends(body);
        assert_eq!(s.take_mta(), body);
        assert!(s.violations().is_empty(), "{:?}", s.events);
        assert_eq!(s.t.envelope().rcpt_to, vec!["b@mx.example".to_string()]);
        assert_eq!(
            s.t.envelope().mail_from.as_deref(),
            Some("a@client.example")
        );
    }

    #[test]
    fn without_pipelining_offered_every_command_must_wait() {
        let mut s = Sim::new(TrackerConfig {
            strip_pipelining: true,
            ..TrackerConfig::default()
        });
        s.ehlo();
        assert!(!s.t.offered().pipelining);
        s.client_sends(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
        assert_eq!(s.violations(), ["pipelining"]);
    }

    #[test]
    fn the_client_sees_no_pipelining_when_it_is_stripped() {
        let mut s = Sim::new(TrackerConfig {
            strip_pipelining: true,
            ..TrackerConfig::default()
        });
        s.client_sends(b"EHLO x\r\n").mta_says(EHLO_REPLY);
        assert_eq!(
            s.take_client(),
            b"250-mx.example\r\n250-STARTTLS\r\n250-CHUNKING\r\n250 8BITMIME\r\n"
        );
    }

    #[test]
    fn a_bot_firing_a_whole_transaction_is_caught() {
        let mut s = Sim::new(TrackerConfig::default());
        s.client_sends(b"EHLO bot\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nspam\r\n.\r\n");
        assert_eq!(s.violations(), ["pipelining", "early-data"]);
        match &s.events[1] {
            Event::Violation(Violation::Pipelining { verb, waiting_for }) => {
                assert_eq!((*verb, *waiting_for), (Verb::Mail, Verb::Ehlo));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn data_before_354_is_held_then_read_by_the_reply() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.client_sends(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
            .mta_says(b"250 ok\r\n250 ok\r\n");
        s.take_mta();
        s.client_sends(b"DATA\r\nSubject: early\r\n\r\nx\r\n.\r\n");
        assert_eq!(s.violations(), ["early-data"]);
        // Only DATA went on: the rest waits for the MTA's answer.
        assert_eq!(s.take_mta(), b"DATA\r\n");
        s.mta_says(b"354 go\r\n");
        assert_eq!(s.take_mta(), b"Subject: early\r\n\r\nx\r\n.\r\n");
    }

    #[test]
    fn held_bytes_are_commands_again_when_data_is_refused() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.client_sends(b"DATA\r\nQUIT\r\n");
        assert_eq!(s.take_mta(), b"DATA\r\n");
        s.mta_says(b"554 5.5.1 no valid recipients\r\n");
        assert_eq!(s.take_mta(), b"QUIT\r\n");
    }

    #[test]
    fn commands_injected_after_starttls_are_discarded_and_the_stream_goes_blind() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.client_sends(b"STARTTLS\r\nMAIL FROM:<injected@x>\r\n");
        assert_eq!(s.take_mta(), b"STARTTLS\r\n");
        assert_eq!(s.violations(), ["starttls-injection"]);
        s.mta_says(b"220 2.0.0 Ready to start TLS\r\n");
        assert!(s.t.is_blind());
        assert!(s.events.contains(&Event::Blind));
        assert!(s.t.upstream_output().is_empty());
    }

    #[test]
    fn a_polite_starttls_goes_blind_without_a_violation() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.client_sends(b"STARTTLS\r\n")
            .mta_says(b"220 go ahead\r\n");
        assert!(s.t.is_blind());
        assert!(s.violations().is_empty());
    }

    #[test]
    fn http_and_tls_on_the_command_port_are_named() {
        let mut s = Sim::new(TrackerConfig::default());
        s.client_sends(b"GET / HTTP/1.1\r\n");
        assert_eq!(s.violations(), ["non-smtp"]);
        let mut s = Sim::new(TrackerConfig::default());
        s.client_sends(b"CONNECT mx.example:25 HTTP/1.1\r\nHost: mx\r\n");
        assert!(s.violations().contains(&"non-smtp"));
        let mut s = Sim::new(TrackerConfig::default());
        s.client_sends(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03");
        assert_eq!(s.violations(), ["tls-on-plaintext"]);
    }

    /// A line's start split over reads (a byte at a time, even) is looked
    /// at again as it grows: the violation fires before the line goes on,
    /// and the whole line reaches the MTA once the caller proceeds.
    #[test]
    fn non_smtp_split_over_reads_is_still_named() {
        for (line, test) in [
            (&b"GET / HTTP/1.1\r\n"[..], "non-smtp"),
            (b"PROXY-CONNECTION: keep-alive\r\n", "non-smtp"),
            (b"\x16\x03\x01\x00\xa5\r\n", "tls-on-plaintext"),
        ] {
            for cut in 1..line.len() {
                let mut s = Sim::new(TrackerConfig::default());
                s.client_sends(&line[..cut]);
                s.client_sends(&line[cut..]);
                assert_eq!(s.violations(), [test], "{line:?} cut at {cut}");
                s.t.proceed(s.now);
                s.flush();
                assert_eq!(s.take_mta(), line, "{line:?} cut at {cut}");
            }
            let mut s = Sim::new(TrackerConfig::default());
            for b in line {
                s.client_sends(std::slice::from_ref(b));
                s.t.proceed(s.now);
            }
            s.flush();
            assert_eq!(s.violations(), [test], "{line:?} a byte at a time");
            assert_eq!(s.take_mta(), line, "{line:?} a byte at a time");
        }
        // SMTP split the same way is not foreign.
        let mut s = Sim::new(TrackerConfig::default());
        s.client_sends(b"EH").client_sends(b"LO c.example\r\n");
        assert!(s.violations().is_empty(), "{:?}", s.violations());
    }

    #[test]
    fn bare_lf_long_lines_and_unknown_verbs_are_noticed() {
        let mut s = Sim::new(TrackerConfig::default());
        s.client_sends(b"EHLO x\n");
        assert_eq!(s.violations(), ["bare-lf"]);

        let mut s = Sim::new(TrackerConfig::default());
        let mut long = b"EHLO ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 10_000));
        long.extend_from_slice(b"\r\n");
        for chunk in long.chunks(1000) {
            s.client_sends(chunk);
        }
        assert_eq!(s.violations(), ["long-line"]);
        assert_eq!(s.take_mta(), long, "the MTA still gets the line to answer");

        let mut s = Sim::new(TrackerConfig::default());
        s.client_sends(b"FOO\r\n").mta_says(b"502 no\r\n");
        s.client_sends(b"BAR\r\n").mta_says(b"502 no\r\n");
        assert!(s.violations().is_empty());
        s.client_sends(b"BAZ\r\n").mta_says(b"502 no\r\n");
        assert_eq!(s.violations(), ["unknown-commands"]);
    }

    #[test]
    fn a_smuggled_second_message_never_reaches_the_mta() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.client_sends(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
            .mta_says(b"250 ok\r\n250 ok\r\n354 go\r\n");
        s.take_mta();
        s.client_sends(
            b"Subject: one\r\n\r\nx\n.\nMAIL FROM:<ceo@bank>\r\nRCPT TO:<c@d>\r\nDATA\r\nforged\r\n.\r\n",
        );
        assert_eq!(s.violations(), ["smuggling"]);
        let mta = s.take_mta();
        assert!(
            !mta.windows(4).any(|w| w == b"MAIL"),
            "{:?}",
            String::from_utf8_lossy(&mta)
        );
        assert!(!s.t.wants_client_input());
    }

    #[test]
    fn normalised_smuggling_stays_inside_the_first_message() {
        let mut s = Sim::new(TrackerConfig {
            smuggling: SmugglingPolicy::Normalize,
            ..TrackerConfig::default()
        });
        s.ehlo();
        s.client_sends(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
            .mta_says(b"250 ok\r\n250 ok\r\n354 go\r\n");
        s.take_mta();
        s.client_sends(b"x\n.\nMAIL FROM:<ceo@bank>\r\n.\r\n");
        assert_eq!(s.take_mta(), b"x\r\n..\r\nMAIL FROM:<ceo@bank>\r\n.\r\n");
        assert_eq!(s.violations(), ["smuggling"]);
    }

    #[test]
    fn reply_delays_hold_replies_and_catch_the_impatient() {
        let mut s = Sim::new(TrackerConfig {
            delays: ReplyDelays {
                ehlo: Duration::from_millis(1000),
                ..ReplyDelays::default()
            },
            ..TrackerConfig::default()
        });
        s.client_sends(b"EHLO x\r\n").mta_says(EHLO_REPLY);
        assert!(s.take_client().is_empty(), "held back");
        assert_eq!(
            s.t.poll_timeout(),
            Some(s.now + Duration::from_millis(1000))
        );
        s.after(999);
        assert!(s.take_client().is_empty());
        s.client_sends(b"MAIL FROM:<a@b>\r\n");
        assert_eq!(s.violations(), ["pipelining"]);
        s.after(1);
        assert_eq!(s.take_client(), EHLO_REPLY);
    }

    /// The tarpit (up to 2m) and a reply delay (up to 1m) each stay
    /// within their own bound, but together they would hold the `354`
    /// past the 2 minutes a sender waits for it: their sum is held to half
    /// of each reply's RFC 5321 timeout.
    #[test]
    fn tarpit_and_reply_delay_together_stay_within_the_senders_timeout() {
        let minute = Duration::from_secs(60);
        let mut s = Sim::new(TrackerConfig {
            delays: ReplyDelays {
                rcpt: minute,
                data: minute,
                end_of_data: minute,
                ..ReplyDelays::default()
            },
            ..TrackerConfig::default()
        });
        s.ehlo();
        s.t.set_tarpit(2 * minute);
        let released = |s: &mut Sim| {
            let start = s.now;
            assert!(s.take_client().is_empty(), "held");
            let due = s.t.poll_timeout().expect("a reply is held");
            s.now = due;
            s.flush();
            assert!(!s.take_client().is_empty(), "released when due");
            s.take_mta();
            due - start
        };
        s.client_sends(b"MAIL FROM:<a@b>\r\n")
            .mta_says(b"250 ok\r\n");
        assert_eq!(released(&mut s), 2 * minute, "tarpit alone, under the cap");
        s.client_sends(b"RCPT TO:<c@d>\r\n").mta_says(b"250 ok\r\n");
        assert_eq!(
            released(&mut s),
            Duration::from_secs(150),
            "3m capped at 2.5m"
        );
        s.client_sends(b"DATA\r\n").mta_says(b"354 go\r\n");
        assert_eq!(released(&mut s), minute, "the 354: 3m capped at 1m");
        s.client_sends(b"x\r\n.\r\n").mta_says(b"250 queued\r\n");
        assert_eq!(released(&mut s), 3 * minute, "end of data: 10m to wait");
    }

    #[test]
    fn turn_gaps_are_measured_from_our_last_reply() {
        let mut s = Sim::new(TrackerConfig::default());
        s.after(250)
            .client_sends(b"EHLO x\r\n")
            .mta_says(EHLO_REPLY);
        s.after(40).client_sends(b"MAIL FROM:<a@b>\r\n");
        let gaps: Vec<_> = s
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Turn { verb, gap } => Some((*verb, gap.as_millis())),
                _ => None,
            })
            .collect();
        assert_eq!(gaps, [(Verb::Ehlo, 250), (Verb::Mail, 40)]);
    }

    #[test]
    fn tagging_puts_the_header_on_top_and_keeps_the_rest_byte_for_byte() {
        let mut s = Sim::new(TrackerConfig::default());
        s.t.set_disposition(Disposition::Tag(b"X-MXGuard: suspect\r\n".to_vec()));
        s.client_sends(b"EHLO x\r\n").mta_says(EHLO_REPLY);
        assert_eq!(
            s.take_client(),
            b"250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            "no STARTTLS, no CHUNKING for a session to be tagged"
        );
        s.take_mta();
        s.client_sends(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
        s.take_mta();
        s.mta_says(b"250 ok\r\n250 ok\r\n354 go\r\n");
        s.client_sends(b"Subject: x\r\n\r\n.leading dot\r\n.\r\n");
        assert_eq!(
            s.take_mta(),
            b"X-MXGuard: suspect\r\nSubject: x\r\n\r\n.leading dot\r\n.\r\n"
        );
    }

    /// A session past EHLO whose every MAIL waits for the caller's word.
    fn holding_mail() -> Sim {
        let mut s = Sim::new(TrackerConfig {
            hold_mail: true,
            ..TrackerConfig::default()
        });
        s.ehlo();
        s
    }

    /// A session turned to tag after CHUNKING was offered, its envelope
    /// taken: the next is the client's BDAT.
    fn tagged_envelope() -> Sim {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.t.set_disposition(Disposition::Tag(b"X-T: 1\r\n".to_vec()));
        s.client_sends(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
            .mta_says(b"250 ok\r\n250 ok\r\n");
        s.take_mta();
        s.take_client();
        s
    }

    #[test]
    fn tagging_a_bdat_message_rewrites_the_chunk_size() {
        let mut s = tagged_envelope();
        s.client_sends(b"BDAT 5 LAST\r\nhello");
        assert_eq!(s.take_mta(), b"BDAT 13 LAST\r\nX-T: 1\r\nhello");
    }

    #[test]
    fn a_chunk_size_past_2_to_the_64_with_the_tag_is_refused_not_wrapped() {
        let mut s = tagged_envelope();
        // 2^64 - 8 + 5: with the 8-byte header it would wrap to 5.
        let size = u64::MAX - 8 + 1 + 5;
        s.client_sends(format!("BDAT {size} LAST\r\n").as_bytes());
        assert_eq!(s.take_client(), BDAT_TOO_BIG);
        assert!(s.take_mta().is_empty(), "the MTA never sees that BDAT");
        // What follows is a command, to the guard as to the MTA.
        s.events.clear();
        s.client_sends(b"RCPT TO:<e@f>\r\n");
        assert_eq!(s.take_mta(), b"RCPT TO:<e@f>\r\n");
        assert!(s.events.iter().any(|e| matches!(
            e,
            Event::Turn {
                verb: Verb::Rcpt,
                ..
            }
        )));
    }

    #[test]
    fn bdat_without_chunking_offered_is_answered_here_and_its_chunk_read_as_commands() {
        let mut s = Sim::new(TrackerConfig::default());
        s.client_sends(b"EHLO client.example\r\n")
            .mta_says(b"250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n");
        s.take_mta();
        s.take_client();
        s.client_sends(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
            .mta_says(b"250 ok\r\n250 ok\r\n");
        s.take_mta();
        s.take_client();
        s.events.clear();
        let hidden = b"RCPT TO:<hidden@x>\r\n";
        let mut sent = format!("BDAT {}\r\n", hidden.len()).into_bytes();
        sent.extend_from_slice(hidden);
        s.client_sends(&sent);
        assert_eq!(s.take_mta(), hidden, "no BDAT; its chunk is a command");
        assert_eq!(s.take_client(), BDAT_NOT_OFFERED);
        let verbs: Vec<Verb> = s
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Turn { verb, .. } => Some(*verb),
                _ => None,
            })
            .collect();
        assert_eq!(verbs, [Verb::Bdat, Verb::Rcpt]);
        // After HELO nothing is offered either.
        let mut s = Sim::new(TrackerConfig::default());
        s.client_sends(b"HELO client.example\r\n")
            .mta_says(b"250 mx.example\r\n");
        s.take_mta();
        s.take_client();
        s.client_sends(b"BDAT 0 LAST\r\n");
        assert!(s.take_mta().is_empty());
        assert_eq!(s.take_client(), BDAT_NOT_OFFERED);
        // A tracker that saw no greeting (the client's EHLO went early,
        // PIPECONNECT) does not know the MTA's offer: BDAT goes on.
        let mut s = Sim::new(TrackerConfig::default());
        s.client_sends(b"BDAT 3 LAST\r\nabc");
        assert_eq!(s.take_mta(), b"BDAT 3 LAST\r\nabc");
    }

    #[test]
    fn commands_after_leading_blanks_are_read_as_the_mta_reads_them() {
        let mut s = holding_mail();
        s.t.on_client(s.now, b" \tMAIL FROM:<limited@sender.example>\r\n");
        assert!(s.t.is_paused(), "held for the sender checks");
        assert!(s.t.upstream_output().is_empty());
        s.flush();
        assert!(s
            .events
            .contains(&Event::MailFrom("limited@sender.example".into())));
        s.mta_says(b"250 ok\r\n");
        s.client_sends(b"RCPT TO:<c@d>\r\n").mta_says(b"250 ok\r\n");
        s.client_sends(b"  DATA\r\n").mta_says(b"354 go on\r\n");
        assert!(s.t.in_message(), "the body is read as a body");
        // And EHLO's name is its name.
        let mut s = Sim::new(TrackerConfig::default());
        s.client_sends(b" EHLO client.example\r\n")
            .mta_says(EHLO_REPLY);
        assert_eq!(s.t.envelope().helo.as_deref(), Some("client.example"));
    }

    #[test]
    fn a_verb_split_across_reads_is_named_by_its_whole_line() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.events.clear();
        s.after(7);
        s.client_sends(b"MA");
        assert!(s.events.is_empty(), "no turn named yet: {:?}", s.events);
        s.after(5);
        s.client_sends(b"IL FROM:<a@b>\r\n");
        assert_eq!(
            s.events,
            [Event::Turn {
                verb: Verb::Mail,
                gap: Duration::from_millis(7)
            }],
            "named by the whole line, timed at its first byte"
        );
        assert_eq!(s.take_mta(), b"MAIL FROM:<a@b>\r\n");
        // A verb whole in the first read is reported at once.
        s.mta_says(b"250 ok\r\n");
        s.events.clear();
        s.client_sends(b"RCPT TO:<c");
        assert!(matches!(
            s.events[..],
            [Event::Turn {
                verb: Verb::Rcpt,
                ..
            }]
        ));
    }

    #[test]
    fn a_client_that_never_reads_its_replies_stops_being_read() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        // The client pipelines RSETs and reads nothing; the MTA answers
        // each one.
        let mut sent = 0;
        while s.t.wants_client_input() {
            assert!(sent < 10 * MAX_OWED, "still reading after {sent}");
            s.t.on_client(s.now, b"RSET\r\n");
            let up = s.t.upstream_output().len();
            s.t.upstream_written(up);
            s.t.on_upstream(s.now, b"250 2.0.0 Ok\r\n").unwrap();
            sent += 1;
        }
        assert_eq!(sent, MAX_OWED);
        assert_eq!(s.t.replies_queued(), MAX_OWED);
        // It reads: it is read again.
        while let Some(out) = s.t.client_output(s.now) {
            let n = out.len();
            s.t.client_written(s.now, n);
        }
        assert!(s.t.wants_client_input());
        // Nor does an MTA that answers nothing let the commands pile up.
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        let mut sent = 0;
        while s.t.wants_client_input() {
            assert!(sent < 10 * MAX_OWED, "still reading after {sent}");
            s.client_sends(b"RSET\r\n");
            sent += 1;
        }
        assert_eq!(sent, MAX_OWED);
        assert!(s.violations().is_empty(), "pipelining, legally");
    }

    #[test]
    fn a_suspect_session_cannot_escape_into_tls() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.t.set_disposition(Disposition::Quarantine);
        s.client_sends(b"STARTTLS\r\n");
        assert!(s.take_mta().is_empty());
        assert_eq!(s.take_client(), b"454 4.7.0 TLS not available\r\n");
        assert!(!s.t.is_blind());
    }

    #[test]
    fn quarantine_takes_the_message_and_the_mta_gets_rset() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.t.set_disposition(Disposition::Quarantine);
        s.client_sends(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n..hidden\r\nbody\r\n.\r\n");
        assert_eq!(s.take_mta(), b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
        s.mta_says(b"250 ok\r\n250 ok\r\n");
        assert!(s.events.contains(&Event::DivertStarted));
        assert!(s.events.contains(&Event::DivertFinished));
        assert_eq!(s.t.take_diverted(), b".hidden\r\nbody\r\n");
        assert!(s.take_mta().is_empty(), "no DATA, no body for the MTA");
        assert_eq!(
            s.take_client(),
            b"250 ok\r\n250 ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        s.client_sends(b"QUIT\r\n");
        assert!(s.take_mta().is_empty(), "QUIT waits for the store");
        s.t.divert_done(s.now, b"250 2.0.0 Ok: quarantined\r\n".to_vec());
        s.flush();
        assert_eq!(s.take_client(), b"250 2.0.0 Ok: quarantined\r\n");
        assert_eq!(s.take_mta(), b"RSET\r\nQUIT\r\n");
        s.mta_says(b"250 2.0.0 Ok\r\n221 bye\r\n");
        assert_eq!(
            s.take_client(),
            b"221 bye\r\n",
            "the RSET's reply is ours, not the client's"
        );
    }

    /// What the client sent may reach the MTA only later: the caller must
    /// not pass the client's end of stream on before (it did, and RSET and
    /// QUIT then met a closed socket).
    #[test]
    fn bytes_held_for_the_mta_are_reported_until_they_went() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        assert!(!s.t.holds_client_bytes());
        s.t.set_disposition(Disposition::Quarantine);
        s.client_sends(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 5 LAST\r\nhelloQUIT\r\n");
        assert_eq!(s.take_mta(), b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
        assert!(s.t.holds_client_bytes(), "the BDAT waits for the replies");
        s.mta_says(b"250 ok\r\n250 ok\r\n");
        assert_eq!(s.t.take_diverted(), b"hello");
        assert!(s.take_mta().is_empty());
        assert!(s.t.holds_client_bytes(), "the message is not stored yet");
        s.t.divert_done(s.now, b"250 2.0.0 Ok: quarantined\r\n".to_vec());
        assert!(!s.t.holds_client_bytes());
        s.flush();
        assert_eq!(s.take_mta(), b"RSET\r\nQUIT\r\n");

        // A diverted DATA may go on as DATA (no recipient accepted).
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.t.set_disposition(Disposition::Discard);
        s.client_sends(b"MAIL FROM:<a@b>\r\nRCPT TO:<nobody@d>\r\nDATA\r\n");
        assert!(s.t.holds_client_bytes(), "the DATA waits for the replies");
        s.mta_says(b"250 ok\r\n550 5.1.1 unknown user\r\n");
        assert!(!s.t.holds_client_bytes());
        assert!(s.take_mta().ends_with(b"DATA\r\n"));
    }

    #[test]
    fn quarantine_with_no_accepted_recipient_lets_the_mta_refuse_data() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.t.set_disposition(Disposition::Discard);
        s.client_sends(b"MAIL FROM:<a@b>\r\nRCPT TO:<nobody@d>\r\nDATA\r\n");
        s.mta_says(b"250 ok\r\n550 5.1.1 unknown user\r\n");
        assert_eq!(
            s.take_mta(),
            b"MAIL FROM:<a@b>\r\nRCPT TO:<nobody@d>\r\nDATA\r\n"
        );
        s.mta_says(b"554 5.5.1 no valid recipients\r\n");
        assert!(s
            .take_client()
            .ends_with(b"554 5.5.1 no valid recipients\r\n"));
    }

    #[test]
    fn quarantine_takes_bdat_chunks_too() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.t.set_disposition(Disposition::Quarantine);
        s.client_sends(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
            .mta_says(b"250 ok\r\n250 ok\r\n");
        s.take_mta();
        s.take_client();
        s.client_sends(b"BDAT 3\r\nabcBDAT 2 LAST\r\nde");
        assert_eq!(s.t.take_diverted(), b"abcde");
        assert!(s.take_mta().is_empty());
        assert_eq!(s.take_client(), b"250 2.0.0 3 octets received\r\n");
        s.t.divert_done(s.now, b"250 2.0.0 Ok: quarantined\r\n".to_vec());
        s.flush();
        assert_eq!(s.take_client(), b"250 2.0.0 Ok: quarantined\r\n");
        assert_eq!(s.take_mta(), b"RSET\r\n");
    }

    #[test]
    fn a_held_mail_is_shown_to_the_caller_then_passed_on() {
        let mut s = holding_mail();
        s.t.on_client(s.now, b"MAIL FROM:<Alice@Example.org> SIZE=10\r\n");
        assert!(s.t.is_paused());
        assert!(
            s.t.upstream_output().is_empty(),
            "held until the caller says"
        );
        assert_eq!(
            s.t.poll_event(),
            Some(Event::Turn {
                verb: Verb::Mail,
                gap: Duration::ZERO
            })
        );
        assert_eq!(
            s.t.poll_event(),
            Some(Event::MailFrom("Alice@Example.org".into()))
        );
        s.t.proceed(s.now);
        assert_eq!(
            s.t.upstream_output(),
            b"MAIL FROM:<Alice@Example.org> SIZE=10\r\n"
        );
        s.flush();
        s.mta_says(b"250 2.1.0 Ok\r\n");
        assert_eq!(
            s.t.envelope().mail_from.as_deref(),
            Some("Alice@Example.org")
        );
        assert_eq!(s.take_client(), b"250 2.1.0 Ok\r\n");
    }

    #[test]
    fn a_refused_mail_gets_our_reply_in_order_and_never_reaches_the_mta() {
        let mut s = holding_mail();
        s.refuse_mail = Some(b"451 4.7.1 sender over its limit\r\n".to_vec());
        // Pipelined: a RSET before (its reply is owed first), RCPT and DATA
        // after (the MTA refuses them: it saw no MAIL).
        s.client_sends(
            b"RSET\r\nMAIL FROM:<bulk@example.org>\r\nRCPT TO:<b@mx.example>\r\nDATA\r\n",
        );
        assert_eq!(s.take_mta(), b"RSET\r\nRCPT TO:<b@mx.example>\r\nDATA\r\n");
        assert!(
            s.take_client().is_empty(),
            "the 451 waits for the RSET's reply"
        );
        s.mta_says(b"250 2.0.0 Ok\r\n503 5.5.1 need MAIL\r\n554 5.5.1 no valid recipients\r\n");
        assert_eq!(
            s.take_client(),
            b"250 2.0.0 Ok\r\n451 4.7.1 sender over its limit\r\n503 5.5.1 need MAIL\r\n554 5.5.1 no valid recipients\r\n"
        );
        assert_eq!(s.t.envelope().mail_from, None);
        assert!(s.violations().is_empty(), "{:?}", s.events);
    }

    #[test]
    fn auth_exchanges_are_not_commands_and_success_is_reported() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.client_sends(b"AUTH LOGIN\r\n")
            .mta_says(b"334 VXNlcm5hbWU6\r\n");
        s.client_sends(b"dXNlcg==\r\n")
            .mta_says(b"334 UGFzc3dvcmQ6\r\n");
        s.client_sends(b"cGFzcw==\r\n")
            .mta_says(b"235 2.7.0 ok\r\n");
        assert_eq!(s.take_mta(), b"AUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\n");
        assert!(s.events.contains(&Event::Authenticated));
        assert!(s.violations().is_empty(), "{:?}", s.events);
    }

    #[test]
    fn quit_pipelined_after_the_message_is_legal_with_pipelining() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.client_sends(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
            .mta_says(b"250 ok\r\n250 ok\r\n354 go\r\n");
        s.client_sends(b"x\r\n.\r\nQUIT\r\n");
        assert!(s.violations().is_empty(), "{:?}", s.events);
    }

    #[test]
    fn the_mta_closes_after_its_221_to_quit_or_a_421() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        assert!(!s.t.upstream_closing());
        s.client_sends(b"NOOP\r\n")
            .mta_says(b"221 odd but not to QUIT\r\n");
        assert!(!s.t.upstream_closing(), "221 to another command");
        s.client_sends(b"QUIT\r\n").mta_says(b"221 bye\r\n");
        assert!(s.t.upstream_closing());
        assert!(s.client.ends_with(b"221 bye\r\n"));

        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.client_sends(b"MAIL FROM:<a@b>\r\n")
            .mta_says(b"250 ok\r\n");
        assert!(!s.t.upstream_closing());
        s.client_sends(b"RCPT TO:<c@d>\r\n")
            .mta_says(b"421 4.3.2 shutting down\r\n");
        assert!(s.t.upstream_closing(), "421 to any command");
        // A command sent after it waits for an answer: not its end yet.
        s.client_sends(b"RSET\r\n");
        assert!(!s.t.upstream_closing());
    }

    #[test]
    fn the_action_of_a_violation_covers_the_command_that_fired_it() {
        let now = Instant::now();
        let mut t = TurnTracker::new(TrackerConfig::default(), now);
        t.on_client(
            now,
            b"EHLO bot\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
        );
        assert_eq!(
            t.upstream_output(),
            b"EHLO bot\r\n",
            "paused at the violation"
        );
        assert!(matches!(t.poll_event(), Some(Event::Turn { .. })));
        assert!(matches!(t.poll_event(), Some(Event::Violation(_))));
        t.set_disposition(Disposition::Quarantine);
        t.proceed(now);
        assert_eq!(
            t.upstream_output(),
            b"EHLO bot\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n",
            "DATA is kept for the quarantine"
        );
    }

    #[test]
    fn prdr_replies_all_answer_the_end_of_the_message() {
        let mut s = Sim::new(TrackerConfig::default());
        s.ehlo();
        s.client_sends(b"MAIL FROM:<a@b> PRDR\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n")
            .mta_says(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n");
        s.take_mta();
        s.client_sends(b"one\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
        s.mta_says(b"353 PRDR\r\n250 c ok\r\n250 e ok\r\n250 done\r\n");
        s.mta_says(b"250 ok\r\n250 ok\r\n354 go\r\n");
        s.client_sends(b"two\r\n.\r\n");
        assert!(s.violations().is_empty(), "{:?}", s.events);
        assert!(
            s.take_mta().ends_with(b"two\r\n.\r\n"),
            "the second body is a body"
        );
        assert_eq!(s.t.envelope().rcpt_to, vec!["c@d".to_string()]);
    }

    #[test]
    fn garbage_from_the_upstream_is_an_error() {
        let mut s = Sim::new(TrackerConfig::default());
        s.client_sends(b"EHLO x\r\n");
        assert!(s.t.on_upstream(s.now, b"HTTP/1.0 200 OK\r\n").is_err());
    }
}
