"""Losses: masked multitask cross-entropy and batch-hard triplet loss on the shared embedding.

Masked CE: each sample is tagged with the one task it was drawn for, and its loss comes only from that
task's head (a row drawn for `shade` teaches the shade head and, through the shared embedding, the
backbone; it never pushes the category head, even if it happens to carry a category label too).

Batch-hard triplet: the batch holds every sampled listing twice, under two independent augmentations.
Each view's positive is the other view of the same listing; its negative is the closest view of any
*other* listing in the batch (the hardest one). This teaches "the same product under another photo" —
exactly the phone-photo query — where CE teaches "the same class".
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

OBJECTIVES = ("ce", "triplet", "ce+triplet")


@dataclass
class LossConfig:
    objective: str = "ce+triplet"
    label_smoothing: float = 0.1
    task_weights: dict[str, float] = field(default_factory=dict)  # default 1.0 per task
    triplet_margin: float = 0.2
    triplet_weight: float = 1.0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")

    @property
    def uses_ce(self) -> bool:
        return "ce" in self.objective.split("+")

    @property
    def uses_triplet(self) -> bool:
        return "triplet" in self.objective


def masked_task_ce(logits: dict[str, torch.Tensor], task_ids: torch.Tensor, targets: torch.Tensor,
                   tasks: list[str], *, label_smoothing: float = 0.0,
                   task_weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_task weight × mean CE of that task's head over the samples tagged with that task.

    `task_ids[i]` indexes `tasks`; `targets[i]` is the class index within that task's labels. Returns the
    total and each task's (unweighted) mean loss; a task with no sample in the batch contributes 0.
    """
    total = logits[tasks[0]].new_zeros((), dtype=torch.float32)
    per_task: dict[str, torch.Tensor] = {}
    for t, task in enumerate(tasks):
        rows = (task_ids == t).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        loss = F.cross_entropy(logits[task][rows].float(), targets[rows], label_smoothing=label_smoothing)
        per_task[task] = loss.detach()
        total = total + (task_weights or {}).get(task, 1.0) * loss
    return total, per_task


def batch_hard_triplet(embeddings: torch.Tensor, listing: torch.Tensor, margin: float = 0.2
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch-hard triplet loss on L2-normalised embeddings.

    `listing[i]` identifies the product of row i; rows sharing it are positives of each other (two
    views of one listing), all others negatives. For each anchor: hardest (farthest) positive and
    hardest (closest) negative by Euclidean distance on the unit sphere; loss = relu(d_ap − d_an + margin)
    averaged over anchors that have at least one positive and one negative.
    """
    emb = embeddings.float()
    dist = torch.cdist(emb, emb).clamp_min(1e-12)
    same = listing[:, None] == listing[None, :]
    eye = torch.eye(len(listing), dtype=torch.bool, device=emb.device)
    pos_mask, neg_mask = same & ~eye, ~same
    valid = pos_mask.any(1) & neg_mask.any(1)
    if not bool(valid.any()):
        zero = emb.sum() * 0.0
        return zero, {"triplet_active": zero.detach()}
    hardest_pos = dist.masked_fill(~pos_mask, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(~neg_mask, float("inf")).amin(1)
    losses = F.relu(hardest_pos - hardest_neg + margin)[valid]
    return losses.mean(), {"triplet_active": (losses > 0).float().mean().detach()}


def hardest_negatives(embeddings: torch.Tensor, listing: torch.Tensor) -> torch.Tensor:
    """For each row, the index of its hardest negative (closest row of another listing)."""
    dist = torch.cdist(embeddings.float(), embeddings.float())
    same = listing[:, None] == listing[None, :]
    return dist.masked_fill(same, float("inf")).argmin(1)


def multitask_loss(out: dict, task_ids: torch.Tensor, targets: torch.Tensor, listing: torch.Tensor,
                   tasks: list[str], config: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective as configured; returns the loss and a float per logged component."""
    total = out["embedding"].new_zeros((), dtype=torch.float32)
    logged: dict[str, float] = {}
    if config.uses_ce:
        ce, per_task = masked_task_ce(out["logits"], task_ids, targets, tasks,
                                      label_smoothing=config.label_smoothing, task_weights=config.task_weights)
        total = total + ce
        logged.update({task: float(v) for task, v in per_task.items()})
    if config.uses_triplet:
        trip, info = batch_hard_triplet(out["embedding"], listing, config.triplet_margin)
        total = total + config.triplet_weight * trip
        logged["triplet"] = float(trip.detach())
    return total, logged
