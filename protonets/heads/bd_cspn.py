"""BD-CSPN head (Liu et al. 2020, prototype rectification): the query set is shifted onto the
support set's mean (cross-set bias), then each prototype becomes a weighted mean of its support
examples and of the queries pseudo-labelled with its class (intra-set bias)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .prototype import FEATURE_TRANSFORMS, compute_prototypes, transform_episode
from .transductive import TransductiveHead, one_hot


def cosine(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarities `[E, M, N]` of `[E, M, D]` and `[E, N, D]`."""
    return F.normalize(x, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(-1, -2)


def rectify(
    support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rectified prototypes `[E, N, D]`, shifted queries `[E, Q, D]`) of a batch of episodes.

    Members of class n: its support examples and the queries whose nearest prototype (cosine)
    is n; their weights are softmax(scale · cos(x, p_n)) over the members.
    """
    query = query + (support.mean(-2, keepdim=True) - query.mean(-2, keepdim=True))
    prototypes = compute_prototypes(support, labels, n_way)
    x = torch.cat([support, query], -2)  # [E, S+Q, D]
    sim = scale * cosine(x, prototypes)  # [E, S+Q, N]
    pseudo = sim[:, support.shape[-2] :].argmax(-1)
    member = one_hot(torch.cat([labels, pseudo], -1), n_way, torch.bool)
    weights = sim.masked_fill(~member, float("-inf")).softmax(-2)  # each class has its support
    return weights.transpose(-1, -2) @ x, query


class BDCSPNHead(TransductiveHead):
    """Prototype rectification; logits are scale × cosine to the rectified prototypes.

    scale: the paper's ε in the member weights exp(ε·cos) and the logit scale (easyfsl: 1).
    feature_transform: None, 'l2n' or 'cl2n' (centre on the support mean, then L2).
    """

    def __init__(self, scale: float = 10.0, feature_transform: str | None = None) -> None:
        super().__init__()
        if feature_transform not in FEATURE_TRANSFORMS:
            raise ValueError(
                f"feature_transform must be one of {FEATURE_TRANSFORMS}, got '{feature_transform}'"
            )
        if not float(scale) > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale, self.feature_transform = float(scale), feature_transform

    def hyperparameters(self) -> dict[str, Any]:
        return {"scale": self.scale, "feature_transform": self.feature_transform}

    def transduce(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        s, q = transform_episode(support, query, self.feature_transform)
        prototypes, q = rectify(s, labels, q, n_way, self.scale)
        return self.scale * cosine(q, prototypes)
