"""Evaluation, always beside the ImageNet-pretrained model at its own best settings, on the same queries.

The gallery is catalog photos; a search returns LISTINGS ranked by their best photo, never one twice
(as the index does). Query sets (`QuerySet`, built by `lookalike.training.queries`) are photos the training never
generated: held-out real views of a listing (another photo of it: the query photo itself is left out of
the gallery, the listing's other photos stay), user photos, a held-out catalog such as emoji-shopper, and
simulated phone photos of the EVALUATION recipe. Figures:

- same-listing recall@1/@5/@10 per query set: the query's own listing among the top k listings;
- label retrieval per task, over the real-photo queries that carry the label: precision@1, precision@10
  and mAP@10 of the top listings (the query's own listing left out, so its other photos cannot help),
  searched among the gallery photos that carry the task's label, overall and PER CLASS;
- per-head accuracy on those queries.

The baseline is the pretrained backbone's pooled features, L2-normalised, through its own ImageNet
evaluation preprocessing (`BASELINE_SPEC`: the shorter side to 256, the centre 224 x 224, EfficientNet-
Lite0's own input size), not at the fine-tuned model's size: a model trained at 80 px is compared with
what the pretrained one does at its best. When both read the same input and the model's
early stages are frozen, the two share one pass through the frozen trunk (`PairedEmbedder`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lookalike.training.model import LookalikeModel, backbone_tail, backbone_trunk
from lookalike.core.preprocessing import PreprocessSpec, preprocess

FINETUNED, BASELINE = "finetuned", "baseline"
BASELINE_SPEC = PreprocessSpec(size=224, resize=256, crop="center", interpolation="bicubic")
RECALL_KS = (1, 5, 10)


@dataclass
class Gallery:
    """The photos searched: each with its listing, labels and key (`listing_id/photo_id`)."""
    images: list[Image.Image]
    listing_ids: list[str]
    labels: list[dict[str, str]]
    keys: list[str]


@dataclass
class QuerySet:
    """Photos that look for their listing (when it is in the gallery) and for their labels."""
    name: str
    images: list[Image.Image]
    listing_ids: list[str]
    labels: list[dict[str, str]]
    exclude: list[str | None] = field(default_factory=list)  # the gallery photo each query must not find
    simulated: bool = False
    note: str = ""
    labelled: bool = True  # whether its queries count for label retrieval (real photos only)


# ---- embedding -------------------------------------------------------------------------------------

class PairedEmbedder:
    """images → (fine-tuned embedding, baseline embedding, head logits), one trunk pass for both."""

    def __init__(self, model: LookalikeModel, baseline_backbone: nn.Module):
        self.model = model.eval()
        self.baseline = baseline_backbone.eval()
        self.cut = model.cut

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if self.cut is None:
            feats, base = self.model.features(x), self.baseline(x)
        else:
            trunk = backbone_trunk(self.model.backbone, x, self.cut)
            feats, base = self.model.tail(trunk), backbone_tail(self.baseline, trunk, self.cut)
        emb = self.model.embed_features(feats)
        return emb, F.normalize(base.float(), dim=-1), self.model.logits_from_embedding(emb)


@dataclass
class Embeddings:
    finetuned: np.ndarray  # [N, D]
    baseline: np.ndarray  # [N, F]
    logits: dict[str, np.ndarray]  # task -> [N, C]


def run_batches(fn: Callable[[torch.Tensor], list], images: Sequence[Image.Image], spec: PreprocessSpec, *,
                batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = True,
                desc: str = "embed") -> list[list]:
    """`fn` on preprocessed batches of `images`; preprocessing of the next batch runs in a thread."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    starts = list(range(0, len(images), batch_size))

    def prep(start: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([preprocess(img, spec) for img in images[start:start + batch_size]]))

    outs = []
    channels_last = torch.device(device).type == "cuda"
    with ThreadPoolExecutor(1) as pool, tqdm(total=len(images), desc=desc, unit="img", disable=not progress,
                                             leave=False) as bar:
        pending = pool.submit(prep, starts[0]) if starts else None
        for i, _ in enumerate(starts):
            batch = pending.result()
            pending = pool.submit(prep, starts[i + 1]) if i + 1 < len(starts) else None
            batch = batch.to(device)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                outs.append(fn(batch))
            bar.update(len(batch))
    return outs


def embed_images(model: LookalikeModel, baseline_backbone: nn.Module, images: Sequence[Image.Image], *,
                 baseline_spec: PreprocessSpec = BASELINE_SPEC, batch_size: int = 64,
                 device: str | torch.device = "cpu", progress: bool = True, desc: str = "embed") -> Embeddings:
    """Both embeddings (and the heads' logits) of `images`, each through its own preprocessing."""
    model.eval()
    baseline_backbone.eval()
    spec = model.config.preprocessing
    kw = dict(batch_size=batch_size, device=device, progress=progress)
    if _same_input(spec, baseline_spec):
        paired = PairedEmbedder(model, baseline_backbone)
        outs = run_batches(lambda x: [t.float().cpu() if torch.is_tensor(t) else t for t in paired(x)], images,
                           spec, desc=desc, **kw)
        fine = [o[0] for o in outs]
        base = [o[1] for o in outs]
        logits = [o[2] for o in outs]
    else:
        outs = run_batches(lambda x: model(x), images, spec, desc=desc, **kw)
        fine = [o["embedding"].float().cpu() for o in outs]
        logits = [o["logits"] for o in outs]
        base = [F.normalize(b[0].float(), dim=-1).cpu() for b in
                run_batches(lambda x: [baseline_backbone(x)], images, baseline_spec, desc=desc + " (pretrained)",
                            **kw)]
    dim_f, dim_b = model.config.embedding_dim, model.num_features
    return Embeddings(torch.cat(fine).numpy() if fine else np.zeros((0, dim_f), np.float32),
                      torch.cat(base).numpy() if base else np.zeros((0, dim_b), np.float32),
                      {t: torch.cat([lg[t].float().cpu() for lg in logits]).numpy() for t in model.config.heads}
                      if logits else {})


def _same_input(a: PreprocessSpec, b: PreprocessSpec) -> bool:
    return a.to_dict() == b.to_dict()


# ---- search and metrics ----------------------------------------------------------------------------

def listing_topk(queries: np.ndarray, gallery: np.ndarray, gallery_listing: np.ndarray, k: int, *,
                 exclude_photo: np.ndarray | None = None, exclude_listing: np.ndarray | None = None,
                 chunk: int = 256) -> np.ndarray:
    """The k best listings [Q, k] (ordinals of `gallery_listing`, -1 where fewer exist), each ranked by
    its best photo (cosine; inputs are L2-normalised). `exclude_photo[q]` (a gallery row or -1) and
    `exclude_listing[q]` (a listing ordinal or -1) are never returned for query q."""
    n_listings = int(gallery_listing.max()) + 1 if len(gallery_listing) else 0
    k = min(k, n_listings)
    gal = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))
    index = torch.from_numpy(np.asarray(gallery_listing, dtype=np.int64))
    out = []
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(np.ascontiguousarray(queries[start:start + chunk], dtype=np.float32))
        sims = q @ gal.T
        rows = torch.arange(len(q))
        if exclude_photo is not None:
            ex = torch.from_numpy(np.asarray(exclude_photo[start:start + chunk], dtype=np.int64))
            sims[rows[ex >= 0], ex[ex >= 0]] = float("-inf")
        best = torch.full((len(q), n_listings), float("-inf")).scatter_reduce(
            1, index.expand(len(q), -1), sims, "amax", include_self=True)
        if exclude_listing is not None:
            ex = torch.from_numpy(np.asarray(exclude_listing[start:start + chunk], dtype=np.int64))
            best[rows[ex >= 0], ex[ex >= 0]] = float("-inf")
        values, top = best.topk(k, dim=1)
        out.append(torch.where(torch.isinf(values), torch.full_like(top, -1), top).numpy())
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def listing_recall(top: np.ndarray, truth: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """recall@k: the fraction of queries whose own listing (`truth[q]`) is among their top k listings."""
    hit = top == np.asarray(truth)[:, None]
    return {f"recall@{k}": float(hit[:, :k].any(1).mean()) if len(hit) else 0.0 for k in ks}


def label_precision(top: np.ndarray, query_labels: Sequence[str], listing_labels: np.ndarray,
                    relevant: np.ndarray, ks: Sequence[int] = (1, 10), map_k: int = 10) -> dict[str, np.ndarray]:
    """Per query: precision@k (a hit is a listing with the query's label) and AP@map_k, whose
    denominator is min(map_k, `relevant[q]`: the listings with the query's label it could find)."""
    padded = np.append(np.asarray(listing_labels, dtype=object), "\0")  # -1 → no listing, never a hit
    rel = padded[top] == np.asarray(query_labels, dtype=object)[:, None]
    out = {f"p@{k}": rel[:, :k].sum(1) / k for k in ks}
    r = rel[:, :map_k].astype(np.float64)
    precision_at = np.cumsum(r, axis=1) / np.arange(1, r.shape[1] + 1)
    out[f"map@{map_k}"] = (precision_at * r).sum(1) / np.maximum(1, np.minimum(map_k, relevant))
    return out


def head_accuracy(logits: dict[str, np.ndarray], labels: Sequence[dict[str, str]],
                  heads: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Accuracy of each head on the queries that carry its label."""
    out = {}
    for task, vocab in heads.items():
        index = {label: i for i, label in enumerate(vocab)}
        rows = [i for i, lab in enumerate(labels) if lab.get(task) in index]
        if not rows or task not in logits:
            continue
        pred = logits[task][rows].argmax(1)
        truth = np.array([index[labels[i][task]] for i in rows])
        out[task] = {"accuracy": float((pred == truth).mean()), "n": len(rows)}
    return out


# ---- the whole evaluation --------------------------------------------------------------------------

def evaluate(model: LookalikeModel, baseline_backbone: nn.Module, gallery: Gallery, query_sets: Sequence[QuerySet],
             *, baseline_spec: PreprocessSpec = BASELINE_SPEC, device: str | torch.device = "cpu",
             batch_size: int = 64, progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Every figure for the fine-tuned model and the pretrained baseline, measured in this one call.

    Returns {"listing": {set: {finetuned: {recall@k}, baseline: {...}, queries, listings, simulated, note}},
    "retrieval": {task: {finetuned: {p@1, p@10, map@10}, baseline: {...}, per_class: {label: {finetuned,
    baseline, queries}}, queries, catalog}}, "heads": {task: {accuracy, n}}, "phone": (listing["phone"]),
    "baseline": what it is}.
    """
    kw = dict(baseline_spec=baseline_spec, batch_size=batch_size, device=device, progress=progress)
    gal = embed_images(model, baseline_backbone, gallery.images, desc="embed gallery", **kw)
    ordinal: dict[str, int] = {}
    g_listing = np.array([ordinal.setdefault(lid, len(ordinal)) for lid in gallery.listing_ids], dtype=np.int64)
    position = {key: i for i, key in enumerate(gallery.keys)}
    photos_per_listing = np.bincount(g_listing, minlength=len(ordinal))
    result: dict = {"listing": {}, "retrieval": {}, "heads": {}, "gallery": {"photos": len(gallery.images),
                                                                            "listings": len(ordinal)},
                    "baseline": {"what": f"ImageNet {model.config.architecture} pooled features, no fine-tuning",
                                 "preprocessing": baseline_spec.to_dict()}}
    label_pool: list[tuple[Embeddings, QuerySet]] = []
    for qs in query_sets:
        if not qs.images:
            continue
        emb = embed_images(model, baseline_backbone, qs.images, desc=f"embed {qs.name}", **kw)
        if qs.labelled:
            label_pool.append((emb, qs))
        exclude = np.array([position.get(key, -1) if key else -1 for key in (qs.exclude or [None] * len(qs.images))])
        truth = np.array([ordinal.get(lid, -1) for lid in qs.listing_ids])
        # a listing is findable when it has a gallery photo besides the one the query must not find
        left_out = np.where(exclude >= 0, g_listing[np.maximum(exclude, 0)] == truth, False)
        findable = (truth >= 0) & (photos_per_listing[np.maximum(truth, 0)] - left_out > 0)
        if not findable.any():
            continue
        entry = {"queries": int(findable.sum()), "listings": len(ordinal), "simulated": qs.simulated}
        if qs.note:
            entry["note"] = qs.note
        for who, q_emb, g_emb in ((FINETUNED, emb.finetuned, gal.finetuned), (BASELINE, emb.baseline, gal.baseline)):
            top = listing_topk(q_emb[findable], g_emb, g_listing, 10, exclude_photo=exclude[findable])
            entry[who] = listing_recall(top, truth[findable])
        result["listing"][qs.name] = entry
    if label_pool:
        _label_metrics(model, result, gal, g_listing, gallery, label_pool)
    if "phone" in result["listing"]:
        result["phone"] = result["listing"]["phone"]
    if log:
        for line in summary_lines(result):
            log(line)
    return result


def _label_metrics(model: LookalikeModel, result: dict, gal: Embeddings, g_listing: np.ndarray, gallery: Gallery,
                   pool: list[tuple[Embeddings, QuerySet]]) -> None:
    """Label retrieval (overall and per class) and head accuracy over the pooled real-photo queries."""
    q_fine = np.concatenate([e.finetuned for e, _ in pool])
    q_base = np.concatenate([e.baseline for e, _ in pool])
    q_labels = [lab for _, qs in pool for lab in qs.labels]
    q_listing_ids = [lid for _, qs in pool for lid in qs.listing_ids]
    logits = {t: np.concatenate([e.logits[t] for e, _ in pool]) for t in model.config.heads if pool[0][0].logits}
    result["heads"] = head_accuracy(logits, q_labels, model.config.heads)
    n_listings = int(g_listing.max()) + 1
    ordinal = {lid: int(g_listing[i]) for i, lid in enumerate(gallery.listing_ids)}
    for task in model.config.heads:
        rows = [i for i, lab in enumerate(q_labels) if task in lab]
        cols = np.array([j for j, lab in enumerate(gallery.labels) if task in lab], dtype=np.int64)
        if not rows or len(cols) == 0:
            continue
        # A task is searched among the gallery photos that carry its label: an unlabelled neighbour is
        # unknown, not wrong. The query's own listing is left out: its other photos would be free hits.
        listing_labels = np.full(n_listings, "\0", dtype=object)
        for j in cols:
            listing_labels[g_listing[j]] = gallery.labels[j][task]
        own = np.array([ordinal.get(q_listing_ids[i], -1) for i in rows], dtype=np.int64)
        q_lab = [q_labels[i][task] for i in rows]
        counts = {label: int((listing_labels == label).sum()) for label in set(q_lab)}
        relevant = np.array([counts[lab] - (listing_labels[o] == lab if o >= 0 else 0) for lab, o in zip(q_lab, own)])
        entry: dict = {"queries": len(rows), "catalog": int(len(cols)), "per_class": {}}
        per_query = {}
        for who, q, g in ((FINETUNED, q_fine, gal.finetuned), (BASELINE, q_base, gal.baseline)):
            top = listing_topk(q[rows], g[cols], g_listing[cols], 10, exclude_listing=own)
            per_query[who] = label_precision(top, q_lab, listing_labels, relevant)
            entry[who] = {key: float(v.mean()) for key, v in per_query[who].items()}
        q_arr = np.asarray(q_lab, dtype=object)
        for label in sorted(set(q_lab)):
            mask = q_arr == label
            entry["per_class"][label] = {FINETUNED: float(per_query[FINETUNED]["p@10"][mask].mean()),
                                         BASELINE: float(per_query[BASELINE]["p@10"][mask].mean()),
                                         "queries": int(mask.sum())}
        result["retrieval"][task] = entry


def summary_lines(metrics: dict) -> list[str]:
    """Human-readable lines; simulated figures always say so."""
    lines = []
    for task, m in metrics.get("heads", {}).items():
        lines.append(f"head {task}: accuracy {m['accuracy']:.3f} on {m['n']} queries")
    for task, m in metrics.get("retrieval", {}).items():
        f, b = m[FINETUNED], m[BASELINE]
        lines.append(f"label {task}: p@1 {f['p@1']:.3f} (pretrained {b['p@1']:.3f}), p@10 {f['p@10']:.3f} "
                     f"(pretrained {b['p@10']:.3f}), mAP@10 {f['map@10']:.3f} (pretrained {b['map@10']:.3f})")
    for name, m in metrics.get("listing", {}).items():
        f, b = m[FINETUNED], m[BASELINE]
        what = "SIMULATED phone photos" if m.get("simulated") else f"held-out {name}"
        lines.append(f"same listing, {what} ({m['queries']} queries, {m['listings']} listings): "
                     + ", ".join(f"{k} {f[k]:.3f} (pretrained {b[k]:.3f})" for k in f))
    return lines


def pretrained_backbone_copy(model: LookalikeModel) -> nn.Module:
    """A frozen copy of the backbone as it is now: taken before training, it is the baseline."""
    baseline = copy.deepcopy(model.backbone).eval()
    for p in baseline.parameters():
        p.requires_grad_(False)
    return baseline
