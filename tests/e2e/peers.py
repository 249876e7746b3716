"""Real peers for the end-to-end tests, started and stopped in one place.

Everything a test talks to is a real program (smtp-sink, Postfix as MTA and as
sending client, swaks, Python's smtplib) except `ScriptedUpstream`, a few
lines of Python standing in for an MTA that misbehaves in ways no real MTA
can be told to (a 554/421 banner, no banner at all, a reset): it is used for
that upstream role only.

Every process started here is registered with `CLEANUP` so it is stopped
even when the test that started it fails.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import netns

REPO = Path(__file__).resolve().parents[2]
TEST_DOMAIN = "example.test"


# --------------------------------------------------------------------------
# cleanup registry


class Cleanup:
    """LIFO list of undo actions; run at the end of each test and at exit."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, object]] = []
        self._lock = threading.Lock()

    def push(self, what: str, action) -> None:
        with self._lock:
            self._actions.append((what, action))

    def discard(self, action) -> None:
        with self._lock:
            self._actions = [(w, a) for (w, a) in self._actions if a is not action]

    def run_all(self) -> list[str]:
        errors = []
        while True:
            with self._lock:
                if not self._actions:
                    break
                what, action = self._actions.pop()
            try:
                action()
            except Exception as exc:  # keep cleaning up the rest
                errors.append(f"cleanup of {what} failed: {exc!r}")
        return errors


CLEANUP = Cleanup()


# --------------------------------------------------------------------------
# ports and addresses

_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (and not handed out before)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port")


def fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state in the network namespace of `pid`."""
    ports = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A":
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            pass
    return ports


def pid_running(pid: int) -> bool:
    """True unless the process is gone or a zombie (a daemon's zombie waits
    for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------
# processes


class Proc:
    """A child process with stdout/stderr captured to files."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env=None, ns: str | None = None):
        self.name = name
        self.argv = list(argv)
        if ns:
            argv = ["ip", "netns", "exec", ns, *argv]
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            env=env,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        CLEANUP.push(f"process {name}", self.kill)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_bytes().decode("utf-8", "replace")

    def stdout(self) -> str:
        return self.stdout_path.read_bytes().decode("utf-8", "replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL if it does not go within `timeout`."""
        if self.alive():
            self.signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.kill()
        return self.popen.wait()

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(5)
        for f in (self._out, self._err):
            if not f.closed:
                f.close()


def run(argv, check=True, timeout=60, ns: str | None = None, **kw) -> subprocess.CompletedProcess:
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    proc = subprocess.run(argv, capture_output=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {proc.returncode}\n"
            f"stdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"
        )
    return proc


# --------------------------------------------------------------------------
# messages


@dataclass
class Message:
    sender: str
    rcpt: str
    data: bytes  # CRLF line ends, no dot-stuffing, ends with CRLF
    token: str


def make_message(sender=f"alice@sender.{TEST_DOMAIN}", rcpt=f"bob@{TEST_DOMAIN}", body_lines=None) -> Message:
    """A message with a unique token, a dot-leading line (dot-stuffing must
    round-trip) and a long-ish line; plain ASCII so no MTA re-encodes it."""
    token = uuid.uuid4().hex
    if body_lines is None:
        body_lines = [
            "Hello Bob,",
            "",
            ".a line that starts with a dot (dot-stuffed on the wire)",
            "..and one with two",
            "x" * 900,
            "\tindented\ttabs and trailing spaces   ",
            f"token {token}",
            "-- ",
            "Alice",
        ]
    headers = [
        f"From: Alice <{sender}>",
        f"To: Bob <{rcpt}>",
        f"Subject: e2e {token}",
        f"Message-ID: <{token}@sender.{TEST_DOMAIN}>",
        f"Date: {email.utils.formatdate(localtime=False)}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
    ]
    data = ("\r\n".join(headers + [""] + body_lines) + "\r\n").encode()
    return Message(sender, rcpt, data, token)


TRACE_HEADERS = (b"return-path:", b"delivered-to:", b"received:", b"x-original-to:")


def strip_trace_headers(stored: bytes) -> bytes:
    """Drop the trace headers an MTA prepends (Return-Path, Delivered-To,
    Received, ...) so what is left can be compared byte for byte."""
    lines = stored.split(b"\n")
    i = 0
    while i < len(lines) and lines[i].lower().startswith(TRACE_HEADERS):
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return b"\n".join(lines[i:])


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


# --------------------------------------------------------------------------
# smtp-sink


@dataclass
class SinkMessage:
    path: Path
    client_addr: str
    helo: str | None
    mail: str
    rcpts: list[str]
    content: bytes  # as received, LF line ends


def _parse_sink_dump(path: Path) -> SinkMessage:
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    meta: dict[str, list[str]] = {}
    i = 0
    while i < len(lines) and lines[i].startswith(b"X-"):
        k, _, v = lines[i].decode().partition(": ")
        meta.setdefault(k, []).append(v)
        i += 1
    assert lines[i].startswith(b"Received: "), f"unexpected smtp-sink dump format in {path}"
    i += 1
    while i < len(lines) and lines[i][:1] == b"\t":
        i += 1
    content = b"\n".join(lines[i:])
    # smtp-sink appends one empty line after the message.
    assert content.endswith(b"\n\n"), f"unexpected smtp-sink dump tail in {path}"
    content = content[:-1]
    return SinkMessage(
        path=path,
        client_addr=meta["X-Client-Addr"][0],
        helo=meta.get("X-Helo-Args", [None])[0],
        mail=meta["X-Mail-Args"][0],
        rcpts=meta.get("X-Rcpt-Args", []),
        content=content,
    )


class SmtpSink:
    """Postfix's smtp-sink on HOST:PORT, dumping every transaction to a file
    and logging the conversation (-v) so a test can see who connected."""

    def __init__(self, workdir: Path, host="127.0.0.1", port=None, hostname="sink.example.test",
                 ns: str | None = None, name="sink", extra=()):
        self.host = host
        self.port = port or free_port(host)
        self.hostname = hostname
        self.ns = ns
        self.dir = workdir / name
        self.dump = self.dir / "dump"
        self.dump.mkdir(parents=True)
        pw = pwd.getpwnam("postfix")
        os.chown(self.dump, pw.pw_uid, pw.pw_gid)
        listen = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        if host == "":
            listen = f":{self.port}"
        argv = ["smtp-sink", "-v", "-u", "postfix", "-h", hostname,
                "-d", f"{self.dump}/%Y%m%d%H%M%S.", *extra, listen, "64"]
        self.proc = Proc(name, argv, self.dir, ns=ns)
        wait_until(lambda: self.port in listening_ports(self.proc.pid) or not self.proc.alive(),
                   5, f"smtp-sink on {listen}")
        assert self.proc.alive(), f"smtp-sink died: {self.proc.stderr()}"

    @property
    def addr(self) -> str:
        return fmt_addr(self.host or "127.0.0.1", self.port)

    def messages(self) -> list[SinkMessage]:
        return [_parse_sink_dump(p) for p in sorted(self.dump.iterdir())]

    def wait_messages(self, n: int, timeout: float = 10) -> list[SinkMessage]:
        wait_until(lambda: len(list(self.dump.iterdir())) >= n, timeout, f"{n} message(s) in smtp-sink")
        time.sleep(0.05)  # the file is written before it is closed
        return self.messages()

    def log(self) -> str:
        return self.proc.stderr()

    def no_messages(self) -> bool:
        """No transaction completed and none is open: smtp-sink opens a dump
        file at MAIL and removes it at RSET, QUIT or a cut connection, so
        wait a moment for an abandoned transaction's file to go."""
        try:
            wait_until(lambda: not any(self.dump.iterdir()), 3, "an open smtp-sink transaction to be dropped")
        except AssertionError:
            return False
        return not re.search(r"^smtp-sink: \.$", self.log(), re.M)

    def connections(self) -> list[str]:
        """Client addresses of every connection smtp-sink accepted so far."""
        return re.findall(r"smtp-sink: connect \(AF_INET6? ([^)]+)\)", self.log())

    def commands(self) -> list[str]:
        out = []
        for line in self.log().splitlines():
            m = re.match(r"smtp-sink: ([A-Z]+\b.*|\.)$", line)
            if m and not m.group(1).startswith(("AF_",)):
                out.append(m.group(1))
        return out

    def stop(self):
        self.proc.kill()


# --------------------------------------------------------------------------
# Postfix instances of our own


def make_cert(dir: Path, cn: str) -> tuple[Path, Path]:
    key, cert = dir / "key.pem", dir / "cert.pem"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(cert)])
    os.chmod(key, 0o600)
    return key, cert


MASTER_CF_COMMON = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


_short_dirs = 0


def short_dir(workdir: Path, name: str) -> Path:
    """workdir/name, or a short stand-in under /tmp linked from there: Postfix
    puts UNIX sockets under its queue and sun_path holds only 108 bytes (a
    too-long path makes `postfix check` fail without a word)."""
    global _short_dirs
    wanted = workdir / name
    if len(str(wanted)) + len("/queue/private/proxywrite") < 100:
        wanted.mkdir(parents=True)
        return wanted
    _short_dirs += 1
    base = Path(f"/tmp/mxg-{netns.RUN_TAG}")
    base.mkdir(mode=0o755, exist_ok=True)
    os.chmod(base, 0o755)
    real = base / f"{_short_dirs}-{name}"
    real.mkdir(mode=0o755)
    wanted.symlink_to(real)
    return real


class PostfixInstance:
    """A Postfix of our own: config, queue, data and log under one directory,
    started with `postfix -c DIR start`."""

    def __init__(self, workdir: Path, name: str, main: dict[str, str], inet_services: str = "",
                 ns: str | None = None):
        self.name = name
        self.ns = ns
        self.dir = short_dir(workdir, name)
        self.maillog = self.dir / "maillog"
        base = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.dir / "queue"),
            "data_directory": str(self.dir / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": f"mxg-{name}",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.dir}",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "mydestination": "",
            "local_recipient_maps": "",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "disable_dns_lookups": "yes",
            "in_flow_delay": "0",
            "inet_protocols": "all",
            "mynetworks": "127.0.0.0/8 [::1]/128",
            "smtputf8_enable": "no",
        }
        base.update(main)
        self.main = base
        (self.dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in base.items()))
        (self.dir / "master.cf").write_text(inet_services + MASTER_CF_COMMON)
        # `postfix start` chdirs into the queue before post-install creates the rest.
        (self.dir / "queue").mkdir(mode=0o755)
        self.start()

    def postfix(self, *args, check=True):
        return run(["postfix", "-c", str(self.dir), *args], check=check, ns=self.ns)

    def start(self):
        self.postfix("start")
        CLEANUP.push(f"postfix {self.name}", self.stop)
        pidfile = Path(self.main["queue_directory"]) / "pid" / "master.pid"
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, f"postfix {self.name} master")
        self.master_pid = int(pidfile.read_text().split()[0])

    def stop(self):
        if pid_running(self.master_pid):
            self.postfix("stop", check=False)
            try:
                wait_until(lambda: not pid_running(self.master_pid), 10, "postfix stop")
            except AssertionError:
                self.postfix("abort", check=False)

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout=10, count=1) -> list[re.Match]:
        rx = re.compile(pattern, re.M)
        return wait_until(lambda: (lambda m: m if len(m) >= count else None)(list(rx.finditer(self.log()))),
                          timeout, f"{pattern!r} in {self.maillog}")


class PostfixMta(PostfixInstance):
    """Postfix accepting mail for example.test on HOST:PORT into a Maildir,
    with a self-signed certificate offered on STARTTLS."""

    def __init__(self, workdir: Path, name="mta", host="127.0.0.1", port=None, hostname="mta.example.test",
                 ns: str | None = None, extra_main: dict | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.hostname = hostname
        d = workdir / name
        certdir = workdir / f"{name}-tls"
        certdir.mkdir(parents=True)
        key, cert = make_cert(certdir, hostname)
        pw = pwd.getpwnam("postfix")
        self.mailbase = workdir / f"{name}-mail"
        self.mailbase.mkdir(parents=True)
        os.chown(self.mailbase, pw.pw_uid, pw.pw_gid)
        self.maildir = self.mailbase / "inbox"
        main = {
            "myhostname": hostname,
            "mydomain": TEST_DOMAIN,
            "myorigin": "$myhostname",
            "inet_interfaces": "loopback-only" if ns is None else "all",
            "smtpd_banner": "$myhostname ESMTP Postfix-mta",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "virtual_mailbox_domains": TEST_DOMAIN,
            "virtual_mailbox_base": str(self.mailbase),
            "virtual_mailbox_maps": "static:inbox/",
            "virtual_uid_maps": f"static:{pw.pw_uid}",
            "virtual_gid_maps": f"static:{pw.pw_gid}",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(cert),
            "smtpd_tls_key_file": str(key),
            "smtpd_tls_loglevel": "1",
            "message_size_limit": str(50 * 1024 * 1024),
            "virtual_mailbox_limit": "0",
        }
        main.update(extra_main or {})
        listen = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        inet = f"{listen} inet n - n - - smtpd\n"
        self._dir = d
        super().__init__(workdir, name, main, inet_services=inet, ns=ns)
        wait_until(lambda: self.port in listening_ports(self.master_pid), 10, f"postfix smtpd on {listen}")

    @property
    def addr(self) -> str:
        return fmt_addr(self.host, self.port)

    def stored(self) -> list[bytes]:
        new = self.maildir / "new"
        if not new.exists():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir(), key=lambda p: p.stat().st_mtime)]

    def find(self, token: str) -> list[bytes]:
        return [m for m in self.stored() if token.encode() in m]

    def wait_for(self, token: str, timeout=15) -> bytes:
        return wait_until(lambda: (self.find(token) or [None])[0], timeout, f"message {token} in {self.maildir}")

    def connects(self) -> int:
        return len(re.findall(r"smtpd\[\d+\]: connect from ", self.log()))


class PostfixSender(PostfixInstance):
    """Postfix as a sending MTA: every message goes to relayhost through its
    own smtp client bound to `bind`; no listener of its own."""

    def __init__(self, workdir: Path, relay: str, bind="127.0.0.4", name="sender", ns=None,
                 hostname=f"sender.{TEST_DOMAIN}", extra_main: dict | None = None):
        main = {
            "myhostname": hostname,
            "mydomain": f"sender.{TEST_DOMAIN}",
            "myorigin": "$myhostname",
            "inet_interfaces": "loopback-only" if ns is None else "all",
            "relayhost": relay,
            "smtp_bind_address": bind,
            "master_service_disable": "inet",
            "smtp_tls_security_level": "none",
            "default_destination_concurrency_limit": "2",
            "maximal_backoff_time": "10s",
            "minimal_backoff_time": "1s",
            "queue_run_delay": "1s",
        }
        main.update(extra_main or {})
        super().__init__(workdir, name, main, ns=ns)

    def send(self, msg: Message):
        run(["sendmail", "-C", str(self.dir), "-i", "-f", msg.sender, msg.rcpt], input=msg.data.replace(b"\r\n", b"\n"),
            ns=self.ns)

    def flush(self):
        run(["postqueue", "-c", str(self.dir), "-f"], check=False, ns=self.ns)

    def queue_empty(self) -> bool:
        out = run(["postqueue", "-c", str(self.dir), "-p"], check=False, ns=self.ns)
        return b"Mail queue is empty" in out.stdout + out.stderr

    def wait_sent(self, count=1, timeout=30):
        def sent():
            n = len(re.findall(r"status=sent", self.log()))
            if n >= count:
                return True
            self.flush()
            return False
        wait_until(sent, timeout, f"{count} status=sent in {self.maillog}", interval=0.5)

    def smtp_transcript(self) -> list[tuple[str, str]]:
        """The smtp client's side of each conversation, `> CMD` and `< REPLY`
        in the order they happened; needs `extra_main={"debug_peer_list":
        "127.0.0.0/8"}` (Postfix logs them only at debug level). Pipelined
        commands show up as several `>` lines before their `<` replies."""
        return re.findall(r"/smtp\[\d+\]: ([<>]) \S+:\d+: (.*)$", self.log(), re.M)

    def smtp_conversations(self) -> list[list[tuple[str, str]]]:
        """`smtp_transcript`, one list per smtp client process: Postfix
        delivers in parallel, and their log lines interleave."""
        conversations: dict[str, list[tuple[str, str]]] = {}
        for pid, direction, text in re.findall(r"/smtp\[(\d+)\]: ([<>]) \S+:\d+: (.*)$", self.log(), re.M):
            conversations.setdefault(pid, []).append((direction, text))
        return list(conversations.values())


EXIM = "/usr/sbin/exim4"


def exim_unavailable() -> str | None:
    """Why Exim cannot run here (tests/install-deps.sh unpacks it next to
    Postfix), or None."""
    if not os.access(EXIM, os.X_OK):
        return f"{EXIM} not installed (run tests/install-deps.sh)"
    try:
        pwd.getpwnam("Debian-exim")
    except KeyError:
        return "user Debian-exim missing (run tests/install-deps.sh)"
    return None


@dataclass
class EximResult:
    rc: int
    transcript: str  # `exim4 -v`: the SMTP dialogue, "SMTP>>", "SMTP|>", "SMTP<<"

    @property
    def cmdlog(self) -> list[str]:
        """Exim's own summary of each connection, e.g. ['220', 'EHLO',
        '250-', 'MAIL|', 'RCPT|', 'DATA', ...]: a `|` marks a command held
        back to be pipelined with the next one."""
        m = re.findall(r"^cmdlog: '([^']*)'", self.transcript, re.M)
        return [item for line in m for item in line.split(":")]


class EximSender:
    """Exim 4 as a sending MTA: `exim4 -C CONF -odi -v` delivers each message
    in the foreground to HOST:PORT over one `manualroute` router and an
    `smtp` transport bound to `bind`, without TLS. Exim pipelines MAIL, RCPT
    and DATA when PIPELINING is offered, and sends BDAT when CHUNKING is."""

    def __init__(self, workdir: Path, host: str, port: int, bind="127.0.0.5", name="exim",
                 hostname=f"exim.sender.{TEST_DOMAIN}", transport_options=()):
        self.dir = workdir / name
        (self.dir / "spool").mkdir(parents=True)
        (self.dir / "log").mkdir()
        os.chmod(self.dir / "log", 0o777)
        pw = pwd.getpwnam("Debian-exim")
        os.chown(self.dir / "spool", pw.pw_uid, pw.pw_gid)
        self.conf = self.dir / "exim.conf"
        options = "\n".join(f"  {o}" for o in transport_options)
        self.conf.write_text(f"""\
primary_hostname = {hostname}
spool_directory = {self.dir}/spool
log_file_path = {self.dir}/log/%slog
exim_user = Debian-exim
exim_group = Debian-exim
never_users =
trusted_users = root
keep_environment =
# no Received: of its own, so what the MTA stores can be compared
received_header_text =
begin routers
to_guard:
  driver = manualroute
  domains = *
  route_list = * {host}
  self = send
  transport = to_guard_smtp
  no_more
begin transports
to_guard_smtp:
  driver = smtp
  port = {port}
  interface = {bind}
  hosts_avoid_tls = *
  allow_localhost
{options}
begin retry
* * F,1m,10s
""")

    def send(self, msg: Message, timeout=30) -> EximResult:
        proc = run([EXIM, "-C", str(self.conf), "-odi", "-oi", "-v", "-f", msg.sender, msg.rcpt],
                   input=msg.data.replace(b"\r\n", b"\n"), check=False, timeout=timeout)
        return EximResult(proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace"))

    def mainlog(self) -> str:
        try:
            return (self.dir / "log" / "mainlog").read_text(errors="replace")
        except FileNotFoundError:
            return ""


class EximMta:
    """Exim 4 as the MTA: `exim4 -bdf` (in the foreground) on HOST:PORT
    accepting every recipient into a Maildir. It offers PIPECONNECT (Exim's
    early pipelining), PIPELINING and CHUNKING; `extra_main` goes with the
    main options (e.g. `prdr_enable = true`), `extra_config` at the end (e.g.
    a `begin authenticators` section)."""

    def __init__(self, workdir: Path, host="127.0.0.1", port=None, name="exim-mta",
                 hostname=f"exim-mta.{TEST_DOMAIN}", extra_config: str = "", extra_main: str = ""):
        self.host = host
        self.port = port or free_port(host)
        self.dir = workdir / name
        for sub in ("spool", "log", "mail"):
            (self.dir / sub).mkdir(parents=True)
        os.chmod(self.dir / "log", 0o777)
        pw = pwd.getpwnam("Debian-exim")
        for sub in ("spool", "mail"):
            os.chown(self.dir / sub, pw.pw_uid, pw.pw_gid)
        self.maildir = self.dir / "mail" / "inbox"
        self.conf = self.dir / "exim.conf"
        self.conf.write_text(f"""\
primary_hostname = {hostname}
spool_directory = {self.dir}/spool
log_file_path = {self.dir}/log/%slog
exim_user = Debian-exim
exim_group = Debian-exim
never_users =
trusted_users = root
keep_environment =
local_interfaces = <; {host}.{self.port}
pipelining_connect_advertise_hosts = *
tls_advertise_hosts =
received_header_text =
acl_smtp_rcpt = accept_all
{extra_main}
begin acl
accept_all:
  accept
begin routers
all:
  driver = accept
  transport = to_maildir
begin transports
to_maildir:
  driver = appendfile
  directory = {self.maildir}
  maildir_format
  user = Debian-exim
begin retry
* * F,1m,10s
{extra_config}""")
        self.proc = Proc(name, [EXIM, "-C", str(self.conf), "-bdf", "-odi", "-oX", str(self.port)], self.dir)
        wait_until(lambda: self.port in listening_ports(self.proc.pid) or not self.proc.alive(),
                   10, f"exim -bd on {host}:{self.port}")
        assert self.proc.alive(), f"exim -bd died: {self.proc.stderr()}"

    @property
    def addr(self) -> str:
        return fmt_addr(self.host, self.port)

    def stored(self) -> list[bytes]:
        new = self.maildir / "new"
        if not new.exists():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir(), key=lambda p: p.stat().st_mtime)]

    def wait_for(self, token: str, timeout=15) -> bytes:
        return wait_until(lambda: next((m for m in self.stored() if token.encode() in m), None), timeout,
                          f"message {token} in {self.maildir}")

    def mainlog(self) -> str:
        try:
            return (self.dir / "log" / "mainlog").read_text(errors="replace")
        except FileNotFoundError:
            return ""


# --------------------------------------------------------------------------
# clients


@dataclass
class Reply:
    code: int
    lines: list[bytes]
    times: list[float]  # seconds after connect when each line arrived

    @property
    def at(self) -> float:
        return self.times[-1]

    @property
    def text(self) -> str:
        return b"\n".join(self.lines).decode("utf-8", "replace")


class ClosedError(AssertionError):
    pass


@dataclass
class RawClient:
    """A plain TCP SMTP client for doing what bots do: talk early, send
    garbage, reset. Every received line is timestamped relative to connect."""

    host: str
    port: int
    source: str | None = "127.0.0.2"
    ns: str | None = None
    timeout: float = 10.0
    sock: socket.socket = field(init=False)
    t0: float = field(init=False)
    buf: bytes = field(init=False, default=b"")
    received: bytes = field(init=False, default=b"")
    lines: list[tuple[float, bytes]] = field(init=False, default_factory=list)
    eof: bool = field(init=False, default=False)

    def __post_init__(self):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with netns.entered(self.ns):
            self.sock = socket.socket(family, socket.SOCK_STREAM)
        CLEANUP.push("raw client socket", self.close)
        if self.source:
            self.sock.bind((self.source, 0))
        self.sock.settimeout(self.timeout)
        self.t0 = time.monotonic()
        self.sock.connect((self.host, self.port))
        self.local = self.sock.getsockname()

    @property
    def local_port(self) -> int:
        return self.local[1]

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data before deadline")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        now = self.elapsed()
        self.received += chunk
        self.buf += chunk
        while b"\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\n")
            self.lines.append((now, line + b"\n"))
        return True

    def read_line(self, timeout: float | None = None) -> tuple[float, bytes]:
        deadline = time.monotonic() + (timeout or self.timeout)
        consumed = getattr(self, "_consumed", 0)
        while len(self.lines) <= consumed:
            if self.eof or not self._fill(deadline):
                raise ClosedError(f"connection closed; received so far: {self.received!r}")
        self._consumed = consumed + 1
        return self.lines[consumed]

    def read_reply(self, timeout: float | None = None) -> Reply:
        lines, times = [], []
        while True:
            at, line = self.read_line(timeout)
            lines.append(line)
            times.append(at)
            if len(line) < 4 or line[3:4] != b"-":
                return Reply(int(line[:3]) if line[:3].isdigit() else -1, lines, times)

    def command(self, cmd: bytes, timeout: float | None = None) -> Reply:
        self.send(cmd)
        return self.read_reply(timeout)

    def read_until_closed(self, timeout: float | None = None) -> bytes:
        """Everything until the peer closes; raises TimeoutError if it never does."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.eof:
            self._fill(deadline)
        return self.received

    def closed_within(self, timeout: float) -> bool:
        try:
            self.read_until_closed(timeout)
            return True
        except (TimeoutError, socket.timeout):
            return False

    def reset(self):
        """Abortive close: SO_LINGER 0 makes close() send RST."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.sock.close()

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()


def smtplib_send(host: str, port: int, msg: Message, source: str = "127.0.0.2", starttls=False,
                 timeout=30) -> dict:
    """Deliver with Python's smtplib; returns the greeting and the refused dict."""
    with smtplib.SMTP(timeout=timeout, source_address=(source, 0)) as s:
        code, banner = s.connect(host, port)
        s._host = host  # what starttls() sends as SNI; connect() alone leaves it empty
        assert code == 220, (code, banner)
        s.ehlo("smtplib.example.test")
        if starttls:
            import ssl
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            code, _ = s.starttls(context=ctx)
            assert code == 220
            s.ehlo("smtplib.example.test")
        refused = s.sendmail(msg.sender, [msg.rcpt], msg.data)
        return {"banner": banner, "refused": refused}


def smtplib_suspect(host: str, port: int, trip: str, source: str = "127.0.0.2",
                    timeout=30) -> smtplib.SMTP:
    """A Python smtplib session, greeted and EHLO'd, that tripped one of the
    guard's tests on the way; go on with `.sendmail()`, `.mail()`, ...
    trip="pipelining": EHLO and NOOP in one write (EHLO must end a group);
    trip="pregreet":   EHLO sent before the greeting is over.
    Both replies the trick earns are read, so smtplib stays in step."""
    s = smtplib.SMTP(timeout=timeout)
    s._host = host
    if trip == "pregreet":
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(b"EHLO early.example.test\r\n")
        s.sock = sock
        code, _ = s.getreply()
        assert code == 220, code
        code, _ = s.getreply()  # the early EHLO, answered after the greeting
        assert code == 250, code
    elif trip == "pipelining":
        s.source_address = (source, 0)
        code, _ = s.connect(host, port)
        assert code == 220, code
        s.send("EHLO hasty.example.test\r\nNOOP\r\n")
        code, _ = s.getreply()
        assert code == 250, code
        code, _ = s.getreply()
        assert code == 250, code
    else:
        raise ValueError(trip)
    CLEANUP.push("smtplib session", s.close)
    code, _ = s.ehlo("suspect.example.test")
    assert code == 250, code
    return s


def swaks(server_host: str, port: int, msg: Message | None = None, source="127.0.0.2", ns=None,
          extra=(), timeout=60, check=True, workdir: Path | None = None) -> subprocess.CompletedProcess:
    argv = ["swaks", "--server", server_host, "--port", str(port), "--local-interface", source,
            "--helo", "swaks.example.test", "--timeout", "20"]
    if msg is not None:
        assert workdir is not None
        data = workdir / f"swaks-{msg.token}.eml"
        # swaks ends the data with CRLF "." CRLF itself: give it the message
        # without its last line end so the wire carries exactly msg.data.
        data.write_bytes(msg.data[:-2])
        argv += ["--from", msg.sender, "--to", msg.rcpt, "--data", str(data)]
    argv += list(extra)
    return run(argv, check=check, timeout=timeout, ns=ns)


# --------------------------------------------------------------------------
# a scripted upstream for the failures no real MTA can be told to produce


class ScriptedUpstream:
    """Accepts connections and behaves per `mode`:
    banner:<text>  send that reply (CRLF added per line) then answer every
                   command with the same line until the client goes away;
    silent         accept, never send anything;
    reset          accept, then close with RST at once;
    banner-then-reset  send a 220, read one command, then RST;
    banner-then-hang   send a 220, then read and never answer.
    Records how many connections it saw and whether each ended with EOF."""

    def __init__(self, mode: str, host="127.0.0.1", port=None):
        self.mode = mode
        self.host = host
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port or 0))
        self.port = self.sock.getsockname()[1]
        self.sock.listen(64)
        self.accepted = 0
        self.eofs = 0
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        CLEANUP.push("scripted upstream", self.stop)

    @property
    def addr(self):
        return fmt_addr(self.host, self.port)

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _rst(self, conn):
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()

    def _drain_until_eof(self, conn, answer: bytes | None = None):
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                self.eofs += 1
                return
            buf += data
            while answer is not None and b"\n" in buf:
                _, _, buf = buf.partition(b"\n")
                with contextlib.suppress(OSError):
                    conn.sendall(answer)

    def _session(self, conn):
        mode = self.mode
        try:
            if mode.startswith("banner:"):
                text = mode[len("banner:"):]
                lines = text.split("\n")
                conn.sendall("".join(line + "\r\n" for line in lines).encode())
                self._drain_until_eof(conn, answer=(lines[-1].replace("-", " ", 1) + "\r\n").encode())
            elif mode == "silent":
                self._drain_until_eof(conn)
            elif mode == "reset":
                self._rst(conn)
            elif mode == "banner-then-reset":
                conn.sendall(b"220 scripted.example.test ESMTP\r\n")
                conn.recv(65536)
                self._rst(conn)
            elif mode == "banner-then-hang":
                conn.sendall(b"220 scripted.example.test ESMTP\r\n")
                self._drain_until_eof(conn)
            else:
                raise ValueError(mode)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def stop(self):
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()


def which_all(*tools) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def clean_session(host: str, port: int, source: str, ns: str | None, n: int) -> list[bytes]:
    """One clean session (EHLO, MAIL, RCPT, DATA, QUIT) from `source`, in
    network namespace `ns`, with message number `n` in its subject;
    returns the greeting's lines."""
    c = RawClient(host, port, source=source, ns=ns)
    greeting = c.read_reply(timeout=5)
    assert greeting.code == 220, greeting.lines
    assert c.command(b"EHLO client.example.test\r\n").code == 250
    assert c.command(b"MAIL FROM:<alice@sender.example.test>\r\n").code == 250
    assert c.command(b"RCPT TO:<bob@example.test>\r\n").code == 250
    assert c.command(b"DATA\r\n").code == 354
    assert c.command(f"Subject: session {n}\r\n\r\nmessage {n}\r\n.\r\n".encode()).code == 250
    assert c.command(b"QUIT\r\n").code == 221
    c.close()
    return greeting.lines
