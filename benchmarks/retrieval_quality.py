"""Retrieval quality of the default CPU training run on Fashion-MNIST, beside the ImageNet baseline.

Trains with the default `TrainConfig` (the CPU budget of `lookalike train`) on the 60k training split,
then measures, for the fine-tuned model and the ImageNet-pretrained backbone in this same run:

- fine-category precision@10: 2,000 seeded held-out test images (queries) against a seeded 20,000-row
  subset of the training split (the catalog searched);
- same-listing recall@10 of 1,000 seeded SIMULATED phone photos of catalog listings against that catalog.

Images come straight from Debian's idx files (the same rows and labels `lookalike catalog import
fashion-mnist` writes, without the store round trip). The last line reads
`quality: fine_p@10 finetuned=<x> baseline=<y>; phone_recall@10 finetuned=<a> baseline=<b>`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Sleeping rather than spinning OpenMP workers: on a shared 2-core machine spinning threads starve each
# other and training runs several times slower. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from training.catalog import Catalog, CatalogRow  # noqa: E402
from training.data import ImageBank  # noqa: E402
from training.importers import (BROAD_CATEGORY, FASHION_MNIST_CLASSES, FASHION_MNIST_SPLITS,  # noqa: E402
                                SHADE_FRACTION, load_fashion_mnist, shade_of)
from training.train import TrainConfig, train  # noqa: E402


def fashion_mnist_bank(split: str, seed: int = 0) -> tuple[Catalog, ImageBank]:
    """The split as catalog rows (fine_category, category, shade on ~15%) and decoded images."""
    images, labels = load_fashion_mnist(split)
    has_shade = np.random.default_rng([seed, list(FASHION_MNIST_SPLITS).index(split)]).random(len(labels)) < SHADE_FRACTION
    shades = shade_of(images)
    rows, pils = [], []
    for i in range(len(labels)):
        fine = FASHION_MNIST_CLASSES[int(labels[i])]
        lab = {"category": BROAD_CATEGORY[fine], "fine_category": fine}
        if has_shade[i]:
            lab["shade"] = str(shades[i])
        lid = f"fmnist-{split}-{i:05d}"
        rows.append(CatalogRow(lid, f"{lid}.png", lab, "catalog", f"{fine} #{i}"))
        pils.append(Image.fromarray(images[i]).convert("RGB"))
    catalog = Catalog.from_rows(rows, uri=f"fashion-mnist idx files ({split} split)")
    return catalog, ImageBank(rows, pils)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: TrainConfig's)")
    parser.add_argument("--objective", default=None, help="ce, triplet or ce+triplet (default: TrainConfig's)")
    parser.add_argument("--out", type=Path, default=None, help="keep the model folder here (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override any TrainConfig field, e.g. --set trainable_blocks=3")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    started = time.perf_counter()
    catalog, bank = fashion_mnist_bank("train")
    eval_catalog, eval_bank = fashion_mnist_bank("test")
    config = TrainConfig()
    if args.steps:
        config.steps = args.steps
    if args.objective:
        config.objective = args.objective
    for item in args.set:
        key, value = item.split("=", 1)
        setattr(config, key, json.loads(value))
    print(f"catalog: Fashion-MNIST train split ({len(bank)} rows) for training; a seeded "
          f"{config.eval_catalog_limit}-row subset of it is the catalog searched; {config.eval_queries} seeded "
          f"test-split queries; {config.phone_queries} SIMULATED phone photos of catalog listings", flush=True)
    print(f"config: {json.dumps(config.to_dict())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "model"
        result = train(catalog, config, eval_catalog=eval_catalog, bank=bank, eval_bank=eval_bank, out_dir=out,
                       progress=sys.stderr.isatty(), seed=args.seed)
        ev = result.metrics["eval"]
        report = (out / "report.md").read_text()
    print(report)
    fine = ev["retrieval"]["fine_category"]
    phone = ev["phone"]
    ratio = phone["finetuned"]["recall@10"] / max(phone["baseline"]["recall@10"], 1e-9)
    print(f"training: {config.steps} steps, {result.images_per_second:.1f} images/s; total "
          f"{(time.perf_counter() - started) / 60:.1f} min")
    print(f"targets: fine_p@10 >= 0.90 ({'met' if fine['finetuned']['p@10'] >= 0.90 else 'NOT met'}); simulated "
          f"phone recall@10 >= 1.5x baseline (x{ratio:.2f}, {'met' if ratio >= 1.5 else 'NOT met'})")
    print(f"quality: fine_p@10 finetuned={fine['finetuned']['p@10']:.3f} baseline={fine['baseline']['p@10']:.3f}; "
          f"phone_recall@10 finetuned={phone['finetuned']['recall@10']:.3f} "
          f"baseline={phone['baseline']['recall@10']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
