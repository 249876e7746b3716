"""Scripted bots after the greeting, each caught by its own test.

Every bot below does one thing no real MTA does: a whole transaction in one
write, the message before the `354`, an HTTP proxy request, a TLS
ClientHello on the plaintext port, a bare LF, a 10 kB command line, unknown
verbs, commands smuggled in after STARTTLS. For each, the guard must name
the right test (a `TEST from [ip]:port: ...` line and
`mxguard_detections_total{test=...}`), take the action configured for that
test (tried: reject, drop, tempfail), and keep the offending command from
the MTA.
"""

import re
import socket
import ssl
import time

import pytest

from peers import PostfixMta, RawClient, lf, make_message, swaks, wait_until

SENDER = "bot@bot.example.test"
RCPT = "bob@example.test"


def client_hello() -> bytes:
    """The first flight of a real TLS handshake (Python's OpenSSL)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="mx.example.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and hello[5:6] == b"\x01", hello[:8]  # handshake record, ClientHello
    return hello


def body() -> bytes:
    return b"Subject: bot\r\n\r\nbuy now\r\n.\r\n"


# Each bot gets a greeted client and does its thing; `offending` is a piece
# of what it sent that the MTA must never see.

def bot_burst(c):
    """EHLO, MAIL, RCPT and DATA in one write: EHLO must end a group."""
    c.send(f"EHLO bot.example.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())


def bot_early_data(c):
    """Waits for each reply, but sends the message along with DATA."""
    assert c.command(b"EHLO bot.example.test\r\n").code == 250
    assert c.command(f"MAIL FROM:<{SENDER}>\r\n".encode()).code == 250
    assert c.command(f"RCPT TO:<{RCPT}>\r\n".encode()).code == 250
    c.send(b"DATA\r\n" + body())


def bot_http_connect(c):
    c.send(b"CONNECT 192.0.2.25:25 HTTP/1.1\r\nHost: 192.0.2.25:25\r\nProxy-Connection: keep-alive\r\n\r\n")


def bot_http_get(c):
    c.send(b"GET / HTTP/1.1\r\nHost: mx.example.test\r\nUser-Agent: Mozilla/5.0\r\n\r\n")


def bot_http_get_in_pieces(c):
    """The same request, its first line split over two writes: the guard
    looks at a line's start again as it grows."""
    c.send(b"GE")
    time.sleep(0.2)
    c.send(b"T / HTTP/1.1\r\nHost: mx.example.test\r\nUser-Agent: Mozilla/5.0\r\n\r\n")


def bot_tls_hello(c):
    c.send(client_hello())


def bot_bare_lf(c):
    c.send(b"EHLO bot.example.test\n")


def bot_long_line(c):
    assert c.command(b"EHLO bot.example.test\r\n").code == 250
    c.send(b"MAIL FROM:<" + b"a" * 10_000 + b"@bot.example.test>\r\n")


def bot_long_line_slowly(c):
    """The same 10 kB line in 500-byte pieces: caught before its end."""
    assert c.command(b"EHLO bot.example.test\r\n").code == 250
    line = b"MAIL FROM:<" + b"a" * 10_000 + b"@bot.example.test>\r\n"
    for i in range(0, len(line), 500):
        try:
            c.send(line[i:i + 500])
        except OSError:
            return  # the guard hung up mid-line
        time.sleep(0.02)


def bot_helo_then_pipelining(c):
    """After HELO nothing was offered, PIPELINING neither: MAIL and RCPT in
    one write do not wait for the MAIL reply."""
    assert c.command(b"HELO bot.example.test\r\n").code == 250
    c.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\n".encode())


def bot_unknown_commands(c):
    assert c.command(b"EHLO bot.example.test\r\n").code == 250
    for verb in (b"WHATEVER", b"FROBNICATE"):
        assert c.command(verb + b"\r\n").code // 100 == 5
    c.send(b"ZAP\r\n")


BOTS = {
    # name: (bot, test, first bytes of the log line's detail, a piece the MTA must not get)
    "burst": (bot_burst, "pipelining", "MAIL sent before the reply to EHLO", "MAIL FROM"),
    "early-data": (bot_early_data, "early-data", "message data sent before 354", "Subject: bot"),
    "http-connect": (bot_http_connect, "non-smtp", "non-SMTP command: CONNECT 192.0.2.25:25", "CONNECT"),
    "http-get": (bot_http_get, "non-smtp", "non-SMTP command: GET / HTTP/1.1", "GET /"),
    "http-get-in-pieces": (bot_http_get_in_pieces, "non-smtp", "non-SMTP command: GET / HTTP/1.1", "GE"),
    "tls-client-hello": (bot_tls_hello, "tls-on-plaintext", "TLS handshake on the plaintext port", None),
    "bare-lf": (bot_bare_lf, "bare-lf", "command line ended with a bare LF", "EHLO"),
    "10kB-line": (bot_long_line, "long-line", "command line of ", "aaaaaaaaaa"),
    "10kB-line-in-pieces": (bot_long_line_slowly, "long-line", "command line of ", "aaaaaaaaaa"),
    "helo-then-pipelining": (bot_helo_then_pipelining, "pipelining", "RCPT sent before the reply to MAIL", "RCPT TO"),
    "unknown-commands": (bot_unknown_commands, "unknown-commands", "3 unknown commands", "ZAP"),
}

REPLY = {
    "reject": rb"554 5\.7\.1 guard\.example\.test Error: protocol violation \(%s\)\r\n",
    "tempfail": rb"421 4\.7\.0 guard\.example\.test Error: try again later\r\n",
}
ACTION_KEY = {"pipelining": "pipelining", "early-data": "early_data", "non-smtp": "non_smtp",
              "tls-on-plaintext": "tls_on_plaintext", "bare-lf": "bare_lf", "long-line": "long_line",
              "unknown-commands": "unknown_commands", "smuggling": "smuggling",
              "starttls-injection": "starttls_injection"}


def unread(client: RawClient) -> bytes:
    """What arrived after the last reply the bot read, up to the close."""
    client.read_until_closed(timeout=5)
    consumed = getattr(client, "_consumed", 0)
    return b"".join(line for _, line in client.lines[consumed:]) + client.buf


@pytest.mark.parametrize("action", ["reject", "drop", "tempfail"])
@pytest.mark.parametrize("name", list(BOTS))
def test_bot_is_caught_by_its_test_and_gets_the_configured_action(name, action, sink, make_guard):
    bot, test, detail, offending = BOTS[name]
    # Only the bot's own test acts; every other one observes, so a second
    # test cannot decide the outcome.
    actions = {f"actions.{k}": "observe" for k in ACTION_KEY.values()}
    actions[f"actions.{ACTION_KEY[test]}"] = action
    guard = make_guard(upstream=sink.addr, **actions)

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert client.read_reply().code == 220
    bot(client)
    tail = unread(client)
    client.close()

    if action == "drop":
        assert tail == b"", f"drop closes without a word: {tail!r}"
    else:
        expected = REPLY[action] % test.encode() if action == "reject" else REPLY[action]
        assert re.fullmatch(expected, tail), tail
    line = guard.wait_log(rf"{test.upper()} from \[127\.0\.0\.2\]:{client.local_port}: (.*)")[0]
    assert line.group(1).startswith(detail), line.group(0)
    first = guard.wait_log(r"INFO ([A-Z-]+) from \[127\.0\.0\.2\]")[0]
    assert first.group(1) == test.upper(), f"the first test to fire was {first.group(1)}"
    verdict = guard.wait_verdict("127.0.0.2")
    assert (verdict["verdict"], verdict["test"].split(",")[0]) == (action, test), verdict
    guard.wait_metric("mxguard_detections_total", 1, test=test)
    guard.wait_metric("mxguard_actions_total", 1, action=action)
    guard.wait_metric("mxguard_connections_total", 1, outcome=action)

    # The offending command never reached the MTA; an MTA that was greeted
    # got a QUIT (or, mid-message, a cut connection).
    time.sleep(0.3)
    if offending:
        assert not any(offending in c for c in sink.commands()), sink.commands()
    assert sink.no_messages(), sink.log()[-2000:]

    # reject and drop blocklist the address; tempfail does not, and a
    # ClientHello is a misconfigured real sender, never blocklisted.
    again = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    first_line = again.read_line(timeout=3)[1]
    again.close()
    if action in ("reject", "drop") and test != "tls-on-plaintext":
        assert first_line.startswith(b"554 "), first_line
    else:
        assert first_line.startswith(b"220-guard.example.test"), first_line


@pytest.mark.parametrize("name", list(BOTS))
def test_observe_only_logs_and_counts(name, sink, make_guard):
    bot, test, detail, _ = BOTS[name]
    actions = {f"actions.{k}": "observe" for k in ACTION_KEY.values()}
    guard = make_guard(upstream=sink.addr, **actions)

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert client.read_reply().code == 220
    bot(client)
    guard.wait_log(rf"{test.upper()} from \[127\.0\.0\.2\]:{client.local_port}: {re.escape(detail)}")
    guard.wait_metric("mxguard_detections_total", 1, test=test)
    # The guard does not end the session (the MTA may, on garbage).
    if test not in ("tls-on-plaintext", "long-line"):  # smtp-sink hangs up on those itself
        assert not client.closed_within(0.5), client.received
    if name == "early-data":
        # held until the 354, then passed on: the MTA gets the message whole
        [stored] = sink.wait_messages(1)
        assert stored.content == lf(body()[:-3])
    client.close()
    verdict = guard.wait_verdict("127.0.0.2")
    assert verdict["verdict"] == "pass" and test in verdict["test"].split(","), verdict
    assert guard.metric("mxguard_actions_total", action="reject") == 0


# --------------------------------------------------------------------------
# STARTTLS command injection (CVE-2011-0411 and kin), against a real Postfix


INJECTED = b"MAIL FROM:<injected@bot.example.test>\r\n"


@pytest.fixture
def chatty_mta(workdir):
    """Postfix logging every command it reads (`< unknown[...]: CMD`) and
    every TLS handshake failure."""
    return PostfixMta(workdir, extra_main={"debug_peer_list": "127.0.0.0/8"})


def test_injected_commands_never_reach_an_mta_without_tls(sink, make_guard):
    """smtp-sink has no STARTTLS: it refuses it and would then read the
    injected bytes as the next command. It never gets them."""
    guard = make_guard(upstream=sink.addr, **{"actions.starttls_injection": "observe"})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert client.read_reply().code == 220
    assert client.command(b"EHLO bot.example.test\r\n").code == 250
    client.send(b"STARTTLS\r\n" + INJECTED)
    assert client.read_reply().code // 100 == 5  # smtp-sink: no STARTTLS here
    assert client.command(b"NOOP\r\n").code == 250, "the next command is answered, not the injected one"
    assert client.command(b"QUIT\r\n").code == 221
    client.close()

    guard.wait_log(r"STARTTLS-INJECTION from \[127\.0\.0\.2\]:\d+: 39 bytes pipelined after STARTTLS \(discarded\)")
    assert sink.commands() == ["EHLO bot.example.test", "STARTTLS", "NOOP", "QUIT"], sink.commands()
    assert guard.wait_verdict("127.0.0.2")["test"] == "starttls-injection"


@pytest.mark.parametrize("action", ["reject", "observe"])
def test_bytes_after_starttls_are_discarded_before_the_mta(action, chatty_mta, make_guard):
    guard = make_guard(upstream=chatty_mta.addr, **{"actions.starttls_injection": action})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert client.read_reply().code == 220
    assert client.command(b"EHLO bot.example.test\r\n").code == 250
    client.send(b"STARTTLS\r\n" + INJECTED)
    if action == "reject":
        tail = unread(client)
        assert re.fullmatch(REPLY["reject"] % b"starttls-injection", tail), tail
        guard.wait_metric("mxguard_connections_total", 1, outcome="reject")
    else:
        # Carry on: the 220 comes through and the handshake with Postfix
        # works, which it could not if the injected plaintext had reached
        # Postfix ahead of the ClientHello.
        assert client.read_reply().code == 220
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        client.sock.settimeout(5)
        tls = ctx.wrap_socket(client.sock, server_hostname="mta.example.test")
        tls.sendall(b"EHLO bot.example.test\r\n")
        assert tls.recv(4096).startswith(b"250-mta.example.test")
        tls.sendall(b"QUIT\r\n")
        assert tls.recv(4096).startswith(b"221 ")
        tls.close()
        chatty_mta.wait_log(r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]")
        guard.wait_verdict("127.0.0.2")
    client.close()

    line = guard.wait_log(r"STARTTLS-INJECTION from \[127\.0\.0\.2\]:\d+: (\d+) bytes pipelined after STARTTLS")[0]
    assert int(line.group(1)) == len(INJECTED)
    guard.wait_metric("mxguard_detections_total", 1, test="starttls-injection")
    chatty_mta.wait_log(r"disconnect from unknown\[127\.0\.0\.1\]")
    log = chatty_mta.log()
    assert "injected@bot.example.test" not in log, "the MTA read the injected command"
    assert "SSL_accept error" not in log


def test_a_sender_configured_for_implicit_tls_is_not_blocklisted_as_a_pregreet(sink, make_guard, workdir):
    """A real sender set up for implicit TLS (port 465 style) on port 25:
    a TLS client speaks first, so its ClientHello arrives at connect, before
    any greeting — not after it like the scripted bot above. It is the
    misconfigured real sender `tls-on-plaintext` exists for, and must not be
    blocklisted as a pregreet bot."""
    guard = make_guard(upstream=sink.addr)

    out = swaks("127.0.0.1", guard.port, make_message(), source="127.0.0.2", extra=["--tls-on-connect"],
                check=False, workdir=workdir)
    assert out.returncode != 0 and b"TLS startup failed" in out.stderr, out.stderr

    guard.wait_log(r"TLS-ON-PLAINTEXT from \[127\.0\.0\.2\]:\d+: TLS handshake on the plaintext port")
    guard.wait_metric("mxguard_detections_total", 1, test="tls-on-plaintext")
    again = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    first = again.read_line(timeout=3)[1]
    again.close()
    assert first.startswith(b"220-guard.example.test"), f"blocklisted: {first!r}"
