"""The Grafana dashboard, as code (grafanalib): what an operator looks at first when an alert fires.

    lookalike manifests alerts     # also rewrites manifests/monitoring/dashboard.json from this module

Rows: the served latency against its objective and per stage, throughput, errors by status and kind, the
model and index versions served and the index's age, the caches' hit rates, micro-batching, and GPU
utilisation where NVIDIA's DCGM exporter runs on the GPU nodes (its panels stay empty elsewhere). Every query
names only metrics the two servers export (lookalike/serving/metrics.py and kserve's own) or the DCGM
exporter's, which tests/deploy/test_dashboard.py checks against the live prometheus_client registry.
"""
from __future__ import annotations

import json
import re
from typing import Any

from grafanalib.core import (Dashboard, GridPos, RowPanel, Stat, Table, Target, Templating, Template, Threshold,
                             TimeSeries)
from grafanalib._gen import DashboardEncoder

from lookalike.deploy.alerts import ERROR_SHARE, INDEX_MAX_AGE_HOURS, LATENCY_SLO_SECONDS

DATASOURCE = "${datasource}"
# NVIDIA dcgm-exporter's gauges: the only metrics the dashboard reads that our servers do not export.
DCGM_METRICS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"}
W = 24  # Grafana's grid is 24 columns wide
# Every selector of the servers' metrics is narrowed to the namespaces picked in the dashboard's variable.
NAMESPACE = 'namespace=~"$namespace"'
_SERVER_METRIC = re.compile(r"\b((?:lookalike|request)_[a-z_]+)(\{([^}]*)\})?")


def _in_namespace(expr: str) -> str:
    def narrow(m: re.Match) -> str:
        inner = m.group(3)
        return f"{m.group(1)}{{{inner + ',' if inner else ''}{NAMESPACE}}}"
    return _SERVER_METRIC.sub(narrow, expr)


def _target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> Target:
    return Target(expr=_in_namespace(expr), legendFormat=legend, refId=ref, datasource=DATASOURCE, instant=instant)


def _series(title: str, targets: list[Target], unit: str, x: int, y: int, w: int = 12, h: int = 8,
            threshold: float | None = None, description: str = "") -> TimeSeries:
    extra: dict[str, Any] = {}
    if threshold is not None:  # the objective drawn as a red line
        extra = {"thresholds": [Threshold("green", 0, 0.0), Threshold("red", 1, float(threshold))],
                 "thresholdsStyleMode": "line"}
    return TimeSeries(title=title, dataSource=DATASOURCE, targets=targets, unit=unit, description=description,
                      gridPos=GridPos(h=h, w=w, x=x, y=y), **extra)


def _row(title: str, y: int) -> RowPanel:
    return RowPanel(title=title, gridPos=GridPos(h=1, w=W, x=0, y=y))


def _panels() -> list[Any]:
    p99 = ("sum by (namespace) (histogram_quantile(0.99, sum by (namespace, le, stage) "
           '(rate(lookalike_stage_seconds_bucket{unit="transformer"}[5m]))))')
    per_stage = "histogram_quantile({q}, sum by (le, unit, stage) (rate(lookalike_stage_seconds_bucket[5m])))"
    return [
        _row("Latency", 0),
        _series("Served p99 (sum of the transformer's stage p99s) and its objective",
                [_target(p99, "{{namespace}} served p99")], "s", 0, 1, threshold=LATENCY_SLO_SECONDS,
                description="What LookalikeLatencyP99AboveSLO compares with the objective (red line)."),
        _series("p99 per stage",
                [_target(per_stage.format(q=0.99), "{{unit}} {{stage}}")], "s", 12, 1),
        _series("p50 per stage",
                [_target(per_stage.format(q=0.5), "{{unit}} {{stage}}")], "s", 0, 9),
        _series("KServe's own p99 (preprocess, predict, postprocess)",
                [_target(f"histogram_quantile(0.99, sum by (le, job) (rate({name}_bucket[5m])))",
                         f"{{{{job}}}} {label}", ref)
                 for ref, (name, label) in zip("ABC", (("request_preprocess_seconds", "preprocess"),
                                                       ("request_predict_seconds", "predict"),
                                                       ("request_postprocess_seconds", "postprocess")))],
                "s", 12, 9),
        _row("Traffic and errors", 17),
        _series("Requests and images per second",
                [_target("sum by (unit) (rate(lookalike_requests_total[5m]))", "{{unit}} requests/s"),
                 _target("sum by (unit) (rate(lookalike_images_total[5m]))", "{{unit}} images/s", "B")],
                "reqps", 0, 18),
        _series("Responses by status (share of the transformer's)",
                [_target('sum by (status) (rate(lookalike_responses_total{unit="transformer"}[5m])) / ignoring(status) '
                         'group_left sum(rate(lookalike_responses_total{unit="transformer"}[5m]))', "{{status}}")],
                "percentunit", 12, 18, threshold=ERROR_SHARE,
                description="LookalikeServerErrors and LookalikeUnavailableOrTimingOut fire above the red line."),
        _series("Errors by kind",
                [_target("sum by (unit, kind) (rate(lookalike_errors_total[5m]))", "{{unit}} {{kind}}")],
                "reqps", 0, 26),
        _series("Requests given up by their caller before work began",
                [_target("sum by (unit) (rate(lookalike_cancelled_total[5m]))", "{{unit}}")], "reqps", 12, 26),
        _row("What is served", 34),
        Table(title="Model and index versions served (pods per pair)", dataSource=DATASOURCE,
              targets=[_target("count by (unit, model_version, index_version) (lookalike_serving_info == 1)", "",
                               instant=True)],
              gridPos=GridPos(h=8, w=12, x=0, y=35)),
        _series("Age of the oldest served index",
                [_target('time() - min(lookalike_index_built_timestamp_seconds{unit="predictor"})', "age")],
                "s", 12, 35, threshold=INDEX_MAX_AGE_HOURS * 3600,
                description="LookalikeIndexStale fires above the red line."),
        _row("Caches and batching", 43),
        _series("Cache hit rate",
                [_target('sum by (cache) (rate(lookalike_cache_lookups_total{result="hit"}[5m])) / '
                         "sum by (cache) (rate(lookalike_cache_lookups_total[5m]))", "{{cache}}")],
                "percentunit", 0, 44),
        _series("Images per embedding batch (p50, p99)",
                [_target("histogram_quantile(0.5, sum by (le) (rate(lookalike_batch_images_bucket[5m])))", "p50"),
                 _target("histogram_quantile(0.99, sum by (le) (rate(lookalike_batch_images_bucket[5m])))", "p99",
                         "B")], "none", 12, 44),
        _row("GPU (NVIDIA DCGM exporter)", 52),
        _series("GPU utilisation",
                [_target("avg by (Hostname, gpu) (DCGM_FI_DEV_GPU_UTIL)", "{{Hostname}} gpu {{gpu}}")],
                "percent", 0, 53),
        Stat(title="GPU memory used", dataSource=DATASOURCE, format="percentunit",
             targets=[_target("sum(DCGM_FI_DEV_FB_USED) / (sum(DCGM_FI_DEV_FB_USED) + sum(DCGM_FI_DEV_FB_FREE))",
                              "used")],
             gridPos=GridPos(h=8, w=12, x=12, y=53)),
    ]


def dashboard() -> Dashboard:
    datasource = Template(name="datasource", query="prometheus", type="datasource", label="Data source",
                          default="Prometheus")
    # The deployment to look at (lookalike, lookalike-dev, ...); "All" also matches series with no namespace.
    namespace = Template(name="namespace", label="Namespace", dataSource=DATASOURCE, includeAll=True,
                         multi=True, allValue=".*", default="All", refresh=2,
                         query="label_values(lookalike_requests_total, namespace)")
    return Dashboard(title="Lookalike serving", uid="lookalike-serving", tags=["lookalike"], timezone="utc",
                     refresh="30s", templating=Templating(list=[datasource, namespace]),
                     panels=_panels()).auto_panel_ids()


def render() -> str:
    """The dashboard as Grafana JSON (stable key order, so the committed copy diffs cleanly)."""
    return json.dumps(dashboard().to_json_data(), cls=DashboardEncoder, sort_keys=True, indent=2) + "\n"


def queries(rendered: str | None = None) -> list[str]:
    """Every PromQL expression in the rendered dashboard."""
    data = json.loads(rendered or render())
    return [t["expr"] for panel in data["panels"] for t in panel.get("targets", []) if t.get("expr")]
