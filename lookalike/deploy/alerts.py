"""The alerts, as code: one list of rules, written out as a PrometheusRule (for the Prometheus Operator) and
as a plain Prometheus rules file, so the two can never say different things.

    lookalike manifests alerts            # rewrites manifests/monitoring/prometheusrule.yaml and rules.yml

Every threshold is a named constant below with where its number comes from; docs/operations.md's runbook
says, per alert, what it means, what to look at and what to do. Each aggregates `by (namespace)`, so one
Prometheus watching several deployments (dev and production) alerts on each apart. The metrics are the servers' own
(lookalike/serving/metrics.py): the rules read nothing a scrape of the two servers does not give.

`time_scale` shrinks every window and `for:` duration by one factor, so the live test
(tests/deploy/test_alerts_live.py) runs these same rules against a real Prometheus in seconds instead of
minutes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# ---- the numbers, each with its source ------------------------------------------------------------

# The served latency objective: a shopper's photo answered within 250 ms at the 99th percentile. The
# measured parts leave most of it for queueing and the network: decoding and preprocessing a 12-MP phone
# JPEG takes 15 ms (README, "Serving"), embedding 8-14 ms of CPU per 224-px image (docs/capacity.md), an
# IVF search 1.2 ms at 10M photos (docs/capacity.md).
LATENCY_SLO_SECONDS = 0.25
# The availability objective: 99.9% of requests answered without a server error. A 1% share of errors is
# ten times the rate that spends the whole error budget (0.1%) over the objective's window.
AVAILABILITY_SLO = 0.999
ERROR_SHARE = 10 * (1 - AVAILABILITY_SLO)
# Requests timing out while the transformer answers: one hung predictor among five replicas times out a
# fifth of the requests Knative spreads evenly over them.
TIMEOUT_SHARE = 0.2
# "Answers nothing" only means something when requests are sent to it (the transformer's `predict` stage
# counts each call, so a flood of bad photos refused before it is no such traffic): at 1 request/s over the 8 predictor
# replicas of the production overlay, each replica sees about 7.5 a minute, so a replica with none in a
# minute is silent by chance with probability e^-7.5 (0.06%).
MIN_REQUESTS_PER_SECOND = 1.0
# The `update` pipeline runs every 6 hours (docs/operations.md, "Run the pipelines"): an index older than
# two missed runs plus one hour for a run to finish means updates have stopped landing.
UPDATE_PERIOD_HOURS = 6
INDEX_MAX_AGE_HOURS = 2 * UPDATE_PERIOD_HOURS + 1
# Two pairs side by side is a canary; a canary is promoted or rolled back within the hour (docs/operations.md,
# "Roll a canary forward, and back"). Longer means a canary left half-way or replicas that failed to swap.
SKEW_MAX_MINUTES = 60
# A cache whose hit rate fell to under half of its own rate at the same time a day earlier (its keys no
# longer match, it was flushed or sized down) - compared with itself, since a good hit rate depends on the
# traffic, and only with at least MIN_REQUESTS_PER_SECOND lookups.
CACHE_HIT_RATE_DROP = 0.5

SERVED = 'unit="transformer"'  # what clients see is the transformer's answer
RUNBOOK = "docs/operations.md#"


@dataclass(frozen=True)
class Alert:
    """One alerting rule. `window` and `for_` are in seconds, before `time_scale`."""

    name: str
    expr: str  # with $window (and $day) where the scaled durations go
    for_: float
    window: float
    severity: str
    summary: str
    description: str

    def rule(self, time_scale: float = 1.0) -> dict[str, Any]:
        expr = self.expr.replace("$window", duration(self.window * time_scale))
        expr = expr.replace("$day", duration(86400 * time_scale)).replace("$cache", duration(1800 * time_scale))
        return {"alert": self.name, "expr": " ".join(expr.split()), "for": duration(self.for_ * time_scale),
                "labels": {"severity": self.severity, "service": "lookalike"},
                "annotations": {"summary": self.summary, "description": self.description,
                                "runbook_url": RUNBOOK + self.name.lower()}}


def duration(seconds: float) -> str:
    """A Prometheus duration: whole minutes as `5m`, else whole seconds (at least 1 s)."""
    seconds = max(1, math.ceil(seconds))
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def _share(selector: str) -> str:
    """The share of the served requests whose response matches `selector`, over the window."""
    return (f"sum by (namespace) (rate(lookalike_responses_total{{{SERVED},{selector}}}[$window])) "
            f"/ sum by (namespace) (rate(lookalike_responses_total{{{SERVED}}}[$window]))")


def _hit_rate(offset: str = "") -> str:
    return (f'sum by (namespace, cache) (rate(lookalike_cache_lookups_total{{result="hit"}}[$cache]{offset})) '
            f"/ sum by (namespace, cache) (rate(lookalike_cache_lookups_total[$cache]{offset}))")


ALERTS = [
    Alert("LookalikeLatencyP99AboveSLO",
          f"histogram_quantile(0.99, sum by (namespace, le) "
          f"(rate(lookalike_request_seconds_bucket{{{SERVED}}}[$window]))) > {LATENCY_SLO_SECONDS}",
          for_=600, window=300, severity="warning",
          summary="Served p99 latency above its objective",
          description=f"The transformer answered its requests (decode to answer, every status) with a p99 of "
                      f"{{{{ $value | humanizeDuration }}}}, above the {LATENCY_SLO_SECONDS * 1000:.0f} ms "
                      f"objective, for 10 minutes."),
    Alert("LookalikeServerErrors",
          _share('status=~"5..",status!~"503|504"') + f" > {ERROR_SHARE:g}",
          for_=300, window=300, severity="critical",
          summary="Server errors (5xx) above 1% of requests",
          description="{{ $value | humanizePercentage }} of the requests answered in the last 5 minutes were "
                      "server errors other than 503/504: a bug, a bad artifact or the store failing."),
    Alert("LookalikeUnavailableOrTimingOut",
          _share('status=~"503|504"') + f" > {ERROR_SHARE:g}",
          for_=600, window=300, severity="warning",
          summary="503/504 answers above 1% of requests",
          description="{{ $value | humanizePercentage }} of the requests were refused as busy or not ready (503) "
                      "or timed out waiting for the predictor (504) over 10 minutes: capacity is short or the "
                      "predictor is slow."),
    Alert("LookalikeNotAnsweringWhileReady",
          f'sum by (namespace) (rate(lookalike_errors_total{{{SERVED},kind="timeout"}}[$window])) '
          f"/ sum by (namespace) (rate(lookalike_requests_total{{{SERVED}}}[$window])) > {TIMEOUT_SHARE:g}",
          for_=60, window=60, severity="critical",
          summary="Requests time out while the serving pods report ready",
          description="{{ $value | humanizePercentage }} of the requests the transformer answered in the last "
                      "minute were timeouts waiting for the predictor, while the transformer stays ready and keeps "
                      "receiving traffic: a predictor is hung or frozen."),
    Alert("LookalikePredictorNotAnswering",
          f'(rate(lookalike_requests_total{{unit="predictor"}}[$window]) == 0 '
          f'or on() absent(rate(lookalike_requests_total{{unit="predictor"}}[$window]))) '
          f'and on(namespace) sum by (namespace) (rate(lookalike_stage_seconds_count{{{SERVED},stage="predict"}}'
          f"[$window])) > {MIN_REQUESTS_PER_SECOND:g}",
          for_=60, window=60, severity="critical",
          summary="A predictor answered nothing for a minute",
          description="The transformer sends the predictor requests, but a predictor (or every predictor, when "
                      "none can be scraped) finished no request in the last minute."),
    Alert("LookalikeVersionSkew",
          "count by (namespace) (count by (namespace, model_version, index_version) "
          '(lookalike_serving_info{unit="predictor"} == 1)) > 1',
          for_=SKEW_MAX_MINUTES * 60, window=0, severity="warning",
          summary="Replicas serve different model/index versions",
          description="{{ $value }} model/index pairs have been served side by side for an hour: a canary left "
                      "half-way, or replicas that did not swap to the new index."),
    Alert("LookalikeIndexStale",
          f'(time() - min by (namespace) (lookalike_index_built_timestamp_seconds{{unit="predictor"}})) / 3600 '
          f"> {INDEX_MAX_AGE_HOURS}",
          for_=900, window=0, severity="warning",
          summary=f"The served index is older than {INDEX_MAX_AGE_HOURS} hours",
          description="The oldest index a predictor serves was built or last updated {{ $value | humanize }} "
                      f"hours ago; the update pipeline runs every {UPDATE_PERIOD_HOURS} hours, so at least two "
                      "updates did not land."),
    Alert("LookalikeCacheHitRateDropped",
          f"({_hit_rate()}) < {CACHE_HIT_RATE_DROP:g} * ({_hit_rate(' offset $day')}) "
          f"and sum by (namespace, cache) (rate(lookalike_cache_lookups_total[$cache])) > {MIN_REQUESTS_PER_SECOND:g}",
          for_=1800, window=1800, severity="warning",
          summary="A cache's hit rate fell to under half of yesterday's",
          description="The {{ $labels.cache }} cache hits {{ $value | humanizePercentage }} of lookups, under half "
                      "its rate at the same time a day earlier."),
]


def rule_groups(time_scale: float = 1.0) -> list[dict[str, Any]]:
    """The rule groups, every window and `for:` multiplied by `time_scale` (1 in production)."""
    rules = [a.rule(time_scale) for a in ALERTS]
    return [{"name": "lookalike-serving", "rules": rules}]


def rules_file(time_scale: float = 1.0) -> dict[str, Any]:
    """A plain Prometheus rules file (`rule_files:` of prometheus.yml, `promtool check rules`)."""
    return {"groups": rule_groups(time_scale)}


def prometheus_rule(time_scale: float = 1.0) -> dict[str, Any]:
    """The same rules as a PrometheusRule object of the Prometheus Operator."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "lookalike", "labels": {"app.kubernetes.io/name": "lookalike",
                                                          "prometheus": "k8s", "role": "alert-rules"}},
            "spec": {"groups": rule_groups(time_scale)}}


HEADER = ("# Generated by `lookalike manifests alerts` from lookalike/deploy/alerts.py: edit that, not this file\n"
          "# (a test fails when the two differ). The runbook is docs/operations.md.\n")


def dump(obj: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(obj, sort_keys=False, width=1000)


def write(folder: Path) -> list[Path]:
    """Write the PrometheusRule and the plain rules file into `folder`; return their paths."""
    out = {folder / "prometheusrule.yaml": dump(prometheus_rule()), folder / "rules.yml": dump(rules_file())}
    for path, text in out.items():
        path.write_text(text)
    return list(out)
