//! Properties of the turn tracker and the body scanner, on scripts drawn
//! from SMTP alphabets (client tokens, upstream replies, cuts, instants).
//!
//! The simulation (a client, the tracker, a chaos upstream or a strict model
//! MTA, a fake clock) lives in `fuzz/src/sim.rs`, shared with the cargo-fuzz
//! targets so that a case found by either replays in the other. Each test
//! here checks one family of promises, so one bug does not hide another.

#[allow(dead_code)] // shared with the fuzz targets, which use all of it
#[path = "../fuzz/src/sim.rs"]
mod sim;

use mxguard_smtp::{Event, SmugglingPolicy};
use proptest::prelude::*;
use proptest::sample::select;
use sim::{
    check_scanner, decode, strict_end, Checks, Disp, Op, Setup, Sim, CLIENT_TOKENS, REPLY_TOKENS,
    TAG,
};

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![6 => 1usize..16, 1 => 1usize..4096]
}

fn client_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => select(CLIENT_TOKENS).prop_map(<[u8]>::to_vec),
        1 => (1usize..3000).prop_map(|n| vec![b'a'; n]),
        1 => prop::collection::vec(any::<u8>(), 1..8),
    ]
}

fn reply_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => select(REPLY_TOKENS).prop_map(<[u8]>::to_vec),
        1 => prop::collection::vec(any::<u8>(), 1..6),
    ]
}

/// The steps both kinds of upstream share.
fn common_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => client_bytes().prop_map(Op::Send),
        5 => size().prop_map(Op::ClientRead),
        4 => size().prop_map(Op::UpstreamRead),
        4 => size().prop_map(Op::UpstreamWrite),
        3 => size().prop_map(Op::ClientWrite),
        1 => select(vec![1u64, 10, 100, 1000]).prop_map(Op::Wait),
        1 => select(Disp::ALL.to_vec()).prop_map(Op::Proceed),
        1 => select(Disp::ALL.to_vec()).prop_map(Op::Policy),
        1 => any::<bool>().prop_map(Op::DivertDone),
    ]
}

fn chaos_op() -> impl Strategy<Value = Op> {
    prop_oneof![5 => common_op(), 1 => reply_bytes().prop_map(Op::Reply)]
}

fn setup(model_mta: bool) -> impl Strategy<Value = Setup> {
    (
        (any::<bool>(), any::<bool>(), any::<bool>()),
        select(vec![2048usize, 16, 64]),
        select(vec![64 * 1024usize, 64, 512]),
        select(vec![3u32, 1]),
        prop::array::uniform6(select(vec![0u64, 0, 10, 1000])),
        select(vec![0u64, 0, 0, 50]),
        select(vec![
            Disp::Pass,
            Disp::Pass,
            Disp::Pass,
            Disp::Tag,
            Disp::Quarantine,
        ]),
        prop::collection::vec(select(Disp::ALL.to_vec()), 1..4),
    )
        .prop_map(
            move |(
                (normalize, strip_pipelining, manual),
                max_command_line,
                max_held,
                unknown_limit,
                delays,
                tarpit_ms,
                initial,
                decisions,
            )| Setup {
                smuggling: if normalize {
                    SmugglingPolicy::Normalize
                } else {
                    SmugglingPolicy::Reject
                },
                strip_pipelining,
                max_command_line,
                max_held,
                unknown_limit,
                delays,
                tarpit_ms,
                initial,
                auto_proceed: !manual,
                decisions,
                model_mta,
            },
        )
}

fn model_case() -> impl Strategy<Value = (Setup, Vec<Op>)> {
    (setup(true), prop::collection::vec(common_op(), 1..120))
}

fn only(f: impl FnOnce(&mut Checks)) -> Checks {
    let mut checks = Checks::default();
    f(&mut checks);
    checks
}

/// Shrunk cases are kept as the stories at the end of this file, not in a
/// regressions file.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Replies at random instants, unrelated to the commands, garbage
    /// included: no panic, held input and the upstream buffer stay bounded,
    /// reading stops when it must, and the upstream's replies reach the
    /// client in the order they were sent (bar the one to our own RSET).
    #[test]
    fn a_chaotic_upstream_never_breaks_the_guard(
        setup in setup(false),
        ops in prop::collection::vec(chaos_op(), 1..120),
    ) {
        Sim::run(setup, only(|c| { c.bounds = true; c.replies = true; }), &ops);
    }

    /// With an MTA that follows the protocol, the guard stays bounded too.
    #[test]
    fn buffers_stay_bounded_against_a_real_mta((setup, ops) in model_case()) {
        Sim::run(setup, only(|c| c.bounds = true), &ops);
    }

    /// Whenever nothing is in flight, the guard is inside a message exactly
    /// when the MTA is; after the drain nothing is stuck.
    #[test]
    fn the_guard_and_the_mta_agree_on_where_messages_are((setup, ops) in model_case()) {
        Sim::run(setup, only(|c| { c.agreement = true; c.liveness = true; }), &ops);
    }

    /// Each reply the client gets answers the turn it is paired with: the
    /// MTA's replies in order, the guard's own (454, diverted 354, BDAT
    /// chunk, stored) in their place, the reply to our RSET never.
    #[test]
    fn every_reply_answers_the_clients_turn_in_order((setup, ops) in model_case()) {
        Sim::run(setup, only(|c| c.replies = true), &ops);
    }

    /// No end-of-data look-alike reaches the MTA; with Normalize every line
    /// break it gets is CRLF, so its only CRLF.CRLF is each message's end.
    #[test]
    fn no_end_of_data_look_alike_reaches_the_mta((setup, ops) in model_case()) {
        Sim::run(setup, only(|c| c.wire = true), &ops);
    }

    /// Once the session is to be quarantined or discarded, no body byte of
    /// a later message reaches the MTA; once tagged, every later message
    /// starts with the header, and the header is never anywhere else.
    #[test]
    fn diverted_mail_never_reaches_the_mta_and_tags_sit_on_top((setup, ops) in model_case()) {
        Sim::run(setup, only(|c| c.disposition = true), &ops);
    }

    /// The fuzz target's decoder over random bytes, every check on: what
    /// `cargo fuzz` runs, in the normal test run.
    #[test]
    fn fuzz_scripts_keep_every_promise(
        model in any::<bool>(),
        data in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let (setup, ops) = decode(&data, model);
        Sim::run(setup, Checks::all(), &ops);
    }
}

fn body_token() -> impl Strategy<Value = &'static [u8]> {
    select(vec![
        &b"\r\n"[..],
        b"\n",
        b"\r",
        b".",
        b"..",
        b"x",
        b"ab",
        b"\r\n.\r\n",
        b".\r\n",
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\n",
    ])
}

proptest! {
    #![proptest_config(config(1024))]

    /// However a body is cut, the scanner gives the same wire, content, end
    /// and findings; the end is where a strict reader puts it; Normalize
    /// leaves no look-alike and no bare line break, and what the MTA then
    /// delivers is exactly what a quarantine would store.
    #[test]
    fn the_body_scanner_does_not_care_how_input_is_cut(
        normalize in any::<bool>(),
        tokens in prop::collection::vec(body_token(), 0..40),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let input = tokens.concat();
        let policy = if normalize { SmugglingPolicy::Normalize } else { SmugglingPolicy::Reject };
        check_scanner(policy, &input, &cuts);
    }

    /// A body without bare CR or LF passes byte for byte under either
    /// policy, and its content is the unstuffed lines.
    #[test]
    fn a_plain_body_passes_byte_for_byte(
        normalize in any::<bool>(),
        lines in prop::collection::vec("[.a-z :]{0,12}", 0..12),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let policy = if normalize { SmugglingPolicy::Normalize } else { SmugglingPolicy::Reject };
        let mut body = Vec::new();
        let mut content = Vec::new();
        for line in &lines {
            if line.starts_with('.') {
                body.push(b'.');
            }
            body.extend_from_slice(line.as_bytes());
            body.extend_from_slice(b"\r\n");
            content.extend_from_slice(line.as_bytes());
            content.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b".\r\nQUIT\r\n");
        let end = body.len() - 6;
        let s = sim::scan(policy, &body, &cuts);
        prop_assert_eq!(s.ended_at, Some(end));
        prop_assert_eq!(&s.wire, &body[..end]);
        prop_assert_eq!(s.content, content);
        prop_assert_eq!(s.bare_breaks, 0);
        prop_assert_eq!(s.smuggling, None);
        prop_assert_eq!(strict_end(&body), Some(end));
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// A polite client's message goes through the whole guard unchanged
    /// (with the tag on top when tagged), however the bytes are cut and
    /// whatever the reply delays.
    #[test]
    fn a_polite_clients_message_reaches_the_mta_byte_for_byte(
        normalize in any::<bool>(),
        tag in any::<bool>(),
        delays in prop::array::uniform6(select(vec![0u64, 10, 1000])),
        lines in prop::collection::vec("[.a-z :]{0,12}", 0..12),
        sizes in prop::collection::vec(1usize..20, 1..12),
    ) {
        let setup = Setup {
            smuggling: if normalize { SmugglingPolicy::Normalize } else { SmugglingPolicy::Reject },
            delays,
            initial: if tag { Disp::Tag } else { Disp::Pass },
            ..Setup::default()
        };
        let mut body = Vec::new();
        for line in &lines {
            if line.starts_with('.') {
                body.push(b'.');
            }
            body.extend_from_slice(line.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b".\r\n");

        let mut s = Sim::new(setup, Checks::all());
        let pump = |s: &mut Sim, bytes: &[u8]| {
            s.step(&Op::Send(bytes.to_vec()));
            for &n in &sizes {
                for op in [Op::ClientRead(n), Op::UpstreamWrite(n), Op::UpstreamRead(n),
                           Op::Wait(n as u64 * 50), Op::ClientWrite(n)] {
                    s.step(&op);
                }
            }
            s.settle();
        };
        pump(&mut s, b"EHLO client.example\r\n");
        pump(&mut s, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
        prop_assert!(s.client_rx.ends_with(b"354 End data with <CR><LF>.<CR><LF> #4\r\n"));
        pump(&mut s, &body);
        pump(&mut s, b"QUIT\r\n");
        s.finish();

        let violations: Vec<_> = s.events.iter().filter(|e| matches!(e, Event::Violation(_))).collect();
        prop_assert!(violations.is_empty(), "{:?}", violations);
        prop_assert_eq!(s.mta.bodies.len(), 1);
        let mut expected = if tag { TAG.to_vec() } else { Vec::new() };
        expected.extend_from_slice(&body);
        prop_assert_eq!(&s.mta.bodies[0].raw, &expected);
        prop_assert!(s.client_rx.ends_with(b"250 2.0.0 queued #5\r\n221 2.0.0 Bye #6\r\n"));
    }
}

/// What the properties found, shrunk and written as stories. Each asserts
/// the correct behaviour.
mod found {
    use super::*;

    fn session(setup: Setup, checks: Checks) -> Sim {
        let mut s = Sim::new(setup, checks);
        say(&mut s, b"EHLO client.example\r\n");
        s
    }

    /// The client sends, and everything settles.
    fn say(s: &mut Sim, bytes: &[u8]) {
        s.step(&Op::Send(bytes.to_vec()));
        s.settle();
    }

    /// What the client got from `from` on.
    fn heard(s: &Sim, from: usize) -> String {
        String::from_utf8_lossy(&s.client_rx[from..]).into_owned()
    }

    /// RFC 3030 lets BDAT join a MAIL/RCPT pipeline group. In a quarantined
    /// session the guard answers the chunk itself, and must not do so
    /// before the MTA's replies to MAIL and RCPT: the client pairs replies
    /// with commands in order.
    #[test]
    fn the_guards_reply_to_a_diverted_chunk_waits_for_the_mtas_replies() {
        let setup = Setup {
            initial: Disp::Quarantine,
            ..Setup::default()
        };
        let mut s = session(setup, Checks::default());
        let from = s.client_rx.len();
        say(&mut s, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabc");
        assert_eq!(
            heard(&s, from),
            "250 2.1.0 Ok #2\r\n250 2.1.5 Ok #3\r\n250 2.0.0 3 octets received\r\n"
        );
    }

    /// The same for the guard's own `454` to STARTTLS in a tagged session:
    /// RSET may be pipelined before STARTTLS (RFC 2920), and its reply
    /// comes first.
    #[test]
    fn the_guards_454_to_starttls_waits_for_the_mtas_earlier_replies() {
        let setup = Setup {
            initial: Disp::Tag,
            ..Setup::default()
        };
        let mut s = session(setup, Checks::default());
        let from = s.client_rx.len();
        say(&mut s, b"RSET\r\nSTARTTLS\r\n");
        assert_eq!(
            heard(&s, from),
            "250 2.0.0 Ok #2\r\n454 4.7.0 TLS not available\r\n"
        );
    }

    /// `BDAT 0 LAST` ends the message at once; the guard must not think
    /// one is still open until the client's next byte.
    #[test]
    fn bdat_0_last_ends_the_message() {
        let mut s = session(Setup::default(), Checks::default());
        say(
            &mut s,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabcBDAT 0 LAST\r\n",
        );
        assert!(s.client_rx.ends_with(b"250 2.0.0 queued #5\r\n"));
        assert!(!s.t.in_message(), "the MTA took the message; none is open");
    }

    /// A SASL response longer than the command line limit must still be
    /// one SASL turn. Otherwise the guard reads the client's next line as
    /// SASL too: here `STARTTLS`, whose `220` it then does not see for what
    /// it is, and the command pipelined after it reaches the MTA once it is
    /// waiting for a TLS handshake (STARTTLS injection, CVE-2011-0411).
    #[test]
    fn a_long_sasl_line_does_not_let_starttls_injection_through() {
        let mut s = session(Setup::default(), Checks::default());
        say(&mut s, b"AUTH PLAIN\r\n");
        say(&mut s, &[b'a'; 3000]);
        say(&mut s, b"\r\n");
        assert!(s.client_rx.ends_with(b"535 5.7.8 failed #3\r\n"));
        say(&mut s, b"STARTTLS\r\nEHLO injected\r\n");
        assert_eq!(
            String::from_utf8_lossy(&s.mta.after_tls),
            "",
            "bytes pipelined after STARTTLS reached the MTA"
        );
    }

    /// A quarantined session starts diverting a BDAT message before the
    /// reply to the line before it came; a DATA then makes the guard drop
    /// the diversion without a `DivertFinished`, and the MTA gets the
    /// next chunk of what the daemon still takes for a diverted message.
    #[test]
    fn a_diverted_bdat_message_is_not_dropped_silently() {
        let setup = Setup {
            initial: Disp::Quarantine,
            ..Setup::default()
        };
        let ops = [
            Op::Send(b"Subject: hi\r\n".to_vec()),
            Op::Send(b"BDAT 3\r\n".to_vec()),
            Op::Send(b"EHLO x\r\n".to_vec()),
            Op::Send(b"DATA\r\n".to_vec()),
            Op::Send(b"BDAT 5 LAST\r\n".to_vec()),
        ];
        Sim::run(setup, only(|c| c.agreement = true), &ops);
    }

    /// Random seeds (91 and 130 of `PROPTEST_RNG_SEED`) shrank to this: a
    /// quarantined session diverts a BDAT chunk, the client abandons the
    /// message (EHLO between its chunks), and its next `BDAT 5 LAST`, with
    /// no transaction left, goes to the MTA to be refused. The guard and the
    /// MTA agree that a (refused) message is open; the simulation took it
    /// for the abandoned diverted one, as it did not hear `DivertAborted`.
    #[test]
    fn a_bdat_after_an_abandoned_diversion_is_the_mtas_to_refuse() {
        let setup = Setup {
            auto_proceed: true,
            decisions: vec![Disp::Tag, Disp::Quarantine],
            ..Setup::default()
        };
        let ops = [
            Op::Send(b"EHLO x\r\n".to_vec()),
            Op::Send(b"FOO\r\n".to_vec()),
            Op::Send(b"EHLO x\r\n".to_vec()),
            Op::Send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n".to_vec()),
            Op::Send(b"\r\n.\r\n".to_vec()),
            Op::Send(b"BDAT 3\r\n".to_vec()),
            Op::Send(b"EHLO x\r\n".to_vec()),
            Op::Send(b"EHLO x\r\n".to_vec()),
            Op::Send(b"BDAT 5 LAST\r\n".to_vec()),
        ];
        let s = Sim::run(setup, Checks::all(), &ops);
        assert!(s.events.contains(&Event::DivertAborted));
        assert!(s.t.in_message(), "the guard waits for the 5 octets too");
    }

    /// The session turns to quarantine between the chunks of a BDAT
    /// message the MTA already holds. That message started out to the MTA,
    /// so it ends there, as a DATA message in flight does: diverting its
    /// last chunk stored a fragment (`de`), our RSET then dropped the MTA's
    /// part (`abc`), and the client was told 250 for mail nobody had.
    /// The next message is diverted.
    #[test]
    fn a_disposition_change_between_chunks_waits_for_the_next_message() {
        let mut s = session(Setup::default(), Checks::all());
        say(&mut s, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabc");
        s.set_disposition(Disp::Quarantine);
        let from = s.client_rx.len();
        say(&mut s, b"BDAT 2 LAST\r\nde");
        assert_eq!(heard(&s, from), "250 2.0.0 queued #5\r\n");
        assert_eq!(s.mta.bodies.len(), 1);
        assert!(s.mta.bodies[0].complete);
        assert_eq!(s.mta.bodies[0].raw, b"abcde");
        assert!(s.diverted.is_empty(), "{:?}", s.diverted);

        say(
            &mut s,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 2 LAST\r\nfg",
        );
        s.finish();
        assert_eq!(s.diverted, [b"fg".to_vec()]);
        assert_eq!(s.mta.bodies.len(), 1, "nothing more for the MTA");
    }

    /// The same for DATA sent inside a BDAT message the MTA holds (RFC 3030
    /// §2: the two do not mix, 503): the guard does not open a diverted
    /// DATA message beside the MTA's open one.
    #[test]
    fn data_inside_an_open_bdat_message_is_not_diverted() {
        let mut s = session(Setup::default(), Checks::all());
        say(&mut s, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabc");
        s.set_disposition(Disp::Quarantine);
        let from = s.client_rx.len();
        say(&mut s, b"DATA\r\n");
        assert_eq!(
            heard(&s, from),
            String::from_utf8_lossy(mxguard_smtp::tracker::BDAT_BUSY)
        );
        say(&mut s, b"BDAT 0 LAST\r\n");
        s.finish();
        assert!(!s.events.contains(&Event::DivertStarted), "{:?}", s.events);
        assert!(s.mta.bodies[0].complete);
        assert_eq!(s.mta.bodies[0].raw, b"abc");
    }

    /// An EHLO the MTA refuses (`501` to a bare EHLO) leaves its
    /// transaction, and the BDAT message in it, as they were: the guard must
    /// not take the next chunk for the start of a new message, to divert.
    #[test]
    fn a_refused_ehlo_does_not_end_an_open_bdat_message() {
        let mut s = session(Setup::default(), Checks::all());
        say(&mut s, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabc");
        s.set_disposition(Disp::Quarantine);
        say(&mut s, b"EHLO\r\n");
        assert!(s
            .client_rx
            .ends_with(b"501 5.5.4 Syntax: EHLO hostname #5\r\n"));
        say(&mut s, b"BDAT 2 LAST\r\nde");
        s.finish();
        assert!(s.client_rx.ends_with(b"250 2.0.0 queued #6\r\n"));
        assert_eq!(s.mta.bodies[0].raw, b"abcde");
        assert!(s.diverted.is_empty(), "{:?}", s.diverted);
    }

    /// The same inside a diverted BDAT message: a refused EHLO does not
    /// abandon it (the quarantine would store its last chunk alone), an
    /// accepted one does.
    #[test]
    fn a_diverted_bdat_message_ends_only_at_an_ehlo_the_mta_takes() {
        let setup = Setup {
            initial: Disp::Quarantine,
            ..Setup::default()
        };
        let mut s = session(setup, Checks::all());
        say(&mut s, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabc");
        say(&mut s, b"EHLO\r\n");
        say(&mut s, b"BDAT 2 LAST\r\nde");
        assert!(!s.events.contains(&Event::DivertAborted));
        assert_eq!(s.diverted, [b"abcde".to_vec()]);

        say(&mut s, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabc");
        say(&mut s, b"EHLO x\r\n");
        assert!(s.events.contains(&Event::DivertAborted));
        s.finish();
        assert_eq!(s.diverted.len(), 1, "{:?}", s.diverted);
        assert!(s.mta.bodies.is_empty());
    }

    /// `BDAT 0 LAST` with no transaction, then a message pipelined after
    /// it: the MTA's `554` to the first comes in once the second is open,
    /// and must not end it. Seed 14 shrank to this with a tag (a second
    /// header in the middle of the message); in a quarantined session the
    /// guard diverted the rest of the open message.
    #[test]
    fn a_failed_chunk_of_an_earlier_message_does_not_end_the_open_one() {
        let ops = [
            Op::Send(b"BDAT 0 LAST\r\n".to_vec()),
            Op::Send(
                b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabcBDAT 2 LAST\r\nde".to_vec(),
            ),
            Op::ClientRead(41),
            Op::Policy(Disp::Tag),
            Op::UpstreamWrite(13),
            Op::ClientRead(3),
            Op::UpstreamRead(34),
        ];
        Sim::run(Setup::default(), Checks::all(), &ops);

        let mut s = session(Setup::default(), Checks::all());
        for op in [
            Op::Send(b"BDAT 0 LAST\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabc".to_vec()),
            Op::ClientRead(4096),
            Op::Policy(Disp::Quarantine),
            Op::UpstreamWrite(4096),
            Op::UpstreamRead(4096),
            Op::Send(b"BDAT 2 LAST\r\nde".to_vec()),
        ] {
            s.step(&op);
        }
        s.finish();
        assert!(s.client_rx.ends_with(b"250 2.0.0 queued #6\r\n"));
        assert_eq!(s.mta.bodies[1].raw, b"abcde");
        assert!(s.diverted.is_empty(), "{:?}", s.diverted);
    }

    /// In a tagged session, a MAIL inside a BDAT transaction (refused by
    /// the MTA as nested) makes the guard put the header into the middle
    /// of the message as well.
    #[test]
    fn the_tag_header_goes_on_top_of_a_bdat_message_once() {
        let setup = Setup {
            initial: Disp::Tag,
            ..Setup::default()
        };
        let mut s = session(setup, Checks::default());
        say(&mut s, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabc");
        say(&mut s, b"MAIL FROM:<a@b>\r\n");
        assert!(s
            .client_rx
            .ends_with(b"503 5.5.1 Error: nested MAIL command #5\r\n"));
        say(&mut s, b"BDAT 0 LAST\r\n");
        let message = &s.mta.bodies[0];
        assert!(message.complete);
        let mut expected = TAG.to_vec();
        expected.extend_from_slice(b"abc");
        assert_eq!(
            String::from_utf8_lossy(&message.raw),
            String::from_utf8_lossy(&expected)
        );
    }
}
