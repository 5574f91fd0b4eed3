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

import base64
import binascii
import logging
import re
import uuid
from typing import Any

import numpy as np
import orjson
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

import kserve
from kserve.errors import ModelNotFound
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, RequestedOutput, to_http_parameters
from lookalike.serving.errors import BadInput, NotFound, Unavailable, V2Error
from lookalike.serving.limits import AdmissionGate, BodyLimit
from lookalike.serving.metrics import RequestTrace
from lookalike.serving.public_surface import ClosedRepository, PublicRoutes, http_error_handler

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# The most a client can ask of one search, for both servers: 100 listings is several screens of results;
# probing more than 1,024 lists of an IVF index is a near-exhaustive scan that costs 100x the default and
# finds almost nothing more (the index's own nprobe is tuned for recall@10 >= 0.95).
MAX_TOP_K = 100
MAX_NPROBE = 1024
# Search by listing ("more like this"): instead of a photo, a request may carry the listing ids (and, beside
# each, optionally one of its photo ids) as BYTES tensors [N] under these names; both servers read them
# with `listing_query`.
LISTING_INPUT = "listing_id"
PHOTO_INPUT = "photo_id"
MAX_ID_CHARS = 512
_UNIT = "server"  # which server this process is, for the metrics of requests refused before the model


async def _v2_error_handler(_request, exc: V2Error):
    if not exc.traced:  # refused before the model's own trace began (an unreadable body, an unknown model)
        RequestTrace(_UNIT, exc.request_id or "-").finish(exc)
    log.info("answered %d: %s", exc.status, exc.details)
    body: dict[str, Any] = {"error": exc.details}
    headers = {}
    if exc.request_id:
        body["request_id"] = exc.request_id
        headers[REQUEST_ID_HEADER] = exc.request_id
    if exc.retry_after_s:
        headers["retry-after"] = str(exc.retry_after_s)
    return JSONResponse(status_code=exc.status, content=body, headers=headers or None)


async def _validation_error_handler(_request, exc):
    """FastAPI answers a body that is not a v2 request with 422 and its own shape; v2 clients expect 400."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                         for e in exc.errors()[:5])
    return JSONResponse(status_code=400, content={"error": f"the body is not a KServe v2 inference request "
                                                            f"({problems or 'unreadable'})"})


# ---- requests -----------------------------------------------------------------------------------

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id(request: InferRequest, headers: dict[str, str] | None) -> str:
    """The id to log and answer with: the caller's x-request-id header, else the v2 id, else a new one.

    A caller's id travels on as gRPC metadata and into log lines, so only plain printable ASCII of a
    sane length is kept; anything else (non-ASCII, control characters, kilobytes) is replaced by a new id.
    """
    for rid in ((headers or {}).get(REQUEST_ID_HEADER), request.id):
        if rid and rid != "N.A." and _SAFE_ID.match(str(rid)):
            return str(rid)
    return uuid.uuid4().hex


def parameters_of(obj: Any) -> dict[str, Any]:
    """Request or tensor parameters as a plain dict, whether they came over REST (dict) or gRPC (map)."""
    params = getattr(obj, "parameters", None)
    if not params:
        return {}
    out = to_http_parameters(params)
    if not isinstance(params, dict):
        for key, value in params.items():
            if key not in out:  # a type kserve's proto lacks: it would be dropped without a word
                out[key] = _number_parameter(key, value)
    return out


def _number_parameter(key: str, value: Any) -> float | int:
    """Triton's v2 proto (tritonclient) adds double_param (field 4) and uint64_param (field 5) to
    InferParameter; kserve's proto lacks them, so such a value (top_k=2.0) arrives as an unknown field.
    Read it from the wire rather than ignore the parameter."""
    import struct

    raw = value.SerializeToString()
    if len(raw) == 9 and raw[0] == 0x21:  # field 4, 64-bit: a double
        return struct.unpack("<d", raw[1:9])[0]
    if raw[:1] == b"\x28":  # field 5, varint: an unsigned integer
        number, shift = 0, 0
        for byte in raw[1:]:
            number |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return number
    raise BadInput(f"parameter {shown(key)} has a type this server does not read; send it as an integer, a string "
                   f"or a boolean")


_INTEGER = re.compile(r"^\s*-?[0-9]{1,18}\s*$", re.ASCII)  # ASCII digits only: "²".isdigit() is True


def shown(value: Any, limit: int = 40) -> str:
    """A client's value as an error message quotes it: repr, cut to `limit` characters, so a megabyte
    parameter never reaches a log line whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def int_parameter(params: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    """An integer parameter between lo and hi (BadInput, naming the bounds, otherwise)."""
    value = params.get(name, default)
    if value is None:
        return None
    if isinstance(value, str) and _INTEGER.match(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or int(value) != value:
        raise BadInput(f"parameter {name!r} must be an integer between {lo} and {hi}, got {shown(value)}")
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
                       f"{shown(names[:5], 120) if names else 'no inputs'}")
    tensor = request.inputs[0]
    if tensor.datatype not in accepted:
        raise BadInput(f"input {name!r} must have datatype {expected} ({what}), got {tensor.datatype}")
    return tensor


def listing_query(request: InferRequest, max_items: int) -> tuple[list[str], list[str | None]] | None:
    """The listing ids (and beside each the photo id, or None) a search-by-listing request names; None when
    the request holds no `listing_id` input (a search by photo). BadInput for any other input beside them,
    shapes other than [N] or [N, 1], empty or overlong ids, or a photo_id tensor of another length."""
    names = [i.name for i in request.inputs]
    if LISTING_INPUT not in names:
        return None
    extra = [n for n in names if n not in (LISTING_INPUT, PHOTO_INPUT)]
    if extra or len(set(names)) != len(names):
        raise BadInput(f"a search by listing takes the inputs {LISTING_INPUT!r} (BYTES [N]) and optionally "
                       f"{PHOTO_INPUT!r} (BYTES [N]), each once; got {shown(names[:5], 120)}")
    tensors = {i.name: i for i in request.inputs}
    listings = _id_strings(tensors[LISTING_INPUT], max_items, allow_empty=False)
    photos: list[str | None] = [None] * len(listings)
    if PHOTO_INPUT in tensors:
        given = _id_strings(tensors[PHOTO_INPUT], max_items, allow_empty=True)
        if len(given) != len(listings):
            raise BadInput(f"input {PHOTO_INPUT!r} holds {len(given)} ids for {len(listings)} listings: name one "
                           f"photo per listing (an empty string: its first photo)")
        photos = [p or None for p in given]
    return listings, photos


def _id_strings(tensor: InferInput, max_items: int, allow_empty: bool) -> list[str]:
    if tensor.datatype != "BYTES":
        raise BadInput(f"input {tensor.name!r} must have datatype BYTES (ids as strings), got {tensor.datatype}")
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] == 0:
        raise BadInput(f"input {tensor.name!r} must have shape [N] or [N, 1] with N >= 1, got {shape}")
    if shape[0] > max_items:
        raise BadInput(f"{shape[0]} ids in input {tensor.name!r}; at most {max_items} per request")
    out = []
    for value in tensor_as_numpy(tensor).reshape(-1):
        if isinstance(value, (bytes, bytearray, np.bytes_)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise BadInput(f"input {tensor.name!r} holds bytes that are not UTF-8 text") from None
        if not isinstance(value, str) or len(value) > MAX_ID_CHARS or (not value and not allow_empty):
            raise BadInput(f"input {tensor.name!r} must hold ids of 1 to {MAX_ID_CHARS} characters, got "
                           f"{shown(value)}")
        out.append(value)
    return out


def maybe_base64(value: bytes) -> bytes:
    """A BYTES element as the bytes it carries: REST JSON sends bytes as base64 text, and raw JPEG, PNG or
    WebP bytes are never valid base64."""
    if value[:4] in (b"\xff\xd8\xff\xe0", b"\x89PNG", b"RIFF") or value[:3] == b"\xff\xd8\xff":
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return value


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


def requested(outputs: list[InferOutput], request: InferRequest | None) -> list[InferOutput]:
    """The outputs a request asked for by name (all when it named none), the same over REST and gRPC;
    kserve honours the `outputs` list over REST only. An output that does not exist is a BadInput."""
    wanted = [o.name for o in (getattr(request, "request_outputs", None) or [])]
    if not wanted:
        return outputs
    by_name = {o.name: o for o in outputs}
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise BadInput(f"no output named {', '.join(map(repr, unknown))}; the outputs are {', '.join(by_name)}")
    return [by_name[name] for name in wanted]


# ---- the REST decoder that keeps binary tensors binary ------------------------------------------

class BinaryDataPlane(DataPlane):
    """kserve's DataPlane, except that binary-extension inputs stay raw bytes (see the module doc), and the
    health routes say what is true:

    - ready (`/v2/health/ready`, gRPC ServerReady): kserve answers True once the server is up; here every
      model must also report itself healthy (the predictor: its pair is loaded and its micro-batcher is
      answering), and an unreachable predictor makes the transformer not ready rather than failing the probe;
    - live (`/v2/health/live`, `/`, gRPC ServerLive): a model whose worker is gone or stuck for long answers
      503, so Kubernetes restarts the pod instead of routing requests to a silent hang.
    """

    async def ready(self) -> bool:
        # With --enable_predictor_health_check kserve asks the predictor and lets a refused connection
        # escape as a 500 with the raw gRPC error; a predictor that does not answer means "not ready".
        try:
            up = await super().ready()
        except Exception as exc:  # noqa: BLE001
            log.info("not ready: the predictor does not answer (%s)", type(exc).__name__)
            return False
        for model in self._models():
            if not await model.healthy():
                log.warning("not ready: model %s is not answering requests", model.name)
                return False
        return up

    async def live(self) -> dict[str, str]:
        for model in self._models():
            alive = getattr(model, "alive", None)
            if alive is not None and not alive():
                raise Unavailable(f"model {model.name} is stuck: its worker has not finished a batch in time; "
                                  f"this server needs a restart")
        return await DataPlane.live()

    def _models(self) -> list:
        registry = self._model_registry
        return list(registry.get_models().values()) if registry is not None else []

    async def model_ready(self, model_name: str, disable_predictor_health_check: bool = False) -> bool:

        try:
            return await super().model_ready(model_name, disable_predictor_health_check)
        except ModelNotFound:
            raise NotFound(f"no model named {model_name!r} is served here") from None

    def decode_inference_request(self, body, headers, model_name):
        try:
            return self._decode(body, headers, model_name)
        except V2Error:
            raise
        except Exception as exc:  # noqa: BLE001 - kserve's parse errors and pydantic's are the client's input
            raise BadInput(f"the body is not a KServe v2 inference request: {str(exc).splitlines()[0]}") from None

    def _decode(self, body, headers, model_name):
        if isinstance(body, bytes) and headers.get("inference-header-content-length") is None:
            # A JSON body sent without `Content-Type: application/json` arrives as bytes: read it as JSON
            # (tritonclient.http does this with binary_data=False) rather than as a binary-extension body.
            from kserve.protocol.rest.v2_datamodels import InferenceRequest

            try:
                body = InferenceRequest.model_validate(orjson.loads(body))
            except orjson.JSONDecodeError:
                raise BadInput("the body is neither JSON nor a binary-extension request (which needs the "
                               "'Inference-Header-Content-Length' header)") from None
        if not isinstance(body, bytes):
            return super().decode_inference_request(body, headers, model_name)
        try:
            json_length = int(headers.get("inference-header-content-length"))
            if not 0 <= json_length <= len(body):
                raise ValueError(f"{json_length} is outside the body's {len(body)} bytes")
            header = orjson.loads(body[:json_length])
        except (ValueError, orjson.JSONDecodeError) as exc:
            raise BadInput(f"the JSON part of the request is not valid JSON: {exc}") from None
        if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
            raise BadInput("the request must be a JSON object with an 'inputs' list")
        inputs, offset = [], json_length
        for spec in header["inputs"]:
            if not isinstance(spec, dict) or not {"name", "shape", "datatype"} <= spec.keys():
                raise BadInput("every input needs 'name', 'shape' and 'datatype'")
            shape = spec["shape"]
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
                raise BadInput(f"input {spec['name']!r} has shape {shape!r}; a shape is a list of non-negative "
                               f"integers such as [1]")
            params = spec.get("parameters") or {}
            if not isinstance(params, dict):
                raise BadInput(f"the parameters of input {spec['name']!r} must be a JSON object")
            tensor = InferInput(spec["name"], list(spec["shape"]), str(spec["datatype"]), parameters=params)
            if spec.get("data") is not None:
                tensor.data = spec["data"]
            elif "binary_data_size" in params:
                size = params["binary_data_size"]
                if not isinstance(size, int) or size < 0 or offset + size > len(body):
                    raise BadInput(f"input {spec['name']!r} declares binary_data_size={size!r} but the body "
                                       f"holds {len(body) - offset} more bytes")
                tensor._raw_data = body[offset:offset + size]  # kserve has no public setter for raw data
                offset += size
            else:
                raise BadInput(f"input {spec['name']!r} has neither 'data' nor 'binary_data_size'")
            inputs.append(tensor)
        outputs = None
        if isinstance(header.get("outputs"), list):
            outputs = [RequestedOutput(o["name"], o.get("parameters")) for o in header["outputs"]
                       if isinstance(o, dict) and "name" in o]
        return InferRequest(model_name=model_name, infer_inputs=inputs, request_id=header.get("id"),
                            parameters=header.get("parameters"), request_outputs=outputs)


class ModelServer(kserve.ModelServer):
    """kserve's ModelServer with our error statuses, binary decoding and public surface wired in.

    `unit` (transformer or predictor) labels the metrics of requests refused before they reach the model;
    `allow_reload` opens `POST /v2/repository/models/<name>/load` (the predictor's swap, cluster-internal);
    `max_request_bytes` caps a request on both transports and `gate` admits REST requests before their
    body is read (`lookalike.serving.limits`); `host` is the address both transports listen on.
    """

    def __init__(self, *args, unit: str = "server", allow_reload: bool = False, max_request_bytes: int | None = None,
                 host: str = "0.0.0.0", gate: AdmissionGate | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dataplane = BinaryDataPlane(model_registry=self.registered_models)
        self.model_repository_extension = ClosedRepository(self.registered_models, allow_reload)
        from kserve.model_server import app

        global _UNIT
        _UNIT = unit
        if max_request_bytes:
            # One cap for both transports. kserve's gRPC server reads its message cap from the command line
            # it parsed at import (8 MiB by default, below what several phone photos may need): set it to
            # ours. REST bodies are counted by BodyLimit as they arrive and refused (413) past the cap.
            from kserve import model_server

            model_server.args.grpc_max_receive_message_length = int(max_request_bytes)
            app.add_middleware(BodyLimit, max_bytes=int(max_request_bytes), gate=gate, unit=unit)
        app.add_middleware(PublicRoutes, allow_reload=allow_reload)  # added last: runs first
        self.host = host
        app.add_exception_handler(V2Error, _v2_error_handler)
        app.add_exception_handler(RequestValidationError, _validation_error_handler)
        app.add_exception_handler(HTTPException, http_error_handler)

    def start(self, models: list) -> None:
        """kserve's start, with both transports bound to `host` (kserve binds every interface)."""
        from kserve import model_server

        if self.host not in ("0.0.0.0", "::"):
            model_server.RESTServer, model_server.GRPCServer = _servers_bound_to(self.host)
        super().start(models)


def _servers_bound_to(host: str) -> tuple[type, type]:
    """kserve's REST and gRPC servers listening on `host` only (e.g. 127.0.0.1 for a local stack)."""
    from concurrent import futures

    from kserve.protocol.grpc import server as grpc_server
    from kserve.protocol.rest.server import RESTServer

    class BoundRESTServer(RESTServer):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.config.host = host  # uvicorn reads it when it binds, after this

    class BoundGRPCServer(grpc_server.GRPCServer):
        async def start(self, max_workers: int) -> None:  # kserve's, but for the listen address
            servicer = grpc_server.InferenceServicer(self._data_plane, self._model_repository_extension)
            self._server = grpc_server.aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(grpc_server.LoggingInterceptor(), grpc_server.ExceptionToStatusInterceptor()),
                options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                         ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length"))])
            grpc_server.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
            self._server.add_insecure_port(f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}")
            await self._server.start()
            await self._server.wait_for_termination()

    return BoundRESTServer, BoundGRPCServer


__all__ = ["ModelServer", "BinaryDataPlane", "REQUEST_ID_HEADER", "request_id", "parameters_of", "int_parameter",
           "single_input", "listing_query", "maybe_base64", "LISTING_INPUT", "PHOTO_INPUT", "tensor_as_numpy",
           "wants_binary", "output", "requested"]
