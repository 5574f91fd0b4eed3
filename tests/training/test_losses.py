"""Masked multitask CE (a sample's loss reaches only its own head, an untrusted label none), batch-hard
triplet mining, the listing-proxy identity loss, and the terms that keep pretrained knowledge."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lookalike.training.losses import (ListingProxies, LossConfig, batch_hard_triplet, hardest_negatives, l2_sp,
                                        masked_task_ce, multitask_loss, similarity_distillation)
from lookalike.training.model import ModelConfig, create_model
from lookalike.core.preprocessing import PreprocessSpec

TASKS = ["category", "fine_category", "shade"]
HEADS = {"category": ["a", "b", "c"], "fine_category": ["p", "q", "r", "s"], "shade": ["dark", "light"]}


@pytest.fixture(scope="module")
def model():
    # random backbone weights are enough here: only the wiring of the loss to the heads is tested
    return create_model(ModelConfig(heads=HEADS, pretrained=None, trainable_blocks=1,
                                    preprocessing=PreprocessSpec(size=32, resize=32, crop="none")))


def test_a_samples_loss_reaches_only_its_own_head(model):
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    task_ids = torch.tensor([2, 2])  # both samples were drawn for `shade`
    targets = torch.tensor([0, 1])
    loss, per_task = masked_task_ce(out["logits"], task_ids, targets, TASKS)
    loss.backward()
    assert set(per_task) == {"shade"}
    assert model.heads["shade"].weight.grad.abs().sum() > 0
    assert model.projection.weight.grad.abs().sum() > 0  # the shared embedding learns from every task
    for other in ("category", "fine_category"):
        grad = model.heads[other].weight.grad
        assert grad is None or torch.count_nonzero(grad) == 0


def test_mixed_batch_each_task_mean_over_its_own_samples_and_weights():
    torch.manual_seed(0)
    logits = {t: torch.randn(6, len(HEADS[t])) for t in TASKS}
    task_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    targets = torch.tensor([2, 0, 3, 1, 1, 0])
    total, per_task = masked_task_ce(logits, task_ids, targets, TASKS, label_smoothing=0.1,
                                     task_weights={"shade": 3.0})
    want = {t: F.cross_entropy(logits[t][task_ids == i], targets[task_ids == i], label_smoothing=0.1)
            for i, t in enumerate(TASKS)}
    for t in TASKS:
        assert torch.allclose(per_task[t], want[t])
    assert torch.allclose(total, want["category"] + want["fine_category"] + 3.0 * want["shade"])
    plain, _ = masked_task_ce(logits, task_ids, targets, TASKS, label_smoothing=0.0)
    assert not torch.allclose(plain, total)


def test_batch_hard_triplet_picks_the_hardest_negative_and_positive():
    # listings: 0,0 (two views), 1,1, 2,2 on the unit circle; listing 2's views sit close to listing 0
    angles = torch.tensor([0.0, 0.3, 2.0, 2.2, 0.1, -0.4])
    emb = torch.stack([angles.cos(), angles.sin()], 1)
    listing = torch.tensor([0, 0, 1, 1, 2, 2])
    hardest = hardest_negatives(emb, listing)
    assert hardest[0].item() == 4  # angle 0.1 is the closest view of another listing to angle 0
    assert hardest[1].item() == 4
    assert hardest[5].item() == 0
    loss, _ = batch_hard_triplet(emb, listing, margin=0.2)
    d = torch.cdist(emb, emb)
    manual = []
    for i in range(6):
        pos = d[i][(listing == listing[i]) & (torch.arange(6) != i)].max()
        neg = d[i][listing != listing[i]].min()
        manual.append(F.relu(pos - neg + 0.2))
    assert torch.allclose(loss, torch.stack(manual).mean(), atol=1e-6)
    assert loss > 0


def test_triplet_is_zero_when_every_listing_is_well_separated_and_gradient_flows_otherwise():
    emb = F.normalize(torch.tensor([[1.0, 0, 0], [0.99, 0.01, 0], [0, 1.0, 0], [0.01, 0.99, 0]]), dim=1)
    listing = torch.tensor([0, 0, 1, 1])
    loss, _ = batch_hard_triplet(emb, listing, margin=0.2)
    assert loss.item() == 0.0
    emb2 = emb.clone().requires_grad_(True)
    loss2, _ = batch_hard_triplet(emb2, listing, margin=5.0)
    loss2.backward()
    assert loss2.item() > 0 and emb2.grad.abs().sum() > 0


def test_objectives_combine_as_configured(model):
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32))
    args = (out, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1]), torch.tensor([7, 8, 7, 8]), TASKS)
    ce, logged_ce = multitask_loss(*args, LossConfig("ce"))
    trip, logged_trip = multitask_loss(*args, LossConfig("triplet", triplet_margin=0.5))
    both, logged_both = multitask_loss(*args, LossConfig("ce+triplet", triplet_margin=0.5))
    assert "triplet" not in logged_ce and set(logged_trip) == {"triplet"}
    assert torch.allclose(both, ce + trip)
    with pytest.raises(ValueError, match="objective"):
        LossConfig("arcface")
    with pytest.raises(ValueError, match="objective"):
        LossConfig("ce+ce")
    assert LossConfig("ce+proxy+triplet").parts == ["ce", "proxy", "triplet"]
    assert LossConfig("ce").needs_views is False and LossConfig("proxy").needs_views is True


def test_an_untrusted_label_adds_nothing():
    logits = {"color": torch.randn(4, 3)}
    tasks = ["color"]
    total, _ = masked_task_ce(logits, torch.zeros(4, dtype=torch.long), torch.tensor([0, -1, 2, -1]), tasks)
    kept, _ = masked_task_ce({"color": logits["color"][[0, 2]]}, torch.zeros(2, dtype=torch.long),
                             torch.tensor([0, 2]), tasks)
    assert torch.allclose(total, kept)
    none, per_task = masked_task_ce(logits, torch.zeros(2, dtype=torch.long), torch.tensor([-1, -1]), tasks)
    assert none.item() == 0.0 and per_task == {}


def test_proxies_start_at_their_views_and_teach_identity():
    torch.manual_seed(0)
    proxies = ListingProxies(10, 8, negatives=3, seed=0)
    emb = F.normalize(torch.randn(6, 8), dim=1).requires_grad_(True)
    listing = torch.tensor([1, 4, 7, 1, 4, 7])  # three listings, two views each
    loss = proxies.loss(emb, listing, scale=16.0)
    # each listing's proxy is the normalised mean of its first views
    want = F.normalize(emb.detach()[[0, 3]].sum(0), dim=0)
    assert torch.allclose(proxies.weight.data[1], want, atol=1e-6)
    assert proxies.ready.tolist() == [i in (1, 4, 7) for i in range(10)]
    loss.backward()
    assert emb.grad.abs().sum() > 0 and proxies.weight.grad.is_sparse  # only the sampled proxies move
    # the softmax holds the batch's listings first, then at most `negatives` other initialised ones
    proxies.ready[:] = True
    cand = proxies.candidates(torch.tensor([2, 2, 5]))
    assert cand[:2].tolist() == [2, 5] and len(cand) == 2 + 3 and len(set(cand.tolist())) == 5


def test_proxy_loss_is_low_when_views_agree_and_high_when_they_do_not():
    base = F.normalize(torch.eye(4)[:, :4] + 0.01, dim=1)
    agree = torch.cat([base, base])
    listing = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    low = ListingProxies(4, 4).loss(agree, listing, 16.0)
    swapped = torch.cat([base, base[[1, 0, 3, 2]]])
    high = ListingProxies(4, 4).loss(swapped, listing, 16.0)
    assert low < 0.2 < high


def test_proxy_objective_needs_its_proxies(model):
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32))
    args = (out, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1]), TASKS)
    with pytest.raises(ValueError, match="proxies"):
        multitask_loss(*args, LossConfig("ce+proxy"))
    loss, logged = multitask_loss(*args, LossConfig("ce+proxy"), ListingProxies(2, 128))
    assert "proxy" in logged and torch.isfinite(loss)


def test_l2_sp_is_zero_at_the_pretrained_weights_and_pulls_back(model):
    reference = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert l2_sp(model, reference).item() == 0.0
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone."))
    with torch.no_grad():
        param.add_(0.5)
    penalty = l2_sp(model, reference)
    assert penalty.item() == pytest.approx(0.25 * param.numel(), rel=1e-4)
    model.zero_grad(set_to_none=True)
    penalty.backward()
    assert (param.grad > 0).all()  # gradient descent moves the weight back down
    with torch.no_grad():
        param.sub_(0.5)


def test_similarity_distillation_measures_how_far_the_structure_moved():
    torch.manual_seed(1)
    reference = torch.rand(6, 20)
    same = F.normalize(reference, dim=1)
    assert similarity_distillation(same, reference).item() == pytest.approx(0.0, abs=1e-6)
    assert similarity_distillation(F.normalize(torch.randn(6, 20), dim=1), reference).item() > 0.01
