"""`lookalike train`: fine-tune the pretrained backbone on a catalog, evaluate, export, optionally publish.

Every training flag is generated from `lookalike.training.settings.TrainConfig` (the KFP pipelines'
training parameters are too). The model
version is minted once, here, when the run starts: it names the output folder, the exporter writes it on
the model card, and `--publish` publishes under it.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

ORDER = 30


def register(sub: argparse._SubParsersAction) -> None:
    from lookalike.training.settings import add_arguments

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
                    "--publish uploads it as a new version. Every training setting below is also a parameter "
                    "of the train pipelines, with the same name and default (lookalike/training/settings.py).",
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
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler, the augmentation and the new layers")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    add_arguments(p)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    # Sleeping OpenMP workers: spinning ones starve each other on a busy small machine. Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from lookalike.catalogs.importers import resolve_catalog_uri
    from lookalike.catalogs.rows import Catalog
    from lookalike.cli.main import CommandError
    from lookalike.core.artifacts import new_version
    from lookalike.core.model_card import CARD_FILE
    from lookalike.core.settings import home
    from lookalike.training.export import publish_model
    from lookalike.training.settings import from_arguments
    from lookalike.training.train import train

    if args.alias and not args.publish:
        raise CommandError("--alias needs --publish")
    config = from_arguments(args)
    catalog = Catalog.open(resolve_catalog_uri(args.catalog))
    eval_ref = args.eval_catalog or _shopper_catalog(args.catalog)
    eval_catalog = Catalog.open(resolve_catalog_uri(eval_ref)) if eval_ref else None
    if eval_ref and not args.eval_catalog:
        print(f"evaluating on {eval_ref} too: the held-out catalog of the same listings beside {args.catalog}")
    version = new_version()
    out = args.out or home() / "models" / version
    if (out / CARD_FILE).exists():
        raise CommandError(f"{out} already holds a model; choose another --out")
    result = train(catalog, config, eval_catalog=eval_catalog, out_dir=out, progress=not args.no_progress,
                   seed=args.seed, model_version=version, announce=print)
    from lookalike.training.evaluate import summary_lines

    for warning in result.warnings:
        print(f"warning: {warning}")
    for line in summary_lines(result.metrics.get("eval", {})):
        print(line)
    print(f"model {version} written to {result.model_dir} ({result.images_per_second:.1f} training images/s); "
          f"report: {result.model_dir / 'report.md'}")
    if args.publish:
        from lookalike.core.s3 import connect

        published = publish_model(connect(), result.model_dir, alias=args.alias)
        print(f"published model {published}" + (f"; model alias {args.alias} → {published}" if args.alias else ""))
    return 0


def _shopper_catalog(ref: str) -> str | None:
    """`<name>-shopper` beside a catalog given by name, when the store has it (the emoji importer writes the
    held-out design set so); None otherwise, or when the store cannot be asked."""
    from lookalike.catalogs.importers import resolve_catalog_uri
    from lookalike.catalogs.layout import catalog_key

    if "://" in ref or "/" in ref or ref.endswith(".jsonl"):
        return None
    try:
        from lookalike.core.s3 import connect

        store = connect()
        shopper = f"{ref}-shopper"
        return shopper if store.exists(catalog_key(shopper)) and resolve_catalog_uri(shopper) else None
    except Exception:  # noqa: BLE001 - no store, no shopper catalog: training goes on without one
        return None
