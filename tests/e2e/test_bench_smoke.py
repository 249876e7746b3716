"""The benchmark suite (`make bench`, bench/run.py) in miniature, so that it
cannot rot: every section but the criterion ones, with tiny counts, against
the debug builds, one run each. Figures are not checked, only that each
comparison ran and every held session was held."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from peers import REPO


def test_the_benchmark_suite_runs_end_to_end(tmp_path):
    if not shutil.which("haproxy"):
        pytest.skip("haproxy not installed (bench/install-deps.sh installs it)")
    mxbench = REPO / "target" / "debug" / "mxbench"
    if not mxbench.exists():
        subprocess.run(["cargo", "build", "-p", "mxguard-bench"], cwd=REPO, check=True)
    out = tmp_path / "benchmarks.md"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = out.read_text()
    for heading in ("## Machine", "## Held sessions", "## Connection rate", "## Added latency",
                    "## Bulk throughput", "## Kernel bypass for passed clients", "## Targets", "## Commands"):
        assert heading in report, f"{heading} missing:\n{report}"
    # Every server held all of the smoke run's sessions.
    held = re.findall(r"^\| 100 \| (\S+) \| (\S+) \|", report, re.M)
    assert {name for name, _ in held} == {"mxguard", "postscreen", "haproxy"}, report
    assert all(count == "100" for _, count in held), report
    # Segments per message, counted for every path of the rate table.
    rate = report.split("## Connection rate")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (direct|mxguard[^|]*|HAProxy[^|]*) \| [\d,]+ \| \S+ \| ([\d.]+) \|", rate, re.M)
    assert len(rows) == 4 and all(float(segs) > 0 for _, segs in rows), rate
    # Every latency path ran all its sessions; the delayed one is measured
    # against the direct client that waits as long.
    latency = report.split("## Added latency")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (direct[^|]*|mxguard[^|]*|HAProxy[^|]*) \| ([\d,]+) \| 0 \|", latency, re.M)
    assert {path for path, _ in rows} >= {
        "direct", "direct, the client waiting 100 ms before the greeting", "mxguard, greet delay 100 ms"}, latency
    assert "against a direct client that waits as long" in report
    for path in ("direct", "HAProxy (`mode tcp`, `option splice-auto`)", "mxguard splice"):
        assert path in report
    assert "n/a | n/a | n/a" not in report.split("## Commands")[0].split("## Bulk")[1]
    # The kernel bypass (namespaces, root and nft): no session of the
    # measured run went through the guard, every one of the relayed run did.
    bypass = report.split("## Kernel bypass for passed clients")[1].split("\n## ")[0]
    if "Not measured" not in bypass:
        assert re.search(r"^\| mxguard, `nftables.bypass_passed`, client passed \| [\d,]+ \| \S+ \| 0 \| ", bypass,
                         re.M), bypass
        assert re.search(r"^\| mxguard relaying \(`nftables.redirect`, no bypass\) \| [\d,]+ \| \S+ \| 300 \| ",
                         bypass, re.M), bypass
