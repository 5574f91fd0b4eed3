"""Knative autoscaling of the two serving units, derived from measured capacity (docs/capacity.md, "Autoscaling"):
the GPU predictor and the CPU transformer scale apart, each on requests per second per replica.

    target rps per replica = UTILISATION x measured requests/s one replica answers
    max replicas           = ceil(design peak rps / target)      (never below min)
    min replicas           = 2: a node loss or a rollout keeps serving, and no GPU predictor starts cold

`lookalike manifests validate` refuses a production InferenceService whose scaling settings differ from these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Keep every replica at most 60% busy at its scaling target: the headroom absorbs a burst while Knative adds
# replicas, and a replica's latency stays near its unloaded latency (docs/capacity.md, "Queries").
UTILISATION = 0.6
# The design load: 10M queries a day (docs/capacity.md's middle row) with a peak 3x the day's average.
DESIGN_QUERIES_PER_DAY = 10_000_000
PEAK_TO_AVERAGE = 3
MIN_REPLICAS = 2

# Measured (docs/capacity.md, `benchmarks/serving.py`, lite0 at 224 px): one 2-core replica answers about 80
# queries/s end to end. No GPU has run the serving benchmark yet, so the GPU predictor is scaled as if it
# answered what a CPU replica does: a floor that overprovisions GPUs until `benchmarks/gpu_check.py`'s
# figure replaces it here.
PREDICTOR_RPS_PER_REPLICA = 80.0
# Measured (README, "Serving"): decoding and preprocessing a 12-MP phone JPEG for 224 px takes 15 ms of one
# CPU; the transformer's pod has a limit of 2 CPUs (manifests/base).
TRANSFORMER_SECONDS_PER_PHOTO = 0.015
TRANSFORMER_CPUS = 2
TRANSFORMER_RPS_PER_REPLICA = TRANSFORMER_CPUS / TRANSFORMER_SECONDS_PER_PHOTO

# How long Knative keeps an idle replica before removing it. A GPU predictor takes minutes to start (a GPU
# node, a large image, the index loaded and verified: its liveness probe allows 120 s for the load alone),
# so it is kept through lulls of 10 minutes; a transformer starts in seconds and is kept 2 minutes.
SCALE_DOWN_DELAY = {"predictor": "10m", "transformer": "2m"}
SCALE_DOWN_ANNOTATION = "autoscaling.knative.dev/scale-down-delay"


@dataclass(frozen=True)
class Scaling:
    """What one component's InferenceService settings should say."""

    component: str
    rps_per_replica: float
    target_rps: int
    min_replicas: int
    max_replicas: int
    scale_down_delay: str

    def arithmetic(self) -> str:
        return (f"{self.component}: target {UTILISATION:g} x {self.rps_per_replica:.0f} req/s = {self.target_rps} "
                f"req/s per replica; max ceil({design_peak_rps():.0f} / {self.target_rps}) = {self.max_replicas}; "
                f"min {self.min_replicas}; scale-down delay {self.scale_down_delay}")


def design_peak_rps() -> float:
    return DESIGN_QUERIES_PER_DAY / 86_400 * PEAK_TO_AVERAGE


def plan(component: str) -> Scaling:
    rps = {"predictor": PREDICTOR_RPS_PER_REPLICA, "transformer": TRANSFORMER_RPS_PER_REPLICA}[component]
    target = math.floor(UTILISATION * rps)
    return Scaling(component, rps, target, MIN_REPLICAS, max(MIN_REPLICAS, math.ceil(design_peak_rps() / target)),
                   SCALE_DOWN_DELAY[component])


def autoscaling_rules(isvc: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, message) for each production scaling setting that differs from the plan. Applies to the
    components that say how they scale (scaleMetric); dev overlays run one replica and say nothing."""
    problems = []
    spec = isvc.get("spec") or {}
    for component in ("predictor", "transformer"):
        comp = spec.get(component) or {}
        if "scaleMetric" not in comp:
            continue
        want = plan(component)
        where = f"spec.{component}"
        expected = {"scaleMetric": "rps", "scaleTarget": want.target_rps, "minReplicas": want.min_replicas,
                    "maxReplicas": want.max_replicas}
        for field, value in expected.items():
            if comp.get(field) != value:
                problems.append((f"{where}.{field}", f"is {comp.get(field)!r}, the capacity plan says {value!r} "
                                                     f"({want.arithmetic()}; docs/capacity.md)"))
        delay = (comp.get("annotations") or {}).get(SCALE_DOWN_ANNOTATION)
        if delay != want.scale_down_delay:
            problems.append((f"{where}.annotations[{SCALE_DOWN_ANNOTATION}]",
                             f"is {delay!r}, the capacity plan says {want.scale_down_delay!r}"))
    return problems
