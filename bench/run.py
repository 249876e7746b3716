#!/usr/bin/env python3
"""The benchmark suite (`make bench`): mxguard side by side with a direct
connection, HAProxy and postscreen, on loopback. Writes docs/benchmarks.md.

    python3 bench/run.py                    # everything, release builds
    python3 bench/run.py --only held,bulk   # some sections
    python3 bench/run.py --smoke --out X.md # seconds: what `make test` runs

Every comparison runs its peers in the same run, interleaved (guard, peer,
guard, peer, ...), and reports medians and the ratio against the peer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
from peers import (REPO, FastSink, Guard, HAProxy, Postscreen, Proc, SmtpSink, cpu_seconds,  # noqa: E402
                   fd_count, haproxy_available, loadavg, rss_bytes, tcp_segments_out, wait_until)

# A holder process stays well under the 20,000-descriptor limit.
PER_HOLDER = 9000


class Run:
    """Settings of one run of the suite, and what it found."""

    def __init__(self, args):
        self.smoke = args.smoke
        self.runs = args.runs or (1 if args.smoke else 3)
        profile = "debug" if args.smoke else "release"
        self.guard_bin = Path(os.environ.get("MXGUARD_BIN") or peers.cargo_bin("mxguard", profile))
        self.mxbench = Path(os.environ.get("MXBENCH_BIN") or peers.cargo_bin("mxbench", profile))
        self.workdir = Path(tempfile.mkdtemp(prefix="mxbench-"))
        self.haproxy = haproxy_available()
        self.commands: list[str] = []
        self.sections: list[str] = []
        self.notes: list[str] = []
        self._source = 0

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')} load {loadavg()}] {msg}", flush=True)

    def command(self, argv) -> str:
        line = " ".join(str(a) for a in argv)
        line = line.replace(str(self.mxbench), "mxbench").replace(str(self.guard_bin), "mxguard")
        if line not in self.commands:
            self.commands.append(line)
        return line

    def fresh_source(self) -> str:
        """A loopback source address not used before in this run: closed
        connections leave TIME_WAIT ports behind on the address they used."""
        self._source += 1
        return f"127.{100 + self._source // 250}.{self._source % 250}.1"


def median(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else float("nan")


def fmt(v, digits=0):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:,.{digits}f}"


def ratio(a, b, digits=2):
    if not a or not b or any(isinstance(x, float) and math.isnan(x) for x in (a, b)):
        return "n/a"
    return f"{a / b:.{digits}f}"


# --------------------------------------------------------------------------
# held sessions


GUARD_HOLD = {
    "greet.delay": "300s",
    "greet.challenge": True,
    "greet.upstream_connect": "lazy",
    "greet.connect_lead": "1s",
    "limits.drain_timeout": "1s",
}


def total(f, pids):
    return sum(f(p) for p in pids)


def hold_once(run: Run, pids: list[int], target: str, count: int) -> dict:
    """Opens `count` idle connections to `target`; measures the processes
    `pids` that hold them (summed)."""
    time.sleep(0.5)
    rss0, cpu0, fds0 = total(rss_bytes, pids), total(cpu_seconds, pids), total(fd_count, pids)
    holders = []
    n_holders = max(1, math.ceil(count / PER_HOLDER))
    for i in range(n_holders):
        share = count // n_holders + (1 if i < count % n_holders else 0)
        argv = [run.mxbench, "hold", "--target", target, "--count", share, "--sources", run.fresh_source()]
        run.command([run.mxbench, "hold", "--target", "ADDR", "--count", share, "--sources", "127.x.y.1"])
        holders.append(Proc(f"hold-{i}", argv, run.workdir, pipe=True))
    started = time.monotonic()
    opened = 0
    for h in holders:
        line = h.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"holder failed: {h.stderr()}")
        opened += json.loads(line)["opened"]
    # Every connection accepted: the server holds a descriptor for each.
    try:
        wait_until(lambda: total(fd_count, pids) >= fds0 + count, 30, f"{count} descriptors")
    except RuntimeError:
        run.log(f"server holds {total(fd_count, pids) - fds0} of {count}")
    accept_s = time.monotonic() - started
    time.sleep(1.0)
    rss1, cpu1 = total(rss_bytes, pids), total(cpu_seconds, pids)
    # CPU while only holding: timers, nothing else.
    time.sleep(3.0)
    cpu2 = total(cpu_seconds, pids)
    held = closed = refused = 0
    for h in holders:
        h.popen.stdin.write("check\n")
        h.popen.stdin.flush()
        got = json.loads(h.popen.stdout.readline())
        held, closed, refused = held + got["held"], closed + got["closed"], refused + got["refused"]
    for h in holders:
        h.popen.stdin.close()
    for h in holders:
        h.popen.wait(30)
        h.stop()
    return {
        "opened": opened, "held": held, "closed": closed, "refused": refused,
        "rss_per_session": (rss1 - rss0) / count,
        "rss_base": rss0, "rss_held": rss1,
        "cpu_accept": cpu1 - cpu0, "cpu_hold_pct": (cpu2 - cpu1) / 3.0 * 100,
        "accept_s": accept_s,
    }


def section_held(run: Run) -> None:
    counts = [100] if run.smoke else [10_000, 19_000]
    wait = "300s"
    servers = ["mxguard", "postscreen"] + (["haproxy"] if run.haproxy else [])
    results: dict = {}
    for count in counts:
        for r in range(run.runs):
            for name in servers:
                run.log(f"held: {name} {count} run {r + 1}")
                upstream = SmtpSink(run.workdir)
                if name == "mxguard":
                    server = Guard(run.workdir, run.guard_bin, upstream.addr, GUARD_HOLD)
                    pids = [server.pid]
                elif name == "postscreen":
                    server = Postscreen(run.workdir, wait)
                    pids = [server.pid]
                else:
                    server = HAProxy(run.workdir, upstream.addr, hold=wait,
                                     procs=max(1, math.ceil(count / 9500)))
                    pids = server.pids
                try:
                    results.setdefault((count, name), []).append(hold_once(run, pids, server.addr, count))
                finally:
                    server.stop()
                    upstream.stop()
                if name == "haproxy":
                    run.haproxy_config = server.config
                if name == "postscreen":
                    run.postscreen_main = server.main
                if name == "mxguard":
                    run.guard_hold_config = server.config
    out = ["## Held sessions",
           "",
           "N connections open and idle in the greet delay (300 s, never reached), opened by "
           f"`mxbench hold` processes of at most {PER_HOLDER:,} connections each, each from its own "
           "loopback address: mxguard (lazy upstream connect, `220-` challenge sent; the sessions "
           "wait in its holding pen), postscreen (`postscreen_greet_wait`, one process), HAProxy "
           "(`tcp-request inspect-delay`, the backend not opened yet; HAProxy counts two descriptors "
           "per connection and will not start with a `maxconn` needing more than the 20,000 a process "
           "may hold, so two processes share the port, `maxconn 9950` each, and their figures are "
           "summed). One descriptor per held session in each. RSS per session = (RSS holding N − RSS "
           "before) / N; CPU = CPU seconds to accept the N, and CPU while holding them idle (3 s).",
           "",
           "| sessions | server | held | RSS per session (B) | vs mxguard | CPU to accept (s) | CPU holding (%) |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    for count in counts:
        guard = median([x["rss_per_session"] for x in results[(count, "mxguard")]])
        for name in servers:
            rows = results[(count, name)]
            rss = median([x["rss_per_session"] for x in rows])
            out.append(
                f"| {count:,} | {name} | {fmt(median([x['held'] for x in rows]))} | {fmt(rss)} | "
                f"{ratio(rss, guard)} | {fmt(median([x['cpu_accept'] for x in rows]), 2)} | "
                f"{fmt(median([x['cpu_hold_pct'] for x in rows]), 1)} |")
    out += ["", f"Runs per figure: {run.runs} (median)."]
    run.held = results
    run.sections.append("\n".join(out))


# --------------------------------------------------------------------------
# connection rate and latency


GUARD_FAST = {
    "greet.delay": "0s",
    "greet.challenge": False,
    "limits.drain_timeout": "1s",
}


def smtp_source(run: Run, target: str, messages: int, sessions: int) -> tuple[float, list[str]]:
    argv = ["smtp-source", "-s", sessions, "-m", messages, "-l", 1000,
            "-f", "bench@example.org", "-t", "sink@example.net", target]
    t = time.monotonic()
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=600)
    return time.monotonic() - t, argv


# Rounds of the connection-rate section: a round takes ~12 s, and the CPU
# per message of one round moves by ±5-10 % with the machine's other load,
# as much as the difference being measured (the guard against HAProxy).
RATE_MIN_RUNS = 7


def section_rate(run: Run) -> None:
    messages = 300 if run.smoke else 20_000
    sessions = 20
    rounds = run.runs if run.smoke else max(run.runs, RATE_MIN_RUNS)
    paths = ["direct", "mxguard", "mxguard-greeting"] + (["haproxy"] if run.haproxy else [])
    results: dict = {p: [] for p in paths}
    sink = SmtpSink(run.workdir)
    try:
        for r in range(rounds):
            for path in paths:
                run.log(f"rate: {path} run {r + 1}")
                middle = None
                if path == "direct":
                    target = sink.addr
                elif path.startswith("mxguard"):
                    settings = dict(GUARD_FAST)
                    if path == "mxguard-greeting":
                        settings["turns.watch"] = "greeting"
                    middle = Guard(run.workdir, run.guard_bin, sink.addr, settings)
                    target = middle.addr
                else:
                    middle = HAProxy(run.workdir, sink.addr)
                    target = middle.addr
                try:
                    time.sleep(0.3)
                    cpu0 = cpu_seconds(middle.pid) if middle else 0.0
                    segs0 = tcp_segments_out()
                    took, argv = smtp_source(run, target, messages, sessions)
                    segs = tcp_segments_out() - segs0
                    cpu = (cpu_seconds(middle.pid) - cpu0) if middle else None
                finally:
                    if middle:
                        middle.stop()
                run.command([*argv[:-1], "ADDR"])
                results[path].append({"rate": messages / took,
                                      "cpu_us": cpu / messages * 1e6 if cpu is not None else None,
                                      "segments": segs / messages})
    finally:
        sink.stop()
    direct = median([x["rate"] for x in results["direct"]])
    out = ["## Connection rate",
           "",
           f"`smtp-source -s {sessions} -m {messages:,} -l 1000` (one message per session, "
           f"{sessions} in parallel) into `smtp-sink`, directly and through each middle box; "
           "greet delay 0, no challenge. CPU per message: CPU of the middle process / messages. "
           "TCP segments per message: segments the machine sent during the run (`OutSegs`, "
           "/proc/net/snmp, both connections of a relayed session) / messages. "
           f"{rounds} rounds, each path once per round; medians, and \"vs HAProxy\" is the median "
           "of each round's ratio (the guard and HAProxy of the same round, seconds apart), "
           "with the lowest and highest round in brackets.",
           "",
           "| path | messages/s | vs direct | TCP segments per message | CPU per message (µs) | vs HAProxy |",
           "|---|---:|---:|---:|---:|---:|"]
    for path in paths:
        rate = median([x["rate"] for x in results[path]])
        cpu = median([x["cpu_us"] for x in results[path]]) if path != "direct" else None
        vs_hap = "n/a"
        per_round = round_ratios(results[path], results["haproxy"]) if cpu and run.haproxy else []
        if per_round:
            vs_hap = f"{median(per_round):.2f} ({min(per_round):.2f}–{max(per_round):.2f})"
        segs = median([x["segments"] for x in results[path]])
        out.append(f"| {label(path)} | {fmt(rate)} | {ratio(rate, direct)} | {fmt(segs, 1)} | "
                   f"{fmt(cpu, 1)} | {vs_hap} |")
    run.rate = results
    run.sections.append("\n".join(out))


def round_ratios(mine: list, theirs: list) -> list:
    """CPU per message of each round over the peer's in the same round."""
    return [a["cpu_us"] / b["cpu_us"] for a, b in zip(mine, theirs) if a["cpu_us"] and b["cpu_us"]]


def label(path: str) -> str:
    return {
        "direct": "direct",
        "mxguard": "mxguard (`turns.watch = \"session\"`, default)",
        "mxguard-greeting": "mxguard (`turns.watch = \"greeting\"`, splice)",
        "mxguard-splice": "mxguard splice (`turns.watch = \"greeting\"`, `relay.mode = \"splice\"`)",
        "mxguard-copy": "mxguard copy (`turns.watch = \"greeting\"`, `relay.mode = \"copy\"`)",
        "mxguard-session": "mxguard watched (`turns.watch = \"session\"`, default)",
        "mxguard-delay": "mxguard, greet delay 100 ms",
        "direct-wait": "direct, the client waiting 100 ms before the greeting",
        "haproxy": "HAProxy (`mode tcp`)",
        "haproxy-splice": "HAProxy (`mode tcp`, `option splice-auto`)",
        "direct-conntrack": "direct, connection tracking on",
        "mxguard-redirect": "mxguard relaying (`nftables.redirect`, no bypass)",
        "mxguard-bypass": "mxguard, `nftables.bypass_passed`, client passed",
        "mxguard-sklookup": "mxguard relaying (`intercept.mode = \"sk_lookup\"`, no bypass)",
        "mxguard-sklookup-bypass": "mxguard, `sk_lookup.bypass_passed`, client passed",
    }.get(path, path)


def mxbench_rate(run: Run, target: str, rate: int, seconds: float, threads: int,
                 wait_ms: int = 0) -> dict:
    argv = [run.mxbench, "rate", "--target", target, "--rate", rate, "--seconds", seconds,
            "--threads", threads] + (["--wait", wait_ms] if wait_ms else [])
    run.command([*argv[:3], "ADDR", *argv[4:]])
    out = subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout)


# Rounds of the latency section: a 99th percentile is the slowest 50 of a
# run's 5,000 sessions, and one stall of the machine (other builds share it)
# moves it by milliseconds; of three runs one stalled one moved the median
# (bench/analysis.md), of five it takes three.
LATENCY_MIN_RUNS = 5


def section_latency(run: Run) -> None:
    rate = 200 if run.smoke else 1000
    seconds = 1 if run.smoke else 5
    delay_ms = 100
    rounds = run.runs if run.smoke else max(run.runs, LATENCY_MIN_RUNS)
    # direct-wait: the client waits the delay before it reads the greeting,
    # with nothing in between. A client thread that slept 100 ms is slower
    # for the rest of its session (measured, bench/analysis.md; most likely
    # cold caches): the client's own cost of a greet delay, which the
    # delayed row is measured against.
    paths = (["direct", "direct-wait", "mxguard", "mxguard-delay"]
             + (["haproxy"] if run.haproxy else []))
    results: dict = {p: [] for p in paths}
    sink = SmtpSink(run.workdir)
    try:
        for r in range(rounds):
            for path in paths:
                run.log(f"latency: {path} run {r + 1}")
                middle = None
                threads = 64
                wait_ms = 0
                if path == "direct":
                    target = sink.addr
                elif path == "direct-wait":
                    target = sink.addr
                    wait_ms = delay_ms
                    threads = 512
                elif path == "mxguard":
                    middle = Guard(run.workdir, run.guard_bin, sink.addr, GUARD_FAST)
                    target = middle.addr
                elif path == "mxguard-delay":
                    # Every session waits the delay: no pass cache, the
                    # challenge sent, the upstream opened half-way.
                    middle = Guard(run.workdir, run.guard_bin, sink.addr, {
                        **GUARD_FAST, "greet.delay": f"{delay_ms}ms", "greet.challenge": True,
                        "greet.connect_lead": "50ms", "pass_cache.ttl": "0s"})
                    target = middle.addr
                    threads = 512
                else:
                    middle = HAProxy(run.workdir, sink.addr)
                    target = middle.addr
                try:
                    time.sleep(0.3)
                    got = mxbench_rate(run, target, rate, seconds, threads, wait_ms)
                finally:
                    if middle:
                        middle.stop()
                if path in ("mxguard-delay", "direct-wait"):
                    for key in ("greeting_ms", "session_ms"):
                        got[key] = {k: v - delay_ms for k, v in got[key].items()}
                results[path].append(got)
    finally:
        sink.stop()

    def pct(path, key, p):
        return median([x[key][p] for x in results[path]])

    out = ["## Added latency",
           "",
           f"`mxbench rate`: {rate} sessions/s for {seconds} s, each a whole small transaction "
           "(greeting, EHLO, MAIL, RCPT, DATA, QUIT) into `smtp-sink`, timed from the instant it "
           "was due to start. Added latency = the path's percentile − the direct path's, per run, "
           f"median over {rounds} runs (each path once per run). The {delay_ms} ms rows have the "
           f"{delay_ms} ms subtracted; the guard's delayed row is compared with the direct run "
           f"whose client waits {delay_ms} ms after connecting before it reads the greeting "
           "(`--wait`): what waiting costs the client itself, with nothing in between.",
           "",
           "| path | sessions/s | failed | greeting p50 / p99 (ms) | session p50 / p99 (ms) | "
           "added p50 (ms) | added p99 (ms) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for path in paths:
        base = results["direct-wait" if path == "mxguard-delay" else "direct"]
        added50 = median([x["session_ms"]["p50"] - d["session_ms"]["p50"]
                          for x, d in zip(results[path], base)])
        added99 = median([x["session_ms"]["p99"] - d["session_ms"]["p99"]
                          for x, d in zip(results[path], base)])
        out.append(
            f"| {label(path)} | {fmt(median([x['rate'] for x in results[path]]))} | "
            f"{fmt(median([x['failed'] for x in results[path]]))} | "
            f"{fmt(pct(path, 'greeting_ms', 'p50'), 3)} / {fmt(pct(path, 'greeting_ms', 'p99'), 3)} | "
            f"{fmt(pct(path, 'session_ms', 'p50'), 3)} / {fmt(pct(path, 'session_ms', 'p99'), 3)} | "
            + ("– | – |" if path.startswith("direct")
               else f"{fmt(added50, 3)} | {fmt(added99, 3)} |"))
    run.latency = results
    run.sections.append("\n".join(out))


# --------------------------------------------------------------------------
# kernel bypass (nftables.bypass_passed), in network namespaces


class BypassNet:
    """client namespace ── veth ── gateway namespace (smtp-sink on port 25,
    and the guard owning the REDIRECT to its port): the deployment of
    docs/deployment.md with the MTA on the gateway."""

    CLIENT, GW = "10.78.1.2", "10.78.1.1"
    TABLE = "mxguard_bench"
    GUARD_PORT = 10025
    ADMIN = "127.0.0.1:9426"

    def __init__(self):
        tag = f"mxb-{os.getpid()}"
        self.client, self.gw = f"{tag}-c", f"{tag}-g"
        self.made: list[str] = []
        try:
            for ns in (self.client, self.gw):
                self.sh("ip", "netns", "add", ns)
                self.made.append(ns)
                self.sh("ip", "-n", ns, "link", "set", "lo", "up")
            self.sh("ip", "-n", self.client, "link", "add", "mxbc0", "type", "veth",
                    "peer", "name", "mxbg0", "netns", self.gw)
            for ns, dev, addr in ((self.client, "mxbc0", self.CLIENT), (self.gw, "mxbg0", self.GW)):
                self.sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                self.sh("ip", "-n", ns, "link", "set", dev, "up")
            # 3 x 20,000 connections a path: the ports of the client and
            # the conntrack entries of the gateway must not run out.
            self.sh(*self.exec(self.client), "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000",
                    "net.ipv4.tcp_tw_reuse=1")
            # A closed connection's conntrack entry goes within a second,
            # so one path's entries do not meet the next path's SYNs.
            subprocess.run([*self.exec(self.gw), "sysctl", "-qw",
                            *(f"net.netfilter.nf_conntrack_tcp_timeout_{state}=1"
                              for state in ("time_wait", "fin_wait", "close_wait", "last_ack", "close"))],
                           capture_output=True)
        except BaseException:
            self.delete()
            raise

    @staticmethod
    def unavailable() -> str | None:
        if os.geteuid() != 0:
            return "needs root (network namespaces, nftables)"
        for tool in ("ip", "nft", "smtp-source", "smtp-sink"):
            if shutil.which(tool) is None:
                return f"needs `{tool}`"
        return None

    @staticmethod
    def sh(*argv) -> str:
        out = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))}: {out.stderr.strip()}")
        return out.stdout

    @staticmethod
    def exec(ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def listening(self, port: int) -> bool:
        return bool(self.sh(*self.exec(self.gw), "ss", "-Htln", f"sport = :{port}").strip())

    def nft(self, *args, check=False, input=None) -> subprocess.CompletedProcess:
        return subprocess.run([*self.exec(self.gw), "nft", *args], capture_output=True, text=True, timeout=10,
                              check=check, input=input)

    def drop_table(self) -> None:
        self.nft("delete", "table", "inet", self.TABLE)

    def guard_metric(self, name: str) -> float:
        fetch = (f"import urllib.request; print(urllib.request.urlopen("
                 f"'http://{self.ADMIN}/metrics', timeout=5).read().decode())")
        text = self.sh(*self.exec(self.gw), sys.executable, "-c", fetch)
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def delete(self) -> None:
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made = []


def guard_bypass_settings(workdir: Path, bypass: bool, steer: bool) -> dict:
    """The guard of the gateway namespace: owning the nftables REDIRECT,
    or (`steer`) steering with its sk_lookup program from loopback."""
    if steer:
        return {
            **GUARD_FAST,
            "hostname": "guard.bench.example",
            "intercept.mode": "sk_lookup",
            "intercept.listen": [f"127.0.0.1:{BypassNet.GUARD_PORT}"],
            "admin.listen": BypassNet.ADMIN,
            "log.level": "warn",
            "admission.enabled": False,
            "senders.enabled": False,
            "state.dir": str(workdir / "state-bypass"),
            "sk_lookup.ports": [25],
            "sk_lookup.interfaces": ["mxbg0"],
            "sk_lookup.bypass_passed": bypass,
        }
    return {
        **GUARD_FAST,
        "hostname": "guard.bench.example",
        "intercept.mode": "redirect",
        "intercept.listen": [f"0.0.0.0:{BypassNet.GUARD_PORT}"],
        "admin.listen": BypassNet.ADMIN,
        "log.level": "warn",
        "admission.enabled": False,
        "senders.enabled": False,
        "state.dir": str(workdir / "state-bypass"),
        "nftables.enabled": True,
        "nftables.table": BypassNet.TABLE,
        "nftables.batch_interval": "100ms",
        "nftables.redirect": True,
        "nftables.redirect_interfaces": ["mxbg0"],
        "nftables.bypass_passed": bypass,
    }


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent on anything but idle and iowait."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / peers.TICKS


def section_bypass(run: Run) -> None:
    messages = 300 if run.smoke else 20_000
    sessions = 20
    # The bypass right after direct: the pair this section is for, measured
    # as close together as the other load on the machine allows.
    paths = ["direct", "mxguard-sklookup-bypass", "mxguard-bypass", "direct-conntrack", "mxguard-sklookup",
             "mxguard-redirect"]
    heading = ["## Kernel bypass for passed clients", ""]
    why = BypassNet.unavailable()
    if why:
        run.sections.append("\n".join([*heading, f"Not measured: {why}."]))
        return
    results: dict = {p: [] for p in paths}
    net = BypassNet()
    target = f"{net.GW}:25"
    source = [*net.exec(net.client), "smtp-source", "-s", sessions, "-m", messages, "-l", 1000,
              "-f", "bench@example.org", "-t", "sink@example.net", target]
    try:
        sink_argv = [*net.exec(net.gw), "smtp-sink", *(["-u", "postfix"] if os.getuid() == 0 else []),
                     "0.0.0.0:25", "4096"]
        sink = Proc("bypass-sink", sink_argv, run.workdir)
        wait_until(lambda: net.listening(25), 10, "smtp-sink listening in the gateway namespace")
        for r in range(run.runs):
            for path in paths:
                run.log(f"bypass: {path} run {r + 1}")
                guard = None
                net.drop_table()
                if path == "direct-conntrack":
                    # What every path through the guard's table pays in the
                    # kernel: connection tracking and a nat hook. An empty
                    # nat chain does not turn tracking on (only a rule with
                    # a nat or ct expression does): its one rule redirects
                    # a port nobody uses.
                    net.nft("-f", "-", check=True, input=f"table inet {BypassNet.TABLE} {{\n"
                            "chain intercept {\ntype nat hook prerouting priority dstnat; policy accept;\n"
                            f"tcp dport 9 redirect to :{BypassNet.GUARD_PORT}\n}}\n}}\n")
                elif path != "direct":
                    steer = path.startswith("mxguard-sklookup")
                    settings = guard_bypass_settings(run.workdir, bypass=path.endswith("-bypass"), steer=steer)
                    config = run.workdir / "guard-bypass.toml"
                    config.write_text(peers.to_toml(settings))
                    guard = Proc("guard-bypass", [*net.exec(net.gw), run.guard_bin, "run", "--config", config],
                                 run.workdir)
                    if not steer:
                        wait_until(lambda: net.nft("list", "chain", "inet", BypassNet.TABLE, "intercept")
                                   .returncode == 0 or not guard.alive(), 10, "the guard's nat chain")
                    if not guard.alive():
                        raise RuntimeError(f"the guard did not start: {guard.stderr()}")
                    wait_until(lambda: net.listening(BypassNet.GUARD_PORT), 10, "the guard listening")
                    if steer:
                        run.sklookup_config = peers.to_toml({k: v for k, v in settings.items()
                                                             if k.startswith(("sk_lookup.", "intercept."))})
                    else:
                        run.bypass_config = peers.to_toml({k: v for k, v in settings.items()
                                                           if k.startswith("nftables.")})
                try:
                    if path == "mxguard-sklookup-bypass":
                        # One session through the guard passes; the
                        # address goes into the program's map.
                        BypassNet.sh(*source[:5], "-s", 1, "-m", 1, *source[9:])
                        wait_until(lambda: net.guard_metric('mxguard_sk_lookup_passed_total{op="add",result="ok"}')
                                   >= 1, 10, "the client in the passed map")
                    if path == "mxguard-bypass":
                        # One session through the guard passes; the
                        # address goes into passed4.
                        BypassNet.sh(*source[:5], "-s", 1, "-m", 1, *source[9:])
                        wait_until(lambda: net.CLIENT in net.nft("list", "set", "inet", BypassNet.TABLE,
                                                                 "passed4").stdout,
                                   10, "the client in the passed set")
                    time.sleep(0.3 if run.smoke else 2.0)
                    accepted0 = net.guard_metric("mxguard_connections_accepted_total") if guard else 0.0
                    cpu0 = cpu_seconds(guard.pid) if guard else 0.0
                    busy0 = machine_busy_seconds()
                    t = time.monotonic()
                    BypassNet.sh(*source)
                    took = time.monotonic() - t
                    busy = machine_busy_seconds() - busy0
                    cpu = cpu_seconds(guard.pid) - cpu0 if guard else None
                    accepted = (net.guard_metric("mxguard_connections_accepted_total") - accepted0
                                if guard else None)
                finally:
                    if guard:
                        guard.stop()
                    net.drop_table()
                results[path].append({
                    "rate": messages / took,
                    "cpu_us": cpu / messages * 1e6 if cpu is not None else None,
                    "machine_us": busy / messages * 1e6,
                    "accepted": accepted,
                })
                run.log(f"bypass: {path}: {messages / took:,.0f} messages/s, machine "
                        f"{busy / messages * 1e6:.0f} µs per message")
        sink.stop()
    finally:
        net.delete()
    run.command(["smtp-source", "-s", sessions, "-m", messages, "-l", 1000, "-f", "bench@example.org",
                 "-t", "sink@example.net", "10.78.1.1:25  # in the client namespace"])
    direct = median([x["rate"] for x in results["direct"]])

    def vs_direct(path):
        """The median of each round's ratio: the load of other work on the
        machine drifts from round to round, less within one."""
        return median([x["rate"] / d["rate"] for x, d in zip(results[path], results["direct"])])

    out = [*heading,
           f"`smtp-source -s {sessions} -m {messages:,} -l 1000` in a client network namespace, over a "
           "veth pair, to port 25 of a gateway namespace where `smtp-sink` listens: directly (no "
           "nftables rule at all); directly with connection tracking on (a nat chain in the gateway "
           "namespace whose one rule, a redirect of port 9, never matches: a rule with a nat or ct "
           "expression turns tracking on in the namespace, an empty nat chain does not; what any path "
           "through the guard's table pays in the kernel); through the guard, which owns the REDIRECT (`nftables.redirect`, "
           "port 25 on the veth → its port; greet delay 0, no challenge); and with "
           "`nftables.bypass_passed`, after one session from the client's address has passed, so its "
           "address is in `passed4` and the kernel sends its connections straight to `smtp-sink`. "
           "The same two with the guard steering by its own BPF program (`intercept.mode = \"sk_lookup\"`, "
           "listening on loopback; no nftables rule, no connection tracking): relaying, and with "
           "`sk_lookup.bypass_passed`, the client's address in the program's map after one session, "
           "so the kernel hands its connections to `smtp-sink`'s socket. "
           "Vs direct: the median of each round's ratio to that round's direct run. "
           "Sessions through the guard: connections the guard accepted during the measured run. "
           "Guard CPU per message: CPU of the guard process / messages; machine CPU per message: "
           "busy time of all CPUs (/proc/stat) / messages, which includes smtp-source, smtp-sink, the "
           "kernel and anything else running on the machine.",
           "",
           "| path | messages/s | vs direct | sessions through the guard | guard CPU per message (µs) | "
           "machine CPU per message (µs) |",
           "|---|---:|---:|---:|---:|---:|"]
    for path in paths:
        rows = results[path]
        rate = median([x["rate"] for x in rows])
        cpu = median([x["cpu_us"] for x in rows]) if path.startswith("mxguard") else None
        acc = median([x["accepted"] for x in rows]) if path.startswith("mxguard") else None
        out.append(f"| {label(path)} | {fmt(rate)} | {fmt(vs_direct(path), 2)} | "
                   f"{'–' if acc is None else fmt(acc)} | {'–' if cpu is None else fmt(cpu, 1)} | "
                   f"{fmt(median([x['machine_us'] for x in rows]), 1)} |")
    out += ["", f"Runs per figure: {run.runs} (median), interleaved (each path once per round, in the "
            "order of the table)."]
    run.bypass = results
    run.sections.append("\n".join(out))


# --------------------------------------------------------------------------
# bulk throughput


def section_bulk(run: Run) -> None:
    sizes = [(1_000_000, 5 if run.smoke else 300), (10_000_000, 2 if run.smoke else 40)]
    paths = ["direct", "mxguard-splice", "mxguard-copy", "mxguard-session"]
    if run.haproxy:
        paths += ["haproxy-splice", "haproxy"]
    results: dict = {}
    sink = FastSink(run.workdir, run.mxbench)
    try:
        for r in range(run.runs):
            for path in paths:
                middle = None
                if path == "direct":
                    target = sink.addr
                elif path.startswith("mxguard"):
                    settings = dict(GUARD_FAST)
                    if path == "mxguard-session":
                        settings["turns.watch"] = "session"
                    else:
                        settings["turns.watch"] = "greeting"
                        settings["relay.mode"] = path.split("-")[1]
                    middle = Guard(run.workdir, run.guard_bin, sink.addr, settings)
                    target = middle.addr
                else:
                    middle = HAProxy(run.workdir, sink.addr, splice=path == "haproxy-splice")
                    target = middle.addr
                try:
                    for size, count in sizes:
                        run.log(f"bulk: {path} {size // 1_000_000} MB × {count} run {r + 1}")
                        argv = [run.mxbench, "send", "--target", target, "--size", size, "--count", count]
                        run.command([*argv[:3], "ADDR", *argv[4:]])
                        cpu0 = cpu_seconds(middle.pid) if middle else 0.0
                        out = subprocess.run([str(a) for a in argv], check=True, capture_output=True,
                                             text=True, timeout=600)
                        got = json.loads(out.stdout)
                        cpu = cpu_seconds(middle.pid) - cpu0 if middle else None
                        got["cpu_s_per_gb"] = cpu / (got["bytes"] / 1e9) if cpu is not None else None
                        results.setdefault((size, path), []).append(got)
                finally:
                    if middle:
                        middle.stop()
    finally:
        sink.stop()
    out = ["## Bulk throughput",
           "",
           "`mxbench send` (the body written with sendfile(2), one session per message, one at a "
           "time) into `mxbench sink` (256 KiB reads), directly and through each middle box. "
           "MB/s = 10^6 bytes per second of whole sessions (connect to QUIT); CPU s/GB = CPU "
           "seconds of the middle process per 10^9 bytes.",
           "",
           "| message | path | MB/s | vs direct | CPU s/GB | vs HAProxy splice |",
           "|---|---|---:|---:|---:|---:|"]
    for size, count in sizes:
        direct = median([x["mb_per_s"] for x in results[(size, "direct")]])
        hap = (median([x["cpu_s_per_gb"] for x in results[(size, "haproxy-splice")]])
               if run.haproxy else None)
        for path in paths:
            rows = results[(size, path)]
            mbs = median([x["mb_per_s"] for x in rows])
            cpu = median([x["cpu_s_per_gb"] for x in rows]) if path != "direct" else None
            out.append(f"| {size // 1_000_000} MB × {count} | {label(path)} | {fmt(mbs)} | "
                       f"{ratio(mbs, direct)} | {fmt(cpu, 2)} | "
                       f"{ratio(cpu, hap) if cpu and hap else 'n/a'} |")
    run.bulk = results
    run.sections.append("\n".join(out))


# --------------------------------------------------------------------------
# micro benchmarks


def section_micro(run: Run) -> None:
    run.log("micro: turn tracker (criterion)")
    tracker_cmd = ["cargo", "bench", "-p", "mxguard-smtp", "--bench", "tracker"]
    run.command(tracker_cmd)
    out = subprocess.run(tracker_cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"tracker bench failed: {out.stderr[-2000:]}")
    rows = []
    name = None
    for line in out.stdout.splitlines():
        m = re.match(r"^(\S+/\S+)\s*(time:.*)?$", line.strip())
        if m and not line.strip().startswith(("time:", "thrpt:")):
            name = m.group(1)
        t = re.search(r"thrpt:\s*\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
        if t and name:
            rows.append((name, f"{t.group(1)} {t.group(2)}"))
    run.log("micro: blocklist lookups (admission bench)")
    adm_cmd = ["cargo", "bench", "-p", "mxguard-policy", "--bench", "admission"]
    run.command(adm_cmd)
    adm = subprocess.run(adm_cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    if adm.returncode != 0:
        raise RuntimeError(f"admission bench failed: {adm.stderr[-2000:]}")
    lines = ["## Turn tracker and blocklist",
             "",
             "Turn tracker (`crates/mxguard-smtp/benches/tracker.rs`, criterion; median throughput "
             "of the client and server bytes fed through `TurnTracker`):",
             "",
             "| corpus | throughput |",
             "|---|---:|"]
    lines += [f"| {n} | {t} |" for n, t in rows]
    lines += ["", "Blocklist and admission (`crates/mxguard-policy/benches/admission.rs`):", "", "```"]
    lines += [line for line in adm.stdout.splitlines() if line.strip()]
    lines += ["```"]
    run.sections.append("\n".join(lines))


# --------------------------------------------------------------------------
# the report


def machine(run: Run) -> list[str]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    def version(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "n/a"
    rev = version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "crates"],
                           capture_output=True, text=True).stdout.strip()
    return [
        f"- CPU: {os.cpu_count()} × {model}; memory {mem:,} MiB; kernel {platform.release()}",
        f"- descriptor limit per process: {' / '.join(str(x) for x in __import__('resource').getrlimit(__import__('resource').RLIMIT_NOFILE))} (soft / hard)",
        f"- mxguard {rev}{' (with uncommitted changes under crates/)' if dirty else ''}, {'debug (smoke)' if run.smoke else 'release'} build; "
        f"{version(['rustc', '-V'])}",
        f"- HAProxy: {version(['haproxy', '-v'])}",
        f"- Postfix: {version(['postconf', '-d', '-h', 'mail_version'])}",
    ]


def write_report(run: Run, out: Path, started: str, load_before: str) -> None:
    parts = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`bench/run.py`); do not edit by hand. "
        "Everything on loopback, peers started by the suite.",
        "",
        "## Machine",
        "",
        *machine(run),
        f"- run started {started}; load average (1/5/15 min) {load_before} at the start, "
        f"{loadavg()} at the end — other builds and tests share this machine, so figures are "
        "noisy: each is the median of several runs, and each ratio compares peers measured "
        "in the same run, interleaved.",
        "",
        *[line for section in run.sections for line in (section, "")],
        "## Commands",
        "",
        "```",
        "make bench            # = bench/install-deps.sh; cargo build --release -p mxguard -p mxguard-bench;",
        "                      #   python3 bench/run.py --out docs/benchmarks.md",
        *run.commands,
        "```",
    ]
    if getattr(run, "guard_hold_config", None):
        parts += ["", "mxguard, held sessions:", "", "```toml", run.guard_hold_config.strip(), "```"]
    if getattr(run, "postscreen_main", None):
        parts += ["", "postscreen (main.cf of the private instance; master.cf: "
                  "`127.0.0.1:PORT inet n - n - 1 postscreen`):", "", "```",
                  *[f"{k} = {v}" for k, v in run.postscreen_main.items()
                    if k.startswith(("postscreen", "default_process", "smtpd_client", "mynetworks"))], "```"]
    if getattr(run, "haproxy_config", None):
        parts += ["", "HAProxy, held sessions:", "", "```", run.haproxy_config.strip(), "```"]
    if getattr(run, "bypass_config", None):
        parts += ["", "mxguard, kernel bypass (with the rate settings below, `intercept.mode = \"redirect\"`):",
                  "", "```toml", run.bypass_config.strip(), "```"]
    if getattr(run, "sklookup_config", None):
        parts += ["", "mxguard, steering with sk_lookup (with the rate settings below):",
                  "", "```toml", run.sklookup_config.strip(), "```"]
    parts += ["", "The other runs: the MTA stand-ins are `smtp-sink -u postfix ADDR 4096` (rate, latency) "
              "and `mxbench sink --listen ADDR` (bulk); HAProxy is `haproxy -db -f CFG` with the held "
              "config less the inspect delay (`maxconn 4000`), plus `option splice-auto` in the frontend "
              "and the backend for the splice rows; mxguard is `mxguard run --config CFG` with the held "
              "config and:", "",
              "| path | settings |", "|---|---|",
              *[f"| {label(path)} | " + ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in settings.items())
                + " |" for path, settings in (
                  ("mxguard", GUARD_FAST),
                  ("mxguard-greeting", {**GUARD_FAST, "turns.watch": "greeting"}),
                  ("mxguard-copy", {**GUARD_FAST, "turns.watch": "greeting", "relay.mode": "copy"}),
                  ("mxguard-delay", {**GUARD_FAST, "greet.delay": "100ms", "greet.challenge": True,
                                     "greet.connect_lead": "50ms", "pass_cache.ttl": "0s"}))]]
    parts += ["", *run.notes]
    out.write_text("\n".join(parts).rstrip() + "\n")


def section_targets(run: Run) -> None:
    """The targets of issue 6, each against the figures of this run."""
    rows = []

    def row(target, figure, met):
        rows.append(f"| {target} | {figure} | {'met' if met else '**missed**'} |")

    held = getattr(run, "held", None)
    if held:
        top = max(c for c, _ in held)
        rss = {name: median([x["rss_per_session"] for x in held[(c, name)]])
               for (c, name) in held if c == top}
        count = median([x["held"] for x in held[(top, "mxguard")]])
        peers_rss = {k: v for k, v in rss.items() if k != "mxguard"}
        row(f"{top:,} sessions held in the greet delay, one descriptor each",
            f"{fmt(count)} held", count >= top)
        row("≤ 1 KiB RSS per held session, less than postscreen and HAProxy",
            f"{fmt(rss['mxguard'])} B (" + ", ".join(f"{k} {fmt(v)} B" for k, v in peers_rss.items()) + ")",
            rss["mxguard"] <= 1024 and all(rss["mxguard"] < v for v in peers_rss.values()))
    rate = getattr(run, "rate", None)
    if rate:
        direct = median([x["rate"] for x in rate["direct"]])
        guard = median([x["rate"] for x in rate["mxguard"]])
        row("≥ 90 % of the direct messages/s (no greet delay)",
            f"{ratio(guard, direct)} of direct ({fmt(guard)} vs {fmt(direct)}/s)", guard >= 0.9 * direct)
        if "haproxy" in rate:
            cpu = median([x["cpu_us"] for x in rate["mxguard"]])
            hap = median([x["cpu_us"] for x in rate["haproxy"]])
            per_round = round_ratios(rate["mxguard"], rate["haproxy"])
            mid = median(per_round) if per_round else math.nan
            row("less CPU per message than HAProxy",
                f"{fmt(cpu, 1)} µs vs {fmt(hap, 1)} µs ({mid:.2f}, median of the rounds' ratios)",
                mid < 1.0)
    bulk = getattr(run, "bulk", None)
    if bulk:
        for size in sorted({s for s, _ in bulk}):
            direct = median([x["mb_per_s"] for x in bulk[(size, "direct")]])
            splice = median([x["mb_per_s"] for x in bulk[(size, "mxguard-splice")]])
            row(f"splice ≥ 95 % of direct MB/s ({size // 1_000_000} MB messages)",
                f"{ratio(splice, direct)} of direct ({fmt(splice)} vs {fmt(direct)} MB/s)",
                splice >= 0.95 * direct)
            if (size, "haproxy-splice") in bulk:
                cpu = median([x["cpu_s_per_gb"] for x in bulk[(size, "mxguard-splice")]])
                hap = median([x["cpu_s_per_gb"] for x in bulk[(size, "haproxy-splice")]])
                row(f"splice: less CPU per GB than HAProxy with splice ({size // 1_000_000} MB)",
                    f"{fmt(cpu, 2)} vs {fmt(hap, 2)} s/GB", cpu < hap)
    bypass = getattr(run, "bypass", None)
    if bypass:
        def paired(path):
            return median([x["rate"] / d["rate"] for x, d in zip(bypass[path], bypass["direct"])])
        steered, through, tracked = (paired("mxguard-sklookup-bypass"), paired("mxguard-bypass"),
                                     paired("direct-conntrack"))
        row("… for passed clients, with `sk_lookup.bypass_passed` (namespaces, no greet delay)",
            f"{fmt(steered, 2)} of direct ({fmt(median([x['rate'] for x in bypass['mxguard-sklookup-bypass']]))} "
            f"vs {fmt(median([x['rate'] for x in bypass['direct']]))}/s)", steered >= 0.9)
        row("… for passed clients, with `nftables.bypass_passed`",
            f"{fmt(through, 2)} of direct; direct with conntrack on: {fmt(tracked, 2)}", through >= 0.9)
    lat = getattr(run, "latency", None)
    if lat:
        added = median([x["session_ms"]["p99"] - d["session_ms"]["p99"]
                        for x, d in zip(lat["mxguard"], lat["direct"])])
        row("p99 added latency < 1 ms at 1,000 sessions/s (no delay)", f"{fmt(added, 3)} ms", added < 1.0)
        added = median([x["session_ms"]["p99"] - d["session_ms"]["p99"]
                        for x, d in zip(lat["mxguard-delay"], lat["direct-wait"])])
        plain = median([x["session_ms"]["p99"] - d["session_ms"]["p99"]
                        for x, d in zip(lat["mxguard-delay"], lat["direct"])])
        row("… with a 100 ms greet delay (beyond it; against a direct client that waits as long)",
            f"{fmt(added, 3)} ms ({fmt(plain, 3)} against the direct run without the wait)",
            added < 1.0)
    run.sections.insert(0, "\n".join(["## Targets (issue 6)", "", "| target | this run | |",
                                       "|---|---|---|", *rows]))


SECTIONS = {
    "held": section_held,
    "rate": section_rate,
    "latency": section_latency,
    "bulk": section_bulk,
    "bypass": section_bypass,
    "micro": section_micro,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, debug builds (make test)")
    ap.add_argument("--only", default="", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--runs", type=int, default=0, help="runs per figure (default 3; smoke 1)")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    run = Run(args)
    only = [s for s in args.only.split(",") if s] or (
        ["held", "rate", "latency", "bulk", "bypass"] if args.smoke else list(SECTIONS))
    for binary in (run.guard_bin, run.mxbench):
        if not os.access(binary, os.X_OK):
            print(f"missing {binary}: build it first (make bench does)", file=sys.stderr)
            return 2
    # A run stopped from outside (timeout, ^C) still stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = loadavg()
    try:
        for name in only:
            SECTIONS[name](run)
    finally:
        peers.stop_all()
    section_targets(run)
    analysis = Path(__file__).resolve().parent / "analysis.md"
    if analysis.exists() and not args.smoke:
        run.sections.append(analysis.read_text().strip())
    write_report(run, Path(args.out), started, load_before)
    run.log(f"wrote {args.out}")
    shutil.rmtree(run.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
