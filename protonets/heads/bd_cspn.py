"""BD-CSPN head (Liu et al. 2020, prototype rectification): the query set is shifted onto the
support set's mean (cross-set bias), then each prototype becomes a weighted mean of its support
examples and of the queries pseudo-labelled with its class (intra-set bias)."""

from __future__ import annotations

from typing import Any

import torch

from .prototype import FEATURE_TRANSFORMS, compute_prototypes, squared_distances_from, transform_episode
from .transductive import TransductiveHead


class ShiftedQueries:
    """Queries moved by one vector per episode, q + shift (`[E, Q, D]`, `[E, 1, D]`), never
    written out: products, norms and weighted sums come from q itself, one pass over q each.
    Results are class-major, `[E, N, Q]`: per-query reductions over classes then run along
    contiguous rows of queries."""

    def __init__(self, query: torch.Tensor, shift: torch.Tensor, moved: torch.Tensor) -> None:
        """`moved`: q·shift `[E, Q]`, from the caller's pass over q."""
        self.query, self.shift = query, shift
        squared = torch.linalg.vector_norm(query, dim=-1).square() + 2 * moved + shift.pow(2).sum(-1)
        self.norm = squared.clamp_min(0).sqrt().unsqueeze(-2)  # ‖q + shift‖, [E, 1, Q]

    def dot(self, centres: torch.Tensor) -> torch.Tensor:
        """(q + shift)·c, `[E, N, Q]` for centres `[E, N, D]`."""
        return (centres @ self.query.transpose(-1, -2)).add_((centres * self.shift).sum(-1, keepdim=True))

    def cosine(self, centres: torch.Tensor, dot: torch.Tensor | None = None) -> torch.Tensor:
        """cos(q + shift, c), `[E, N, Q]`, with F.normalize's floor on the norms; `dot`: the
        caller's `self.dot(centres)`, if it has it."""
        scale = self.norm.clamp_min(1e-12) * _norms(centres).unsqueeze(-1)
        return (self.dot(centres) if dot is None else dot).div_(scale)

    def squared_distances(self, centres: torch.Tensor) -> torch.Tensor:
        """‖q + shift − c‖², `[E, N, Q]`."""
        centre_sq = centres.pow(2).sum(-1).unsqueeze(-1)
        return squared_distances_from(self.dot(centres), centre_sq, self.norm.square())

    def weighted_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """Σ_q w_nq (q + shift), `[E, N, D]`, for weights `[E, N, Q]`."""
        return weights @ self.query + weights.sum(-1, keepdim=True) * self.shift


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
    Everything small is class-major (`[E, N, S + Q]`), so the softmax runs along rows.
    """
    shift = support.mean(-2, keepdim=True) - query.mean(-2, keepdim=True)  # [E, 1, D]
    prototypes = compute_prototypes(support, labels, n_way)
    # one pass over the queries for both q·p and q·shift: [E, N + 1, Q]
    to_query = torch.cat([prototypes, shift], -2) @ query.transpose(-1, -2)
    queries = ShiftedQueries(query, shift, moved=to_query[:, n_way])
    support_cos = (prototypes @ support.transpose(-1, -2)).div_(
        _norms(prototypes).unsqueeze(-1) * _norms(support).unsqueeze(-2)
    )  # [E, N, S]
    query_dot = to_query[:, :n_way].add_((prototypes * shift).sum(-1, keepdim=True))  # (q + shift)·p
    query_cos = queries.cosine(prototypes, dot=query_dot)  # [E, N, Q]
    classes = torch.arange(n_way, device=labels.device).view(1, -1, 1)
    nearest = query_cos == query_cos.amax(-2, keepdim=True)  # argmax over dim -2 is slow on a CPU
    if nearest.sum(-2).ne(1).any():  # a tie (or NaN): the first nearest class, as argmax picks
        nearest = query_cos.argmax(-2, keepdim=True) == classes
    member = torch.cat([labels.unsqueeze(-2) == classes, nearest], -1)
    sim = torch.cat([support_cos, query_cos], -1).mul_(scale)  # [E, N, S+Q], small
    weights = sim.masked_fill_(~member, float("-inf")).softmax(-1)  # each class has its support
    support_weights, query_weights = weights.split([support.shape[-2], query.shape[-2]], -1)
    rectified = support_weights @ support + queries.weighted_sums(query_weights)
    return rectified, queries


class BDCSPNHead(TransductiveHead):
    """Prototype rectification; logits are scale × cosine to the rectified prototypes.

    scale: the paper's ε in the member weights exp(ε·cos) and the logit scale (easyfsl: 1).
    feature_transform: None, 'l2n' or 'cl2n' (centre on the support mean, then L2).
    """

    assumes_balanced_queries = True  # the cross-set shift moves the query mean onto the support's

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
        return self.scale * queries.cosine(prototypes).transpose(-1, -2)
