"""`lookalike serve` and `lookalike query`: the InferenceService's two halves on one machine, and a client.

`serve` starts the store if it is not running, then the predictor and the transformer as two KServe model
server processes (REST and gRPC each), exactly as the two containers of the InferenceService, prints the
endpoints, and stops everything in order on Ctrl-C. `query` sends photos to the transformer over KServe
v2 and prints the matches; `--html` also writes a page with each photo beside its matches.

The stack itself lives in `lookalike/app/serving_stack.py`, the client in `lookalike/app/client.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from lookalike.app.client import MODEL_NAME, error_text, query_listings, query_photos, write_html
from lookalike.cli.commands import stop_on_sigterm
from lookalike.app.serving_stack import ServingStack
from lookalike.core.settings import home


ORDER = 60
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0  # more restarts than this within the window: give up, say why


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
    p.add_argument("--host", default="127.0.0.1",
                   help="address the servers listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens them "
                        "to the network, the predictor's reload route included)")
    p.add_argument("--refresh-seconds", type=float, default=30.0,
                   help="how often the predictor checks whether the aliases moved, to swap (0: never; default 30)")
    p.add_argument("--shards", type=int, default=0, metavar="K",
                   help="serve a sharded index version (indexes-sharded/, made by `lookalike shard --shards K`): "
                        "an embedding predictor, K shard predictors on ports PORT+10.., and the transformer "
                        "merging their answers (default 0: one predictor holds the whole index)")
    p.set_defaults(func=_serve)

    q = sub.add_parser("query", help="search with photos (or by listing) through the running transformer",
                       description="Send photos to the transformer (KServe v2 REST, binary tensors) and print each "
                                   "photo's predicted labels and best matches; or, with --listing, the listings "
                                   "most like a listing already in the index (no photo sent). --html also writes "
                                   "a page with the photo beside its matches (images inlined).")
    q.add_argument("photos", nargs="*", type=Path, metavar="PHOTO", help="JPEG, PNG, WebP, HEIC or AVIF files")
    q.add_argument("--listing", action="append", default=[], metavar="ID",
                   help="search by this listing instead of a photo (\"more like this\"; repeat for several); "
                        "it is left out of its own results")
    q.add_argument("--photo-id", default=None, metavar="PHOTO_ID",
                   help="with one --listing: search with this photo of it (default: its first photo)")
    q.add_argument("--url", default=None,
                   help="transformer REST endpoint (default: the one `lookalike serve` recorded, else "
                        "http://127.0.0.1:8080)")
    q.add_argument("--top-k", type=int, default=5, help="matches per photo (default 5)")
    q.add_argument("--filter", default=None,
                   help="restrict matches, e.g. category=footwear or category=predicted")
    q.add_argument("--box", default=None, metavar="X0,Y0,X1,Y1",
                   help="search only this part of each photo, as fractions of its width and height "
                        "(e.g. 0.25,0.1,0.75,0.9 for the middle half)")
    q.add_argument("--crop", choices=("auto", "off"), default=None,
                   help="auto (the default): search the product the model finds in the photo; off: the whole photo")
    q.add_argument("--json", action="store_true",
                   help="print the results as JSON (one document per photo: labels and matches) instead of a table")
    q.add_argument("--html", type=Path, default=None, metavar="OUT", help="also write an HTML page of the results")
    q.set_defaults(func=_query)


def _ensure_store() -> Any:
    """The configured store; on a loopback endpoint that does not answer, start the embedded one."""
    from lookalike.core.s3 import S3Settings, StoreError, connect
    from lookalike.core.store_server import EmbeddedS3Server

    try:
        connect()
        return None
    except StoreError:
        settings = S3Settings.from_env()
        host, _, port = settings.endpoint.partition(":")
        if host not in ("127.0.0.1", "localhost"):
            raise
    server = EmbeddedS3Server(home() / "s3", port=int(port or 9000), access_key=settings.access_key,
                              secret_key=settings.secret_key, bucket=settings.bucket)
    server.start()
    print(f"started the embedded S3 server at {server.settings.url} (data in {server.data_dir})", flush=True)
    return server


def _serve(args: argparse.Namespace) -> int:
    from lookalike.cli.main import CommandError
    from lookalike.core.s3 import connect

    s3 = _ensure_store()
    stack = page = None
    stop = stop_on_sigterm()
    try:
        from lookalike.predictor.service import resolve_model

        store = connect()
        model_version = resolve_model(store, args.model_version)  # a clear error now, not in a child's log
        if not 0 <= args.shards <= 64:
            raise CommandError(f"--shards must be from 0 to 64, got {args.shards}")
        ports = {"transformer_http": args.port, "transformer_grpc": args.port + 1,
                 "predictor_http": args.port + 5, "predictor_grpc": args.port + 6}
        for i in range(args.shards):
            ports[f"shard{i}_http"], ports[f"shard{i}_grpc"] = args.port + 10 + 2 * i, args.port + 11 + 2 * i
        stack = ServingStack(model_version=args.model_version, index_version=args.index_version, ports=ports,
                             predictor_args=["--refresh_seconds", str(args.refresh_seconds)], host=args.host,
                             shards=args.shards)
        stack.check_ports()  # a port taken: one line naming it, before anything starts
        print(f"starting the predictor (model {model_version}, index {args.index_version}) and the transformer; "
              f"logs in {stack.log_dir}", flush=True)
        try:
            stack.start()
        except RuntimeError as exc:
            raise CommandError(str(exc)) from exc
        endpoints = stack.endpoints
        (home()).mkdir(parents=True, exist_ok=True)
        (home() / "serve.json").write_text(json.dumps({**endpoints, "pids": stack.pids()}, indent=2))
        print("serving (KServe v2):")
        print(f"  transformer  REST {endpoints['transformer_rest']}/v2/models/{MODEL_NAME}/infer"
              f"   gRPC {endpoints['transformer_grpc']}")
        print(f"  predictor    REST {endpoints['predictor_rest']}/v2/models/{MODEL_NAME}/infer"
              f"   gRPC {endpoints['predictor_grpc']}")
        for i in range(args.shards):
            print(f"  shard {i:<6} gRPC {endpoints[f'shard{i}_grpc']}")
        print(f"  metrics      {endpoints['transformer_rest']}/metrics  {endpoints['predictor_rest']}/metrics")
        from lookalike.app.try_page import TryPageServer

        try:  # the try page on its own loopback port, PORT+2 (any free one when that is taken)
            page = TryPageServer(endpoints["transformer_rest"], port=args.port + 2).start()
        except OSError:
            page = TryPageServer(endpoints["transformer_rest"]).start()
        print(f"  try page     {page.url}   (drop a photo, see the listings)")
        print("try: lookalike query PHOTO.jpg --html results.html     Ctrl-C stops all.", flush=True)
        restarts: list[float] = []
        while not stop.is_set():
            time.sleep(0.5)
            if stack.alive():
                continue
            restarts = [t for t in restarts if t > time.monotonic() - RESTART_WINDOW_S] + [time.monotonic()]
            if len(restarts) > MAX_RESTARTS:
                print(f"a server keeps exiting ({len(restarts)} restarts within {RESTART_WINDOW_S:.0f} s); "
                      f"giving up. See its log in {stack.log_dir}", file=sys.stderr)
                return 1
            try:
                names = stack.restart_dead()
            except RuntimeError as exc:
                print(f"could not restart: {exc}", file=sys.stderr)
                return 1
            print(f"restarted the {' and the '.join(names)} (it had exited; its log is in {stack.log_dir})",
                  flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        if page is not None:
            page.stop()
        if stack is not None:
            stack.stop()
        if s3 is not None:
            s3.stop()
        print("stopped", flush=True)
    return 0


# ---- query ---------------------------------------------------------------------------------------

def _default_url() -> str:
    recorded = home() / "serve.json"
    if recorded.exists():
        try:
            return json.loads(recorded.read_text())["transformer_rest"]
        except (ValueError, KeyError):
            pass
    return "http://127.0.0.1:8080"


def _query(args: argparse.Namespace) -> int:
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise in a table

    from lookalike.cli.main import CommandError

    if bool(args.photos) == bool(args.listing):
        raise CommandError("name photos to search with, or --listing ID to search by a listing (not both)")
    if args.photo_id is not None and len(args.listing) != 1:
        raise CommandError("--photo-id names a photo of one --listing")
    if args.listing and args.box:
        raise CommandError("--box cuts a photo; a search by listing has none")
    photos = []
    for path in args.photos:
        if not path.is_file():
            raise CommandError(f"{path} is not a file")
        photos.append(path.read_bytes())
    url = args.url or _default_url()
    try:
        if args.listing:
            results = query_listings(url, args.listing, [args.photo_id] if args.photo_id else None, top_k=args.top_k,
                                     filter=args.filter)
            args.photos, photos = [Path(lid) for lid in args.listing], [b""] * len(args.listing)
        else:
            results = query_photos(url, photos, top_k=args.top_k, filter=args.filter, box=args.box, crop=args.crop)
    except httpx.HTTPStatusError as exc:
        raise CommandError(f"the transformer answered {exc.response.status_code}: "
                           f"{error_text(exc.response)}") from exc
    except httpx.TransportError as exc:
        raise CommandError(f"no transformer answers at {url} ({exc}); start one with `lookalike serve`") from exc
    if args.json:
        what = "listing" if args.listing else "photo"
        print(json.dumps([{what: str(path), **result} for path, result in zip(args.photos, results)], indent=2))
    for path, result in zip([] if args.json else args.photos, results):
        labels = ", ".join(f"{t}={v['label']} ({v['probability']:.2f})" for t, v in result["labels"].items())
        print(f"\n{path}: {labels}")
        searched = result.get("box") or {}
        if searched.get("searched") in ("crop", "app"):
            box = ", ".join(f"{v:.2f}" for v in searched["box"])
            how = (f"the product found (confidence {searched.get('confidence', 0):.2f})"
                   if searched["searched"] == "crop" else "your box")
            print(f"  searched {how}: {box}")
        print(f"  {'#':>2}  {'score':>6}  {'listing':<24} {'category':<12} title")
        for rank, m in enumerate(result["matches"], 1):
            print(f"  {rank:>2}  {m['score']:>6.3f}  {m['listing_id']:<24} {m['category']:<12} {m['title']}")
        if not result["matches"]:
            print("  (no matches)")
    if args.html:
        write_html(args.html, list(zip(args.photos, photos, results)))
        print(f"\nwrote {args.html}")
    return 0


