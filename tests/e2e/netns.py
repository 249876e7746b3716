"""Network namespaces for the interception tests: a client host, a gateway
host running the guard, and an MTA host, joined by veth pairs, IPv4 and IPv6.

    client ns  c0 ── g0  gateway ns  g1 ── m0  MTA ns
    10.77.1.2/24     10.77.1.1/24    10.77.2.1/24     10.77.2.2/24
    fd77:1::2/64     fd77:1::1/64    fd77:2::1/64     fd77:2::2/64

Both end hosts route everything through the gateway, so the MTA's replies
to a spoofed (TPROXY, source-bound) connection come back through it.

Sockets are opened inside a namespace by switching only the calling thread
(setns(2)) for the moment of socket(2); the socket stays in that namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import uuid

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

RUN_TAG = uuid.uuid4().hex[:6]
_counter = 0


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(ns: str | None):
    """Run the block with this thread inside network namespace `ns`."""
    if ns is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


def ip(*args: str, ns: str | None = None, check=True) -> subprocess.CompletedProcess:
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def in_ns(ns: str, *argv: str, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise AssertionError(f"in {ns}: {' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns, iptables)"
    import shutil
    for tool in ("ip", "iptables", "ip6tables"):
        if shutil.which(tool) is None:
            return f"network namespace tests need `{tool}` (apt-get install iptables iproute2)"
    return None


def new_ns_name(role: str) -> str:
    global _counter
    _counter += 1
    return f"mxg-{RUN_TAG}-{_counter}-{role}"


def delete_ns(ns: str) -> None:
    """Kill whatever still runs inside, then delete the namespace."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def leftover_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"mxg-{RUN_TAG}-")]


class Topology:
    """client ── gateway ── MTA, see the module docstring."""

    CLIENT4, GW_C4, GW_M4, MTA4 = "10.77.1.2", "10.77.1.1", "10.77.2.1", "10.77.2.2"
    CLIENT6, GW_C6, GW_M6, MTA6 = "fd77:1::2", "fd77:1::1", "fd77:2::1", "fd77:2::2"

    def __init__(self, cleanup):
        self.client = new_ns_name("c")
        self.gw = new_ns_name("g")
        self.mta = new_ns_name("m")
        for ns in (self.client, self.gw, self.mta):
            ip("netns", "add", ns)
            cleanup.push(f"namespace {ns}", lambda ns=ns: delete_ns(ns))
            ip("link", "set", "lo", "up", ns=ns)
        ip("link", "add", "c0", "type", "veth", "peer", "name", "g0", "netns", self.gw, ns=self.client)
        ip("link", "add", "g1", "type", "veth", "peer", "name", "m0", "netns", self.mta, ns=self.gw)
        for ns, dev, a4, a6 in (
            (self.client, "c0", self.CLIENT4, self.CLIENT6),
            (self.gw, "g0", self.GW_C4, self.GW_C6),
            (self.gw, "g1", self.GW_M4, self.GW_M6),
            (self.mta, "m0", self.MTA4, self.MTA6),
        ):
            in_ns(ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0")
            ip("addr", "add", f"{a4}/24", "dev", dev, ns=ns)
            ip("-6", "addr", "add", f"{a6}/64", "dev", dev, "nodad", ns=ns)
            ip("link", "set", dev, "up", ns=ns)
        ip("route", "add", "default", "via", self.GW_C4, ns=self.client)
        ip("-6", "route", "add", "default", "via", self.GW_C6, ns=self.client)
        ip("route", "add", "default", "via", self.GW_M4, ns=self.mta)
        ip("-6", "route", "add", "default", "via", self.GW_M6, ns=self.mta)
        in_ns(self.gw, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
              "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
              "net.ipv4.conf.g0.rp_filter=0", "net.ipv4.conf.g1.rp_filter=0")

    def addrs(self, family: int):
        """(client, gateway client-side, gateway MTA-side, MTA) for 4 or 6."""
        if family == 4:
            return self.CLIENT4, self.GW_C4, self.GW_M4, self.MTA4
        return self.CLIENT6, self.GW_C6, self.GW_M6, self.MTA6

    def redirect(self, port: int) -> None:
        """iptables REDIRECT of client traffic to port 25 onto the guard."""
        for tool in ("iptables", "ip6tables"):
            in_ns(self.gw, tool, "-t", "nat", "-A", "PREROUTING", "-i", "g0", "-p", "tcp", "--dport", "25",
                  "-j", "REDIRECT", "--to-ports", str(port))

    def tproxy(self, port: int) -> None:
        """TPROXY of client traffic to port 25 onto the guard, and local
        delivery of the MTA's answers to the guard's source-bound sockets."""
        for tool, ipv, local in (("iptables", "-4", "0.0.0.0/0"), ("ip6tables", "-6", "::/0")):
            in_ns(self.gw, tool, "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-m", "socket", "--transparent",
                  "-j", "MARK", "--set-mark", "1")
            in_ns(self.gw, tool, "-t", "mangle", "-A", "PREROUTING", "-i", "g0", "-p", "tcp", "--dport", "25",
                  "-j", "TPROXY", "--on-port", str(port), "--tproxy-mark", "1")
            ip(ipv, "rule", "add", "fwmark", "1", "lookup", "100", ns=self.gw)
            ip(ipv, "route", "add", "local", local, "dev", "lo", "table", "100", ns=self.gw)


def syn_answered(ns: str, host: str, port: int, source: str, timeout=1.5) -> bool:
    """Whether a TCP connect from `source` in `ns` gets any answer (SYN-ACK or RST)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with entered(ns):
        s = socket.socket(family, socket.SOCK_STREAM)
    with s:
        s.bind((source, 0))
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            return True
        except ConnectionRefusedError:
            return True
        except (socket.timeout, TimeoutError):
            return False
