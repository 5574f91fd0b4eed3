"""Errors on the wire: what a client of either server is told, with which HTTP status and gRPC code.

The status of every error the project raises on purpose is the error's own (`lookalike.core.errors`,
read through `status_of`); this module only adds, in ONE table, what each status becomes on the wire:
its gRPC twin and the `kind` label the metrics count it under. `to_v2` turns any exception into the
`V2Error` a client receives (kserve's own errors included); `as_v2_error` does the same and logs a bug's
traceback, which never reaches the client.

`V2Error` subclasses grpc-interceptor's `GrpcException`, which kserve's gRPC interceptor already turns
into the status code; `lookalike.serving.protocol` registers the REST handler that does the same.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady

from lookalike.core.errors import LookalikeError, is_user_error, status_of

log = logging.getLogger(__name__)


class Wire(NamedTuple):
    grpc: StatusCode
    kind: str  # the `kind` label of lookalike_errors_total


WIRE: dict[int, Wire] = {
    400: Wire(StatusCode.INVALID_ARGUMENT, "bad_input"),
    404: Wire(StatusCode.NOT_FOUND, "not_found"),
    409: Wire(StatusCode.FAILED_PRECONDITION, "model_moved"),
    413: Wire(StatusCode.RESOURCE_EXHAUSTED, "too_large"),
    500: Wire(StatusCode.INTERNAL, "internal"),
    503: Wire(StatusCode.UNAVAILABLE, "unavailable"),
    504: Wire(StatusCode.DEADLINE_EXCEEDED, "timeout"),
}


class V2Error(GrpcException, LookalikeError):
    """An inference error a client can act on: an HTTP status, its gRPC twin, and a clear message."""

    status: int = 500

    def __init__(self, message: str, status: int | None = None):
        if status is not None:
            self.status = status if status in WIRE else 500
        super().__init__(details=message, status_code=WIRE[self.status].grpc)
        self.reason = message
        self.request_id: str | None = None  # set once the request's id is known; REST error bodies carry it
        self.traced = False  # whether a RequestTrace already counted and logged it
        self.retry_after_s: int | None = None  # sent as Retry-After when set (a full queue)

    @property
    def kind(self) -> str:
        return WIRE[self.status].kind

    def __str__(self) -> str:
        return self.details


class BadInput(V2Error):
    status = 400


class TooLarge(V2Error):
    status = 413


class NotFound(V2Error):
    status = 404


class ModelMoved(V2Error):
    """The predictor now serves another model version than the one the input was preprocessed for.

    Only the transformer sees it (it re-preprocesses for `model_version` and retries); the message starts
    with `model_version=<version>;` so the version survives the trip as a gRPC status detail.
    """

    status = 409
    PREFIX = "model_version="

    def __init__(self, model_version: str, message: str):
        super().__init__(f"{self.PREFIX}{model_version}; {message}")
        self.model_version = model_version

    @classmethod
    def version_in(cls, details: str) -> str | None:
        if not details.startswith(cls.PREFIX):
            return None
        return details[len(cls.PREFIX):].split(";", 1)[0].strip() or None


class Unavailable(V2Error):
    status = 503


class Overloaded(Unavailable):
    """Every worker is busy and the bounded queue is full: come back in `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Timeout(V2Error):
    status = 504


def status_for(code: StatusCode) -> int:
    """The HTTP status of a gRPC code a peer answered with: the table read backwards (413 for
    RESOURCE_EXHAUSTED), 500 for a code it does not hold."""
    return next((status for status, wire in WIRE.items() if wire.grpc == code), 500)


_KSERVE = {InvalidInput: BadInput, ModelNotFound: NotFound, ModelNotReady: Unavailable}


def to_v2(exc: BaseException, server: str = "server") -> V2Error:
    """The V2Error a client is told for `exc`: itself, kserve's own errors with their status, any other
    error of the Lookalike family with its status and message, anything else (a bug) as a 500 that names
    no internals."""
    if isinstance(exc, V2Error):
        return exc
    for kserve_type, v2_type in _KSERVE.items():
        if isinstance(exc, kserve_type):
            return v2_type(str(exc))
    if is_user_error(exc):
        return V2Error(str(exc), status=status_of(exc))
    return V2Error(f"internal error in the {server} ({type(exc).__name__}); the request id is in the server log")


def error_kind(exc: BaseException) -> str:
    """The metrics label of an exception: what kind of failure the client saw."""
    return to_v2(exc).kind


def as_v2_error(exc: BaseException, server: str, rid: str | None = None) -> V2Error:
    """`to_v2(exc)` with the request id `rid` in its body; a bug's traceback goes to the server's log."""
    error = to_v2(exc, server)
    if error.status == 500 and not isinstance(exc, V2Error):
        log.error("internal error in the %s (request %s)", server, rid, exc_info=exc)
    if rid and not error.request_id:
        error.request_id = rid
    return error
