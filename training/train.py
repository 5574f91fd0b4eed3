"""The training loop: balanced multitask fine-tuning of a pretrained backbone, then evaluation and export.

    catalog ─▶ ImageBank (decoded once) ─▶ per-task datasets ─▶ BalancedTaskSampler ─▶ BatchLoader (thread)
            ─▶ model (frozen trunk, trained tail, embedding, heads) ─▶ masked CE (+ batch-hard triplet)
            ─▶ AdamW, warm-up then cosine decay ─▶ evaluate beside the pretrained baseline ─▶ export

CPU defaults (2 cores) aim at a useful Fashion-MNIST model in about ten minutes: 28-px product shots
gain nothing from 224-px inputs, so the input is 80 px squashed (no crop margin), about 8× cheaper
than 224 px. Measured on Fashion-MNIST at about equal compute: 80 px × 1400 steps gave fine-category
precision@10 0.872, 96 px × 1000 steps 0.857. The last three stages are fine-tuned, and each step
sees 8 listings per task twice (a catalog-like view and, mostly, a simulated phone photo) for CE on
both and a batch-hard triplet loss. On CUDA the loop runs with autocast (fp16 + loss scaling) and
channels-last.
Deterministic for a seed on CPU: the sampler and each batch's augmentation are functions of
(seed, step), and the model's new layers are initialised from the seed.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.catalog import Catalog
from training.data import Augment, BatchLoader, ImageBank, build_tasks
from training.losses import LossConfig, multitask_loss
from training.model import DEFAULT_ARCHITECTURE, LookalikeModel, ModelConfig, create_model
from training.sampler import BalancedTaskSampler
from transformer.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    # model
    architecture: str = DEFAULT_ARCHITECTURE
    pretrained: str | None = "package"  # "package", a weights file (path or s3://), or None
    embedding_dim: int = 128
    trainable_blocks: int = 3
    image_size: int = 80  # square input; resize == size, so no crop margin is lost
    crop: str = "none"  # "none": squash to a square; "center": resize the short side, then crop
    tasks: list[str] | None = None  # default: every label of the catalog
    # optimisation
    steps: int = 1400
    samples_per_task: int = 8  # a batch is this many samples of every task (×2 views with triplet)
    lr: float = 2e-3  # projection and heads
    backbone_lr_scale: float = 0.25  # the fine-tuned backbone stages learn this much slower
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    # objective
    objective: str = "ce+triplet"  # "ce", "triplet" or "ce+triplet"
    label_smoothing: float = 0.1
    task_weights: dict[str, float] = field(default_factory=dict)
    triplet_margin: float = 0.2
    triplet_weight: float = 1.0
    # augmentation
    phone_p: float = 0.3  # probability that a training image becomes a simulated phone photo (one view)
    second_view_phone_p: float = 0.8  # with triplet: probability that a listing's second view is one
    phone_strength: float = 1.0
    flip: bool = True
    crop_scale: float = 0.85
    # evaluation after training (when an evaluation catalog is given)
    eval_catalog_limit: int = 20000  # seeded subset of the training catalog searched by the queries
    eval_queries: int = 2000  # seeded subset of the evaluation catalog used as label queries
    phone_queries: int = 1000  # simulated phone photos of catalog listings (recall@k)
    eval_batch: int = 64
    # runtime
    device: str = "auto"  # auto, cpu or cuda
    threads: int | None = None  # torch intra-op threads on CPU (default: all cores)
    amp: bool = True  # autocast on CUDA
    log_every: int = 10

    def __post_init__(self):
        LossConfig(self.objective, self.label_smoothing)  # validates the objective early
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")

    def preprocessing(self) -> PreprocessSpec:
        resize = self.image_size if self.crop == "none" else round(self.image_size * 8 / 7)
        return PreprocessSpec(size=self.image_size, resize=resize, crop=self.crop, interpolation="bicubic")

    def loss(self) -> LossConfig:
        return LossConfig(self.objective, self.label_smoothing, dict(self.task_weights), self.triplet_margin,
                          self.triplet_weight)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    model: LookalikeModel
    model_config: ModelConfig
    history: list[dict[str, float]]
    metrics: dict[str, Any]
    model_dir: Path | None
    warnings: list[str]
    images_per_second: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: LookalikeModel, config: TrainConfig) -> torch.optim.Optimizer:
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    new = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    groups = [{"params": new, "lr": config.lr, "base_lr": config.lr}]
    if backbone:
        lr = config.lr * config.backbone_lr_scale
        groups.append({"params": backbone, "lr": lr, "base_lr": lr})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def train(catalog: Catalog, config: TrainConfig | None = None, *, eval_catalog: Catalog | None = None,
          out_dir: str | Path | None = None, progress: bool = True, seed: int = 0,
          bank: ImageBank | None = None, eval_bank: ImageBank | None = None,
          lineage: dict[str, Any] | None = None) -> TrainResult:
    """Train on `catalog`; evaluate on `eval_catalog` (beside the pretrained baseline); export to `out_dir`.

    `bank`/`eval_bank` reuse images already decoded (benchmarks, repeated runs on one catalog).
    """
    from tqdm import tqdm

    from training.evaluate import pretrained_backbone_copy

    config = config or TrainConfig()
    device = resolve_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(config.threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    spec = config.preprocessing()
    loss_config = config.loss()

    bank = bank or ImageBank.load(catalog, max_side=max(2 * spec.size, 64), progress=progress,
                                  cache_dir=_cache_dir())
    tasks, warnings = build_tasks(bank.rows, config.tasks)
    if bank.skipped:
        warnings.append(f"{len(bank.skipped)} of {len(bank.skipped) + len(bank)} images could not be read and "
                        f"were skipped (first: {bank.skipped[0][0]}: {bank.skipped[0][1]})")
    task_names = list(tasks)
    model_config = ModelConfig(architecture=config.architecture, embedding_dim=config.embedding_dim,
                               heads={t: tasks[t].labels for t in task_names},
                               trainable_blocks=config.trainable_blocks, pretrained=config.pretrained,
                               preprocessing=spec)
    model = create_model(model_config)
    baseline = pretrained_backbone_copy(model)
    model.to(device)
    use_amp = config.amp and device.type == "cuda"
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    sampler = BalancedTaskSampler({t: len(tasks[t]) for t in task_names}, config.samples_per_task, seed)
    augment = Augment(spec, flip=config.flip, crop_scale=config.crop_scale, phone_p=config.phone_p,
                      phone_strength=config.phone_strength, second_view_phone_p=config.second_view_phone_p)
    loader = BatchLoader(bank, tasks, sampler, augment, two_views=loss_config.uses_triplet, seed=seed)
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    log.info("training %s on %d images, tasks %s, %d steps of %d samples (%s)", config.architecture, len(bank),
             {t: len(tasks[t]) for t in task_names}, config.steps,
             sampler.batch_size * (2 if loss_config.uses_triplet else 1), loss_config.objective)
    history: list[dict[str, float]] = []
    model.train()
    seen, started = 0, time.perf_counter()
    window: dict[str, list[float]] = {}
    bar = tqdm(total=config.steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(loader.iterate(0, config.steps)):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, config.steps, config.warmup_steps)
        images = batch.images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            out = model(images)
        loss, logged = multitask_loss(out, batch.task_ids.to(device), batch.targets.to(device),
                                      batch.listing.to(device), task_names, loss_config)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        seen += len(batch)
        elapsed = time.perf_counter() - started
        record = {"step": step + 1, "loss": float(loss.detach()), **logged, "images_per_s": seen / elapsed,
                  "time_s": elapsed}
        history.append(record)
        for key, value in logged.items():
            window.setdefault(key, []).append(value)
        bar.update(1)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            bar.set_postfix({**{k: f"{np.mean(v):.3f}" for k, v in window.items()}, "img/s": f"{seen / elapsed:.0f}"})
            if not progress and (step + 1) % (10 * config.log_every) == 0:  # a log line instead of the bar
                log.info("step %d/%d: %s, %.1f img/s", step + 1, config.steps,
                         ", ".join(f"{k} {np.mean(v):.3f}" for k, v in window.items()), seen / elapsed)
            window = {}
        if not math.isfinite(record["loss"]):
            bar.close()
            raise FloatingPointError(f"the loss became {record['loss']} at step {step + 1}; lower --lr")
    bar.close()
    images_per_second = seen / (time.perf_counter() - started)
    log.info("trained %d steps, %.1f images/s", config.steps, images_per_second)
    model.eval()

    metrics: dict[str, Any] = {"train": {"steps": config.steps, "images_seen": seen,
                                         "images_per_second": round(images_per_second, 2),
                                         "final_loss": {k: float(np.mean([h[k] for h in history[-50:] if k in h]))
                                                        for k in [*task_names, "triplet"] if any(k in h for h in history)}},
                               "tasks": {t: {"rows": len(tasks[t]), "classes": len(tasks[t].labels)} for t in task_names},
                               "warnings": warnings}
    if eval_catalog is not None or eval_bank is not None:
        metrics["eval"] = evaluate_after_training(model, baseline, bank, eval_catalog, eval_bank, config, device,
                                                  progress, seed)
    model_dir = None
    if out_dir is not None:
        model_dir = _export(model, model_config, Path(out_dir), metrics, history, config, catalog, eval_catalog,
                            lineage, seed)
    return TrainResult(model, model_config, history, metrics, model_dir, warnings, images_per_second)


def evaluate_after_training(model: LookalikeModel, baseline: torch.nn.Module, bank: ImageBank,
                            eval_catalog: Catalog | None, eval_bank: ImageBank | None, config: TrainConfig,
                            device: torch.device, progress: bool, seed: int) -> dict[str, Any]:
    """Label retrieval of held-out queries against (a seeded subset of) the training catalog, head
    accuracy on those queries, and simulated phone photos of catalog listings → catalog."""
    from training.evaluate import evaluate
    from training.phone_photos import simulate_phone_photo

    spec = model.config.preprocessing
    eval_bank = eval_bank or ImageBank.load(eval_catalog, max_side=max(2 * spec.size, 64), progress=progress,
                                            cache_dir=_cache_dir())
    rng = np.random.default_rng([seed, 4242])
    cat_idx = np.sort(rng.choice(len(bank), size=min(config.eval_catalog_limit, len(bank)), replace=False))
    q_idx = np.sort(rng.choice(len(eval_bank), size=min(config.eval_queries, len(eval_bank)), replace=False))
    ph_idx = rng.choice(cat_idx, size=min(config.phone_queries, len(cat_idx)), replace=False)
    phone = [(bank.rows[i].listing_id,
              simulate_phone_photo(bank.images[i], np.random.default_rng([seed, 777, int(i)]), out_size=2 * spec.size))
             for i in ph_idx]
    return evaluate(model, baseline,
                    catalog_images=[bank.images[i] for i in cat_idx],
                    catalog_ids=[bank.rows[i].listing_id for i in cat_idx],
                    catalog_labels=[bank.rows[i].labels for i in cat_idx],
                    query_images=[eval_bank.images[i] for i in q_idx],
                    query_ids=[eval_bank.rows[i].listing_id for i in q_idx],
                    query_labels=[eval_bank.rows[i].labels for i in q_idx],
                    phone_queries=phone, device=device, batch_size=config.eval_batch, progress=progress,
                    log=log.info) | {"catalog_rows": int(len(cat_idx)), "catalog_of": len(bank),
                                     "query_rows": int(len(q_idx)), "query_of": len(eval_bank)}


def _export(model, model_config, out_dir, metrics, history, config, catalog, eval_catalog, lineage, seed) -> Path:
    from training.export import export_model
    from training.report import write_report

    lineage = {"catalog": getattr(catalog, "uri", ""), "eval_catalog": getattr(eval_catalog, "uri", None),
               "train_config": config.to_dict(), "seed": seed, **(lineage or {})}
    model_dir = export_model(model.cpu().float(), model_config, out_dir, metrics=metrics, lineage=lineage)
    write_report(model_dir, history, metrics)
    return model_dir


def _cache_dir() -> str:
    home = os.environ.get("LOOKALIKE_CACHE", str(Path.home() / ".cache" / "lookalike"))
    return str(Path(home) / "images")
