"""Clean mail through the guard in fixed mode: what the MTA stores is byte for
byte what the client sent, and the client saw our `220-` challenge line
first, then the MTA's own banner as the last greeting line."""

import base64
import os
import re

from peers import (PostfixSender, RawClient, lf, make_message, smtplib_send, strip_trace_headers,
                   swaks, wait_until)

CHALLENGE = re.compile(rb"^220-guard\.example\.test ESMTP")


def test_swaks_delivers_through_guard_to_smtp_sink(sink, make_guard, workdir):
    guard = make_guard(upstream=sink.addr)
    msg = make_message()

    out = swaks("127.0.0.1", guard.port, msg, source="127.0.0.2", workdir=workdir).stdout.decode()

    greeting = [line for line in out.splitlines() if line.startswith("<-  220")]
    assert len(greeting) == 2, out
    assert re.match(r"<-  220-guard\.example\.test ESMTP", greeting[0]), out
    assert greeting[1] == "<-  220 sink.example.test ESMTP", out
    [stored] = sink.wait_messages(1)
    assert stored.content == lf(msg.data)
    assert (stored.mail, stored.rcpts) == (f"<{msg.sender}>", [f"<{msg.rcpt}>"])
    assert stored.helo == "swaks.example.test"
    verdict = guard.wait_verdict("127.0.0.2")
    assert (verdict["verdict"], verdict["test"]) == ("pass", "none")
    guard.wait_metric("mxguard_connections_total", 1, outcome="pass")


def test_smtplib_delivers_through_guard_to_postfix(mta, make_guard):
    guard = make_guard(upstream=mta.addr)
    msg = make_message()

    result = smtplib_send("127.0.0.1", guard.port, msg, source="127.0.0.3")

    # smtplib joins the lines of a multi-line reply with "\n".
    first, last = result["banner"].split(b"\n")
    assert CHALLENGE.match(b"220-" + first), result
    assert last == b"mta.example.test ESMTP Postfix-mta"
    assert result["refused"] == {}
    stored = mta.wait_for(msg.token)
    assert strip_trace_headers(stored) == lf(msg.data)
    # fixed mode: the MTA talks to the guard, not to the client
    assert b"(unknown [127.0.0.1])" in stored
    assert guard.wait_verdict("127.0.0.3")["verdict"] == "pass"


def test_postfix_smtp_client_relays_through_guard_to_postfix(mta, make_guard, workdir):
    guard = make_guard(upstream=mta.addr)
    sender = PostfixSender(workdir, relay=f"[127.0.0.1]:{guard.port}", bind="127.0.0.4")
    msgs = [make_message(), make_message()]

    for msg in msgs:
        sender.send(msg)
    sender.wait_sent(count=2)

    for msg in msgs:
        assert strip_trace_headers(mta.wait_for(msg.token)) == lf(msg.data)
    assert f"relay=127.0.0.1[127.0.0.1]:{guard.port}" in sender.log()
    verdicts = guard.verdicts("127.0.0.4")
    assert verdicts and all(v["verdict"] == "pass" for v in verdicts), verdicts


def test_large_message_is_relayed_intact_and_counted(sink, make_guard):
    guard = make_guard(upstream=sink.addr)
    blob = base64.encodebytes(os.urandom(3 * 1024 * 1024)).decode().splitlines()
    msg = make_message(body_lines=blob)

    smtplib_send("127.0.0.1", guard.port, msg, source="127.0.0.2")

    [stored] = sink.wait_messages(1, timeout=30)
    assert stored.content == lf(msg.data)
    guard.wait_verdict("127.0.0.2")
    def relayed_up():
        m = guard.metrics()
        return sum(m.get(f'mxguard_relayed_bytes_total{{direction="upstream",mode="{mode}"}}', 0)
                   for mode in ("copy", "splice"))
    wait_until(lambda: relayed_up() >= len(msg.data), 3, "relayed bytes counted")


def test_raw_session_sees_challenge_then_banner_then_replies(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "700ms"})
    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")

    greeting = client.read_reply()
    assert greeting.code == 220
    assert len(greeting.lines) == 2, greeting.lines
    assert CHALLENGE.match(greeting.lines[0]), greeting.lines
    assert greeting.lines[1] == b"220 sink.example.test ESMTP\r\n"
    assert greeting.times[0] < 0.4, "the challenge line goes out at accept"
    assert greeting.times[1] >= 0.7, "the banner is held for the whole delay"
    sent = b"EHLO raw.example.test\r\n" + b"QUIT\r\n"
    assert client.command(b"EHLO raw.example.test\r\n").code == 250
    assert client.command(b"QUIT\r\n").code == 221
    assert client.closed_within(3)
    client.close()

    verdict = guard.wait_verdict("127.0.0.2")
    assert verdict["verdict"] == "pass"
    assert verdict["client"] == f"127.0.0.2:{client.local_port}"
    assert int(verdict["bytes_up"]) == len(sent)
    assert 0 < int(verdict["bytes_down"]) <= len(client.received)
    assert 0.7 <= float(verdict["elapsed"]) < 5
    assert "orig_dst" in verdict
