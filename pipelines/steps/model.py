"""The model steps: train (fine-tune and export a model folder), fetch a published version, publish one.

A model version is named once, when its training starts: the train step mints it
(`lookalike.core.artifacts.new_version`) and the export writes it on the model card, so the index built from
the folder records the model version it belongs to before either is published, and publishing uses
the card's name. Nobody renames it later and no step edits an input artifact.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lookalike.pipelines.steps.prepare import open_catalog
from lookalike.pipelines.steps.runner import StepError, check_device, progress, read_metrics, write_metrics


def read_card(model):
    """The model card of a model artifact (its folder, checked against its manifest when it has one)."""
    from lookalike.core.model_card import ModelCard

    return ModelCard.read(model.path)


def train_model(train_set, settings: dict, seed: int, model, metrics):
    """Fine-tune on the training rows and export the model folder under a version minted here, once.

    `settings` holds the training settings by name (`lookalike.training.settings.TrainConfig`, the
    pipeline's training parameters). Those at their catalog sentinel (image_size 0, steps 0, ...) are
    chosen from the catalog (printed with the reason). The training holds out only the few photos its
    early stopping needs: the evaluate step judges the model on the held-out listings.
    """
    from lookalike.core.artifacts import new_version
    from lookalike.core.errors import InputError
    from lookalike.training.settings import TrainConfig
    from lookalike.training.train import train

    try:
        config = TrainConfig.from_settings({**settings, "test_listings": 0})
    except InputError as exc:
        raise StepError(f"bad training settings: {exc}") from None
    check_device(config.device)
    catalog = open_catalog(train_set.path)
    if not catalog.rows:
        raise StepError("the training set is empty: the catalog has too few rows for holdout_fraction")
    version = new_version()
    result = train(catalog, config, out_dir=Path(model.path), progress=progress(), seed=seed,
                   lineage={"catalog": train_set.metadata.get("source", catalog.uri)}, model_version=version,
                   announce=lambda line: print(line, flush=True))
    card = read_card(model)
    model.metadata.update({"model_version": card.model_version, "architecture": card.architecture,
                           "image_size": card.preprocessing.size, "heads": card.tasks})
    train_stats = result.metrics.get("train", {})
    stopping = train_stats.get("early_stopping") or {}
    write_metrics(metrics, {"steps": train_stats.get("steps", config.steps),
                            "image_size": float(card.preprocessing.size),
                            **({"best_step": stopping["best_step"]} if stopping else {}),
                            "images_per_second": train_stats.get("images_per_second", result.images_per_second),
                            **{f"final_loss_{k}": v for k, v in train_stats.get("final_loss", {}).items()}})
    for warning in result.warnings:
        print(f"warning: {warning}", flush=True)
    print(f"trained model {card.model_version}: heads {card.tasks}, {result.images_per_second:.0f} images/s",
          flush=True)
    return card


def fetch_model(model_ref: str, model) -> str:
    """Download a published model (version, alias or latest) into the artifact folder, verified."""
    from lookalike.core.artifacts import VersionNotFound, model_repo
    from lookalike.core.s3 import connect

    repo = model_repo(connect())
    try:
        version = repo.resolve(model_ref or "production")
    except VersionNotFound as exc:
        raise StepError(f"{exc}. Run the train pipeline first (or pass model_ref=<version>)") from None
    target = Path(model.path)
    if target.exists():
        shutil.rmtree(target)
    repo.fetch(version, target)
    model.metadata.update({"model_version": version})
    print(f"fetched model {version} ({model_ref})", flush=True)
    return version


def publish_model(model, alias: str, evaluation=None, report=None) -> str:
    """Publish the model folder under the version on its card, with its held-out evaluation in the
    card's metrics and the HTML report beside it; point `alias` at it.

    The folder is staged as a copy whose card is written anew (`card.replace(metrics=…).write`): an
    input artifact is never edited. Publishing a version that is already complete (a cached re-run)
    only moves the alias.
    """
    from lookalike.core.artifacts import MANIFEST, model_repo
    from lookalike.core.s3 import connect
    from lookalike.training.export import publish_model as publish

    store = connect()
    card = read_card(model)
    version = card.model_version
    moved = f"; model alias {alias} → {version}" if alias else ""
    repo = model_repo(store)
    if version in repo.versions():
        if alias:
            repo.set_alias(alias, version)
        print(f"model {version} was already published{moved}", flush=True)
        return version
    with tempfile.TemporaryDirectory(prefix="publish-model-") as tmp:
        staged = Path(tmp) / "model"
        shutil.copytree(card.folder, staged, ignore=shutil.ignore_patterns(MANIFEST))
        if evaluation is not None:
            card.replace(metrics={**card.metrics, "evaluation": read_metrics(evaluation)}).write(staged)
        if report is not None and Path(report.path).is_file():
            shutil.copyfile(report.path, staged / "report.html")
        published = publish(store, staged, alias=alias or None)
    print(f"published model {published} to {store.uri('models/' + published)}{moved}", flush=True)
    return published

