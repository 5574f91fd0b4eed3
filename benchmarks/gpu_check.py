"""GPU check: the figures that need a CUDA GPU, measured in one bounded run (under 8 minutes).

    python benchmarks/gpu_check.py [--parts train,faiss,predictor] [--n 1000000] [--clients 8] [--duration 10]

Three parts, each with its own time budget; a part that fails prints `gpu_check: <part> FAILED: <error>`
and the others still run:

1. train: the project's model (tf_efficientnet_lite0 with its packaged ImageNet weights, 224 px, frozen trunk
   and trained tail as `lookalike.training.train` runs it) doing forward + backward + AdamW steps on random
   batches of 48 under autocast fp16 with loss scaling and channels-last, timed after warm-up with
   torch.cuda.synchronize(); then the same model's forward on the CPU (2 batches of 4) and the ratio.
2. faiss: IVF-Flat built on the GPU by the project's own `VectorIndex.build(use_gpu=True)` over N random
   clustered 128-d vectors (4,096 centres plus N(0, 0.1^2) noise per dimension, L2-normalised), then
   10,000 queries in batches of 1,000 and 1,000 one at a time through `VectorIndex.search` at nprobe 16,
   recall@10 against exact search on the GPU (`faiss.GpuIndexFlatIP`) on 1,000 queries, and that exact
   search's own queries/s. Skipped when FAISS has no GPU support (faiss-cpu).
3. predictor: a small model/index pair published to a private embedded S3 server and served by
   `lookalike.app.serving_stack.ServingStack` (predictor with `--batching on --backend torch`, and the
   transformer), loopback only. 8 concurrent gRPC clients send preprocessed images (FP16, as the
   transformer does) straight to the predictor: p50 and images/s; the same through the transformer with
   JPEG photos; then a cancellation burst: 64 gRPC requests to the predictor with a 20 ms deadline each,
   sent at once, the time from the burst until a normal request succeeds, and whether the predictor's
   /v2/health/ready still answers 200.

Lines printed (one per figure):
`gpu_check: train_step images_per_s=<x> batch=48 size=224 device=<name>`
`gpu_check: cpu_forward images_per_s=<x> batch=4 batches=2 threads=<n> gpu_train_over_cpu_forward=<r>`
`gpu_check: faiss_gpu N=<n> build_s=<x> batch_qps=<x> single_qps=<x> recall@10=<r> exact_qps=<x> ...`
`gpu_check: predictor_batching clients=8 p50_ms=<x> images_per_s=<x> ...`
`gpu_check: served_via_transformer clients=8 p50_ms=<x> images_per_s=<x> errors=<n>`
`gpu_check: cancel_burst sent=64 deadline_ms=20 recovered_s=<x> ready=<true/false> ...`
and last `gpu_check: done parts_ok=<n>/<m>` (exit 1 when a part failed). Without a CUDA device it prints
one line saying so and exits 0 at once.
"""
from __future__ import annotations

import argparse
import copy
import gc
import io
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # serving.py's helpers

PARTS = ("train", "faiss", "predictor")
MODEL = "lookalike"
K = 10
BATCH, SIZE, CPU_BATCH, CPU_BATCHES = 48, 224, 4, 2
DIM, CENTRES, NOISE = 128, 4096, 0.1
N_QUERIES, N_SINGLE, N_EXACT, NPROBE = 10_000, 1_000, 1_000, 16
BURST, BURST_DEADLINE_S = 64, 0.020
TRAIN_BUDGET_S, FAISS_BUDGET_S, PREDICTOR_BUDGET_S = 90.0, 180.0, 200.0

_cleanups: list = []  # what the watchdog stops before it ends the run (servers, temp dirs)


def say(line: str) -> None:
    print(f"gpu_check: {line}", flush=True)


def watchdog(total_s: float) -> threading.Timer:
    """Ends the run after `total_s` seconds whatever hangs: cleans up, says so, exits 1."""
    def fire() -> None:
        say(f"watchdog: still running after {total_s:.0f} s; stopping the servers and exiting")
        for cleanup in reversed(_cleanups):
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - best effort, then out
                pass
        os._exit(1)

    timer = threading.Timer(total_s, fire)
    timer.daemon = True
    timer.start()
    return timer


# ---- 1. training step throughput ----------------------------------------------------------------

def gpu_train_rate(model, classes: int, deadline: float) -> float:
    """Images/s of forward + backward + optimiser steps on CUDA, as the training loop runs them: autocast fp16
    with loss scaling, channels-last, the frozen trunk without gradients and the tail trained."""
    import torch
    import torch.nn.functional as F

    from lookalike.training.settings import TrainConfig
    from lookalike.training.train import build_optimizer

    cuda = torch.device("cuda")
    model.to(cuda).to(memory_format=torch.channels_last)
    model.train()
    optimizer = build_optimizer(model, TrainConfig())
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(BATCH, 3, SIZE, SIZE, device=cuda).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (BATCH,), device=cuda)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.float16):
            with torch.no_grad():
                trunk = model.trunk(x)
            loss = F.cross_entropy(model.forward_from_trunk(trunk)["logits"]["category"], y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(5):  # warm-up: allocations, cuDNN's algorithm choice
        step()
    torch.cuda.synchronize()
    steps, start = 0, time.perf_counter()
    while steps < 20 or (time.perf_counter() - start < 3.0 and time.perf_counter() < deadline - 20):
        step()
        steps += 1
    torch.cuda.synchronize()
    return BATCH * steps / (time.perf_counter() - start)


def train_step(device_name: str) -> None:
    import torch

    from lookalike.core.preprocessing import PreprocessSpec
    from lookalike.training.model import ModelConfig, create_model

    deadline = time.perf_counter() + TRAIN_BUDGET_S
    heads = {"category": [f"c{i}" for i in range(10)]}
    config = ModelConfig(embedding_dim=128, heads=heads,
                         preprocessing=PreprocessSpec(size=SIZE, resize=round(SIZE * 256 / 224)))
    model = create_model(config)
    cpu_model = copy.deepcopy(model).eval()
    gpu_ips = gpu_train_rate(model, len(heads["category"]), deadline)
    say(f"train_step images_per_s={gpu_ips:.1f} batch={BATCH} size={SIZE} device={device_name}")
    del model
    torch.cuda.empty_cache()

    xc = torch.randn(CPU_BATCH, 3, SIZE, SIZE)
    with torch.inference_mode():
        cpu_model(xc)  # warm-up
        start = time.perf_counter()
        for _ in range(CPU_BATCHES):
            cpu_model(xc)
        cpu_ips = CPU_BATCH * CPU_BATCHES / (time.perf_counter() - start)
    say(f"cpu_forward images_per_s={cpu_ips:.1f} batch={CPU_BATCH} batches={CPU_BATCHES} "
        f"threads={torch.get_num_threads()} gpu_train_over_cpu_forward={gpu_ips / cpu_ips:.1f}")


# ---- 2. faiss-gpu at 1M -------------------------------------------------------------------------

def clustered_vectors(n: int, d: int, seed: int = 0, chunk: int = 250_000) -> np.ndarray:
    """n random vectors around `CENTRES` random centres, L2-normalised, float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), np.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        x = centres[rng.integers(0, CENTRES, m)] + NOISE * rng.standard_normal((m, d), dtype=np.float32)
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def faiss_gpu(n: int, query_batch: int) -> bool:
    """False when skipped (no GPU support in FAISS)."""
    import faiss

    from lookalike.predictor.index import VectorIndex, recall_at_k

    if not hasattr(faiss, "StandardGpuResources"):
        say("faiss_gpu SKIPPED: faiss has no GPU support (install faiss-gpu)")
        return False
    if faiss.get_num_gpus() < 1:
        raise RuntimeError(f"faiss {faiss.__version__} has GPU support but sees no GPU")
    data = clustered_vectors(n + N_QUERIES, DIM)
    base, queries = data[:n], data[n:]
    listing_ids = [f"v{i}" for i in range(n)]

    start = time.perf_counter()
    index = VectorIndex.build(base, listing_ids, model_version="gpu-check", use_gpu=True)
    build_s = time.perf_counter() - start
    search_on = "gpu" if getattr(index, "_gpu", None) is not None else "cpu"

    index.search(queries[:query_batch], K, nprobe=NPROBE)  # warm-up
    found = []
    start = time.perf_counter()
    for i in range(0, N_QUERIES, query_batch):
        found += index.search(queries[i:i + query_batch], K, nprobe=NPROBE).listing_ids
    batch_qps = N_QUERIES / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(N_SINGLE):
        index.search(queries[i:i + 1], K, nprobe=NPROBE)
    single_qps = N_SINGLE / (time.perf_counter() - start)

    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.device = 0
    config.useFloat16 = False  # exact float32 scores: the ground truth
    exact = faiss.GpuIndexFlatIP(resources, DIM, config)
    exact.add(base)
    exact.search(queries[:64], K)  # warm-up
    start = time.perf_counter()
    _, truth = exact.search(queries[:N_EXACT], K)
    exact_qps = N_EXACT / (time.perf_counter() - start)
    rows = np.array([[int(lid[1:]) for lid in row] + [-1] * (K - len(row)) for row in found[:N_EXACT]], np.int64)
    recall = recall_at_k(rows, truth, K)
    say(f"faiss_gpu N={n} build_s={build_s:.1f} batch_qps={batch_qps:.0f} single_qps={single_qps:.0f} "
        f"recall@10={recall:.3f} exact_qps={exact_qps:.0f} nprobe={NPROBE} query_batch={query_batch} "
        f"nlist={index.nlist} built_on={index.info.get('built_on')} search_on={search_on}")
    del index, exact, resources
    gc.collect()
    return True


# ---- 3. the batching predictor ------------------------------------------------------------------

def publish_pair(store, listings: int = 2000, seed: int = 0) -> str:
    """A model (packaged weights, 224 px) with alias production, and an index of random vectors for it."""
    from lookalike.core.artifacts import new_version
    from lookalike.core.preprocessing import PreprocessSpec
    from lookalike.predictor.index import VectorIndex
    from lookalike.training.export import export_model, publish_model
    from lookalike.training.model import ModelConfig, create_model

    config = ModelConfig(embedding_dim=DIM, heads={"category": ["a", "b", "c"]},
                         preprocessing=PreprocessSpec(size=SIZE, resize=round(SIZE * 256 / 224)))
    with tempfile.TemporaryDirectory(prefix="lookalike-gpu-check-model-") as out:
        export_model(create_model(config), config, out, model_version=new_version())
        model_version = publish_model(store, out, alias="production")
    vectors = clustered_vectors(listings, DIM, seed)
    index = VectorIndex.build(vectors, [f"l{i:05d}" for i in range(listings)], model_version=model_version,
                              use_gpu=False)  # the predictor loads it on its own GPU
    index_version = index.publish(store)
    say(f"predictor: published model {model_version} and index {index_version} ({index!r})")
    return model_version


def jpeg_photos(n: int = 16, side: int = 320, seed: int = 0) -> list[bytes]:
    """Smooth random colour photos as JPEGs (a phone upload's format, not its size)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((side, side), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def predictor_call(url: str, timeout_s: float = 30.0):
    """One client of the predictor's gRPC endpoint: preprocessed images [1, 3, S, S] in, FP16 as the
    transformer sends them."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)

    def call(images: np.ndarray):
        tensor = grpcclient.InferInput("images", list(images.shape), "FP16")
        tensor.set_data_from_numpy(images)
        return client.infer(MODEL, [tensor], parameters={"top_k": K}, client_timeout=timeout_s)

    return call


def http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def cancel_burst(stack, images: list[np.ndarray], budget_s: float) -> None:
    """64 requests with a 20 ms deadline each, sent at once; then the time until a normal one succeeds."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url = stack.endpoints["predictor_grpc"]
    client = grpcclient.InferenceServerClient(url)
    tensors = []
    for x in images:
        tensor = grpcclient.InferInput("images", list(x.shape), "FP16")
        tensor.set_data_from_numpy(x)
        tensors.append(tensor)
    outcomes: list[str] = []
    lock, all_back = threading.Lock(), threading.Event()

    def callback(result, error) -> None:
        with lock:
            outcomes.append("ok" if error is None else str(error.status()))
            if len(outcomes) == BURST:
                all_back.set()

    start = time.perf_counter()
    for i in range(BURST):
        client.async_infer(MODEL, [tensors[i % len(tensors)]], callback, parameters={"top_k": K},
                           client_timeout=BURST_DEADLINE_S)
    normal = predictor_call(url, timeout_s=30.0)
    recovered, last_error = None, ""
    while time.perf_counter() - start < budget_s:
        try:
            normal(images[0])
            recovered = time.perf_counter() - start
            break
        except InferenceServerException as exc:
            last_error = f"{exc.status()}: {exc.message()}"
            time.sleep(0.05)
    all_back.wait(10)
    ready = http_ready(stack.endpoints["predictor_rest"])
    expired = sum("DEADLINE_EXCEEDED" in o for o in outcomes)
    ok = outcomes.count("ok")
    other = Counter(o.rsplit(".", 1)[-1] for o in outcomes if o != "ok" and "DEADLINE_EXCEEDED" not in o)
    shown = f"{recovered:.3f}" if recovered is not None else "never"
    say(f"cancel_burst sent={BURST} deadline_ms={BURST_DEADLINE_S * 1000:.0f} recovered_s={shown} "
        f"ready={str(ready).lower()} expired={expired} ok={ok} other={sum(other.values())}"
        + "".join(f" {name}={count}" for name, count in other.most_common())
        + (f" last_error={last_error!r}" if recovered is None else ""))


def predictor_batching(clients: int, duration_s: float, max_batch: int) -> None:
    from serving import concurrent, grpc_call, percentiles

    from lookalike.app.serving_stack import ServingStack
    from lookalike.core.s3 import ObjectStore
    from lookalike.core.store_server import EmbeddedS3Server

    deadline = time.perf_counter() + PREDICTOR_BUDGET_S
    workdir = Path(tempfile.mkdtemp(prefix="lookalike-gpu-check-"))
    _cleanups.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
    s3 = stack = None
    try:
        s3 = EmbeddedS3Server(workdir / "s3" / "data")
        _cleanups.append(s3.stop)
        settings = s3.start()
        env = {**os.environ, **settings.to_env(), "LOOKALIKE_CACHE": str(workdir / "cache"), "PYTHONUNBUFFERED": "1"}
        os.environ.update(settings.to_env())
        os.environ["LOOKALIKE_CACHE"] = env["LOOKALIKE_CACHE"]
        publish_pair(ObjectStore(settings))

        stack = ServingStack(env, log_dir=workdir / "logs",
                             predictor_args=["--batching", "on", "--backend", "torch", "--max_batch", str(max_batch)])
        _cleanups.append(stack.stop)
        started = time.perf_counter()
        stack.start_predictor(timeout_s=max(30.0, min(150.0, deadline - time.perf_counter() - 60)))
        stack.start_transformer(timeout_s=90.0)
        say(f"predictor: servers up in {time.perf_counter() - started:.1f} s (predictor --batching on --backend "
            f"torch --max_batch {max_batch})")

        rng = np.random.default_rng(0)
        images = [rng.standard_normal((1, 3, SIZE, SIZE), dtype=np.float32).astype(np.float16) for _ in range(8)]
        url = stack.endpoints["predictor_grpc"]
        one = predictor_call(url)
        for x in images:  # warm-up, one at a time, then concurrently (every batch size up to max_batch)
            one(x)
        concurrent(lambda: predictor_call(url), images, clients, 2.0)
        samples, wall, done, errors = concurrent(lambda: predictor_call(url), images, clients, duration_s)
        p50, p99 = percentiles(samples) if samples else (float("nan"), float("nan"))
        say(f"predictor_batching clients={clients} p50_ms={p50:.2f} images_per_s={done / wall:.1f} "
            f"p99_ms={p99:.2f} errors={errors} max_batch={max_batch} input=FP16")

        photos = jpeg_photos()
        turl = stack.endpoints["transformer_grpc"]
        concurrent(lambda: grpc_call(turl), photos, clients, 1.0)  # warm-up
        samples, wall, done, errors = concurrent(lambda: grpc_call(turl), photos, clients, duration_s / 2)
        p50, _ = percentiles(samples) if samples else (float("nan"), float("nan"))
        say(f"served_via_transformer clients={clients} p50_ms={p50:.2f} images_per_s={done / wall:.1f} "
            f"errors={errors}")

        cancel_burst(stack, images, budget_s=max(10.0, min(60.0, deadline - time.perf_counter())))
    except Exception:
        if stack is not None and stack.predictor is not None:
            print(f"predictor log (last lines):\n{stack.log_tail('predictor')}", file=sys.stderr, flush=True)
        raise
    finally:
        if stack is not None:
            stack.stop()
        if s3 is not None:
            s3.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# ---- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the FAISS index (default 1,000,000)")
    parser.add_argument("--query-batch", type=int, default=1000,
                        help="queries per call in the batched FAISS timing (default 1000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent gRPC clients (default 8)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of the concurrent predictor run (default 10; half that through the transformer)")
    parser.add_argument("--max-batch", type=int, default=4,
                        help="the predictor's --max_batch, images embedded together (default 4, the predictor's own)")
    parser.add_argument("--total-seconds", type=float, default=470.0,
                        help="hard limit for the whole run: a watchdog stops the servers and exits (default 470)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    os.environ["LOOKALIKE_PROGRESS"] = "0"

    try:
        import torch
    except ImportError:
        say("no CUDA device (torch not installed): nothing to measure; run this on a GPU machine")
        return 0
    if not torch.cuda.is_available():
        say(f"no CUDA device (torch {torch.__version__}, cuda {torch.version.cuda}): nothing to measure; "
            f"run this on a GPU machine")
        return 0

    timer = watchdog(args.total_seconds)
    device = torch.cuda.get_device_name(0).replace(" ", "_")
    try:
        import faiss
        faiss_version = f"{faiss.__version__} ({'gpu' if hasattr(faiss, 'StandardGpuResources') else 'cpu only'})"
    except ImportError:
        faiss_version = "not installed"
    say(f"device={device} torch={torch.__version__} cuda={torch.version.cuda} faiss={faiss_version} "
        f"cores={os.cpu_count()} parts={','.join(parts)}")
    runs = {"train": lambda: train_step(device),
            "faiss": lambda: faiss_gpu(args.n, args.query_batch),
            "predictor": lambda: predictor_batching(args.clients, args.duration, args.max_batch)}
    ok = skipped = failed = 0
    started = time.perf_counter()
    for part in parts:
        t0 = time.perf_counter()
        try:
            if runs[part]() is False:
                skipped += 1
            else:
                ok += 1
        except Exception as exc:  # noqa: BLE001 - one part failing must not stop the others
            failed += 1
            first = (str(exc).strip().splitlines() or [""])[0]
            say(f"{part} FAILED: {type(exc).__name__}: {first}")
            traceback.print_exc(file=sys.stderr)
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        print(f"({part}: {time.perf_counter() - t0:.1f} s)", flush=True)
    timer.cancel()
    say(f"done parts_ok={ok}/{len(parts)}" + (f" skipped={skipped}" if skipped else "")
        + f" failed={failed} total_s={time.perf_counter() - started:.0f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
