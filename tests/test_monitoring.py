"""The Prometheus scrape config and the Grafana dashboard in deploy/.

The dashboard's queries may name only metrics the programs export: the names are read from
the metric objects in ``neuron/metrics.py`` and ``cortex/metrics.py``, with
the suffixes prometheus-client adds (``_total``, ``_bucket``, ...). Every query must also
parse as PromQL: promtool checks them as recording rules.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from tests.harness import ROOT
from tests.packages import require_tools

DASHBOARD = ROOT / "deploy/grafana/helexa.json"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
# PromQL words the queries may use that are not metrics: functions, keywords, label names, and
# Prometheus's own `up`.
PROMQL_WORDS = {
    "sum", "count", "max", "min", "avg", "rate", "increase", "histogram_quantile", "by",
    "without", "on", "ignoring", "group_left", "le", "model", "instance", "device",
    "finish_reason", "result", "job", "up", "route", "status", "neuron", "reason", "code", "kind",
}  # fmt: skip
PANELS = [
    "Requests per second", "Time to first token", "Inter-token latency", "Tokens per second",
    "Queue depth", "Neurons up", "Models loaded", "Device memory used",
    "Gateway requests per second", "Gateway time to first token", "Gateway request duration",
    "Neurons up (as cortex sees them)", "Placements and evictions", "Retries and rejections",
]  # fmt: skip
LATENCY_PANELS = [
    "Time to first token", "Inter-token latency", "Gateway time to first token",
    "Gateway request duration",
]  # fmt: skip


def exported_names(module: str) -> set[str]:
    names = set()
    for obj in vars(importlib.import_module(module)).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every query in the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def as_promql(expr: str) -> str:
    """A Grafana query with its variables replaced, as Prometheus would receive it."""
    return expr.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$model", ".*")


def test_prometheus_config_passes_promtool() -> None:
    require_tools("promtool")
    done = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_each_tier_on_its_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs: dict[str, Any] = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"helexa-cortex", "helexa-neuron"}
    for job, port in (("helexa-cortex", "31314"), ("helexa-neuron", "13132")):
        targets = [t for sc in jobs[job]["static_configs"] for t in sc["targets"]]
        assert targets and all(t.endswith(f":{port}") for t in targets)


def test_dashboard_has_the_operator_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert set(PANELS) <= set(titles)
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(titles)
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]


def test_dashboard_latency_percentiles_come_from_histogram_buckets() -> None:
    for title in LATENCY_PANELS:
        panel = [expr for t, expr in dashboard_queries() if t == title]
        assert {re.search(r"histogram_quantile\((0\.\d+)", e)[1] for e in panel} == {  # type: ignore[index]
            "0.5",
            "0.9",
            "0.99",
        }
        assert all("_bucket{" in e and "by (le)" in e for e in panel)
    tokens = [expr for t, expr in dashboard_queries() if t == "Tokens per second"]
    assert any("rate(helexa_neuron_generation_tokens_total{" in e for e in tokens)


def test_dashboard_names_only_metrics_that_exist() -> None:
    exported = exported_names("neuron.metrics") | exported_names("cortex.metrics")
    assert "helexa_neuron_time_to_first_token_seconds_bucket" in exported
    for title, expr in dashboard_queries():
        bare = re.sub(r'"[^"]*"', "", as_promql(expr))  # label values
        bare = re.sub(r"\[[^\]]*\]", "", bare)  # range durations
        bare = re.sub(r"\b\d+(\.\d+)?\b", "", bare)
        words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare))
        unknown = words - PROMQL_WORDS - exported
        assert not unknown, f"panel {title!r} names {unknown}: not exported by neuron or cortex"


def test_dashboard_shows_every_gateway_metric() -> None:
    """Each metric cortex exports is on some panel: the gateway row is complete."""
    queries = " ".join(expr for _, expr in dashboard_queries())
    used = set(re.findall(r"helexa_gateway_[a-z_]+", queries))
    families = {name.removesuffix("_total").removesuffix("_bucket") for name in used}
    exported = {
        family.name
        for obj in vars(importlib.import_module("cortex.metrics")).values()
        if isinstance(obj, MetricWrapperBase)
        for family in obj.describe()
    }
    assert exported == families


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    require_tools("promtool")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": as_promql(expr)}
                    for i, (_, expr) in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("variable", ["datasource", "instance", "model"])
def test_dashboard_variables_are_defined(variable: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert variable in {v["name"] for v in dashboard["templating"]["list"]}
