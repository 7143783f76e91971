"""Tests of dtop.engine.losses: (sub-center) ArcFace and the cirtorch contrastive loss."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dtop.engine.losses import (
    ArcFaceLoss,
    ContrastiveLoss,
    arcface_logits,
    build_loss,
    contrastive_loss,
    tuple_pairs,
)
from dtop.errors import ConfigError, DataError


def reference_arcface(x, w, labels, margin, scale, subcenters=1):
    """ArcFace the long way, in float64 numpy with explicit angles: (logits, mean cross-entropy)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    n_classes = w.shape[0] // subcenters
    logits = np.zeros((x.shape[0], n_classes))
    losses = []
    for i in range(x.shape[0]):
        for j in range(n_classes):
            cos = max(float(x[i] @ w[j * subcenters + k]) for k in range(subcenters))
            theta = math.acos(min(1.0, max(-1.0, cos)))
            if j == labels[i]:
                if theta + margin < math.pi:
                    value = math.cos(theta + margin)
                else:  # the threshold variant beyond θ + m = π
                    value = math.cos(theta) - margin * math.sin(margin)
            else:
                value = math.cos(theta)
            logits[i, j] = scale * value
        row = logits[i]
        losses.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[labels[i]])
    return logits, float(np.mean(losses))


def toy(batch=16, dim=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    return x, y


@pytest.mark.parametrize("margin,scale", [(0.3, 30.0), (0.5, 64.0), (1.2, 10.0)])
def test_arcface_matches_reference(margin, scale):
    x, y = toy()
    loss = ArcFaceLoss(8, 5, margin=margin, scale=scale)
    ref_logits, ref_loss = reference_arcface(x, loss.weight.detach(), y.tolist(), margin, scale)
    logits = arcface_logits(x, loss.weight, y, margin, scale)
    assert logits.dtype == torch.float32
    np.testing.assert_allclose(logits.detach().numpy(), ref_logits, rtol=1e-5, atol=1e-4)
    assert float(loss(x, y).detach()) == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)


def test_arcface_threshold_branch_matches_reference():
    # embeddings opposite to their class centre: θ ≈ π, so θ + m > π for every sample
    torch.manual_seed(1)
    loss = ArcFaceLoss(4, 3, margin=0.5, scale=10.0)
    y = torch.tensor([0, 1, 2, 0])
    x = -loss.weight.detach()[y] + 0.05 * torch.randn(4, 4)
    ref_logits, ref_loss = reference_arcface(x, loss.weight.detach(), y.tolist(), 0.5, 10.0)
    cos = F.normalize(x, dim=1) @ F.normalize(loss.weight.detach(), dim=1).T
    assert (cos[torch.arange(4), y] < math.cos(math.pi - 0.5)).all()
    np.testing.assert_allclose(loss.logits(x, y).detach().numpy(), ref_logits, rtol=1e-5, atol=1e-4)
    assert float(loss(x, y).detach()) == pytest.approx(ref_loss, rel=1e-5)


def test_margin_zero_is_normalised_softmax():
    x, y = toy(seed=2)
    loss = ArcFaceLoss(8, 5, margin=0.0, scale=30.0)
    plain = F.cross_entropy(30.0 * F.normalize(x, dim=1) @ F.normalize(loss.weight, dim=1).T, y)
    torch.testing.assert_close(loss(x, y), plain, rtol=1e-5, atol=1e-5)
    # without labels: the scaled cosines, no margin
    torch.testing.assert_close(loss.logits(x), 30.0 * F.normalize(x, dim=1) @ F.normalize(loss.weight, dim=1).T)


def test_subcenter_k1_equals_plain_and_k3_matches_reference():
    x, y = toy(seed=3)
    plain = ArcFaceLoss(8, 5, subcenters=1)
    sub1 = build_loss("subcenter-arcface", embedding_dim=8, num_classes=5, subcenters=1)
    sub1.weight.data.copy_(plain.weight.data)
    torch.testing.assert_close(sub1(x, y), plain(x, y))

    sub3 = ArcFaceLoss(8, 5, margin=0.3, scale=30.0, subcenters=3)
    assert sub3.weight.shape == (15, 8)
    ref_logits, ref_loss = reference_arcface(x, sub3.weight.detach(), y.tolist(), 0.3, 30.0, subcenters=3)
    np.testing.assert_allclose(sub3.logits(x, y).detach().numpy(), ref_logits, rtol=1e-5, atol=1e-4)
    assert float(sub3(x, y).detach()) == pytest.approx(ref_loss, rel=1e-5)


def test_gradients_reach_embeddings_and_weights():
    x, y = toy(seed=4)
    x.requires_grad_(True)
    loss = ArcFaceLoss(8, 5, subcenters=2)
    loss(x, y).backward()
    for grad in (x.grad, loss.weight.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradient_finite_at_zero_angle():
    loss = ArcFaceLoss(4, 3)
    y = torch.tensor([0, 1])
    x = loss.weight.detach()[y].clone().requires_grad_(True)  # exactly on the class centres: θ = 0
    value = loss(x, y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all() and torch.isfinite(loss.weight.grad).all()


def test_separated_set_has_lower_loss_than_random():
    torch.manual_seed(5)
    loss = ArcFaceLoss(16, 4)
    y = torch.arange(4).repeat(8)
    separated = loss.weight.detach()[y] + 0.01 * torch.randn(32, 16)
    random = torch.randn(32, 16)
    assert float(loss(separated, y).detach()) < 0.1 < float(loss(random, y).detach())


def test_loss_falls_on_toy_problem():
    torch.manual_seed(6)
    centres = F.normalize(torch.randn(6, 10), dim=1)
    y = torch.arange(6).repeat(10)
    data = centres[y] + 0.3 * torch.randn(60, 10)
    net = torch.nn.Linear(10, 8)
    loss = ArcFaceLoss(8, 6, subcenters=2)
    opt = torch.optim.Adam([*net.parameters(), *loss.parameters()], lr=0.05)
    values = []
    for _ in range(30):
        opt.zero_grad()
        value = loss(F.normalize(net(data), dim=1), y)
        value.backward()
        opt.step()
        values.append(float(value.detach()))
    assert values[-1] < 0.5 * values[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_half_inputs_compute_in_float32(dtype):
    x, y = toy(seed=7)
    loss = ArcFaceLoss(8, 5)
    expected = loss(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(x.to(dtype), y)
    assert value.dtype == torch.float32
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=0.02)


def test_repr_and_validation():
    loss = ArcFaceLoss(512, 1000, margin=0.3, scale=30.0, subcenters=3)
    text = repr(loss)
    for part in ("embedding_dim=512", "num_classes=1000", "subcenters=3", "margin=0.3", "scale=30.0", "threshold"):
        assert part in text
    with pytest.raises(ConfigError):
        ArcFaceLoss(8, 5, margin=-0.1)
    with pytest.raises(ConfigError):
        ArcFaceLoss(8, 5, scale=0)
    with pytest.raises(ConfigError):
        ArcFaceLoss(8, 5, subcenters=0)
    with pytest.raises(DataError, match="class indices"):
        ArcFaceLoss(8, 5)(torch.randn(2, 8), torch.tensor([0, 5]))
    with pytest.raises(DataError):
        ArcFaceLoss(8, 5)(torch.randn(2, 7), torch.tensor([0, 1]))


def test_build_loss():
    arc = build_loss("arcface", embedding_dim=8, num_classes=5, margin=0.2, scale=16.0, subcenters=1)
    assert isinstance(arc, ArcFaceLoss) and arc.subcenters == 1 and arc.margin == 0.2
    sub = build_loss("subcenter-arcface", embedding_dim=8, num_classes=5)
    assert sub.subcenters == 3
    con = build_loss("contrastive", embedding_dim=8, num_classes=5, margin=0.8)
    assert isinstance(con, ContrastiveLoss) and con.margin == 0.8
    with pytest.raises(ConfigError, match="unknown loss"):
        build_loss("triplet")
    with pytest.raises(ConfigError, match="subcenter-arcface"):
        build_loss("arcface", embedding_dim=8, num_classes=5, subcenters=3)
    with pytest.raises(ConfigError, match="num_classes"):
        build_loss("arcface", embedding_dim=8)
    with pytest.raises(ConfigError, match="no option"):
        build_loss("arcface", embedding_dim=8, num_classes=5, gamma=1)


def test_contrastive_hand_worked():
    anchors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    others = torch.tensor([[0.0, 1.0], [0.6, 0.8], [0.96, 0.28], [1.0, 0.0]])
    targets = torch.tensor([1, 0, 0, 1])
    # d = √2 (pos: 0.5·2 = 1), √0.8 > 0.7 (neg: 0), √0.08 (neg: 0.5·(0.7 − √0.08)²), 0 (pos: 0)
    per_pair = [1.0, 0.0, 0.5 * (0.7 - math.sqrt(0.08)) ** 2, 0.0]
    values = contrastive_loss(anchors, others, targets, margin=0.7, reduction="none")
    np.testing.assert_allclose(values.numpy(), per_pair, atol=1e-5)
    assert float(contrastive_loss(anchors, others, targets)) == pytest.approx(sum(per_pair), abs=1e-5)
    assert float(ContrastiveLoss(reduction="mean")(anchors, others, targets)) == pytest.approx(
        sum(per_pair) / 4, abs=1e-5
    )
    # inputs are L2-normalised inside: scaling changes nothing
    assert float(contrastive_loss(3 * anchors, 0.5 * others, targets)) == pytest.approx(sum(per_pair), abs=1e-5)


def test_contrastive_tuples_and_gradient():
    torch.manual_seed(8)
    desc = F.normalize(torch.randn(2 * 7, 16), dim=1).requires_grad_(True)  # 2 tuples of (q, p, n1..n5)
    anchors, others, targets = tuple_pairs(desc, 7)
    assert anchors.shape == others.shape == (12, 16)
    assert targets.tolist() == [1, 0, 0, 0, 0, 0] * 2
    torch.testing.assert_close(anchors[:6], desc[0].expand(6, -1))
    torch.testing.assert_close(others[6:], desc[8:14])
    loss = ContrastiveLoss()
    value = loss.tuple_loss(desc, 7)
    torch.testing.assert_close(value, loss(anchors, others, targets))
    value.backward()
    assert torch.isfinite(desc.grad).all() and desc.grad.abs().sum() > 0
    # identical vectors: finite gradient (cirtorch's eps)
    same = torch.ones(1, 4, requires_grad=True)
    contrastive_loss(same, same.detach().clone(), torch.tensor([0])).backward()
    assert torch.isfinite(same.grad).all()
    assert "margin=0.7" in repr(loss)
    with pytest.raises(DataError):
        tuple_pairs(desc, 5)
