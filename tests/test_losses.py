"""Losses, rotation labels, the group batch sampler and augmentations, against slow references."""

from __future__ import annotations

import math

import pytest
import torch

from synthgen.train.augment import ContrastiveAugment, random_crop_flip, random_resized_crop, to_unit_float
from synthgen.train.losses import (
    multi_positive_contrastive_loss,
    nt_xent_loss,
    rotate_batch,
    supervised_loss,
)
from synthgen.train.samplers import GroupBatchSampler


# --------------------------------------------------------------------------------------------------
# slow references: python loops straight from the formulas
# --------------------------------------------------------------------------------------------------
def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def slow_multi_positive(features: torch.Tensor, groups: list[int], tau: float) -> float:
    a = [_unit(row) for row in features.double().tolist()]
    n = len(a)
    total, anchors = 0.0, 0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        logits = {j: _dot(a[i], a[j]) / tau for j in others}
        mx = max(logits.values())
        log_z = mx + math.log(sum(math.exp(v - mx) for v in logits.values()))
        pos = [j for j in others if groups[j] == groups[i]]
        if not pos:
            continue
        ce = 0.0
        for j in others:
            p_ij = (1.0 / len(pos)) if groups[j] == groups[i] else 0.0
            ce -= p_ij * (logits[j] - log_z)
        total += ce
        anchors += 1
    return total / n  # the authors' MultiPosConLoss: the mean over ALL anchors (no positive: 0)


def slow_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    # SimCLR, Algorithm 1: l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t); L = mean over 2N
    z = [_unit(row) for row in z1.double().tolist()] + [_unit(row) for row in z2.double().tolist()]
    n = z1.shape[0]

    def l(i: int, j: int) -> float:
        denom = sum(math.exp(_dot(z[i], z[k]) / tau) for k in range(2 * n) if k != i)
        return -math.log(math.exp(_dot(z[i], z[j]) / tau) / denom)

    return sum(l(k, k + n) + l(k + n, k) for k in range(n)) / (2 * n)


# --------------------------------------------------------------------------------------------------
# StableRep multi-positive loss
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "group_sizes",
    [
        [2, 2, 2, 2],  # equal pairs
        [6, 6, 6],  # StableRep's m = 6
        [3, 1, 5, 2],  # unequal, one singleton (no positive: 0, still counted in the mean)
        [4, 7, 2, 2, 3],
    ],
)
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_multi_positive_matches_slow_formula(group_sizes, tau):
    gen = torch.Generator().manual_seed(sum(group_sizes) + int(tau * 10))
    groups = [g for g, size in enumerate(group_sizes) for _ in range(size)]
    perm = torch.randperm(len(groups), generator=gen).tolist()
    groups = [groups[p] * 3 + 11 for p in perm]  # shuffled, non-contiguous ids
    feats = torch.randn(len(groups), 16, generator=gen)
    got = multi_positive_contrastive_loss(feats, torch.tensor(groups), temperature=tau).item()
    want = slow_multi_positive(feats, groups, tau)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_multi_positive_scale_invariant_and_default_temperature():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(12, 8, generator=gen)
    groups = torch.arange(4).repeat_interleave(3)
    default = multi_positive_contrastive_loss(feats, groups)
    assert default.item() == pytest.approx(slow_multi_positive(feats, groups.tolist(), 0.1), rel=1e-4)
    # features are L2-normalised: scaling rows changes nothing
    scaled = multi_positive_contrastive_loss(feats * torch.rand(12, 1, generator=gen).add(0.5) * 7, groups)
    assert scaled.item() == pytest.approx(default.item(), rel=1e-5)


def test_multi_positive_reduces_to_nt_xent_with_two_views():
    gen = torch.Generator().manual_seed(7)
    n, tau = 6, 0.2
    z1, z2 = torch.randn(n, 10, generator=gen), torch.randn(n, 10, generator=gen)
    feats = torch.cat([z1, z2])
    groups = torch.cat([torch.arange(n), torch.arange(n)])
    mp = multi_positive_contrastive_loss(feats, groups, temperature=tau).item()
    assert mp == pytest.approx(slow_nt_xent(z1, z2, tau), rel=1e-4)
    assert mp == pytest.approx(nt_xent_loss(z1, z2, temperature=tau).item(), rel=1e-5)


def test_multi_positive_gradient_and_no_positive_batch():
    feats = torch.randn(8, 4, requires_grad=True)
    loss = multi_positive_contrastive_loss(feats, torch.arange(4).repeat(2))
    loss.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    zero = multi_positive_contrastive_loss(torch.randn(5, 4, requires_grad=True), torch.arange(5))
    # a singleton anchor counts in the mean with 0: 5 anchors, the pair's two losses over 5
    feats = torch.randn(5, 4, dtype=torch.float64)
    pair_only = multi_positive_contrastive_loss(feats, torch.tensor([0, 0, 1, 2, 3]))
    assert pair_only.item() == pytest.approx(slow_multi_positive(feats, [0, 0, 1, 2, 3], 0.1), rel=1e-12)
    assert zero.item() == 0.0 and zero.requires_grad
    # perfectly clustered features give a lower loss than random ones
    centers = torch.eye(4) * 10
    clustered = centers.repeat_interleave(3, dim=0) + 0.01 * torch.randn(12, 4)
    groups = torch.arange(4).repeat_interleave(3)
    assert multi_positive_contrastive_loss(clustered, groups) < multi_positive_contrastive_loss(
        torch.randn(12, 4), groups
    )


# --------------------------------------------------------------------------------------------------
# SimCLR NT-Xent
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,tau", [(1, 0.5), (4, 0.5), (9, 0.07)])
def test_nt_xent_matches_slow_reference(n, tau):
    gen = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, 5, generator=gen), torch.randn(n, 5, generator=gen)
    assert nt_xent_loss(z1, z2, temperature=tau).item() == pytest.approx(slow_nt_xent(z1, z2, tau), rel=1e-4)


def test_nt_xent_identical_views_lower_than_random():
    z = torch.randn(16, 8)
    assert nt_xent_loss(z, z) < nt_xent_loss(z, torch.randn(16, 8))


def test_supervised_loss_label_smoothing():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    labels = torch.tensor([0])
    plain = supervised_loss(logits, labels).item()
    smooth = supervised_loss(logits, labels, label_smoothing=0.1).item()
    log_p = torch.log_softmax(logits, 1)[0]
    want = -(0.9 + 0.1 / 3) * log_p[0] - (0.1 / 3) * (log_p[1] + log_p[2])
    assert smooth == pytest.approx(want.item(), rel=1e-5)
    assert smooth > plain


# --------------------------------------------------------------------------------------------------
# rotation prediction
# --------------------------------------------------------------------------------------------------
def test_rotation_labels_for_all_four_angles():
    s = 5
    # every pixel distinct -> asymmetric under every rotation and flip
    base = torch.arange(2 * 3 * s * s, dtype=torch.float32).view(2, 3, s, s)
    base[1] = base[1] * -1 + 1000  # a second, different image
    x4, y4 = rotate_batch(base)
    assert x4.shape == (8, 3, s, s)
    assert y4.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    formulas = {
        0: lambda x, i, j: x[..., i, j],
        1: lambda x, i, j: x[..., j, s - 1 - i],  # 90 deg counter-clockwise
        2: lambda x, i, j: x[..., s - 1 - i, s - 1 - j],
        3: lambda x, i, j: x[..., s - 1 - j, i],  # 270 deg ccw = 90 deg clockwise
    }
    for idx in range(8):
        k, img = y4[idx].item(), idx % 2
        rotated, orig = x4[idx], base[img]
        assert torch.equal(rotated, torch.rot90(orig, k, dims=(-2, -1)))
        for i in range(s):
            for j in range(s):
                assert torch.equal(rotated[:, i, j], formulas[k](orig, i, j)), (k, i, j)
        # the four copies are pairwise different (so the label is recoverable from the pixels)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(x4[2 * a], x4[2 * b])
    # counter-clockwise: after 90 deg the top-right corner sits at the top-left
    assert torch.equal(x4[2][:, 0, 0], base[0][:, 0, s - 1])


def test_rotation_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.zeros(1, 3, 4, 5))


# --------------------------------------------------------------------------------------------------
# GroupBatchSampler
# --------------------------------------------------------------------------------------------------
def _groups_of(sizes: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.tensor([gid for gid, size in enumerate(sizes) for _ in range(size)])
    return g[torch.randperm(len(g), generator=torch.Generator().manual_seed(seed))]


def test_group_batch_sampler_m_per_group_and_coverage():
    groups = _groups_of([10] * 12)  # StableRep: 10 images per caption, 6 per batch
    sampler = GroupBatchSampler(groups, groups_per_batch=4, images_per_group=6, seed=1)
    assert len(sampler) == 3 and sampler.batch_size == 24
    batches = list(sampler)
    assert len(batches) == 3
    seen_groups = []
    for batch in batches:
        assert len(batch) == 24 and len(set(batch)) == 24  # no image twice in a batch
        counts = torch.bincount(groups[batch], minlength=12)
        assert sorted(c for c in counts.tolist() if c) == [6] * 4
        seen_groups += [g for g, c in enumerate(counts.tolist()) if c]
    assert sorted(seen_groups) == list(range(12))  # every caption once per epoch
    # deterministic per (seed, epoch); another epoch or seed gives another order
    assert list(GroupBatchSampler(groups, 4, 6, seed=1)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches
    assert list(GroupBatchSampler(groups, 4, 6, seed=2)) != batches


def test_group_batch_sampler_covers_all_images_when_m_equals_group_size():
    groups = _groups_of([3] * 7, seed=4)
    sampler = GroupBatchSampler(groups, groups_per_batch=2, images_per_group=3, drop_last=False, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4 and [len(b) for b in batches] == [6, 6, 6, 3]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(21))
    assert len(list(GroupBatchSampler(groups, 2, 3, drop_last=True))) == 3


def test_group_batch_sampler_short_groups():
    groups = _groups_of([6, 2, 6, 5, 6])
    skip = GroupBatchSampler(groups, groups_per_batch=1, images_per_group=6, short_groups="skip")
    assert skip.num_groups == 3 and skip.skipped_groups == 2
    assert {int(groups[b[0]]) for b in skip} == {0, 2, 4}
    rep = GroupBatchSampler(groups, groups_per_batch=5, images_per_group=6, short_groups="replace")
    (batch,) = list(rep)
    counts = torch.bincount(groups[batch], minlength=5)
    assert counts.tolist() == [6, 6, 6, 6, 6]
    # a short group's images all appear (topped up with repeats)
    short = [i for i in batch if groups[i] == 1]
    assert set(short) == set(torch.nonzero(groups == 1).flatten().tolist())
    with pytest.raises(ValueError, match="no group has 6"):
        GroupBatchSampler(torch.tensor([0, 0, 1]), 1, 6)


# --------------------------------------------------------------------------------------------------
# augmentations
# --------------------------------------------------------------------------------------------------
def test_augment_per_sample_and_reproducible():
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(8, 1, 1, 1)
    aug = ContrastiveAugment(size=24, blur_p=0.5)
    a = aug(img, torch.Generator().manual_seed(0))
    b = aug(img, torch.Generator().manual_seed(0))
    assert a.shape == (8, 3, 24, 24) and torch.equal(a, b)
    # same input image, different views per sample
    assert not torch.allclose(a[0], a[1])
    x = to_unit_float(img)
    assert torch.allclose(random_resized_crop(x, 32, scale=(1, 1), ratio=(1, 1), flip_p=0), x, atol=1e-6)
    assert torch.allclose(random_resized_crop(x, 32, scale=(1, 1), ratio=(1, 1), flip_p=1), x.flip(-1), atol=1e-6)
    assert torch.equal(random_crop_flip(x, padding=0, flip_p=0), x)
    shifted = random_crop_flip(x, padding=4, flip_p=0, generator=torch.Generator().manual_seed(1))
    assert shifted.shape == x.shape


def test_multi_positive_computes_in_the_input_dtype():
    """As the authors' loss: float64 in, float64 out (exact to 1e-12); bf16 in, bf16 out."""
    gen = torch.Generator().manual_seed(11)
    groups = [g for g in range(4) for _ in range(3)]
    feats = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    got = multi_positive_contrastive_loss(feats, torch.tensor(groups))
    assert got.dtype == torch.float64 and got.item() == pytest.approx(slow_multi_positive(feats, groups, 0.1), rel=1e-12)
    low = multi_positive_contrastive_loss(feats.to(torch.bfloat16), torch.tensor(groups))
    assert low.dtype == torch.bfloat16 and torch.isfinite(low)
    assert low.item() == pytest.approx(got.item(), rel=0.05)
