"""The systemd side: the units pass `systemd-analyze verify`, the daemon
speaks sd_notify (READY=1 after its listeners are bound, WATCHDOG=1 pings,
RELOADING=1/READY=1 around a reload, STOPPING=1), and it runs with only
the two capabilities the unit grants."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import subprocess
import time

import pytest

import guard as guard_mod
from peers import REPO, free_port, listening_ports, make_message, smtplib_send, wait_until

UNITS = ["mxguard.service", "mxguard-intercept.service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(workdir):
    # The unit names /usr/bin/mxguard; verify checks that the binary
    # exists, so point a copy at the one under test.
    for unit in UNITS:
        text = (REPO / "systemd" / unit).read_text().replace("/usr/bin/mxguard", guard_mod.binary())
        (workdir / unit).write_text(text)
    # The sk_lookup drop-in, as systemd merges it: its lines after the unit's.
    dropin = (REPO / "systemd" / "sk-lookup.conf").read_text()
    assert "[Service]" in dropin
    service_lines = dropin.split("[Service]", 1)[1]
    (workdir / "mxguard-sk-lookup.service").write_text(
        (workdir / "mxguard.service").read_text().replace("[Install]", service_lines + "\n[Install]"))
    units = [*UNITS, "mxguard-sk-lookup.service"]
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *[str(workdir / u) for u in units]],
                         capture_output=True, text=True, timeout=60, cwd=workdir)
    assert out.returncode == 0 and not out.stderr.strip(), out.stdout + out.stderr
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=30",
                          str(workdir / "mxguard.service")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Overall exposure level for mxguard.service" in out.stdout
    for conf in ("mxguard.sysusers.conf", "mxguard.tmpfiles.conf"):
        assert (REPO / "systemd" / conf).read_text().strip()


def _datagrams(sock: socket.socket, until: float) -> list[str]:
    out = []
    sock.settimeout(0.1)
    while time.monotonic() < until:
        try:
            out.append(sock.recv(4096).decode())
        except socket.timeout:
            continue
    return out


def test_sd_notify_ready_watchdog_reload_and_stop(sink, make_guard, workdir, monkeypatch):
    # sun_path holds 108 bytes: a deep checkout's work directory may not fit.
    path = os.path.join(tempfile.mkdtemp(prefix="mxg-notify-", dir="/tmp"), "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    guard = make_guard(upstream=sink.addr, start=False)
    guard.start()
    messages = _datagrams(sock, time.monotonic() + 1.0)
    ready = [m for m in messages if "READY=1" in m]
    assert ready and "STATUS=listening on" in ready[0], messages
    # READY=1 came after the listener was bound: a client gets served.
    smtplib_send(guard.host, guard.port, make_message(), source="127.0.0.91")
    assert sum("WATCHDOG=1" in m for m in messages) >= 3, messages

    guard.signal(signal.SIGHUP)
    messages = _datagrams(sock, time.monotonic() + 0.6)
    states = [m for m in messages if "WATCHDOG" not in m]
    assert states[:2] == ["RELOADING=1", "READY=1"], messages
    guard.stop()
    assert "STOPPING=1" in _datagrams(sock, time.monotonic() + 0.3)
    sock.close()


def test_without_notify_socket_nothing_is_sent_and_it_runs(sink, make_guard, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    guard = make_guard(upstream=sink.addr)
    smtplib_send(guard.host, guard.port, make_message(), source="127.0.0.92")
    sink.wait_messages(1)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_runs_on_port_25_with_only_the_units_capabilities(sink, make_guard, workdir):
    """What the unit grants (User=nobody here, CAP_NET_BIND_SERVICE and
    CAP_NET_ADMIN ambient, NoNewPrivileges) is enough to bind port 25."""
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", 25))
    except OSError:
        pytest.skip("127.0.0.1:25 is taken")
    finally:
        probe.close()
    state = workdir / "nobody-state"
    state.mkdir()
    os.chmod(state, 0o777)
    guard = make_guard(upstream=sink.addr, listen=["127.0.0.1:25"], start=False, **{"state.dir": str(state)})
    os.chmod(guard.workdir, 0o755)
    os.chmod(guard.config_path, 0o644)
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all,+net_bind_service,+net_admin", "--ambient-caps=-all,+net_bind_service,+net_admin",
            "--bounding-set=-all,+net_bind_service,+net_admin",
            guard_mod.binary(), "run", "--config", str(guard.config_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: 25 in listening_ports(proc.pid) or proc.poll() is not None, 10, "listening on 25")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        smtplib_send("127.0.0.1", 25, make_message(), source="127.0.0.93")
        sink.wait_messages(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
