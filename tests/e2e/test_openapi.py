"""Schemathesis against docs/api/openapi.yaml and a running guard: every
documented operation, generated inputs (valid and invalid), no 5xx."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from admin_api import TOKEN, api_guard, call
from peers import REPO

SCHEMA = REPO / "docs" / "api" / "openapi.yaml"


@pytest.mark.time_limit(300)
@pytest.mark.skipif(shutil.which("st") is None, reason="schemathesis not installed (tests/install-deps.sh installs it)")
def test_schemathesis_finds_no_server_error(sink, make_guard, workdir):
    guard = api_guard(make_guard, workdir, sink.addr, **{"quarantine.dir": str(workdir / "quarantine")})
    argv = ["st", "run", str(SCHEMA), "--url", f"http://{guard.admin}",
            "-H", f"Authorization: Bearer {TOKEN}",
            "--checks", "not_a_server_error",
            # Bounded: a few examples per operation and phase, fixed seed.
            "--max-examples", "15", "--seed", "5", "--request-timeout", "10",
            "--report", "junit", "--report-dir", str(workdir / "schemathesis")]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL,
                         env={"NO_COLOR": "1", "SCHEMATHESIS_HOOKS": "", "PATH": "/usr/bin:/bin:" + shutil.which("st").rsplit("/", 1)[0]})
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    import re
    generated = re.search(r"(\d+) generated, (\d+) passed", out.stdout)
    assert generated and int(generated[1]) >= 100 and generated[1] == generated[2], tail
    # The guard survived it and still serves.
    assert call(guard, "GET", "/healthz", token=None)[0] == 200
    m = guard.metrics()
    assert not [k for k, v in m.items() if k.startswith("mxguard_admin_requests_total") and 'code="5' in k and v], m
