"""Operating the daemon: SIGHUP reloads the config for new sessions without
touching live ones (and a bad file keeps the running config), SIGTERM
drains (no new connections, live sessions finish, then a clean exit)."""

import signal
import socket
import time

from guard import listening
from peers import RawClient, lf, make_message, wait_until


def open_transaction(guard, source, msg) -> RawClient:
    """A client in the middle of a transaction: greeted, envelope given."""
    c = RawClient("127.0.0.1", guard.port, source=source)
    assert c.read_reply().code == 220
    assert c.command(b"EHLO live.example.test\r\n").code == 250
    assert c.command(f"MAIL FROM:<{msg.sender}>\r\n".encode()).code == 250
    assert c.command(f"RCPT TO:<{msg.rcpt}>\r\n".encode()).code == 250
    return c


def finish_transaction(c, msg):
    assert c.command(b"DATA\r\n").code == 354
    assert c.command(msg.data.replace(b"\r\n.", b"\r\n..") + b".\r\n").code == 250
    assert c.command(b"QUIT\r\n").code == 221
    c.close()


def greeting_time(guard, source) -> float:
    c = RawClient("127.0.0.1", guard.port, source=source)
    reply = c.read_reply(timeout=10)
    assert reply.code == 220
    c.command(b"QUIT\r\n")
    c.close()
    return reply.at


def test_sighup_changes_the_delay_for_new_sessions_and_keeps_the_live_one(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "500ms"})
    live_msg = make_message()
    live = open_transaction(guard, "127.0.0.2", live_msg)

    guard.reload(**{"greet.delay": "1500ms"})
    wait_until(lambda: guard.metric("mxguard_config_reloads_total", result="ok") == 1
               or "reload" in guard.log().lower(), 3, "the reload to happen")
    time.sleep(0.2)

    assert greeting_time(guard, "127.0.0.3") >= 1.5, "new sessions use the new delay"
    finish_transaction(live, live_msg)
    [stored] = sink.wait_messages(1)
    assert stored.content == lf(live_msg.data), "the live session went on undisturbed"
    assert guard.alive()


def test_a_bad_file_on_sighup_keeps_the_running_config(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "500ms"})

    guard.write_config(guard.config_path.read_text() + '\n[bogus_table]\nbogus_key = 1\n')
    guard.signal(signal.SIGHUP)

    guard.wait_log(r"bogus_table")  # it says why
    assert guard.alive()
    assert greeting_time(guard, "127.0.0.2") < 1.0, "still the old delay"
    m = guard.metrics()
    if 'mxguard_config_reloads_total{result="error"}' in m:
        assert m['mxguard_config_reloads_total{result="error"}'] == 1


def test_sigterm_drains_live_sessions_then_exits_cleanly(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"limits.drain_timeout": "20s"})
    msg = make_message()
    live = open_transaction(guard, "127.0.0.2", msg)

    guard.signal(signal.SIGTERM)
    wait_until(lambda: not listening(guard.pid, guard.port), 3, "the listener closed")
    try:
        socket.create_connection(("127.0.0.1", guard.port), timeout=2).close()
        refused = False
    except ConnectionRefusedError:
        refused = True
    assert refused, "new connections are refused while draining"
    time.sleep(0.5)
    assert guard.alive(), "still running while a session is live"

    finish_transaction(live, msg)
    assert guard.proc.wait(5) == 0, f"exits 0 once the last session ended\n{guard.log()}"
    assert sink.wait_messages(1)[0].content == lf(msg.data)
    guard.assert_no_panic()


def test_sigterm_gives_up_on_sessions_after_the_drain_timeout(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"limits.drain_timeout": "1s"})
    idle = open_transaction(guard, "127.0.0.2", make_message())

    t0 = time.monotonic()
    guard.signal(signal.SIGTERM)
    rc = guard.proc.wait(6)
    took = time.monotonic() - t0

    assert rc == 0, guard.log()
    assert 0.9 <= took < 4, took
    assert idle.closed_within(2), "the leftover session is closed"
    idle.close()
    guard.assert_no_panic()


def test_sigterm_with_a_client_held_in_the_greeting(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "1s", "limits.drain_timeout": "10s"})
    held = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    held.read_line()

    guard.signal(signal.SIGTERM)
    reply = held.read_reply(timeout=5)
    assert reply.code == 220, "the held client still gets its greeting"
    held.command(b"QUIT\r\n")
    held.close()
    assert guard.proc.wait(5) == 0
