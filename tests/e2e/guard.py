"""The mxguard daemon under test: config file, process, log, metrics.

The binary is target/debug/mxguard unless MXGUARD_BIN names another. Config
keys follow docs/configuration.md; tests override single keys with dotted
names, e.g. Guard(..., **{"greet.delay": "1s"}).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import netns
from peers import REPO, Proc, fmt_addr, free_port, listening_ports, wait_until


STARTED: list["Guard"] = []  # guards of the running test, for failure reports


def binary() -> str:
    path = os.environ.get("MXGUARD_BIN") or str(REPO / "target" / "debug" / "mxguard")
    if not os.access(path, os.X_OK):
        raise AssertionError(f"mxguard binary not found at {path} (run `cargo build -p mxguard` or set MXGUARD_BIN)")
    return path


# Short timings so the suite stays fast; each test overrides what it is about.
TEST_DEFAULTS = {
    "hostname": "guard.example.test",
    "intercept.mode": "fixed",
    "intercept.upstream_connect_timeout": "2s",
    "greet.delay": "500ms",
    "greet.challenge": True,
    "greet.upstream_connect": "lazy",
    "greet.connect_lead": "200ms",
    "greet.banner_timeout": "5s",
    "pregreet.action": "reject",
    "pregreet.block_ttl": "1h",
    "relay.idle_timeout": "30s",
    "relay.command_timeout": "10s",
    "limits.drain_timeout": "5s",
    "log.format": "text",
    "log.level": "info",
}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def to_toml(flat: dict) -> str:
    """Dotted keys to a TOML document: {"greet.delay": "1s"} -> [greet] delay = "1s"."""
    top, tables = [], {}
    for key, value in flat.items():
        if value is None:
            continue
        if "." in key:
            table, _, k = key.rpartition(".")
            tables.setdefault(table, []).append(f"{k} = {_toml_value(value)}")
        else:
            top.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(top) + "\n"
    for table, lines in tables.items():
        out += f"\n[{table}]\n" + "\n".join(lines) + "\n"
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format to {'name{a="x",b="y"}': value} with labels sorted."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)', line)
        if not m:
            continue
        name, labels, value = m.groups()
        pairs = sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""))
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else "")
        out[key] = float(value)
    return out


def metric_key(name: str, **labels) -> str:
    pairs = sorted(labels.items())
    return name + ("{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else "")


def http_get(addr: tuple[str, int], path: str, ns: str | None = None, timeout=5.0) -> tuple[int, str]:
    """Minimal HTTP/1.1 GET on a socket opened in `ns` (the admin listener
    of a guard in a namespace is only reachable from inside it)."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    with netns.entered(ns):
        s = socket.socket(family, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        s.connect(addr)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: mxguard\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2:]
        body = decoded
    return status, body.decode("utf-8", "replace")


_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_text_fields(line: str) -> dict[str, str]:
    fields = {}
    for k, v in _KV.findall(line):
        if v.startswith('"'):
            v = json.loads(v)
        fields[k] = v
    return fields


class Guard:
    """One mxguard process. `upstream` is where fixed mode forwards to."""

    def __init__(self, workdir: Path, upstream: str | None = None, listen: list[str] | None = None,
                 admin: str | None = "auto", ns: str | None = None, name: str = "guard",
                 args: list[str] = (), start: bool = True, **overrides):
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.ns = ns
        if listen is None:
            self.port = free_port()
            listen = [f"127.0.0.1:{self.port}"]
        else:
            self.port = int(listen[0].rsplit(":", 1)[1])
        self.listen = listen
        self.host = listen[0].rsplit(":", 1)[0].strip("[]")
        if self.host in ("0.0.0.0", "::"):
            self.host = "127.0.0.1"
        if admin == "auto":
            admin = f"127.0.0.1:{free_port()}"
        self.admin = admin
        self.config = dict(TEST_DEFAULTS)
        # Each guard keeps its persistent state (blocklist, scores) in its
        # own directory: nothing carries over between tests.
        self.config["state.dir"] = str(self.workdir / "state")
        self.config["intercept.listen"] = listen
        if upstream is not None:
            self.config["intercept.upstream"] = upstream
        self.config["admin.listen"] = admin or ""
        self.config.update(overrides)
        self.config_path = self.workdir / "mxguard.toml"
        self.write_config()
        self.args = list(args)
        self.proc: Proc | None = None
        if start:
            self.start()

    # -- lifecycle

    def write_config(self, text: str | None = None) -> None:
        self.config_path.write_text(text if text is not None else to_toml(self.config))

    def start(self) -> None:
        argv = [binary(), "run", "--config", str(self.config_path), *self.args]
        env = dict(os.environ, RUST_BACKTRACE="1", NO_COLOR="1")
        self.proc = Proc(self.name, argv, self.workdir, env=env, ns=self.ns)
        STARTED.append(self)
        ports = {int(a.rsplit(":", 1)[1]) for a in self.listen}
        if self.admin:
            ports.add(int(self.admin.rsplit(":", 1)[1]))
        wait_until(lambda: ports <= listening_ports(self.proc.pid) or not self.proc.alive(),
                   15, f"mxguard listening on {sorted(ports)}")
        assert self.proc.alive(), f"mxguard exited with {self.proc.popen.returncode}:\n{self.log()}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def addr(self) -> str:
        return fmt_addr(self.host, self.port)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def signal(self, sig: int) -> None:
        self.proc.signal(sig)

    def reload(self, **overrides) -> None:
        """Rewrite the config with these keys changed and send SIGHUP."""
        self.config.update(overrides)
        self.write_config()
        self.signal(signal.SIGHUP)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and expect a clean exit (status 0, no panic)."""
        if not self.alive():
            rc = self.proc.popen.returncode
        else:
            self.signal(signal.SIGTERM)
            rc = self.proc.wait(timeout)
            if rc is None:
                self.proc.kill()
                raise AssertionError(f"mxguard did not exit within {timeout}s of SIGTERM\n{self.log()[-3000:]}")
        self.assert_no_panic()
        assert rc == 0, f"mxguard exited with status {rc}\n{self.log()[-3000:]}"
        return rc

    # -- observation

    def log(self) -> str:
        return self.proc.stderr() if self.proc else ""

    def log_lines(self) -> list[str]:
        return self.log().splitlines()

    def assert_no_panic(self) -> None:
        log = self.log()
        assert "panicked" not in log and "RUST_BACKTRACE" not in log, f"mxguard panicked:\n{log[-4000:]}"

    def wait_log(self, pattern: str, timeout: float = 5.0, count: int = 1) -> list[re.Match]:
        rx = re.compile(pattern)

        def found():
            ms = [m for line in self.log_lines() if (m := rx.search(line))]
            return ms if len(ms) >= count else None

        try:
            return wait_until(found, timeout, f"log line matching {pattern!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- mxguard log ---\n{self.log()[-4000:]}") from None

    def json_records(self) -> list[dict]:
        return [json.loads(line) for line in self.log_lines() if line.strip()]

    def verdicts(self, client: str | None = None) -> list[dict]:
        """The per-session verdict records (text or JSON log), optionally only
        those of one client ("ip" or "ip:port")."""
        out = []
        for line in self.log_lines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                rec = _flatten(rec)
            elif "verdict=" in line:
                rec = parse_text_fields(line)
            else:
                continue
            if "verdict" not in rec:
                continue
            c = str(rec.get("client", ""))
            if client is None or c == client or c.rsplit(":", 1)[0].strip("[]") == client:
                out.append(rec)
        return out

    def wait_verdict(self, client: str, timeout: float = 5.0) -> dict:
        try:
            return wait_until(lambda: (self.verdicts(client) or [None])[-1], timeout, f"verdict for {client}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- mxguard log ---\n{self.log()[-4000:]}") from None

    def metrics(self) -> dict[str, float]:
        host, _, port = self.admin.rpartition(":")
        status, body = http_get((host.strip("[]"), int(port)), "/metrics", ns=self.ns)
        assert status == 200, f"/metrics answered {status}: {body[:500]}"
        return parse_metrics(body)

    def metric(self, name: str, **labels) -> float:
        return self.metrics().get(metric_key(name, **labels), 0.0)

    def wait_metric(self, name: str, expected: float, timeout: float = 3.0, **labels) -> None:
        """Counters move just after the verdict line is written: wait a little."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric(name, **labels)
            if value == expected:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{metric_key(name, **labels)} = {value}, expected {expected}")
            time.sleep(0.05)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def resting_fd_count(self) -> int:
        """Descriptors at rest: the lowest of a few samples, so an admin
        connection from a scrape a moment ago is not counted."""
        samples = []
        for _ in range(4):
            samples.append(self.fd_count())
            time.sleep(0.05)
        return min(samples)

    def wait_fds(self, expected: int, timeout: float = 5.0) -> None:
        """Wait until the guard holds `expected` descriptors again."""
        try:
            wait_until(lambda: self.fd_count() <= expected, timeout, f"fd count back to {expected}")
        except AssertionError:
            fds = {fd: os.readlink(f"/proc/{self.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{self.pid}/fd")}
            raise AssertionError(f"guard holds {len(fds)} fds, expected {expected}: {fds}") from None


def _flatten(rec: dict) -> dict:
    """tracing-subscriber JSON puts event fields under "fields" unless
    flattened; accept both."""
    out = dict(rec)
    fields = out.pop("fields", None)
    if isinstance(fields, dict):
        out.update(fields)
    return out


def check_config(*args: str, config: Path | None = None, timeout=20):
    import subprocess
    argv = [binary(), "check-config"]
    if config is not None:
        argv += ["--config", str(config)]
    argv += list(args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


ACTION_NAMES = {"pass", "observe", "reject", "drop", "tempfail", "tarpit", "tag", "quarantine", "discard"}
_defaults: dict | None = None


def default_config() -> dict:
    """The binary's own defaults, as `check-config` prints them."""
    global _defaults
    if _defaults is None:
        import tomllib
        out = check_config()
        assert out.returncode == 0, out.stderr
        _defaults = tomllib.loads(out.stdout)
    return _defaults


def observe_every_other_test() -> dict:
    """Overrides that set every per-test action the binary knows besides the
    pregreet one (pipelining, early data, ... from later issues) to observe,
    so a story about the pregreet action is not decided by another test."""
    actions = default_config().get("actions", {})
    return {f"actions.{k}": "observe" for k, v in actions.items() if isinstance(v, str) and v in ACTION_NAMES}


def listening(pid: int, port: int) -> bool:
    return port in listening_ports(pid)


def now() -> float:
    return time.monotonic()
