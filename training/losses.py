"""Losses: masked multitask CE, listing identity (a proxy head or batch-hard triplets), and what keeps the
pretrained knowledge (L2-SP, similarity distillation), all on the shared L2-normalised embedding.

Masked CE: each sample is tagged with the one task it was drawn for, and its loss comes only from that
task's head (a row drawn for `shade` teaches the shade head and, through the shared embedding, the
backbone; it never pushes the category head, even if it happens to carry a category label too). A view
whose label is not trusted (target -1: a strong colour cast on a colour task) adds nothing to CE.

Identity, "the same product under another photo", is what a shopper's query needs; two objectives
teach it, each over the batch's P listings x K views (their other photos, simulated phone photos):

- `proxy`: a normalised-softmax classifier over listing ids (Zhai & Wu, "Classification is a strong
  baseline for deep metric learning", 2019): one unit-length proxy per listing, logits = scale x cosine
  of the embedding with each proxy, cross-entropy towards the view's own listing. It acts on the serving
  embedding itself (no projection of its own), and the proxies are training-only state, never exported.
  With many listings the softmax is sampled: the listings in the batch plus `negatives` random others. A
  listing's proxy starts as the mean of its first views' embeddings rather than at random, because on a
  large catalog most listings are seen only a few times and a random proxy would teach nothing.
- `triplet`: batch-hard triplet loss: each view's positive is the farthest view of its own listing, its
  negative the closest view of any other listing in the batch.

Keeping what pretraining knew: `l2_sp` pulls the fine-tuned backbone weights towards the pretrained ones
(Li et al., "Explicit inductive bias for transfer learning", 2018); `similarity_distillation` keeps the
batch's similarity structure close to the pretrained backbone's (Tung & Mori, 2019).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lookalike.core.errors import InputError

PARTS = ("ce", "proxy", "triplet")
OBJECTIVES = ("ce", "proxy", "triplet", "ce+proxy", "ce+triplet", "proxy+triplet", "ce+proxy+triplet")


@dataclass
class LossConfig:
    objective: str = "ce+proxy"
    label_smoothing: float = 0.1
    task_weights: dict[str, float] = field(default_factory=dict)  # default 1.0 per task
    triplet_margin: float = 0.2
    triplet_weight: float = 1.0
    proxy_weight: float = 1.0
    proxy_scale: float = 16.0  # 1 / temperature of the cosine softmax

    def __post_init__(self):
        parts = self.objective.split("+")
        if not parts or any(p not in PARTS for p in parts) or len(set(parts)) != len(parts):
            raise InputError(f"objective must be one of {', '.join(OBJECTIVES)} (parts joined by '+'), "
                             f"got {self.objective!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError("label_smoothing must be in [0, 1)")
        if self.proxy_scale <= 0:
            raise InputError("proxy_scale must be positive")

    @property
    def parts(self) -> list[str]:
        return self.objective.split("+")

    @property
    def uses_ce(self) -> bool:
        return "ce" in self.parts

    @property
    def uses_triplet(self) -> bool:
        return "triplet" in self.parts

    @property
    def uses_proxy(self) -> bool:
        return "proxy" in self.parts

    @property
    def needs_views(self) -> bool:
        """Whether batches must hold several views of each listing."""
        return self.uses_triplet or self.uses_proxy


def masked_task_ce(logits: dict[str, torch.Tensor], task_ids: torch.Tensor, targets: torch.Tensor,
                   tasks: list[str], *, label_smoothing: float = 0.0,
                   task_weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_task weight × mean CE of that task's head over the samples tagged with that task.

    `task_ids[i]` indexes `tasks`; `targets[i]` is the class index within that task's labels (-1: no
    trusted label, left out). Returns the total and each task's (unweighted) mean loss; a task with no
    sample in the batch contributes 0.
    """
    total = logits[tasks[0]].new_zeros((), dtype=torch.float32)
    per_task: dict[str, torch.Tensor] = {}
    for t, task in enumerate(tasks):
        rows = ((task_ids == t) & (targets >= 0)).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        loss = F.cross_entropy(logits[task][rows].float(), targets[rows], label_smoothing=label_smoothing)
        per_task[task] = loss.detach()
        total = total + (task_weights or {}).get(task, 1.0) * loss
    return total, per_task


def batch_hard_triplet(embeddings: torch.Tensor, listing: torch.Tensor, margin: float = 0.2
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch-hard triplet loss on L2-normalised embeddings.

    `listing[i]` identifies the product of row i; rows sharing it are positives of each other (views
    of one listing), all others negatives. For each anchor: hardest (farthest) positive and hardest
    (closest) negative by Euclidean distance on the unit sphere; loss = relu(d_ap − d_an + margin)
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


class ListingProxies(nn.Module):
    """One unit-length proxy per listing of the training catalog, for the normalised-softmax identity loss.

    Training-only: it is not part of the model (serving has no use for it). Its gradient is sparse (only
    the proxies in the sampled softmax), so it has its own `torch.optim.SparseAdam` (`optimizer`).
    """

    def __init__(self, n_listings: int, dim: int, *, negatives: int = 4096, seed: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_listings, dim))
        self.register_buffer("ready", torch.zeros(n_listings, dtype=torch.bool))
        self.negatives = negatives
        self.generator = torch.Generator().manual_seed(seed)

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SparseAdam([self.weight], lr=lr)

    @torch.no_grad()
    def _initialise(self, embeddings: torch.Tensor, listing: torch.Tensor) -> None:
        new = listing[~self.ready[listing]].unique()
        if new.numel() == 0:
            return
        where = (listing[:, None] == new[None, :]).float()  # [B, new]
        sums = where.T @ embeddings.float()
        self.weight[new] = F.normalize(sums, dim=-1).to(self.weight.dtype)
        self.ready[new] = True

    @torch.no_grad()
    def renormalise(self, listing: torch.Tensor) -> None:
        """Put the proxies just updated back on the unit sphere."""
        rows = listing.unique()
        self.weight[rows] = F.normalize(self.weight[rows], dim=-1)

    def candidates(self, listing: torch.Tensor) -> torch.Tensor:
        """The batch's listings, then up to `negatives` other initialised ones drawn at random."""
        own = listing.unique()
        ready = self.ready.clone()
        ready[own] = False
        others = ready.nonzero(as_tuple=True)[0]
        if len(others) > self.negatives:
            others = others[torch.randperm(len(others), generator=self.generator)[:self.negatives].to(others.device)]
        return torch.cat([own, others])

    def loss(self, embeddings: torch.Tensor, listing: torch.Tensor, scale: float) -> torch.Tensor:
        self._initialise(embeddings.detach(), listing)
        cand = self.candidates(listing)
        proxies = F.embedding(cand, self.weight, sparse=True)
        logits = scale * embeddings.float() @ F.normalize(proxies.float(), dim=-1).T
        position = torch.full((len(self.weight),), -1, dtype=torch.long, device=listing.device)
        position[cand] = torch.arange(len(cand), device=listing.device)
        return F.cross_entropy(logits, position[listing])


def l2_sp(model: nn.Module, reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ ||θ − θ₀||² over the trained backbone weights, θ₀ the pretrained ones (`reference`, by name)."""
    total = None
    for name, p in model.named_parameters():
        if p.requires_grad and name in reference:
            term = (p.float() - reference[name]).pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def similarity_distillation(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """How far the batch's cosine-similarity structure moved from the pretrained features' (both
    row-normalised Gram matrices, mean squared difference)."""
    a = F.normalize(embeddings.float() @ embeddings.float().T, dim=1)
    ref = F.normalize(reference.float(), dim=-1)
    b = F.normalize(ref @ ref.T, dim=1)
    return (a - b).pow(2).sum(1).mean()


def multitask_loss(out: dict, task_ids: torch.Tensor, targets: torch.Tensor, listing: torch.Tensor,
                   tasks: list[str], config: LossConfig, proxies: ListingProxies | None = None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective as configured; returns the loss and a float per logged component."""
    total = out["embedding"].new_zeros((), dtype=torch.float32)
    logged: dict[str, float] = {}
    if config.uses_ce:
        ce, per_task = masked_task_ce(out["logits"], task_ids, targets, tasks,
                                      label_smoothing=config.label_smoothing, task_weights=config.task_weights)
        total = total + ce
        logged.update({task: float(v) for task, v in per_task.items()})
    if config.uses_triplet:
        trip, _ = batch_hard_triplet(out["embedding"], listing, config.triplet_margin)
        total = total + config.triplet_weight * trip
        logged["triplet"] = float(trip.detach())
    if config.uses_proxy:
        if proxies is None:
            raise InputError("the proxy objective needs the listing proxies (lookalike.training.losses.ListingProxies)")
        proxy = proxies.loss(out["embedding"], listing, config.proxy_scale)
        total = total + config.proxy_weight * proxy
        logged["proxy"] = float(proxy.detach())
    return total, logged
