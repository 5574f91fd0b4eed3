"""Observability of the serving units: Prometheus metrics and one structured log line per request.

Both servers expose these on kserve's `/metrics` (the default Prometheus registry), labelled by `unit`
(transformer or predictor), next to kserve's own request histograms:

    lookalike_requests_total{unit}                 inference requests answered (any status)
    lookalike_responses_total{unit,status}         inference responses by HTTP status
    lookalike_serving_info{unit,model_version,index_version}  1 for the pair served now
    lookalike_errors_total{unit,kind}              failed requests by kind: bad_input, too_large,
                                                   not_found, unavailable, timeout, internal
    lookalike_images_total{unit}                   images processed
    lookalike_request_seconds{unit}                latency of a whole request, as its unit answered it (the
                                                   served latency an SLO is about, any status)
    lookalike_stage_seconds{unit,stage}            latency per stage: decode, preprocess, predict (the
                                                   transformer's round trip), postprocess, embed, search
    lookalike_batch_images{unit}                   images per embedding batch (micro-batching)
    lookalike_cancelled_total{unit}                requests skipped because their caller gave up first
    lookalike_cache_lookups_total{unit,cache,result}  cache lookups: cache = embedding | answer,
                                                   result = hit | miss
    lookalike_index_built_timestamp_seconds{unit}  when the served index version was built (Unix time),
                                                   so an alert can see an index that stopped updating

Each request also leaves one JSON log line (logger `lookalike.requests`) with its request id, status,
image count and stage timings, so one id follows a photo through both servers.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from typing import Any
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram

from lookalike.core.errors import status_of
from lookalike.serving.errors import as_v2_error, error_kind, to_v2



def json_line(**fields: Any) -> str:
    """One log record as compact JSON (values that are not JSON, such as paths, as their str)."""
    return json.dumps(fields, default=str, separators=(",", ":"))


request_log = logging.getLogger("lookalike.requests")

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

REQUESTS = Counter("lookalike_requests", "Inference requests answered", ["unit"])
RESPONSES = Counter("lookalike_responses", "Inference responses by HTTP status", ["unit", "status"])
SERVING = Gauge("lookalike_serving_info", "The model and index versions served (1 for the current pair)",
                ["unit", "model_version", "index_version"])
ERRORS = Counter("lookalike_errors", "Failed inference requests by kind", ["unit", "kind"])
IMAGES = Counter("lookalike_images", "Images processed", ["unit"])
REQUEST_SECONDS = Histogram("lookalike_request_seconds", "Latency of whole requests, any status", ["unit"],
                            buckets=_BUCKETS)
STAGE_SECONDS = Histogram("lookalike_stage_seconds", "Latency per serving stage", ["unit", "stage"], buckets=_BUCKETS)
CANCELLED = Counter("lookalike_cancelled", "Requests skipped because their caller gave up before their work began",
                    ["unit"])
CACHE_LOOKUPS = Counter("lookalike_cache_lookups", "Cache lookups by cache and result (hit or miss)",
                        ["unit", "cache", "result"])
INDEX_BUILT = Gauge("lookalike_index_built_timestamp_seconds", "When the served index version was built (Unix time)",
                    ["unit"])
BATCH_IMAGES = Histogram("lookalike_batch_images", "Images per embedding batch", ["unit"],
                         buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))


class RequestTrace:
    """Timings of one request's stages; `finish` records metrics and writes the log line."""

    def __init__(self, unit: str, request_id: str, **fields: Any):
        self.unit = unit
        self.request_id = request_id
        self.fields = dict(fields)
        self.stages_ms: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    @contextmanager
    def v2_errors(self) -> Iterator[None]:
        """Every failure inside becomes a v2 error with the status a client can act on (`as_v2_error`), and
        ends this request's record with it."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every failure becomes a v2 error with a status
            error = as_v2_error(exc, self.unit, self.request_id)
            self.finish(error)
            raise error from exc

    def add(self, name: str, seconds: float) -> None:
        STAGE_SECONDS.labels(self.unit, name).observe(seconds)
        self.stages_ms[name] = round(self.stages_ms.get(name, 0.0) + seconds * 1000, 3)

    def finish(self, error: BaseException | None = None, images: int = 0) -> None:
        REQUESTS.labels(self.unit).inc()
        REQUEST_SECONDS.labels(self.unit).observe(time.perf_counter() - self.started)
        if images:
            IMAGES.labels(self.unit).inc(images)
        record: dict[str, Any] = {"event": "infer", "unit": self.unit, "request_id": self.request_id,
                                  "status": 200, "images": images, **self.fields, "stages_ms": self.stages_ms,
                                  "total_ms": round((time.perf_counter() - self.started) * 1000, 3)}
        if error is not None:
            if hasattr(error, "traced"):
                error.traced = True
            kind = error_kind(error)
            ERRORS.labels(self.unit, kind).inc()
            record.update(status=status_of(to_v2(error)), error_kind=kind, error=str(error))
            RESPONSES.labels(self.unit, str(record["status"])).inc()
            # A client's mistake is a warning-free info line; only the servers' own failures are warnings.
            (request_log.warning if record["status"] >= 500 else request_log.info)(json_line(**record))
        else:
            RESPONSES.labels(self.unit, "200").inc()
            request_log.info(json_line(**record))


def observe_batch(unit: str, size: int) -> None:
    BATCH_IMAGES.labels(unit).observe(size)


def observe_cancelled(unit: str, count: int) -> None:
    CANCELLED.labels(unit).inc(count)


_serving: dict[str, tuple[str, str]] = {}


def set_serving_versions(unit: str, model_version: str, index_version: str) -> None:
    """Point the `lookalike_serving_info` gauge at the pair this unit serves now (and off the previous)."""
    previous = _serving.get(unit)
    if previous == (model_version, index_version):
        return
    if previous is not None:
        SERVING.labels(unit, *previous).set(0)
    SERVING.labels(unit, model_version, index_version).set(1)
    _serving[unit] = (model_version, index_version)


def configure_logging(level: int = logging.INFO) -> None:
    """Request lines as bare JSON on stdout; the project's other loggers in kserve's style.

    kserve configures only its own and uvicorn's loggers, so without this our INFO lines would vanish.
    """
    import sys

    requests = logging.StreamHandler(sys.stdout)
    requests.setFormatter(logging.Formatter("%(message)s"))
    request_log.handlers[:] = [requests]
    request_log.setLevel(level)
    request_log.propagate = False
    plain = logging.StreamHandler(sys.stderr)
    plain.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
    for name in ("lookalike",):
        logger = logging.getLogger(name)
        logger.handlers[:] = [plain]
        logger.setLevel(level)
        logger.propagate = False
    if not any(isinstance(f, PerCallLineFilter) for f in logging.getLogger("kserve").filters):
        logging.getLogger("kserve").addFilter(PerCallLineFilter())
    import warnings

    # kserve 0.21 builds responses with FastAPI's deprecated ORJSONResponse: one warning per request.
    warnings.filterwarnings("ignore", message=".*ORJSONResponse.*")


class PerCallLineFilter(logging.Filter):
    """Drops kserve's INFO line naming the method of every gRPC call ("grpc method: ...").

    Each request already leaves one JSON line with its id, status and timings; the extra line doubled
    the log volume and cost a formatted write on the request path of both servers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and isinstance(record.msg, str)
                    and record.msg.startswith("grpc method:"))
