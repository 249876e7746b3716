"""When the MTA is down, refuses, or never says hello: the client is told to
try again later (421 4.3.2) or gets the MTA's own refusal, in a valid SMTP
dialogue, and no mail is lost (nothing is ever accepted on the MTA's behalf).

The MTAs here are ScriptedUpstream: no real MTA can be told to greet with
554 or to stay silent."""

import re

import pytest

from peers import RawClient, ScriptedUpstream, free_port, wait_until

CHALLENGE = re.compile(rb"^220-guard\.example\.test ESMTP")
OWN_FINAL = b"220 guard.example.test ESMTP"


def greet_then_first_command(client):
    greeting = client.read_reply(timeout=10)
    assert greeting.code == 220, greeting.lines
    assert CHALLENGE.match(greeting.lines[0]), greeting.lines
    assert greeting.lines[-1].startswith(OWN_FINAL), "the guard finishes the greeting itself"
    reply = client.command(b"EHLO client.example.test\r\n", timeout=10)
    assert client.closed_within(3), "closed after the refusal"
    return greeting, reply


def test_nothing_listening_upstream_with_challenge_gives_421_at_first_command(make_guard):
    guard = make_guard(upstream=f"127.0.0.1:{free_port()}")

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    _, reply = greet_then_first_command(client)
    client.close()

    assert reply.code == 421 and reply.lines[0].startswith(b"421 4.3.2 "), reply.lines
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "tempfail"
    guard.wait_metric("mxguard_connections_total", 1, outcome="tempfail")


def test_nothing_listening_upstream_without_challenge_gives_421_at_once(make_guard):
    guard = make_guard(upstream=f"127.0.0.1:{free_port()}", **{"greet.challenge": False})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    reply = client.read_reply(timeout=5)
    assert client.closed_within(3)
    client.close()

    assert reply.code == 421 and reply.lines[0].startswith(b"421 4.3.2 "), reply.lines
    assert b"220" not in client.received
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "tempfail"


@pytest.mark.parametrize("code", [554, 421])
def test_upstream_refusal_banner_reaches_the_client_at_its_first_command(code, make_guard):
    text = f"{code} {'5' if code == 554 else '4'}.3.2 scripted.example.test no service here"
    upstream = ScriptedUpstream(f"banner:{text}")
    guard = make_guard(upstream=upstream.addr)

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    _, reply = greet_then_first_command(client)
    client.close()

    assert reply.code == code, reply.lines
    assert b"scripted.example.test no service here" in reply.lines[0], reply.lines
    # The MTA's permanent refusal is a reject, its 421 a tempfail: the
    # verdict says what the client was told.
    verdict = "reject" if code == 554 else "tempfail"
    record = guard.wait_verdict("127.0.0.2")
    assert record["verdict"] == verdict, record
    assert record["test"] == "upstream", record
    guard.wait_metric("mxguard_connections_total", 1, outcome=verdict)


@pytest.mark.parametrize("code", [554, 421])
def test_upstream_refusal_banner_is_passed_on_as_is_without_challenge(code, make_guard):
    text = f"{code} {'5' if code == 554 else '4'}.3.2 scripted.example.test no service here"
    upstream = ScriptedUpstream(f"banner:{text}")
    guard = make_guard(upstream=upstream.addr, **{"greet.challenge": False})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    reply = client.read_reply(timeout=5)
    client.close()

    assert reply.lines == [text.encode() + b"\r\n"]
    assert reply.at >= 0.5, "still held for the delay"


def test_upstream_that_never_sends_a_banner_times_out_into_421(make_guard):
    upstream = ScriptedUpstream("silent")
    guard = make_guard(upstream=upstream.addr, **{"greet.banner_timeout": "1s"})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    _, reply = greet_then_first_command(client)
    client.close()

    assert reply.code == 421 and reply.lines[0].startswith(b"421 4.3.2 "), reply.lines
    assert reply.at >= 1.0, "not before the banner timeout"
    assert upstream.accepted == 1
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "tempfail"
    # the silent upstream's connection is closed, not leaked
    wait_until(lambda: upstream.eofs == 1, 3, "the guard closing the silent upstream")


def test_upstream_that_never_sends_a_banner_without_challenge(make_guard):
    upstream = ScriptedUpstream("silent")
    guard = make_guard(upstream=upstream.addr, **{"greet.banner_timeout": "1s", "greet.challenge": False})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    reply = client.read_reply(timeout=5)
    client.close()

    assert reply.code == 421 and reply.lines[0].startswith(b"421 4.3.2 "), reply.lines
    assert 1.0 <= reply.at < 4


def test_upstream_that_resets_at_connect_gives_421(make_guard):
    upstream = ScriptedUpstream("reset")
    guard = make_guard(upstream=upstream.addr)

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    _, reply = greet_then_first_command(client)
    client.close()

    assert reply.code == 421, reply.lines
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "tempfail"
