"""Approximate nearest-neighbour search: the project's index against exact search and its peers.

    python benchmarks/ann.py [--vectors DIR] [--quick] [--n N] [--skip-peers] [--skip-incremental]

Data: DIR/base.npy, queries.npy, gt.npy as written by the project's yardstick generator
(embedding_like_vectors.py: 1,000,000 synthetic 256-d vectors shaped like image embeddings). Without
--vectors the same generator (copied below) makes equivalent data, so the benchmark runs anywhere.
--quick uses 100,000 vectors (about a minute of work).

Measured in one run, on the same vectors and queries:
- exact search (FAISS brute force, as IndexFlatIP runs it, one thread for single queries, on a base held in
  memory: a --vectors base is read in before anything is timed): the baseline every speed-up is relative to;
- IVF-Flat and IVF-PQ re-ranked from an 8-bit copy, both through the project's own search API
  (`lookalike.predictor.index.VectorIndex.search`: input checks, the filter path, ids mapped to listing ids),
  at the nprobe the build tuned for recall@10 0.95; raw FAISS on the same IVF-Flat shows the API's cost,
  and a line per index splits one query's time between the coarse quantizer, the list scan and the API;
- incremental updates: an index trained on 90% of the vectors, the other 10% added without
  retraining, against the full build at the same nprobe;
- peers where installed: hnswlib (HNSW) and Milvus Lite (IVF_FLAT); a missing peer is skipped with a note.

Per method: build seconds, bytes per vector (the serialised index structures), and for one query at a
time and for batches of 64: recall@10 and queries per second, with the speed-up over exact search.
Timings stop after a few seconds per method (exact search is slow by design) and keep the best
of three rounds, as the machine may be busy with other work. One `ann:` line per index kind, IVF-Flat's
first (unless --skip-flat), the compact index's last:
`ann: recall@10=<r> speedup_vs_exact=<s>x (single query, <kind>, N=<n>) bytes_per_vector=<b>`.

Why this file is long: every ratio it prints is against the exact search timed in the same run on the same
vectors, so the data, the timing rules, each index kind and the peers live in one script.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

K = 10
BATCH = 64
SINGLE_SECONDS = 4.5      # time budget per method for one-query-at-a-time timing
ROUNDS = 3                # timings keep the best round: the machine may be shared
MIN_SINGLE = 8
PQ_TARGET = 0.95          # the compact index is tuned to the same recall@10 as IVF-Flat
INCREMENTAL_MAX_N = 2_000_000  # above this the incremental build (a third full build) runs only when asked


# ---- the yardstick's generator (kept identical, so data made here matches --vectors data) ----------

def make(n=1_000_000, nq=1000, d=256, n_clusters=20_000, n_super=1000, seed=12345, chunk=100_000):
    """Seeded hierarchical Gaussian mixture, L2-normalised, shaped like image embeddings (see the
    yardstick's docstring: anisotropic spectrum, a common mean direction, 1,000 super-categories over
    20,000 clusters of log-normal sizes, overlapping clusters). Returns (base, queries)."""
    rng = np.random.default_rng(seed)
    s = (1.0 + np.arange(d)) ** -0.35
    s = (s / np.sqrt((s ** 2).sum())).astype(np.float32)
    mean = rng.standard_normal(d).astype(np.float32) * s
    mean *= 1.5 / np.linalg.norm(mean)
    sup = rng.standard_normal((n_super, d), dtype=np.float32) * s
    parent = rng.integers(0, n_super, n_clusters)
    cent = sup[parent] + 0.4 * rng.standard_normal((n_clusters, d), dtype=np.float32) * s + mean
    sigma = rng.uniform(1.2, 2.0, n_clusters).astype(np.float32)
    iso = np.float32(1.0 / np.sqrt(d))
    w = rng.lognormal(0.0, 1.0, n_clusters)
    w /= w.sum()
    lab = rng.choice(n_clusters, n + nq, p=w)
    out = np.empty((n + nq, d), np.float32)
    for i in range(0, n + nq, chunk):
        lb = lab[i:i + chunk]
        x = cent[lb] + sigma[lb, None] * rng.standard_normal((len(lb), d), dtype=np.float32) * iso
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[i:i + chunk] = x
    return out[nq:], out[:nq]


def load_data(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Base vectors, queries and exact top-K. A --vectors base is read into memory once, before anything is
    timed: exact search, the baseline of every ratio, then scans memory, never a memory-mapped file that
    the page cache may have let go (at 10M vectors a disk-bound baseline made a ratio look 3x better)."""
    import faiss

    n = args.n or (100_000 if args.quick else 1_000_000)
    if args.vectors:
        folder = Path(args.vectors)
        mapped = np.load(folder / "base.npy", mmap_mode="r")
        queries = np.load(folder / "queries.npy")
        total = len(mapped)
        n = min(args.n or (100_000 if args.quick else total), total)  # all of its vectors unless told otherwise
        base = np.empty((n, mapped.shape[1]), np.float32)
        for i in range(0, n, 1_000_000):  # in chunks: no second copy of a 10 GB base
            base[i:i + 1_000_000] = mapped[i:min(n, i + 1_000_000)]
        del mapped
        # the stored ground truth is for the whole base
        gt = np.load(folder / "gt.npy")[:, :K] if n == total and (folder / "gt.npy").exists() else None
        source = f"{folder} ({len(base)} of its vectors, read into memory)"
    else:
        base, queries = make(n=n)
        gt = None
        source = "generated with the yardstick's generator"
    if gt is None:
        _, gt = faiss.knn(queries, base, K, metric=faiss.METRIC_INNER_PRODUCT)
    return base, queries, gt.astype(np.int64), source


# ---- measuring ------------------------------------------------------------------------------------

def recall(found_rows: np.ndarray, gt: np.ndarray) -> float:
    """recall@K against exact search, by the project's one definition (FAISS's knn_intersection_measure)."""
    from lookalike.predictor.index import recall_at_k

    return recall_at_k(found_rows, gt, K)


SINGLE_THREADS = 1  # FAISS threads for one query: a server runs one query per core (--single-threads)


def time_single(search_one, queries: np.ndarray, threads: int | None = None) -> float:
    """Queries per second, one query per call: the best of ROUNDS rounds of at most SINGLE_SECONDS/ROUNDS
    each (and at least MIN_SINGLE queries), so a burst of other work on the machine does not decide it.

    FAISS runs with `threads` OpenMP threads (default SINGLE_THREADS): one query per core is how a server
    runs them, and an OpenMP region per small query stalls whenever another process holds a core."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads or SINGLE_THREADS)
    try:
        return _time_single(search_one, queries)
    finally:
        faiss.omp_set_num_threads(before)


def _time_single(search_one, queries: np.ndarray) -> float:
    for q in queries[:3]:  # warm-up
        search_one(q[None, :])
    best, pos = 0.0, 0
    for _ in range(ROUNDS):
        done, start = 0, time.perf_counter()
        while True:
            i = (pos + done) % len(queries)
            search_one(queries[i:i + 1])
            done += 1
            elapsed = time.perf_counter() - start
            if done >= len(queries) or (done >= MIN_SINGLE and elapsed > SINGLE_SECONDS / ROUNDS):
                break
        best = max(best, done / (time.perf_counter() - start))
        pos = (pos + done) % len(queries)
    return best


def time_batches(search_batch, queries: np.ndarray) -> float:
    """Queries per second in batches of BATCH: the best of ROUNDS rounds, as for single queries."""
    search_batch(queries[:BATCH])
    best = 0.0
    for _ in range(ROUNDS):
        done, start = 0, time.perf_counter()
        for i in range(0, len(queries), BATCH):
            search_batch(queries[i:i + BATCH])
            done += len(queries[i:i + BATCH])
            if i >= BATCH and time.perf_counter() - start > 2 * SINGLE_SECONDS / ROUNDS:
                break
        best = max(best, done / (time.perf_counter() - start))
    return best


def faiss_bytes(index) -> int:
    """The serialised size of a FAISS index, written to a temporary file: serialising into memory would
    need a second copy of a 10 GB index."""
    import faiss

    with tempfile.TemporaryDirectory(prefix="ann-size-") as tmp:
        faiss.write_index(index, f"{tmp}/index.faiss")
        return os.path.getsize(f"{tmp}/index.faiss")


class Table:
    def __init__(self, exact_single: float, exact_batch: float):
        self.exact = (exact_single, exact_batch)
        self.rows: list[str] = []
        print(f"{'method':<34} {'build_s':>8} {'B/vec':>7} {'param':>10} {'R@10(1)':>8} {'QPS(1)':>9} "
              f"{'x exact':>8} {'R@10(64)':>8} {'QPS(64)':>9} {'x exact':>8}", flush=True)

    def row(self, name, build_s, bpv, param, r1, q1, r64, q64):
        line = (f"{name:<34} {build_s:>8.1f} {bpv:>7.0f} {param:>10} {r1:>8.3f} {q1:>9.0f} "
                f"{q1 / self.exact[0]:>7.0f}x {r64:>8.3f} {q64:>9.0f} {q64 / self.exact[1]:>7.1f}x")
        print(line, flush=True)


def rows_of_result(result, key_to_row) -> np.ndarray:
    ids = result.ids
    out = np.full(ids.shape, -1, np.int64)
    valid = ids >= 0
    out[valid] = key_to_row(ids[valid])
    return out


# ---- methods --------------------------------------------------------------------------------------

def bench_project(name, index, build_s, bpv, queries, gt, key_to_row, table, nprobe=None):
    res = index.search(queries, K, nprobe=nprobe)
    r = recall(rows_of_result(res, key_to_row), gt)
    q1 = time_single(lambda q: index.search(q, K, nprobe=nprobe), queries)
    q64 = time_batches(lambda q: index.search(q, K, nprobe=nprobe), queries)
    table.row(name, build_s, bpv, f"nprobe={nprobe or index.nprobe}", r, q1, r, q64)
    return r, q1, q64


def time_breakdown(name, index, queries) -> None:
    """Where one single-threaded query's time goes: the coarse quantizer alone, FAISS's whole search (the
    quantizer, the list scan and, for IVF-PQ, the short list), and the project API around it (input checks,
    the re-ranking, ids mapped to listings)."""
    import faiss

    ivf = faiss.extract_index_ivf(index._index)
    nprobe = index.nprobe
    k_base = index._refine.short_list(K, len(index)) if index._refine is not None else K
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    scores, ids = np.empty((1, k_base), np.float32), np.empty((1, k_base), np.int64)
    lists_d, lists_i = np.empty((1, nprobe), np.float32), np.empty((1, nprobe), np.int64)

    def coarse(q):
        ivf.quantizer.search_c(1, faiss.swig_ptr(q), nprobe, faiss.swig_ptr(lists_d), faiss.swig_ptr(lists_i))

    def whole(q):
        index._index.search_c(1, faiss.swig_ptr(q), k_base, faiss.swig_ptr(scores), faiss.swig_ptr(ids), params)

    us = [1e6 / time_single(f, queries) for f in (coarse, whole, lambda q: index.search(q, K))]
    print(f"{name} single query, one thread: {us[2]:.0f} us = coarse quantizer {us[0]:.0f} + list scan "
          f"{us[1] - us[0]:.0f} ({nprobe} lists, short list {k_base}) + project API {us[2] - us[1]:.0f} "
          f"(checks, {'re-ranking, ' if index._refine is not None else ''}ids to listings)", flush=True)


def bench_hnswlib(base, queries, gt, table, m: int, ef_construction: int) -> None:
    try:
        import hnswlib
    except ImportError:
        print("hnswlib: not installed, skipped (pip install hnswlib)")
        return
    n, d = base.shape
    index = hnswlib.Index(space="ip", dim=d)
    start = time.perf_counter()
    index.init_index(max_elements=n, M=m, ef_construction=ef_construction, random_seed=0)
    index.add_items(base, np.arange(n), num_threads=os.cpu_count() or 1)
    build_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        index.save_index(f"{tmp}/h.bin")
        bpv = os.path.getsize(f"{tmp}/h.bin") / n
    chosen, r = None, 0.0
    for ef in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512):
        index.set_ef(ef)
        labels, _ = index.knn_query(queries, k=K)
        r = recall(labels.astype(np.int64), gt)
        chosen = ef
        if r >= 0.95:
            break
    index.set_ef(chosen)
    q1 = time_single(lambda q: index.knn_query(q, k=K, num_threads=1), queries)
    q64 = time_batches(lambda q: index.knn_query(q, k=K), queries)
    table.row(f"hnswlib HNSW M={m} efC={ef_construction}", build_s, bpv, f"ef={chosen}", r, q1, r, q64)


def bench_milvus(base, queries, gt, table, nlist: int, nprobe: int) -> None:
    try:
        from pymilvus import MilvusClient
    except ImportError:
        print("Milvus Lite: pymilvus/milvus-lite not installed, skipped (pip install milvus-lite pymilvus)")
        return
    tmp = tempfile.mkdtemp(prefix="ann-milvus-")
    client = None
    try:
        client = MilvusClient(f"{tmp}/bench.db")
        n, d = base.shape
        start = time.perf_counter()
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        from pymilvus import DataType

        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=d)
        client.create_collection("bench", schema=schema)
        for i in range(0, n, 10_000):
            chunk = base[i:i + 10_000]
            client.insert("bench", [{"id": int(i + j), "v": v} for j, v in enumerate(chunk)])
        params = client.prepare_index_params()
        params.add_index(field_name="v", index_type="IVF_FLAT", metric_type="IP", params={"nlist": nlist})
        client.flush("bench")  # seal the segments, so the index covers them (growing ones are brute-forced)
        client.create_index("bench", params)
        client.load_collection("bench")
        described = client.describe_index("bench", "v") or {}
        build_s = time.perf_counter() - start
        search_params = {"metric_type": "IP", "params": {"nprobe": nprobe}}

        def search(q):
            return client.search("bench", data=q.tolist(), limit=K, anns_field="v", search_params=search_params)

        def measure(count: int) -> float:
            hits = []
            for i in range(0, count, BATCH):
                hits += search(queries[i:min(i + BATCH, count)])
            found = np.array([[h["id"] for h in row] + [-1] * (K - len(row)) for row in hits], np.int64)
            return recall(found, gt[:count])

        # Milvus trains its own k-means: raise nprobe (on 256 queries) until it too reaches 0.95
        probe = nprobe
        while measure(min(256, len(queries))) < 0.95 and probe < nlist:
            probe = min(nlist, probe * 2)
            search_params["params"]["nprobe"] = probe
        nprobe = probe
        r = measure(len(queries))
        q1 = time_single(search, queries)
        q64 = time_batches(search, queries)
        if described.get("index_type") != "IVF_FLAT":
            print(f"Milvus Lite: the index reports {described.get('index_type')!r}, not IVF_FLAT")
        table.row("Milvus Lite IVF_FLAT", build_s, float("nan"), f"nprobe={nprobe}", r, q1, r, q64)
    except Exception as exc:  # noqa: BLE001 - a peer failing must not stop the benchmark
        print(f"Milvus Lite: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
    finally:
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def bench_flat(base, listing_ids, queries, gt, key_to_row, table, exact_single, cores, progress) -> dict:
    """IVF-Flat through the project's API, and raw FAISS on the same index (the API's cost)."""
    import faiss

    from lookalike.predictor.index import VectorIndex

    n = len(base)
    start = time.perf_counter()
    flat = VectorIndex.build(base, listing_ids, model_version="bench", progress=progress)
    build = time.perf_counter() - start
    size = faiss_bytes(flat._index)
    info = flat.info
    print(f"IVF-Flat: {info['factory']}, tuned nprobe {info['nprobe']} (held-out recall@10 "
          f"{info['recall_at_10']:.3f}; curve {[(c['nprobe'], c['recall_at_10']) for c in info['recall_curve']]})",
          flush=True)
    r, q1, _ = bench_project("IVF-Flat (project API)", flat, build, size / n, queries, gt, key_to_row, table)
    time_breakdown("IVF-Flat", flat, queries)
    q1_all = time_single(lambda q: flat.search(q, top_k=K), queries, threads=cores)
    print(f"IVF-Flat single queries with {cores} FAISS threads: {q1_all:.0f} q/s "
          f"({q1_all / exact_single:.0f}x exact at {SINGLE_THREADS} thread)", flush=True)
    raw = flat._index
    params = faiss.SearchParametersIVF()
    params.nprobe = flat.nprobe
    _, raw_ids = raw.search(queries, K, params=params)
    r_raw = recall(np.where(raw_ids >= 0, key_to_row(raw_ids.clip(0)), -1), gt)
    q1_raw = time_single(lambda q: raw.search(q, K, params=params), queries)
    q64_raw = time_batches(lambda q: raw.search(q, K, params=params), queries)
    table.row("IVF-Flat (raw FAISS, same index)", build, size / n, f"nprobe={flat.nprobe}", r_raw, q1_raw, r_raw,
              q64_raw)
    return {"recall": r, "q1": q1, "q1_raw": q1_raw, "bytes": size, "nlist": flat.nlist, "nprobe": flat.nprobe}


# ---- main -----------------------------------------------------------------------------------------

def compact_index(args, base: np.ndarray, listing_ids: list[str]):
    """(the compact index, its build seconds): loaded from --compact-index when that folder holds a compact index
    of this dimension with as many vectors and this run's listing ids (the last one checked), else built, and
    saved there when asked. The folder is trusted to hold these vectors: name one per --vectors base."""
    from lookalike.predictor.index import PQ_FACTORY, REFINE_K_FACTOR, VectorIndex, VectorIndexError

    folder = Path(args.compact_index) if args.compact_index else None
    if folder is not None and (folder / "index.json").exists():
        try:
            pq = VectorIndex.load(folder, model_version="bench", dim=base.shape[1])
        except VectorIndexError as e:
            print(f"IVF-PQ: {folder} could not be loaded ({e}); building it again", flush=True)
        else:
            if len(pq) == len(base) and ",PQ" in pq.info["factory"] and listing_ids[-1] in pq:
                print(f"IVF-PQ: loaded from {folder} (built in {pq.info['build_seconds']:.0f} s)", flush=True)
                return pq, float(pq.info["build_seconds"])
            print(f"IVF-PQ: {folder} holds another index ({len(pq)} vectors, {pq.info['factory']}); building it "
                  f"again", flush=True)
    start = time.perf_counter()
    pq = VectorIndex.build(base, listing_ids, model_version="bench", factory=PQ_FACTORY, progress=args.progress,
                           target_recall=PQ_TARGET, refine_k_factor=args.refine_k_factor or REFINE_K_FACTOR)
    took = time.perf_counter() - start
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        pq.save(folder)
    return pq, took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--vectors", help="folder with base.npy, queries.npy, gt.npy (the yardstick's output)")
    parser.add_argument("--quick", action="store_true", help="100,000 vectors (about a minute)")
    parser.add_argument("--n", type=int, help="use this many base vectors (default: all of --vectors, else 1,000,000)")
    parser.add_argument("--skip-peers", action="store_true", help="skip hnswlib and Milvus Lite")
    parser.add_argument("--hnsw-m", type=int, default=None, help="hnswlib M (default 16 with --quick, else 32)")
    parser.add_argument("--hnsw-ef-construction", type=int, default=None,
                        help="hnswlib efConstruction (default 48 with --quick, else 100)")
    parser.add_argument("--progress", action="store_true", help="progress bars for builds")
    parser.add_argument("--skip-flat", action="store_true",
                        help="measure only the compact index (IVF-Flat's memory is then its formula, 4·D + 8 bytes "
                             "per vector); at 10M vectors each build takes about ten minutes on 2 cores")
    parser.add_argument("--incremental", action="store_true",
                        help=f"also run the incremental-update build above {INCREMENTAL_MAX_N:,} vectors")
    parser.add_argument("--skip-incremental", action="store_true",
                        help="skip the incremental-update build (a third full build) at any size")
    parser.add_argument("--refine-k-factor", type=int, default=None,
                        help="IVF-PQ candidates re-ranked per result wanted (default: the index's own, "
                             "lookalike.predictor.index.factory.REFINE_K_FACTOR)")
    parser.add_argument("--compact-index", metavar="DIR",
                        help="load the compact index from DIR when it holds one built on these vectors, else build it "
                             "and save it there: a 10M build (about 15 minutes of 2 cores) is paid once, and "
                             "later runs time the search alone (build_s is then the saved build's)")
    parser.add_argument("--single-threads", type=int, default=1,
                        help="FAISS threads for one-query-at-a-time timings (default 1: one query per core, as a "
                             "server runs them; the IVF-Flat line is also timed with every core)")
    args = parser.parse_args(argv)
    global SINGLE_THREADS
    SINGLE_THREADS = max(1, args.single_threads)

    import faiss

    from lookalike.predictor.index import (VectorIndex, flat_bytes_per_vector,
                                           listing_keys)

    base, queries, gt, source = load_data(args)
    n, d = base.shape
    print(f"ann: {n} base vectors, {len(queries)} queries, d={d}, {source}; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads", flush=True)
    listing_ids = [f"v{i}" for i in range(n)]
    keys = listing_keys(listing_ids)
    order = np.argsort(keys)
    sorted_keys = keys[order]

    def key_to_row(k: np.ndarray) -> np.ndarray:
        return order[np.searchsorted(sorted_keys, k)]

    # exact baseline: FAISS brute force straight on the base array (IndexFlatIP would copy all of it)
    def exact_search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(q, base, K, metric=faiss.METRIC_INNER_PRODUCT)

    exact_single = time_single(exact_search, queries)
    exact_batch = time_batches(exact_search, queries)
    table = Table(exact_single, exact_batch)
    table.row("exact brute force (baseline)", 0.0, 4 * d, "-", 1.0, exact_single, 1.0, exact_batch)

    cores = os.cpu_count() or 1
    flat = None if args.skip_flat else bench_flat(base, listing_ids, queries, gt, key_to_row, table, exact_single,
                                                  cores, args.progress)
    if flat is None:
        print("IVF-Flat: skipped (--skip-flat); its memory below is its formula, 4·D + 8 bytes per vector")

    # IVF-PQ, re-ranked from an 8-bit scalar-quantized copy
    pq, pq_build = compact_index(args, base, listing_ids)
    pq_bytes = faiss_bytes(pq._index) + pq._refine.codes.nbytes + faiss_bytes(pq._refine.codec)
    print(f"IVF-PQ: {pq.info['factory']}, tuned for recall@10 {PQ_TARGET}: nprobe {pq.nprobe}, short list "
          f"{pq.info['refine']['k_factor']}·top_k (held-out recall@10 {pq.info['recall_at_10']:.3f}; curve "
          f"{[(c['nprobe'], c['recall_at_10']) for c in pq.info['recall_curve']]})", flush=True)
    r_pq, q1_pq, _ = bench_project("IVF-PQ + SQ8 re-rank (project API)", pq, pq_build, pq_bytes / n, queries, gt,
                                   key_to_row, table)
    time_breakdown("IVF-PQ", pq, queries)
    q1_pq_all = time_single(lambda q: pq.search(q, top_k=K), queries, threads=cores)
    print(f"IVF-PQ single queries with {cores} FAISS threads: {q1_pq_all:.0f} q/s "
          f"({q1_pq_all / exact_single:.0f}x exact at {SINGLE_THREADS} thread)", flush=True)
    pq = None  # free its memory

    # incremental: train on 90%, add the other 10% without retraining, same nprobe as the full build
    r_inc = None
    if flat is None:
        print("incremental: skipped with IVF-Flat")
    elif args.skip_incremental:
        print("incremental: skipped (--skip-incremental)")
    elif n > INCREMENTAL_MAX_N and not args.incremental:
        print(f"incremental: skipped above {INCREMENTAL_MAX_N:,} vectors (a third full build; --incremental runs it)")
    else:
        cut = int(n * 0.9)
        start = time.perf_counter()
        inc = VectorIndex.build(base[:cut], listing_ids[:cut], model_version="bench", progress=args.progress)
        inc.add(base[cut:], listing_ids[cut:])
        inc_build = time.perf_counter() - start
        inc_res = inc.search(queries, K, nprobe=flat["nprobe"])
        r_inc = recall(rows_of_result(inc_res, key_to_row), gt)
        drift = inc.drift()
        print(f"incremental: 90% trained ({inc.nlist} lists) + 10% added in {inc_build:.1f}s: recall@10 {r_inc:.3f} "
              f"at nprobe {flat['nprobe']} vs {flat['recall']:.3f} for the full build (diff "
              f"{r_inc - flat['recall']:+.3f}); drift: "
              f"rebuild_due={drift['rebuild_due']} ({drift['why']})", flush=True)
        del inc

    if args.skip_peers or flat is None:
        print("peers: skipped (--skip-peers or --skip-flat)")
    else:
        m = args.hnsw_m or (16 if args.quick else 32)
        efc = args.hnsw_ef_construction or (48 if args.quick else 100)
        bench_hnswlib(base, queries, gt, table, m, efc)
        bench_milvus(base, queries, gt, table, flat["nlist"], flat["nprobe"])

    verdict = {True: "ok", False: "MISSED"}
    pq_speedup = q1_pq / exact_single
    flat_bytes = flat["bytes"] if flat else n * flat_bytes_per_vector(d)
    pq_ratio = pq_bytes / flat_bytes
    parts = []
    if flat:
        speedup = flat["q1"] / exact_single
        one_m = verdict[speedup >= 500] if n >= 1_000_000 else "applies to 1M vectors"
        parts.append(f"IVF-Flat recall@10 {flat['recall']:.3f} (>= 0.95: {verdict[flat['recall'] >= 0.95]}), "
                     f"single-query speed-up {speedup:.0f}x (>= 500x at 1M: {one_m})")
    ten_m = verdict[pq_speedup >= 2000] if n >= 10_000_000 else "applies to 10M vectors"
    parts.append(f"compact IVF-PQ recall@10 {r_pq:.3f} (>= 0.95: {verdict[r_pq >= 0.95]}), speed-up "
                 f"{pq_speedup:.0f}x (>= 2000x at 10M: {ten_m}), {pq_bytes / n:.0f} bytes per vector (<= 358: "
                 f"{verdict[pq_bytes / n <= 358]}), {pq_ratio:.2f} of IVF-Flat's memory")
    if r_inc is not None:
        diff = r_inc - flat["recall"]
        parts.append(f"incremental diff {diff:+.3f} (within 0.01: {verdict[abs(diff) <= 0.01]})")
    if flat:
        parts.append(f"API overhead {(1 / flat['q1'] - 1 / flat['q1_raw']) * 1e6:.0f} us/query over raw FAISS")
        print(f"ann: recall@10={flat['recall']:.3f} speedup_vs_exact={flat['q1'] / exact_single:.0f}x (single query, "
              f"IVF-Flat, N={n}) bytes_per_vector={flat['bytes'] / n:.0f}")
    print("targets: " + "; ".join(parts))
    print(f"ann: recall@10={r_pq:.3f} speedup_vs_exact={pq_speedup:.0f}x (single query, IVF-PQ+SQ8 "
          f"re-rank, N={n}) bytes_per_vector={pq_bytes / n:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
