"""Catalog images in memory, one dataset per task, augmentation, and batches built in the background.

- `ImageBank`: every readable catalog image decoded once (with the transformer's checks) and kept in
  memory, shrunk to at most `max_side` pixels so memory stays bounded; unreadable images are skipped
  and counted, never fatal.
- `build_tasks`: a task's dataset is the rows that carry its label; the label vocabulary comes from the
  catalog. A task without labels, or with a single class, cannot be trained: it is skipped with a
  warning that says so. No task left is an error.
- `Augment`: flips and a mild random crop on the catalog image, sometimes a simulated phone photo,
  then THE preprocessing (`transformer.preprocessing`), so training sees what serving will feed.
- `BatchLoader`: turns the sampler's plans into tensors in a background thread, a few batches ahead.
  Batch `step` depends only on (seed, step): training is repeatable whatever the thread timing.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from training.catalog import Catalog, CatalogError, CatalogRow
from training.sampler import BalancedTaskSampler, BatchPlan
from transformer.preprocessing import PreprocessSpec, normalize, resize_and_crop

log = logging.getLogger(__name__)


# ---- images ----------------------------------------------------------------------------------------

@dataclass
class ImageBank:
    rows: list[CatalogRow]
    images: list[Image.Image]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (listing_id, why)

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def load(cls, catalog: Catalog, *, max_side: int = 256, workers: int = 8, progress: bool = True,
             cache_dir: str | None = None) -> "ImageBank":
        """Decode every image of `catalog`; unreadable ones are skipped with a warning count."""
        if not catalog.rows:
            raise CatalogError(f"catalog {catalog.uri or '(in memory)'} is empty: it needs at least one row "
                               f"with an image and a label")
        if cache_dir is not None and any(r.image.startswith("s3://") for r in catalog.rows):
            catalog.prefetch(cache_dir, progress=progress)

        def one(row: CatalogRow) -> Image.Image | str:
            try:
                img = catalog.load_image(row)
            except Exception as exc:  # noqa: BLE001 - any unreadable image is skipped and counted
                return f"{type(exc).__name__}: {exc}"
            if max(img.size) > max_side:
                img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            return img

        from tqdm import tqdm

        rows, images, skipped = [], [], []
        with ThreadPoolExecutor(workers) as pool:
            for row, got in zip(catalog.rows, tqdm(pool.map(one, catalog.rows), total=len(catalog.rows),
                                                   desc="load images", unit="img", disable=not progress,
                                                   leave=False)):
                if isinstance(got, str):
                    skipped.append((row.listing_id, got))
                else:
                    rows.append(row)
                    images.append(got)
        if skipped:
            log.warning("skipped %d of %d catalog images that could not be read (first: %s: %s)",
                        len(skipped), len(catalog.rows), *skipped[0])
        if not rows:
            raise CatalogError(f"none of the {len(catalog.rows)} images of {catalog.uri} could be read "
                               f"(first: {skipped[0][0]}: {skipped[0][1]}); check the image paths or the store")
        return cls(rows, images, skipped)


# ---- tasks -----------------------------------------------------------------------------------------

@dataclass
class TaskData:
    """One task's dataset: the bank rows carrying its label, and each one's class index."""
    name: str
    labels: list[str]  # the vocabulary, class-index order
    indices: np.ndarray  # [n] rows of the ImageBank
    targets: np.ndarray  # [n] class index of each

    def __len__(self) -> int:
        return len(self.indices)


def build_tasks(rows: list[CatalogRow], requested: list[str] | None = None,
                vocab: dict[str, list[str]] | None = None) -> tuple[dict[str, TaskData], list[str]]:
    """Per-task datasets and the warnings about tasks that were skipped.

    `requested` limits training to those tasks (default: every label in the catalog). `vocab` fixes a
    task's label order (e.g. a model's heads); rows with a label outside it are left out of that task.
    """
    found: dict[str, set[str]] = {}
    for row in rows:
        for task, value in row.labels.items():
            found.setdefault(task, set()).add(value)
    names = list(requested) if requested else sorted(found)
    tasks: dict[str, TaskData] = {}
    warnings: list[str] = []
    for name in names:
        labels = list(vocab[name]) if vocab and name in vocab else sorted(found.get(name, ()))
        if not found.get(name):
            warnings.append(f"task {name!r} is skipped: no row of the catalog carries this label")
            continue
        if len(labels) < 2:
            warnings.append(f"task {name!r} is skipped: it has a single class ({labels[0]!r}), so there is "
                            f"nothing to tell apart")
            continue
        index = {label: i for i, label in enumerate(labels)}
        pairs = [(i, index[r.labels[name]]) for i, r in enumerate(rows) if r.labels.get(name) in index]
        tasks[name] = TaskData(name, labels, np.array([p[0] for p in pairs], dtype=np.int64),
                               np.array([p[1] for p in pairs], dtype=np.int64))
    for message in warnings:
        log.warning(message)
    if not tasks:
        raise CatalogError("no task can be trained: " + ("; ".join(warnings) if warnings else
                           "the catalog rows carry no labels") + ". Add labels with at least two classes")
    return tasks, warnings


# ---- augmentation ----------------------------------------------------------------------------------

@dataclass
class Augment:
    """Catalog image → augmented, preprocessed float32 [3, size, size].

    Geometric jitter is mild (products are centred in catalog shots); the phone-photo simulation is the
    strong augmentation, applied with probability `phone_p`.
    """
    spec: PreprocessSpec
    flip: bool = True
    crop_scale: float = 0.8  # random crop keeps at least this fraction of each side
    phone_p: float = 0.3
    phone_strength: float = 1.0
    # With two views (triplet), the first is a catalog-like shot and the second a phone photo with this
    # probability: the pair is then exactly a shopper's query and the listing it should find.
    second_view_phone_p: float = 0.8

    def __call__(self, img: Image.Image, rng: np.random.Generator, phone_p: float | None = None) -> np.ndarray:
        phone_p = self.phone_p if phone_p is None else phone_p
        if phone_p > 0 and rng.random() < phone_p:
            from training.phone_photos import simulate_phone_photo

            img = simulate_phone_photo(img, rng, strength=self.phone_strength, out_size=self.spec.size)
        else:
            if self.crop_scale < 1.0:
                w, h = img.size
                f = rng.uniform(self.crop_scale, 1.0)
                cw, ch = max(1, round(w * f)), max(1, round(h * f))
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                img = img.crop((x0, y0, x0 + cw, y0 + ch))
            if self.flip and rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return normalize(resize_and_crop(img, self.spec), self.spec)


def plain(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """No augmentation: exactly the serving preprocessing."""
    return normalize(resize_and_crop(img, spec), spec)


# ---- batches ---------------------------------------------------------------------------------------

@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W] (B doubled when two views are drawn)
    task_ids: torch.Tensor  # [B] index into the task list
    targets: torch.Tensor  # [B] class index within the sample's task
    listing: torch.Tensor  # [B] ImageBank row: the same product in both views

    def __len__(self) -> int:
        return len(self.task_ids)


class BatchLoader:
    """Batches for steps `start..stop-1` built ahead in a background thread (bounded queue)."""

    def __init__(self, bank: ImageBank, tasks: dict[str, TaskData], sampler: BalancedTaskSampler,
                 augment: Augment, *, two_views: bool = False, seed: int = 0, prefetch: int = 3):
        self.bank, self.tasks, self.sampler, self.augment = bank, tasks, sampler, augment
        self.task_list = [tasks[t] for t in sampler.tasks]
        self.two_views, self.seed, self.prefetch = two_views, seed, prefetch

    def make(self, step: int) -> Batch:
        plan: BatchPlan = self.sampler.plan(step)
        rows = np.array([self.task_list[t].indices[p] for t, p in zip(plan.task, plan.position)], np.int64)
        targets = np.array([self.task_list[t].targets[p] for t, p in zip(plan.task, plan.position)], np.int64)
        rng = np.random.default_rng([self.seed, 7919, step])
        if self.two_views:
            views = 2
            arrays = [self.augment(self.bank.images[r], rng, 0.0) for r in rows]
            arrays += [self.augment(self.bank.images[r], rng, self.augment.second_view_phone_p) for r in rows]
        else:
            views = 1
            arrays = [self.augment(self.bank.images[r], rng) for r in rows]
        return Batch(torch.from_numpy(np.stack(arrays)),
                     torch.from_numpy(np.tile(plan.task, views)),
                     torch.from_numpy(np.tile(targets, views)),
                     torch.from_numpy(np.tile(rows, views)))

    def iterate(self, start: int, stop: int) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop_event = threading.Event()

        def work() -> None:
            try:
                for step in range(start, stop):
                    if stop_event.is_set():
                        return
                    q.put(self.make(step))
                q.put(None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                q.put(exc)

        thread = threading.Thread(target=work, name="batch-loader", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop_event.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
