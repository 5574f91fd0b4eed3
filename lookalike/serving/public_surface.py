"""What a server answers on its port: the inference, health and metadata routes of KServe v2, and nothing else.

kserve 0.21 mounts more than an InferenceService should expose to shoppers' apps: the model-repository
extension (`POST /v2/repository/models/<name>/unload` lets anyone take the model down, after which
every query fails while `/v2/health/ready` still says 200), the v1 protocol, and FastAPI's own error
shapes for unknown routes. Both servers therefore run behind:

- `PublicRoutes`, an ASGI middleware with an allow-list: `/`, `/metrics`, `/v2`, `/v2/health/live|ready`,
  `/v2/models/<name>` (metadata), `/v2/models/<name>/ready`, `/v2/models/<name>/infer` (and their
  `/versions/<v>/` forms). Everything else is a v2 error, 404, before any kserve code runs. The
  predictor may also allow `POST /v2/repository/models/<name>/load` (swapping to a new model/index pair)
  when it is started with `--enable_reload_route`, on a port only the cluster reaches.
- `ClosedRepository`, the repository extension handed to kserve's gRPC servicer (and REST routes):
  `unload` is always refused and `load` only where reloading is enabled, so gRPC is closed as REST is.
- `http_error_handler`: 404/405 and other HTTP errors as v2 errors (`{"error": ...}`), not `{"detail"}`.
"""
from __future__ import annotations

import json
import re
from typing import Any

from kserve.errors import ModelNotFound

from lookalike.serving.errors import NotFound

_NAME = r"[^/]+"
_MODEL = rf"/v2/models/{_NAME}(?:/versions/{_NAME})?"
PUBLIC = re.compile(rf"^(?:/|/metrics|/v2|/v2/health/(?:live|ready)|{_MODEL}|{_MODEL}/ready|{_MODEL}/infer)/?$")
RELOAD = re.compile(rf"^/v2/repository/models/{_NAME}/load/?$")


class PublicRoutes:
    """ASGI middleware: only the allowed paths reach the app; every other path is a v2 404."""

    def __init__(self, app: Any, allow_reload: bool = False):
        self.app = app
        self.allow_reload = allow_reload

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and not self.allowed(scope.get("path", "")):
            await _send_json(send, 404, {"error": f"{scope.get('path')} is not a route of this server; it serves "
                                                  f"POST /v2/models/<name>/infer and the v2 health and metadata "
                                                  f"routes"})
            return
        await self.app(scope, receive, send)

    def allowed(self, path: str) -> bool:
        return bool(PUBLIC.match(path) or (self.allow_reload and RELOAD.match(path)))


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class ClosedRepository:
    """The model-repository extension as the public sees it: no unload, no index; load only if allowed."""

    def __init__(self, registry: Any, allow_reload: bool = False):
        self._registry = registry
        self.allow_reload = allow_reload

    async def index(self, filter_ready: bool = False) -> list[dict[str, str]]:
        raise ModelNotFound("repository")  # kserve answers 404; the index is not public

    async def load(self, model_name: str) -> dict[str, Any]:
        if not self.allow_reload:
            raise NotFound("model loading is not available on this server")
        from kserve.protocol.model_repository_extension import ModelRepositoryExtension

        await ModelRepositoryExtension(self._registry).load(model_name)
        return {"name": model_name, "load": True}

    async def unload(self, model_name: str) -> dict[str, Any]:
        raise NotFound("model unloading is not available on this server")


async def http_error_handler(_request: Any, exc: Any) -> Any:
    """Starlette's HTTP errors (a wrong method on a known route, …) as v2 errors."""
    from fastapi.responses import JSONResponse

    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return JSONResponse(status_code=exc.status_code, content={"error": detail}, headers=getattr(exc, "headers", None))
