"""Fixtures for the end-to-end suite: a work directory per test, real peers,
guard factory, namespaces, cleanup (even on failure) and a per-test time
limit so nothing can hang the run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

import guard as guard_mod
import netns
import peers
from peers import CLEANUP, REPO

# Postfix and smtp-sink drop privileges and must be able to walk into the
# directories the tests create, whatever umask the caller has.
os.umask(0o022)


def _work_base() -> Path:
    """tests/.work, unless the postfix user could not walk into it (a checkout
    under /root, say): smtp-sink and Postfix write there after dropping
    privileges."""
    if os.environ.get("MXGUARD_E2E_WORK"):
        return Path(os.environ["MXGUARD_E2E_WORK"])
    base = REPO / "tests" / ".work"
    for d in (REPO / "tests", *(REPO / "tests").parents):
        if not os.stat(d).st_mode & 0o001:
            return Path("/tmp/mxguard-e2e")
    return base


RUN_DIR = _work_base() / time.strftime(f"run-%Y%m%d-%H%M%S-{netns.RUN_TAG}")
DEFAULT_TIME_LIMIT = 60.0


class TimeLimitExceeded(Exception):
    pass


def pytest_configure(config):
    config.addinivalue_line("markers", "time_limit(seconds): per-test wall clock limit (default 60)")


KEEP_RUNS = 5


def _prune_old_runs(base: Path) -> None:
    """Keep the last few runs' files (logs, dumps, maillogs) for post-mortems."""
    runs = sorted(p for p in base.glob("run-*") if p.is_dir() and p != RUN_DIR)
    for old in runs[: max(0, len(runs) - (KEEP_RUNS - 1))]:
        tag = old.name.rsplit("-", 1)[-1]
        shutil.rmtree(Path(f"/tmp/mxg-{tag}"), ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def pytest_sessionstart(session):
    _prune_old_runs(RUN_DIR.parent)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    # Postfix and smtp-sink drop privileges; they must be able to walk in.
    for d in (RUN_DIR, RUN_DIR.parent):
        os.chmod(d, 0o755)
    latest = RUN_DIR.parent / "latest"
    if latest.is_symlink() or not latest.exists():
        if latest.is_symlink():
            latest.unlink()
        latest.symlink_to(RUN_DIR.name)


def pytest_sessionfinish(session, exitstatus):
    CLEANUP.run_all()
    for ns in netns.leftover_namespaces():
        netns.delete_ns(ns)


def pytest_report_header(config):
    return [f"e2e work directory: {RUN_DIR}", f"mxguard binary: {os.environ.get('MXGUARD_BIN') or REPO / 'target/debug/mxguard'}"]


@pytest.fixture
def workdir(request) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:90]
    d = RUN_DIR / name
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    return d


@pytest.fixture(autouse=True)
def _limits_and_cleanup(request):
    """Per-test wall-clock limit (SIGALRM interrupts blocking socket calls)
    and cleanup of every process, socket and namespace the test started."""
    marker = request.node.get_closest_marker("time_limit")
    limit = marker.args[0] if marker else DEFAULT_TIME_LIMIT

    def on_alarm(signum, frame):
        raise TimeLimitExceeded(f"test exceeded its {limit}s time limit")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    guard_mod.STARTED.clear()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        errors = CLEANUP.run_all()
        for err in errors:
            print(err)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for g in guard_mod.STARTED:
            report.sections.append((f"mxguard log ({g.name}, {g.workdir})", g.log()[-6000:]))


@pytest.fixture
def sink(workdir) -> peers.SmtpSink:
    """smtp-sink on a free loopback port, dumping every transaction."""
    return peers.SmtpSink(workdir)


@pytest.fixture
def mta(workdir) -> peers.PostfixMta:
    """A real Postfix accepting mail for example.test into a Maildir, with
    STARTTLS (self-signed)."""
    return peers.PostfixMta(workdir)


@pytest.fixture
def make_guard(workdir):
    """Factory: make_guard(upstream=ADDR, **{"greet.delay": "1s"}) -> running
    Guard. At the end of the test every guard still running is stopped with
    SIGTERM and must exit 0 without a panic."""
    made = []

    def make(upstream=None, **kw):
        kw.setdefault("name", f"guard{len(made) + 1}" if made else "guard")
        g = guard_mod.Guard(workdir, upstream=upstream, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        if g.proc is not None and g.alive():
            g.stop()
        elif g.proc is not None:
            g.assert_no_panic()


@pytest.fixture
def topo():
    """client ns -- gateway ns -- MTA ns (see netns.py)."""
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return netns.Topology(CLEANUP)
