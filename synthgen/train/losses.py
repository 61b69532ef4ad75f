"""Training objectives: supervised cross-entropy, 4-way rotation, SimCLR NT-Xent, StableRep multi-positive.

All losses take float features/logits and return a scalar tensor. The contrastive losses
L2-normalise their inputs and exclude each sample from its own softmax (the "self" logit); NT-Xent
computes in float32, the multi-positive loss in its input's dtype (as StableRep's code does).

* :func:`rotate_batch` — Mormille & Atsumi's pretext task (after Gidaris et al.): every image is
  rotated by 0, 90, 180 and 270 degrees and the network predicts which.
* :func:`nt_xent_loss` — SimCLR (Chen et al. 2020): two views per image, each view's positive is the
  other view, the remaining ``2n - 2`` samples are negatives.
* :func:`multi_positive_contrastive_loss` — StableRep (Tian et al. 2023): all images generated from
  the same caption (same ``group`` id) are positives of each other; the target distribution spreads
  its mass evenly over them. With exactly two images per group it equals NT-Xent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "ROTATION_ANGLES",
    "rotate_batch",
    "rotation_loss",
    "supervised_loss",
    "nt_xent_loss",
    "multi_positive_contrastive_loss",
]

#: Angle in degrees, counter-clockwise, of rotation label ``k`` (index into this tuple).
ROTATION_ANGLES = (0, 90, 180, 270)


def rotate_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Four rotated copies of each image and their rotation labels.

    ``images`` is ``[N, C, H, W]`` (any dtype; square images, else the rotated copies cannot be
    stacked). Returns ``(x4, y4)`` with ``x4`` of shape ``[4N, C, H, W]`` laid out angle-major:
    ``x4[k*N + i] = torch.rot90(images[i], k, dims=(-2, -1))`` and ``y4[k*N + i] = k``.

    Direction: ``torch.rot90(x, k, dims=(-2, -1))`` turns the image ``k * 90`` degrees
    **counter-clockwise** as displayed (row 0 at the top): the top-right pixel moves to the top-left.
    Index formulas, with ``H = W = S``:

    * k=0: ``out[i, j] = x[i, j]``
    * k=1 (90 deg CCW):  ``out[i, j] = x[j, S-1-i]``
    * k=2 (180 deg):     ``out[i, j] = x[S-1-i, S-1-j]``
    * k=3 (270 deg CCW = 90 deg CW): ``out[i, j] = x[S-1-j, i]``
    """
    if images.ndim != 4:
        raise ValueError(f"rotate_batch expects [N, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotate_batch needs square images, got {images.shape[-2]}x{images.shape[-1]}")
    n = images.shape[0]
    x4 = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)], dim=0)
    y4 = torch.arange(4, device=images.device).repeat_interleave(n)
    return x4.contiguous(), y4


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 4-way rotation classifier (``logits`` ``[4N, 4]``)."""
    return F.cross_entropy(logits.float(), labels)


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with optional label smoothing (Szegedy et al.; 0.1 in Lomurno et al.)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def _self_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(n, dtype=torch.bool, device=device)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent loss for two views ``z1[i]``, ``z2[i]`` (``[n, d]`` each) of image ``i``.

    The ``2n`` embeddings are L2-normalised; for anchor ``a`` the logits are ``cos(a, b) / t`` over
    all ``b != a`` and the target is the other view of the same image. Returns the mean over all
    ``2n`` anchors.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent_loss expects two [n, d] tensors of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0).float(), dim=1)
    logits = (z @ z.t()) / temperature
    logits = logits.masked_fill(_self_mask(2 * n, z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n, device=z.device), torch.arange(0, n, device=z.device)])
    return F.cross_entropy(logits, targets)


def multi_positive_contrastive_loss(
    features: torch.Tensor, groups: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """StableRep's multi-positive contrastive loss (Tian et al. 2023, eq. 2-3), as the authors'
    ``MultiPosConLoss`` computes it.

    ``features`` ``[n, d]`` are L2-normalised to ``a_i``; ``groups`` ``[n]`` holds each image's caption
    id. For anchor ``i`` the logits are ``a_i . a_j / temperature`` over ``j != i`` (self excluded),
    the target distribution is ``p_ij = 1[g_i = g_j, j != i] / max(1, sum_k 1[g_i = g_k, k != i])``
    and the loss is the cross-entropy ``-sum_j p_ij log softmax(logits_i)_j`` averaged over ALL ``n``
    anchors: an anchor without a positive contributes 0 to the sum and still counts in the mean
    (as in the authors' code). Computed in the dtype of ``features`` (bf16 under autocast, as
    theirs); a batch without any positive pair returns a zero that still carries a gradient graph.
    """
    if features.ndim != 2 or groups.ndim != 1 or groups.shape[0] != features.shape[0]:
        raise ValueError(
            f"expected features [n, d] and groups [n], got {tuple(features.shape)} and {tuple(groups.shape)}"
        )
    n = features.shape[0]
    a = F.normalize(features, dim=1)
    self_mask = _self_mask(n, a.device)
    logits = (a @ a.t()) / temperature
    log_prob = F.log_softmax(logits.masked_fill(self_mask, torch.finfo(logits.dtype).min), dim=1)
    log_prob = log_prob.masked_fill(self_mask, 0.0)  # p is 0 there: keep 0 * log p finite
    groups = groups.to(a.device)
    positives = (groups[:, None] == groups[None, :]) & ~self_mask
    p = positives.to(logits.dtype) / positives.sum(dim=1, keepdim=True).clamp(min=1).to(logits.dtype)
    return -(p * log_prob).sum(dim=1).mean()
