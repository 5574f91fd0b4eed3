"""Evaluation, always beside the ImageNet-pretrained backbone measured in the same run.

- per-head accuracy on a labelled query set;
- label retrieval (query set → catalog, exact cosine search): precision@1, precision@10 and mAP@10,
  where a match is a catalog row with the query's label, for each labelled task (searched among the
  catalog rows that carry that task's label);
- listing retrieval (simulated phone photos of catalog listings → catalog): recall@1/5/10, where the
  match is the photographed listing itself. These queries are simulated and always reported so.

The baseline embedding is the pretrained backbone's pooled features, L2-normalised, with no fine-tuning.
When the fine-tuned model's early stages are frozen they are the pretrained ones, so both embeddings
share one pass through the frozen trunk (`PairedEmbedder`) and only the tails differ.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from training.model import LookalikeModel
from transformer.preprocessing import PreprocessSpec, preprocess

FINETUNED, BASELINE = "finetuned", "baseline"


# ---- embedding -------------------------------------------------------------------------------------

class PairedEmbedder:
    """images → (fine-tuned embedding, baseline embedding, head logits), one trunk pass for both."""

    def __init__(self, model: LookalikeModel, baseline_backbone: nn.Module):
        self.model = model.eval()
        self.baseline = baseline_backbone.eval()
        backbone = model.backbone
        tb = model.config.trainable_blocks
        self.cut = len(backbone.blocks) - tb if (
            tb >= 0 and all(hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2",
                                                            "global_pool"))) else None

    def _tail(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for block in net.blocks[self.cut:]:
            x = block(x)
        return net.global_pool(net.bn2(net.conv_head(x)))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if self.cut is None:
            feats, base = self.model.features(x), self.baseline(x)
        else:
            b = self.model.backbone
            trunk = b.bn1(b.conv_stem(x))
            for block in b.blocks[:self.cut]:
                trunk = block(trunk)
            feats, base = self._tail(b, trunk), self._tail(self.baseline, trunk)
        emb = self.model.embed_features(feats)
        return emb, F.normalize(base.float(), dim=-1), self.model.logits_from_embedding(emb)


@dataclass
class Embeddings:
    finetuned: np.ndarray  # [N, D]
    baseline: np.ndarray  # [N, F]
    logits: dict[str, np.ndarray]  # task -> [N, C]


def embed_images(embedder: PairedEmbedder, images: Sequence[Image.Image], spec: PreprocessSpec, *,
                 batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = True,
                 desc: str = "embed") -> Embeddings:
    """Both embeddings (and the heads' logits) of `images`, through the serving preprocessing.

    Preprocessing of the next batch runs in a thread while the current one is embedded.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    starts = list(range(0, len(images), batch_size))

    def prep(start: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([preprocess(img, spec) for img in images[start:start + batch_size]]))

    fine, base, logits = [], [], {}
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
            e, b, lg = embedder(batch)
            fine.append(e.float().cpu().numpy())
            base.append(b.float().cpu().numpy())
            for task, v in lg.items():
                logits.setdefault(task, []).append(v.float().cpu().numpy())
            bar.update(len(batch))
    dim_f, dim_b = embedder.model.config.embedding_dim, embedder.model.num_features
    return Embeddings(np.concatenate(fine) if fine else np.zeros((0, dim_f), np.float32),
                      np.concatenate(base) if base else np.zeros((0, dim_b), np.float32),
                      {t: np.concatenate(v) for t, v in logits.items()})


# ---- metrics ---------------------------------------------------------------------------------------

def exact_search(queries: np.ndarray, catalog: np.ndarray, k: int, *, exclude: np.ndarray | None = None,
                 chunk: int = 1024) -> np.ndarray:
    """Indices [Q, k] of the k catalog rows of highest cosine similarity (inputs are L2-normalised).

    `exclude[q]` (a catalog index or -1) is never returned for query q (a query that is itself in the
    catalog must not find itself).
    """
    k = min(k, len(catalog))
    cat = torch.from_numpy(np.ascontiguousarray(catalog, dtype=np.float32))
    out = []
    for start in range(0, len(queries), chunk):
        sims = torch.from_numpy(np.ascontiguousarray(queries[start:start + chunk], dtype=np.float32)) @ cat.T
        if exclude is not None:
            ex = torch.from_numpy(exclude[start:start + chunk])
            rows = (ex >= 0).nonzero(as_tuple=True)[0]
            sims[rows, ex[rows]] = float("-inf")
        out.append(sims.topk(k, dim=1).indices.numpy())
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def label_retrieval(neighbours: np.ndarray, query_labels: Sequence[str], catalog_labels: Sequence[str | None],
                    ks: Sequence[int] = (1, 10), map_k: int = 10) -> dict[str, float]:
    """precision@k and mAP@map_k where a match is a catalog row with the query's label.

    AP@k = Σ_i precision@i · rel_i / min(k, number of matching catalog rows).
    """
    cat = np.asarray([c if c is not None else "\0" for c in catalog_labels], dtype=object)
    rel = cat[neighbours] == np.asarray(query_labels, dtype=object)[:, None]
    out = {f"p@{k}": float(rel[:, :k].mean()) for k in ks}
    counts = {label: int((cat == label).sum()) for label in set(query_labels)}
    r = rel[:, :map_k].astype(np.float64)
    precision_at = np.cumsum(r, axis=1) / np.arange(1, r.shape[1] + 1)
    denom = np.array([max(1, min(map_k, counts[q])) for q in query_labels], dtype=np.float64)
    out[f"map@{map_k}"] = float(((precision_at * r).sum(1) / denom).mean())
    return out


def listing_recall(neighbours: np.ndarray, query_rows: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """recall@k: the fraction of queries whose own listing (catalog row `query_rows[q]`) is in the top k."""
    hit = neighbours == np.asarray(query_rows)[:, None]
    return {f"recall@{k}": float(hit[:, :k].any(1).mean()) for k in ks}


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

def evaluate(model: LookalikeModel, baseline_backbone: nn.Module, *,
             catalog_images: Sequence[Image.Image], catalog_ids: Sequence[str],
             catalog_labels: Sequence[dict[str, str]],
             query_images: Sequence[Image.Image] = (), query_ids: Sequence[str] = (),
             query_labels: Sequence[dict[str, str]] = (),
             phone_queries: Sequence[tuple[str, Image.Image]] = (),
             device: str | torch.device = "cpu", batch_size: int = 64, progress: bool = True,
             log: Callable[[str], None] | None = None) -> dict:
    """Every figure for the fine-tuned model and the baseline, measured in this one call.

    Returns {"heads": {task: {accuracy, n}}, "retrieval": {task: {finetuned: {...}, baseline: {...},
    queries, catalog}}, "phone": {finetuned: {recall@k}, baseline: {...}, queries, simulated, note}}.
    """
    from training.phone_photos import SIMULATED_NOTE

    spec = model.config.preprocessing
    embedder = PairedEmbedder(model, baseline_backbone)
    kw = dict(batch_size=batch_size, device=device, progress=progress)
    cat = embed_images(embedder, catalog_images, spec, desc="embed catalog", **kw)
    result: dict = {"heads": {}, "retrieval": {}, "phone": {}}
    position = {lid: i for i, lid in enumerate(catalog_ids)}
    if len(query_images):
        qry = embed_images(embedder, query_images, spec, desc="embed queries", **kw)
        result["heads"] = head_accuracy(qry.logits, query_labels, model.config.heads)
        for task in model.config.heads:
            rows = [i for i, lab in enumerate(query_labels) if task in lab]
            # A sparse task is searched among the catalog rows that carry its label: an unlabelled
            # neighbour is unknown, not wrong.
            cat_rows = np.array([j for j, lab in enumerate(catalog_labels) if task in lab], dtype=np.int64)
            if not rows or len(cat_rows) == 0:
                continue
            sub_position = {catalog_ids[j]: k for k, j in enumerate(cat_rows)}
            exclude = np.array([sub_position.get(query_ids[i], -1) for i in rows], dtype=np.int64)
            nn_f = exact_search(qry.finetuned[rows], cat.finetuned[cat_rows], 10, exclude=exclude)
            nn_b = exact_search(qry.baseline[rows], cat.baseline[cat_rows], 10, exclude=exclude)
            q_lab = [query_labels[i][task] for i in rows]
            c_lab = [catalog_labels[j][task] for j in cat_rows]
            result["retrieval"][task] = {
                FINETUNED: label_retrieval(nn_f, q_lab, c_lab),
                BASELINE: label_retrieval(nn_b, q_lab, c_lab),
                "queries": len(rows), "catalog": int(len(cat_rows)),
            }
    if len(phone_queries):
        known = [(position[lid], img) for lid, img in phone_queries if lid in position]
        if known:
            rows = np.array([k for k, _ in known])
            ph = embed_images(embedder, [img for _, img in known], spec, desc="embed phone photos", **kw)
            result["phone"] = {
                FINETUNED: listing_recall(exact_search(ph.finetuned, cat.finetuned, 10), rows),
                BASELINE: listing_recall(exact_search(ph.baseline, cat.baseline, 10), rows),
                "queries": len(known), "catalog": len(catalog_ids), "simulated": True, "note": SIMULATED_NOTE,
            }
    if log:
        for line in summary_lines(result):
            log(line)
    return result


def summary_lines(metrics: dict) -> list[str]:
    """Human-readable lines; phone-photo figures always carry the word 'simulated'."""
    lines = []
    for task, m in metrics.get("heads", {}).items():
        lines.append(f"head {task}: accuracy {m['accuracy']:.3f} on {m['n']} queries")
    for task, m in metrics.get("retrieval", {}).items():
        f, b = m[FINETUNED], m[BASELINE]
        lines.append(f"retrieval {task}: p@1 {f['p@1']:.3f} (baseline {b['p@1']:.3f}), p@10 {f['p@10']:.3f} "
                     f"(baseline {b['p@10']:.3f}), mAP@10 {f['map@10']:.3f} (baseline {b['map@10']:.3f})")
    ph = metrics.get("phone")
    if ph:
        f, b = ph[FINETUNED], ph[BASELINE]
        lines.append(f"SIMULATED phone photos → catalog ({ph['queries']} queries, {ph['catalog']} listings): "
                     + ", ".join(f"{k} {f[k]:.3f} (baseline {b[k]:.3f})" for k in f))
    return lines


def pretrained_backbone_copy(model: LookalikeModel) -> nn.Module:
    """A frozen copy of the backbone as it is now: taken before training, it is the baseline."""
    baseline = copy.deepcopy(model.backbone).eval()
    for p in baseline.parameters():
        p.requires_grad_(False)
    return baseline
