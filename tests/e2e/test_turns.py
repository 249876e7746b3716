"""Turn-taking after the greeting, with the clients real mail comes from.

Postfix's smtp client and Exim pipeline MAIL, RCPT and DATA when the MTA
offers PIPELINING (RFC 2920) and wait for every reply when it does not; Exim
also sends BDAT (RFC 3030) when CHUNKING is offered. Through the guard, in
front of a real Postfix, each delivers byte for byte and trips no test —
with PIPELINING passed on, and with `turns.strip_pipelining` hiding it (they
wait then). Each story first checks, from the client's own transcript, that
the client really did pipeline (or really did wait), so a pass means
something.

Held replies (`turns.reply_delay.*`) reach the client late by the configured
time, and a client that waits for them is not flagged; one that does not is.
"""

import re
import time

import pytest

from peers import (EximSender, PostfixSender, RawClient, exim_unavailable, lf, make_message,
                   strip_trace_headers)

needs_exim = pytest.mark.skipif(exim_unavailable() is not None, reason=str(exim_unavailable()))


def detections(guard) -> dict[str, float]:
    return {k: v for k, v in guard.metrics().items() if k.startswith("mxguard_detections_total") and v}


def assert_clean(guard, client_ip: str, sessions: int):
    verdicts = guard.verdicts(client_ip)
    assert len(verdicts) >= sessions, verdicts
    assert all((v["verdict"], v["test"]) == ("pass", "none") for v in verdicts), verdicts
    assert detections(guard) == {}, guard.log()[-3000:]
    assert not re.search(r"(PIPELINING|EARLY-DATA|BARE-LF|LONG-LINE|UNKNOWN-COMMANDS|SMUGGLING) from",
                         guard.log()), guard.log()[-3000:]


def groups(transcript: list[tuple[str, str]]) -> list[list[str]]:
    """Runs of commands the client sent without reading a reply in between."""
    out, run = [], []
    for direction, text in transcript:
        if direction == ">":
            run.append(text.split(" ")[0].split(":")[0].upper())
        elif run:
            out.append(run)
            run = []
    if run:
        out.append(run)
    return out


@pytest.mark.parametrize("strip", [False, True], ids=["pipelining-offered", "pipelining-stripped"])
def test_postfix_smtp_client_is_never_flagged(strip, mta, make_guard, workdir):
    guard = make_guard(upstream=mta.addr, **{"turns.strip_pipelining": strip})
    sender = PostfixSender(workdir, relay=f"[127.0.0.1]:{guard.port}", bind="127.0.0.4",
                           extra_main={"debug_peer_list": "127.0.0.0/8"})
    msgs = [make_message(), make_message()]

    for msg in msgs:
        sender.send(msg)
    sender.wait_sent(count=2)

    for msg in msgs:
        assert strip_trace_headers(mta.wait_for(msg.token)) == lf(msg.data)
    conversations = sender.smtp_conversations()
    offered = [text for c in conversations for d, text in c if d == "<" and "PIPELINING" in text]
    sent_groups = [g for c in conversations for g in groups(c)]
    if strip:
        assert offered == [], "the client must not see PIPELINING"
        assert all(len(g) == 1 for g in sent_groups), f"Postfix waited for each reply: {sent_groups}"
    else:
        assert offered, "the client saw PIPELINING"
        assert ["MAIL", "RCPT", "DATA"] in sent_groups, f"Postfix pipelined the envelope: {sent_groups}"
    assert_clean(guard, "127.0.0.4", sessions=1)


@needs_exim
@pytest.mark.parametrize("strip", [False, True], ids=["pipelining-offered", "pipelining-stripped"])
def test_exim_is_never_flagged(strip, mta, make_guard, workdir):
    # Postfix offers CHUNKING too; this story is about DATA, so Exim is told
    # not to use it (the BDAT story is below).
    guard = make_guard(upstream=mta.addr, **{"turns.strip_pipelining": strip})
    exim = EximSender(workdir, "127.0.0.1", guard.port, bind="127.0.0.5",
                      transport_options=["hosts_try_chunking = :"])
    msgs = [make_message(), make_message()]

    results = [exim.send(msg) for msg in msgs]

    for msg, result in zip(msgs, results):
        assert result.rc == 0 and "=> bob@example.test" in result.transcript, result.transcript
        assert strip_trace_headers(mta.wait_for(msg.token)) == lf(msg.data)
        if strip:
            assert "PIPELINING" not in result.transcript
            assert not any(c.endswith("|") for c in result.cmdlog), result.cmdlog
        else:
            assert re.search(r"250[- ]PIPELINING", result.transcript), result.transcript
            assert "MAIL|" in result.cmdlog and "RCPT|" in result.cmdlog, result.cmdlog
        assert "DATA" in result.cmdlog and "BDAT" not in result.transcript
    assert_clean(guard, "127.0.0.5", sessions=2)


@needs_exim
@pytest.mark.parametrize("strip", [False, True], ids=["pipelining-offered", "pipelining-stripped"])
def test_exim_sends_bdat_to_a_chunking_postfix_and_is_never_flagged(strip, mta, make_guard, workdir):
    guard = make_guard(upstream=mta.addr, **{"turns.strip_pipelining": strip})
    exim = EximSender(workdir, "127.0.0.1", guard.port, bind="127.0.0.5")
    small, big = make_message(), make_message(body_lines=[f"line {i:05d} " + "y" * 70 for i in range(4000)])

    for msg in (small, big):
        result = exim.send(msg)
        assert result.rc == 0 and "=> bob@example.test" in result.transcript, result.transcript
        assert re.search(r"250[- ]CHUNKING", result.transcript), result.transcript
        assert re.search(r"SMTP[>|+]> BDAT \d+ LAST", result.transcript), result.transcript
        if not strip:
            assert "MAIL|" in result.cmdlog, result.cmdlog
        assert strip_trace_headers(mta.wait_for(msg.token)) == lf(msg.data)
    assert_clean(guard, "127.0.0.5", sessions=2)


def test_held_replies_arrive_late_and_a_client_that_waits_is_not_flagged(sink, make_guard):
    delay = 0.5
    guard = make_guard(upstream=sink.addr, **{f"turns.reply_delay.{k}": f"{int(delay * 1000)}ms"
                                              for k in ("ehlo", "mail", "rcpt", "data", "end_of_data")})
    msg = make_message()
    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert client.read_reply().code == 220

    took = {}
    for name, cmd, code in [("ehlo", b"EHLO waits.example.test\r\n", 250),
                            ("mail", f"MAIL FROM:<{msg.sender}>\r\n".encode(), 250),
                            ("rcpt", f"RCPT TO:<{msg.rcpt}>\r\n".encode(), 250),
                            ("data", b"DATA\r\n", 354),
                            ("end_of_data", msg.data.replace(b"\r\n.", b"\r\n..") + b".\r\n", 250),
                            ("quit", b"QUIT\r\n", 221)]:
        t = time.monotonic()
        assert client.command(cmd).code == code, name
        took[name] = time.monotonic() - t
    client.close()

    for name in ("ehlo", "mail", "rcpt", "data", "end_of_data"):
        assert delay <= took[name] < 2 * delay, took  # held once, not twice
    assert took["quit"] < 0.3, took  # `other` is 0s
    [stored] = sink.wait_messages(1)
    assert stored.content == lf(msg.data)
    assert_clean(guard, "127.0.0.2", sessions=1)


def test_a_client_that_does_not_wait_for_a_held_reply_is_caught(sink, make_guard):
    """A bot that sends its next command 100 ms after EHLO never noticed that
    the reply had not come yet: the held reply is what catches it."""
    guard = make_guard(upstream=sink.addr, **{"turns.reply_delay.ehlo": "1s"})
    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    greeting = client.read_reply()
    assert greeting.code == 220

    client.send(b"EHLO hasty.example.test\r\n")
    time.sleep(0.1)
    client.send(b"MAIL FROM:<bot@hasty.example.test>\r\n")
    seen = client.read_until_closed(timeout=5)[len(b"".join(greeting.lines)):]
    client.close()

    # the held EHLO reply never goes out: the bot gets the refusal instead
    assert re.fullmatch(rb"554 5\.7\.1 guard\.example\.test Error: protocol violation \(pipelining\)\r\n", seen), seen
    guard.wait_log(r"PIPELINING from \[127\.0\.0\.2\]:\d+: MAIL sent before the reply to EHLO")
    guard.wait_metric("mxguard_detections_total", 1, test="pipelining")
    assert "MAIL FROM:<bot@hasty.example.test>" not in sink.commands()


ALL_DELAYS = {f"turns.reply_delay.{k}": "300ms" for k in ("ehlo", "helo", "mail", "rcpt", "data", "end_of_data",
                                                          "other")}


def test_postfix_and_exim_wait_out_held_replies_without_a_violation(mta, make_guard, workdir):
    """Every reply held 300 ms: a held reply counts as not received, and real
    clients, pipelining or not, still never send what they must not."""
    guard = make_guard(upstream=mta.addr, **ALL_DELAYS, **{"pass_cache.ttl": "0s"})
    sender = PostfixSender(workdir, relay=f"[127.0.0.1]:{guard.port}", bind="127.0.0.4")
    msgs = [make_message(), make_message()]

    sender.send(msgs[0])
    sender.wait_sent(count=1)
    if exim_unavailable() is None:
        exim = EximSender(workdir, "127.0.0.1", guard.port, bind="127.0.0.5")
        result = exim.send(msgs[1])
        assert result.rc == 0 and "MAIL|" in result.cmdlog, result.transcript
    else:
        sender.send(msgs[1])
        sender.wait_sent(count=2)

    for msg in msgs:
        assert strip_trace_headers(mta.wait_for(msg.token)) == lf(msg.data)
    assert detections(guard) == {}, guard.log()[-3000:]
    assert all(v["verdict"] == "pass" for v in guard.verdicts()), guard.verdicts()


def test_the_time_a_client_takes_to_answer_is_recorded(sink, make_guard):
    """The timing classifier's raw material: turns counted, and the shortest
    gap between the end of our reply and the client's next command —
    measured from when the (held) reply went out, not from when the MTA
    answered."""
    guard = make_guard(upstream=sink.addr, **{"turns.reply_delay.ehlo": "300ms", "turns.reply_delay.other": "300ms"})
    c = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert c.read_reply().code == 220
    # 1 s after the greeting, then 250 ms after each held reply: from when
    # the MTA answered, those would be 550 ms
    for pause, cmd in ((1.0, b"EHLO slow.example.test\r\n"), (0.25, b"NOOP\r\n"), (0.25, b"QUIT\r\n")):
        time.sleep(pause)
        c.command(cmd)
    c.close()

    verdict = guard.wait_verdict("127.0.0.2")
    assert int(verdict["turns"]) == 3, verdict
    assert 250 <= float(verdict["min_gap_ms"]) < 500, verdict
