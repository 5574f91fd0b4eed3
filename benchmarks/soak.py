"""Soak and fault harness: the served stack, micro-batching predictor included, under steady load from
several clients while faults are injected, loopback only and bounded in time.

One published pair (Fashion-MNIST listings, tf_efficientnet_lite0 with its packaged weights) in a private
embedded S3 server; the predictor runs `--batching on` (what a GPU runs by default), behind the
transformer, as `lookalike serve` starts them. For `--duration` seconds, `--clients` clients each send a
phone-sized JPEG at a steady rate over REST; a share of the requests are hostile or impatient:

    give-up   the client's deadline is 30 ms: it leaves before the answer (never counted as an error)
    trickle   the body arrives in ten pieces over ~1.5 s (a slow phone connection)
    oversize  a body three times the server's cap (must be a 413, refused before it is read)

Faults, at fixed fractions of the run (a supervisor restarts a server that exits, as a pod's restart
policy would):

    kill      the predictor is killed (SIGKILL) and restarted
    stop      the predictor is frozen (SIGSTOP) for 5 s, then continued
    s3-down   the S3 server is stopped for 10 s, then started again on the same port and data
    swap      a new index version is published and the predictor swaps to it under the load (not a fault
              window: any 5xx during it counts as a server error)

A 5xx whose request started between a fault's start and the first good answer after the fault ended is
the fault's; any other 5xx is a server error (answered while the stack was healthy). recovered_s is the
longest time from a fault's end to the next good answer. The RSS of both servers is sampled twice a
second; their pods' limits are 2 GiB (transformer) and 12 GiB (predictor). Last line:

    soak: requests=<n> ok=<n> client_errors=<n> server_errors=<n> p99_ms=<x> max_rss_mb=<m> recovered_s=<s>

    python benchmarks/soak.py [--duration 120] [--clients 6] [--rate 3] [--catalog-size 600] [--size 224]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import MODEL, build_pair, phone_photos, private_store  # noqa: E402

KINDS = {"normal": 0.75, "give-up": 0.15, "trickle": 0.05, "oversize": 0.05}


@dataclass
class Outcome:
    kind: str
    started: float
    ended: float
    status: int  # HTTP status; 0: the client gave up or the connection failed


@dataclass
class Fault:
    name: str
    start: float
    end: float = float("inf")
    recovered_at: float | None = None


@dataclass
class Soak:
    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    rss_mb: dict[str, float] = field(default_factory=lambda: {"transformer": 0.0, "predictor": 0.0})
    t0: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)
            if outcome.status == 200:
                for fault in self.faults:
                    if fault.recovered_at is None and outcome.started >= fault.end:
                        fault.recovered_at = outcome.ended


def v2_body(photo: bytes) -> tuple[bytes, dict[str, str]]:
    """A binary-extension v2 request of one photo (the way apps send photos to the transformer)."""
    blob = struct.pack("<I", len(photo)) + photo
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "parameters": {"top_k": 10}}).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header)),
                           "Content-Type": "application/octet-stream"}


def client(url: str, photos: list[bytes], rate: float, until: float, soak: Soak, seed: int, cap: int) -> None:
    import httpx

    rng = np.random.default_rng(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    with httpx.Client(timeout=30) as http:
        next_at = time.monotonic()
        while time.monotonic() < until:
            next_at += rng.exponential(1.0 / rate)
            time.sleep(max(0.0, next_at - time.monotonic()))
            kind = kinds[rng.choice(len(kinds), p=weights)]
            body, headers = v2_body(photos[rng.integers(len(photos))])
            content: bytes | object = body
            timeout = 30.0
            if kind == "give-up":
                timeout = 0.03
            elif kind == "trickle":
                step = max(1, len(body) // 10)
                pieces = [body[i:i + step] for i in range(0, len(body), step)]

                def trickle(pieces=pieces):
                    for piece in pieces:
                        time.sleep(0.15)
                        yield piece
                content = trickle()
            elif kind == "oversize":
                content = body + b"\0" * (3 * cap)
            started = time.monotonic()
            try:
                status = http.post(f"{url}/v2/models/{MODEL}/infer", content=content, headers=headers,
                                   timeout=timeout).status_code
            except httpx.TimeoutException:
                status = 0
            except httpx.HTTPError:
                status = 413 if kind == "oversize" else 0  # the server answered 413 and closed mid-upload
            soak.add(Outcome(kind, started, time.monotonic(), status))


def sample_rss(stack, soak: Soak, until: float) -> None:
    while time.monotonic() < until:
        for name, pid in stack.pids().items():
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS:"):
                        soak.rss_mb[name] = max(soak.rss_mb[name], int(line.split()[1]) / 1024)
            except (OSError, TypeError):
                pass
        time.sleep(0.5)


def supervise(stack, stop: threading.Event, lock: threading.Lock) -> None:
    """Restart a server that exited (a pod's restart policy)."""
    while not stop.wait(0.3):
        with lock:
            if not stack.alive():
                try:
                    print(f"  restarted: {stack.restart_dead()}", flush=True)
                except RuntimeError as exc:
                    print(f"  restart failed: {exc}", flush=True)


def inject(stack, s3, store, model_version: str, soak: Soak, t0: float, duration: float, lock: threading.Lock):
    """The faults, at fixed fractions of the run."""
    from lookalike.predictor.index import VectorIndex

    def at(fraction: float) -> None:
        time.sleep(max(0.0, t0 + fraction * duration - time.monotonic()))

    def begin(name: str) -> Fault:
        fault = Fault(name, time.monotonic())
        with soak.lock:
            soak.faults.append(fault)
        print(f"  {time.monotonic() - t0:6.1f} s  fault: {name}", flush=True)
        return fault

    at(0.15)
    fault = begin("kill")
    with lock:
        os.kill(stack.pids()["predictor"], signal.SIGKILL)
        stack.predictor.wait()
    fault.end = time.monotonic()  # the supervisor restarts it now; recovery includes its start

    at(0.40)
    fault = begin("stop")
    pid = stack.pids()["predictor"]
    os.kill(pid, signal.SIGSTOP)
    time.sleep(5.0)
    os.kill(pid, signal.SIGCONT)
    fault.end = time.monotonic()

    at(0.60)
    fault = begin("s3-down")
    s3.stop()
    time.sleep(10.0)
    s3.start()
    fault.end = time.monotonic()

    at(0.80)
    print(f"  {time.monotonic() - t0:6.1f} s  index swap under load", flush=True)
    index = VectorIndex.fetch(store, model_version, "latest")
    version = index.publish(store)
    import httpx

    reply = httpx.post(f"{stack.endpoints['predictor_rest']}/v2/repository/models/{MODEL}/load", timeout=120)
    print(f"  {time.monotonic() - t0:6.1f} s  swapped to index {version}: HTTP {reply.status_code}", flush=True)


def summarise(soak: Soak) -> dict:
    windows = [(f.start, f.recovered_at or float("inf")) for f in soak.faults]
    ok = sum(o.status == 200 for o in soak.outcomes)
    gave_up = sum(o.status == 0 and o.kind == "give-up" for o in soak.outcomes)
    lost = sum(o.status == 0 and o.kind != "give-up" for o in soak.outcomes)
    client_errors = sum(400 <= o.status < 500 for o in soak.outcomes)
    fivexx = [o for o in soak.outcomes if o.status >= 500]
    # A fault's: sent or answered between its start and the first good answer after it ended.
    in_fault = [o for o in fivexx if any(o.started <= b and o.ended >= a for a, b in windows)]
    healthy = [o for o in fivexx if o not in in_fault]
    latencies = sorted((o.ended - o.started) * 1000 for o in soak.outcomes if o.status == 200)
    recovered = [f.recovered_at - f.end for f in soak.faults if f.recovered_at is not None]
    unrecovered = [f.name for f in soak.faults if f.recovered_at is None]
    return {"requests": len(soak.outcomes), "ok": ok, "gave_up": gave_up, "lost": lost,
            "client_errors": client_errors, "fault_errors": len(in_fault), "server_errors": len(healthy),
            "healthy_5xx": [(round(o.started - soak.t0, 1), o.status, o.kind) for o in healthy[:10]],
            "p99_ms": float(np.percentile(latencies, 99)) if latencies else float("nan"),
            "p50_ms": float(np.percentile(latencies, 50)) if latencies else float("nan"),
            "recovered_s": max(recovered) if recovered else float("nan"), "unrecovered": unrecovered,
            "by_fault": {f.name: round(f.recovered_at - f.end, 2) if f.recovered_at else None for f in soak.faults}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    parser.add_argument("--clients", type=int, default=6, help="concurrent clients (default 6)")
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second of each client (default 3)")
    parser.add_argument("--catalog-size", type=int, default=600, help="listings in the index (default 600)")
    parser.add_argument("--size", type=int, default=224, help="model input size in px (default 224)")
    args = parser.parse_args()

    from lookalike.app.serving_stack import ServingStack
    from lookalike.core.budget import request_cap
    from lookalike.core.decoding import ImageLimits

    workdir, s3, store = private_store("lookalike-soak-")
    soak, stack, stop, lock = Soak(), None, threading.Event(), threading.Lock()
    try:
        model_version, _, catalog_photos = build_pair(store, args.catalog_size, args.size)
        photos = phone_photos(catalog_photos, n=32)
        stack = ServingStack(dict(os.environ), log_dir=workdir / "logs", predictor_timeout_s=3.0,
                             predictor_args=["--batching", "on"]).start()
        url = stack.endpoints["transformer_rest"]
        cap = request_cap(ImageLimits())
        print(f"servers up ({stack.endpoints['transformer_rest']}); {args.clients} clients x {args.rate:g} req/s "
              f"for {args.duration:g} s; request cap {cap / 2**20:.0f} MiB", flush=True)
        t0 = soak.t0 = time.monotonic()
        until = t0 + args.duration
        threads = [threading.Thread(target=client, args=(url, photos, args.rate, until, soak, i, cap), daemon=True)
                   for i in range(args.clients)]
        threads += [threading.Thread(target=sample_rss, args=(stack, soak, until), daemon=True),
                    threading.Thread(target=supervise, args=(stack, stop, lock), daemon=True)]
        for t in threads:
            t.start()
        inject(stack, s3, store, model_version, soak, t0, args.duration, lock)
        for t in threads[:args.clients + 1]:
            t.join(timeout=args.duration + 60)
        result = summarise(soak)
    finally:
        stop.set()
        if stack is not None:
            stack.stop()
        s3.stop()
    by_kind = {k: sum(o.kind == k for o in soak.outcomes) for k in KINDS}
    print(f"\nrequests by kind: {by_kind}; gave up (client deadline): {result['gave_up']}; "
          f"lost without an answer: {result['lost']}")
    print(f"5xx inside fault windows: {result['fault_errors']}; recovery per fault (s): {result['by_fault']}"
          + (f"; NOT RECOVERED: {result['unrecovered']}" if result["unrecovered"] else ""))
    if result["healthy_5xx"]:
        print(f"5xx while healthy (s into the run, status, kind): {result['healthy_5xx']}")
    print(f"peak RSS: transformer {soak.rss_mb['transformer']:.0f} MB (limit 2048), predictor "
          f"{soak.rss_mb['predictor']:.0f} MB (limit 12288); p50 {result['p50_ms']:.0f} ms")
    print(f"soak: requests={result['requests']} ok={result['ok']} client_errors={result['client_errors']} "
          f"server_errors={result['server_errors']} p99_ms={result['p99_ms']:.0f} "
          f"max_rss_mb={max(soak.rss_mb.values()):.0f} recovered_s={result['recovered_s']:.1f}")
    return 0 if result["server_errors"] == 0 and not result["unrecovered"] else 1


if __name__ == "__main__":
    sys.exit(main())
