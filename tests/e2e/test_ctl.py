"""`mxguard ctl` round trips against a running guard: tables by default,
the API's JSON with --json, a non-zero exit with the API's message."""

from __future__ import annotations

import json

from admin_api import TOKEN, api_guard, call, ctl, send_early_talker_mail, write_tokens
from peers import RawClient, wait_until


def test_block_lookup_list_and_unblock(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr)
    out = ctl(guard, "block", "192.0.2.0/24", "--ttl", "1h", "--reason", "spam run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("blocked 192.0.2.0/24 (admin, added by ops"), out.stdout
    assert "reason: spam run" in out.stdout

    out = ctl(guard, "lookup", "192.0.2.77")
    assert out.returncode == 0 and out.stdout.startswith("192.0.2.77: blocked by 192.0.2.0/24"), out.stdout
    out = ctl(guard, "--json", "lookup", "192.0.2.77")
    assert json.loads(out.stdout)["matched"]["added_by"] == "ops"

    out = ctl(guard, "blocklist")
    assert out.returncode == 0
    assert out.stdout.splitlines()[0].split() == ["NET", "SOURCE", "BY", "SINCE", "UNTIL", "REASON"]
    assert "192.0.2.0/24" in out.stdout and "1 of 1 entries" in out.stdout

    out = ctl(guard, "unblock", "192.0.2.0/24")
    assert out.returncode == 0 and out.stdout == "unblocked 192.0.2.0/24\n"
    out = ctl(guard, "unblock", "192.0.2.0/24")
    assert out.returncode == 1 and "not a dynamic entry" in out.stderr and "404" in out.stderr

    out = ctl(guard, "block", "192.0.2.7/24")
    assert out.returncode == 1 and "host bits" in out.stderr

    assert ctl(guard, "allow", "2001:db8::/48", "--reason", "partner").returncode == 0
    out = ctl(guard, "lookup", "2001:db8::1")
    assert "allowed by 2001:db8::/48" in out.stdout
    assert ctl(guard, "unallow", "2001:db8::/48").returncode == 0
    assert "unlisted" in ctl(guard, "lookup", "2001:db8::1").stdout


def test_sessions_stats_reload_and_config(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr, **{"greet.delay": "3s"})
    client = RawClient(guard.host, guard.port, source="127.0.0.51")
    wait_until(lambda: call(guard, "GET", "/api/v1/sessions")[1]["total"] == 1, 3, "live session")
    out = ctl(guard, "sessions")
    assert out.returncode == 0
    assert "127.0.0.51:" in out.stdout and " greet " in out.stdout, out.stdout
    sessions = json.loads(ctl(guard, "sessions", "--json").stdout)["sessions"]
    assert sessions[0]["phase"] == "greet"
    client.close()

    out = ctl(guard, "stats")
    assert out.returncode == 0 and out.stdout.startswith("version"), out.stdout
    assert json.loads(ctl(guard, "--json", "stats").stdout)["connections"]["accepted"] == 1

    out = ctl(guard, "reload")
    assert out.returncode == 0 and out.stdout.startswith("reloaded "), out.stdout
    guard.config_path.write_text("[greet]\ndelay = \"forever\"\n")
    out = ctl(guard, "reload")
    assert out.returncode == 1 and "forever" in out.stderr and "422" in out.stderr

    out = ctl(guard, "config")
    assert out.returncode == 0 and "[intercept]" in out.stdout and 'token_file = "********"' in out.stdout
    out = ctl(guard, "ready")
    assert out.returncode == 0 and out.stdout.startswith("ready")


def test_quarantine_list_show_release_delete(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr, **{
        "pregreet.action": "quarantine", "quarantine.dir": str(workdir / "quarantine")})
    send_early_talker_mail(guard.host, guard.port, "127.0.0.61", body=b"Subject: one\r\n\r\nfirst\r\n")
    send_early_talker_mail(guard.host, guard.port, "127.0.0.62", body=b"Subject: two\r\n\r\nsecond\r\n")

    out = ctl(guard, "quarantine", "list")
    assert out.returncode == 0 and "2 of 2 messages" in out.stdout, out.stdout
    ids = [m["id"] for m in json.loads(ctl(guard, "--json", "quarantine", "list").stdout)["messages"]]
    assert len(ids) == 2

    out = ctl(guard, "quarantine", "show", ids[0])
    assert out.returncode == 0 and "Subject: one" in out.stdout and "mail from: <early@sender.example.test>" in out.stdout

    out = ctl(guard, "quarantine", "release", ids[0])
    assert out.returncode == 0 and out.stdout.startswith(f"released {ids[0]} to {sink.addr}"), out.stdout
    (msg,) = sink.wait_messages(1)
    assert b"first" in msg.content

    out = ctl(guard, "quarantine", "delete", ids[1])
    assert out.returncode == 0 and out.stdout == f"deleted {ids[1]}\n"
    out = ctl(guard, "quarantine", "show", ids[1])
    assert out.returncode == 1 and "no quarantined message" in out.stderr
    assert len(sink.messages()) == 1


def test_errors_exit_non_zero_with_the_reason(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr)
    bad = workdir / "bad-tokens"
    bad.write_text("intruder:" + "x" * 32 + "\n")
    out = ctl(guard, "stats", token_file=bad)
    assert out.returncode == 1 and "invalid token" in out.stderr and "401" in out.stderr
    out = ctl(guard, "stats", token_file=workdir / "missing")
    assert out.returncode == 2 and "cannot read" in out.stderr
    guard.stop()
    out = ctl(guard, "stats")
    assert out.returncode == 1 and "cannot connect" in out.stderr
