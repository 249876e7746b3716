"""Session threads (`intercept.workers`): each thread listens on its own
`SO_REUSEPORT` socket per address and serves the sessions it accepts; the
kernel spreads clients over them, every message arrives, and each thread
does a share of the work."""

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from peers import make_message, smtplib_send, wait_until


def listeners(port: int) -> int:
    """Listening TCP sockets on `port` (all processes)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], check=True,
                         capture_output=True, text=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


def threads(pid: int) -> dict[str, int]:
    """Thread name -> nanoseconds it has run (schedstat), for the guard's
    threads."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = (task / "comm").read_text().strip()
        ran = int((task / "schedstat").read_text().split()[0])
        out[name] = out.get(name, 0) + ran
    return out


def test_each_session_thread_listens_and_serves_its_share(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"intercept.workers": 3, "greet.delay": "0s",
                                              "greet.challenge": False})
    assert listeners(guard.port) == 3, "one listening socket per session thread"
    before = threads(guard.pid)
    workers = sorted(n for n in before if n.startswith("mxguard-sess"))
    assert workers == ["mxguard-sess0", "mxguard-sess1", "mxguard-sess2"], before.keys()

    n = 90
    msgs = [make_message(sender=f"user{i}@sender.example.test") for i in range(n)]
    # Many source addresses and ports: the kernel's hash spreads them.
    sources = [f"127.0.{2 + i % 50}.{1 + i // 50}" for i in range(n)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda a: smtplib_send("127.0.0.1", guard.port, a[0], source=a[1]),
                                zip(msgs, sources)))
    assert all(r["refused"] == {} for r in results)
    stored = sink.wait_messages(n, timeout=30)
    assert len(stored) == n, "every message arrived"
    wait_until(lambda: guard.metric("mxguard_connections_total", outcome="pass") == n, 5,
               "every session counted")

    after = threads(guard.pid)
    ran = {w: after[w] - before[w] for w in workers}
    # Each thread accepted and served some of the 90 sessions (a thread that
    # got none would have run only its idle loop: next to nothing).
    assert all(ns > 200_000 for ns in ran.values()), ran


def test_one_worker_is_one_plain_listener(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"intercept.workers": 1, "greet.delay": "0s",
                                              "greet.challenge": False})
    assert listeners(guard.port) == 1
    assert smtplib_send("127.0.0.1", guard.port, make_message())["refused"] == {}
    assert len(sink.wait_messages(1)) == 1
