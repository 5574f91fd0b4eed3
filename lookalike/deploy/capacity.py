"""The InferenceService's transformer checked against its own arithmetic (lookalike/core/budget.py): Knative
never sends one pod more requests than its admission gate holds, and the worst case of those fits the pod's
memory limit. Part of `lookalike manifests validate`."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from lookalike.core.budget import transformer_plan
from lookalike.core.decoding import ImageLimits


def _quantity(value: Any) -> float:
    """A Kubernetes CPU or memory quantity as a number (cores, bytes)."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * factor
    return float(text)


def capacity_rules(transformer: dict[str, Any], container: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(field, message) of each error in the transformer component `transformer` and its serving
    `container`: its limits, concurrency and the request caps must agree."""
    if container is None:
        return []
    limits = (container.get("resources") or {}).get("limits") or {}
    field = "spec.transformer"
    if "cpu" not in limits or "memory" not in limits:
        return [(f"{field}.containers[0].resources.limits",
                 "the transformer needs CPU and memory limits: its worker pools and queue are sized from them")]
    image_limits = ImageLimits()
    for arg in container.get("args") or []:
        name, _, value = str(arg).partition("=")
        if name == "--max_images":
            image_limits = replace(image_limits, max_images=int(value))
        elif name == "--max_image_bytes":
            image_limits = replace(image_limits, max_bytes=int(value))
    plan = transformer_plan(_quantity(limits["cpu"]), image_limits)
    memory = _quantity(limits["memory"])
    problems = []
    concurrency = transformer.get("containerConcurrency")
    if not concurrency or int(concurrency) > plan.concurrency:
        problems.append((f"{field}.containerConcurrency",
                         f"is {concurrency or 'unset (unbounded)'}; at {plan.cpus} CPU the pod admits "
                         f"{plan.in_work} requests in work and {plan.waiting} waiting: set it to at most "
                         f"{plan.concurrency} so Knative queues the rest instead of the pod refusing them"))
    if plan.worst_case_bytes >= memory:
        problems.append((f"{field}.containers[0].resources.limits.memory",
                         f"{memory / 2**20:.0f} MiB is below the worst case of {plan.concurrency} requests "
                         f"({plan.worst_case_bytes / 2**20:.0f} MiB, docs/capacity.md): raise it, or lower "
                         f"--max_images / --max_image_bytes"))
    return problems
