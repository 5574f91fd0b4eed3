"""Which metric names the servers export, read from the prometheus_client registry they register in, and which
metric names a PromQL expression reads: so the dashboard and the alerts can be checked against the real
list, never a hand-kept one."""
from __future__ import annotations

import re

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


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
             "bool", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (function names, keywords, label names and durations left out)."""
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\b(?:group_left|group_right)\b", " ", text)
    return {m for m in _IDENT.findall(text) if m.lower() not in _KEYWORDS}
