"""LaplacianShot head (Ziko et al. 2020): query assignments that stay close to the rectified
prototypes and agree with their k nearest query neighbours (a Laplacian term), solved by
bound updates."""

from __future__ import annotations

from typing import Any

import torch

from .bd_cspn import rectify
from .prototype import FEATURE_TRANSFORMS, transform_episode
from .transductive import TransductiveHead, class_softmax


def knn_graph(x: torch.Tensor, k: int) -> torch.Tensor:
    """Affinities `[E, Q, Q]`: W[i, j] = 1 if j is among the k nearest neighbours of i (not i)."""
    # neighbours of i ranked by ‖x_j‖² − 2 x_i·x_j: ‖x_i − x_j‖² less ‖x_i‖², which a row shares
    rank = (x @ x.transpose(-1, -2)).mul_(-2).add_(x.pow(2).sum(-1).unsqueeze(-2))
    rank.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    near = rank.topk(min(k, x.shape[-2] - 1), dim=-1, largest=False).indices
    return torch.zeros_like(rank).scatter_(-1, near, 1.0)


class LaplacianShotHead(TransductiveHead):
    """Minimises Σ_q a_q·y_q − λ Σ_{q,q'} W_qq' y_q·y_q' + Σ_q y_q log y_q by bound updates,
    a_q = squared distances to the BD-CSPN rectified prototypes; logits are the last update's
    (their softmax is the assignment).

    knn: neighbours per query in the graph; lam: weight λ of the Laplacian term;
    steps: at most this many bound updates (an episode stops when its bound is still);
    feature_transform: 'cl2n' as in the paper (centre on the support mean, then L2), or None;
    scale: ε of the rectification (see BD-CSPN).
    Defaults: easyfsl's / the paper's 5-way settings (knn 3, λ 0.7, 20 steps).
    """

    def __init__(
        self,
        knn: int = 3,
        lam: float = 0.7,
        steps: int = 20,
        feature_transform: str | None = "cl2n",
        scale: float = 10.0,
    ) -> None:
        super().__init__()
        if int(knn) < 1:
            raise ValueError(f"knn must be at least 1, got {knn}")
        if not float(lam) >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if int(steps) < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if feature_transform not in FEATURE_TRANSFORMS:
            raise ValueError(
                f"feature_transform must be one of {FEATURE_TRANSFORMS}, got '{feature_transform}'"
            )
        self.knn, self.lam, self.steps = int(knn), float(lam), int(steps)
        self.feature_transform, self.scale = feature_transform, float(scale)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "knn": self.knn,
            "lam": self.lam,
            "steps": self.steps,
            "feature_transform": self.feature_transform,
            "scale": self.scale,
        }

    def transduce(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        s, q = transform_episode(support, query, self.feature_transform)
        prototypes, queries = rectify(s, labels, q, n_way, self.scale)
        a = queries.squared_distances(prototypes)  # [E, Q, N]
        kernel = knn_graph(q, self.knn)  # the shift moves every query alike: same neighbours
        logits = -a
        neighbours_y = kernel @ class_softmax(logits)  # Σ of the neighbours' assignments
        old = torch.full(a.shape[:1], float("inf"), dtype=a.dtype, device=a.device)
        active = torch.ones(a.shape[:1], dtype=torch.bool, device=a.device)
        for i in range(self.steps):
            new_logits = self.lam * neighbours_y - a
            new_y = class_softmax(new_logits)
            neighbours_y = kernel @ new_y  # the bound's, and the next update's
            bound = (new_y * (torch.log(new_y + 1e-12) + a - self.lam * neighbours_y)).sum((1, 2))
            keep = active.view(-1, 1, 1)  # stopped episodes keep their last update
            logits = torch.where(keep, new_logits, logits)
            still = (bound - old).abs() <= 1e-6 * old.abs()
            if i > 1:
                active = active & ~still
            old = torch.where(active, bound, old)
            if not active.any():
                break
        return logits
