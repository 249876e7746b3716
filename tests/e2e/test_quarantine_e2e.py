"""The quarantine end to end: durable before the 250, and released intact.

A suspect client's message goes to the quarantine; the guard is killed with
SIGKILL the moment the client has its `250` — the file is there and complete
(`mxguard quarantine show`). Killed in the middle of the message instead,
nothing is in `new/`, the client never got a `250`, and the next start
clears the leftover. `mxguard quarantine release` then delivers exactly the
stored message, with its stored envelope, to a real Postfix.
"""

import base64
import json
import re
import subprocess
import time

import pytest

import guard as guard_mod
from peers import RawClient, SmtpSink, lf, make_message, strip_trace_headers

QUARANTINE_ALL = {"actions.pipelining": "quarantine", "pregreet.action": "observe"}


def cli(guard, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([guard_mod.binary(), "quarantine", *args, "-c", str(guard.config_path)],
                          capture_output=True, text=True, timeout=30)
    if check:
        assert proc.returncode == 0, f"mxguard quarantine {' '.join(args)}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc


def show(guard, qid) -> dict:
    return json.loads(cli(guard, "show", qid, "--json").stdout)


def suspect_until_data(guard, msg) -> RawClient:
    """A client that trips `pipelining` (EHLO+NOOP in one write), then opens
    a transaction and gets its 354."""
    c = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert c.read_reply().code == 220
    c.send(b"EHLO hasty.example.test\r\nNOOP\r\n")
    assert c.read_reply().code == 250 and c.read_reply().code == 250
    assert c.command(f"MAIL FROM:<{msg.sender}>\r\n".encode()).code == 250
    assert c.command(f"RCPT TO:<{msg.rcpt}>\r\n".encode()).code == 250
    assert c.command(b"DATA\r\n").code == 354
    return c


def wire(msg) -> bytes:
    return msg.data.replace(b"\r\n.", b"\r\n..")


def big_message():
    return make_message(body_lines=[f"{i:07d} " + "z" * 90 for i in range(20_000)] + [".", "..", "end"])


def test_kill_9_right_after_the_250_leaves_the_message_complete(sink, make_guard, workdir):
    guard = make_guard(upstream=sink.addr, **QUARANTINE_ALL, **{"quarantine.dir": str(workdir / "q")})
    msg = big_message()  # 2 MB: storing takes a moment, the kill comes right after it

    c = suspect_until_data(guard, msg)
    c.send(wire(msg) + b".\r\n")
    reply = c.read_reply(timeout=20)
    guard.proc.kill()  # SIGKILL, the instant the client has its answer
    c.close()

    assert reply.code == 250, reply.text
    qid = re.search(rb"queued as (\S+)\r\n", reply.lines[-1]).group(1).decode()
    shown = show(guard, qid)
    assert base64.b64decode(shown["message_base64"]) == msg.data
    assert shown["size"] == len(msg.data)
    meta = shown["meta"]
    assert (meta["id"], meta["mail_from"], meta["rcpt_to"], meta["tests"]) == (
        qid, msg.sender, [msg.rcpt], ["pipelining"])
    assert meta["client"] == f"127.0.0.2:{c.local_port}" and meta["helo"] == "hasty.example.test"
    assert sink.no_messages(), sink.log()[-2000:]

    # The next start finds it where it was, and leaves no temp file behind.
    again = make_guard(upstream=sink.addr, name="guard-again", **QUARANTINE_ALL,
                       **{"quarantine.dir": str(workdir / "q")})
    assert [p.name for p in (workdir / "q" / "new").iterdir()] == [qid]
    assert list((workdir / "q" / "tmp").iterdir()) == []
    listed = json.loads(cli(again, "list", "--json").stdout)
    assert [m["id"] for m in listed] == [qid]


def test_kill_9_in_the_middle_of_a_message_stores_nothing(sink, make_guard, workdir):
    guard = make_guard(upstream=sink.addr, **QUARANTINE_ALL, **{"quarantine.dir": str(workdir / "q")})
    msg = big_message()

    c = suspect_until_data(guard, msg)
    c.send(wire(msg)[: len(msg.data) // 2])
    time.sleep(0.5)
    assert list((workdir / "q" / "tmp").iterdir()), "the message is being written"
    guard.proc.kill()
    seen = c.read_until_closed(timeout=5)
    c.close()

    assert not re.search(rb"(?m)^250 2\.0\.0 .*queued", seen)
    assert list((workdir / "q" / "new").iterdir()) == []
    make_guard(upstream=sink.addr, name="guard-again", **QUARANTINE_ALL, **{"quarantine.dir": str(workdir / "q")})
    assert list((workdir / "q" / "tmp").iterdir()) == [], "the next start removes the partial file"


def test_release_delivers_the_exact_stored_message(mta, make_guard, workdir):
    guard = make_guard(upstream=mta.addr, **QUARANTINE_ALL, **{"quarantine.dir": str(workdir / "q")})
    # dot-leading lines and a lone dot (stuffed again on release), 8-bit text
    msg = make_message(body_lines=["Hello,", ".", "..", ".x", "Gr\u00fc\u00dfe \u2013 \u00ff", "y" * 990, "bye"])

    c = suspect_until_data(guard, msg)
    reply = c.command(wire(msg) + b".\r\n")
    assert c.command(b"QUIT\r\n").code == 221
    c.close()
    qid = re.search(rb"queued as (\S+)\r\n", reply.lines[-1]).group(1).decode()
    stored = base64.b64decode(show(guard, qid)["message_base64"])
    assert stored == msg.data
    assert mta.stored() == []

    out = cli(guard, "release", qid, "--upstream", mta.addr)

    assert re.match(rf"released {qid} to {re.escape(mta.addr)} \({len(stored)} bytes, 1 recipients?\): 250 ",
                    out.stdout), out.stdout
    delivered = mta.wait_for(msg.token)
    assert strip_trace_headers(delivered) == lf(stored)
    assert b"Delivered-To: bob@example.test" in delivered
    mta.wait_log(rf"from=<{re.escape(msg.sender)}>")
    assert json.loads(cli(guard, "list", "--json").stdout) == []
    gone = cli(guard, "show", qid, check=False)
    assert gone.returncode == 1 and "no quarantined message" in gone.stderr


def test_release_refused_by_the_mta_keeps_the_message(workdir, make_guard, sink):
    """The recipient was fine when the message was quarantined; at release
    time the MTA refuses it: the message stays."""
    guard = make_guard(upstream=sink.addr, **QUARANTINE_ALL, **{"quarantine.dir": str(workdir / "q")})
    msg = make_message()
    c = suspect_until_data(guard, msg)
    reply = c.command(wire(msg) + b".\r\n")
    c.close()
    qid = re.search(rb"queued as (\S+)\r\n", reply.lines[-1]).group(1).decode()

    refusing = SmtpSink(workdir, name="refusing", extra=["-f", "rcpt"])  # 5xx to every RCPT
    out = cli(guard, "release", qid, "--upstream", refusing.addr, check=False)

    assert out.returncode == 1 and "stays in the quarantine" in out.stderr, out.stderr
    assert re.search(r"refused RCPT TO:<bob@example\.test>: 5\d\d ", out.stderr), out.stderr
    assert refusing.no_messages(), refusing.log()[-2000:]
    assert [m["id"] for m in json.loads(cli(guard, "list", "--json").stdout)] == [qid]
