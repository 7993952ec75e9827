"""Pairs and their losses: balanced positive/negative pairs, hard-negative mining, BCE or contrastive.

A batch holds P classes × K images. Every same-class pair is a positive; as many negatives are
drawn, a fraction `hard_fraction` of them the highest-scoring (hardest) different-class pairs,
the rest at random. Also the affine augmentation of Koch et al. for training on images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("bce", "contrastive")


def sample_pairs(
    labels: torch.Tensor,
    scores: torch.Tensor | None,
    generator: torch.Generator,
    hard_fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced pairs within a batch: (rows i, cols j, same) with i < j.

    labels: `[B]`; scores: `[B, B]` current logits (for hard-negative mining; None: random only).
    All positives are kept; the same number of negatives is drawn, `hard_fraction` hardest first.
    """
    b = labels.shape[0]
    i, j = torch.triu_indices(b, b, offset=1)
    same = labels[i] == labels[j]
    pos = torch.nonzero(same).flatten()
    neg = torch.nonzero(~same).flatten()
    want = min(len(neg), max(len(pos), 1))
    n_hard = int(round(hard_fraction * want)) if scores is not None else 0
    picked = []
    if n_hard:
        hardest = scores[i[neg], j[neg]].detach().cpu().topk(n_hard).indices
        picked.append(neg[hardest])
        keep = torch.ones(len(neg), dtype=torch.bool)
        keep[hardest] = False
        neg = neg[keep]
    n_rand = want - n_hard
    if n_rand:
        picked.append(neg[torch.randperm(len(neg), generator=generator)[:n_rand]])
    chosen = torch.cat([pos, *picked])
    return i[chosen], j[chosen], same[chosen]


def pair_loss(
    logits: torch.Tensor,
    same: torch.Tensor,
    kind: str = "bce",
    distances: torch.Tensor | None = None,
    margin: float = 1.0,
) -> torch.Tensor:
    """Binary cross-entropy on the head's logits (Koch); 'contrastive' adds Hadsell et al.'s loss
    on the embedding distances `distances` (margin `margin`), which then shapes the encoder.
    """
    target = same.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    if kind == "bce":
        return bce
    if kind != "contrastive":
        raise ValueError(f"loss must be one of {LOSSES}, got '{kind}'")
    if distances is None:
        raise ValueError("the contrastive loss needs the pair distances")
    contrastive = target * distances.pow(2) + (1 - target) * F.relu(margin - distances).pow(2)
    return bce + contrastive.mean()


def affine_augment(
    batch: torch.Tensor,
    generator: torch.Generator,
    rotate: float = 10.0,
    shear: float = 0.3,
    scale: tuple[float, float] = (0.8, 1.2),
    translate: float = 2 / 28,
) -> torch.Tensor:
    """Random affine distortions per image (Koch et al.): rotation (degrees), shear, scale and
    translation (a fraction of the side); out-of-image pixels are 0 (the background)."""
    n = batch.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    theta = uniform(-rotate, rotate) * math.pi / 180
    sx, sy = uniform(-shear, shear), uniform(-shear, shear)
    zx, zy = uniform(*scale), uniform(*scale)
    tx, ty = uniform(-2 * translate, 2 * translate), uniform(-2 * translate, 2 * translate)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shr = torch.stack([torch.stack([torch.ones(n), sx], -1), torch.stack([sy, torch.ones(n)], -1)], -2)
    zoom = torch.diag_embed(torch.stack([1 / zx, 1 / zy], -1))
    matrix = torch.cat([rot @ shr @ zoom, torch.stack([tx, ty], -1).unsqueeze(-1)], -1)
    grid = F.affine_grid(matrix.to(batch), list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, padding_mode="zeros", align_corners=False)
