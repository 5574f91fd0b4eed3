"""The requests the transformer sends the predictor besides pixels: a search by listing, and a probe of the
predictor's caches by content key (`lookalike.serving.photo_cache`), and how a probe's miss reads."""
from __future__ import annotations

from typing import Any

import numpy as np

from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse, to_http_parameters
from lookalike.serving.photo_cache import KEYS_INPUT, MISS_PARAMETER
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


__all__ = ["listing_request", "probe_request", "is_miss"]
