"""Out of descriptors: accept(2) fails with EMFILE. The guard must neither
spin on the listener nor lose it; once descriptors free up it serves again.
"""

import os
import socket
import subprocess
import time

from peers import lf, make_message, smtplib_send, wait_until

FD_LIMIT = 64


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
    before = cpu_seconds(guard.pid)
    time.sleep(1.0)
    spent = cpu_seconds(guard.pid) - before
    assert spent < 0.5, f"{spent:.2f}s of CPU in 1s while out of descriptors: spinning"

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
