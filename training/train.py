"""The training loop: balanced multitask fine-tuning of a pretrained backbone with listing identity, early
stopping on held-out retrieval, then evaluation beside the pretrained model and export.

    catalog ─▶ ImageBank (decoded once) ─▶ hold out views (selection, test) ─▶ settings from the catalog
            ─▶ per-task listing datasets ─▶ BalancedTaskSampler (classes balanced within each task)
            ─▶ BatchLoader (P listings x K views: its photos, simulated phone photos; a thread)
            ─▶ model (frozen trunk, trained tail, embedding, heads) ─▶ masked CE + listing proxies
               (or batch-hard triplets) + L2-SP towards the pretrained weights
            ─▶ AdamW, warm-up then cosine decay; every `eval_every` steps the held-out score, best kept
            ─▶ evaluate beside the pretrained model at 224 px on held-out views, an eval catalog and
               simulated phone photos of the evaluation recipe ─▶ export (settings and reasons on the card)

Defaults left at 0/"auto" are chosen from the catalog (`lookalike.training.defaults`): 224 px with the model's own
centre crop for photo catalogs, Fashion-MNIST's measured 80 px for thumbnails, and a length in epochs
that fits a CPU budget. On CUDA the loop runs with autocast (fp16 + loss scaling) and channels-last.
Deterministic for a seed on CPU: the sampler and each batch's augmentation are functions of (seed, step),
and the model's new layers are initialised from the seed.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import torch

from lookalike.core.artifacts import new_version
from lookalike.core.errors import InputError
from lookalike.core.settings import cache_dir
from lookalike.catalogs.rows import Catalog
from lookalike.training.data import Augment, BatchLoader, ImageBank, build_tasks, kept_side, make_sampler
from lookalike.training.defaults import Choice, resolve
from lookalike.training.losses import ListingProxies, l2_sp, multitask_loss, similarity_distillation
from lookalike.training.model import LookalikeModel, ModelConfig, backbone_tail, create_model
from lookalike.training.queries import hold_out
from lookalike.training.settings import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: LookalikeModel
    model_config: ModelConfig
    history: list[dict[str, float]]
    metrics: dict[str, Any]
    model_dir: Path | None
    warnings: list[str]
    images_per_second: float
    config: TrainConfig | None = None  # as resolved from the catalog
    choices: list[Choice] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: LookalikeModel, config: TrainConfig) -> torch.optim.Optimizer:
    """Heads at `lr`; the fine-tuned backbone stages, and the projection when it starts from the pretrained
    features (`pca_init`), `backbone_lr_scale` times slower: what starts from pretraining moves gently."""
    slow = [p for p in model.backbone.parameters() if p.requires_grad]
    # The locator learns afterwards, from the finished embedding's feature map (lookalike.training.locator).
    fast = [p for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith(("backbone.", "locator."))]
    if config.pca_init > 0:
        slow += list(model.projection.parameters())
        fast = [p for p in fast if all(p is not q for q in model.projection.parameters())]
    lr = config.learning_rate
    groups = [{"params": fast, "lr": lr, "base_lr": lr, "weight_decay": config.weight_decay}]
    if slow:
        lr = config.learning_rate * config.backbone_lr_scale
        decay = 0.0 if config.l2sp_weight > 0 else config.weight_decay  # decay towards 0 would fight L2-SP
        groups.append({"params": slow, "lr": lr, "base_lr": lr, "weight_decay": decay})
    return torch.optim.AdamW(groups)


def bank_side(config: TrainConfig) -> int:
    """How large photos are kept in memory (`lookalike.training.data.kept_side`)."""
    return kept_side(config.preprocessing() if config.image_size and config.crop != "auto" else None)


def train(catalog: Catalog, config: TrainConfig | None = None, *, eval_catalog: Catalog | None = None,
          out_dir: str | Path | None = None, progress: bool = True, seed: int = 0,
          bank: ImageBank | None = None, eval_bank: ImageBank | None = None,
          lineage: dict[str, Any] | None = None, model_version: str | None = None,
          announce: Callable[[str], None] | None = None) -> TrainResult:
    """Train on `catalog`; evaluate beside the pretrained model (held-out views of `catalog`, `eval_catalog`,
    simulated phone photos); export to `out_dir`.

    `model_version` names the exported model; whoever starts the run mints it once
    (lookalike.core.artifacts.new_version) so folder, card and published version agree. Minted here when not given.
    `bank`/`eval_bank` reuse images already decoded (benchmarks, repeated runs on one catalog).
    `announce` is told each setting chosen from the catalog, and why, before training starts.
    """
    from lookalike.training.evaluate import pretrained_backbone_copy
    from lookalike.training.selection import Selector

    config = config or TrainConfig()
    device = resolve_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(config.threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    loss_config = config.loss()
    views = config.views if loss_config.needs_views else 1

    bank = bank or ImageBank.load(catalog, max_side=bank_side(config), progress=progress, cache_dir=_cache_dir())
    split = hold_out(bank, select_listings=config.select_listings, test_listings=config.test_listings, seed=seed)
    train_bank = bank.subset(split.train)
    tasks, warnings = build_tasks(train_bank.rows, config.tasks)
    if bank.skipped:
        warnings.append(f"{len(bank.skipped)} of {len(bank.skipped) + len(bank)} images could not be read and "
                        f"were skipped (first: {bank.skipped[0][0]}: {bank.skipped[0][1]})")
    config, choices = resolve(config, sizes=bank.sizes, train_photos=len(train_bank), n_tasks=len(tasks),
                              device=device.type, views=views)
    for choice in choices:
        (announce or log.info)(f"chose {choice.line()}")
    spec = config.preprocessing()
    task_names = list(tasks)
    model_config = ModelConfig(architecture=config.architecture, embedding_dim=config.embedding_dim,
                               heads={t: tasks[t].labels for t in task_names},
                               trainable_blocks=config.trainable_blocks, pretrained=config.pretrained,
                               preprocessing=spec, locator=config.locator_views > 0,
                               locator_map=config.locator_map)
    model = create_model(model_config)
    baseline = pretrained_backbone_copy(model)
    model.to(device)
    baseline.to(device)
    use_amp = config.amp and device.type == "cuda"
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    if config.pca_init > 0:
        _init_projection(model, train_bank, config, device, seed)
    sampler = make_sampler(tasks, config.samples_per_task, seed, config.class_power)
    augment = Augment(spec, flip=config.flip, crop_scale=config.crop_scale, phone_p=config.phone_p,
                      phone_strength=config.phone_strength, second_view_phone_p=config.second_view_phone_p)
    loader = BatchLoader(train_bank, tasks, sampler, augment, views=views, seed=seed)
    optimizer = build_optimizer(model, config)
    proxies = proxy_optimizer = None
    if loss_config.uses_proxy:
        proxies = ListingProxies(len(train_bank.listing_ids), config.embedding_dim, negatives=config.proxy_negatives,
                                 seed=seed).to(device)
        proxy_optimizer = proxies.optimizer(config.proxy_lr)
    reference = {f"backbone.{n}": p.detach().clone().float() for n, p in baseline.named_parameters()
                 if model.get_parameter(f"backbone.{n}").requires_grad} if config.l2sp_weight > 0 else {}
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    selector = None
    if len(split.select):  # its gallery: training photos and the selection photos, never the test ones
        keep = np.sort(np.concatenate([split.train, split.select]))
        where = {int(r): i for i, r in enumerate(keep)}
        selector = Selector(model, bank.subset(keep), np.array([where[int(r)] for r in split.select]), seed=seed,
                            patience=config.patience, device=device)

    log.info("training %s at %d px on %d photos of %d listings, tasks %s, %d steps of %d views (%s)",
             config.architecture, spec.size, len(train_bank), len(train_bank.listing_ids),
             {t: len(tasks[t]) for t in task_names}, config.steps, sampler.batch_size * views, loss_config.objective)
    history: list[dict[str, float]] = []
    if selector is not None:
        selector.check(model, 0)  # where fine-tuning starts: kept unless a step does better
    model.train()
    seen, started, stopped_at = 0, time.perf_counter(), None
    window: dict[str, list[float]] = {}
    from tqdm import tqdm

    bar = tqdm(total=config.steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(loader.iterate(0, config.steps)):
        factor = lr_factor(step, config.steps, config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        images = batch.images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        listing = batch.listing.to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            with torch.no_grad():
                trunk = model.trunk(images)
            out = model.forward_from_trunk(trunk)
            loss, logged = multitask_loss(out, batch.task_ids.to(device), batch.targets.to(device), listing,
                                          task_names, loss_config, proxies)
            if config.distill_weight > 0 and model.cut is not None:
                with torch.no_grad():
                    pretrained = backbone_tail(baseline, trunk, model.cut)
                distill = similarity_distillation(out["embedding"], pretrained)
                loss = loss + config.distill_weight * distill
                logged["distill"] = float(distill.detach())
        if reference:
            penalty = l2_sp(model, reference)
            loss = loss + config.l2sp_weight * penalty
            logged["l2sp"] = float(penalty.detach())
        optimizer.zero_grad(set_to_none=True)
        if proxy_optimizer is not None:
            proxy_optimizer.zero_grad(set_to_none=True)
            for group in proxy_optimizer.param_groups:
                group["lr"] = config.proxy_lr * factor
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        if proxy_optimizer is not None:
            scaler.step(proxy_optimizer)
            proxies.renormalise(listing)
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
        if selector is not None and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
            if selector.check(model, step + 1) and step + 1 < config.steps:
                stopped_at = step + 1
                log.info("early stop at step %d: no better held-out score in %d evaluations", step + 1,
                         config.patience)
                break
    bar.close()
    train_seconds = time.perf_counter() - started
    images_per_second = seen / max(train_seconds, 1e-9)
    if selector is not None:
        selector.restore(model)
    log.info("trained %d steps, %.1f images/s", len(history), images_per_second)
    model.eval()

    metrics: dict[str, Any] = {
        "train": {"steps": len(history), "planned_steps": config.steps, "images_seen": seen,
                  "seconds": round(train_seconds, 1), "images_per_second": round(images_per_second, 2),
                  "final_loss": {k: float(np.mean([h[k] for h in history[-50:] if k in h]))
                                 for k in [*task_names, "triplet", "proxy"] if any(k in h for h in history)},
                  "objective": config.objective, "chosen": {c.setting: c.to_dict() for c in choices},
                  "early_stopping": {**selector.summary(), "stopped_at": stopped_at} if selector else None},
        "tasks": {t: {"listings": len(tasks[t]), "classes": len(tasks[t].labels),
                      "class_counts": tasks[t].class_counts()} for t in task_names},
        "holdout": {"select": len(split.select), "test": len(split.test), "trained_photos": len(train_bank)},
        "warnings": warnings}
    if model.locator is not None:
        from lookalike.training.locator import train_locator

        # A small catalog needs fewer views (and tests stay quick): a few per training photo.
        views = min(config.locator_views, max(64, 4 * len(train_bank)))
        metrics["locator"] = train_locator(model, train_bank, spec, views=views, seed=seed, device=device)
    if len(split.test) or eval_catalog is not None or eval_bank is not None:
        metrics["eval"] = evaluate_after_training(model, baseline, bank, split.test, eval_catalog, eval_bank, config,
                                                  device, progress, seed)
    model_dir = None
    if out_dir is not None:
        lineage = {"catalog": getattr(catalog, "uri", ""), "eval_catalog": getattr(eval_catalog, "uri", None),
                   "train_config": config.to_dict(), "chosen": {c.setting: c.to_dict() for c in choices},
                   "seed": seed, **(lineage or {})}
        model_dir = _export(model, model_config, Path(out_dir), metrics, history, lineage,
                            model_version or new_version())
    return TrainResult(model, model_config, history, metrics, model_dir, warnings, images_per_second, config, choices)


def _init_projection(model: LookalikeModel, bank: ImageBank, config: TrainConfig, device: torch.device,
                     seed: int) -> None:
    """The projection starts as the PCA whitening of the pretrained features of a seeded sample of the
    training photos (`LookalikeModel.init_projection`)."""
    from lookalike.training.evaluate import run_batches

    rng = np.random.default_rng([seed, 0x9CA])
    picks = np.sort(rng.choice(len(bank), size=min(config.pca_init, len(bank)), replace=False))
    model.eval()
    feats = run_batches(lambda x: [model.features(x).float().cpu()], [bank.images[i] for i in picks],
                        config.preprocessing(), batch_size=config.eval_batch, device=device, progress=False)
    if model.init_projection(torch.cat([f[0] for f in feats])):
        log.info("projection initialised as the PCA whitening of %d photos' pretrained features", len(picks))


def evaluate_after_training(model: LookalikeModel, baseline: torch.nn.Module, bank: ImageBank, test_rows: np.ndarray,
                            eval_catalog: Catalog | None, eval_bank: ImageBank | None, config: TrainConfig,
                            device: torch.device, progress: bool, seed: int) -> dict[str, Any]:
    """Held-out views of the training catalog, photos of `eval_catalog` and simulated phone photos of the
    evaluation recipe search a seeded gallery of the training catalog; the pretrained model likewise."""
    from lookalike.training.evaluate import evaluate
    from lookalike.training.queries import catalog_queries, gallery_of, gallery_rows, phone_queries, view_queries

    if eval_bank is None and eval_catalog is not None:
        eval_bank = ImageBank.load(eval_catalog, max_side=bank_side(config), progress=progress, cache_dir=_cache_dir())
    query_sets = [view_queries(bank, test_rows)] if len(test_rows) else []
    if eval_bank is not None:
        query_sets.append(catalog_queries(eval_bank, config.eval_queries, seed))
    wanted = {lid for qs in query_sets for lid in qs.listing_ids}
    rows = gallery_rows(bank, listings=wanted, limit=config.eval_catalog_limit, seed=seed)
    query_sets.append(phone_queries(bank, rows, config.phone_queries, seed))
    result = evaluate(model, baseline, gallery_of(bank, rows), query_sets, device=device,
                      batch_size=config.eval_batch, progress=progress, log=log.info)
    return result | {"catalog_rows": int(len(rows)), "catalog_of": len(bank)}


def _export(model, model_config, out_dir, metrics, history, lineage, model_version: str) -> Path:
    from lookalike.training.export import export_model
    from lookalike.training.report import write_report

    model_dir = export_model(model.cpu().float(), model_config, out_dir, model_version=model_version, metrics=metrics,
                             lineage=lineage)
    write_report(model_dir, history, metrics)
    return model_dir


def _cache_dir() -> str:
    return str(cache_dir() / "images")
