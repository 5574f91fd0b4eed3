"""KServe v2 plumbing the transformer and the predictor share: errors with the right status on REST and
gRPC, binary tensors kept binary, request ids, and the model server that wires these in.

Why this exists (kserve 0.21):

- kserve maps only a few exception types to statuses (400, 404, 503; everything else is a 500). Our
  `V2Error`s carry their HTTP status, and subclass grpc-interceptor's `GrpcException`, which kserve's
  gRPC interceptor already turns into that status code; for REST we register one handler for them.
- kserve's REST decoder turns every binary tensor of a request into a JSON-style list, which both wastes
  time on FP32 images and fails on BYTES that are not UTF-8 (a JPEG always is not). `BinaryDataPlane`
  keeps binary-extension inputs as raw buffers, so `as_numpy()` is a zero-copy view.
- a v2 request may come without an `id`; responses must still carry one (we generate it).
"""
from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import numpy as np
import orjson
from fastapi.exceptions import RequestValidationError
from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException

import kserve
from kserve.errors import InvalidInput
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, RequestedOutput, to_http_parameters

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_GRPC_STATUS = {
    400: StatusCode.INVALID_ARGUMENT,
    404: StatusCode.NOT_FOUND,
    409: StatusCode.FAILED_PRECONDITION,
    413: StatusCode.RESOURCE_EXHAUSTED,
    500: StatusCode.INTERNAL,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.DEADLINE_EXCEEDED,
}
_HTTP_FROM_GRPC = {code: status for status, code in _GRPC_STATUS.items()}


class V2Error(GrpcException):
    """An inference error a client can act on: an HTTP status, its gRPC twin, and a clear message."""

    status: int = 500
    kind: str = "internal"

    def __init__(self, message: str, status: int | None = None, kind: str | None = None):
        if status is not None:
            self.status = status
        if kind is not None:
            self.kind = kind
        super().__init__(details=message, status_code=_GRPC_STATUS.get(self.status, StatusCode.UNKNOWN))
        self.reason = message

    def __str__(self) -> str:
        return self.details


class BadInput(V2Error):
    status, kind = 400, "bad_input"


class TooLarge(V2Error):
    status, kind = 413, "too_large"


class NotFound(V2Error):
    status, kind = 404, "not_found"


class ModelMoved(V2Error):
    """The predictor now serves another model version than the one the input was preprocessed for.

    Only the transformer sees it (it re-preprocesses for `model_version` and retries); the message starts
    with `model_version=<version>;` so the version survives the trip as a gRPC status detail.
    """

    status, kind = 409, "model_moved"
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
    status, kind = 503, "unavailable"


class Timeout(V2Error):
    status, kind = 504, "timeout"


def http_status_of_grpc(code: StatusCode) -> int:
    return _HTTP_FROM_GRPC.get(code, 500)


async def _v2_error_handler(_request, exc: V2Error):
    from fastapi.responses import JSONResponse

    log.info("answered %d: %s", exc.status, exc.details)
    return JSONResponse(status_code=exc.status, content={"error": exc.details})


async def _validation_error_handler(_request, exc):
    """FastAPI answers a body that is not a v2 request with 422 and its own shape; v2 clients expect 400."""
    from fastapi.responses import JSONResponse

    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                         for e in exc.errors()[:5])
    return JSONResponse(status_code=400, content={"error": f"the body is not a KServe v2 inference request "
                                                            f"({problems or 'unreadable'})"})


def error_kind(exc: BaseException) -> str:
    """The metrics label of an exception: what kind of failure the client saw."""
    from kserve.errors import ModelNotFound, ModelNotReady

    if isinstance(exc, V2Error):
        return exc.kind
    if isinstance(exc, InvalidInput):
        return "bad_input"
    if isinstance(exc, ModelNotFound):
        return "not_found"
    if isinstance(exc, ModelNotReady):
        return "unavailable"
    return "internal"


# ---- requests -----------------------------------------------------------------------------------

def request_id(request: InferRequest, headers: dict[str, str] | None) -> str:
    """The id to log and answer with: the caller's x-request-id header, else the v2 id, else a new one."""
    rid = (headers or {}).get(REQUEST_ID_HEADER) or request.id
    if not rid or rid == "N.A.":
        rid = uuid.uuid4().hex
    return str(rid)


def parameters_of(obj: Any) -> dict[str, Any]:
    """Request or tensor parameters as a plain dict, whether they came over REST (dict) or gRPC (map)."""
    params = getattr(obj, "parameters", None)
    if not params:
        return {}
    out = to_http_parameters(params)
    for key, value in list(out.items()):  # gRPC double_param is not converted by kserve
        if hasattr(value, "HasField") and value.HasField("double_param"):
            out[key] = value.double_param
    return out


def int_parameter(params: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = params.get(name, default)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise BadInput(f"parameter {name!r} must be an integer, got {value!r}")
    value = int(value)
    if not lo <= value <= hi:
        raise BadInput(f"parameter {name!r} must be between {lo} and {hi}, got {value}")
    return value


def single_input(request: InferRequest, name: str, datatype: str | tuple[str, ...], what: str) -> InferInput:
    """The one input tensor a model takes, or a BadInput naming what was expected.

    `datatype` is the datatype the tensor must have, or a tuple of those accepted.
    """
    accepted = (datatype,) if isinstance(datatype, str) else tuple(datatype)
    expected = " or ".join(accepted)
    names = [i.name for i in request.inputs]
    if len(request.inputs) != 1 or request.inputs[0].name != name:
        raise BadInput(f"expected one input tensor named {name!r} ({expected}, {what}); got "
                       f"{names or 'no inputs'}")
    tensor = request.inputs[0]
    if tensor.datatype not in accepted:
        raise BadInput(f"input {name!r} must have datatype {expected} ({what}), got {tensor.datatype}")
    return tensor


def tensor_as_numpy(tensor: InferInput) -> np.ndarray:
    try:
        return tensor.as_numpy()
    except V2Error:
        raise
    except Exception as exc:  # noqa: BLE001 - shape/data disagreements of a malformed request
        raise BadInput(f"input {tensor.name!r} has data that does not match its shape {tensor.shape} and "
                       f"datatype {tensor.datatype}: {exc}") from exc


def wants_binary(request: InferRequest) -> bool:
    """Whether outputs go back as raw bytes: always over gRPC, over REST when the client asked."""
    return bool(request.from_grpc or request.use_binary_outputs)


def output(name: str, array: np.ndarray, datatype: str, binary: bool) -> InferOutput:
    """An output tensor with its data set the way kserve 0.21 serialises without tripping over numpy."""
    tensor = InferOutput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def json_line(**fields: Any) -> str:
    return json.dumps(fields, default=str, separators=(",", ":"))


# ---- the REST decoder that keeps binary tensors binary ------------------------------------------

class BinaryDataPlane(DataPlane):
    """kserve's DataPlane, except that binary-extension inputs stay raw bytes (see the module doc), and an
    unreachable predictor makes the transformer not ready rather than failing the readiness probe."""

    async def ready(self) -> bool:
        # With --enable_predictor_health_check kserve asks the predictor and lets a refused connection
        # escape as a 500 with the raw gRPC error; a predictor that does not answer means "not ready".
        try:
            return await super().ready()
        except Exception as exc:  # noqa: BLE001
            log.info("not ready: the predictor does not answer (%s)", type(exc).__name__)
            return False

    def decode_inference_request(self, body, headers, model_name):
        if not isinstance(body, bytes):
            return super().decode_inference_request(body, headers, model_name)
        json_length = headers.get("inference-header-content-length")
        if json_length is None:
            raise InvalidInput("received a binary body without the 'Inference-Header-Content-Length' header")
        try:
            json_length = int(json_length)
            header = orjson.loads(body[:json_length])
        except (ValueError, orjson.JSONDecodeError) as exc:
            raise InvalidInput(f"the JSON part of the request is not valid JSON: {exc}") from exc
        if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
            raise InvalidInput("the request must be a JSON object with an 'inputs' list")
        inputs, offset = [], json_length
        for spec in header["inputs"]:
            if not isinstance(spec, dict) or not {"name", "shape", "datatype"} <= spec.keys():
                raise InvalidInput("every input needs 'name', 'shape' and 'datatype'")
            params = spec.get("parameters") or {}
            tensor = InferInput(spec["name"], list(spec["shape"]), str(spec["datatype"]), parameters=params)
            if spec.get("data") is not None:
                tensor.data = spec["data"]
            elif "binary_data_size" in params:
                size = params["binary_data_size"]
                if not isinstance(size, int) or size < 0 or offset + size > len(body):
                    raise InvalidInput(f"input {spec['name']!r} declares binary_data_size={size!r} but the body "
                                       f"holds {len(body) - offset} more bytes")
                tensor._raw_data = body[offset:offset + size]  # kserve has no public setter for raw data
                offset += size
            else:
                raise InvalidInput(f"input {spec['name']!r} has neither 'data' nor 'binary_data_size'")
            inputs.append(tensor)
        outputs = None
        if isinstance(header.get("outputs"), list):
            outputs = [RequestedOutput(o["name"], o.get("parameters")) for o in header["outputs"]
                       if isinstance(o, dict) and "name" in o]
        return InferRequest(model_name=model_name, infer_inputs=inputs, request_id=header.get("id"),
                            parameters=header.get("parameters"), request_outputs=outputs)


class ModelServer(kserve.ModelServer):
    """kserve's ModelServer with our error statuses and binary decoding wired in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dataplane = BinaryDataPlane(model_registry=self.registered_models)
        from kserve.model_server import app

        app.add_exception_handler(V2Error, _v2_error_handler)
        app.add_exception_handler(RequestValidationError, _validation_error_handler)


def status_of(exc: BaseException) -> int:
    if isinstance(exc, V2Error):
        return exc.status
    return {"bad_input": 400, "not_found": 404, "unavailable": 503}.get(error_kind(exc), 500)


__all__ = ["V2Error", "BadInput", "TooLarge", "NotFound", "ModelMoved", "Unavailable", "Timeout", "ModelServer",
           "BinaryDataPlane", "request_id", "parameters_of", "int_parameter", "single_input", "tensor_as_numpy",
           "error_kind", "status_of", "http_status_of_grpc", "json_line"]
