"""The dashboard renders (grafanalib), covers what an operator needs, names only metrics the servers export
(read from the live prometheus_client registry and kserve's own, not a hand list), and its committed JSON is
current. The alerts are held to the same list."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lookalike.deploy import alerts, dashboard
from lookalike.deploy.metric_names import promql_metric_names

COMMITTED = Path(__file__).resolve().parents[2] / "manifests" / "monitoring" / "dashboard.json"

# The names prometheus_client adds to a family's name when it exposes it, per type.
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
             "summary": ("", "_count", "_sum", "_created"), "info": ("_info",), "stateset": ("",),
             "enum": ("",), "unknown": ("",)}


def exported_metric_names() -> set[str]:
    """Every sample name the two servers' `/metrics` can show: the project's metrics (registered on import of
    lookalike.serving.metrics) and kserve's own (kserve.metrics), as the default registry exposes them."""
    import kserve.metrics  # noqa: F401 - registers kserve's request histograms
    from prometheus_client import REGISTRY

    import lookalike.serving.metrics  # noqa: F401 - registers the project's metrics

    names = set()
    for family in REGISTRY.collect():
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_metric_names()


def test_the_registry_lists_the_servers_metrics(exported):
    assert {"lookalike_requests_total", "lookalike_stage_seconds_bucket", "lookalike_serving_info",
            "lookalike_cache_lookups_total", "lookalike_index_built_timestamp_seconds",
            "request_predict_seconds_bucket"} <= exported
    assert "lookalike_requests" not in exported  # a counter is exposed with _total


def test_the_query_parser_finds_metric_names_only():
    expr = ('sum by (status) (rate(lookalike_responses_total{unit="transformer",status=~"5.."}[5m])) '
            '/ ignoring(status) group_left sum(rate(x_total{a="b"}[5m] offset 1d)) and on() time() - up > bool 3')
    assert promql_metric_names(expr) == {"lookalike_responses_total", "x_total", "up"}


def test_every_dashboard_query_names_an_exported_metric(exported):
    queries = dashboard.queries()
    assert len(queries) >= 15
    for expr in queries:
        names = promql_metric_names(expr)
        assert names, expr
        unknown = names - exported - dashboard.DCGM_METRICS
        assert not unknown, f"{expr}: {unknown} is not exported by the servers"


def test_a_misspelt_metric_would_be_caught(exported):
    assert promql_metric_names("rate(lookalike_request_total[5m])") - exported == {"lookalike_request_total"}


def test_every_alert_names_exported_metrics(exported):
    for rule in alerts.rule_groups()[0]["rules"]:
        names = promql_metric_names(rule["expr"])
        assert names and not names - exported, (rule["alert"], names - exported)


def test_the_dashboard_shows_what_an_operator_needs():
    data = json.loads(dashboard.render())
    titles = " | ".join(p["title"] for p in data["panels"])
    for words in ("p99 per stage", "Requests and images per second", "Responses by status", "versions served",
                  "Cache hit rate", "GPU utilisation", "Age of the oldest served index"):
        assert words in titles, words
    exprs = " ".join(dashboard.queries())
    for metric in ("lookalike_stage_seconds_bucket", "lookalike_responses_total", "lookalike_serving_info",
                   "lookalike_cache_lookups_total", "DCGM_FI_DEV_GPU_UTIL"):
        assert metric in exprs, metric
    slo = next(p for p in data["panels"] if p["title"].startswith("Served p99"))
    assert slo["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == alerts.LATENCY_SLO_SECONDS
    assert len({p["id"] for p in data["panels"]}) == len(data["panels"])  # Grafana needs unique ids


def test_every_server_metric_is_narrowed_to_the_chosen_namespaces():
    data = json.loads(dashboard.render())
    assert [v["name"] for v in data["templating"]["list"]] == ["datasource", "namespace"]
    for expr in dashboard.queries():
        for name in promql_metric_names(expr) - dashboard.DCGM_METRICS:
            selectors = re.findall(rf"{name}\{{([^}}]*)\}}", expr)
            assert selectors and all('namespace=~"$namespace"' in s for s in selectors), expr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's `prometheus`) is not installed")
def test_every_dashboard_query_parses(tmp_path):
    """promtool parses each query, as a recording rule (Grafana's $namespace filled with what "All" sends)."""
    rules = [{"record": f"dashboard:query{i}", "expr": expr.replace("$namespace", ".*")}
             for i, expr in enumerate(dashboard.queries())]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([shutil.which("promtool"), "check", "rules", str(tmp_path / "queries.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_committed_dashboard_is_current():
    assert COMMITTED.read_text() == dashboard.render(), "run `lookalike manifests alerts` to regenerate it"
