"""Helpers for the admin API stories: a token file, HTTP calls with or
without a token, `mxguard ctl`, and a client whose mail lands in the
quarantine (an early talker under `pregreet.action = "quarantine"`)."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
from pathlib import Path

import guard as guard_mod
import netns

TOKEN = "0123456789abcdef0123456789abcdef"
OTHER_TOKEN = "fedcba9876543210fedcba9876543210"


def write_tokens(workdir: Path) -> Path:
    path = workdir / "tokens"
    path.write_text(f"# test tokens\nops:{TOKEN}\nci:{OTHER_TOKEN}\n")
    path.chmod(0o600)
    return path


def bypass_guard(make_guard, workdir: Path, ns: str, listen: list[str], ready: str, **settings):
    """A guard of the kernel-bypass tests (nftables or sk_lookup) in
    namespace `ns`: a 500 ms greet pause, passes kept an hour, the admin API
    on; started once its log says `ready` (a regular expression)."""
    config = {
        "greet.delay": "500ms",
        "greet.connect_lead": "200ms",
        "pass_cache.ttl": "1h",
        "admin.token_file": str(write_tokens(workdir)),
        **settings,
    }
    guard = make_guard(listen=listen, ns=ns, **config)
    guard.wait_log(ready)
    return guard


def accepted(guard) -> float:
    """Connections the guard accepted."""
    return guard.metric("mxguard_connections_accepted_total")


def api_guard(make_guard, workdir: Path, upstream: str, **overrides):
    """A guard with the API on (token file) and the event log in its workdir."""
    tokens = write_tokens(workdir)
    overrides.setdefault("admin.token_file", str(tokens))
    overrides.setdefault("log.events", str(workdir / "events.jsonl"))
    return make_guard(upstream=upstream, **overrides)


def admin_addr(guard) -> tuple[str, int]:
    host, _, port = guard.admin.rpartition(":")
    return host.strip("[]"), int(port)


def call(guard, method: str, path: str, body=None, token: str | None = TOKEN, raw: bytes | None = None,
         headers: dict | None = None, timeout: float = 30.0):
    """One request; returns (status, parsed JSON or text, headers). From
    inside the guard's network namespace when it runs in one."""
    host, port = admin_addr(guard)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    if getattr(guard, "ns", None):
        with netns.entered(guard.ns):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect((host, port))
        conn.sock = sock
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    ctype = resp.getheader("Content-Type", "")
    value = json.loads(payload) if ctype.startswith("application/json") else payload.decode("utf-8", "replace")
    return resp.status, value, {k.lower(): v for k, v in resp.getheaders()}


def ctl(guard, *args: str, token_file: Path | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`mxguard ctl --admin URL --token-file F ARGS...`."""
    token_file = token_file or Path(guard.config["admin.token_file"])
    argv = [guard_mod.binary(), "ctl", "--admin", f"http://{guard.admin}", "--token-file", str(token_file), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _reply(sock: socket.socket, buf: bytearray) -> bytes:
    """One complete SMTP reply (the last line has a space after the code)."""
    while True:
        lines = bytes(buf).split(b"\r\n")
        for i, line in enumerate(lines[:-1]):
            if len(line) >= 4 and line[3:4] == b" ":
                reply = b"\r\n".join(lines[: i + 1])
                del buf[: len(reply) + 2]
                return reply
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"connection closed; got {bytes(buf)!r}")
        buf += chunk


def send_early_talker_mail(host: str, port: int, source: str, body: bytes = b"Subject: held\r\n\r\nhello\r\n") -> list[bytes]:
    """Speaks before the greeting (EHLO at once), then sends one message.
    Under `pregreet.action = "quarantine"` the guard keeps it. Returns the
    replies seen."""
    sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    buf = bytearray()
    replies = []
    with sock:
        sock.sendall(b"EHLO early.example.test\r\n")
        replies.append(_reply(sock, buf))  # greeting (challenge + banner)
        replies.append(_reply(sock, buf))  # EHLO
        for cmd in (b"MAIL FROM:<early@sender.example.test>\r\n", b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n"):
            sock.sendall(cmd)
            replies.append(_reply(sock, buf))
        sock.sendall(body + b".\r\n")
        replies.append(_reply(sock, buf))
        sock.sendall(b"QUIT\r\n")
        replies.append(_reply(sock, buf))
    return replies
