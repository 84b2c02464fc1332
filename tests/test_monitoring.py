"""The Prometheus scrape config, the alert rules and the Grafana dashboard in deploy/.

The dashboard's queries may name only metrics the programs export: the names are read from
the metric objects in ``neuron/metrics.py`` and ``cortex/metrics.py``, with
the suffixes prometheus-client adds (``_total``, ``_bucket``, ...). Every query must also
parse as PromQL: promtool checks them as recording rules. The alert rules pass promtool's unit
tests (tests/prometheus/helexa-alerts.test.yml).

Live: Debian's ``prometheus`` scrapes a real cortex and neuron after real traffic, and every
query of the dashboard returns data through its HTTP API; a neuron killed under it is seen
down by the shipped alert, pending before firing.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import (
    DEMO_GGUF,
    ROOT,
    CortexProcess,
    NeuronProcess,
    PrometheusProcess,
    catalogue_model,
    cortex_config,
    endless,
    neuron_config,
    serving,
    until_polled,
)
from tests.packages import require_tools

DASHBOARD = ROOT / "deploy/grafana/helexa.json"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
ALERT_RULES = ROOT / "deploy/prometheus/helexa-alerts.yml"
ALERT_TESTS = ROOT / "tests/prometheus/helexa-alerts.test.yml"
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
    "ALERTS", "alertname", "alertstate", "severity",
}  # fmt: skip
PANELS = [
    "Requests per second", "Time to first token", "Inter-token latency", "Tokens per second",
    "Queue depth", "Neurons up", "Models loaded", "Device memory used",
    "Gateway requests per second", "Gateway time to first token", "Gateway request duration",
    "Neurons up (as cortex sees them)", "Placements and evictions", "Retries and rejections",
    "Alerts",
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


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(ALERT_RULES.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_prometheus_config_loads_the_alert_rules() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == [ALERT_RULES.name]  # beside it, in deploy/ and in the RPM


def test_alert_rules_pass_their_promtool_unit_tests(tmp_path: Path) -> None:
    """Run against the shipped rules without their annotations (promtool would compare them)."""
    require_tools("promtool")
    rules = yaml.safe_load(ALERT_RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            del rule["annotations"]
    (tmp_path / ALERT_RULES.name).write_text(yaml.safe_dump(rules))
    shutil.copy(ALERT_TESTS, tmp_path)
    done = subprocess.run(
        ["promtool", "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_firing_and_says_what_to_do() -> None:
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {c["alertname"] for t in cases for c in t["alert_rule_test"] if c["exp_alerts"]}
    names = [rule["alert"] for rule in alert_rules()]
    assert set(names) == fired and len(set(names)) == len(names)
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in names), "README explains each alert"


# The live fleet: one neuron with room for one bf16 copy of the demo model (see
# test_cortex_placement.py), so "b" evicts "a"; "a" takes one request running and one waiting, so
# two streams sent to the neuron directly make cortex's next request meet RESOURCE_EXHAUSTED.
SMALL = {"dtype": "bfloat16", "max_batch_size": 1, "max_waiting": 1, "max_context": 4096}


@pytest.fixture
async def live_fleet(
    demo_dir: Path, tmp_path: Path, neurons: list[NeuronProcess]
) -> AsyncIterator[tuple[CortexProcess, NeuronProcess]]:
    neuron = NeuronProcess(tmp_path / "neuron", neuron_config(cpu_memory_budget="600MiB"))
    neurons.append(neuron.start())
    await neuron.wait_serving()
    cortex = CortexProcess(
        tmp_path / "cortex",
        # Polls far apart: cortex learns the neuron is full only from its refusal.
        cortex_config([neuron], poll_interval=300),
        models=[
            catalogue_model("a", **SMALL),
            catalogue_model("b", **SMALL),
            catalogue_model("huge", memory="100GiB"),
            {"id": "broken", "path": str(DEMO_GGUF.parent / "missing.gguf"), "memory": "1MiB"},
        ],
    )
    async with serving(cortex):
        yield cortex, neuron


@pytest.fixture
def prometheus_runs() -> None:
    require_tools("prometheus")


async def _traffic(cortex: CortexProcess, neuron: NeuronProcess) -> None:
    """What an operator's fleet sees in a day, in a few requests: placement, whole and streamed
    answers, a constrained one, an eviction, a neuron too full to take one (a retry, then a 503),
    a model no neuron has room for, and one whose load fails."""
    sdk = openai.AsyncOpenAI(base_url=cortex.api_url, api_key="unused", max_retries=0)
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    whole = await sdk.chat.completions.create(model="a", messages=ask, max_tokens=8)
    assert whole.choices[0].message.content
    stream = await sdk.chat.completions.create(
        model="a", messages=ask, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    constrained = await sdk.chat.completions.create(
        model="a", messages=ask, max_tokens=16, response_format={"type": "json_object"}
    )
    assert constrained.choices[0].message.content is not None
    evicting = await sdk.chat.completions.create(model="b", messages=ask, max_tokens=4)
    assert evicting.model == "b"
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        stub = pb_grpc.NeuronStub(channel)
        holders = [stub.Generate(endless("b"), timeout=300) for _ in range(2)]
        try:

            async def full() -> bool:
                (model,) = (await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models
                return (model.in_flight, model.waiting) == (1, 1)

            for _ in range(600):
                if await full():
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the neuron never held one request running, one waiting")
            with pytest.raises(openai.APIStatusError) as refused:
                await sdk.chat.completions.create(model="b", messages=ask, max_tokens=8)
            assert refused.value.status_code == 503
        finally:
            for call in holders:
                call.cancel()
    async with aiohttp.ClientSession() as session:
        for model, status in (("huge", 503), ("broken", 502)):
            body = {"model": model, "messages": ask, "max_tokens": 4}
            async with session.post(cortex.api_url + "/chat/completions", json=body) as r:
                assert r.status == status, (model, r.status, await r.read())


async def test_every_dashboard_query_has_data_from_a_live_scrape(
    prometheus_runs: None, live_fleet: tuple[CortexProcess, NeuronProcess], tmp_path: Path
) -> None:
    cortex, neuron = live_fleet
    prometheus = PrometheusProcess(
        tmp_path / "prometheus", [cortex], [neuron], rule_files=[ALERT_RULES]
    ).start()
    try:
        await prometheus.wait_scraping()
        await _traffic(cortex, neuron)
        empty = {(title, as_promql(expr)) for title, expr in dashboard_queries()}

        def every_query_answered() -> bool:
            for query in list(empty):
                if prometheus.query(query[1]):
                    empty.discard(query)
            return not empty

        try:
            await until_polled(every_query_answered, 120, "")
        except AssertionError:
            raise AssertionError(f"panels without data: {sorted(empty)}") from None
        # The alerts panel shows what the shipped rules make of that traffic: the failed load
        # fires at once.
        firing = prometheus.query('ALERTS{alertstate="firing"}')
        assert {s["metric"]["alertname"] for s in firing} >= {"HelexaModelLoadFailed"}
        assert {s["metric"]["model"] for s in firing} == {"broken"}
    finally:
        prometheus.stop()


async def test_killed_neuron_is_seen_down_pending_then_firing(
    prometheus_runs: None, demo_dir: Path, tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    # The shipped rules, with HelexaNeuronDown's `for` shortened and nothing else changed.
    rules = yaml.safe_load(ALERT_RULES.read_text())
    (down,) = [r for g in rules["groups"] for r in g["rules"] if r["alert"] == "HelexaNeuronDown"]
    down["for"] = "3s"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    neuron = NeuronProcess(tmp_path / "neuron", neuron_config())
    neurons.append(neuron.start())
    await neuron.wait_serving()
    prometheus = PrometheusProcess(
        tmp_path / "prometheus", [], [neuron], rule_files=[tmp_path / "rules.yml"]
    ).start()
    try:
        await prometheus.wait_scraping()
        instance = neuron.config["metrics_listen"]

        def state() -> str:
            alerts = [a for a in prometheus.alerts() if a["labels"]["alertname"] == down["alert"]]
            assert all(a["labels"]["instance"] == instance for a in alerts), alerts
            return alerts[0]["state"] if alerts else "inactive"

        assert state() == "inactive"
        neuron.send(signal.SIGKILL)
        neuron.wait_exit()
        seen = [state()]
        while seen[-1] != "firing":
            await until_polled(lambda: state() != seen[-1], 60, f"stuck {seen}")
            seen.append(state())
        assert [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]] in (
            ["inactive", "pending", "firing"],
            ["pending", "firing"],
        ), seen
    finally:
        prometheus.stop()
