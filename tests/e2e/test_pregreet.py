"""Early talkers: clients that speak before the greeting is over.

Three bots: one sends EHLO the moment it connects, one right after our
`220-` line (a client that does not wait for the end of a multi-line reply),
one sends a whole transaction at once. Each is rejected with 554, the MTA
never sees a byte of it (with lazy upstream connect it never even sees a
connection), and the address is refused at once when it comes back, while
another address is served normally."""

import re
import time

import pytest

from guard import observe_every_other_test
from peers import RawClient, ScriptedUpstream, SmtpSink, lf, make_message, smtplib_send, strip_trace_headers, swaks, wait_until

EHLO = b"EHLO bot.example.test\r\n"


def whole_transaction(msg) -> bytes:
    return (EHLO + f"MAIL FROM:<{msg.sender}>\r\nRCPT TO:<{msg.rcpt}>\r\nDATA\r\n".encode()
            + msg.data.replace(b"\r\n.", b"\r\n..") + b".\r\nQUIT\r\n")


def bot_ehlo_on_connect(client, msg):
    client.send(EHLO)


def bot_ehlo_after_challenge_line(client, msg):
    at, line = client.read_line()
    assert line.startswith(b"220-"), line
    client.send(EHLO)


def bot_whole_transaction(client, msg):
    client.send(whole_transaction(msg))


BOTS = [bot_ehlo_on_connect, bot_ehlo_after_challenge_line, bot_whole_transaction]
BOT_IDS = ["ehlo-on-connect", "ehlo-after-220-line", "whole-transaction"]

# Long enough that the bot is caught well before a lazy upstream connect.
SLOW_GREET = {"greet.delay": "1500ms", "greet.connect_lead": "300ms"}


@pytest.mark.parametrize("bot", BOTS, ids=BOT_IDS)
def test_early_talker_is_rejected_and_blocklisted(bot, sink, make_guard, workdir):
    guard = make_guard(upstream=sink.addr, **SLOW_GREET)
    msg = make_message()

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    bot(client, msg)
    seen = client.read_until_closed(timeout=5)

    assert re.search(rb"(?m)^554 5\.7\.1 ", seen), seen
    assert b"sink.example.test" not in seen, "the upstream banner must never reach an early talker"
    pregreet = guard.wait_log(r"PREGREET (\d+) after (\d+\.\d+) from \[127\.0\.0\.2\]:(\d+): (.*)")[0]
    assert int(pregreet.group(3)) == client.local_port
    assert pregreet.group(4).startswith(r"EHLO bot.example.test\r\n"), pregreet.group(0)
    if bot is not bot_whole_transaction:
        assert int(pregreet.group(1)) == len(EHLO)
    verdict = guard.wait_verdict("127.0.0.2")
    assert (verdict["verdict"], verdict["test"]) == ("reject", "pregreet")

    # The bot comes back: refused at once, before any greeting.
    again = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    reply = again.read_reply(timeout=3)
    assert reply.code == 554 and reply.at < 0.5, reply
    assert again.closed_within(3)
    again.close()
    guard.wait_log(r"verdict=\"?blocked", timeout=3)

    # Another address is not affected.
    good = make_message()
    swaks("127.0.0.1", guard.port, good, source="127.0.0.3", workdir=workdir)
    [stored] = sink.wait_messages(1)
    assert stored.content == lf(good.data), "only the good client's mail reaches the MTA"
    assert sink.connections() == ["127.0.0.1"], "the MTA saw exactly one connection: the good client's"
    assert not any(c.startswith("EHLO bot") for c in sink.commands())

    guard.wait_metric("mxguard_detections_total", 1, test="pregreet")
    guard.wait_metric("mxguard_connections_total", 1, outcome="reject")
    guard.wait_metric("mxguard_connections_total", 1, outcome="blocked")
    guard.wait_metric("mxguard_connections_total", 1, outcome="pass")


@pytest.mark.parametrize("bot", BOTS, ids=BOT_IDS)
def test_observe_lets_early_talkers_through_and_logs_them(bot, sink, make_guard):
    # A whole transaction at once also breaks RFC 2920 pipelining rules, which
    # later checks act on: observe those too, this story is about observing.
    guard = make_guard(upstream=sink.addr, **{"pregreet.action": "observe"}, **observe_every_other_test())
    msg = make_message()

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    bot(client, msg)
    greeting = client.read_reply()
    assert greeting.code == 220 and greeting.lines[-1] == b"220 sink.example.test ESMTP\r\n", greeting.lines
    if bot is bot_whole_transaction:
        seen = client.read_until_closed()
        assert re.search(rb"(?m)^221 ", seen), seen
    else:
        assert client.read_reply().code == 250  # the early EHLO, forwarded after the greeting
        assert client.command(f"MAIL FROM:<{msg.sender}>\r\n".encode()).code == 250
        assert client.command(f"RCPT TO:<{msg.rcpt}>\r\n".encode()).code == 250
        assert client.command(b"DATA\r\n").code == 354
        assert client.command(msg.data.replace(b"\r\n.", b"\r\n..") + b".\r\n").code == 250
        assert client.command(b"QUIT\r\n").code == 221
    client.close()

    [stored] = sink.wait_messages(1)
    assert stored.content == lf(msg.data)
    assert stored.helo == "bot.example.test"
    guard.wait_log(r"PREGREET \d+ after \d+\.\d+ from \[127\.0\.0\.2\]:\d+: EHLO bot\.example\.test")
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "pass"
    guard.wait_metric("mxguard_detections_total", 1, test="pregreet")
    guard.wait_metric("mxguard_connections_total", 0, outcome="reject")

    # observed, not blocklisted: the next connection gets the normal greeting
    again = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert again.read_reply().lines[-1] == b"220 sink.example.test ESMTP\r\n"
    again.command(b"QUIT\r\n")
    again.close()


def test_drop_closes_without_a_reply(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"pregreet.action": "drop"}, **SLOW_GREET)

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    client.send(EHLO)
    seen = client.read_until_closed(timeout=5)
    client.close()

    # at most our own challenge line went out before the bot spoke
    assert seen in (b"", b"220-guard.example.test ESMTP mxguard\r\n") or re.fullmatch(
        rb"220-guard\.example\.test ESMTP[^\r\n]*\r\n", seen), seen
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "drop"
    guard.wait_metric("mxguard_connections_total", 1, outcome="drop")
    guard.wait_metric("mxguard_detections_total", 1, test="pregreet")
    time.sleep(1.5)
    assert sink.connections() == []


def test_eager_upstream_gets_a_polite_quit_and_none_of_the_bots_bytes(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "1500ms", "greet.upstream_connect": "eager"})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    time.sleep(0.3)  # let the eager upstream connection come up
    client.send(EHLO + b"MAIL FROM:<bot@bot.example>\r\n")
    seen = client.read_until_closed(timeout=5)
    client.close()

    assert re.search(rb"(?m)^554 ", seen), seen
    assert sink.connections() == ["127.0.0.1"]
    deadline = time.monotonic() + 3
    while "QUIT" not in sink.commands() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.commands() == ["QUIT"], "the MTA gets QUIT and nothing the bot sent"
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "reject"


@pytest.mark.parametrize("action", ["reject", "drop", "tempfail"])
def test_a_refused_early_talker_is_closed_before_the_mta_is_told_quit(action, make_guard):
    # An MTA that greets and then never answers (not even QUIT): the guard's
    # polite QUIT to it may take up to 2 s. A bot holds many connections;
    # its descriptor must be freed at once, not after that wait.
    upstream = ScriptedUpstream("banner-then-hang")
    guard = make_guard(upstream=upstream.addr, **{"greet.delay": "3s", "greet.upstream_connect": "eager",
                                                  "pregreet.action": action})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    wait_until(lambda: upstream.accepted == 1, 5, "the eager upstream connection")
    time.sleep(0.2)  # its banner read by the guard
    sent_at = client.elapsed()
    client.send(EHLO)
    seen = client.read_until_closed(timeout=5)
    closed_after = client.elapsed() - sent_at
    mta_still_open = upstream.eofs == 0
    client.close()

    if action == "reject":
        assert re.search(rb"(?m)^554 5\.7\.1 ", seen), seen
    elif action == "tempfail":
        assert re.search(rb"(?m)^421 4\.3\.2 ", seen), seen
    assert mta_still_open, "the client was closed only after the MTA connection"
    # QUIT waits up to 2 s for the MTA; the client must not (a generous bound).
    assert closed_after < 1.5, f"the client waited {closed_after:.2f}s for its close"
    assert guard.wait_verdict("127.0.0.2")["verdict"] == action
    # The MTA still gets its QUIT and, when it does not answer, a close.
    wait_until(lambda: upstream.eofs == 1, 10, "the MTA connection closed")


def test_blocklist_entry_expires_after_block_ttl(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"pregreet.block_ttl": "1s"})

    bot = RawClient("127.0.0.1", guard.port, source="127.0.0.5")
    bot.send(EHLO)
    bot.read_until_closed()
    bot.close()
    refused = RawClient("127.0.0.1", guard.port, source="127.0.0.5")
    assert refused.read_reply().code == 554
    refused.close()

    time.sleep(1.3)
    back = RawClient("127.0.0.1", guard.port, source="127.0.0.5")
    assert back.read_reply().lines[-1] == b"220 sink.example.test ESMTP\r\n"
    back.command(b"QUIT\r\n")
    back.close()


def test_blocklist_is_per_address(sink, make_guard):
    guard = make_guard(upstream=sink.addr)
    for addr in ("127.0.0.2", "127.0.0.3"):
        bot = RawClient("127.0.0.1", guard.port, source=addr)
        bot.send(EHLO)
        bot.read_until_closed()
        bot.close()

    for addr, expect in (("127.0.0.2", 554), ("127.0.0.3", 554), ("127.0.0.4", 220), ("127.0.0.5", 220)):
        c = RawClient("127.0.0.1", guard.port, source=addr)
        assert c.read_reply().code == expect, addr
        c.close()
    guard.wait_metric("mxguard_connections_total", 2, outcome="blocked")


def test_a_bot_sending_a_whole_transaction_never_reaches_postfix(mta, make_guard):
    guard = make_guard(upstream=mta.addr, **SLOW_GREET)
    spam = make_message()

    bot = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    bot.send(whole_transaction(spam))
    assert re.search(rb"(?m)^554 ", bot.read_until_closed(timeout=5))
    bot.close()
    ham = make_message()
    smtplib_send("127.0.0.1", guard.port, ham, source="127.0.0.3")

    assert strip_trace_headers(mta.wait_for(ham.token)) == lf(ham.data)
    assert mta.find(spam.token) == []
    assert mta.connects() == 1, "Postfix logged exactly one connection: the good client's\n" + mta.log()


def test_an_allowlisted_client_that_talks_first_is_relayed_not_rejected(workdir, make_guard):
    # An MTA that takes a second to greet: the allowlisted client's whole
    # transaction is in before the banner, as a partner's pipelining relay
    # (or one that does not wait for the banner) sends it. Allowlisted means
    # no test at all (postscreen's permit): it goes to the MTA as it came.
    sink = SmtpSink(workdir, name="slow-sink", extra=("-W", "CONNECT:1"))
    guard = make_guard(upstream=sink.addr, **{"allowlist.networks": ["127.0.0.8/32"],
                                              "greet.delay": "2s", "pregreet.action": "reject"})
    msg = make_message()
    client = RawClient(guard.host, guard.port, source="127.0.0.8")
    client.send(whole_transaction(msg))
    replies = [client.read_reply(timeout=5) for _ in range(6)]
    assert [r.code for r in replies] == [220, 250, 250, 250, 354, 250], replies
    assert b"sink.example.test" in replies[0].lines[0], "the MTA's own banner"
    assert replies[0].at > 0.8, "the MTA's banner came late: the client spoke first"
    client.read_until_closed(timeout=5)
    client.close()
    stored = sink.wait_messages(1)
    assert stored[0].content == lf(msg.data)

    v = guard.wait_verdict("127.0.0.8")
    assert v["verdict"] == "pass" and v["test"] == "allowlist", v
    assert guard.metric("mxguard_detections_total", test="pregreet") == 0
    # Not blocklisted either: the address comes back and is served.
    assert "PREGREET" not in guard.log()


@pytest.mark.parametrize("action", ["reject", "drop"])
def test_an_early_talker_ended_in_the_greeting_leaves_postfix_a_clean_quit(mta, make_guard, action):
    # The MTA is connected at accept (eager) and the bot speaks at once: it
    # is ended before Postfix's banner is in. A QUIT sent then would be a
    # command before the greeting (Postfix: "improper command pipelining
    # after CONNECT", a bot's mark; 3.9 refuses it), and a close without
    # one "lost connection after CONNECT": the banner is read first, then
    # QUIT, and Postfix logs a plain disconnect.
    guard = make_guard(upstream=mta.addr, **{"greet.upstream_connect": "eager", "greet.delay": "2s",
                                            "pregreet.action": action, "pregreet.block_ttl": "0s"})
    for _ in range(3):
        bot = RawClient(guard.host, guard.port, source="127.0.0.2")
        bot.send(EHLO)
        bot.read_until_closed(timeout=5)
        bot.close()
    guard.wait_metric("mxguard_detections_total", 3, test="pregreet")
    mta.wait_log(r"disconnect from \S+ .*quit=1 commands=1", count=3, timeout=10)
    log = mta.log()
    assert "improper command pipelining" not in log, log
    assert "lost connection" not in log, log
