"""Out of descriptors: accept(2) fails with EMFILE. The guard must neither
spin on the listener nor lose it; once descriptors free up it serves again.
"""

import os
import socket
import subprocess
import time

from peers import lf, make_message, smtplib_send, wait_until

FD_LIMIT = 64



def assert_not_spinning(guard):
    """While out of descriptors the guard backs off: a second of wall time
    costs it well under half a second of CPU."""
    before = cpu_seconds(guard.pid)
    time.sleep(1.0)
    spent = cpu_seconds(guard.pid) - before
    assert spent < 0.5, f"{spent:.2f}s of CPU in 1s while out of descriptors: spinning"

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def test_descriptor_exhaustion_backs_off_and_recovers(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "2s"})
    # The guard raised its soft limit to the hard one at start; squeeze both.
    subprocess.run(["prlimit", "--pid", str(guard.pid), f"--nofile={FD_LIMIT}:{FD_LIMIT}"], check=True)

    held = []
    for i in range(FD_LIMIT + 20):
        s = socket.socket()
        s.settimeout(5)
        s.bind((f"127.0.0.{10 + i % 200}", 0))
        s.connect(("127.0.0.1", guard.port))  # completes in the kernel's backlog
        held.append(s)

    # The clients beyond the limit are not left hanging in the backlog: the
    # guard spends its spare descriptor to tell each 421 (try later).
    turned_away = 0
    for s in held[-10:]:
        try:
            data = s.recv(200)
        except socket.timeout:
            continue
        if data.startswith(b"421 4.3.2 "):
            turned_away += 1
    assert turned_away >= 5, f"only {turned_away} of the last 10 clients heard 421"

    # While the listener cannot accept, the guard backs off instead of
    # spinning: a second of wall time costs it well under half a second of CPU.
    assert_not_spinning(guard)

    for s in held:
        s.close()
    # Every backlogged connection gets accepted and ends (hang-ups); then
    # a real client is served as usual.
    wait_until(lambda: guard.metric("mxguard_sessions_active", phase="greet") == 0, 20,
               "the backlog drained")
    assert guard.metric("mxguard_accept_errors_total", kind="emfile") > 0
    msg = make_message()
    smtplib_send("127.0.0.1", guard.port, msg, source="127.0.0.3")
    stored = sink.wait_messages(1)
    assert stored[-1].content == lf(msg.data)
    guard.assert_no_panic()
    assert guard.alive()


def test_admin_listener_out_of_descriptors_backs_off_quietly_and_recovers(sink, make_guard):
    # Long enough that the held sessions keep every descriptor for the test.
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "30s"})
    subprocess.run(["prlimit", "--pid", str(guard.pid), f"--nofile={FD_LIMIT}:{FD_LIMIT}"], check=True)
    host, _, port = guard.admin.rpartition(":")
    admin = (host.strip("[]"), int(port))

    held = []
    for i in range(FD_LIMIT + 20):
        s = socket.socket()
        s.settimeout(5)
        s.bind((f"127.0.0.{10 + i % 200}", 0))
        s.connect(("127.0.0.1", guard.port))
        held.append(s)
    # Out of descriptors: the mail listener turns its overflow away.
    turned_away = 0
    for s in held[-10:]:
        try:
            turned_away += s.recv(200).startswith(b"421 ")
        except socket.timeout:
            pass
    assert turned_away >= 5, "the guard never ran out of descriptors"

    # Operators (or a monitoring system) knock on the admin port meanwhile:
    # every accept fails with EMFILE while they wait in the backlog.
    waiting = []
    for _ in range(3):
        s = socket.socket()
        s.settimeout(15)
        s.connect(admin)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: mxguard\r\nConnection: close\r\n\r\n")
        waiting.append(s)

    def admin_failure_lines() -> int:
        return sum("admin accept failed" in line for line in guard.log_lines())

    time.sleep(0.5)
    lines_before = admin_failure_lines()
    cpu_before = cpu_seconds(guard.pid)
    time.sleep(2.0)
    spent = cpu_seconds(guard.pid) - cpu_before
    logged = admin_failure_lines() - lines_before
    # The first of the burst is logged, not one line per failed accept.
    assert logged <= 1, f"{logged} admin accept failures logged in 2s: flooding"
    assert admin_failure_lines() >= 1, "the burst's first failure is logged"
    assert spent < 1.0, f"{spent:.2f}s of CPU in 2s while out of descriptors: spinning"

    # Descriptors come back: the waiting admin clients are served.
    for s in held:
        s.close()
    for s in waiting:
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
    wait_until(lambda: guard.metric("mxguard_sessions_active", phase="greet") == 0, 20,
               "the held sessions ended")
    assert guard.metric("mxguard_accept_errors_total", kind="emfile") > 0
    guard.assert_no_panic()
    assert guard.alive()


def flood(port: int, n: int, first: int = 0) -> list[socket.socket]:
    """n connections that complete in the kernel's backlog, from many addresses."""
    out = []
    for i in range(first, first + n):
        s = socket.socket()
        s.settimeout(3)
        s.bind((f"127.0.{1 + i // 200}.{10 + i % 200}", 0))
        s.connect(("127.0.0.1", port))
        out.append(s)
    return out


def heard_421(socks: list[socket.socket]) -> int:
    n = 0
    for s in socks:
        try:
            n += s.recv(200).startswith(b"421 4.3.2 ")
        except (socket.timeout, ConnectionError):
            pass
    return n


def test_every_session_thread_keeps_its_spare_descriptor_through_floods(sink, make_guard):
    # Four session threads share the process's descriptor table. A spare
    # one thread closes to turn a client away must not be taken by another
    # thread's accept (a session that then holds it for the greet delay):
    # each loss was for good, until no thread could answer the backlog.
    guard = make_guard(upstream=sink.addr, **{"greet.delay": "30s", "intercept.workers": 4})
    subprocess.run(["prlimit", "--pid", str(guard.pid), f"--nofile={FD_LIMIT}:{FD_LIMIT}"], check=True)

    held = flood(guard.port, FD_LIMIT + 20)
    assert heard_421(held[-10:]) >= 5, "the first overflow was not turned away"
    # The flood goes on while every descriptor is taken: wave after wave,
    # the backlog is still answered.
    for wave in range(5):
        time.sleep(0.3)
        socks = flood(guard.port, 20, first=200 + 20 * wave)
        held += socks
        got = heard_421(socks)
        assert got >= 15, f"wave {wave}: only {got} of 20 heard 421 (spares lost)"

    assert_not_spinning(guard)

    for s in held:
        s.close()
    wait_until(lambda: guard.metric("mxguard_sessions_active", phase="greet") == 0, 20, "the backlog drained")
    msg = make_message()
    smtplib_send("127.0.0.1", guard.port, msg, source="127.0.0.3")
    assert sink.wait_messages(1)[-1].content == lf(msg.data)

    # A second flood: every thread has its spare back.
    held = flood(guard.port, FD_LIMIT + 20, first=400)
    socks = flood(guard.port, 20, first=600)
    got = heard_421(socks)
    for s in held + socks:
        s.close()
    assert got >= 15, f"after the first flood only {got} of 20 heard 421"
    guard.assert_no_panic()
    assert guard.alive()
