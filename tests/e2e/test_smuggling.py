"""SMTP smuggling (CVE-2023-51764/5/6) through the guard to a real Postfix.

The payloads are the published ones (SEC Consult's research and the
smtp_smuggling_checker list): a message whose body carries an end-of-data
look-alike with a bare CR or LF, followed by a second, forged transaction
(MAIL FROM, RCPT TO, DATA, a message). Postfix 3.7 as packaged here
(`smtpd_forbid_bare_newline = no`) ends a message at several of them — the
first test shows that, straight to Postfix, a second message is queued. With
the guard in front, no payload ever yields a second message:

- `turns.smuggling = "reject"`: a look-alike ends the session with a 554
  and a cut MTA connection: nothing arrives at all;
- `turns.smuggling = "normalize"` (with `actions.smuggling = "observe"`):
  exactly one message arrives, with the look-alike and the forged
  transaction in it as plain content.

Byte sequences that are no look-alike (NUL tricks aimed at other MTAs, a
dot-stuffed line) go through as content in both modes.
"""

import json
import re
import time

import pytest

from peers import PostfixMta, RawClient, strip_trace_headers, wait_until

# (id, the sequence that follows the outer message's text, a look-alike?)
PAYLOADS = [
    ("LF.LF", b"\n.\n", True),
    ("LF.CRLF", b"\n.\r\n", True),
    ("CRLF.LF", b"\r\n.\n", True),
    ("CR.CR", b"\r.\r", True),
    ("CRLF.CR", b"\r\n.\r", True),
    ("CR.CRLF", b"\r.\r\n", True),
    ("LF.CR", b"\n.\r", True),
    ("CR.LF", b"\r.\n", True),
    ("LFLF.CRLF", b"\n\n.\r\n", True),
    ("CRLF.CRCRLF", b"\r\n.\r\r\n", True),  # Postfix strips every CR before the LF
    ("CRLF-NUL.CRLF", b"\r\n\x00.\r\n", False),
    ("CRLF.NUL-CRLF", b"\r\n.\x00\r\n", False),
    ("CRLF-NUL.CR", b"\r\n\x00.\r", False),
    ("CRLF-NUL.LF", b"\r\n\x00.\n", False),
    ("CRLF.", b"\r\n.", False),
]
# Straight to this Postfix, these end the message (measured, see the first test).
POSTFIX_ENDS_AT = {"LF.LF", "LF.CRLF", "CRLF.LF", "LFLF.CRLF", "CRLF.CRCRLF"}

OUTER = (b"From: Alice <alice@sender.example.test>\r\nTo: bob@example.test\r\n"
         b"Subject: outer %s\r\nMessage-ID: <outer-%s@sender.example.test>\r\n"
         b"Date: Sun, 22 Nov 2026 12:00:00 +0000\r\n\r\nouter text")
FORGED = (b"MAIL FROM:<ceo@bank.example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
          b"From: CEO <ceo@bank.example.test>\r\nTo: bob@example.test\r\n"
          b"Subject: smuggled %s\r\nMessage-ID: <smuggled-%s@bank.example.test>\r\n\r\n"
          b"wire the money\r\n")


def payload(seq: bytes, token: str) -> bytes:
    """The DATA body as the client sends it, final dot included."""
    t = token.encode()
    return OUTER % (t, t) + seq + FORGED % (t, t) + b".\r\n"


def send_smuggler(port: int, source: str, seq: bytes, token: str) -> tuple[list[int], RawClient]:
    """One transaction carrying the payload; returns every reply code the
    client got after the body (a smuggled message shows up as 250 250 250
    354 250)."""
    c = RawClient("127.0.0.1", port, source=source)
    assert c.read_reply().code == 220
    assert c.command(b"EHLO smuggler.example.test\r\n").code == 250
    assert c.command(b"MAIL FROM:<alice@sender.example.test>\r\n").code == 250
    assert c.command(b"RCPT TO:<bob@example.test>\r\n").code == 250
    assert c.command(b"DATA\r\n").code == 354
    c.send(payload(seq, token))
    codes = []
    try:
        codes.append(c.read_reply(timeout=5))
        while True:  # anything more is the smuggled transaction's replies
            codes.append(c.read_reply(timeout=0.5))
    except (TimeoutError, OSError, AssertionError):
        pass
    if not c.eof:
        try:
            c.send(b"QUIT\r\n")
            c.read_until_closed(timeout=3)
        except (TimeoutError, OSError):
            pass
    c.close()
    return codes, c


def queued(mta: PostfixMta) -> int:
    """Messages Postfix's cleanup accepted so far."""
    return len(re.findall(r"/cleanup\[\d+\]: \w+: message-id=", mta.log()))


def settle(mta: PostfixMta, connections: int):
    mta.wait_log(r"/smtpd\[\d+\]: disconnect from ", count=connections)
    time.sleep(0.3)


def normalised(seq: bytes, token: str) -> bytes:
    """What a normalised message looks like in the Maildir: every CR, LF or
    CRLF one line end (LF in the Maildir); the look-alike's dot line arrives
    as a line `.` (the guard stuffs it), any other leading dot is SMTP
    transparency and taken off."""
    body = payload(seq, token)[:-len(b".\r\n")]
    lines = re.split(rb"\r\n|\r|\n", body)[:-1]
    return b"".join((line[1:] if line.startswith(b".") and line != b"." else line) + b"\n" for line in lines)


@pytest.fixture
def victim(workdir) -> PostfixMta:
    return PostfixMta(workdir, name="victim")


@pytest.mark.parametrize("name,seq", [(n, s) for n, s, _ in PAYLOADS if n in POSTFIX_ENDS_AT])
def test_without_the_guard_postfix_queues_the_smuggled_message(name, seq, victim):
    codes, _ = send_smuggler(victim.port, "127.0.0.2", seq, "direct")
    settle(victim, 1)
    assert [r.code for r in codes] == [250, 250, 250, 354, 250]
    assert queued(victim) == 2
    assert len(victim.stored()) == 2 and any(b"Subject: smuggled direct" in m for m in victim.stored())


def reject_mode(victim, make_guard, seq, lookalike):
    """turns.smuggling = "reject" (the default), actions as shipped."""
    guard = make_guard(upstream=victim.addr, name="guard-reject",
                       **{"turns.smuggling": "reject", "greet.delay": "200ms"})

    replies, client = send_smuggler(guard.port, "127.0.0.2", seq, "reject")
    settle(victim, 1)

    assert queued(victim) <= 1 and len(victim.stored()) <= 1, "reject mode: a second message was queued"
    assert not any(strip_trace_headers(m).startswith(b"From: CEO") for m in victim.stored())
    if lookalike:
        assert [r.code for r in replies] == [554], [r.text for r in replies]
        assert replies[0].lines == [b"554 5.7.1 guard.example.test Error: protocol violation (smuggling)\r\n"]
        assert client.eof
        assert queued(victim) == 0 and victim.stored() == [], "reject mode: the MTA dropped the cut message"
        victim.wait_log(r"lost connection after (DATA|END-OF-MESSAGE) .*from unknown\[127\.0\.0\.1\]")
        guard.wait_log(r"SMUGGLING from \[127\.0\.0\.2\]:\d+: end-of-data look-alike <(CR|LF|CR><LF)>\.<")
        guard.wait_metric("mxguard_detections_total", 1, test="smuggling")
        assert guard.wait_verdict("127.0.0.2")["verdict"] == "reject"
    else:
        assert [r.code for r in replies] == [250]
        [stored] = victim.stored()
        assert b"Subject: outer reject" in stored and b"Subject: smuggled reject" in stored
        assert guard.metric("mxguard_detections_total", test="smuggling") == 0
    guard.stop()
    return len(victim.stored())


def normalize_mode(victim, make_guard, seq, lookalike, before: int):
    """turns.smuggling = "normalize", with the test observing."""
    guard = make_guard(upstream=victim.addr, name="guard-normalize",
                       **{"turns.smuggling": "normalize", "actions.smuggling": "observe", "greet.delay": "200ms"})

    replies, _ = send_smuggler(guard.port, "127.0.0.3", seq, "normalize")
    settle(victim, 2)

    assert [r.code for r in replies] == [250], [r.text for r in replies]
    assert queued(victim) == before + 1, "normalize mode: exactly one more message"
    [stored] = [m for m in victim.stored() if b"Subject: outer normalize" in m]
    assert len(victim.stored()) == before + 1
    assert strip_trace_headers(stored) == normalised(seq, "normalize")
    if lookalike:
        # the look-alike is a line "." of content, the forged commands text
        assert re.search(rb"\n\.\n\n?MAIL FROM:<ceo@bank\.example\.test>\nRCPT TO:", stored), stored
        guard.wait_metric("mxguard_detections_total", 1, test="smuggling")
        verdict = guard.wait_verdict("127.0.0.3")
        assert (verdict["verdict"], verdict["test"]) == ("pass", "smuggling")
    else:
        assert guard.metric("mxguard_detections_total", test="smuggling") == 0


@pytest.mark.parametrize("name,seq,lookalike", PAYLOADS, ids=[p[0] for p in PAYLOADS])
def test_no_payload_yields_a_second_message(name, seq, lookalike, victim, make_guard):
    before = reject_mode(victim, make_guard, seq, lookalike)
    normalize_mode(victim, make_guard, seq, lookalike, before)


def test_reject_mode_refuses_the_message_even_when_the_test_only_observes(victim, make_guard):
    """`actions.smuggling = "observe"` cannot let a look-alike through in
    reject mode: the message is refused with its own 554, the address is
    not blocklisted."""
    guard = make_guard(upstream=victim.addr, **{"turns.smuggling": "reject", "actions.smuggling": "observe"})

    replies, client = send_smuggler(guard.port, "127.0.0.2", b"\n.\n", "observed")
    settle(victim, 1)

    assert [r.lines for r in replies] == [
        [b"554 5.7.0 guard.example.test Message refused: bare CR or LF around the end of data\r\n"]]
    assert client.eof
    assert queued(victim) == 0 and victim.stored() == []
    again = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert again.read_line()[1].startswith(b"220-"), "not blocklisted"
    again.close()


@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_a_quarantined_message_with_a_look_alike(mode, sink, make_guard, workdir):
    """The guard stores the message itself here, so it must also agree with
    itself about where it ends: refused and not stored (reject), or stored
    whole with the look-alike as a line of content (normalize)."""
    guard = make_guard(upstream=sink.addr, **{"turns.smuggling": mode, "actions.smuggling": "observe",
                                             "actions.pipelining": "quarantine",
                                             "quarantine.dir": str(workdir / "q")})
    c = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert c.read_reply().code == 220
    c.send(b"EHLO hasty.example.test\r\nNOOP\r\n")  # trips pipelining: quarantine
    assert [c.read_reply().code for _ in range(2)] == [250, 250]
    for cmd in (b"MAIL FROM:<alice@sender.example.test>\r\n", b"RCPT TO:<bob@example.test>\r\n"):
        assert c.command(cmd).code == 250
    assert c.command(b"DATA\r\n").code == 354
    c.send(payload(b"\n.\n", "q"))
    reply = c.read_reply()
    c.close()

    new, tmp = workdir / "q" / "new", workdir / "q" / "tmp"
    if mode == "reject":
        assert reply.code == 554, reply.text
        wait_until(lambda: not list(tmp.iterdir()), 5, "the partial quarantine file removed")
        assert list(new.iterdir()) == []
    else:
        assert reply.code == 250, reply.text
        [path] = list(new.iterdir())
        header, _, stored = path.read_bytes().partition(b"\n")
        assert stored == normalised(b"\n.\n", "q").replace(b"\n", b"\r\n")
        # docs/quarantine.md: `tests` are the tests that fired — here also the
        # one the stored message itself fired
        assert json.loads(header)["tests"] == ["pipelining", "smuggling"], header
    # smtp-sink opens a dump file at MAIL and removes it at RSET or a cut
    wait_until(lambda: not list(sink.dump.iterdir()), 5, "no message at the MTA")
    assert not re.search(r"smtp-sink: (DATA|\.)$", sink.log(), re.M), sink.log()
