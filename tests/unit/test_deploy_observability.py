"""deploy/: the Prometheus alert rules pass `promtool check rules` and their unit tests,
the scrape config is valid, the dashboard and the collector config are well formed.

promtool comes from the Debian package `prometheus` (.ci/run installs it). In CI a missing
promtool is a failure; locally (CI unset) the promtool tests skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent.parent
DEPLOY = REPO / "deploy"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs the Debian package prometheus")
        pytest.skip("promtool not installed (apt-get install prometheus); CI requires it")
    return path


def _run(*args: str) -> str:
    done = subprocess.run(
        [_promtool(), *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_alert_rules_pass_promtool_check() -> None:
    out = _run("check", "rules", "alerts.yml")
    assert "SUCCESS: 13 rules found" in out


def test_alert_rules_unit_tests_pass() -> None:
    assert "SUCCESS" in _run("test", "rules", "alerts_test.yml")


def test_a_broken_rule_fails_the_check(tmp_path: Path) -> None:
    """The check above can fail: a rule with a bad expression is refused."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: rate(mail_x[5m]\n"
    )
    done = subprocess.run(
        [_promtool(), "check", "rules", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0


def test_prometheus_config_is_valid() -> None:
    _run("check", "config", "prometheus.yml")


def test_every_alert_has_a_runbook_section_and_thresholds_are_documented() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    runbook = (REPO / "RUNBOOK.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", runbook, re.M)
    }
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert len(alerts) == 13
    for rule in alerts:
        link = rule["annotations"]["runbook"]
        assert link.startswith("RUNBOOK.md#") and link.split("#")[1] in anchors, link
        assert f"`{rule['alert']}`" in runbook, rule["alert"]


def test_dashboard_panels_query_maildaemon_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "maildaemon.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in ("Throughput", "outcomes", "backlog", "Dead letters", "Malformed", "latency"):
        assert any(wanted.lower() in t.lower() for t in titles), wanted
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert re.search(r"\bmail_[a-z_]+", target["expr"]), target


def test_collector_config_wires_defined_components() -> None:
    config = yaml.safe_load((DEPLOY / "otel-collector" / "config.yaml").read_text())
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics"}
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            for name in pipeline[kind]:
                assert name in config[kind], (kind, name)
    assert "otlp" in pipelines["traces"]["receivers"]
    assert {"grpc", "http"} <= set(config["receivers"]["otlp"]["protocols"])
