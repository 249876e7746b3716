"""The admin API against a running guard: auth on every route, each
route's story, and clear 4xx answers to bad input (docs/api/openapi.yaml)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from admin_api import OTHER_TOKEN, TOKEN, api_guard, call, send_early_talker_mail, write_tokens
from peers import RawClient, make_message, smtplib_send, wait_until

QID = "20261122T200334.341027Z-638178abea0e9b49"
ROUTES = [
    ("GET", "/readyz", None),
    ("GET", "/api/v1/blocklist", None),
    ("POST", "/api/v1/blocklist", {"address": "192.0.2.1"}),
    ("DELETE", "/api/v1/blocklist?net=192.0.2.1", None),
    ("GET", "/api/v1/allowlist", None),
    ("POST", "/api/v1/allowlist", {"address": "192.0.2.1"}),
    ("DELETE", "/api/v1/allowlist?net=192.0.2.1", None),
    ("GET", "/api/v1/lookup/192.0.2.1", None),
    ("GET", "/api/v1/sessions", None),
    ("GET", "/api/v1/quarantine", None),
    ("GET", f"/api/v1/quarantine/{QID}", None),
    ("POST", f"/api/v1/quarantine/{QID}/release", {}),
    ("DELETE", f"/api/v1/quarantine/{QID}", None),
    ("POST", "/api/v1/reload", {}),
    ("GET", "/api/v1/config", None),
    ("GET", "/api/v1/stats", None),
]


def test_every_route_but_healthz_and_metrics_needs_the_token(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr)
    status, body, _ = call(guard, "GET", "/healthz", token=None)
    assert (status, body) == (200, "ok\n")
    status, body, _ = call(guard, "GET", "/metrics", token=None)
    assert status == 200 and "mxguard_build_info" in body

    for method, path, body in ROUTES:
        for token in (None, "wrong-token-wrong-token", TOKEN[:-1]):
            status, value, headers = call(guard, method, path, body=body, token=token)
            assert status == 401, (method, path, token, status, value)
            assert "error" in value and value["error"], value
            assert headers.get("www-authenticate", "").startswith("Bearer")
    # A token that is not "Bearer ..." is refused too.
    status, value, _ = call(guard, "GET", "/api/v1/stats", token=None, headers={"Authorization": f"Basic {TOKEN}"})
    assert status == 401 and "Bearer" in value["error"]
    # Both named tokens work.
    for token in (TOKEN, OTHER_TOKEN):
        assert call(guard, "GET", "/api/v1/stats", token=token)[0] == 200
    # Nothing a refused call did shows in the event log.
    events = [json.loads(l) for l in (workdir / "events.jsonl").read_text().splitlines()] if (workdir / "events.jsonl").exists() else []
    assert not [e for e in events if e["type"] == "admin"], events


def test_without_a_token_file_only_healthz_and_metrics_answer(sink, make_guard):
    guard = make_guard(upstream=sink.addr)
    assert call(guard, "GET", "/healthz", token=None)[0] == 200
    assert call(guard, "GET", "/metrics", token=None)[0] == 200
    for method, path, body in ROUTES:
        status, value, _ = call(guard, method, path, body=body, token=TOKEN)
        assert status == 403, (method, path, status, value)
        assert "token_file" in value["error"]


def test_bad_input_gets_a_clear_4xx(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr)
    cases = [
        ("POST", "/api/v1/blocklist", {"address": "192.0.2.0/33"}, None, 400, "address"),
        ("POST", "/api/v1/blocklist", {"address": "192.0.2.7/24"}, None, 400, "192.0.2.0/24"),
        ("POST", "/api/v1/blocklist", {"address": "not-an-ip"}, None, 400, "address"),
        ("POST", "/api/v1/blocklist", {"address": "192.0.2.1", "ttl_seconds": -5}, None, 400, "ttl_seconds"),
        ("POST", "/api/v1/blocklist", {"address": "192.0.2.1", "ttl_seconds": 0}, None, 400, "ttl_seconds"),
        ("POST", "/api/v1/blocklist", {"address": "192.0.2.1", "tll": 5}, None, 400, "tll"),
        ("POST", "/api/v1/blocklist", {}, None, 400, "address"),
        ("POST", "/api/v1/allowlist", None, b"{not json", 400, "JSON"),
        ("POST", "/api/v1/blocklist", None, b'{"address": "192.0.2.1", "reason": "' + b"x" * 100_000 + b'"}', 413, "65536"),
        ("POST", "/api/v1/reload", None, b"x" * 70_000, 413, "larger"),
        ("DELETE", "/api/v1/blocklist", None, None, 400, "net"),
        ("DELETE", "/api/v1/blocklist?net=1.2.3.4/99", None, None, 400, "net"),
        ("GET", "/api/v1/blocklist?limit=-1", None, None, 400, "limit"),
        ("GET", "/api/v1/blocklist?limit=100000", None, None, 400, "limit"),
        ("GET", "/api/v1/blocklist?contains=nope", None, None, 400, "contains"),
        ("GET", "/api/v1/blocklist?source=moon", None, None, 400, "source"),
        ("GET", "/api/v1/sessions?bogus=1", None, None, 400, "bogus"),
        ("GET", "/api/v1/sessions?phase=sleep", None, None, 400, "phase"),
        ("GET", "/api/v1/lookup/300.1.1.1", None, None, 400, "300.1.1.1"),
        ("GET", "/api/v1/quarantine/..%2Fetc%2Fpasswd", None, None, 400, "quarantine id"),
        ("DELETE", "/api/v1/quarantine/not-an-id", None, None, 400, "quarantine id"),
        ("GET", f"/api/v1/quarantine/{QID}", None, None, 404, QID),
        ("POST", f"/api/v1/quarantine/{QID}/release", {"upstream": "nowhere"}, None, 400, "upstream"),
        ("GET", "/api/v1/nothing-here", None, None, 404, "no such route"),
        ("PUT", "/api/v1/reload", None, None, 405, "POST"),
    ]
    for method, path, body, raw, want, needle in cases:
        status, value, _ = call(guard, method, path, body=body, raw=raw)
        assert status == want, (method, path, status, value)
        assert needle in value["error"], (method, path, value)
    status, value, _ = call(guard, "POST", "/api/v1/blocklist", raw=b'{"address": "192.0.2.1"}',
                            headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in value["error"]
    # Refused requests changed nothing, and the guard is fine.
    assert call(guard, "GET", "/api/v1/blocklist")[1]["total"] == 0
    assert call(guard, "GET", "/healthz", token=None)[0] == 200
    m = guard.metrics()
    assert m['mxguard_admin_requests_total{code="400",route="/api/v1/blocklist"}'] >= 5
    assert not any(k.startswith("mxguard_admin_requests_total") and 'code="5' in k for k in m), m


def test_block_lookup_and_unblock_decide_what_a_client_gets(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr)
    status, entry, _ = call(guard, "POST", "/api/v1/blocklist",
                            body={"address": "127.0.0.66", "ttl_seconds": 600, "reason": "spam run"})
    assert status == 201, entry
    assert entry["net"] == "127.0.0.66/32" and entry["source"] == "admin" and entry["added_by"] == "ops"
    assert entry["until_unix_ms"] - entry["since_unix_ms"] == 600_000
    status, entry, _ = call(guard, "POST", "/api/v1/blocklist", body={"address": "198.51.100.0/24"})
    assert status == 201 and entry["until_unix_ms"] is None

    status, found, _ = call(guard, "GET", "/api/v1/lookup/127.0.0.66")
    assert status == 200 and found["verdict"] == "blocked"
    assert found["matched"]["reason"] == "spam run" and found["matched"]["added_by"] == "ops"
    assert call(guard, "GET", "/api/v1/lookup/198.51.100.200")[1]["matched"]["net"] == "198.51.100.0/24"
    assert call(guard, "GET", "/api/v1/lookup/127.0.0.67")[1]["verdict"] == "unlisted"

    page = call(guard, "GET", "/api/v1/blocklist?limit=1")[1]
    assert page["total"] == 2 and len(page["entries"]) == 1
    page = call(guard, "GET", "/api/v1/blocklist?limit=1&offset=1")[1]
    assert len(page["entries"]) == 1
    page = call(guard, "GET", "/api/v1/blocklist?contains=198.51.100.9")[1]
    assert [e["net"] for e in page["entries"]] == ["198.51.100.0/24"]
    assert call(guard, "GET", "/api/v1/allowlist")[1]["total"] == 0

    # The blocked client is refused without the MTA seeing it.
    client = RawClient(guard.host, guard.port, source="127.0.0.66")
    assert client.read_reply().code == 554
    guard.wait_verdict("127.0.0.66")
    assert not [c for c in sink.connections() if "127.0.0.66" in c]

    status, removed, _ = call(guard, "DELETE", "/api/v1/blocklist?net=127.0.0.66")
    assert status == 200 and removed["net"] == "127.0.0.66/32"
    assert call(guard, "DELETE", "/api/v1/blocklist?net=127.0.0.66")[0] == 404
    smtplib_send(guard.host, guard.port, make_message(), source="127.0.0.66")
    sink.wait_messages(1)

    m = guard.metrics()
    lookups = {k: v for k, v in m.items() if k.startswith("mxguard_blocklist_lookups_total")}
    # One look-up per connection, under the documented labels only (a
    # second count as hit/miss once doubled every look-up).
    assert set(lookups) == {f'mxguard_blocklist_lookups_total{{result="{r}"}}'
                            for r in ("blocked", "allowed", "unlisted")}, lookups
    assert m['mxguard_blocklist_lookups_total{result="blocked"}'] >= 1
    assert sum(lookups.values()) == m["mxguard_connections_accepted_total"], (lookups, m)
    assert m['mxguard_blocklist_entries{source="dynamic"}'] == 1


def test_allowlisted_client_is_not_held(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr, **{"greet.delay": "3s"})
    status, entry, _ = call(guard, "POST", "/api/v1/allowlist", body={"address": "127.0.0.0/28", "reason": "partner"})
    assert status == 201 and entry["kind"] == "allow"
    assert call(guard, "GET", "/api/v1/lookup/127.0.0.9")[1]["verdict"] == "allowed"
    client = RawClient(guard.host, guard.port, source="127.0.0.9")
    reply = client.read_reply(timeout=2)
    assert reply.code == 220 and client.elapsed() < 1.5
    client.close()
    assert call(guard, "DELETE", "/api/v1/allowlist?net=127.0.0.0/28")[0] == 200
    assert call(guard, "GET", "/api/v1/lookup/127.0.0.9")[1]["verdict"] == "unlisted"


def test_sessions_show_a_held_client_with_its_phase(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr, **{"greet.delay": "3s"})
    client = RawClient(guard.host, guard.port, source="127.0.0.23")
    wait_until(lambda: call(guard, "GET", "/api/v1/sessions")[1]["total"] == 1, 3, "a live session")
    status, body, _ = call(guard, "GET", "/api/v1/sessions?phase=greet")
    assert status == 200
    (s,) = body["sessions"]
    assert s["client"].startswith("127.0.0.23:") and s["phase"] == "greet" and s["age_seconds"] >= 0
    assert call(guard, "GET", "/api/v1/sessions?phase=relay")[1]["sessions"] == []
    client.send(b"HELO early\r\n")  # an early talker: rejected
    client.read_until_closed(timeout=5)
    wait_until(lambda: call(guard, "GET", "/api/v1/sessions")[1]["total"] == 0, 3, "no live session")


def test_quarantine_list_show_release_and_delete(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr, **{
        "pregreet.action": "quarantine", "quarantine.dir": str(workdir / "quarantine")})
    for source in ("127.0.0.31", "127.0.0.32"):
        replies = send_early_talker_mail(guard.host, guard.port, source,
                                         body=f"Subject: from {source}\r\n\r\nhello\r\n".encode())
        assert replies[-2].startswith(b"250 "), replies
    assert sink.messages() == []

    status, listing, _ = call(guard, "GET", "/api/v1/quarantine")
    assert status == 200 and listing["total"] == 2 and listing["skipped"] == []
    first, second = listing["messages"]
    assert first["client"].startswith("127.0.0.31:") and first["tests"] == ["pregreet"]
    status, shown, _ = call(guard, "GET", f"/api/v1/quarantine/{first['id']}")
    assert status == 200 and "from 127.0.0.31" in shown["message"]
    assert shown["meta"]["rcpt_to"] == ["bob@example.test"]

    status, released, _ = call(guard, "POST", f"/api/v1/quarantine/{first['id']}/release", body={})
    assert status == 200, released
    assert released["reply"].startswith("250") and released["recipients"] == ["bob@example.test"]
    (msg,) = sink.wait_messages(1)
    assert b"from 127.0.0.31" in msg.content
    assert call(guard, "GET", f"/api/v1/quarantine/{first['id']}")[0] == 404

    status, deleted, _ = call(guard, "DELETE", f"/api/v1/quarantine/{second['id']}")
    assert status == 200 and deleted["deleted"] == second["id"]
    assert call(guard, "GET", "/api/v1/quarantine")[1]["total"] == 0
    assert call(guard, "DELETE", f"/api/v1/quarantine/{second['id']}")[0] == 404
    assert len(sink.messages()) == 1

    def admin_actions():
        events = [json.loads(l) for l in (workdir / "events.jsonl").read_text().splitlines()]
        return [(e["action"], e["target"], e["who"], e["result"]) for e in events if e["type"] == "admin"]

    # The event log is written by its own thread, just after the answer.
    wait_until(lambda: len(admin_actions()) >= 3, 5, "three admin events in the log")
    actions = admin_actions()
    assert actions == [
        ("quarantine.release", first["id"], "ops", "ok"),
        ("quarantine.delete", second["id"], "ops", "ok"),
        # A failed attempt is on the record too.
        ("quarantine.delete", second["id"], "ops", "error"),
    ]


def test_reload_route_is_sighup(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr)
    guard.config["greet.delay"] = "1500ms"
    guard.write_config()
    status, report, _ = call(guard, "POST", "/api/v1/reload")
    assert status == 200 and report["reloaded"] is True and report["warnings"] == []
    assert call(guard, "GET", "/api/v1/config")[1]["greet"]["delay"] == "1s 500ms"

    guard.config["greet.bogus"] = 1
    guard.write_config()
    status, value, _ = call(guard, "POST", "/api/v1/reload", body={})
    assert status == 422 and "bogus" in value["error"], value
    assert call(guard, "GET", "/api/v1/config")[1]["greet"]["delay"] == "1s 500ms"
    m = guard.metrics()
    assert m['mxguard_config_reloads_total{result="ok"}'] == 1
    assert m['mxguard_config_reloads_total{result="error"}'] == 1
    assert m["mxguard_config_last_reload_successful"] == 0
    assert call(guard, "POST", "/api/v1/reload", body={"force": True})[0] == 400


def test_config_is_effective_and_masks_secrets(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr)
    status, config, _ = call(guard, "GET", "/api/v1/config")
    assert status == 200
    assert config["intercept"]["upstream"] == sink.addr
    assert config["admin"]["token_file"] == "********"
    assert str(workdir / "tokens") not in json.dumps(config)
    assert TOKEN not in json.dumps(config)


def test_stats_and_readiness(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr)
    smtplib_send(guard.host, guard.port, make_message(), source="127.0.0.41")
    early = RawClient(guard.host, guard.port, source="127.0.0.42")
    early.send(b"EHLO too.early\r\n")
    early.read_until_closed(timeout=5)
    guard.wait_verdict("127.0.0.42")
    wait_until(lambda: call(guard, "GET", "/api/v1/stats")[1]["connections"]["by_outcome"]["reject"] == 1, 3, "stats")
    stats = call(guard, "GET", "/api/v1/stats")[1]
    assert stats["connections"]["accepted"] == 2
    assert stats["connections"]["by_outcome"]["pass"] == 1
    assert stats["detections"]["pregreet"] == 1
    assert stats["blocklist"]["entries"] == 1  # the early talker, blocked by the detection
    assert stats["sessions"]["live"] == 0 and set(stats["sessions"]["by_phase"]) == {"greet", "watch", "relay"}
    assert stats["uptime_seconds"] >= 0

    status, ready, _ = call(guard, "GET", "/readyz")
    assert status == 200 and ready["ready"] is True and ready["checks"]["upstream"]["ok"] is True
    threads = ready["checks"]["session_threads"]
    assert threads["ok"] is True and "session thread(s)" in threads["detail"], threads
    sink.stop()
    status, ready, _ = call(guard, "GET", "/readyz")
    assert status == 503 and ready["ready"] is False
    assert sink.addr.rsplit(":", 1)[1] in ready["checks"]["upstream"]["detail"]


def test_token_file_is_reread_on_reload(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr)
    tokens = workdir / "tokens"
    tokens.write_text("rotated:" + "r" * 32 + "\n")
    guard.signal(signal.SIGHUP)
    wait_until(lambda: call(guard, "GET", "/api/v1/stats", token="r" * 32)[0] == 200, 3, "new token accepted")
    assert call(guard, "GET", "/api/v1/stats", token=TOKEN)[0] == 401
    # A broken token file fails the reload and keeps the running tokens.
    tokens.write_text("short\n")
    assert call(guard, "POST", "/api/v1/reload", token="r" * 32)[0] == 422
    assert call(guard, "GET", "/api/v1/stats", token="r" * 32)[0] == 200
