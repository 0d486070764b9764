"""Losses of eq. 1, 3, 4 and InfoNCE: expected values are worked out by hand in each test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pcavmae_cli.engine.losses import (
    infonce,
    loss_weights,
    pcpe_loss,
    pje_loss,
    reconstruction_loss,
    select_prototypes,
    total_loss,
)
from pcavmae_cli.engine.prototypes import Prototypes
from pcavmae_cli.engine.schema import LossConfig


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def protos(centroids, gamma, assignments, p_a=None, p_v=None):
    c = t(centroids)
    return Prototypes(
        centroids=c,
        p_a=t(p_a) if p_a is not None else c.clone(),
        p_v=t(p_v) if p_v is not None else c.clone(),
        gamma=t(gamma),
        assignments=torch.tensor(assignments),
        counts=torch.bincount(torch.tensor(assignments), minlength=len(centroids)),
    )


def softplus(x):  # log(1 + e^x): two-way cross-entropy with logit gap x against the target
    return math.log1p(math.exp(x))


# --- InfoNCE ------------------------------------------------------------------------------


def test_infonce_hand_value():
    # S = I / 1: every row and column is CE([1, 0], target 0) = log(1 + e^-1).
    z = t([[1, 0], [0, 1]])
    assert infonce(z, z, temperature=1.0).item() == pytest.approx(softplus(-1), abs=1e-6)
    # temperature 0.5 doubles the gap: log(1 + e^-2).
    assert infonce(z, z, temperature=0.5).item() == pytest.approx(softplus(-2), abs=1e-6)


def test_infonce_asymmetric_batch_hand_value():
    # z_a = [(1,0), (0.6,0.8)], z_v = [(1,0), (0,1)], T = 1: S = [[1, 0], [0.6, 0.8]].
    # rows (a->v):  CE([1,0],0) = log(1+e^-1);  CE([0.6,0.8],1) = log(1+e^-0.2)
    # cols (v->a):  CE([1,0.6],0) = log(1+e^-0.4);  CE([0,0.8],1) = log(1+e^-0.8)
    z_a, z_v = t([[1, 0], [0.6, 0.8]]), t([[1, 0], [0, 1]])
    expected = ((softplus(-1) + softplus(-0.2)) / 2 + (softplus(-0.4) + softplus(-0.8)) / 2) / 2
    assert infonce(z_a, z_v, 1.0).item() == pytest.approx(expected, abs=1e-6)


def test_infonce_symmetric_and_lower_for_aligned_pairs():
    g = torch.Generator().manual_seed(0)
    z_a = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    z_v = F.normalize(z_a + 0.1 * torch.randn(8, 16, generator=g), dim=1)
    assert infonce(z_a, z_v, 0.1).item() == pytest.approx(infonce(z_v, z_a, 0.1).item(), rel=1e-6)
    shuffled = z_v[torch.roll(torch.arange(8), 1)]
    assert infonce(z_a, z_v, 0.1) < infonce(z_a, shuffled, 0.1)


# --- L_PJE (eq. 1) ------------------------------------------------------------------------


def one_level():
    # p_0 = (1,0) gamma 0.5; p_1 = (0,1) gamma 0.25; clips 0, 1, 2 -> prototypes 0, 1, 0.
    return protos([[1, 0], [0, 1]], [0.5, 0.25], [0, 1, 0])


def test_pje_hand_value():
    z_a = t([[1, 0], [0.6, 0.8]])  # clips 0 and 1
    z_v = t([[0.6, 0.8], [0, 1]])
    # audio clip 0, target 0: logits [1/0.5, 0/0.25] = [2, 0]         -> log(1+e^-2)
    # audio clip 1, target 1: logits [0.6/0.5, 0.8/0.25] = [1.2, 3.2] -> log(1+e^-2)
    # video clip 0, target 0: logits [1.2, 3.2]                       -> log(1+e^2)
    # video clip 1, target 1: logits [0, 4]                           -> log(1+e^-4)
    audio = (softplus(-2) + softplus(-2)) / 2
    video = (softplus(2) + softplus(-4)) / 2
    loss = pje_loss(z_a, z_v, [one_level()], torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((audio + video) / 2, abs=1e-6)


def test_pje_averages_granularities():
    z_a = t([[1, 0], [0.6, 0.8]])
    z_v = t([[0.6, 0.8], [0, 1]])
    # second granularity: a single prototype, so every cross-entropy is 0.
    single = protos([[1, 0]], [0.1], [0, 0, 0])
    first = pje_loss(z_a, z_v, [one_level()], torch.tensor([0, 1]))
    both = pje_loss(z_a, z_v, [one_level(), single], torch.tensor([0, 1]))
    assert both.item() == pytest.approx(first.item() / 2, abs=1e-6)


def test_pje_sampled_negatives():
    # 4 prototypes on the unit circle; clip 0 -> prototype 0; r = 1 sampled negative among 1, 2, 3.
    angles = [0, math.pi / 2, math.pi, 3 * math.pi / 2]
    level = protos([[math.cos(a), math.sin(a)] for a in angles], [1, 1, 1, 1], [0])
    z = t([[1, 0]])
    # logits (gamma 1): p0 -> 1, p1 -> 0, p2 -> -1, p3 -> 0. Two columns: CE = log(1+e^(l_neg - 1)).
    possible = {round(softplus(-1), 6), round(softplus(-2), 6)}
    g = torch.Generator().manual_seed(0)
    seen = {round(pje_loss(z, z, [level], torch.tensor([0]), 1, g).item(), 6) for _ in range(20)}
    assert seen <= possible and len(seen) == 2
    # r >= the 3 non-positive prototypes, or r = None: all 4 columns, log(e^1 + e^0 + e^-1 + e^0) - 1
    full = math.log(math.e + 1 + math.exp(-1) + 1) - 1
    assert pje_loss(z, z, [level], torch.tensor([0]), 3, g).item() == pytest.approx(full, abs=1e-6)
    assert pje_loss(z, z, [level], torch.tensor([0]), None).item() == pytest.approx(full, abs=1e-6)


def test_select_prototypes_lists_each_positive_once():
    labels = torch.tensor([3, 1, 3])
    columns, target = select_prototypes(labels, 10, 2, torch.Generator().manual_seed(0))
    assert columns[:2].tolist() == [1, 3] and columns.numel() == 4
    assert len(set(columns.tolist())) == 4 and not {1, 3} & set(columns[2:].tolist())
    assert columns[target].tolist() == [3, 1, 3]


# --- L_PCPE (eq. 3) -----------------------------------------------------------------------


def test_pcpe_hand_value():
    level = protos(
        [[1, 0], [0, 1]], [0.5, 0.5], [0, 1],
        p_a=[[1, 0], [0, 1]],
        p_v=[[0, 1], [1, 0]],
    )
    zd_a = t([[1, 0], [1, 0]])
    zd_v = t([[0, 1], [1, 0]])
    # clip 0, target 0: logits [(1+1)/0.5, (0+0)/0.5] = [4, 0] -> log(1+e^-4)
    # clip 1, target 1: logits [(1+0)/0.5, (0+1)/0.5] = [2, 2] -> log 2
    expected = (softplus(-4) + math.log(2)) / 2
    loss = pcpe_loss(zd_a, zd_v, [level], torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


# --- L_r (eq. 4) --------------------------------------------------------------------------


def test_reconstruction_hand_value_and_masked_only():
    pred = t([[[1, 1], [5, 5], [2, 0]]])  # (B=1, L=3, P=2)
    target = torch.zeros(1, 3, 2)
    mask = torch.tensor([[1, 0, 1]])
    # per-patch MSE: 1, 25, 2; masked patches 0 and 2: (1 + 2) / 2
    assert reconstruction_loss(pred, target, mask).item() == pytest.approx(1.5)
    pred2 = pred.clone()
    pred2[0, 1] = t([-100, 7])  # a visible patch: no effect
    assert reconstruction_loss(pred2, target, mask).item() == pytest.approx(1.5)
    pred3 = pred.clone()
    pred3[0, 2] = t([0, 0])  # a masked patch: the loss drops to (1 + 0) / 2
    assert reconstruction_loss(pred3, target, mask).item() == pytest.approx(0.5)


def test_reconstruction_gradient_only_on_masked_patches():
    pred = torch.ones(2, 4, 3, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    reconstruction_loss(pred, torch.zeros(2, 4, 3), mask).backward()
    assert torch.equal(pred.grad.abs().sum(-1) > 0, mask)


# --- total --------------------------------------------------------------------------------


def test_total_loss_weights_and_logs():
    cfg = LossConfig(w_pje=1.0, w_pcpe=2.0, w_r=0.5, w_infonce=0.0, infonce_temperature=0.1)
    parts = {"pje": torch.tensor(1.0), "pcpe": torch.tensor(3.0), "r": torch.tensor(4.0),
             "infonce": torch.tensor(9.0)}
    total, logged = total_loss(parts, loss_weights(cfg))
    assert total.item() == pytest.approx(1 + 6 + 2)  # infonce has weight 0
    assert logged["infonce"].item() == 9 and logged["total"].item() == pytest.approx(9)
    total, _ = total_loss({"pje": torch.tensor(2.0)}, loss_weights(cfg))  # stage 2: pje only
    assert total.item() == 2
    with pytest.raises(KeyError):
        total_loss({"other": torch.tensor(1.0)}, loss_weights(cfg))


# --- gradients, autocast, optimisation ----------------------------------------------------


def random_level(k=6, d=8, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return Prototypes(
        centroids=c,
        p_a=F.normalize(c + 0.1 * torch.randn(k, d, generator=g), dim=1),
        p_v=F.normalize(c + 0.1 * torch.randn(k, d, generator=g), dim=1),
        gamma=0.05 + 0.1 * torch.rand(k, generator=g),
        assignments=torch.randint(0, k, (n,), generator=g),
        counts=torch.ones(k, dtype=torch.long),
    )


LOSSES = {
    "pje": lambda a, v, lv, idx: pje_loss(a, v, [lv], idx),
    "pcpe": lambda a, v, lv, idx: pcpe_loss(a, v, [lv], idx),
    "infonce": lambda a, v, lv, idx: infonce(a, v, 0.1),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_sgd_steps_lower_the_loss(name):
    level, idx = random_level(), torch.arange(8)
    g = torch.Generator().manual_seed(1)
    raw_a = torch.randn(8, 8, generator=g, requires_grad=True)
    raw_v = torch.randn(8, 8, generator=g, requires_grad=True)
    opt = torch.optim.SGD([raw_a, raw_v], lr=0.5)

    def loss():
        return LOSSES[name](F.normalize(raw_a, dim=1), F.normalize(raw_v, dim=1), level, idx)

    start = loss().item()
    for _ in range(10):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.8 * start


def test_gradients_reach_embeddings_not_prototypes():
    level = random_level()
    for f in ("centroids", "p_a", "p_v", "gamma"):
        getattr(level, f).requires_grad_(True)
    z_a = F.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    z_v = F.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    idx = torch.arange(4)
    (pje_loss(z_a, z_v, [level], idx) + pcpe_loss(z_a, z_v, [level], idx)).backward()
    assert z_a.grad is not None and z_a.grad.abs().sum() > 0 and z_v.grad.abs().sum() > 0
    assert all(getattr(level, f).grad is None for f in ("centroids", "p_a", "p_v", "gamma"))


def test_losses_compute_in_fp32_under_bf16_autocast():
    level, idx = random_level(), torch.arange(8)
    z_a = F.normalize(torch.randn(8, 8), dim=1)
    z_v = F.normalize(torch.randn(8, 8), dim=1)
    pred, target, mask = torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.tensor([[1, 0, 1, 0, 1]] * 2)
    plain = [f(z_a, z_v, level, idx) for f in LOSSES.values()] + [reconstruction_loss(pred, target, mask)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = [f(z_a, z_v, level, idx) for f in LOSSES.values()] + [reconstruction_loss(pred, target, mask)]
        halves = [f(z_a.bfloat16(), z_v.bfloat16(), level, idx) for f in LOSSES.values()]
    for p, a in zip(plain, auto):
        assert a.dtype == torch.float32 and a.item() == pytest.approx(p.item(), rel=1e-6)
    for p, h in zip(plain, halves):  # bf16 inputs: fp32 compute, only the inputs are rounded
        assert h.dtype == torch.float32 and torch.isfinite(h) and h.item() == pytest.approx(p.item(), rel=0.1)
