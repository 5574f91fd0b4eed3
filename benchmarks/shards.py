"""A sharded index against the one index it was split from: the merged answer's recall and the served latency.

    python benchmarks/shards.py [--n N] [--shards 1,2,4] [--queries Q]

Data: the yardstick's synthetic 256-d embedding-like vectors (`make` in benchmarks/ann.py, the same
generator), one photo per listing, and their exact top-10 (FAISS brute force).

Measured in one run, on the same vectors and queries:
- the unsharded IVF-Flat index, built once through the project's API (k-means, nprobe tuned for recall@10
  0.95): its recall@10 against exact search is the baseline;
- for each k: the index split into k shards (`lookalike.predictor.index.shards`: the same centroids in
  every shard), searched and merged; recall@10 against exact search, and recall_vs_unsharded: the share
  of the unsharded top-10 the merged top-10 holds (1.0 = the same listings), plus how many queries came
  back in exactly the unsharded order;
- served: each shard saved and served by its own shard predictor process on loopback
  (`python -m lookalike.predictor.parts shard`, gRPC v2), queried one at a time through the transformer's
  fan-out and merge (`lookalike.transformer.shards.ShardFanout`, in this process) with the query vector
  given (no embedding predictor, no transformer HTTP hop: what sharding adds is the fan-out). p50 per k;
  p50_vs_unsharded divides by k=1's p50 (the whole index in one predictor, through the same path).

The last line reads `shards: k=<k> N=<n> recall@10=<r> recall_vs_unsharded=<s> p50_ms=<x> p50_vs_unsharded=<y>`
for the largest k.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

K = 10
MODEL = "bench"


def rows_of(listing_ids: list[list[str]]) -> np.ndarray:
    out = np.full((len(listing_ids), K), -1, np.int64)
    for i, row in enumerate(listing_ids):
        out[i, :len(row)] = [int(x[1:]) for x in row[:K]]
    return out


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Share of b's ids (per row, ignoring -1) found in a's row."""
    hit = total = 0
    for ra, rb in zip(a, b):
        want = set(rb[rb >= 0].tolist())
        hit += len(want & set(ra.tolist()))
        total += len(want)
    return hit / max(total, 1)


def start_shard(folder: Path, shard: int, log_dir: Path) -> tuple[subprocess.Popen, str, str]:
    from lookalike.core.store_server import free_port

    http, grpc_port = free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(log_dir / f"shard{shard}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "lookalike.predictor.parts", "shard", "--shard", str(shard),
                             "--index_dir", str(folder), "--http_port", str(http), "--grpc_port", str(grpc_port),
                             "--host", "127.0.0.1", "--enable_latency_logging", "false"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    return proc, f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"a shard predictor exited (code {proc.returncode})")
        try:
            with urllib.request.urlopen(f"{url}/v2/models/lookalike/ready", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("a shard predictor was not ready in time")


def served(hosts: list[str], queries: np.ndarray, nprobe: int) -> tuple[float, np.ndarray]:
    """p50 ms of one query at a time through the fan-out and merge, and the rows it returned."""
    from kserve.protocol.infer_type import InferRequest, InferResponse
    from lookalike.serving.protocol import output
    from lookalike.transformer.shards import ShardFanout

    fanout = ShardFanout(hosts, timeout_s=30.0, model_name="lookalike")
    embedded = [InferResponse.from_grpc(InferResponse(
        response_id=str(i), model_name="lookalike", infer_outputs=[output("embeddings", q[None], "FP32", True)],
        parameters={"model_version": MODEL}).to_grpc()) for i, q in enumerate(queries)]
    request = InferRequest(model_name="lookalike", infer_inputs=[], request_id="bench",
                           parameters={"top_k": K, "nprobe": nprobe})

    async def run() -> tuple[list[float], list[list[str]]]:
        for e in embedded[:10]:  # warm the channels
            await fanout.search(e, request)
        times, ids = [], []
        for e in embedded:
            start = time.perf_counter()
            answer = await fanout.search(e, request)
            times.append(time.perf_counter() - start)
            params = answer.parameters
            assert not (params.get("partial") and params["partial"].bool_param), "a shard did not answer"
            out = {o.name: o for o in answer.outputs}
            ids.append([v.decode() for v in out["listing_ids"].as_numpy().reshape(-1) if v])
        return times, ids

    times, ids = asyncio.run(run())
    return float(np.median(times) * 1000), rows_of(ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="base vectors (default 1,000,000)")
    parser.add_argument("--shards", default="1,2,4", help="shard counts to measure (default 1,2,4; 1 is the baseline)")
    parser.add_argument("--queries", type=int, default=300, help="queries timed one at a time (default 300)")
    args = parser.parse_args(argv)
    ks = sorted({int(k) for k in args.shards.split(",")} | {1})

    import faiss

    from ann import make
    from lookalike.predictor.index import VectorIndex, recall_at_k
    from lookalike.predictor.index.shards import ShardedIndex

    base, queries = make(n=args.n, nq=max(args.queries, 200))
    queries = queries[:args.queries]
    n = len(base)
    _, gt = faiss.knn(queries, base, K, metric=faiss.METRIC_INNER_PRODUCT)
    print(f"shards: {n} vectors, {len(queries)} queries, d={base.shape[1]}; faiss {faiss.__version__}", flush=True)
    listing_ids = [f"v{i}" for i in range(n)]
    start = time.perf_counter()
    full = VectorIndex.build(base, listing_ids, model_version=MODEL)
    build_s = time.perf_counter() - start
    del base
    nprobe = int(full.nprobe)
    one = rows_of(full.search(queries, top_k=K).listing_ids)
    r_one = recall_at_k(one, gt, K)
    print(f"unsharded {full.card.factory}: built in {build_s:.0f} s, nprobe {nprobe}, recall@10 {r_one:.4f}",
          flush=True)
    lines = []
    p50 = {}
    with tempfile.TemporaryDirectory(prefix="shards-bench-") as tmp:
        for k in ks:
            sharded = ShardedIndex.from_index(full, k)
            got = rows_of(sharded.search(queries, top_k=K, nprobe=nprobe).listing_ids)
            r = recall_at_k(got, gt, K)
            vs = overlap(got, one)
            same_order = float(np.mean([(a == b).all() for a, b in zip(got, one)]))
            folder = Path(tmp) / f"k{k}"
            sharded.save(folder)
            del sharded
            procs = [start_shard(folder, s, Path(tmp)) for s in range(k)]
            try:
                for proc, url, _ in procs:
                    wait_ready(proc, url)
                p50[k], served_rows = served([g for _, _, g in procs], queries, nprobe)
            finally:
                for proc, _, _ in procs:
                    proc.terminate()
                    proc.wait(timeout=30)
            served_same = float(np.mean([(a == b).all() for a, b in zip(served_rows, got)]))
            line = (f"shards: k={k} N={n} recall@10={r:.4f} recall_vs_unsharded={vs:.4f} p50_ms={p50[k]:.2f} "
                    f"p50_vs_unsharded={p50[k] / p50[1]:.2f}")
            print(f"  k={k}: same order as unsharded {same_order:.3f} of queries; served answers equal the "
                  f"in-process merge for {served_same:.3f}; exact-search recall of the unsharded index {r_one:.4f}",
                  flush=True)
            print(line, flush=True)
            lines.append(line)
    print(lines[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
