"""What one request may cost the transformer, and how many a pod holds: the arithmetic behind the caps.

docs/capacity.md states it, the transformer sizes its admission gate with it, and `lookalike manifests
validate` checks the InferenceService against it (containerConcurrency and the memory limit):

    body cap      = max_images x (max_bytes x 4/3 + 4) + 1 MiB      (every photo at its limit, base64 in JSON)
    in work       = body cap + max_request_pixels x 3 bytes x 2     (RGB, and a transient copy while decoding)
    worst case    = BASELINE + in_work_requests x in work + waiting_requests x body cap  <  the memory limit
    in work / waiting requests = IN_WORK_PER_CPU / WAITING_PER_CPU x the pod's CPU limit

A waiting request holds only its body; decoding happens only in work, one request per CPU (the decode
pool has one thread per CPU, so more in work would only queue inside it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lookalike.core.decoding import ImageLimits

BASELINE_BYTES = 400 * 2**20  # the transformer process at rest (Python, kserve, numpy, Pillow): ~250-350 MB seen
IN_WORK_PER_CPU = 1
WAITING_PER_CPU = 3
DECODE_COPIES = 2  # the decoded RGB array and one transient copy (colour conversion, EXIF transpose)


def request_cap(limits: ImageLimits) -> int:
    """The largest request body the photos of one request can need (the servers' body cap)."""
    return limits.max_images * (limits.max_bytes * 4 // 3 + 4) + (1 << 20)


def in_work_bytes(limits: ImageLimits) -> int:
    return request_cap(limits) + limits.max_request_pixels * 3 * DECODE_COPIES


@dataclass(frozen=True)
class TransformerPlan:
    """A transformer pod's admission gate and its worst-case memory, for a CPU limit."""

    cpus: int
    in_work: int
    waiting: int
    worst_case_bytes: int

    @property
    def concurrency(self) -> int:
        """The most requests the pod holds: what the InferenceService's containerConcurrency may be."""
        return self.in_work + self.waiting


def transformer_plan(cpus: float, limits: ImageLimits | None = None) -> TransformerPlan:
    limits = limits or ImageLimits()
    whole = max(1, math.ceil(cpus))
    in_work, waiting = IN_WORK_PER_CPU * whole, WAITING_PER_CPU * whole
    worst = BASELINE_BYTES + in_work * in_work_bytes(limits) + waiting * request_cap(limits)
    return TransformerPlan(whole, in_work, waiting, worst)
