"""The v2 layer both servers share: binary tensors stay binary, every error has one status, one gRPC code
and one metrics kind (the table in lookalike/serving/errors.py), and a client is never shown a bug."""
from __future__ import annotations

import io

import numpy as np
import pytest
from grpc import StatusCode
from PIL import Image

from lookalike.core.errors import InputError, LookalikeError, NotFoundError, TooLargeError, UnavailableError, status_of
from lookalike.serving.errors import (WIRE, BadInput, ModelMoved, NotFound, Overloaded, Timeout, TooLarge,
                                      Unavailable, V2Error, as_v2_error, error_kind, to_v2)


def test_binary_rest_inputs_stay_binary_and_errors_carry_their_status():
    from grpc import StatusCode

    from kserve.protocol.infer_type import InferInput, InferRequest
    from lookalike.serving.errors import Timeout, TooLarge
    from lookalike.serving.protocol import BinaryDataPlane

    photo = _png_bytes(Image.new("RGB", (3, 3), "blue"))  # not UTF-8: kserve's own decoder fails on it
    pixels = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    image = InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([photo], dtype=object), binary_data=True)
    images = InferInput("images", [1, 3, 2, 2], "FP32")
    images.set_data_from_numpy(pixels, binary_data=True)
    body, json_length = InferRequest("m", [image, images], request_id="r1").to_rest()
    decoded = BinaryDataPlane(model_registry=None).decode_inference_request(
        body, {"inference-header-content-length": str(json_length)}, "m")
    assert decoded.id == "r1"
    assert decoded.inputs[0].as_numpy()[0] == photo
    assert np.array_equal(decoded.inputs[1].as_numpy(), pixels)

    assert (TooLarge("x").status, TooLarge("x").status_code) == (413, StatusCode.RESOURCE_EXHAUSTED)
    assert (Timeout("x").status, Timeout("x").status_code) == (504, StatusCode.DEADLINE_EXCEEDED)


@pytest.mark.parametrize("error, status, code, kind", [
    (BadInput("x"), 400, StatusCode.INVALID_ARGUMENT, "bad_input"),
    (NotFound("x"), 404, StatusCode.NOT_FOUND, "not_found"),
    (ModelMoved("v2", "x"), 409, StatusCode.FAILED_PRECONDITION, "model_moved"),
    (TooLarge("x"), 413, StatusCode.RESOURCE_EXHAUSTED, "too_large"),
    (Unavailable("x"), 503, StatusCode.UNAVAILABLE, "unavailable"),
    (Overloaded("x", retry_after_s=2), 503, StatusCode.UNAVAILABLE, "unavailable"),
    (Timeout("x"), 504, StatusCode.DEADLINE_EXCEEDED, "timeout"),
    (V2Error("x"), 500, StatusCode.INTERNAL, "internal"),
])
def test_each_v2_error_has_one_status_code_and_kind(error, status, code, kind):
    assert (error.status, error.status_code, error.kind) == (status, code, kind)
    assert status_of(error) == status and error_kind(error) == kind  # the one status_of reads V2Errors too
    assert WIRE[status].grpc == code


@pytest.mark.parametrize("exc, status", [
    (InputError("a bad parameter"), 400),  # unwrapped: still the client's mistake, not a 500
    (TooLargeError("too many pixels"), 413),
    (NotFoundError("no such version"), 404),
    (UnavailableError("the store is down"), 503),
    (ValueError("a bug"), 500),
    (KeyError("internal"), 500),
])
def test_family_errors_keep_their_status_through_the_wire(exc, status):
    assert status_of(to_v2(exc)) == status
    assert error_kind(exc) == WIRE[status].kind
    told = as_v2_error(exc, "predictor", rid="r-1")
    assert told.status == status and told.request_id == "r-1"
    if status == 500:
        assert str(exc) not in told.details and "request id" in told.details  # a bug names no internals
    else:
        assert str(exc).strip("'") in told.details


def test_kserve_errors_get_their_status():
    from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady

    assert [to_v2(e).status for e in (InvalidInput("x"), ModelNotFound("m"), ModelNotReady("m"))] == [400, 404, 503]


def test_overloaded_answers_carry_retry_after():
    assert Overloaded("queue full", retry_after_s=3).retry_after_s == 3
    assert isinstance(Overloaded("x"), Unavailable) and isinstance(Overloaded("x"), LookalikeError)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
