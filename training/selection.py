"""Early stopping on held-out retrieval: every few steps the model searches a small held-out set, and the
weights of its best evaluation are the ones kept.

The set (`Selector`) is built once before training from photos the training never sees: the photos that
`lookalike.training.queries.hold_out` set aside for selection (a held-out view of a listing looks for the listing's
other photos; a held-out single-photo listing asks for its labels), twice as many simulated phone photos
of the EVALUATION recipe (50 to 200, seeded apart from the final evaluation's), and a small gallery
(those listings' photos plus distractors). Its score is the mean of what it can measure: same-listing
recall (the mean of @1 and @10) of the held-out views and of the phone photos, and label precision@10
averaged over the tasks.

Cheap by construction: the frozen trunk's output of every selection image is computed once and kept, so
an evaluation runs only the trained tail (at 224 px with three trained stages, a few seconds for a few
hundred photos on 2 CPU cores).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from lookalike.training.data import ImageBank, plain
from lookalike.training.evaluate import label_precision, listing_topk
from lookalike.training.model import LookalikeModel
from lookalike.training.queries import PHONE_SIZE, gallery_rows, phone_queries

log = logging.getLogger(__name__)

SELECTION_SEED = 0x5E1EC7  # the selection phone photos never coincide with the final evaluation's


class Selector:
    """Scores the model on a small held-out set and keeps the best weights seen."""

    def __init__(self, model: LookalikeModel, bank: ImageBank, select_rows: np.ndarray, *, gallery_size: int = 400,
                 phone: int | None = None, seed: int = 0, patience: int = 5, device: torch.device | str = "cpu",
                 batch_size: int = 64):
        self.patience, self.device, self.batch_size = patience, torch.device(device), batch_size
        spec = model.config.preprocessing
        listings = {bank.rows[i].listing_id for i in select_rows}
        held = set(int(i) for i in select_rows)
        gallery = [int(r) for r in gallery_rows(bank, listings=listings, limit=gallery_size, seed=seed + 17)]
        self.g_listing = np.array([bank.listing_index[r] for r in gallery], dtype=np.int64)
        self.q_listing = np.array([bank.listing_index[r] for r in select_rows], dtype=np.int64)
        position = {r: k for k, r in enumerate(gallery)}
        self.q_exclude = np.array([position.get(int(r), -1) for r in select_rows], dtype=np.int64)
        counts = np.bincount(self.g_listing, minlength=len(bank.listing_ids))
        left = np.array([self.g_listing[e] == t if e >= 0 else False for e, t in zip(self.q_exclude, self.q_listing)])
        self.q_findable = counts[self.q_listing] - left > 0
        self.labels = {task: ([bank.rows[r].labels.get(task) for r in select_rows],
                              [bank.rows[r].labels.get(task) for r in gallery]) for task in model.config.heads}
        trained = [r for r in gallery if r not in held]
        phone = phone if phone is not None else int(np.clip(2 * len(select_rows), 50, 200))
        phones = phone_queries(bank, np.array(trained, dtype=np.int64), phone, SELECTION_SEED + seed,
                               name="select-phone",
                               out_size=min(PHONE_SIZE, max(2 * spec.size, 64)))
        listing_of = {lid: i for i, lid in enumerate(bank.listing_ids)}
        self.p_listing = np.array([listing_of[lid] for lid in phones.listing_ids], dtype=np.int64)
        with torch.no_grad():
            model.eval()
            self.cache = [self._trunk(model, images) for images in
                          ([bank.images[r] for r in gallery], [bank.images[r] for r in select_rows], phones.images)]
        self.best_score, self.best_step, self.best_state = float("-inf"), 0, None
        self.since_best, self.history = 0, []
        log.info("early stopping on %d held-out photos, %d simulated phone photos (evaluation recipe), "
                 "gallery of %d photos", len(select_rows), len(phones.images), len(gallery))

    def _trunk(self, model: LookalikeModel, images) -> list[torch.Tensor]:
        spec = model.config.preprocessing
        out = []
        for start in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.stack([plain(img, spec) for img in images[start:start + self.batch_size]]))
            out.append(model.trunk(x.to(self.device)).half())  # half: the cache's memory, not the maths
        return out

    @torch.no_grad()
    def _embed(self, model: LookalikeModel, chunks: list[torch.Tensor]) -> np.ndarray:
        if not chunks:
            return np.zeros((0, model.config.embedding_dim), np.float32)
        return torch.cat([model.forward_from_trunk(t.float())["embedding"].float().cpu() for t in chunks]).numpy()

    def score(self, model: LookalikeModel) -> tuple[float, dict[str, float]]:
        was_training = model.training
        model.eval()
        gallery, views, phones = (self._embed(model, c) for c in self.cache)
        model.train(was_training)
        parts: dict[str, float] = {}
        if self.q_findable.any():
            top = listing_topk(views[self.q_findable], gallery, self.g_listing, 10,
                               exclude_photo=self.q_exclude[self.q_findable])
            hit = top == self.q_listing[self.q_findable][:, None]
            parts["views"] = float((hit[:, :1].any(1).mean() + hit.any(1).mean()) / 2)
        if len(phones):
            hit = listing_topk(phones, gallery, self.g_listing, 10) == self.p_listing[:, None]
            parts["phone"] = float((hit[:, :1].any(1).mean() + hit.any(1).mean()) / 2)
        label_scores = []
        for q_lab, g_lab in self.labels.values():
            rows = [i for i, lab in enumerate(q_lab) if lab is not None]
            cols = np.array([j for j, lab in enumerate(g_lab) if lab is not None], dtype=np.int64)
            if not rows or not len(cols):
                continue
            listing_labels = np.full(int(self.g_listing.max()) + 1, "\0", dtype=object)
            listing_labels[self.g_listing[cols]] = [g_lab[j] for j in cols]
            top = listing_topk(views[rows], gallery[cols], self.g_listing[cols], 10,
                               exclude_listing=self.q_listing[rows])
            precision = label_precision(top, [q_lab[i] for i in rows], listing_labels, np.full(len(rows), 10))
            label_scores.append(float(precision["p@10"].mean()))
        if label_scores:
            parts["labels"] = float(np.mean(label_scores))
        return (float(np.mean(list(parts.values()))) if parts else 0.0), parts

    def check(self, model: LookalikeModel, step: int) -> bool:
        """Evaluate after `step` steps; keep the weights if best. Whether to stop (no gain for `patience`
        evaluations in a row)."""
        value, parts = self.score(model)
        self.history.append({"step": step, "score": round(value, 4), **{k: round(v, 4) for k, v in parts.items()}})
        if value > self.best_score:
            self.best_score, self.best_step, self.since_best = value, step, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.since_best += 1
        log.info("step %d: held-out score %.4f (%s); best %.4f at step %d", step, value,
                 ", ".join(f"{k} {v:.3f}" for k, v in parts.items()), self.best_score, self.best_step)
        return self.since_best >= self.patience

    def restore(self, model: LookalikeModel) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def summary(self) -> dict:
        return {"best_step": self.best_step, "best_score": round(self.best_score, 4), "evaluations": self.history}
