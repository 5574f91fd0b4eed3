"""Where the index's work runs: a GPU when FAISS sees one, the CPU otherwise. Nothing needs a GPU.

With faiss-gpu and a CUDA device (``faiss.get_num_gpus() > 0``), a build trains and adds on device 0
(`train_and_add`), and unfiltered searches run on a `GpuReplica` of the CPU index. Filtered searches,
nprobe or k above the GPU's `GPU_MAX_K`, and index types the GPU lacks (fast-scan PQ trains there but
searches on the CPU) run on the CPU copy, which is always the one saved.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from lookalike.predictor.index.errors import BadIndexInput
from lookalike.predictor.index.factory import ADD_CHUNK

log = logging.getLogger(__name__)

GPU_MAX_K = 2048               # FAISS GPU limit for k and nprobe


def gpu_count() -> int:
    """CUDA devices FAISS can use (0 with faiss-cpu)."""
    import faiss

    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0
    except Exception:  # a faiss-gpu build without a usable driver
        return 0


def want_gpu(use_gpu: bool | None) -> bool:
    """Whether to use the GPU: `use_gpu`, or when None whether there is one; refuses True without one."""
    if use_gpu is None:
        return gpu_count() > 0
    if use_gpu and gpu_count() == 0:
        raise BadIndexInput("use_gpu=True but FAISS sees no GPU (faiss-cpu, or no CUDA device)")
    return bool(use_gpu)


class GpuReplica:
    """A copy of the index on GPU 0 and its resources; searches on it are serialised (FAISS GPU indexes
    are not safe for concurrent calls)."""

    def __init__(self, cpu_index: Any) -> None:
        import faiss

        self.resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = False          # keep IVF-Flat vectors exact: same results as the CPU
        self.index = faiss.index_cpu_to_gpu(self.resources, 0, cpu_index, options)
        self.lock = threading.Lock()

    def search(self, queries: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            return self.index.search(queries, k, params=params)


def make_replica(cpu_index: Any) -> GpuReplica | None:
    """A GPU replica, or None (logged) for an index type the GPU cannot hold."""
    try:
        return GpuReplica(cpu_index)
    except Exception as exc:  # e.g. fast-scan PQ has no GPU implementation
        log.warning("searching on the CPU: this index type cannot be copied to the GPU (%s)", exc)
        return None


def add_chunks(index: Any, x: np.ndarray, keys: np.ndarray, progress: bool, desc: str) -> None:
    """add_with_ids in chunks of `ADD_CHUNK` vectors (a progress bar when asked and worth it)."""
    chunks = range(0, len(x), ADD_CHUNK)
    if progress and len(chunks) > 1:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc=desc, unit="chunk")
    for i in chunks:
        index.add_with_ids(x[i:i + ADD_CHUNK], keys[i:i + ADD_CHUNK])


def train_and_add(index: Any, xt: np.ndarray, x: np.ndarray, keys: np.ndarray, gpu: bool,
                  progress: bool) -> tuple[Any, str]:
    """Train on xt and fill with x; on a GPU when asked. Returns (the CPU index, where it was built)."""
    import faiss

    if gpu:
        try:
            replica = GpuReplica(index)  # the untrained index, on the GPU
            replica.index.train(xt)
            add_chunks(replica.index, x, keys, progress, "adding (GPU)")
            return faiss.index_gpu_to_cpu(replica.index), "gpu"
        except Exception as exc:  # noqa: BLE001 - types without a GPU version: k-means on the GPU only
            log.warning("building on the CPU with k-means on the GPU: %s", str(exc).splitlines()[0])
            resources = faiss.StandardGpuResources()
            ivf = faiss.extract_index_ivf(index)
            clustering = faiss.index_cpu_to_gpu(resources, 0, faiss.IndexFlatIP(x.shape[1]))
            ivf.clustering_index = clustering
            index.train(xt)
            ivf.clustering_index = None
            add_chunks(index, x, keys, progress, "adding")
            return index, "gpu-kmeans"
    index.train(xt)
    add_chunks(index, x, keys, progress, "adding")
    return index, "cpu"
