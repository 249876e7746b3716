"""The greet pause: how long the client is held, what it sees meanwhile, when
the upstream connection is opened, and what happens when the client hangs
up in the middle of it."""

import re
import time

from guard import http_get
from peers import RawClient, ScriptedUpstream, lf, make_message, smtplib_send, wait_until

BANNER = b"220 sink.example.test ESMTP\r\n"


def test_final_greeting_line_arrives_no_earlier_than_the_delay(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "1s"})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    greeting = client.read_reply(timeout=5)

    assert greeting.lines[-1] == BANNER
    assert greeting.times[0] < 0.5, "challenge line at accept"
    assert 1.0 <= greeting.at < 2.0, greeting.times
    client.command(b"QUIT\r\n")
    client.close()


def test_without_challenge_the_banner_is_the_only_greeting_line(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "800ms", "greet.challenge": False})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    greeting = client.read_reply(timeout=5)

    assert greeting.lines == [BANNER]
    assert 0.8 <= greeting.at < 2.0
    assert client.command(b"EHLO c.example.test\r\n").code == 250
    client.command(b"QUIT\r\n")
    client.close()


def test_zero_delay_greets_at_once_and_delivers(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "0s"})
    msg = make_message()

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    greeting = client.read_reply(timeout=5)
    assert greeting.lines[-1] == BANNER and greeting.at < 0.5
    client.command(b"QUIT\r\n")
    client.close()

    smtplib_send("127.0.0.1", guard.port, msg, source="127.0.0.2")
    assert sink.wait_messages(1)[0].content == lf(msg.data)


def test_multi_line_upstream_banner_follows_the_challenge_with_one_code(make_guard):
    upstream = ScriptedUpstream("banner:220-scripted.example.test ESMTP first line\n220 second line")
    guard = make_guard(upstream=upstream.addr)

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    greeting = client.read_reply(timeout=5)

    assert len(greeting.lines) == 3, greeting.lines
    assert re.match(rb"220-guard\.example\.test ESMTP", greeting.lines[0])
    assert greeting.lines[1:] == [b"220-scripted.example.test ESMTP first line\r\n", b"220 second line\r\n"]
    client.close()


def test_lazy_connect_opens_the_upstream_only_shortly_before_the_delay_ends(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "2s", "greet.connect_lead": "500ms"})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    time.sleep(1.0)
    assert sink.connections() == [], "1s into a 2s delay with a 0.5s lead the MTA is not contacted yet"
    greeting = client.read_reply(timeout=5)
    assert greeting.lines[-1] == BANNER and greeting.at >= 2.0
    assert sink.connections() == ["127.0.0.1"]
    client.command(b"QUIT\r\n")
    client.close()


def test_eager_connect_opens_the_upstream_at_accept(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "2s", "greet.upstream_connect": "eager"})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    wait_until(lambda: sink.connections() == ["127.0.0.1"], 0.8, "the MTA connection at accept")
    greeting = client.read_reply(timeout=5)
    assert greeting.lines[-1] == BANNER and greeting.at >= 2.0, "the buffered banner is still held back"
    client.command(b"QUIT\r\n")
    client.close()


def test_hangup_during_the_delay_is_logged_counted_and_closes_the_upstream(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "2s", "greet.upstream_connect": "eager"})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    client.read_line()
    wait_until(lambda: sink.connections(), 1, "upstream connection")
    time.sleep(0.3)
    client.close()

    m = guard.wait_log(rf"HANGUP after (\d+\.\d+) from \[127\.0\.0\.2\]:{client.local_port}\b")[0]
    assert 0.2 <= float(m.group(1)) < 1.5
    assert guard.wait_verdict("127.0.0.2")["verdict"] == "hangup"
    guard.wait_metric("mxguard_detections_total", 1, test="hangup")
    guard.wait_metric("mxguard_connections_total", 1, outcome="hangup")
    wait_until(lambda: "disconnect" in sink.log(), 3, "the MTA connection closed")
    assert "MAIL" not in " ".join(sink.commands())


def test_sessions_active_gauge_follows_the_phases(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "1s"})

    client = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    time.sleep(0.3)
    m = guard.metrics()
    assert m['mxguard_sessions_active{phase="greet"}'] == 1
    assert m['mxguard_sessions_active{phase="relay"}'] == 0
    client.read_reply()
    assert client.command(b"EHLO c.example.test\r\n").code == 250
    m = guard.metrics()
    assert m['mxguard_sessions_active{phase="greet"}'] == 0
    assert m['mxguard_sessions_active{phase="relay"}'] == 1
    client.command(b"QUIT\r\n")
    client.close()
    wait_until(lambda: guard.metric("mxguard_sessions_active", phase="relay") == 0, 3, "relay gauge back to 0")


def test_admin_healthz_and_build_info(make_guard, sink):
    guard = make_guard(upstream=sink.addr)
    host, _, port = guard.admin.rpartition(":")

    status, body = http_get((host, int(port)), "/healthz")
    assert (status, body.strip()) == (200, "ok")
    assert any(k.startswith("mxguard_build_info{") for k in guard.metrics())
