"""monitoring/ and the HPA example against what a running system exports: a real `sglang-gw serve` with
one tiny engine is scraped (the gateway's /metrics and the engine's), and every metric that the Grafana
dashboard, the alert rules, the HPA and the status page read must be among them. The alert rules also
pass `promtool check rules` and their unit tests (monitoring/alerts.test.yaml) where promtool is
installed (Debian's `prometheus` package; .ci/run installs it), and a schema check everywhere."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServeProcess, free_port
from sglang_gw.gateway.status import ENGINE_COUNTERS, ENGINE_GAUGES

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "monitoring" / "grafana-dashboard.json"
ALERTS = REPO / "monitoring" / "alerts.yaml"
ALERT_TESTS = REPO / "monitoring" / "alerts.test.yaml"
HPA = REPO / "k8s" / "engine-hpa.yaml"
K8S_README = REPO / "k8s" / "README.md"
# The series each metric type exposes, by suffix (prometheus_client's exposition).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "unknown": ("",), "info": ("_info",)}


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory) -> dict[str, set[str]]:
    """The series names a live gateway (under serve: with the supervisor's) and a live engine export,
    including those of labelled metrics with no sample yet (their HELP and TYPE are exported)."""
    config = {"engines": [{"model": str(tiny_models["llama"]), "served_model_name": "tiny", "count": 1,
                           "base_port": free_port(), "max_total_tokens": 4000, "num_threads": 1}]}
    serve = ServeProcess(config, tmp_path_factory.mktemp("dashboards"))
    try:
        engine = serve.wait_all_ready()["engine-0"]
        return {"gateway": _series(_scrape(serve.url)), "engine": _series(_scrape(engine["url"]))}
    finally:
        serve.stop()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def _series(text: str) -> set[str]:
    return {family.name + suffix for family in text_string_to_metric_families(text)
            for suffix in SUFFIXES[family.type]}


def _metrics_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once strings, label matchers,
    ranges and label lists are out, that are neither function calls nor keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", expr):
        preceded = expr[m.start() - 1] if m.start() else " "
        if preceded.isalnum() or preceded in "._$":  # inside a number (1e-9, 15m) or a variable
            continue
        if expr[m.end():].lstrip().startswith("(") or m.group() in ("and", "or", "unless", "offset", "bool"):
            continue
        names.add(m.group())
    return names


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def _alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promql_metric_extraction():
    assert _metrics_in('histogram_quantile(0.95, sum by (le, worker) (rate(a_bucket{x=~"5.."}[$__rate_interval])))') \
        == {"a_bucket"}
    assert _metrics_in("sum(rate(sglang:x_total[6h] offset 15m)) / on (job) b > 1e-9 unless c") == {
        "sglang:x_total", "b", "c"}


def test_dashboard_and_alerts_read_only_exported_metrics(exported):
    every = exported["gateway"] | exported["engine"]
    for source, exprs in (("dashboard", _dashboard_exprs()), ("alerts", [r["expr"] for r in _alert_rules()])):
        assert exprs, source
        for expr in exprs:
            names = _metrics_in(expr)
            assert names, f"{source}: no metric in {expr!r}"
            assert names <= every, f"{source}: {sorted(names - every)} not exported ({expr!r})"


def test_dashboard_shows_what_an_operator_needs():
    """Issue 14's list: per-engine load and queue, request rate and errors, TTFT/ITL/e2e, token throughput,
    engine-reported cache hits next to routing's predictions, restarts and phases."""
    read = set().union(*map(_metrics_in, _dashboard_exprs()))
    assert {"sglang_gw_inflight_requests", "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
            "sglang_gw_requests_total", "sglang:time_to_first_token_seconds_bucket",
            "sglang:inter_token_latency_seconds_bucket", "sglang:e2e_request_latency_seconds_bucket",
            "sglang:generation_tokens_total", "sglang:cached_tokens_total", "sglang:prompt_tokens_total",
            "sglang_gw_predicted_cached_tokens_total", "sglang_gw_reported_cached_tokens_total",
            "sglang_gw_engine_restarts_total", "sglang_gw_engine_phase"} <= read


def test_dashboard_is_importable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        grid = p["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and all(t["refId"] and t["expr"] for t in p["targets"]), p["title"]


def test_alert_rules_schema():
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert len({g["name"] for g in groups}) == len(groups)
    rules = _alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"[A-Za-z_]\w*", rule["alert"]) and isinstance(rule["expr"], str)
        assert re.fullmatch(r"(\d+[smhd])+", rule.get("for", "0s")), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info") and rule["annotations"]["summary"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")
def test_alert_rules_pass_promtool():
    for command in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        done = subprocess.run(["promtool", *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_hpa_scales_the_engines_on_a_gateway_metric(exported):
    hpa = yaml.safe_load(HPA.read_text())
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "sglang-gw-engine"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["target"]["type"] == "AverageValue"
    # The adapter rule k8s/README.md gives makes the metric: from series the gateway exports, counting the
    # requests it queues as well as those in flight (a max_inflight_per_worker cap bounds the latter).
    (rule,) = yaml.safe_load(re.search(r"```yaml\n(rules:.*?)```", K8S_README.read_text(), re.S).group(1))["rules"]["external"]
    assert rule["name"]["as"] == metric["external"]["metric"]["name"]
    read = _metrics_in(rule["metricsQuery"].replace("<<.LabelMatchers>>", ""))
    assert read == {"sglang_gw_inflight_requests", "sglang_gw_queued_requests"} and read <= exported["gateway"]


def test_status_page_reads_metrics_the_engine_exports(exported):
    assert {*ENGINE_GAUGES.values(), *ENGINE_COUNTERS.values()} <= exported["engine"]
