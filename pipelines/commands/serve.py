"""`lookalike serve` and `lookalike query`: the InferenceService's two halves on one machine, and a client.

`serve` starts the store if it is not running, then the predictor and the transformer as two KServe model
server processes (REST and gRPC each), exactly as the two containers of the InferenceService, prints the
endpoints, and stops everything in order on Ctrl-C. `query` sends photos to the transformer over KServe
v2 and prints the matches; `--html` also writes a page with each photo beside its matches.

`ServingStack` (the two processes, started and stopped together) is also what the tests and
benchmarks/serving.py run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ORDER = 60
REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "lookalike"


def lookalike_home() -> Path:
    return Path(os.environ.get("LOOKALIKE_HOME", ".lookalike"))


class ServingStack:
    """The predictor and the transformer as child processes on loopback ports."""

    def __init__(self, env: dict[str, str] | None = None, *, model_version: str = "production",
                 index_version: str = "latest", ports: dict[str, int] | None = None, log_dir: str | Path | None = None,
                 predictor_args: Sequence[str] = (), transformer_args: Sequence[str] = (), name: str = MODEL_NAME,
                 predictor_timeout_s: float = 10.0):
        from storage.server import free_port

        self.env = dict(os.environ if env is None else env)
        self.name = name
        ports = dict(ports or {})
        for key in ("predictor_http", "predictor_grpc", "transformer_http", "transformer_grpc"):
            ports.setdefault(key, free_port())
        self.ports = ports
        self.model_version, self.index_version = model_version, index_version
        self.log_dir = Path(log_dir or lookalike_home() / "logs")
        self.predictor_args, self.transformer_args = list(predictor_args), list(transformer_args)
        self.predictor_timeout_s = predictor_timeout_s
        self.predictor: subprocess.Popen | None = None
        self.transformer: subprocess.Popen | None = None

    # ---- endpoints ---------------------------------------------------------------------------
    @property
    def endpoints(self) -> dict[str, str]:
        p = self.ports
        return {"transformer_rest": f"http://127.0.0.1:{p['transformer_http']}",
                "transformer_grpc": f"127.0.0.1:{p['transformer_grpc']}",
                "predictor_rest": f"http://127.0.0.1:{p['predictor_http']}",
                "predictor_grpc": f"127.0.0.1:{p['predictor_grpc']}"}

    # ---- processes ---------------------------------------------------------------------------
    def _spawn(self, module: str, args: list[str], log_name: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / log_name, "ab")
        try:
            return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # Ctrl-C reaches us; we stop them in order
        finally:
            log.close()

    def start_predictor(self, timeout_s: float = 180.0) -> None:
        p = self.ports
        self.predictor = self._spawn("predictor", [
            "--model_name", self.name, "--http_port", str(p["predictor_http"]), "--grpc_port", str(p["predictor_grpc"]),
            "--model_version", self.model_version, "--index_version", self.index_version,
            "--enable_latency_logging", "false", *self.predictor_args], "predictor.log")
        self._wait_ready(self.predictor, self.endpoints["predictor_rest"], "predictor", timeout_s)

    def start_transformer(self, timeout_s: float = 120.0, predictor_host: str | None = None) -> None:
        p = self.ports
        self.transformer = self._spawn("transformer", [
            "--model_name", self.name, "--http_port", str(p["transformer_http"]),
            "--grpc_port", str(p["transformer_grpc"]),
            "--predictor_host", predictor_host or self.endpoints["predictor_grpc"],
            "--model_version", self.model_version, "--predictor_timeout", str(self.predictor_timeout_s),
            "--enable_latency_logging", "false", *self.transformer_args], "transformer.log")
        self._wait_ready(self.transformer, self.endpoints["transformer_rest"], "transformer", timeout_s)

    def start(self) -> "ServingStack":
        try:
            self.start_predictor()
            self.start_transformer()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, proc: subprocess.Popen, base: str, what: str, timeout_s: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        url = f"{base}/v2/models/{self.name}/ready"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the {what} exited at start (code {proc.returncode}):\n{self.log_tail(what)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {what} was not ready within {timeout_s:.0f} s:\n{self.log_tail(what)}")
            time.sleep(0.2)

    def log_tail(self, what: str, lines: int = 30) -> str:
        path = self.log_dir / f"{what}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Transformer first (no new requests reach the predictor), then the predictor."""
        for attr in ("transformer", "predictor"):
            proc = getattr(self, attr)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            setattr(self, attr, None)

    def alive(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.predictor, self.transformer))

    def __enter__(self) -> "ServingStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- command line --------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the predictor and transformer locally (KServe v2, REST and gRPC)",
                       description="Start the store if needed, then the predictor (model + index) and the transformer "
                                   "(decoding, preprocessing, listing metadata) as two KServe model servers on "
                                   "loopback ports, REST and gRPC each. Prints the endpoints; Ctrl-C stops all.")
    p.add_argument("--model-version", default=os.environ.get("LOOKALIKE_MODEL_VERSION", "production"),
                   help="model version or alias (default production; falls back to the newest version)")
    p.add_argument("--index-version", default=os.environ.get("LOOKALIKE_INDEX_VERSION", "latest"),
                   help="index version or alias of that model (default latest)")
    p.add_argument("--port", type=int, default=8080,
                   help="transformer REST port; transformer gRPC is PORT+1, predictor REST/gRPC PORT+5/PORT+6 "
                        "(default 8080)")
    p.add_argument("--refresh-seconds", type=float, default=30.0,
                   help="how often the predictor checks whether the aliases moved, to swap (0: never; default 30)")
    p.set_defaults(func=_serve)

    q = sub.add_parser("query", help="search with photos through the running transformer",
                       description="Send photos to the transformer (KServe v2 REST, binary tensors) and print each "
                                   "photo's predicted labels and best matches. --html also writes a page with the "
                                   "photo beside its matches (images inlined).")
    q.add_argument("photos", nargs="+", type=Path, metavar="PHOTO", help="JPEG, PNG or WebP files")
    q.add_argument("--url", default=None,
                   help="transformer REST endpoint (default: the one `lookalike serve` recorded, else "
                        "http://127.0.0.1:8080)")
    q.add_argument("--top-k", type=int, default=5, help="matches per photo (default 5)")
    q.add_argument("--filter", default=None,
                   help="restrict matches, e.g. category=footwear or category=predicted")
    q.add_argument("--html", type=Path, default=None, metavar="OUT", help="also write an HTML page of the results")
    q.set_defaults(func=_query)


def _ensure_store() -> Any:
    """The configured store; on a loopback endpoint that does not answer, start the embedded one."""
    from storage.s3 import S3Settings, StoreError, connect
    from storage.server import EmbeddedS3Server

    try:
        connect()
        return None
    except StoreError:
        settings = S3Settings.from_env()
        host, _, port = settings.endpoint.partition(":")
        if host not in ("127.0.0.1", "localhost"):
            raise
    server = EmbeddedS3Server(lookalike_home() / "s3", port=int(port or 9000), access_key=settings.access_key,
                              secret_key=settings.secret_key, bucket=settings.bucket)
    server.start()
    print(f"started the embedded S3 server at {server.settings.url} (data in {server.data_dir})", flush=True)
    return server


def _serve(args: argparse.Namespace) -> int:
    from pipelines.cli import CommandError
    from storage.s3 import connect

    s3 = _ensure_store()
    stack = None
    stop = False

    def _handle(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _handle)
    try:
        from predictor.service import resolve_model

        store = connect()
        model_version = resolve_model(store, args.model_version)  # a clear error now, not in a child's log
        ports = {"transformer_http": args.port, "transformer_grpc": args.port + 1,
                 "predictor_http": args.port + 5, "predictor_grpc": args.port + 6}
        stack = ServingStack(model_version=args.model_version, index_version=args.index_version, ports=ports,
                             predictor_args=["--refresh_seconds", str(args.refresh_seconds)])
        print(f"starting the predictor (model {model_version}, index {args.index_version}) and the transformer; "
              f"logs in {stack.log_dir}", flush=True)
        try:
            stack.start()
        except RuntimeError as exc:
            raise CommandError(str(exc)) from exc
        endpoints = stack.endpoints
        (lookalike_home()).mkdir(parents=True, exist_ok=True)
        (lookalike_home() / "serve.json").write_text(json.dumps(endpoints, indent=2))
        print("serving (KServe v2):")
        print(f"  transformer  REST {endpoints['transformer_rest']}/v2/models/{MODEL_NAME}/infer"
              f"   gRPC {endpoints['transformer_grpc']}")
        print(f"  predictor    REST {endpoints['predictor_rest']}/v2/models/{MODEL_NAME}/infer"
              f"   gRPC {endpoints['predictor_grpc']}")
        print(f"  metrics      {endpoints['transformer_rest']}/metrics  {endpoints['predictor_rest']}/metrics")
        print("try: lookalike query PHOTO.jpg --html results.html     Ctrl-C stops all.", flush=True)
        while not stop and stack.alive():
            time.sleep(0.5)
        if not stop and not stack.alive():
            print("a server exited unexpectedly; see its log in", stack.log_dir, file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        pass
    finally:
        if stack is not None:
            stack.stop()
        if s3 is not None:
            s3.stop()
        print("stopped", flush=True)
    return 0


# ---- query ---------------------------------------------------------------------------------------

def _default_url() -> str:
    recorded = lookalike_home() / "serve.json"
    if recorded.exists():
        try:
            return json.loads(recorded.read_text())["transformer_rest"]
        except (ValueError, KeyError):
            pass
    return "http://127.0.0.1:8080"


def query_photos(url: str, photos: Sequence[bytes], *, top_k: int = 5, filter: str | None = None,
                 timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """POST photos to the transformer (binary BYTES tensor); one {labels, matches} document per photo."""
    import asyncio

    import numpy as np
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def call():
        tensor = InferInput("image", [len(photos)], "BYTES")
        tensor.set_data_from_numpy(np.array(list(photos), dtype=object), binary_data=True)
        params: dict[str, Any] = {"top_k": top_k}
        if filter:
            params["filter"] = filter
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=timeout_s, retries=0))
        try:
            return await client.infer(url, InferRequest(MODEL_NAME, [tensor], parameters=params), model_name=MODEL_NAME)
        finally:
            await client.close()

    response = asyncio.run(call())
    matches = next(o for o in response.outputs if o.name == "matches")
    return [json.loads(v if isinstance(v, str) else v.decode()) for v in matches.as_numpy().reshape(-1)]


def _query(args: argparse.Namespace) -> int:
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise in a table

    from pipelines.cli import CommandError

    photos = []
    for path in args.photos:
        if not path.is_file():
            raise CommandError(f"{path} is not a file")
        photos.append(path.read_bytes())
    url = args.url or _default_url()
    try:
        results = query_photos(url, photos, top_k=args.top_k, filter=args.filter)
    except httpx.HTTPStatusError as exc:
        raise CommandError(f"the transformer answered {exc.response.status_code}: "
                           f"{_error_text(exc.response)}") from exc
    except httpx.TransportError as exc:
        raise CommandError(f"no transformer answers at {url} ({exc}); start one with `lookalike serve`") from exc
    for path, result in zip(args.photos, results):
        labels = ", ".join(f"{t}={v['label']} ({v['probability']:.2f})" for t, v in result["labels"].items())
        print(f"\n{path}: {labels}")
        print(f"  {'#':>2}  {'score':>6}  {'listing':<24} {'category':<12} title")
        for rank, m in enumerate(result["matches"], 1):
            print(f"  {rank:>2}  {m['score']:>6.3f}  {m['listing_id']:<24} {m['category']:<12} {m['title']}")
        if not result["matches"]:
            print("  (no matches)")
    if args.html:
        write_html(args.html, list(zip(args.photos, photos, results)))
        print(f"\nwrote {args.html}")
    return 0


def _error_text(response) -> str:
    try:
        return response.json().get("error", response.text)
    except ValueError:
        return response.text


def _data_uri(data: bytes) -> str:
    import base64

    kind = "image/png" if data[:4] == b"\x89PNG" else "image/webp" if data[:4] == b"RIFF" else "image/jpeg"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _image_bytes(uri: str, stores: dict) -> bytes | None:
    from storage.s3 import ObjectStore, S3Settings, parse_s3_uri

    try:
        if uri.startswith("s3://"):
            bucket, key = parse_s3_uri(uri)
            if bucket not in stores:
                stores[bucket] = ObjectStore(S3Settings.from_env().with_bucket(bucket))
            return stores[bucket].get_bytes(key)
        return Path(uri).read_bytes() if uri else None
    except Exception:  # noqa: BLE001 - a missing thumbnail is shown as missing, the page still renders
        return None


def write_html(out: Path, results: list[tuple[Path, bytes, dict[str, Any]]]) -> None:
    """One row per query photo: the photo, then its matches with score, title and category."""
    from html import escape

    stores: dict = {}
    rows = []
    for path, data, result in results:
        labels = "<br>".join(f"{escape(t)}: {escape(v['label'])} ({v['probability']:.2f})"
                             for t, v in result["labels"].items())
        cells = [f'<td class="q"><img src="{_data_uri(data)}"><div>{escape(path.name)}<br>{labels}</div></td>']
        for m in result["matches"]:
            img = _image_bytes(m.get("image", ""), stores)
            tag = f'<img src="{_data_uri(img)}">' if img else '<div class="missing">no image</div>'
            cells.append(f"<td>{tag}<div>{m['score']:.3f}<br>{escape(m['title'])}<br>"
                         f"<small>{escape(m['category'])} · {escape(m['listing_id'])}</small></div></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    page = ("<!doctype html><meta charset='utf-8'><title>Lookalike matches</title><style>"
            "body{font-family:sans-serif}td{vertical-align:top;text-align:center;padding:6px}"
            "img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;border:1px solid #ccc}"
            "td.q{background:#eef}.missing{width:128px;height:128px;background:#eee}</style>"
            "<h1>Lookalike matches</h1><table>" + "".join(rows) + "</table>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
