"""A real Prometheus (Debian's package) scrapes a running guard while
scripted traffic runs; every PromQL expression of the Grafana dashboard
and of the alert rules must return data, and the rules must pass
`promtool check rules` and their unit tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from peers import CLEANUP, REPO, Proc, RawClient, free_port, make_message, smtplib_send, wait_until

DASHBOARD = REPO / "grafana" / "dashboards" / "mxguard.json"
RULES = REPO / "grafana" / "alerts" / "mxguard-rules.yml"
RULE_TESTS = REPO / "grafana" / "alerts" / "mxguard-rules.test.yml"

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                reason="prometheus/promtool not installed (tests/install-deps.sh installs them)")


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    import yaml  # PyYAML comes with schemathesis (tests/install-deps.sh)
    doc = yaml.safe_load(RULES.read_text())
    return [(r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables as a query for the whole test run would set them."""
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
            .replace('instance=~"$instance"', 'instance=~".*"'))


def _top_level_split(expr: str, pattern: str) -> list[str]:
    """Splits `expr` where `pattern` matches outside parentheses/brackets/braces."""
    parts, depth, last, i = [], 0, 0, 0
    rx = re.compile(pattern)
    while i < len(expr):
        c = expr[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            m = rx.match(expr, i)
            if m:
                parts.append(expr[last:i])
                last = i = m.end()
                continue
        i += 1
    parts.append(expr[last:])
    return [p.strip() for p in parts if p.strip()]


def alert_operands(expr: str) -> list[str]:
    """The vector operands of an alert expression: split at `and`/`or`/
    `unless` (with their `on (...)`), then at comparisons; numbers dropped.
    An alert's full expression is empty while it does not fire, so it is
    its operands that must have data."""
    out = []
    for part in _top_level_split(" ".join(expr.split()), r"\s+(?:and|or|unless)(?:\s+on\s*\([^)]*\))?\s+"):
        for side in _top_level_split(part, r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?"):
            if not re.fullmatch(r"[0-9.e+-]+", side):
                out.append(side)
    return out


class Prometheus:
    def __init__(self, workdir, target: str, rules):
        self.dir = workdir / "prometheus"
        self.dir.mkdir(exist_ok=True)
        self.port = free_port()
        config = self.dir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {rules}\n"
            "scrape_configs:\n  - job_name: mxguard\n    static_configs:\n"
            f"      - targets: ['{target}']\n")
        argv = ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        self.proc = Proc("prometheus", argv, self.dir)
        wait_until(self.ready, 30, "prometheus ready")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def get(self, path: str, **params):
        url = f"http://127.0.0.1:{self.port}{path}?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def query(self, expr: str):
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]


def test_promtool_checks_and_unit_tests_the_rules():
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dashboard_is_a_well_formed_grafana_model():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["title"] and p.get("description"), p
        assert p["datasource"]["uid"] == "${datasource}"
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["targets"], p["title"]
    # Every panel is listed in docs/runbook.md.
    ops = (REPO / "docs" / "runbook.md").read_text()
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["title"] in ops, f"panel {p['title']!r} is not described in docs/runbook.md"


@pytest.mark.time_limit(120)
def test_every_dashboard_and_alert_expression_returns_data(sink, make_guard, workdir):
    guard = make_guard(upstream=sink.addr, **{
        "greet.delay": "200ms", "greet.connect_lead": "100ms",
        # A small per-address bucket, so the burst below is limited.
        "admission.per_address.rate": 0.2, "admission.per_address.burst": 3,
    })
    prom = Prometheus(workdir, guard.admin, RULES)
    CLEANUP.push("prometheus", prom.proc.stop)

    # Scripted traffic: clean deliveries, early talkers (caught, then
    # blocked on their return), a burst over the per-address limit.
    for i in range(6):
        smtplib_send(guard.host, guard.port, make_message(), source=f"127.0.3.{i + 1}")
    for i in range(4):
        early = RawClient(guard.host, guard.port, source=f"127.0.4.{i + 1}")
        early.send(b"EHLO too.early.example\r\n")
        early.read_until_closed(timeout=5)
    again = RawClient(guard.host, guard.port, source="127.0.4.1")
    assert again.read_reply().code == 554
    for _ in range(5):
        c = RawClient(guard.host, guard.port, source="127.0.5.1")
        c.close()
    sink.wait_messages(6)
    wait_until(lambda: guard.metric("mxguard_connections_total", outcome="blocked") >= 1, 5, "blocked counted")

    # Prometheus has samples from before and after the traffic.
    def scraped():
        r = prom.query('sum(mxguard_connections_total{job="mxguard"})')
        return r and float(r[0]["value"][1]) >= 16
    wait_until(scraped, 30, "prometheus scraped the traffic")
    time.sleep(3)

    missing = []
    for title, expr in dashboard_exprs():
        if not prom.query(grafana_to_promql(expr)):
            missing.append(f"dashboard {title!r}: {expr}")
    for alert, expr in rule_exprs():
        assert prom.query(" ".join(expr.split())) is not None  # valid PromQL
        for operand in alert_operands(expr):
            if not prom.query(operand):
                missing.append(f"alert {alert}: {operand}")
    assert not missing, "expressions without data:\n" + "\n".join(missing)

    # Prometheus loaded the rules and evaluates them without error.
    groups = prom.get("/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} == {a for a, _ in rule_exprs()}
    wait_until(lambda: all(r["health"] == "ok" for g in prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]),
               10, "rules evaluated")
