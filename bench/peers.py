"""The processes a benchmark starts: mxguard, smtp-sink, the mxbench helpers,
HAProxy and a private Postfix running postscreen. Each is started in its own
session, measured through /proc, and stopped by its own pid (never by name).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")

_started: list["Proc"] = []


def stop_all() -> None:
    """Stops every process this run started, newest first."""
    while _started:
        _started.pop().stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def listening(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


# --------------------------------------------------------------------------
# /proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def tcp_segments_out() -> int:
    """TCP segments the machine has sent (`Tcp: OutSegs`, /proc/net/snmp)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("OutSegs")])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int, comm: str) -> list[int]:
    """Direct children of `pid` named `comm`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and name == comm:
            found.append(int(entry))
    return found


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --------------------------------------------------------------------------
# processes


class Proc:
    """A child process in its own session; stdout to a file unless piped."""

    def __init__(self, name: str, argv: list[str], workdir: Path, pipe: bool = False):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.err_path = workdir / f"{name}.stderr"
        self._err = open(self.err_path, "wb")
        if pipe:
            stdin, stdout = subprocess.PIPE, subprocess.PIPE
        else:
            self._out = open(workdir / f"{name}.stdout", "wb")
            stdin, stdout = subprocess.DEVNULL, self._out
        self.popen = subprocess.Popen(self.argv, stdin=stdin, stdout=stdout, stderr=self._err,
                                      start_new_session=True, text=pipe or None)
        self.pid = self.popen.pid
        _started.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stop(self, timeout: float = 5.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        if self in _started:
            _started.remove(self)


def cargo_bin(name: str, profile: str) -> Path:
    return REPO / "target" / profile / name


# --------------------------------------------------------------------------
# peers


class Guard:
    """mxguard in fixed mode in front of `upstream`."""

    def __init__(self, workdir: Path, binary: Path, upstream: str, settings: dict, name="mxguard"):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        flat = {
            "hostname": "guard.bench.example",
            "intercept.mode": "fixed",
            "intercept.listen": [self.addr],
            "intercept.upstream": upstream,
            "admin.listen": "",
            "log.level": "warn",
            # Its own state directory: the default one is locked by any
            # other guard running on the machine.
            "state.dir": str(workdir / f"{name}-state"),
            # The load comes from a handful of loopback addresses: per-client
            # limits would measure the limiter, not the guard.
            "admission.enabled": False,
            "senders.enabled": False,
        }
        flat.update(settings)
        self.config = to_toml(flat)
        path = workdir / f"{name}.toml"
        path.write_text(self.config)
        self.proc = Proc(name, [binary, "run", "--config", path], workdir)
        self.pid = self.proc.pid
        wait_until(lambda: listening(self.port) or not self.proc.alive(), 10, f"{name} listening")
        if not self.proc.alive():
            raise RuntimeError(f"{name} did not start: {self.proc.stderr()}")

    def stop(self):
        self.proc.stop()


def to_toml(flat: dict) -> str:
    """Dotted keys to TOML: {"greet.delay": "1s"} -> [greet] delay = "1s"."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))
    top, tables = [], {}
    for key, v in flat.items():
        table, _, k = key.rpartition(".")
        (tables.setdefault(table, []) if table else top).append(f"{k} = {value(v)}")
    out = "\n".join(top) + "\n"
    for table, lines in tables.items():
        out += f"\n[{table}]\n" + "\n".join(lines) + "\n"
    return out


class SmtpSink:
    """Postfix's smtp-sink: the MTA stand-in of the rate tests."""

    def __init__(self, workdir: Path, name="smtp-sink"):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        argv = ["smtp-sink"]
        if os.getuid() == 0:
            argv += ["-u", "postfix"]
        argv += [self.addr, "4096"]
        self.argv = argv
        self.proc = Proc(name, argv, workdir)
        self.pid = self.proc.pid
        wait_until(lambda: listening(self.port), 10, "smtp-sink listening")

    def stop(self):
        self.proc.stop()


class FastSink:
    """`mxbench sink`: the MTA stand-in of the bulk tests."""

    def __init__(self, workdir: Path, mxbench: Path, name="mxbench-sink"):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.proc = Proc(name, [mxbench, "sink", "--listen", self.addr], workdir)
        self.pid = self.proc.pid
        wait_until(lambda: listening(self.port), 10, "mxbench sink listening")

    def stop(self):
        self.proc.stop()


def haproxy_available() -> bool:
    return shutil.which("haproxy") is not None


class HAProxy:
    """HAProxy in `mode tcp` in front of `backend`.

    hold: the frontend keeps each connection for the inspect delay before it
    opens the backend (one descriptor per held session, like the guard's lazy
    connect). splice: `option splice-auto`.

    HAProxy sizes its descriptor needs as two per connection (client and
    server side) and refuses to start when `maxconn` needs more than the
    20,000 the process may hold; so `procs` processes share the port
    (SO_REUSEPORT, HAProxy's default), each with `maxconn 9950`. Without
    `hold`, `maxconn 4000` (HAProxy also reserves descriptors for splice
    pipes then), far above the concurrency of the rate and bulk tests.
    """

    def __init__(self, workdir: Path, backend: str, hold: str | None = None, splice: bool = False,
                 name="haproxy", procs: int = 1):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        maxconn = 9950 if hold else 4000
        lines = [
            "global",
            f"    maxconn {maxconn}",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 600s",
            "    timeout server 600s",
            f"frontend {name}",
            f"    bind {self.addr}",
            f"    maxconn {maxconn}",
        ]
        if hold:
            lines += [f"    tcp-request inspect-delay {hold}",
                      "    tcp-request content accept if WAIT_END"]
        if splice:
            lines += ["    option splice-auto"]
        lines += ["    default_backend mta", "backend mta"]
        if splice:
            lines += ["    option splice-auto"]
        lines += [f"    server mta {backend}", ""]
        self.config = "\n".join(lines)
        path = workdir / f"{name}.cfg"
        path.write_text(self.config)
        self.procs = [Proc(f"{name}-{i}", ["haproxy", "-db", "-f", path], workdir) for i in range(procs)]
        self.pids = [p.pid for p in self.procs]
        self.pid = self.pids[0]
        wait_until(lambda: listening(self.port) or not all(p.alive() for p in self.procs), 10,
                   "haproxy listening")
        time.sleep(0.2)
        for p in self.procs:
            if not p.alive():
                raise RuntimeError(f"haproxy did not start: {p.stderr()}")

    def stop(self):
        for p in self.procs:
            p.stop()


class Postscreen:
    """A private Postfix instance whose only inet service is postscreen on a
    loopback port, with `postscreen_greet_wait` as the greet delay and every
    limit that would turn a held loopback client away raised or off."""

    def __init__(self, workdir: Path, greet_wait: str, name="postscreen"):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        base = Path(f"/tmp/mxbench-{os.getpid()}-{name}")  # sun_path is short
        if base.exists():
            shutil.rmtree(base)
        (base / "queue").mkdir(parents=True, mode=0o755)
        self.dir = base
        self.main = {
            "compatibility_level": "3.6",
            "queue_directory": f"{base}/queue",
            "data_directory": f"{base}/data",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": f"mxbench-{name}",
            "maillog_file": f"{base}/maillog",
            "maillog_file_prefixes": f"/var, /dev/stdout, {base}",
            "inet_interfaces": "loopback-only",
            "myhostname": "postscreen.bench.example",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "smtpd_peername_lookup": "no",
            "disable_dns_lookups": "yes",
            # Loopback clients are not waved through: they wait like the rest.
            "mynetworks": "127.0.0.1/32",
            "postscreen_access_list": "",
            "postscreen_greet_wait": greet_wait,
            "postscreen_greet_action": "enforce",
            "postscreen_dnsbl_sites": "",
            "postscreen_client_connection_count_limit": "0",
            "postscreen_pre_queue_limit": "30000",
            "postscreen_post_queue_limit": "30000",
            "default_process_limit": "30000",
            "smtpd_client_connection_count_limit": "0",
        }
        (base / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.main.items()))
        (base / "master.cf").write_text(
            f"{self.addr} inet n - n - 1 postscreen\n"
            "smtpd     pass  -       -       n       -       -       smtpd\n"
            "tlsproxy  unix  -       -       n       -       0       tlsproxy\n"
            "dnsblog   unix  -       -       n       -       0       dnsblog\n"
            "anvil     unix  -       -       n       -       1       anvil\n"
            "scache    unix  -       -       n       -       1       scache\n"
            "postlog   unix-dgram n  -       n       -       1       postlogd\n"
            "cleanup   unix  n       -       n       -       0       cleanup\n"
            "rewrite   unix  -       -       n       -       -       trivial-rewrite\n"
            "proxymap  unix  -       -       n       -       -       proxymap\n"
        )
        subprocess.run(["postfix", "-c", str(base), "start"], check=True, capture_output=True, timeout=60)
        pidfile = base / "queue" / "pid" / "master.pid"
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "postfix master")
        self.master_pid = int(pidfile.read_text().split()[0])
        wait_until(lambda: listening(self.port), 10, "postscreen listening")
        # postscreen is started on the first connection (the probe above).
        self.pid = wait_until(lambda: (children(self.master_pid, "postscreen") or [None])[0], 10,
                              "postscreen process")

    def stop(self):
        subprocess.run(["postfix", "-c", str(self.dir), "stop"], capture_output=True, timeout=60)
        with contextlib.suppress(RuntimeError):
            wait_until(lambda: not os.path.exists(f"/proc/{self.master_pid}"), 10, "postfix stop")
        shutil.rmtree(self.dir, ignore_errors=True)
