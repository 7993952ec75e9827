"""BD-CSPN head (Liu et al. 2020, prototype rectification): the query set is shifted onto the
support set's mean (cross-set bias), then each prototype becomes a weighted mean of its support
examples and of the queries pseudo-labelled with its class (intra-set bias)."""

from __future__ import annotations

from typing import Any

import torch

from .prototype import FEATURE_TRANSFORMS, compute_prototypes, squared_distances_from, transform_episode
from .transductive import TransductiveHead, one_hot


class ShiftedQueries:
    """Queries moved by one vector per episode, q + shift (`[E, Q, D]`, `[E, 1, D]`), never
    written out: products, norms and weighted sums come from q itself, one pass over q each."""

    def __init__(self, query: torch.Tensor, shift: torch.Tensor) -> None:
        self.query, self.shift = query, shift
        moved = (query @ shift.transpose(-1, -2)).squeeze(-1)  # q·shift, [E, Q]
        squared = torch.linalg.vector_norm(query, dim=-1).square() + 2 * moved + shift.pow(2).sum(-1)
        self.norm = squared.clamp_min(0).sqrt()  # ‖q + shift‖, [E, Q]

    def dot(self, centres: torch.Tensor) -> torch.Tensor:
        """(q + shift)·c, `[E, Q, N]` for centres `[E, N, D]`."""
        centres_t = centres.transpose(-1, -2)
        return self.query @ centres_t + self.shift @ centres_t

    def cosine(self, centres: torch.Tensor) -> torch.Tensor:
        """cos(q + shift, c), `[E, Q, N]`, with F.normalize's floor on the norms."""
        scale = self.norm.clamp_min(1e-12).unsqueeze(-1) * _norms(centres).unsqueeze(-2)
        return self.dot(centres) / scale

    def squared_distances(self, centres: torch.Tensor) -> torch.Tensor:
        """‖q + shift − c‖², `[E, Q, N]`."""
        centre_sq = centres.pow(2).sum(-1).unsqueeze(-2)
        return squared_distances_from(self.dot(centres), centre_sq, self.norm.square().unsqueeze(-1))

    def weighted_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """Σ_q w_qn (q + shift), `[E, N, D]`, for weights `[E, Q, N]`."""
        weights_t = weights.transpose(-1, -2)
        return weights_t @ self.query + weights_t.sum(-1, keepdim=True) * self.shift


def _norms(x: torch.Tensor) -> torch.Tensor:
    """Row norms `[E, M]` of `[E, M, D]`, floored as F.normalize floors them."""
    return torch.linalg.vector_norm(x, dim=-1).clamp_min(1e-12)


def rectify(
    support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int, scale: float
) -> tuple[torch.Tensor, ShiftedQueries]:
    """(rectified prototypes `[E, N, D]`, the queries shifted onto the support mean) of a batch
    of episodes.

    Members of class n: its support examples and the queries whose nearest prototype (cosine)
    is n; their weights are softmax(scale · cos(x, p_n)) over the members. Neither the shifted
    queries nor the support–query concatenation are written out: a few passes over each input.
    """
    queries = ShiftedQueries(query, support.mean(-2, keepdim=True) - query.mean(-2, keepdim=True))
    support_onehot = one_hot(labels, n_way, support.dtype)  # [E, S, N]
    prototypes = compute_prototypes(support, labels, n_way)
    support_cos = (support @ prototypes.transpose(-1, -2)) / (
        _norms(support).unsqueeze(-1) * _norms(prototypes).unsqueeze(-2)
    )
    query_cos = queries.cosine(prototypes)
    pseudo = one_hot(query_cos.argmax(-1), n_way, torch.bool)
    sim = scale * torch.cat([support_cos, query_cos], -2)  # [E, S+Q, N], small
    member = torch.cat([support_onehot.bool(), pseudo], -2)
    weights = sim.masked_fill(~member, float("-inf")).softmax(-2)  # each class has its support
    support_weights, query_weights = weights.split([support.shape[-2], query.shape[-2]], -2)
    rectified = support_weights.transpose(-1, -2) @ support + queries.weighted_sums(query_weights)
    return rectified, queries


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
        prototypes, queries = rectify(s, labels, q, n_way, self.scale)
        return self.scale * queries.cosine(prototypes)
