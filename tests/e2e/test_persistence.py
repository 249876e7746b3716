"""The state store: a guard killed with SIGKILL comes back with its
dynamic blocklist, its reputation scores and its sender trends.

Detections reach the disk within `state.flush_interval`; scores and
trends within `state.snapshot_interval` (both short here)."""

import json
import signal
import time

from admin_api import api_guard, ctl
from peers import RawClient

FAST_STATE = {"state.flush_interval": "100ms", "state.snapshot_interval": "1s"}


def kill9_and_restart(guard):
    guard.proc.signal(signal.SIGKILL)
    guard.proc.wait(5)
    guard.start()


def test_blocklist_and_reputation_survive_kill_9(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr, **FAST_STATE, **{
        "greet.delay": "300ms",
        "pregreet.action": "observe",
        "reputation.threshold": 1.9,
        "reputation.on_threshold": ["alert"],
    })
    # An operator blocks a network with the CLI: on disk before it answers,
    # so it survives even a kill that comes right after.
    out = ctl(guard, "block", "127.0.0.64/26", "--ttl", "1h", "--reason", "spam run")
    assert out.returncode == 0, out.stderr
    # An early talker, observed: one reputation point.
    early = RawClient("127.0.0.1", guard.port, source="127.0.0.3")
    early.send(b"EHLO early.example.test\r\n")
    early.read_reply(timeout=3)
    early.close()
    guard.wait_log(r"PREGREET \d+ after [\d.]+ from \[127\.0\.0\.3\]")
    time.sleep(1.5)  # one snapshot interval

    kill9_and_restart(guard)
    guard.wait_log(r"state: 1 list entries, 1 scores")

    again = RawClient("127.0.0.1", guard.port, source="127.0.0.70")
    assert again.read_reply(timeout=3).code == 554, "the block survived the crash"
    again.close()
    looked = ctl(guard, "--json", "lookup", "127.0.0.70")
    assert looked.returncode == 0, looked.stderr
    found = json.loads(looked.stdout)
    assert found["verdict"] == "blocked" and found["matched"]["reason"] == "spam run", found

    # The score came back too: one more point crosses the threshold.
    early = RawClient("127.0.0.1", guard.port, source="127.0.0.3")
    early.send(b"EHLO early.example.test\r\n")
    early.read_reply(timeout=3)
    early.close()
    guard.wait_log(r"REPUTATION 2\.00 over 1\.9 for \[127\.0\.0\.3\]")
    assert "127.0.0.70" not in " ".join(sink.connections())


def test_a_detection_is_on_disk_within_the_flush_window(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"state.flush_interval": "200ms",
                                              "state.snapshot_interval": "1h"})
    bot = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    bot.send(b"EHLO bot.example.test\r\n")
    assert bot.read_reply(timeout=3).code == 554
    bot.close()
    time.sleep(0.5)  # the flush window, with room
    kill9_and_restart(guard)
    guard.wait_log(r"state: 1 list entries")
    log = (guard.workdir / "state" / "lists.log").read_text().splitlines()
    entry = json.loads(log[-1])
    assert (entry["op"], entry["net"], entry["source"], entry["reason"]) == (
        "add", "127.0.0.2/32", "detection", "pregreet")
    c = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert c.read_reply(timeout=3).code == 554
    c.close()
