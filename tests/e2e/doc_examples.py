"""The worked examples of docs/protocol-tests.md, run through a real guard.

    python3 tests/e2e/doc_examples.py [SCENARIO ...]     # all when none given

Each scenario starts its own peers (smtp-sink, Postfix or Exim as the MTA)
and a guard with the e2e test defaults (tests/e2e/guard.py), plays the
client, and writes what happened to DIR/SCENARIO.txt, DIR being
$MXGUARD_E2E_WORK/doc-examples (default tests/.work/doc-examples): the
transcript (`[ 0.50] C:` client lines, `S:` server lines, seconds since
connect, `<LF>`/`<CR>` for bare line ends), the guard's log lines, the
metrics that moved, and what the MTA logged or stored. Not a test: the e2e
tests (test_protocol_tests.py, test_actions.py, ...) assert the same
things. Needs root (smtp-sink, Postfix and Exim drop privileges) and
MXGUARD_BIN or target/debug/mxguard.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guard as G  # noqa: E402
import peers  # noqa: E402
from peers import RawClient, make_message  # noqa: E402


WORK = Path(os.environ.get("MXGUARD_E2E_WORK") or peers.REPO / "tests" / ".work") / "doc-examples"
OUT = WORK
BASE = WORK / "peers"


def show(b: bytes) -> str:
    s = b.decode("latin-1")
    s = s.replace("\r\n", "\x00").replace("\r", "<CR>").replace("\n", "<LF>\n").replace("\x00", "\n")
    return s


class Doc:
    """One scenario's output file and work directory."""

    def __init__(self, name):
        self.name = name
        self.lines = []
        self.w = BASE / name
        shutil.rmtree(self.w, ignore_errors=True)
        self.w.mkdir(parents=True)
        os.chmod(self.w, 0o755)

    def p(self, s=""):
        self.lines.append(s)

    def done(self):
        peers.CLEANUP.run_all()
        (OUT / f"{self.name}.txt").write_text("\n".join(self.lines) + "\n")


class TClient(RawClient):
    """A RawClient that writes down what it sends and receives."""

    doc = None

    def send(self, data, label=None):
        t = self.elapsed()
        text = label or show(data)
        for line in text.rstrip("\n").split("\n"):
            self.doc.p(f"[{t:5.2f}] C: {line}")
        super().send(data)

    def read_reply(self, timeout=None):
        r = super().read_reply(timeout)
        for at, line in zip(r.times, r.lines):
            self.doc.p(f"[{at:5.2f}] S: {show(line).rstrip()}")
        return r

    def finish(self, timeout=5):
        try:
            self.read_until_closed(timeout)
        except Exception:
            pass
        consumed = getattr(self, "_consumed", 0)
        for at, line in self.lines[consumed:]:
            self.doc.p(f"[{at:5.2f}] S: {show(line).rstrip()}")
        self._consumed = len(self.lines)
        self.doc.p(f"[{self.elapsed():5.2f}] (closed)" if self.eof else f"[{self.elapsed():5.2f}] (still open)")
        self.close()


def guard_log(doc, g, pattern=r"INFO (?!state:|mxguard 0)"):
    time.sleep(0.3)
    for line in g.log_lines():
        if re.search(pattern, line):
            doc.p(re.sub(r"^\S+Z\s+", "", line))


def metrics(doc, g, names=("mxguard_detections_total", "mxguard_actions_total", "mxguard_messages_total", "mxguard_connections_total")):
    for k, v in sorted(g.metrics().items()):
        if k.split("{")[0] in names and v:
            doc.p(f"{k} {int(v)}")


def sink_cmds(doc, sink):
    time.sleep(0.3)
    for line in sink.log().splitlines():
        m = re.match(r"smtp-sink: (connect \(.*\)|disconnect|[A-Za-z]+\b.*|\.)$", line)
        if m and not re.match(r"(name_mask|trying|vstream|smtp_stream|fd=)", m.group(1)):
            doc.p("sink: " + m.group(1))


def client(doc, g, source="127.0.0.2", **kw):
    TClient.doc = doc
    return TClient("127.0.0.1", g.port, source=source, **kw)


def section(doc, title):
    doc.p("")
    doc.p(f"--- {title}")


SCEN = {}


def scenario(f):
    SCEN[f.__name__] = f
    return f


@scenario
def pregreet():
    d = Doc("pregreet")
    sink = peers.SmtpSink(d.w)
    g = G.Guard(d.w, upstream=sink.addr, **{"greet.delay": "1s"})
    c = client(d, g)
    c.read_line()
    d.p(f"[{c.lines[0][0]:5.2f}] S: {show(c.lines[0][1]).rstrip()}")

    c.send(b"EHLO bot.example.test\r\n")
    c.finish()
    section(d, "log")
    guard_log(d, g)
    section(d, "metrics")
    metrics(d, g)
    section(d, "next connection")
    c = client(d, g)
    c.finish()
    section(d, "sink")
    sink_cmds(d, sink)
    g.stop()
    d.done()


@scenario
def pipelining():
    d = Doc("pipelining")
    sink = peers.SmtpSink(d.w)
    g = G.Guard(d.w, upstream=sink.addr)
    c = client(d, g)
    c.read_reply()
    c.send(b"EHLO bot.example.test\r\nMAIL FROM:<bot@bot.example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    c.finish()
    section(d, "log")
    guard_log(d, g)
    section(d, "metrics")
    metrics(d, g)
    section(d, "sink")
    sink_cmds(d, sink)
    g.stop()
    d.done()


@scenario
def helo_pipelining():
    d = Doc("helo_pipelining")
    sink = peers.SmtpSink(d.w)
    g = G.Guard(d.w, upstream=sink.addr)
    c = client(d, g)
    c.read_reply()
    c.send(b"HELO bot.example.test\r\n")
    c.read_reply()
    c.send(b"MAIL FROM:<bot@bot.example.test>\r\nRCPT TO:<bob@example.test>\r\n")
    c.finish()
    section(d, "log")
    guard_log(d, g)
    g.stop()
    d.done()


@scenario
def early_data():
    d = Doc("early_data")
    sink = peers.SmtpSink(d.w)
    g = G.Guard(d.w, upstream=sink.addr)
    c = client(d, g)
    c.read_reply()
    for cmd in (b"EHLO bot.example.test\r\n", b"MAIL FROM:<bot@bot.example.test>\r\n", b"RCPT TO:<bob@example.test>\r\n"):
        c.send(cmd)
        c.read_reply()
    c.send(b"DATA\r\nSubject: buy now\r\n\r\ncheap\r\n.\r\n")
    c.finish()
    section(d, "log")
    guard_log(d, g)
    section(d, "metrics")
    metrics(d, g)
    section(d, "sink")
    sink_cmds(d, sink)
    g.stop()
    d.done()


@scenario
def non_smtp():
    d = Doc("non_smtp")
    sink = peers.SmtpSink(d.w)
    g = G.Guard(d.w, upstream=sink.addr)
    c = client(d, g)
    c.read_reply()
    c.send(b"CONNECT 192.0.2.25:25 HTTP/1.1\r\nHost: 192.0.2.25:25\r\n\r\n")
    c.finish()
    section(d, "log")
    guard_log(d, g)
    section(d, "metrics")
    metrics(d, g)
    section(d, "sink")
    sink_cmds(d, sink)
    section(d, "GET, with actions.non_smtp = reject")
    g.stop()
    g2 = G.Guard(d.w, name="g2", upstream=sink.addr, **{"actions.non_smtp": "reject"})
    c = client(d, g2, source="127.0.0.3")
    c.read_reply()
    c.send(b"GET / HTTP/1.1\r\nHost: mx.example.test\r\n\r\n")
    c.finish()
    guard_log(d, g2)
    g2.stop()
    d.done()


def client_hello():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
    t = ctx.wrap_bio(i, o, server_hostname="mx.example.test")
    try: t.do_handshake()
    except ssl.SSLWantReadError: pass
    return o.read()


@scenario
def tls_on_plaintext():
    d = Doc("tls_on_plaintext")
    sink = peers.SmtpSink(d.w)
    g = G.Guard(d.w, upstream=sink.addr)
    c = client(d, g)
    c.read_reply()
    h = client_hello()
    c.send(h, label=f"{h[:6].hex(' ')} ... ({len(h)} bytes: a TLS ClientHello)")
    c.finish()
    section(d, "log")
    guard_log(d, g)
    section(d, "metrics")
    metrics(d, g)
    section(d, "next connection (not blocklisted)")
    c = client(d, g)
    c.read_reply()
    c.send(b"QUIT\r\n")
    c.finish()
    g.stop()
    d.done()


@scenario
def implicit_tls():
    d = Doc("implicit_tls")
    sink = peers.SmtpSink(d.w)
    g = G.Guard(d.w, upstream=sink.addr)
    TClient.doc = d
    c = TClient("127.0.0.1", g.port, source="127.0.0.2")
    h = client_hello()
    c.send(h, label=f"{h[:6].hex(' ')} ... ({len(h)} bytes: a TLS ClientHello, at connect)")
    c.finish()
    section(d, "log")
    guard_log(d, g)
    section(d, "metrics")
    metrics(d, g)
    section(d, "next connection (not blocklisted)")
    c = client(d, g)
    c.read_reply()
    c.send(b"QUIT\r\n")
    c.finish()
    g.stop()
    d.done()

@scenario
def bare_lf():
    d = Doc("bare_lf")
    sink = peers.PostfixMta(d.w)
    g = G.Guard(d.w, upstream=sink.addr)
    c = client(d, g)
    c.read_reply()
    c.send(b"EHLO bot.example.test\n")
    c.read_reply()
    c.send(b"QUIT\n")
    c.finish()
    section(d, "log")
    guard_log(d, g)
    section(d, "metrics")
    metrics(d, g)
    g.stop()
    d.done()


@scenario
def long_line():
    d = Doc("long_line")
    sink = peers.SmtpSink(d.w)
    g = G.Guard(d.w, upstream=sink.addr)
    c = client(d, g)
    c.read_reply()
    c.send(b"EHLO bot.example.test\r\n")
    c.read_reply()
    line = b"MAIL FROM:<" + b"a" * 10000 + b"@bot.example.test>\r\n"
    c.send(line, label="MAIL FROM:<aaaa...(10,000 a)...@bot.example.test>")
    c.finish()
    section(d, "log")
    guard_log(d, g)
    section(d, "metrics")
    metrics(d, g)
    section(d, "sink")
    sink_cmds(d, sink)
    g.stop()
    d.done()


@scenario
def unknown_commands():
    d = Doc("unknown_commands")
    sink = peers.SmtpSink(d.w)
    g = G.Guard(d.w, upstream=sink.addr)
    c = client(d, g)
    c.read_reply()
    for cmd in (b"EHLO bot.example.test\r\n", b"WHATEVER\r\n", b"FROBNICATE\r\n"):
        c.send(cmd)
        c.read_reply()
    c.send(b"ZAP\r\n")
    c.finish()
    section(d, "log")
    guard_log(d, g)
    section(d, "metrics")
    metrics(d, g)
    section(d, "sink")
    sink_cmds(d, sink)
    g.stop()
    d.done()


FORGED = (b"MAIL FROM:<ceo@bank.example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
          b"From: CEO <ceo@bank.example.test>\r\nSubject: smuggled\r\n\r\nwire the money\r\n")


def smuggle(d, port, source):
    c = client(d, type("G", (), {"port": port})(), source=source)
    c.read_reply()
    for cmd in (b"EHLO smuggler.example.test\r\n", b"MAIL FROM:<alice@sender.example.test>\r\n", b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n"):
        c.send(cmd)
        c.read_reply()
    c.send(b"From: Alice <alice@sender.example.test>\r\nSubject: outer\r\n\r\nouter text\n.\n" + FORGED + b".\r\n")
    try:
        c.read_reply()
        while True: c.read_reply(timeout=0.5)
    except Exception: pass
    if not c.eof:
        c.send(b"QUIT\r\n")
    c.finish()


@scenario
def smuggling():
    d = Doc("smuggling")
    mta = peers.PostfixMta(d.w)
    section(d, "straight to Postfix 3.7 (smtpd_forbid_bare_newline = no)")
    smuggle(d, mta.port, "127.0.0.2")
    time.sleep(0.5)
    for line in mta.log().splitlines():
        if re.search(r"cleanup.*message-id|disconnect from", line): d.p("postfix: " + line.split(": ", 1)[1])
    d.p(f"Maildir files: {len(mta.stored())}")
    for turns_mode, extra in (("reject", {}), ("normalize", {"actions.smuggling": "observe"})):
        section(d, f"through the guard, turns.smuggling = {turns_mode} {extra}")
        mta2 = peers.PostfixMta(d.w, name=f"mta-{turns_mode}")
        g = G.Guard(d.w, name=f"g-{turns_mode}", upstream=mta2.addr, **{"turns.smuggling": turns_mode}, **extra)
        smuggle(d, g.port, "127.0.0.3")
        time.sleep(0.5)
        guard_log(d, g)
        metrics(d, g)
        for line in mta2.log().splitlines():
            if re.search(r"cleanup.*message-id|disconnect from|lost connection", line): d.p("postfix: " + line.split(": ", 1)[1])
        d.p(f"Maildir files: {len(mta2.stored())}")
        for m in mta2.stored(): d.p(peers.strip_trace_headers(m).decode())
        g.stop()
    d.done()


@scenario
def starttls_injection():
    d = Doc("starttls_injection")
    mta = peers.PostfixMta(d.w, extra_main={"debug_peer_list": "127.0.0.0/8"})
    g = G.Guard(d.w, upstream=mta.addr)
    c = client(d, g)
    c.read_reply()
    c.send(b"EHLO bot.example.test\r\n")
    c.read_reply()
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@bot.example.test>\r\n")
    c.finish()
    section(d, "log")
    guard_log(d, g)
    section(d, "metrics")
    metrics(d, g)
    section(d, "postfix")
    time.sleep(0.5)
    for line in mta.log().splitlines():
        if re.search(r"smtpd\[\d+\]: (< |connect from|disconnect from|lost connection|SSL_accept)", line): d.p("postfix: " + line.split(": ", 1)[1])
    g.stop()
    d.done()


def trip(c):
    c.read_reply()
    c.send(b"EHLO hasty.example.test\r\nNOOP\r\n")
    c.read_reply()
    c.read_reply()


def transaction(c, msg, quit=True):
    for cmd in (b"EHLO hasty.example.test\r\n", f"MAIL FROM:<{msg.sender}>\r\n".encode(), f"RCPT TO:<{msg.rcpt}>\r\n".encode(), b"DATA\r\n"):
        c.send(cmd)
        c.read_reply()
    c.send(msg.data.replace(b"\r\n.", b"\r\n..") + b".\r\n", label="(the message, 6 lines)\n.")
    c.read_reply()
    if quit:
        c.send(b"QUIT\r\n")
        c.read_reply()
    c.finish()


def action_example(name, action, extra=None):
    d = Doc(f"action_{name}")
    sink = peers.SmtpSink(d.w)
    cfg = {"actions.pipelining": action, "quarantine.dir": str(d.w / "quarantine")}
    cfg.update(extra or {})
    g = G.Guard(d.w, upstream=sink.addr, **cfg)
    msg = make_message(body_lines=["Hello Bob,", ".a dot-leading line", "bye"])
    msg.data = b"\r\n".join(l for l in msg.data.split(b"\r\n") if not l.startswith((b"Date:", b"MIME-Version", b"Content-Type")))
    c = client(d, g)
    try:
        trip(c)
        transaction(c, msg)
    except Exception as e:
        c.finish()
    section(d, "log")
    guard_log(d, g)
    section(d, "metrics")
    metrics(d, g)
    section(d, "sink")
    sink_cmds(d, sink)
    for m in sink.messages():
        section(d, "stored by the MTA")
        d.p(m.content.decode())
    return d, g, sink, msg


@scenario
def actions():
    for name in ("observe", "tag", "tarpit", "discard", "tempfail", "reject", "drop"):
        d, g, sink, msg = action_example(name, name, {"actions.tarpit_delay": "1s"} if name == "tarpit" else None)
        if name in ("reject", "drop", "tempfail"):
            section(d, "next connection")
            c = client(d, g)
            c.read_line()
            d.p(f"[{c.lines[0][0]:5.2f}] S: {show(c.lines[0][1]).rstrip()}")
            c.close()
        g.stop()
        d.done()
    d, g, sink, msg = action_example("quarantine", "quarantine")
    section(d, "quarantine dir")
    for p in sorted((d.w / "quarantine").rglob("*")): d.p(str(p.relative_to(d.w)))
    ids = [p.name for p in (d.w / "quarantine" / "new").iterdir()]
    cfgp = str(g.config_path)
    for args in (["list"], ["show", ids[0]]):
        section(d, "$ mxguard quarantine " + " ".join(args))
        d.p(subprocess.run([G.binary(), "quarantine", *args, "-c", cfgp], capture_output=True, text=True).stdout)
    section(d, f"$ mxguard quarantine release {ids[0]} -c mxguard.toml")
    d.p(subprocess.run([G.binary(), "quarantine", "release", ids[0], "-c", cfgp], capture_output=True, text=True).stdout)
    time.sleep(0.3)
    for m in sink.messages():
        section(d, "stored by the MTA after the release")
        d.p(f"X-Mail-Args: {m.mail}\nX-Rcpt-Args: {m.rcpts}")
        d.p(m.content.decode())
    g.stop()
    d.done()


@scenario
def pregreet_tag():
    d = Doc("pregreet_tag")
    sink = peers.SmtpSink(d.w)
    g = G.Guard(d.w, upstream=sink.addr, **{"pregreet.action": "tag"})
    c = client(d, g)
    c.send(b"EHLO early.example.test\r\n")
    c.read_reply()
    c.read_reply()
    msg = make_message(body_lines=["Hello Bob,", "bye"])
    msg.data = b"\r\n".join(l for l in msg.data.split(b"\r\n") if not l.startswith((b"Date:", b"MIME-Version", b"Content-Type", b"Message-ID")))
    transaction(c, msg)
    section(d, "log")
    guard_log(d, g)
    section(d, "stored by the MTA")
    for m in sink.messages(): d.p(m.content.decode())
    g.stop()
    d.done()


@scenario
def reply_delay():
    d = Doc("reply_delay")
    sink = peers.SmtpSink(d.w)
    g = G.Guard(d.w, upstream=sink.addr, **{"turns.reply_delay.ehlo": "1s", "turns.reply_delay.mail": "500ms", "turns.reply_delay.rcpt": "500ms", "turns.reply_delay.data": "500ms"})
    c = client(d, g)
    c.read_reply()
    for cmd in (b"EHLO patient.example.test\r\n", b"MAIL FROM:<a@patient.example.test>\r\n", b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n"):
        c.send(cmd)
        c.read_reply()
    c.send(b"Subject: hi\r\n\r\nhi\r\n.\r\n")
    c.read_reply()
    c.send(b"QUIT\r\n")
    c.read_reply()
    c.finish()
    section(d, "a bot that does not wait for the held EHLO reply")
    c = client(d, g, source="127.0.0.3")
    c.read_reply()
    c.send(b"EHLO hasty.example.test\r\n")
    time.sleep(0.2)
    c.send(b"MAIL FROM:<bot@hasty.example.test>\r\n")
    c.finish()
    section(d, "log")
    guard_log(d, g)
    g.stop()
    d.done()


@scenario
def reply_delay_pipelined():
    d = Doc("reply_delay_pipelined")
    sink = peers.SmtpSink(d.w)
    g = G.Guard(d.w, upstream=sink.addr, **{"turns.reply_delay.rcpt": "500ms"})
    c = client(d, g)
    c.read_reply()
    c.send(b"EHLO patient.example.test\r\n")
    c.read_reply()
    c.send(b"MAIL FROM:<a@patient.example.test>\r\n" + b"".join(f"RCPT TO:<u{i}@example.test>\r\n".encode() for i in range(5)))
    for _ in range(6): c.read_reply()
    section(d, "the same five recipients one at a time")
    for i in range(5):
        c.send(f"RCPT TO:<v{i}@example.test>\r\n".encode())
        c.read_reply()
    c.send(b"QUIT\r\n")
    c.read_reply()
    c.finish()
    section(d, "log")
    guard_log(d, g)
    g.stop()
    d.done()


AUTHN = """begin authenticators
login:
  driver = plaintext
  public_name = LOGIN
  server_prompts = Username:: : Password::
  server_condition = ${if and {{eq{$auth1}{alice}}{eq{$auth2}{s3cret}}}}
  server_set_id = $auth1
"""


@scenario
def auth_and_pipeconnect():
    d = Doc("auth_and_pipeconnect")
    mta = peers.EximMta(d.w, extra_config=AUTHN)
    section(d, "straight to the Exim MTA")
    TClient.doc = d
    c = TClient("127.0.0.1", mta.port, source="127.0.0.2")
    c.read_reply()
    c.send(b"EHLO client.example.test\r\n")
    c.read_reply()
    c.send(b"QUIT\r\n")
    c.read_reply()
    c.finish()
    section(d, "through the guard, turns.unknown_command_limit = 1")
    g = G.Guard(d.w, upstream=mta.addr, **{"turns.unknown_command_limit": 1})
    c = client(d, g)
    c.read_reply()
    c.send(b"EHLO client.example.test\r\n")
    c.read_reply()
    for line in (b"AUTH LOGIN\r\n", b"YWxpY2U=\r\n", b"czNjcmV0\r\n"):
        c.send(line)
        c.read_reply()
    c.send(b"QUIT\r\n")
    c.read_reply()
    c.finish()
    section(d, "log")
    guard_log(d, g)
    g.stop()
    d.done()


@scenario
def bdat_tag():
    d = Doc("bdat_tag")
    mta = peers.PostfixMta(d.w, extra_main={"debug_peer_list": "127.0.0.0/8"})
    g = G.Guard(d.w, upstream=mta.addr, **{"actions.unknown_commands": "tag", "turns.unknown_command_limit": 1})
    body = b"Subject: chunked\r\n\r\nHello\r\n"
    c = client(d, g)
    c.read_reply()
    c.send(b"EHLO late.example.test\r\n")
    c.read_reply()
    c.send(b"FROBNICATE\r\n")
    c.read_reply()
    c.send(b"MAIL FROM:<alice@sender.example.test>\r\nRCPT TO:<bob@example.test>\r\n")
    c.read_reply()
    c.read_reply()
    c.send(f"BDAT {len(body)} LAST\r\n".encode() + body)
    c.read_reply()
    c.send(b"QUIT\r\n")
    c.read_reply()
    c.finish()
    section(d, "log")
    guard_log(d, g)
    section(d, "postfix")
    time.sleep(0.5)
    for line in mta.log().splitlines():
        if re.search(r"smtpd\[\d+\]: < ", line): d.p("postfix: " + line.split(": ", 1)[1])
    section(d, "stored")
    for m in mta.stored(): d.p(peers.strip_trace_headers(m).decode())
    g.stop()
    d.done()


if __name__ == "__main__":
    os.umask(0o022)
    OUT.mkdir(parents=True, exist_ok=True)
    for d in (WORK.parent, WORK):
        os.chmod(d, 0o755)
    for name in (sys.argv[1:] or SCEN):
        SCEN[name]()
        print(f"{name}: done, see {OUT}")
