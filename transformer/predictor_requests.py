"""The transformer's link to the predictor: the tensors and requests it sends (the preprocessed pixels as
FP16, a search by listing, a probe of the predictor's caches by content key, `lookalike.serving.photo_cache`),
and how the predictor's answers read (a probe's miss, its gRPC errors as what the client is told)."""
from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse, to_http_parameters
from lookalike.core.errors import InputError
from lookalike.serving.errors import ModelMoved, NotFound, Timeout, Unavailable, V2Error, status_for
from lookalike.serving.photo_cache import KEYS_INPUT, MISS_PARAMETER, content_key
from lookalike.serving.protocol import LISTING_INPUT, PHOTO_INPUT


def _strings(name: str, values: list[str]) -> InferInput:
    tensor = InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=object), binary_data=True)
    return tensor


def listing_request(model_name: str, rid: str, listing_ids: list[str], photo_ids: list[str | None],
                    parameters: dict[str, Any]) -> InferRequest:
    """Search by listing: the ids travel on as BYTES tensors (an empty photo id: the listing's first)."""
    inputs = [_strings(LISTING_INPUT, listing_ids)]
    if any(p is not None for p in photo_ids):
        inputs.append(_strings(PHOTO_INPUT, [p or "" for p in photo_ids]))
    return InferRequest(model_name=model_name, infer_inputs=inputs, request_id=rid, parameters=parameters)


def probe_request(model_name: str, rid: str, keys: list[str], parameters: dict[str, Any]) -> InferRequest:
    """Ask for the answer of photos seen before by their content keys alone (no pixels)."""
    return InferRequest(model_name=model_name, infer_inputs=[_strings(KEYS_INPUT, keys)], request_id=rid,
                        parameters=parameters)


def is_miss(response: InferResponse) -> bool:
    """Whether the predictor could not answer a probe from its caches (then the pixels must be sent)."""
    params = response.parameters
    return bool(params) and bool(to_http_parameters(params).get(MISS_PARAMETER))


PREDICTOR_INPUT = "images"  # the predictor's input: preprocessed pixels
WIRE_DTYPES = {"FP16": np.float16, "FP32": np.float32}


def predictor_tensor(batch: np.ndarray, datatype: str = "FP16") -> InferInput:
    """The preprocessed batch as the predictor's binary input tensor.

    FP16 halves the bytes between the two servers (602 KB -> 301 KB per 224-px image), which is most of
    what the hop costs, and loses nothing: the values are 8-bit pixel levels, normalised, and FP16's
    error (under 2^-11 of the value) stays far below half the distance between two levels, so every
    value still names its exact pixel level. The predictor widens it back to FP32 before the model.
    """
    if datatype not in WIRE_DTYPES:
        raise InputError(f"predictor datatype must be one of {', '.join(WIRE_DTYPES)}, got {datatype!r}")
    tensor = InferInput(PREDICTOR_INPUT, list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch.astype(WIRE_DTYPES[datatype], copy=False), binary_data=True)
    return tensor


def content_keys(items: list[bytes], box: tuple[float, float, float, float] | None) -> list[str]:
    return [content_key(item, box) for item in items]


def to_plain(params: Any) -> dict[str, Any]:
    if not params:
        return {}
    from kserve.protocol.infer_type import to_http_parameters

    return to_http_parameters(params)


def predictor_error(exc: grpc.aio.AioRpcError, host: str, timeout: float, by_listing: bool = False) -> V2Error:
    """What the client is told when the predictor answers with a gRPC error (its status read back through
    the wire table): the predictor's own client errors as they are (a listing it does not hold: 404), the
    rest said from our side."""
    status, details = status_for(exc.code()), exc.details() or ""
    if status == 504:
        return Timeout(f"the predictor at {host} did not answer within {timeout:g} s; retry later")
    if status == 503:
        first_line = details.splitlines()[0] if details else "unavailable"
        return Unavailable(f"the predictor at {host} is not reachable or not ready ({first_line}); "
                           f"retry shortly")
    if status == 409 and ModelMoved.version_in(details):
        return ModelMoved(ModelMoved.version_in(details), details.split(";", 1)[-1].strip())
    if status in (400, 413):
        return V2Error(details, status=status)
    if status == 404 and by_listing:
        return NotFound(details)
    if status == 404:
        return Unavailable(f"the predictor at {host} does not serve this model ({details})")
    return V2Error(f"the predictor failed: {details or exc.code().name}")


__all__ = ["listing_request", "probe_request", "is_miss", "predictor_tensor", "predictor_error", "content_keys",
           "to_plain", "WIRE_DTYPES"]
