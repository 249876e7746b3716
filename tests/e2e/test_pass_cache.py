"""Clients the guard already knows: the pass cache and the allowlist.

A client whose session passed every test is remembered: its next connection
gets the MTA's banner at once (no greet pause, no `220-` challenge) and its
replies are not held. A client that tripped a test, even one that only
observes, is not remembered. An allowlisted network skips everything: no
pause, no challenge, no watch, so a burst that would be a pipelining
violation anywhere else is not flagged.
"""

import re
import time

from peers import RawClient, lf, make_message, smtplib_send

DELAY = {"greet.delay": "1s", "greet.connect_lead": "300ms", "turns.reply_delay.ehlo": "500ms"}


def greet_and_ehlo(guard, source) -> tuple[list[bytes], float, float]:
    """(greeting lines, seconds to the final greeting line, seconds the EHLO
    reply took)."""
    c = RawClient("127.0.0.1", guard.port, source=source)
    greeting = c.read_reply()
    t = time.monotonic()
    assert c.command(b"EHLO known.example.test\r\n").code == 250
    ehlo = time.monotonic() - t
    assert c.command(b"QUIT\r\n").code == 221
    c.close()
    return greeting.lines, greeting.at, ehlo


def test_a_client_that_passed_is_not_delayed_next_time(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **DELAY)

    lines, at, ehlo = greet_and_ehlo(guard, "127.0.0.6")
    assert lines[0].startswith(b"220-guard.example.test") and at >= 1.0 and ehlo >= 0.5
    assert guard.wait_verdict("127.0.0.6")["verdict"] == "pass"

    lines, at, ehlo = greet_and_ehlo(guard, "127.0.0.6")
    assert lines == [b"220 sink.example.test ESMTP\r\n"], "no challenge line"
    assert at < 0.6 and ehlo < 0.4, (at, ehlo)

    # ... and it still delivers, watched
    msg = make_message()
    smtplib_send("127.0.0.1", guard.port, msg, source="127.0.0.6")
    assert sink.wait_messages(1)[0].content == lf(msg.data)

    # another address is not known
    lines, at, ehlo = greet_and_ehlo(guard, "127.0.0.7")
    assert lines[0].startswith(b"220-") and at >= 1.0 and ehlo >= 0.5


def test_a_client_that_tripped_a_test_is_not_remembered(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **DELAY, **{"actions.pipelining": "observe"})

    c = RawClient("127.0.0.1", guard.port, source="127.0.0.6")
    c.read_reply()
    c.send(b"EHLO hasty.example.test\r\nQUIT\r\n")
    c.read_until_closed()
    c.close()
    verdict = guard.wait_verdict("127.0.0.6")
    assert (verdict["verdict"], verdict["test"]) == ("pass", "pipelining")

    lines, at, _ = greet_and_ehlo(guard, "127.0.0.6")
    assert lines[0].startswith(b"220-") and at >= 1.0


def test_the_pass_is_forgotten_after_the_ttl(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **DELAY, **{"pass_cache.ttl": "1s"})
    greet_and_ehlo(guard, "127.0.0.6")
    guard.wait_verdict("127.0.0.6")  # remembered when the session is over
    assert greet_and_ehlo(guard, "127.0.0.6")[1] < 0.6
    time.sleep(1.2)
    assert greet_and_ehlo(guard, "127.0.0.6")[1] >= 1.0


def test_allowlisted_network_skips_every_test(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **DELAY, **{"allowlist.networks": ["127.0.0.8/29"]})
    msg = make_message()
    burst = (f"EHLO partner.example.test\r\nMAIL FROM:<{msg.sender}>\r\nRCPT TO:<{msg.rcpt}>\r\nDATA\r\n".encode()
             + msg.data.replace(b"\r\n.", b"\r\n..") + b".\r\nQUIT\r\n")

    c = RawClient("127.0.0.1", guard.port, source="127.0.0.9")
    greeting = c.read_reply()
    c.send(burst)  # everything in one write, without waiting
    rest = c.read_until_closed()
    c.close()

    assert greeting.lines == [b"220 sink.example.test ESMTP\r\n"] and greeting.at < 0.6, greeting
    assert re.search(rb"(?m)^354 .*\r\n250 2\.0\.0 Ok", rest) and rest.endswith(b"221 Bye\r\n"), rest
    [stored] = sink.wait_messages(1)
    assert stored.content == lf(msg.data)
    verdict = guard.wait_verdict("127.0.0.9")
    assert (verdict["verdict"], verdict["test"]) == ("pass", "allowlist")
    assert not any(k.startswith("mxguard_detections_total") and v for k, v in guard.metrics().items())

    # The same burst from outside the allowlist is a pipelining violation.
    bot = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    bot.read_reply()
    bot.send(burst)
    assert re.search(rb"554 5\.7\.1 .*\(pipelining\)", bot.read_until_closed())
    bot.close()
    assert len(sink.messages()) == 1


def test_a_known_client_is_still_watched(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **DELAY)
    greet_and_ehlo(guard, "127.0.0.6")
    guard.wait_verdict("127.0.0.6")

    bot = RawClient("127.0.0.1", guard.port, source="127.0.0.6")
    assert bot.read_reply().lines == [b"220 sink.example.test ESMTP\r\n"]
    bot.send(b"EHLO known.example.test\r\nMAIL FROM:<a@known.example.test>\r\n")
    assert re.search(rb"554 5\.7\.1 .*\(pipelining\)", bot.read_until_closed())
    bot.close()
    guard.wait_metric("mxguard_detections_total", 1, test="pipelining")
