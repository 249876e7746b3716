"""What happens to a suspect session's mail, action by action.

A real client (Python's smtplib) trips a test on its way in — it sends EHLO
and NOOP in one write (`pipelining`), or its EHLO before the greeting is over
(`pregreet`) — and then sends a normal message. The action configured for
that test decides what the MTA gets:

- tag:        the message, byte for byte, under one inserted header line;
- quarantine: the envelope and an RSET, never the message; the message is
              in the quarantine directory, with its envelope;
- discard:    the envelope and an RSET; nothing stored; the client got 250;
- tempfail:   nothing; the client got 421;
- tarpit:     the message, every reply late by `actions.tarpit_delay`.

Then the corners: a suspect session is not offered STARTTLS or CHUNKING; one
that turns suspect after CHUNKING was offered gets its BDAT chunks tagged
(size rewritten) or diverted; a clean session's STARTTLS goes through the
watch to a real Postfix.
"""

import json
import re
import smtplib
import socket
import time

import pytest

from peers import (PostfixMta, RawClient, lf, make_message, smtplib_suspect, strip_trace_headers, swaks,
                   wait_until)

TRIPS = ["pipelining", "pregreet"]


def suspect_config(trip: str, action: str, workdir) -> dict:
    """The tripped test gets `action`; the other one (and pregreet's block
    list) stay out of the way."""
    cfg = {"actions.pipelining": "observe", "pregreet.action": "observe", "quarantine.dir": str(workdir / "quarantine")}
    cfg["pregreet.action" if trip == "pregreet" else "actions.pipelining"] = action
    return cfg


def tag_line(trip: str, client="127.0.0.2") -> bytes:
    return f"X-MXGuard: suspect; tests={trip}; client=[{client}]\r\n".encode()


def quarantined(workdir) -> list:
    new = workdir / "quarantine" / "new"
    return sorted(new.iterdir()) if new.exists() else []


def verbs(sink) -> list[str]:
    """The verb of every command smtp-sink read, upper-cased (smtplib sends
    `mail FROM:`, and `.` is the end of a message)."""
    out = []
    for line in sink.log().splitlines():
        m = re.match(r"smtp-sink: ([A-Za-z]+|\.)(?:[ :]|$)", line)
        if m and m.group(1) not in ("connect", "disconnect", "fd", "name_mask", "trying", "vstream_tweak_tcp",
                                    "smtp_stream_setup"):
            out.append(m.group(1).upper())
    return out


def read_quarantined(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    header, _, message = raw.partition(b"\n")
    return json.loads(header), message


@pytest.mark.parametrize("trip", TRIPS)
def test_tag_inserts_one_header_and_changes_nothing_else(trip, sink, make_guard, workdir):
    guard = make_guard(upstream=sink.addr, **suspect_config(trip, "tag", workdir))
    msg = make_message()

    s = smtplib_suspect("127.0.0.1", guard.port, trip)
    assert s.sendmail(msg.sender, [msg.rcpt], msg.data) == {}
    s.quit()

    [stored] = sink.wait_messages(1)
    assert stored.content == lf(tag_line(trip) + msg.data)
    assert (stored.mail, stored.rcpts) == (f"<{msg.sender}>", [f"<{msg.rcpt}>"])
    verdict = guard.wait_verdict("127.0.0.2")
    assert (verdict["verdict"], verdict["test"]) == ("tag", trip)
    guard.wait_metric("mxguard_actions_total", 1, action="tag")


def test_tag_marks_every_message_of_the_session(sink, make_guard, workdir):
    guard = make_guard(upstream=sink.addr, **suspect_config("pipelining", "tag", workdir))
    msgs = [make_message(), make_message(), make_message()]

    s = smtplib_suspect("127.0.0.1", guard.port, "pipelining")
    for msg in msgs:
        assert s.sendmail(msg.sender, [msg.rcpt], msg.data) == {}
    s.quit()

    stored = sink.wait_messages(3)
    # (smtp-sink names its dumps by the second: their order is not the arrival order)
    assert sorted(m.content for m in stored) == sorted(lf(tag_line("pipelining") + m.data) for m in msgs)


def test_tag_through_postfix_keeps_the_message_byte_identical_under_the_header(mta, make_guard, workdir):
    guard = make_guard(upstream=mta.addr, **suspect_config("pipelining", "tag", workdir))
    msg = make_message()

    s = smtplib_suspect("127.0.0.1", guard.port, "pipelining")
    assert s.sendmail(msg.sender, [msg.rcpt], msg.data) == {}
    s.quit()

    assert strip_trace_headers(mta.wait_for(msg.token)) == lf(tag_line("pipelining") + msg.data)


@pytest.mark.parametrize("trip", TRIPS)
def test_quarantine_keeps_the_message_from_the_mta(trip, sink, make_guard, workdir):
    guard = make_guard(upstream=sink.addr, **suspect_config(trip, "quarantine", workdir))
    msg = make_message()

    s = smtplib_suspect("127.0.0.1", guard.port, trip)
    s.mail(msg.sender)
    s.rcpt(msg.rcpt)
    code, reply = s.data(msg.data)
    s.quit()

    assert code == 250, reply
    qid = re.fullmatch(rb"2\.0\.0 guard\.example\.test Ok: queued as (\S+)", reply).group(1).decode()
    [path] = quarantined(workdir)
    assert path.name == qid
    meta, stored = read_quarantined(path)
    assert stored == msg.data, "the quarantined message is what the client sent, unstuffed, CRLF"
    assert meta["client"].startswith("127.0.0.2:")
    assert (meta["mail_from"], meta["rcpt_to"], meta["tests"], meta["action"]) == (
        msg.sender, [msg.rcpt], [trip], "quarantine")
    assert meta["helo"] == "suspect.example.test"
    guard.wait_log(rf"QUARANTINE {qid} from \[127\.0\.0\.2\]:\d+")

    # The MTA saw the envelope (it checked the recipient), then RSET: no DATA.
    time.sleep(0.3)
    commands = verbs(sink)
    assert "DATA" not in commands and "." not in commands, commands
    assert commands[-4:] == ["MAIL", "RCPT", "RSET", "QUIT"], commands
    assert sink.no_messages(), sink.log()[-2000:]
    guard.wait_metric("mxguard_messages_total", 1, disposition="quarantine")
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "quarantine"


def test_quarantine_in_front_of_postfix_sends_rset_and_keeps_only_accepted_recipients(workdir, make_guard):
    mta = PostfixMta(workdir, extra_main={
        "smtpd_recipient_restrictions": "check_recipient_access inline:{nobody@example.test=REJECT}"})
    guard = make_guard(upstream=mta.addr, **suspect_config("pipelining", "quarantine", workdir))
    msg = make_message()

    s = smtplib_suspect("127.0.0.1", guard.port, "pipelining")
    refused = s.sendmail(msg.sender, [msg.rcpt, "nobody@example.test"], msg.data)
    s.quit()

    assert list(refused) == ["nobody@example.test"] and refused["nobody@example.test"][0] == 554
    [path] = quarantined(workdir)
    meta, stored = read_quarantined(path)
    assert meta["rcpt_to"] == [msg.rcpt], "only the recipient the MTA accepted"
    assert stored == msg.data
    line = mta.wait_log(r"disconnect from unknown\[127\.0\.0\.1\] (.*)$")[0].group(1)
    assert "data=" not in line and "rset=1" in line, line
    assert mta.stored() == []


@pytest.mark.parametrize("trip", TRIPS)
def test_discard_answers_250_and_keeps_nothing(trip, sink, make_guard, workdir):
    guard = make_guard(upstream=sink.addr, **suspect_config(trip, "discard", workdir))
    msg = make_message()

    s = smtplib_suspect("127.0.0.1", guard.port, trip)
    s.mail(msg.sender)
    s.rcpt(msg.rcpt)
    code, reply = s.data(msg.data)
    s.quit()

    assert code == 250, reply
    time.sleep(0.3)
    assert sink.no_messages(), sink.log()[-2000:]
    commands = verbs(sink)
    assert "DATA" not in commands and commands[-4:] == ["MAIL", "RCPT", "RSET", "QUIT"], commands
    assert quarantined(workdir) == []
    guard.wait_metric("mxguard_messages_total", 1, disposition="discard")
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "discard"


@pytest.mark.parametrize("trip", TRIPS)
def test_tempfail_answers_421_and_delivers_nothing(trip, sink, make_guard, workdir):
    guard = make_guard(upstream=sink.addr, **suspect_config(trip, "tempfail", workdir))

    if trip == "pregreet":
        client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
        client.send(b"EHLO early.example.test\r\n")
    else:
        client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
        assert client.read_reply().code == 220
        client.send(b"EHLO hasty.example.test\r\nNOOP\r\n")
    seen = client.read_until_closed(timeout=5)
    client.close()

    assert re.search(rb"(?m)^421 4\.\d\.\d guard\.example\.test", seen), seen
    assert b"\n250" not in seen
    time.sleep(0.3)
    assert sink.no_messages(), sink.log()[-2000:]
    assert "MAIL" not in verbs(sink) and "NOOP" not in verbs(sink), verbs(sink)
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "tempfail"
    # not blocklisted: the sender may retry
    again = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert again.read_line()[1].startswith(b"220-")
    again.close()


@pytest.mark.parametrize("trip", TRIPS)
def test_tarpit_slows_every_reply_and_delivers(trip, sink, make_guard, workdir):
    delay = 0.4
    guard = make_guard(upstream=sink.addr, **suspect_config(trip, "tarpit", workdir),
                       **{"actions.tarpit_delay": f"{int(delay * 1000)}ms"})
    msg = make_message()

    s = smtplib_suspect("127.0.0.1", guard.port, trip)
    took = {}

    def timed(name, fn, *args):
        t = time.monotonic()
        code, _ = fn(*args)
        took[name] = time.monotonic() - t
        return code

    assert timed("ehlo", s.ehlo, "again.example.test") == 250
    assert timed("mail", s.mail, msg.sender) == 250
    assert timed("rcpt", s.rcpt, msg.rcpt) == 250
    assert timed("data", s.data, msg.data) == 250  # two replies: 354 and 250
    assert timed("quit", s.quit) == 221

    for name in ("ehlo", "mail", "rcpt", "quit"):
        assert delay <= took[name] < 2 * delay, took  # once per reply
    assert 2 * delay <= took["data"] < 3 * delay, took
    [stored] = sink.wait_messages(1)
    assert stored.content == lf(msg.data)
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "tarpit"


def test_strongest_action_wins(sink, make_guard, workdir):
    """tag for pipelining, quarantine for unknown commands: a session that
    trips both has its message quarantined, not tagged."""
    guard = make_guard(upstream=sink.addr, **suspect_config("pipelining", "tag", workdir),
                       **{"actions.unknown_commands": "quarantine", "turns.unknown_command_limit": 1})
    msg = make_message()

    s = smtplib_suspect("127.0.0.1", guard.port, "pipelining")
    assert s.docmd("FROBNICATE")[0] // 100 == 5
    assert s.sendmail(msg.sender, [msg.rcpt], msg.data) == {}
    s.quit()

    [path] = quarantined(workdir)
    meta, stored = read_quarantined(path)
    assert stored == msg.data and meta["tests"] == ["pipelining", "unknown-commands"]
    time.sleep(0.3)
    assert sink.no_messages(), sink.log()[-2000:]
    verdict = guard.wait_verdict("127.0.0.2")
    assert (verdict["verdict"], verdict["test"]) == ("quarantine", "pipelining,unknown-commands")


# --------------------------------------------------------------------------
# TLS and CHUNKING for suspect sessions


def test_a_tagged_session_is_not_offered_starttls_or_chunking(mta, make_guard, workdir):
    guard = make_guard(upstream=mta.addr, **suspect_config("pipelining", "tag", workdir))
    msg = make_message()

    s = smtplib_suspect("127.0.0.1", guard.port, "pipelining")
    assert not s.has_extn("starttls") and not s.has_extn("chunking"), s.esmtp_features
    assert s.has_extn("pipelining") and s.has_extn("size")
    # A client that tries anyway is refused, and stays in plain sight.
    code, reply = s.docmd("STARTTLS")
    assert code == 454, reply
    assert s.sendmail(msg.sender, [msg.rcpt], msg.data) == {}
    s.quit()

    stored = mta.wait_for(msg.token)
    assert strip_trace_headers(stored) == lf(tag_line("pipelining") + msg.data)
    assert b"with ESMTPS" not in stored


def test_a_clean_session_is_offered_both(mta, make_guard):
    guard = make_guard(upstream=mta.addr)
    with smtplib.SMTP(timeout=10, source_address=("127.0.0.2", 0)) as s:
        s.connect("127.0.0.1", guard.port)
        s.ehlo("clean.example.test")
        assert s.has_extn("starttls") and s.has_extn("chunking") and s.has_extn("pipelining")
        s.quit()


def test_starttls_through_the_watch_to_postfix(mta, make_guard, workdir):
    """swaks --tls through a watching guard (held EHLO reply, PIPELINING
    hidden): the 220 goes out, the rest is TLS between swaks and Postfix."""
    guard = make_guard(upstream=mta.addr, **{"turns.watch": "session", "turns.reply_delay.ehlo": "200ms",
                                             "turns.strip_pipelining": True})
    # ~300 KB: bulk enough that the relay splices it
    msg = make_message(body_lines=["Hello Bob,", *["t" * 998] * 300, "bye"])

    out = swaks("127.0.0.1", guard.port, msg, source="127.0.0.2", extra=["--tls"], workdir=workdir)

    transcript = out.stdout.decode()
    assert "<-  220 2.0.0 Ready to start TLS" in transcript and "TLS started" in transcript, transcript
    assert "PIPELINING" not in transcript.split("TLS started")[0]
    stored = mta.wait_for(msg.token)
    assert strip_trace_headers(stored) == lf(msg.data)
    assert b"with ESMTPS" in stored
    verdict = guard.wait_verdict("127.0.0.2")
    assert (verdict["verdict"], verdict["test"]) == ("pass", "none")
    wait_until(lambda: guard.metric("mxguard_relayed_bytes_total", direction="upstream", mode="splice")
               > len(msg.data) / 2, 3, "TLS bytes spliced after the watch")


def ehlo_and_trip_after_chunking(client: RawClient) -> None:
    """EHLO (CHUNKING offered: nothing is suspect yet), then an unknown verb
    that turns the session suspect."""
    assert client.read_reply().code == 220
    ehlo = client.command(b"EHLO late.example.test\r\n")
    assert b"CHUNKING" in ehlo.text.encode(), ehlo.text
    assert client.command(b"FROBNICATE\r\n").code // 100 == 5


def test_bdat_is_tagged_with_its_size_rewritten(mta, make_guard, workdir):
    guard = make_guard(upstream=mta.addr, **{"actions.unknown_commands": "tag", "turns.unknown_command_limit": 1})
    msg = make_message()
    first, second = msg.data[:300], msg.data[300:]

    c = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    ehlo_and_trip_after_chunking(c)
    assert c.command(f"MAIL FROM:<{msg.sender}>\r\n".encode()).code == 250
    assert c.command(f"RCPT TO:<{msg.rcpt}>\r\n".encode()).code == 250
    assert c.command(f"BDAT {len(first)}\r\n".encode() + first).code == 250
    assert c.command(f"BDAT {len(second)} LAST\r\n".encode() + second).code == 250
    assert c.command(b"QUIT\r\n").code == 221
    c.close()

    header = f"X-MXGuard: suspect; tests=unknown-commands; client=[127.0.0.2]\r\n".encode()
    assert strip_trace_headers(mta.wait_for(msg.token)) == lf(header + msg.data)
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "tag"


@pytest.mark.parametrize("action", ["quarantine", "discard"])
def test_bdat_chunks_are_diverted(action, mta, make_guard, workdir):
    guard = make_guard(upstream=mta.addr, **{"actions.unknown_commands": action, "turns.unknown_command_limit": 1,
                                             "quarantine.dir": str(workdir / "quarantine")})
    msg = make_message()
    chunks = [msg.data[:100], msg.data[100:700], msg.data[700:]]

    c = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    ehlo_and_trip_after_chunking(c)
    assert c.command(f"MAIL FROM:<{msg.sender}>\r\n".encode()).code == 250
    assert c.command(f"RCPT TO:<{msg.rcpt}>\r\n".encode()).code == 250
    for chunk in chunks[:-1]:
        assert c.command(f"BDAT {len(chunk)}\r\n".encode() + chunk).code == 250
    last = c.command(f"BDAT {len(chunks[-1])} LAST\r\n".encode() + chunks[-1])
    assert last.code == 250, last.text
    assert c.command(b"QUIT\r\n").code == 221
    c.close()

    line = mta.wait_log(r"disconnect from unknown\[127\.0\.0\.1\] (.*)$")[0].group(1)
    assert "bdat=" not in line and "rset=1" in line, line
    assert mta.stored() == []
    if action == "quarantine":
        [path] = quarantined(workdir)
        meta, stored = read_quarantined(path)
        assert stored == msg.data
        assert meta["tests"] == ["unknown-commands"] and meta["rcpt_to"] == [msg.rcpt]
    else:
        assert quarantined(workdir) == []


# --------------------------------------------------------------------------
# diverting, at the edges


def test_quarantine_follows_a_legally_pipelining_client_across_two_messages(sink, make_guard, workdir):
    """RFC 2920 lets a client send the end of one message and the next
    envelope in one write, and its last QUIT with the last dot: each
    message is stored, the MTA gets RSET after each envelope, every reply
    comes back in order."""
    guard = make_guard(upstream=sink.addr, **suspect_config("pipelining", "quarantine", workdir))
    first, second = make_message(), make_message()

    def envelope(msg):
        return f"MAIL FROM:<{msg.sender}>\r\nRCPT TO:<{msg.rcpt}>\r\nDATA\r\n".encode()

    def body(msg):
        return msg.data.replace(b"\r\n.", b"\r\n..") + b".\r\n"

    c = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert c.read_reply().code == 220
    c.send(b"EHLO hasty.example.test\r\nNOOP\r\n")  # the trip
    assert [c.read_reply().code for _ in range(2)] == [250, 250]
    c.send(envelope(first))
    assert [c.read_reply().code for _ in range(3)] == [250, 250, 354]
    c.send(body(first) + envelope(second))
    assert [c.read_reply().code for _ in range(4)] == [250, 250, 250, 354]
    c.send(body(second) + b"QUIT\r\n")
    assert [c.read_reply().code for _ in range(2)] == [250, 221]
    c.close()

    stored = [read_quarantined(p) for p in quarantined(workdir)]
    assert sorted(m for _, m in stored) == sorted([first.data, second.data])
    time.sleep(0.3)
    assert verbs(sink)[-7:] == ["MAIL", "RCPT", "RSET", "MAIL", "RCPT", "RSET", "QUIT"], verbs(sink)
    assert sink.no_messages(), sink.log()[-2000:]


def test_quarantine_with_every_recipient_refused_lets_the_mta_refuse_the_data(workdir, make_guard):
    mta = PostfixMta(workdir, extra_main={
        "smtpd_recipient_restrictions": "check_recipient_access inline:{nobody@example.test=REJECT}"})
    guard = make_guard(upstream=mta.addr, **suspect_config("pipelining", "quarantine", workdir))

    s = smtplib_suspect("127.0.0.1", guard.port, "pipelining")
    s.mail("alice@sender.example.test")
    assert s.rcpt("nobody@example.test")[0] == 554
    with pytest.raises(smtplib.SMTPDataError) as refused:
        s.data(b"Subject: nobody\r\n\r\nhello\r\n")
    s.quit()

    assert refused.value.smtp_code == 554 and b"no valid recipients" in refused.value.smtp_error
    assert quarantined(workdir) == []
    assert mta.stored() == []


def test_quarantine_refuses_a_message_over_the_size_limit(sink, make_guard, workdir):
    guard = make_guard(upstream=sink.addr, **suspect_config("pipelining", "quarantine", workdir),
                       **{"quarantine.max_message_size": 2000})
    small, big = make_message(), make_message(body_lines=["x" * 76] * 100)

    s = smtplib_suspect("127.0.0.1", guard.port, "pipelining")
    with pytest.raises(smtplib.SMTPDataError) as too_big:
        s.sendmail(big.sender, [big.rcpt], big.data)
    assert too_big.value.smtp_code == 552
    assert s.sendmail(small.sender, [small.rcpt], small.data) == {}, "the session goes on"
    s.quit()

    [path] = quarantined(workdir)
    assert read_quarantined(path)[1] == small.data
    assert list((workdir / "quarantine" / "tmp").iterdir()) == []
    assert sink.no_messages(), sink.log()[-2000:]


@pytest.mark.parametrize("half_close", [False, True], ids=["open", "half-closed"])
@pytest.mark.parametrize("action", ["tag", "quarantine"])
def test_bdat_pipelined_with_the_envelope(action, half_close, mta, make_guard, workdir):
    """RFC 3030 §4.2: with PIPELINING, MAIL, RCPT and every BDAT chunk may go
    in one write. Tagged: the first chunk's size grows by the header;
    quarantined: the guard answers the chunks itself, in order.

    Half-closed: the client shuts its sending side after QUIT. A quarantined
    BDAT waits in the guard for the replies to MAIL and RCPT, so RSET and
    QUIT reach the MTA only after the client's FIN: the guard keeps the MTA
    side open for them (it shut it at once, RSET failed, the client got no
    reply to its stored message and sent it again)."""
    guard = make_guard(upstream=mta.addr, **{"actions.unknown_commands": action, "turns.unknown_command_limit": 1,
                                             "quarantine.dir": str(workdir / "quarantine")})
    msg = make_message()
    chunks = [msg.data[:500], msg.data[500:]]

    c = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    ehlo_and_trip_after_chunking(c)
    c.send(f"MAIL FROM:<{msg.sender}>\r\nRCPT TO:<{msg.rcpt}>\r\n".encode()
           + f"BDAT {len(chunks[0])}\r\n".encode() + chunks[0]
           + f"BDAT {len(chunks[1])} LAST\r\n".encode() + chunks[1] + b"QUIT\r\n")
    if half_close:
        c.sock.shutdown(socket.SHUT_WR)
    replies = [c.read_reply() for _ in range(5)]
    c.close()

    assert [r.code for r in replies] == [250, 250, 250, 250, 221], [r.text for r in replies]
    if half_close:
        assert guard.wait_verdict("127.0.0.2")["end"] == "eof"
    if action == "tag":
        header = b"X-MXGuard: suspect; tests=unknown-commands; client=[127.0.0.2]\r\n"
        assert strip_trace_headers(mta.wait_for(msg.token)) == lf(header + msg.data)
    else:
        [path] = quarantined(workdir)
        assert read_quarantined(path)[1] == msg.data
        assert mta.stored() == []


def test_a_session_that_turns_suspect_after_ehlo_cannot_start_tls(mta, make_guard, workdir):
    """STARTTLS was offered (nothing was suspect at EHLO); the client trips
    a test, then asks for TLS: refused, so the mail stays in sight and is
    tagged."""
    guard = make_guard(upstream=mta.addr, **{"actions.unknown_commands": "tag", "turns.unknown_command_limit": 1})
    msg = make_message()

    with smtplib.SMTP(timeout=10, source_address=("127.0.0.2", 0)) as s:
        s.connect("127.0.0.1", guard.port)
        s.ehlo("late.example.test")
        assert s.has_extn("starttls")
        assert s.docmd("FROBNICATE")[0] // 100 == 5
        assert s.docmd("STARTTLS")[0] == 454
        assert s.sendmail(msg.sender, [msg.rcpt], msg.data) == {}
        s.quit()

    header = b"X-MXGuard: suspect; tests=unknown-commands; client=[127.0.0.2]\r\n"
    stored = mta.wait_for(msg.token)
    assert strip_trace_headers(stored) == lf(header + msg.data) and b"ESMTPS" not in stored


def test_a_client_that_hangs_up_mid_message_leaves_nothing_in_the_quarantine(sink, make_guard, workdir):
    guard = make_guard(upstream=sink.addr, **suspect_config("pipelining", "quarantine", workdir))
    msg = make_message(body_lines=["z" * 76] * 5000)

    s = smtplib_suspect("127.0.0.1", guard.port, "pipelining")
    s.mail(msg.sender)
    s.rcpt(msg.rcpt)
    assert s.docmd("DATA")[0] == 354
    s.send(msg.data[: len(msg.data) // 2])
    wait_until(lambda: list((workdir / "quarantine" / "tmp").iterdir()), 5, "the message being written")
    s.close()

    wait_until(lambda: not list((workdir / "quarantine" / "tmp").iterdir()), 5, "the partial file removed")
    assert quarantined(workdir) == []
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "quarantine"
