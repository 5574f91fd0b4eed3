"""Catalog photos in memory, one dataset per task, augmentation, and batches built in the background.

- `ImageBank`: every readable catalog photo decoded once (with the transformer's checks) and kept in
  memory, shrunk to at most `max_side` pixels so memory stays bounded; unreadable photos are skipped
  and counted, never fatal. It knows each photo's listing (`listing_index`) and its size as stored.
- `build_tasks`: a task's dataset is the LISTINGS that carry its label (a listing's photos share its
  labels); the label vocabulary comes from the catalog. A task without labels, or with a single class,
  cannot be trained: it is skipped with a warning that says so. No task left is an error.
- `Augment`: flips and a mild random crop on a catalog photo, or a simulated phone photo of the training
  recipe, then THE preprocessing (`lookalike.core.preprocessing`), so training sees what serving will feed.
- `BatchLoader`: turns the sampler's plans (P listings per task) into K views of each listing, built in a
  background thread a few batches ahead. A listing's views are its own photos first (another catalog
  view, a user photo) and simulated phone photos; a view whose colour cast is strong loses its colour
  label. Batch `step` depends only on (seed, step): training is repeatable whatever the thread timing.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from lookalike.catalogs.rows import Catalog, CatalogError, CatalogRow
from lookalike.training.phone_photos import STRONG_CAST, TRAINING, simulate
from lookalike.training.sampler import BalancedTaskSampler, BatchPlan, class_balanced_weights
from lookalike.core.preprocessing import PreprocessSpec, normalize, resize_and_crop

log = logging.getLogger(__name__)

COLOUR_WORDS = ("color", "colour", "shade")  # tasks whose label a colour cast can falsify


def is_colour_task(task: str) -> bool:
    return any(word in task.lower() for word in COLOUR_WORDS)


# ---- images ----------------------------------------------------------------------------------------

def kept_side(spec: PreprocessSpec | None = None) -> int:
    """Photos are kept in memory at most this large: enough for the model's input (`spec`, unknown
    before the catalog is measured) and for the pretrained model's 256-px resize in the evaluation."""
    return max(320, round(1.25 * max(256, spec.resize if spec is not None else 0)))


@dataclass
class ImageBank:
    rows: list[CatalogRow]
    images: list[Image.Image]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (listing_id, why)
    sizes: list[tuple[int, int]] | None = None  # each photo's (width, height) before it was shrunk

    def __post_init__(self):
        if self.sizes is None:
            self.sizes = [img.size for img in self.images]
        ordinal: dict[str, int] = {}
        self.listing_index = np.array([ordinal.setdefault(r.listing_id, len(ordinal)) for r in self.rows],
                                      dtype=np.int64)
        self.listing_ids = list(ordinal)

    def __len__(self) -> int:
        return len(self.rows)

    def photos_of(self) -> list[np.ndarray]:
        """Listing ordinal → the bank rows of its photos."""
        order = np.argsort(self.listing_index, kind="stable")
        bounds = np.searchsorted(self.listing_index[order], np.arange(len(self.listing_ids) + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(len(self.listing_ids))]

    def subset(self, indices) -> ImageBank:
        """Some of the photos (sharing the decoded images)."""
        indices = [int(i) for i in indices]
        return ImageBank([self.rows[i] for i in indices], [self.images[i] for i in indices], list(self.skipped),
                         [self.sizes[i] for i in indices])

    @classmethod
    def load(cls, catalog: Catalog, *, max_side: int = 256, workers: int = 8, progress: bool = True,
             cache_dir: str | None = None) -> ImageBank:
        """Decode every photo of `catalog`; unreadable ones are skipped with a warning count."""
        if not catalog.rows:
            raise CatalogError(f"catalog {catalog.uri or '(in memory)'} is empty: it needs at least one row "
                               f"with an image and a label")
        if cache_dir is not None and any(r.image.startswith("s3://") for r in catalog.rows):
            catalog.prefetch(cache_dir, progress=progress)

        def one(row: CatalogRow) -> tuple[Image.Image, tuple[int, int]] | str:
            try:
                img = catalog.load_image(row)
            except Exception as exc:  # noqa: BLE001 - any unreadable image is skipped and counted
                return f"{type(exc).__name__}: {exc}"
            size = img.size
            if max(img.size) > max_side:
                img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            return img, size

        from tqdm import tqdm

        rows, images, sizes, skipped = [], [], [], []
        with ThreadPoolExecutor(workers) as pool:
            for row, got in zip(catalog.rows, tqdm(pool.map(one, catalog.rows), total=len(catalog.rows),
                                                   desc="load images", unit="img", disable=not progress,
                                                   leave=False)):
                if isinstance(got, str):
                    skipped.append((row.listing_id, got))
                else:
                    rows.append(row)
                    images.append(got[0])
                    sizes.append(got[1])
        if skipped:
            log.warning("skipped %d of %d catalog images that could not be read (first: %s: %s)",
                        len(skipped), len(catalog.rows), *skipped[0])
        if not rows:
            raise CatalogError(f"none of the {len(catalog.rows)} images of {catalog.uri} could be read "
                               f"(first: {skipped[0][0]}: {skipped[0][1]}); check the image paths or the store")
        return cls(rows, images, skipped, sizes)


# ---- tasks -----------------------------------------------------------------------------------------

@dataclass
class TaskData:
    """One task's dataset: the listings (ordinals of an ImageBank) carrying its label, and each one's class."""
    name: str
    labels: list[str]  # the vocabulary, class-index order
    listings: np.ndarray  # [n] listing ordinals
    targets: np.ndarray  # [n] class index of each

    def __len__(self) -> int:
        return len(self.listings)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.targets, minlength=len(self.labels))
        return {label: int(n) for label, n in zip(self.labels, counts)}


def build_tasks(rows: list[CatalogRow], requested: list[str] | None = None,
                vocab: dict[str, list[str]] | None = None) -> tuple[dict[str, TaskData], list[str]]:
    """Per-task datasets (over listings, in order of first appearance) and the warnings about tasks that
    were skipped.

    `requested` limits training to those tasks (default: every label in the catalog). `vocab` fixes a
    task's label order (e.g. a model's heads); listings with a label outside it are left out of that task.
    """
    found: dict[str, set[str]] = {}
    first: dict[str, CatalogRow] = {}
    for row in rows:
        first.setdefault(row.listing_id, row)
        for task, value in row.labels.items():
            found.setdefault(task, set()).add(value)
    listing_rows = list(first.values())
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
        pairs = [(i, index[r.labels[name]]) for i, r in enumerate(listing_rows) if r.labels.get(name) in index]
        tasks[name] = TaskData(name, labels, np.array([p[0] for p in pairs], dtype=np.int64),
                               np.array([p[1] for p in pairs], dtype=np.int64))
    for message in warnings:
        log.warning(message)
    if not tasks:
        raise CatalogError("no task can be trained: " + ("; ".join(warnings) if warnings else
                           "the catalog rows carry no labels") + ". Add labels with at least two classes")
    return tasks, warnings


def make_sampler(tasks: dict[str, TaskData], samples_per_task: int, seed: int,
                 class_power: float = 0.5) -> BalancedTaskSampler:
    """The balanced sampler over the tasks' listings, classes balanced within each task (see sampler.py)."""
    weights = {t: class_balanced_weights(d.targets, class_power) for t, d in tasks.items()}
    return BalancedTaskSampler({t: len(d) for t, d in tasks.items()}, samples_per_task, seed, weights)


# ---- augmentation ----------------------------------------------------------------------------------

@dataclass
class Augment:
    """Catalog photo → augmented, preprocessed float32 [3, size, size].

    Geometric jitter is mild (products are centred in catalog shots); the phone-photo simulation (its
    TRAINING recipe, never the evaluation one) is the strong augmentation.
    """
    spec: PreprocessSpec
    flip: bool = True
    crop_scale: float = 0.8  # random crop keeps at least this fraction of each side
    phone_p: float = 0.3  # probability that a first view becomes a simulated phone photo
    phone_strength: float = 1.0
    # A listing's further views are simulated phone photos with this probability: the pair is then
    # exactly a shopper's query and the listing it should find.
    second_view_phone_p: float = 0.8

    def view(self, img: Image.Image, rng: np.random.Generator, phone_p: float | None = None
             ) -> tuple[np.ndarray, float]:
        """The preprocessed view and the strength of its colour cast (0 unless it is a phone photo)."""
        phone_p = self.phone_p if phone_p is None else phone_p
        cast = 0.0
        if phone_p > 0 and rng.random() < phone_p:
            img, info = simulate(img, rng, strength=self.phone_strength, out_size=self.spec.size, recipe=TRAINING)
            cast = info.cast
        else:
            if self.crop_scale < 1.0:
                w, h = img.size
                f = rng.uniform(self.crop_scale, 1.0)
                cw, ch = max(1, round(w * f)), max(1, round(h * f))
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                img = img.crop((x0, y0, x0 + cw, y0 + ch))
            if self.flip and rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return normalize(resize_and_crop(img, self.spec), self.spec), cast

    def __call__(self, img: Image.Image, rng: np.random.Generator, phone_p: float | None = None) -> np.ndarray:
        return self.view(img, rng, phone_p)[0]


def plain(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """No augmentation: exactly the serving preprocessing."""
    return normalize(resize_and_crop(img, spec), spec)


# ---- batches ---------------------------------------------------------------------------------------

@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W]: V views of every sampled listing, view-major
    task_ids: torch.Tensor  # [B] index into the task list
    targets: torch.Tensor  # [B] class index within the sample's task; -1: this view's label is not trusted
    listing: torch.Tensor  # [B] listing ordinal of the ImageBank: the same product in every view
    rows: torch.Tensor  # [B] the ImageBank row (photo) each view was made from

    def __len__(self) -> int:
        return len(self.task_ids)


class BatchLoader:
    """Batches for steps `start..stop-1` built ahead in a background thread (bounded queue).

    `views` per listing: the first is one of its photos, lightly augmented (a phone photo with the
    augment's `phone_p`); each further one is another of its photos when it has more, and a simulated
    phone photo with `second_view_phone_p`.
    """

    def __init__(self, bank: ImageBank, tasks: dict[str, TaskData], sampler: BalancedTaskSampler,
                 augment: Augment, *, views: int = 1, seed: int = 0, prefetch: int = 3):
        self.bank, self.tasks, self.sampler, self.augment = bank, tasks, sampler, augment
        self.task_list = [tasks[t] for t in sampler.tasks]
        self.colour = [is_colour_task(t) for t in sampler.tasks]
        self.views, self.seed, self.prefetch = max(1, views), seed, prefetch
        self.photos = bank.photos_of()

    def _pick_photos(self, listing: int, rng: np.random.Generator) -> list[int]:
        photos = self.photos[listing]
        order = rng.permutation(len(photos))
        return [int(photos[order[v % len(photos)]]) for v in range(self.views)]

    def make(self, step: int) -> Batch:
        plan: BatchPlan = self.sampler.plan(step)
        listings = np.array([self.task_list[t].listings[p] for t, p in zip(plan.task, plan.position)], np.int64)
        targets = np.array([self.task_list[t].targets[p] for t, p in zip(plan.task, plan.position)], np.int64)
        rng = np.random.default_rng([self.seed, 7919, step])
        picks = [self._pick_photos(int(lst), rng) for lst in listings]
        arrays, rows, view_targets = [], [], []
        for v in range(self.views):
            phone_p = None if v == 0 else self.augment.second_view_phone_p
            for k, photos in enumerate(picks):
                array, cast = self.augment.view(self.bank.images[photos[v]], rng, phone_p)
                arrays.append(array)
                rows.append(photos[v])
                strong = cast > STRONG_CAST and self.colour[int(plan.task[k])]
                view_targets.append(-1 if strong else int(targets[k]))
        return Batch(torch.from_numpy(np.stack(arrays)),
                     torch.from_numpy(np.tile(plan.task, self.views)),
                     torch.tensor(view_targets, dtype=torch.int64),
                     torch.from_numpy(np.tile(listings, self.views)),
                     torch.tensor(rows, dtype=torch.int64))

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

