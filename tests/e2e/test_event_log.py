"""The JSON event log: one line per verdict and per admin action, in its
own file, reopened on SIGHUP so logrotate can move it."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
import time

from admin_api import api_guard, call, ctl
from peers import RawClient, make_message, smtplib_send, wait_until


def read_events(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_one_line_per_verdict_and_per_admin_action(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr)
    path = workdir / "events.jsonl"
    smtplib_send(guard.host, guard.port, make_message(), source="127.0.0.71")
    early = RawClient(guard.host, guard.port, source="127.0.0.72")
    early.send(b"EHLO early\r\n")
    early.read_until_closed(timeout=5)
    wait_until(lambda: len(read_events(path)) >= 2, 5, "two verdict lines")

    clean, caught = sorted((e for e in read_events(path) if e["type"] == "verdict"), key=lambda e: e["client"])
    assert clean["verdict"] == "pass" and clean["tests"] == [] and clean["client"].startswith("127.0.0.71:")
    assert clean["bytes_up"] > 0 and clean["turns"] > 0 and clean["orig_dst"] == sink.addr
    assert caught["verdict"] == "reject" and caught["tests"] == ["pregreet"]
    for e in (clean, caught):
        assert e["ts"].endswith("Z") and isinstance(e["elapsed"], float)
        assert set(e) >= {"ts", "type", "verdict", "tests", "client", "elapsed", "bytes_up", "bytes_down", "end"}

    assert ctl(guard, "block", "203.0.113.9", "--reason", "manual").returncode == 0
    assert ctl(guard, "unblock", "203.0.113.9").returncode == 0
    assert ctl(guard, "--token-name", "ci", "reload").returncode == 0
    guard.signal(signal.SIGHUP)
    wait_until(lambda: len([e for e in read_events(path) if e["type"] == "admin"]) >= 4, 5, "admin lines")
    admin = [(e["who"], e["via"], e["action"], e.get("target"), e["result"]) for e in read_events(path) if e["type"] == "admin"]
    assert admin == [
        ("ops", "api", "block", "203.0.113.9/32", "ok"),
        ("ops", "api", "unblock", "203.0.113.9/32", "ok"),
        ("ci", "api", "reload", None, "ok"),
        ("sighup", "signal", "reload", None, "ok"),
    ]
    # Stays out of the daemon's own log, which keeps its verdict lines.
    assert '"type":"admin"' not in guard.log()
    m = guard.metrics()
    assert m['mxguard_event_log_lines_total{type="verdict"}'] == 2
    assert m["mxguard_event_log_dropped_total"] == 0


def test_sighup_reopens_the_file_after_a_rotation(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr)
    path = workdir / "events.jsonl"
    smtplib_send(guard.host, guard.port, make_message(), source="127.0.0.81")
    wait_until(lambda: len(read_events(path)) == 1, 5, "first line")

    rotated = workdir / "events.jsonl.1"
    os.rename(path, rotated)  # what logrotate does
    guard.signal(signal.SIGHUP)
    wait_until(lambda: path.exists(), 3, "reopened file")
    smtplib_send(guard.host, guard.port, make_message(), source="127.0.0.82")
    wait_until(lambda: any(e.get("client", "").startswith("127.0.0.82:") for e in read_events(path)), 5, "line in the new file")
    assert [e["client"].split(":")[0] for e in read_events(rotated) if e["type"] == "verdict"] == ["127.0.0.81"]
    # The reload itself is the first line of the new file (who: sighup).
    assert read_events(path)[0]["action"] == "reload"


def test_an_event_log_that_cannot_be_opened_stops_the_start(sink, make_guard, workdir):
    guard = make_guard(upstream=sink.addr, start=False, **{"log.events": "/nonexistent-dir/events.jsonl"})
    import subprocess
    import guard as guard_mod
    out = subprocess.run([guard_mod.binary(), "run", "--config", str(guard.config_path)],
                         capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert out.returncode != 0 and "/nonexistent-dir" in out.stderr


def pregreet_bots(guard, sources):
    """Bots that talk first, each rejected (554) and closed at once."""
    for source in sources:
        bot = RawClient(guard.host, guard.port, source=source)
        bot.send(b"EHLO bot.example.test\r\n")
        bot.read_until_closed(timeout=5)
        bot.close()


def test_the_last_verdict_is_in_the_file_after_sigterm(sink, make_guard, workdir):
    # No state directory: nothing else slows the exit down.
    path = workdir / "events.jsonl"
    guard = make_guard(upstream=sink.addr, **{"log.events": str(path), "state.dir": ""})
    pregreet_bots(guard, [f"127.0.0.{100 + i}" for i in range(5)])
    smtplib_send(guard.host, guard.port, make_message(), source="127.0.0.99")
    guard.stop()  # SIGTERM right after the session
    clients = [e["client"].split(":")[0] for e in read_events(path) if e["type"] == "verdict"]
    assert sorted(clients) == ["127.0.0.100", "127.0.0.101", "127.0.0.102", "127.0.0.103",
                               "127.0.0.104", "127.0.0.99"]


def test_sigterm_waits_for_a_slow_event_log_to_take_its_last_lines(sink, make_guard, workdir):
    # A disk that lags: the "file" is a FIFO of one page that nobody reads
    # until the guard was told to stop. The writer blocks on it with the
    # last verdicts still queued; the exit must wait for them.
    path = workdir / "events.fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(reader, 1031, 4096)  # F_SETPIPE_SZ
    guard = make_guard(upstream=sink.addr, **{"log.events": str(path), "state.dir": "",
                                              "pregreet.block_ttl": "0s"})
    n = 40  # ~300 bytes a line: far more than a page
    pregreet_bots(guard, ["127.0.0.2"] * n)
    guard.wait_metric("mxguard_event_log_lines_total", n, timeout=5, type="verdict")

    got = bytearray()

    def read_after_a_while():
        time.sleep(0.5)
        os.set_blocking(reader, True)
        while chunk := os.read(reader, 65536):  # EOF: the guard closed the file
            got.extend(chunk)

    t = threading.Thread(target=read_after_a_while)
    t.start()
    t0 = time.monotonic()
    guard.stop()
    took = time.monotonic() - t0
    t.join(10)
    os.close(reader)
    lines = [json.loads(line) for line in got.decode().splitlines()]
    assert len([e for e in lines if e["type"] == "verdict"]) == n, f"lines lost at exit (exit took {took:.2f}s)"
    assert took < 5, "the exit waited longer than the disk did"
