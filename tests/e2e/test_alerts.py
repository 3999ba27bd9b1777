"""The operator kit: the alert rules are valid and unit-tested, and the alerts, the
dashboard and the operations guide agree with the metrics smart exports."""

from __future__ import annotations

import json
import re
import subprocess

from prometheus_client import CollectorRegistry

from smart.observability.metrics import Metrics
from tests.e2e.prometheus_tools import require
from tests.support import ROOT

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "smart-dashboard.json"
#: promtool evaluates a few hours of synthetic series in well under a second.
PROMTOOL_TIMEOUT_S = 60
_METRIC = re.compile(r"\bsmart_[a-z_]+")


def exported_names() -> set[str]:
    """Every sample name smart's metrics produce (``_total``, ``_bucket``…)."""
    registry = CollectorRegistry()
    Metrics(registry, attempts_per_request=3)
    return {sample.name for family in registry.collect() for sample in family.samples}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )


def test_the_alert_rules_are_valid() -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_fires_when_it_should_and_stays_quiet_otherwise() -> None:
    tested = promtool("test", "rules", str(ALERTS_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\w+)", ALERTS.read_text(), flags=re.M))
    tested = set(re.findall(r"alertname: (\w+)", ALERTS_TEST.read_text()))
    assert alerts
    assert alerts <= tested, f"untested alerts: {sorted(alerts - tested)}"


def test_alerts_and_dashboard_query_only_metrics_smart_exports() -> None:
    exported = exported_names()
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert queries
    for source, text in [("alerts.yml", ALERTS.read_text()), *(("dashboard", q) for q in queries)]:
        for name in _METRIC.findall(text):
            assert name in exported, f"{source} uses {name}, which smart does not export"


def test_every_dashboard_panel_queries_the_chosen_data_source_and_jobs() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            for selector in re.findall(r"smart_[a-z_]+(\{[^}]*\})", target["expr"]):
                assert 'job=~"$job"' in selector, (panel["title"], target["expr"])


def test_every_metric_is_documented_in_the_operations_guide() -> None:
    guide = (ROOT / "docs" / "OPERATIONS.md").read_text()
    registry = CollectorRegistry()
    Metrics(registry, attempts_per_request=3)
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in guide, f"{name} is not in docs/OPERATIONS.md"
