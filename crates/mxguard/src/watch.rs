//! The watch after the greeting: every byte through the turn tracker.
//!
//! Until the session ends or turns to TLS, bytes are copied through a
//! buffer and shown to [`TurnTracker`]; it says what to forward, when a held
//! reply may go, and what the client did wrong. This module turns that into
//! actions: tests fire, the strongest action wins, mail is tagged, diverted
//! into quarantine or dropped, the session is tarpitted or ended.
//!
//! Mail is never lost: a message is answered `250` only after the MTA said
//! so, or after the quarantine file is on disk (fsynced); when storing fails
//! the client gets a `451` and retries.

use std::future::Future;
use std::io;
use std::task::Poll;

use mxguard_net::{idle_deadline, Direction, RelayMode, RelayObserver};
use mxguard_policy::action::Action;
use mxguard_policy::Verdict;
use mxguard_smtp::{
    Disposition, Event, ReplyDelays, SmugglingPolicy, TrackerConfig, TurnTracker, Violation,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};

use crate::config::{Config, Smuggling};
use crate::quarantine::{AsyncQuarantineWriter, QuarantineMeta};
use crate::server::{Runtime, Shared};
use crate::session::{discard_pending, write_reply, Record};

/// How the watch ended.
pub enum WatchEnd {
    /// STARTTLS succeeded: relay the rest blind (splice).
    Blind,
    /// The session is over: both sides closed, or it was ended. With
    /// `quit`, the MTA is owed a polite QUIT; without, the connection is cut
    /// (mid-message, so the MTA discards what it got).
    Over { quit: bool },
}

/// Builds the tracker's settings from the config.
pub fn tracker_config(config: &Config, delays: bool) -> TrackerConfig {
    let d = &config.turns.reply_delay;
    TrackerConfig {
        strip_pipelining: config.turns.strip_pipelining,
        max_command_line: config.turns.max_command_line,
        unknown_command_limit: config.turns.unknown_command_limit,
        hold_mail: config.senders.enabled,
        smuggling: match config.turns.smuggling {
            Smuggling::Reject => SmugglingPolicy::Reject,
            Smuggling::Normalize => SmugglingPolicy::Normalize,
        },
        delays: if delays {
            ReplyDelays {
                ehlo: d.ehlo.0,
                helo: d.helo.0,
                mail: d.mail.0,
                rcpt: d.rcpt.0,
                data: d.data.0,
                end_of_data: d.end_of_data.0,
                other: d.other.0,
            }
        } else {
            ReplyDelays::default()
        },
        ..TrackerConfig::default()
    }
}

/// The state of one watched session.
struct Watcher<'a, 'r> {
    shared: &'a Shared,
    runtime: &'a Runtime,
    record: &'a mut Record<'r>,
    tracker: TurnTracker,
    /// The strongest action taken so far.
    action: Action,
    writer: Option<AsyncQuarantineWriter>,
    /// The message being diverted is too big or could not be stored.
    divert_failed: bool,
}

/// What to do after handling events.
enum Next {
    Continue,
    /// End the session; `quit`: say QUIT to the MTA first.
    End {
        quit: bool,
    },
}

/// Watches the session until TLS or its end.
#[allow(clippy::too_many_arguments)]
pub async fn watch(
    shared: &Shared,
    runtime: &Runtime,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    early: Vec<u8>,
    upstream_rest: Vec<u8>,
    initial: Action,
    delays: bool,
    record: &mut Record<'_>,
) -> WatchEnd {
    let config = &runtime.config;
    let now = Instant::now();
    let mut w = Watcher {
        shared,
        runtime,
        record,
        tracker: TurnTracker::new(tracker_config(config, delays), now.into_std()),
        action: Action::Observe,
        writer: None,
        divert_failed: false,
    };
    w.apply(initial);
    if !upstream_rest.is_empty()
        && w.tracker
            .on_upstream(now.into_std(), &upstream_rest)
            .is_err()
    {
        return w.upstream_garbage(client).await;
    }
    if !early.is_empty() {
        w.tracker.on_client(now.into_std(), &early);
    }

    let idle = config.relay.idle_timeout.0;
    let mut client_eof = false;
    let mut upstream_eof = false;
    let mut upstream_shut = false;
    let mut last_activity = Instant::now();
    let mut client_first = false;
    // One timer for the whole watch, re-armed only when it fires: moving
    // bytes records the instant and costs no timer work.
    let idle_timer = sleep_until(idle_deadline(last_activity, idle));
    tokio::pin!(idle_timer);
    let mut idle_armed = false;
    // Reply delays (reset to each release instant; never polled without).
    let release_timer = sleep_until(idle_deadline(last_activity, idle));
    tokio::pin!(release_timer);

    loop {
        // A violation pauses the tracker until its action is applied.
        loop {
            if let Next::End { quit } = w.events(client).await {
                return WatchEnd::Over { quit };
            }
            if !w.tracker.is_paused() {
                break;
            }
            w.tracker.proceed(Instant::now().into_std());
        }
        // Write what may be written now, without waiting.
        let now = Instant::now();
        match flush(
            &mut w.tracker,
            client,
            upstream,
            now,
            upstream_eof,
            w.record,
            &shared.relay_counters,
        ) {
            Ok(true) => last_activity = now,
            Ok(false) => {}
            Err(_) => {
                w.record.end = "reset";
                return WatchEnd::Over { quit: false };
            }
        }
        if w.tracker.is_blind() && w.tracker.upstream_output().is_empty() {
            return WatchEnd::Blind;
        }
        // The client's end of stream goes on to the MTA only once nothing
        // more can: bytes the tracker holds (a BDAT waiting for the replies
        // to its envelope, a diverted message being stored) still make
        // commands for it (our RSET, the client's QUIT). Shut before, their
        // write failed (EPIPE) and the client never got its replies, though
        // its message was stored: it sent it again.
        if client_eof
            && !upstream_shut
            && w.tracker.upstream_output().is_empty()
            && !w.tracker.holds_client_bytes()
        {
            let _ = upstream.shutdown().await;
            upstream_shut = true;
        }
        let replies_owed =
            w.tracker.client_output(now.into_std()).is_some() || w.tracker.poll_timeout().is_some();
        if upstream_eof && !replies_owed {
            let _ = client.shutdown().await;
            // Unread input (commands pipelined after QUIT) would turn the
            // close into a reset, which can destroy the replies in flight.
            discard_pending(client);
            w.record.end = if client_eof { "eof" } else { "upstream" };
            return WatchEnd::Over { quit: false };
        }

        let read_client = !client_eof && w.tracker.wants_client_input();
        let write_client = w.tracker.client_output(now.into_std()).is_some();
        let write_upstream = !w.tracker.upstream_output().is_empty() && !upstream_eof;
        // A reply already due but not written (the client's socket is
        // full) waits for write readiness; its release instant, past, would
        // be ready at once and spin the loop until the client reads.
        let release = if write_client {
            None
        } else {
            w.tracker.poll_timeout().map(Instant::from_std)
        };

        // What to wait for, polled directly (one waker slot per socket and
        // direction, no readiness future made and dropped on every turn).
        let mut woke = std::future::poll_fn(|cx| {
            let mut woke = Woke::default();
            if read_client {
                woke.client = ready_or_closed(client.poll_read_ready(cx));
            }
            if !upstream_eof {
                woke.upstream = ready_or_closed(upstream.poll_read_ready(cx));
            }
            if write_client && client.poll_write_ready(cx).is_ready() {
                woke.timer = true;
            }
            if write_upstream && upstream.poll_write_ready(cx).is_ready() {
                woke.timer = true;
            }
            if let Some(at) = release {
                if release_timer.deadline() != at {
                    release_timer.as_mut().reset(at);
                }
                if release_timer.as_mut().poll(cx).is_ready() {
                    woke.timer = true;
                }
            }
            // The idle timer holds this task's waker from its first poll
            // (after each reset) until it fires: polled again only then,
            // not on every turn (it was ~5 % of a clean session's
            // instructions). The task, and so its waker, never changes.
            if !idle_armed || idle_timer.is_elapsed() {
                idle_armed = true;
                if idle_timer.as_mut().poll(cx).is_ready() {
                    woke.idle = true;
                }
            }
            if woke.any() {
                Poll::Ready(woke)
            } else {
                Poll::Pending
            }
        })
        .await;

        // One side read per turn of the loop, as a select would: what it
        // made the tracker notice is handled before the other side's bytes.
        // When both are ready, they take turns going first.
        if woke.client.is_some() && woke.upstream.is_some() {
            client_first = !client_first;
            if client_first {
                woke.upstream = None;
            } else {
                woke.client = None;
            }
        }
        match woke.client {
            None => {}
            Some(false) => client_eof = true,
            Some(true) => {
                let tracker = &mut w.tracker;
                let read = read_turn(client, |bytes| {
                    last_activity = Instant::now();
                    tracker.on_client(last_activity.into_std(), bytes);
                });
                match read {
                    Ok(0) => client_eof = true,
                    Ok(n) => w.record.bytes_up += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        w.record.end = "client-reset";
                        return WatchEnd::Over { quit: false };
                    }
                }
            }
        }
        match woke.upstream {
            None => {}
            Some(false) => upstream_eof = true,
            Some(true) => {
                let tracker = &mut w.tracker;
                let mut garbage = false;
                // Once the MTA has said its last (221 to QUIT), its FIN is
                // looked for at once: known with the reply, the two go to
                // the client in one segment, with no wake-up in between.
                let read = mxguard_net::with_turn_buffer(|buf| {
                    mxguard_net::read_turn_to_close(upstream, buf, |bytes| {
                        last_activity = Instant::now();
                        garbage |= tracker
                            .on_upstream(last_activity.into_std(), bytes)
                            .is_err();
                        !garbage && tracker.upstream_closing()
                    })
                });
                match read {
                    Ok(_) if garbage => return w.upstream_garbage(client).await,
                    Ok((n, eof)) => upstream_eof = n == 0 || eof,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // A reset once it said goodbye ends nothing owed.
                    Err(_) if w.tracker.upstream_closing() => upstream_eof = true,
                    Err(_) => {
                        // The MTA is gone mid-session: the client must not
                        // think its mail was taken.
                        let reply = tempfail_line(&config.hostname);
                        w.record.bytes_down += write_reply(client, &reply).await;
                        w.record.end = "upstream-reset";
                        return WatchEnd::Over { quit: false };
                    }
                }
            }
        }
        if woke.idle {
            let now = Instant::now();
            // A reply held back by us (`release`) is not the client's
            // idleness; one due but unwritten because the client reads
            // nothing is: no byte moved either way.
            if now >= idle_deadline(last_activity, idle) && release.is_none() {
                // A client that reads nothing cannot take a 421 either (its
                // socket is full, maybe mid-reply): it is just closed.
                if !write_client {
                    let reply =
                        format!("421 4.4.2 {} Error: timeout exceeded\r\n", config.hostname);
                    w.record.bytes_down += write_reply(client, reply.as_bytes()).await;
                }
                w.record.end = "idle";
                return WatchEnd::Over {
                    quit: !w.tracker.in_message(),
                };
            }
            // Activity since, or replies held back: look again an idle
            // period after the last byte (or from now, if that passed).
            let next = idle_deadline(last_activity, idle);
            idle_timer.as_mut().reset(if next > now {
                next
            } else {
                idle_deadline(now, idle)
            });
            idle_armed = false;
        }
    }
}

/// What woke the watch: a side readable (`Some(false)`: its registration
/// is gone, read as the end of its stream), a side writable or a reply
/// due (`timer`), or the idle timer.
#[derive(Default)]
struct Woke {
    client: Option<bool>,
    upstream: Option<bool>,
    timer: bool,
    idle: bool,
}

impl Woke {
    fn any(&self) -> bool {
        self.client.is_some() || self.upstream.is_some() || self.timer || self.idle
    }
}

fn ready_or_closed(poll: Poll<io::Result<()>>) -> Option<bool> {
    match poll {
        Poll::Ready(ready) => Some(ready.is_ok()),
        Poll::Pending => None,
    }
}

/// Reads what the socket holds into the thread's buffer and hands the
/// bytes (if any) to `take`; returns their count (0: end of stream). A
/// short read clears the socket's readiness (`mxguard_net::read_turn`).
pub(crate) fn read_turn(stream: &TcpStream, take: impl FnOnce(&[u8])) -> io::Result<usize> {
    mxguard_net::with_turn_buffer(|buf| read_turn_into(stream, buf, take))
}

fn read_turn_into(
    stream: &TcpStream,
    buf: &mut [u8],
    take: impl FnOnce(&[u8]),
) -> io::Result<usize> {
    let n = mxguard_net::read_turn(stream, buf)?;
    if n > 0 {
        take(&buf[..n]);
    }
    Ok(n)
}

/// Writes pending output both ways without blocking. Returns whether any
/// byte moved; an error means a side is gone. With the MTA gone
/// (`upstream_eof`) after its goodbye, that reply, the last queued, is
/// followed at once by the client's shutdown, and its FIN may leave with it
/// ([`mxguard_net::send_before_shutdown`]).
fn flush(
    tracker: &mut TurnTracker,
    client: &TcpStream,
    upstream: &TcpStream,
    now: Instant,
    upstream_eof: bool,
    record: &mut Record<'_>,
    counters: &dyn RelayObserver,
) -> io::Result<bool> {
    let mut moved = false;
    // Nothing goes to an MTA that has closed: it answers nothing more, and
    // a failed write (it reset) would end the session before the client
    // got the replies the MTA did send (its 421).
    while !upstream_eof && !tracker.upstream_output().is_empty() {
        match upstream.try_write(tracker.upstream_output()) {
            Ok(n) => {
                tracker.upstream_written(n);
                counters.relayed(RelayMode::Copy, Direction::Upstream, n as u64);
                moved = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    while let Some(out) = tracker.client_output(now.into_std()) {
        // The MTA's goodbye, the last reply queued: the shutdown follows.
        let last = upstream_eof && tracker.upstream_closing() && tracker.replies_queued() == 1;
        let written = if last {
            mxguard_net::send_before_shutdown(client, out)
        } else {
            client.try_write(out)
        };
        match written {
            Ok(n) => {
                tracker.client_written(now.into_std(), n);
                record.bytes_down += n as u64;
                counters.relayed(RelayMode::Copy, Direction::Downstream, n as u64);
                moved = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(moved)
}

fn tempfail_line(hostname: &str) -> Vec<u8> {
    format!("421 4.3.0 {hostname} Error: try again later\r\n").into_bytes()
}

impl Watcher<'_, '_> {
    /// Handles what the tracker noticed.
    async fn events(&mut self, client: &mut TcpStream) -> Next {
        while let Some(event) = self.tracker.poll_event() {
            match event {
                Event::Violation(v) => {
                    if let end @ Next::End { .. } = self.violation(v, client).await {
                        return end;
                    }
                }
                Event::Turn { gap, .. } => self.record.turn(gap),
                Event::Authenticated => self.record.authenticated = true,
                Event::MailFrom(sender) => self.mail_from(&sender),
                Event::DivertStarted => self.divert_started().await,
                Event::DivertFinished => self.divert_finished().await,
                // The client abandoned the message: the temp file goes.
                Event::DivertAborted => drop(self.writer.take()),
                Event::Blind => {}
            }
        }
        if self.writer.is_some() {
            let content = self.tracker.take_diverted();
            self.divert_write(&content).await;
        } else {
            // Discard: the content goes nowhere.
            drop(self.tracker.take_diverted());
        }
        Next::Continue
    }

    async fn violation(&mut self, v: Violation, client: &mut TcpStream) -> Next {
        let test = v.test();
        let config = &self.runtime.config;
        let peer = self.record.client;
        tracing::info!(
            target: "mxguard::detect",
            "{} from [{}]:{}: {v}",
            test.to_ascii_uppercase(),
            peer.ip(),
            peer.port()
        );
        self.shared
            .metrics
            .detections
            .with_label_values(&[test])
            .inc();
        self.record.fired(test);
        self.shared.admission.add_points(
            self.shared,
            self.runtime,
            peer.ip(),
            config.reputation.detection_points,
            test,
        );
        let action = config.actions.for_test(test);
        let smuggled =
            matches!(v, Violation::Smuggling(_)) && config.turns.smuggling == Smuggling::Reject;
        if smuggled && !action.ends_session() {
            // The message cannot go on either way: refuse it. The MTA's
            // connection is cut mid-DATA so it discards the partial message.
            let reply = format!(
                "554 5.7.0 {} Message refused: bare CR or LF around the end of data\r\n",
                config.hostname
            );
            self.record.bytes_down += write_reply(client, reply.as_bytes()).await;
            self.record.verdict = Verdict::Reject;
            self.record.end = "closed";
            self.shared.count_action(Action::Reject);
            return Next::End { quit: false };
        }
        self.apply(action);
        if !action.ends_session() {
            return Next::Continue;
        }
        let host = &config.hostname;
        match action {
            Action::Tempfail => {
                let reply = format!("421 4.7.0 {host} Error: try again later\r\n");
                self.record.bytes_down += write_reply(client, reply.as_bytes()).await;
                self.record.verdict = Verdict::Tempfail;
            }
            Action::Reject => {
                let reply = format!("554 5.7.1 {host} Error: protocol violation ({test})\r\n");
                self.record.bytes_down += write_reply(client, reply.as_bytes()).await;
                discard_pending(client);
                self.record.verdict = Verdict::Reject;
            }
            _ => self.record.verdict = Verdict::Drop,
        }
        if matches!(action, Action::Reject | Action::Drop) && test != "tls-on-plaintext" {
            self.shared
                .block(peer.ip(), config.actions.block_ttl.0, "protocol");
        }
        self.record.end = "closed";
        // Mid-message or after smuggling the MTA's connection is cut, so it
        // discards the partial message; otherwise it gets a polite QUIT.
        Next::End {
            quit: !smuggled && !self.tracker.in_message(),
        }
    }

    /// A MAIL FROM, held by the tracker: within the sender's limits (by
    /// address and domain, authenticated or not, and its trend)? If not,
    /// the MAIL gets our 451 and the MTA never sees it.
    fn mail_from(&mut self, sender: &str) {
        let verdict =
            self.shared
                .admission
                .check_sender(self.runtime, sender, self.record.authenticated);
        let crate::admission::SenderVerdict::Limited(kind) = verdict else {
            return;
        };
        let peer = self.record.client;
        tracing::info!(
            target: "mxguard::detect",
            "SENDER-LIMIT {kind} for {sender:?} from [{}]:{} (authenticated: {})",
            peer.ip(),
            peer.port(),
            if self.record.authenticated { "yes" } else { "no" }
        );
        self.record.fired("sender-limit");
        let config = &self.runtime.config;
        self.shared.admission.add_points(
            self.shared,
            self.runtime,
            peer.ip(),
            config.reputation.sender_limit_points,
            "sender-limit",
        );
        let reply = format!(
            "451 4.7.1 {} Error: too much mail from this sender, try again later\r\n",
            config.hostname
        );
        self.tracker
            .refuse_mail(Instant::now().into_std(), reply.into_bytes());
    }

    /// Records the action and adjusts the tracker (strongest wins).
    fn apply(&mut self, action: Action) {
        if action == Action::Observe {
            return;
        }
        self.shared.count_action(action);
        if action.strength() > self.action.strength() {
            self.action = action;
            self.record.verdict = match action {
                Action::Tag => Verdict::Tag,
                Action::Tarpit => Verdict::Tarpit,
                Action::Quarantine => Verdict::Quarantine,
                Action::Discard => Verdict::Discard,
                Action::Tempfail => Verdict::Tempfail,
                Action::Reject => Verdict::Reject,
                Action::Drop => Verdict::Drop,
                Action::Observe => Verdict::Pass,
            };
        }
        let config = &self.runtime.config;
        match action {
            Action::Tarpit => self.tracker.set_tarpit(config.actions.tarpit_delay.0),
            Action::Tag | Action::Quarantine | Action::Discard => {
                let disposition = match self.action {
                    Action::Quarantine => Disposition::Quarantine,
                    Action::Tag => Disposition::Tag(self.tag_header()),
                    Action::Discard => Disposition::Discard,
                    _ => return,
                };
                if action != Action::Tag || matches!(self.tracker.disposition(), Disposition::Pass)
                {
                    self.tracker.set_disposition(disposition);
                }
            }
            _ => {}
        }
    }

    /// `X-MXGuard: suspect; tests=pregreet,pipelining; client=[192.0.2.1]`
    fn tag_header(&self) -> Vec<u8> {
        format!(
            "{}: suspect; tests={}; client=[{}]\r\n",
            self.runtime.config.actions.tag_header,
            self.record.tests_joined(),
            self.record.client.ip()
        )
        .into_bytes()
    }

    async fn divert_started(&mut self) {
        self.divert_failed = false;
        if !matches!(self.tracker.disposition(), Disposition::Quarantine) {
            return;
        }
        let Some(store) = self.shared.quarantine.as_ref() else {
            self.divert_failed = true;
            return;
        };
        let env = self.tracker.envelope();
        let meta = QuarantineMeta::new(
            self.record.client,
            env.helo.clone(),
            env.mail_from.clone().unwrap_or_default(),
            env.rcpt_to.clone(),
            self.record.tests.iter().map(|t| t.to_string()).collect(),
            self.runtime.config.hostname.clone(),
        );
        match store.begin_async(meta).await {
            Ok(writer) => self.writer = Some(writer),
            Err(e) => {
                tracing::error!("quarantine: cannot start storing a message: {e}");
                self.divert_failed = true;
            }
        }
    }

    async fn divert_write(&mut self, content: &[u8]) {
        if content.is_empty() || self.divert_failed {
            return;
        }
        let Some(writer) = self.writer.as_mut() else {
            return;
        };
        if let Err(e) = writer.write(content).await {
            if !writer.is_over_limit() {
                tracing::error!("quarantine: cannot write: {e}");
            }
            self.divert_failed = true;
        }
    }

    async fn divert_finished(&mut self) {
        let content = self.tracker.take_diverted();
        self.divert_write(&content).await;
        let host = self.runtime.config.hostname.clone();
        let now = Instant::now().into_std();
        let reply = match (self.tracker.disposition().clone(), self.writer.take()) {
            (Disposition::Discard, _) => {
                self.shared
                    .metrics
                    .messages
                    .with_label_values(&["discard"])
                    .inc();
                format!("250 2.0.0 {host} Ok: queued\r\n")
            }
            (_, Some(mut writer)) if !self.divert_failed => {
                // The message itself may have fired tests (smuggling).
                writer.set_tests(self.record.tests.iter().map(|t| t.to_string()).collect());
                let over = writer.is_over_limit();
                match writer.commit().await {
                    Ok(id) => {
                        self.shared
                            .metrics
                            .messages
                            .with_label_values(&["quarantine"])
                            .inc();
                        tracing::info!(
                            target: "mxguard::quarantine",
                            "QUARANTINE {} from [{}]:{}",
                            id.as_str(),
                            self.record.client.ip(),
                            self.record.client.port()
                        );
                        format!("250 2.0.0 {host} Ok: queued as {}\r\n", id.as_str())
                    }
                    Err(_) if over => {
                        format!("552 5.3.4 {host} Error: message too big\r\n")
                    }
                    Err(e) => {
                        tracing::error!("quarantine: cannot commit a message: {e}");
                        format!("451 4.3.0 {host} Error: try again later\r\n")
                    }
                }
            }
            (_, writer) => {
                let over = writer.as_ref().is_some_and(|w| w.is_over_limit());
                drop(writer);
                if over {
                    format!("552 5.3.4 {host} Error: message too big\r\n")
                } else {
                    format!("451 4.3.0 {host} Error: try again later\r\n")
                }
            }
        };
        self.tracker.divert_done(now, reply.into_bytes());
    }

    /// The MTA said something that is not SMTP: tell the client to retry.
    async fn upstream_garbage(&mut self, client: &mut TcpStream) -> WatchEnd {
        let reply = tempfail_line(&self.runtime.config.hostname);
        self.record.bytes_down += write_reply(client, &reply).await;
        self.record.verdict = Verdict::Tempfail;
        self.record.end = "upstream-garbage";
        WatchEnd::Over { quit: false }
    }
}

#[cfg(test)]
mod tests;
