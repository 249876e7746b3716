"""The session log: one verdict line per session, human text by default,
JSON lines with --log-format json, carrying time, client, original
destination, verdict, test, elapsed and bytes."""

import json
import re

from peers import RawClient

EHLO = b"EHLO bot.example.test\r\n"


def clean_session(guard, source):
    c = RawClient("127.0.0.1", guard.port, source=source)
    c.read_reply()
    assert c.command(b"EHLO clean.example.test\r\n").code == 250
    assert c.command(b"QUIT\r\n").code == 221
    sent = b"EHLO clean.example.test\r\nQUIT\r\n"
    c.read_until_closed()
    c.close()
    return c, sent


def bot_session(guard, source):
    c = RawClient("127.0.0.1", guard.port, source=source)
    c.send(EHLO)
    c.read_until_closed()
    c.close()
    return c


def test_json_log_is_one_object_per_line_with_verdict_fields(sink, make_guard):
    guard = make_guard(upstream=sink.addr, args=["--log-format", "json"])

    clean, sent = clean_session(guard, "127.0.0.2")
    bot = bot_session(guard, "127.0.0.3")
    guard.wait_verdict("127.0.0.2")
    guard.wait_verdict("127.0.0.3")
    guard.stop()

    records = []
    for line in guard.log_lines():
        rec = json.loads(line)  # every line, not just the verdicts
        assert isinstance(rec, dict), line
        records.append(rec)
    sessions = [r for r in records if r.get("message") == "session"]
    assert len(sessions) == 2, records

    by_client = {r["client"]: r for r in sessions}
    ok = by_client[f"127.0.0.2:{clean.local_port}"]
    assert ok["level"] == "INFO" and "timestamp" in ok
    assert (ok["verdict"], ok["test"]) == ("pass", "none")
    assert ok["orig_dst"] == sink.addr
    assert float(ok["elapsed"]) >= 0.5
    assert int(ok["bytes_up"]) == len(sent)
    assert int(ok["bytes_down"]) > 0

    rejected = by_client[f"127.0.0.3:{bot.local_port}"]
    assert (rejected["verdict"], rejected["test"]) == ("reject", "pregreet")
    assert any("PREGREET" in json.dumps(r) for r in records), "the PREGREET event is in the JSON log too"


def test_text_log_verdict_lines(sink, make_guard):
    guard = make_guard(upstream=sink.addr)

    clean, sent = clean_session(guard, "127.0.0.2")
    bot_session(guard, "127.0.0.3")
    guard.wait_verdict("127.0.0.3")

    line = guard.wait_log(rf"verdict=\"?pass\"? .*client=\"?127\.0\.0\.2:{clean.local_port}")[0].string
    assert re.search(r"^\S+\s+INFO\b", line), line
    for field in ("test=", "orig_dst=", "elapsed=", "bytes_up=", "bytes_down="):
        assert field in line, (field, line)
    v = guard.verdicts("127.0.0.2")[0]
    assert int(v["bytes_up"]) == len(sent)
    assert v["orig_dst"] == sink.addr
    assert guard.verdicts("127.0.0.3")[0]["verdict"] == "reject"
