"""Tiny local catalogs of real Fashion-MNIST images for training tests: PNGs + catalog.jsonl in a folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.catalogs.importers import BROAD_CATEGORY, FASHION_MNIST_CLASSES, load_fashion_mnist


def write_tiny_catalog(directory: Path, n: int = 200, *, split: str = "train", seed: int = 0,
                       shade_fraction: float = 0.3, extra_labels=None) -> Path:
    """`n` seeded images with fine_category, category and (on some rows) shade; returns catalog.jsonl.

    `extra_labels(i) -> dict` adds labels per row (bad-input tests: a one-class task, …).
    """
    images, labels = load_fashion_mnist(split)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(labels), size=n, replace=False)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    lines = []
    for k, i in enumerate(picks):
        fine = FASHION_MNIST_CLASSES[int(labels[i])]
        lid = f"tiny-{split}-{int(i):05d}"
        Image.fromarray(images[i]).save(directory / "images" / f"{lid}.png")
        lab = {"fine_category": fine, "category": BROAD_CATEGORY[fine]}
        if rng.random() < shade_fraction:
            lab["shade"] = "dark" if images[i].mean() > 70 else "light"
        if extra_labels:
            lab.update(extra_labels(k))
        lines.append(json.dumps({"listing_id": lid, "image": f"images/{lid}.png", "labels": lab,
                                 "source": "user_photo" if k % 10 == 0 else "catalog"}))
    path = directory / "catalog.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
