"""How much finding the product helps search: simulated phone photos searched whole and cropped.

Two kinds of query, both SIMULATED with the EVALUATION recipe (scenes the locator never saw):
- `placed`: the catalog photo pasted whole into a scene (a photo of a printed picture or a screen);
- `cutout`: the product cut out of its studio background and put into a cluttered scene (a phone photo of
  an object on a table).

Each query is searched several ways against the same gallery, with the same model:
- `whole`: the whole photo, as the service did before it could find the product;
- `crop`: the crop alone: the box read off the model's served map (`ModelConfig.locator_map`) at the
  served margin (`lookalike.core.boxes.MARGIN`) when it is usable (`Localisation.usable`), else the whole
  photo;
- `fused`: the served path: the whole photo's and that crop's embeddings averaged
  (`lookalike.core.boxes.fuse_embeddings`, searched as one query);
- `<map> m=<margin>`: the box of each map at each margin: `learnt` (the locator head, trained on the
  simulator's free boxes), `saliency` (the last feature map's channel energy: no training, the
  class-activation idea), `mixed` (their geometric mean);
- at the served margin only: `saliency16` (the channel energy of the last stride-16 stage, 14x14 cells
  at 224 px, from the same pass), `saliency32x16` (the geometric mean of the last map, upsampled, and
  that finer one), and the served map's box read by another rule (`saliency+otsu`, `saliency+peak`,
  `saliency+mass`: `lookalike.core.boxes.BOX_RULES`);
- `oracle`: the true box the simulator drew (with the served margin, and with the wider one): what a
  perfect box gives.
The pretrained ImageNet model is measured on the same queries, whole and with the served crop.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lookalike.core.boxes import (BOX_RULES, MARGIN, Localisation, box_from_objectness, context_box, crop_to_box,
                                  fuse_embeddings)
from lookalike.core.preprocessing import crop_window, preprocess
from lookalike.training.data import ImageBank
from lookalike.training.locator import box_iou
from lookalike.training.evaluate import embed_images, listing_recall, listing_topk, run_batches
from lookalike.training.model import LookalikeModel, saliency
from lookalike.training.phone_photos import EVALUATION, simulate
from lookalike.training.queries import PHONE_SIZE, gallery_of

WIDER_MARGIN = 0.12  # a crop with more context around the box, measured beside the served margin


def phone_queries_with_boxes(bank: ImageBank, rows: np.ndarray, n: int, seed: int, *, cutout: bool
                             ) -> tuple[list[Image.Image], list[str], list[tuple]]:
    """`n` seeded listings among bank `rows`, one simulated phone photo each (cut out or placed whole),
    with the box the simulator put the product in."""
    rng = np.random.default_rng([EVALUATION.seed_salt, seed, int(cutout)])
    listings = sorted({int(bank.listing_index[r]) for r in rows})
    by_listing: dict[int, list[int]] = {}
    for r in rows:
        by_listing.setdefault(int(bank.listing_index[r]), []).append(int(r))
    picks = rng.choice(len(listings), size=min(n, len(listings)), replace=False)
    photos, truth, boxes = [], [], []
    for k, i in enumerate(picks):
        choices = by_listing[listings[int(i)]]
        src = choices[int(rng.integers(len(choices)))]
        photo, info = simulate(bank.images[src], np.random.default_rng([EVALUATION.seed_salt, seed, k, int(cutout)]),
                               out_size=PHONE_SIZE, recipe=EVALUATION, cutout=cutout)
        photos.append(photo)
        truth.append(bank.rows[src].listing_id)
        boxes.append(info.box or (0.0, 0.0, 1.0, 1.0))
    return photos, truth, boxes


def _normalise(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def objectness_maps(model: LookalikeModel, photos: list[Image.Image], *, device: torch.device
                    ) -> dict[str, np.ndarray]:
    """Per photo and way of finding the product, a map of how likely each feature-map cell shows it:
    `learnt` (the locator head), `saliency` (the last feature map's channel energy, min-max scaled: no
    training, the class-activation idea), `mixed` (their geometric mean), and where the backbone has a
    stride-16 stage, `saliency16` (that stage's channel energy: cells twice as fine) and `saliency32x16`
    (the geometric mean of the last map, upsampled, and the finer one), all from one pass."""
    spec = model.config.preprocessing

    def one_pass(x: torch.Tensor) -> list:
        fmap, finer = model.feature_maps(x)
        coarse = model.objectness(fmap, "saliency")
        out = [model.objectness(fmap, "learnt").cpu().numpy(), coarse.cpu().numpy()]
        if finer is not None:
            fine = saliency(finer)
            up = F.interpolate(coarse[:, None], size=fine.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            out += [fine.cpu().numpy(), (up * fine).sqrt().cpu().numpy()]
        return out

    outs = run_batches(one_pass, photos, spec, batch_size=32, device=device, progress=False)
    names = ["learnt", "saliency", "saliency16", "saliency32x16"][:len(outs[0])] if outs else []
    maps = {name: np.concatenate([o[k] for o in outs]) for k, name in enumerate(names)}
    maps["mixed"] = np.sqrt(maps["learnt"] * maps["saliency"])
    return maps


def boxes_on_photos(maps: np.ndarray, photos: list[Image.Image], spec, rule: str = "cells"
                    ) -> list[Localisation | None]:
    """Each map's box (`box_from_objectness` by `rule`) as fractions of its photo."""
    out: list[Localisation | None] = []
    for photo, prob in zip(photos, maps):
        loc = box_from_objectness(prob, rule=rule)
        out.append(None if loc is None else loc.on_photo(*photo.size, crop_window(*photo.size, spec)))
    return out


def localisation_eval(model: LookalikeModel, baseline: nn.Module, bank: ImageBank, rows: np.ndarray, *, queries: int,
                      seed: int, device: torch.device, timing_photos: int = 30) -> dict[str, Any]:
    """recall@1/@10 per query kind and mode (module docstring), and the in-process latency of the served
    path with and without the crop."""
    if model.locator is None:
        raise ValueError("the model has no locator: train with locator_views > 0")
    gallery = gallery_of(bank, rows)
    listing_of = {lid: i for i, lid in enumerate(dict.fromkeys(gallery.listing_ids))}
    g_listing = np.array([listing_of[lid] for lid in gallery.listing_ids])
    gal = embed_images(model, baseline, gallery.images, device=device, progress=False)
    result: dict[str, Any] = {"gallery_photos": len(gallery.images)}
    for kind, cutout in (("placed", False), ("cutout", True)):
        photos, truth_ids, true_boxes = phone_queries_with_boxes(bank, rows, queries, seed, cutout=cutout)
        truth = np.array([listing_of[t] for t in truth_ids])
        maps = objectness_maps(model, photos, device=device)
        spec = model.config.preprocessing
        located = {name: boxes_on_photos(maps[name], photos, spec) for name in ("learnt", "saliency", "mixed")}
        # The finer maps and the other box rules, at the served margin only (the benchmark stays short).
        tried = {name: boxes_on_photos(maps[name], photos, spec) for name in ("saliency16", "saliency32x16")
                 if name in maps}
        served_map = model.config.locator_map
        tried.update({f"{served_map}+{rule}": boxes_on_photos(maps[served_map], photos, spec, rule)
                      for rule in BOX_RULES if rule != "cells"})

        def crops(found: list, margin: float, photos: list[Image.Image] = photos) -> list[Image.Image]:
            return [crop_to_box(p, loc.crop_box(*p.size, margin)) if loc is not None and loc.usable else p
                    for p, loc in zip(photos, found)]

        served = located[model.config.locator_map]
        variants = {"crop": crops(served, MARGIN),
                    **{f"{name} m={margin:g}": crops(located[name], margin)
                       for name in located for margin in sorted({MARGIN, WIDER_MARGIN})},
                    **{f"{name} m={MARGIN:g}": crops(found_by, MARGIN) for name, found_by in tried.items()},
                    "oracle": [crop_to_box(p, context_box(b, *p.size)) for p, b in zip(photos, true_boxes)],
                    f"oracle m={WIDER_MARGIN:g}": [crop_to_box(p, context_box(b, *p.size, WIDER_MARGIN))
                                                   for p, b in zip(photos, true_boxes)]}
        whole = embed_images(model, baseline, photos, device=device, progress=False)
        embedded = {name: embed_images(model, baseline, imgs, device=device, progress=False)
                    for name, imgs in variants.items()}
        found = served
        used = np.array([loc is not None and loc.usable for loc in found])
        fused = fuse_embeddings(whole.finetuned, np.where(used[:, None], embedded["crop"].finetuned, whole.finetuned))
        finetuned = {"whole": whole.finetuned, "crop": embedded["crop"].finetuned, "fused": fused,
                     **{name: e.finetuned for name, e in embedded.items() if name != "crop"}}
        pretrained = {"whole": whole.baseline, "crop": embedded["crop"].baseline, "oracle": embedded["oracle"].baseline}
        result[kind] = {
            "queries": len(photos), "cropped": float(used.mean()),
            "cropped_by": {name: float(np.mean([loc is not None and loc.usable for loc in found_by]))
                           for name, found_by in {**located, **tried}.items()},
            "iou_by": {name: float(np.mean([box_iou(loc.box, b) if loc is not None else 0.0
                                            for loc, b in zip(found_by, true_boxes)]))
                       for name, found_by in {**located, **tried}.items()},
            "mean_iou": float(np.mean([box_iou(loc.box, b) if loc is not None else 0.0
                                       for loc, b in zip(found, true_boxes)])),
            "finetuned": {m: listing_recall(listing_topk(q, gal.finetuned, g_listing, 10), truth)
                          for m, q in finetuned.items()},
            "pretrained": {m: listing_recall(listing_topk(q, gal.baseline, g_listing, 10), truth)
                           for m, q in pretrained.items()},
        }
    result["latency"] = _served_path_latency(model, photos[:timing_photos], device)
    return result


@torch.no_grad()
def _served_path_latency(model: LookalikeModel, photos: list[Image.Image], device: torch.device) -> dict[str, float]:
    """p50 ms per photo, one at a time, of what the predictor and transformer do: preprocess and one pass
    (whole), then, where the box is usable, the crop, its preprocessing and a second pass (crop)."""
    spec = model.config.preprocessing
    model.eval()

    def run(img: Image.Image) -> dict[str, Any]:
        return model(torch.from_numpy(preprocess(img, spec))[None].to(device))

    times: dict[str, list[float]] = {"whole": [], "crop": []}
    run(photos[0])  # warm-up
    for photo in photos:
        start = time.perf_counter()
        run(photo)
        times["whole"].append(time.perf_counter() - start)
        start = time.perf_counter()
        out = run(photo)
        loc = box_from_objectness(out["objectness"][0].float().cpu().numpy())
        if loc is not None:
            loc = loc.on_photo(*photo.size, crop_window(*photo.size, spec))
            if loc.usable:
                run(crop_to_box(photo, loc.crop_box(*photo.size)))
        times["crop"].append(time.perf_counter() - start)
    p50 = {k: float(np.median(v) * 1000) for k, v in times.items()}
    return {"whole_p50_ms": p50["whole"], "crop_p50_ms": p50["crop"], "ratio": p50["crop"] / max(p50["whole"], 1e-9)}


SERVED = "fused"  # what the service searches when it crops (transformer/server.py, _search_crops)


def localise_line(catalog: str, result: dict[str, Any]) -> str:
    """`localise: <catalog> cutout_recall@10 crop=<a> whole=<b>; placed_recall@10 crop=<c> whole=<d>; p50_ratio=<r>`
    where crop is the served path (`SERVED`)."""
    def r(kind: str, mode: str) -> float:
        return result[kind]["finetuned"][mode]["recall@10"]

    return (f"localise: {catalog} cutout_recall@10 crop={r('cutout', SERVED):.3f} whole={r('cutout', 'whole'):.3f}; "
            f"placed_recall@10 crop={r('placed', SERVED):.3f} whole={r('placed', 'whole'):.3f}; "
            f"p50_ratio={result['latency']['ratio']:.2f}")


def detail_lines(result: dict[str, Any]) -> list[str]:
    """Every mode's recall, fine-tuned and pretrained, per query kind (for the benchmark's output)."""
    lines = []
    for kind in ("placed", "cutout"):
        m = result[kind]
        lines.append(f"{kind} ({m['queries']} SIMULATED queries, {m['cropped']:.0%} cropped, locator box IoU "
                     f"{m['mean_iou']:.2f}; cropped by, box IoU: " + ", ".join(
                         f"{k} {v:.0%} {m['iou_by'][k]:.2f}" for k, v in m["cropped_by"].items()) + "):")
        for who in ("finetuned", "pretrained"):
            lines.append(f"  {who:10s} " + ", ".join(f"{mode} {v['recall@1']:.3f}/{v['recall@10']:.3f}"
                                                      for mode, v in m[who].items()) + "  (recall@1/@10)")
    lat = result["latency"]
    lines.append(f"in-process p50 per photo: whole {lat['whole_p50_ms']:.1f} ms, with the crop "
                 f"{lat['crop_p50_ms']:.1f} ms (x{lat['ratio']:.2f})")
    return lines
