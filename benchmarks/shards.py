"""A sharded index against the one index it was split from: the merged answer's recall and the served latency.

    python benchmarks/shards.py [--n N] [--shards 1,2,4] [--queries Q] [--photos P]

Data: the yardstick's synthetic embedding-like vectors (`make` in benchmarks/ann.py, the same generator) at
the model's embedding size (128), one photo per listing, and their exact top-10 (FAISS brute force).

Measured in one run, on the same vectors and queries:
- the unsharded IVF-Flat index, built once through the project's API (k-means, nprobe tuned for recall@10
  0.95) and published with a model (tf_efficientnet_lite0, ImageNet weights, benchmarks/serving.py's
  `build_pair`) in a private S3 server: its recall@10 against exact search is the baseline;
- for each k: the index split into k shards (`lookalike.predictor.index.shards`: the same centroids in
  every shard), searched and merged in-process; recall@10 against exact search, and recall_vs_unsharded:
  the share of the unsharded top-10 the merged top-10 holds (1.0 = the same listings), plus how many
  queries came back in exactly the unsharded order; then published as a sharded version;
- served through the stack (the issue's figure): the whole local stack per layout, all running at once:
  the unsharded one (transformer + one predictor that embeds and searches) and, per k, a transformer,
  an embedding predictor and k shard predictors (`lookalike serve --shards K`'s processes); the same
  320-px JPEG phone uploads (new bytes each time, so no cache answers) sent one at a time over gRPC,
  round-robin over the stacks so load elsewhere hits all alike. p50 per layout; p50_vs_unsharded divides
  by the unsharded stack's p50;
- the fan-out alone: the query vectors given straight to the same shard predictors through the
  transformer's fan-out and merge code (`ShardFanout`, in this process): what sharding adds per query,
  without the photo's decode and embedding. Its p50 per k is divided by k=1's.

The last line reads `shards: k=<k> N=<n> recall@10=<r> recall_vs_unsharded=<s> p50_ms=<x> p50_vs_unsharded=<y>`
for the largest k (p50 through the stack).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

K = 10


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


def served(hosts: list[str], queries: np.ndarray, nprobe: int, model_version: str) -> tuple[float, np.ndarray]:
    """p50 ms of one query at a time through the fan-out and merge, and the rows it returned."""
    from kserve.protocol.infer_type import InferRequest, InferResponse
    from lookalike.serving.protocol import output
    from lookalike.transformer.shards import ShardFanout

    fanout = ShardFanout(hosts, timeout_s=30.0, model_name="lookalike")
    embedded = [InferResponse.from_grpc(InferResponse(
        response_id=str(i), model_name="lookalike", infer_outputs=[output("embeddings", q[None], "FP32", True)],
        parameters={"model_version": model_version}).to_grpc()) for i, q in enumerate(queries)]
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
    parser.add_argument("--shards", default="1,2,4", help="shard counts to measure (default 1,2,4)")
    parser.add_argument("--queries", type=int, default=300, help="vector queries for recall and the fan-out alone "
                                                                  "(default 300)")
    parser.add_argument("--photos", type=int, default=200, help="photo requests per stack, one at a time (default 200)")
    args = parser.parse_args(argv)
    ks = sorted({int(k) for k in args.shards.split(",")})

    import faiss

    from ann import make
    from serving import build_pair, grpc_call, interleaved, phone_photos, private_store
    from lookalike.app.serving_stack import ServingStack
    from lookalike.predictor.index import VectorIndex, recall_at_k
    from lookalike.predictor.index.shards import ShardedIndex

    workdir, s3, store = private_store("shards-bench-")
    stacks: dict[int, ServingStack] = {}
    try:
        model_version, _, catalog_photos = build_pair(store, 200, 224, locator_views=0)
        dim = model_dim(store, model_version)
        base, queries = make(n=args.n, nq=max(args.queries, 200), d=dim)
        queries = queries[:args.queries]
        n = len(base)
        _, gt = faiss.knn(queries, base, K, metric=faiss.METRIC_INNER_PRODUCT)
        print(f"shards: {n} vectors, {len(queries)} queries, d={dim}; faiss {faiss.__version__}", flush=True)
        start = time.perf_counter()
        full = VectorIndex.build(base, [f"v{i}" for i in range(n)], model_version=model_version)
        build_s = time.perf_counter() - start
        del base
        nprobe = int(full.nprobe)
        one = rows_of(full.search(queries, top_k=K).listing_ids)
        r_one = recall_at_k(one, gt, K)
        full_version = full.publish(store)
        print(f"unsharded {full.card.factory}: built in {build_s:.0f} s, nprobe {nprobe}, recall@10 {r_one:.4f}",
              flush=True)
        quality, in_process = {}, {}
        versions = {}
        for k in ks:
            sharded = ShardedIndex.from_index(full, k)
            got = rows_of(sharded.search(queries, top_k=K, nprobe=nprobe).listing_ids)
            quality[k] = (recall_at_k(got, gt, K), overlap(got, one),
                          float(np.mean([(a == b).all() for a, b in zip(got, one)])))
            in_process[k] = got
            versions[k] = sharded.publish(store)
            del sharded
        del full
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        for k in [0, *ks]:  # 0: the unsharded stack
            stacks[k] = ServingStack(env, log_dir=workdir / f"logs-{k}", shards=k,
                                     index_version=versions[k] if k else full_version, predictor_timeout_s=30.0)
            stacks[k].start()
        print(f"stacks up: the unsharded one and k = {', '.join(map(str, ks))}", flush=True)
        photos = phone_photos(catalog_photos)
        calls = {k: grpc_call(stacks[k].endpoints["transformer_grpc"]) for k in stacks}
        samples, _ = interleaved(calls, photos, args.photos, warmup=10)
        p50 = {k: float(np.median(v) * 1000) for k, v in samples.items()}
        print(f"through the stack, one 320-px JPEG at a time over gRPC: unsharded p50 {p50[0]:.2f} ms", flush=True)
        fan = {}
        for k in ks:
            hosts = [stacks[k].endpoints[f"shard{i}_grpc"] for i in range(k)]
            fan[k], served_rows = served(hosts, queries, nprobe, model_version)
            served_same = float(np.mean([(a == b).all() for a, b in zip(served_rows, in_process[k])]))
            print(f"  k={k}: same order as unsharded {quality[k][2]:.3f} of queries; served answers equal the "
                  f"in-process merge for {served_same:.3f}; recall@10 of the unsharded index {r_one:.4f}", flush=True)
        lines = []
        for k in ks:
            print(f"fanout: k={k} p50_ms={fan[k]:.2f} vs_k1={fan[k] / fan[ks[0]]:.2f} (query vectors given: "
                  f"the fan-out and merge alone)", flush=True)
        for k in ks:
            r, vs, _ = quality[k]
            line = (f"shards: k={k} N={n} recall@10={r:.4f} recall_vs_unsharded={vs:.4f} p50_ms={p50[k]:.2f} "
                    f"p50_vs_unsharded={p50[k] / p50[0]:.2f}")
            print(line, flush=True)
            lines.append(line)
        print(lines[-1])
    finally:
        for stack in stacks.values():
            stack.stop()
        s3.stop()
    return 0


def model_dim(store, model_version: str) -> int:
    from lookalike.core.artifacts import model_repo
    from lookalike.core.model_card import ModelCard

    return int(ModelCard.read(model_repo(store).fetch(model_version), verify=False).embedding_dim)


if __name__ == "__main__":
    sys.exit(main())
