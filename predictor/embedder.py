"""Embedding preprocessed images with a published model version.

A model folder (see docs/architecture.md) holds the same network twice: `model.onnx` for serving and
`model.safetensors` for rebuilding it in PyTorch. The backend is picked for the machine:

- a CUDA GPU: PyTorch on the GPU, in half precision when that keeps the results (checked at load on a
  probe batch: every embedding within cosine 0.999 of full precision, same predicted class); full
  precision otherwise;
- a CPU: the ONNX graph in ONNX Runtime (about 1.9x faster than PyTorch eager at batch 1 here, with the
  outputs export checked to match PyTorch); PyTorch on the CPU when the graph or the runtime is missing.

Every backend answers the same question: `embed(images [N,3,S,S]) -> (embeddings [N,D], {task: probs})`.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from lookalike.core.settings import cpu_limit, ort_spin, ort_threads
from lookalike.core.errors import InputError
from lookalike.core.model_card import ONNX_FILE, ModelCard, ModelCardError
from lookalike.core.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

HALF_MIN_COSINE = 0.999
OVERLAP_MEMORY_S = 0.05  # after requests overlapped, ONNX Runtime stays single-threaded this long (_OnnxRunner)


class ModelLoadError(ModelCardError):
    """The model folder cannot be served (missing files, a graph that lacks outputs, an unknown backend)."""


class Embedder:
    """One loaded model version. Thread-safe: `embed` may be called from several threads."""

    def __init__(self, card: ModelCard, backend: str, runner, device: str = "cpu"):
        self.card = card
        self.backend = backend  # "onnxruntime", "torch" or "torch-cuda-fp16"/"torch-cuda-fp32"
        self.device = device
        self._run = runner
        self.tasks: list[str] = card.tasks
        self.heads: dict[str, list[str]] = {t: list(v) for t, v in card.heads.items()}
        self.size = card.preprocessing.size
        self.embedding_dim = card.embedding_dim
        self.model_version: str = card.model_version

    def __repr__(self) -> str:
        return f"Embedder({self.model_version}, {self.card.architecture}, {self.backend})"

    @property
    def preprocessing(self) -> PreprocessSpec:
        """The preprocessing this model's input must have (from its card)."""
        return self.card.preprocessing

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def check_input(self, images: np.ndarray) -> np.ndarray:
        """The batch as contiguous float32 [N,3,S,S], or an InputError saying what the model expects."""
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise InputError(f"expected preprocessed images of shape [N, {', '.join(map(str, self.input_shape))}] "
                             f"(this model's size is {self.size}), got {list(images.shape)}")
        return np.ascontiguousarray(images, dtype=np.float32)

    @property
    def has_locator(self) -> bool:
        """Whether the model also says where the product is (`embed_and_locate`'s objectness)."""
        return self.card.has_locator

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Preprocessed images [N,3,S,S] → (L2-normalised embeddings [N,D] float32, {task: probs [N,C]})."""
        embedding, probs, _ = self.embed_and_locate(images)
        return embedding, probs

    def embed_and_locate(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
        """`embed`, and from the same pass the locator's objectness [N, h, w] (None without a locator)."""
        images = self.check_input(images)
        if len(images) == 0:
            return (np.zeros((0, self.embedding_dim), np.float32),
                    {t: np.zeros((0, len(self.heads[t])), np.float32) for t in self.tasks}, None)
        return self._run(images)

    def batch_gain(self, batch: int, seconds: float = 0.3) -> float:
        """Images/s embedding `batch` images as one batch ÷ images/s embedding them as `batch` concurrent
        one-image calls (what unbatched concurrent requests do), measured now on random input.

        Decides whether micro-batching pays on this machine: on a GPU it does by far; on a small CPU
        running single-image requests side by side is usually the better use of the cores.
        """
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, *self.input_shape), dtype=np.float32)
        self.embed(x)  # warm up both shapes (and, on ONNX Runtime, both sessions) before timing
        _concurrent_rate(lambda: self.embed(x[:1]), 1, min(batch, 2), 0.02)
        rates: dict[str, list[float]] = {"batched": [], "side_by_side": []}
        for _ in range(2):  # alternate, so a burst of load elsewhere hits both sides
            rates["batched"].append(_concurrent_rate(lambda: self.embed(x), batch, 1, seconds / 4))
            rates["side_by_side"].append(_concurrent_rate(lambda: self.embed(x[:1]), 1, batch, seconds / 4))
        return float(np.median(rates["batched"]) / np.median(rates["side_by_side"]))

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, model: ModelCard | str | Path, backend: str = "auto", *, threads: int | None = None) -> Embedder:
        """Load a model version: its card (already verified) or its folder (whose card is read and verified
        once, here).

        backend: "auto" (GPU torch if CUDA is present, else ONNX Runtime, else CPU torch), "onnxruntime"
        or "torch".
        """
        card = model if isinstance(model, ModelCard) else ModelCard.read(model)
        if backend == "auto":
            backend = "torch" if _cuda_available() else ("onnxruntime" if _onnx_usable(card) else "torch")
        if backend == "onnxruntime":
            return cls(card, "onnxruntime", _OnnxRunner(card, threads))
        if backend == "torch":
            runner, name, device = _torch_runner(card)
            return cls(card, name, runner, device)
        raise ModelLoadError(f"unknown backend {backend!r}; use auto, onnxruntime or torch")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _onnx_usable(card: ModelCard) -> bool:
    if not card.file(ONNX_FILE).is_file():
        log.warning("%s has no %s: falling back to PyTorch", card.folder, ONNX_FILE)
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning("onnxruntime is not installed: falling back to PyTorch")
        return False
    return True


def _concurrent_rate(call, images_per_call: int, threads: int, seconds: float) -> float:
    """Images/s of `call` run back to back in `threads` threads for about `seconds`."""
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def loop(k: int) -> None:
        while time.perf_counter() < deadline or counts[k] == 0:
            call()
            counts[k] += images_per_call

    start = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start)


class _OnnxRunner:
    """ONNX Runtime on the CPU, fast for one request and efficient for several at once.

    Intra-op threads make a lone image faster but cost CPU: at 224 px on 2 cores, one image takes
    6.9 ms on two threads (13.8 core-ms) and 8.9 ms on one (8.9 core-ms). So the runner holds two
    sessions of the same graph: a request that finds the runner idle runs on the `wide` session (one
    thread per core: lowest latency), and requests that overlap run on the single-threaded `narrow`
    session, side by side, at most one per core (most images per second). Both sessions compute the
    same function; only the threads differ.

    "Idle" means more than the moment: a wide run that starts between two overlapping ones (one lane of a
    pipeline waiting for its next decoded batch while the other still runs) soon shares the cores with a
    narrow run that arrives behind it, and its two threads wait for each other: three threads on two cores.
    So after requests overlapped, the runner stays narrow until none has for `OVERLAP_MEMORY_S`. A lone
    caller, however fast it calls, never overlaps and keeps the wide session. (The index pipeline's embed
    step, two lanes side by side on 2 cores, ran at 0.76 of the model alone; with this, 0.80, the median of
    rounds at 0.76, 0.80 and 0.80 on a busy machine: benchmarks/embed_throughput.py.)
    """

    def __init__(self, card: ModelCard, threads: int | None):
        import onnxruntime as ort

        graph = card.file(ONNX_FILE)
        self.cores = threads or ort_threads() or cpu_limit()
        self.wide = self._session(ort, graph, self.cores)
        self.narrow = self._session(ort, graph, 1) if self.cores > 1 else self.wide
        self.input_name = card.onnx_input
        self.tasks = card.tasks
        self.names = card.output_names
        have = {o.name for o in self.wide.get_outputs()}
        missing = [n for n in self.names if n not in have]
        if missing:
            raise ModelLoadError(f"{graph} lacks outputs {missing} that model.json's heads call for")
        self._slots = threading.BoundedSemaphore(self.cores)  # runs at once; more would only time-slice
        self._lock = threading.Lock()
        self._demand = 0  # requests running or waiting for a slot
        self._overlapped_at = -OVERLAP_MEMORY_S  # perf_counter() when requests last overlapped
        self.runs = {"wide": 0, "narrow": 0}  # how often each session ran (for tests and debugging)

    @staticmethod
    def _session(ort, graph: Path, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not ort_spin():
            # Idle intra-op threads spin by default; on a shared CPU (the transformer beside us, other pods)
            # the spinning steals the cores the next request needs.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray):
        with self._lock:
            self._demand += 1
            if self._demand > 1:
                self._overlapped_at = time.perf_counter()
        try:
            with self._slots:
                with self._lock:
                    # Wide only when no other request is running or waiting: under load a slot that frees
                    # up goes to a waiting request, which must not take every core for itself.
                    alone = self._demand == 1 and time.perf_counter() - self._overlapped_at > OVERLAP_MEMORY_S
                    kind = "wide" if alone else "narrow"
                    self.runs[kind] += 1
                session = self.wide if kind == "wide" else self.narrow
                outs = session.run(self.names, {self.input_name: images})
        finally:
            with self._lock:
                self._demand -= 1
        n = len(self.tasks)
        return outs[0], dict(zip(self.tasks, outs[1:1 + n])), (outs[1 + n] if len(outs) > 1 + n else None)


def _torch_runner(card: ModelCard):
    import torch

    from lookalike.training.export import load_model

    model, _ = load_model(card)  # the card was verified when it was read: no second hashing
    tasks = card.tasks
    lock = threading.Lock()  # eval-mode torch is re-entrant, but one batch at a time is faster on a CPU
    if torch.cuda.is_available():
        device = torch.device("cuda")
        model = model.to(device).eval()
        # Half precision through autocast: weights stay fp32, matmuls and convolutions run in fp16, and the
        # model's own fp32 steps (normalisation, heads on the normalised embedding) keep their dtype.
        half = _half_keeps_results(model, card.preprocessing.size, device)
        name = f"torch-cuda-{'fp16' if half else 'fp32'}"
    else:
        device, half, name = torch.device("cpu"), False, "torch"
        model = model.eval()

    def run(images: np.ndarray):
        with lock, torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=half):
            x = torch.from_numpy(images).to(device=device, non_blocking=True)
            out = model(x)
            emb = torch.nn.functional.normalize(out["embedding"].float(), dim=-1)
            probs = {t: out["logits"][t].float().softmax(-1).cpu().numpy() for t in tasks}
            located = out["objectness"].float().cpu().numpy() if "objectness" in out else None
            return emb.cpu().numpy(), probs, located

    return run, name, str(device)


def _half_keeps_results(model, size: int, device) -> bool:
    """Half precision only if embeddings and predicted classes on a probe batch match full precision."""
    import torch

    probe = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.inference_mode():
            full = model(probe)
            with torch.autocast(device.type, dtype=torch.float16):
                half = model(probe)
    except RuntimeError as exc:  # an op without a half kernel: stay in full precision
        log.warning("half precision does not run on %s (%s): using fp32", device, exc)
        return False
    cos = torch.nn.functional.cosine_similarity(full["embedding"].float(), half["embedding"].float(), dim=-1)
    same_class = all(bool((full["logits"][t].argmax(-1) == half["logits"][t].float().argmax(-1)).all())
                     for t in full["logits"])
    ok = bool(cos.min() >= HALF_MIN_COSINE) and same_class
    log.info("half precision on %s: min cosine %.5f, same classes %s -> %s", device, float(cos.min()), same_class,
             "fp16" if ok else "fp32")
    return ok
