"""Prototype head (Snell et al. 2017): class prototype = mean support embedding."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Head, check_support

METRICS = ("euclidean", "cosine")
FEATURE_TRANSFORMS = (None, "cl2n", "l2n")


def check_metric_and_transform(metric: str, feature_transform: str | None) -> None:
    """A ValueError naming the parameter when `metric` or `feature_transform` is not one we have."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got '{metric}'")
    if feature_transform not in FEATURE_TRANSFORMS:
        raise ValueError(f"feature_transform must be one of {FEATURE_TRANSFORMS}, got '{feature_transform}'")


def transform_features(x: torch.Tensor, kind: str | None, center: torch.Tensor | None = None) -> torch.Tensor:
    """SimpleShot feature transforms: None, 'l2n' (L2-normalise) or 'cl2n' (centre, then L2)."""
    if kind is None:
        return x
    if kind == "cl2n":
        x = x - center
    return F.normalize(x, dim=-1)


def transform_episode(
    support: torch.Tensor, query: torch.Tensor, kind: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """An episode's support and queries through `transform_features`, both centred (cl2n) on
    the episode's support mean; `[..., S, D]`, `[..., Q, D]`, batched or not."""
    center = support.mean(-2, keepdim=True) if kind == "cl2n" else None
    return transform_features(support, kind, center), transform_features(query, kind, center)


def compute_prototypes(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Mean embedding per class: `[..., S, D]`, `[..., S]` -> `[..., N, D]` (batched or not).

    Class sums by scatter-add (`index_add`) in the embeddings' dtype: time and memory linear in
    S (a one-hot matrix product is S × N); episodes are offset to their own rows of one scatter.
    """
    size, dim = support.shape[-2], support.shape[-1]
    flat = support.reshape(-1, dim)
    lab = labels.reshape(-1, size).to(torch.int64)
    offsets = torch.arange(lab.shape[0], device=lab.device).unsqueeze(1) * n_way
    index = (lab + offsets).reshape(-1)
    rows = lab.shape[0] * n_way
    sums = flat.new_zeros(rows, dim).index_add(0, index, flat)
    counts = flat.new_zeros(rows).index_add(0, index, flat.new_ones(index.shape[0]))
    means = sums / counts.clamp_min(1).unsqueeze(1)
    return means.reshape(*support.shape[:-2], n_way, dim)


def squared_distances_from(
    cross: torch.Tensor, centre_sq: torch.Tensor, point_sq: torch.Tensor, floor: float = 0.0
) -> torch.Tensor:
    """‖x − c‖² `[..., M, N]` from x·cᵀ `[..., M, N]`, ‖c‖² `[..., 1, N]` and ‖x‖² `[..., M, 1]`,
    floored at `floor` (the expansion can round below 0)."""
    return (point_sq - 2 * cross + centre_sq).clamp_min(floor)


def prototype_logits(
    query: torch.Tensor, prototypes: torch.Tensor, metric: str = "euclidean", scale: float = 10.0
) -> torch.Tensor:
    """Logits `[..., Q, N]`: negative squared Euclidean distance, or scale × cosine similarity."""
    if metric == "euclidean":
        q2 = query.pow(2).sum(-1, keepdim=True)
        p2 = prototypes.pow(2).sum(-1).unsqueeze(-2)
        return -squared_distances_from(query @ prototypes.transpose(-1, -2), p2, q2)
    if metric == "cosine":
        q = F.normalize(query, dim=-1)
        p = F.normalize(prototypes, dim=-1)
        return scale * (q @ p.transpose(-1, -2))
    raise ValueError(f"metric must be one of {METRICS}, got '{metric}'")


class PrototypeHead(Head):
    """Nearest-prototype classifier.

    metric: 'euclidean' (ProtoNet's negative squared distance) or 'cosine' (scale × cosine).
    feature_transform: None, 'l2n' or 'cl2n' (SimpleShot: subtract the support mean, then L2).
    """

    def __init__(
        self, metric: str = "euclidean", feature_transform: str | None = None, scale: float = 10.0
    ) -> None:
        super().__init__()
        check_metric_and_transform(metric, feature_transform)
        self.metric = metric
        self.feature_transform = feature_transform
        self.scale = float(scale)
        self.register_buffer("prototypes", torch.empty(0, 0))
        self.register_buffer("center", torch.empty(0))

    def hyperparameters(self) -> dict[str, Any]:
        return {"metric": self.metric, "feature_transform": self.feature_transform, "scale": self.scale}

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> PrototypeHead:
        check_support(support, labels)
        support = support if support.is_floating_point() else support.float()
        self.center = support.mean(0)
        x = transform_features(support, self.feature_transform, self.center)
        self.prototypes = compute_prototypes(x, labels, int(labels.max()) + 1)
        return self

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        if self.prototypes.numel() == 0:
            raise RuntimeError("PrototypeHead is not fitted: call fit(support, labels) first")
        if query.shape[-1] != self.prototypes.shape[-1]:
            raise ValueError(
                f"query embeddings have {query.shape[-1]} dims, prototypes have {self.prototypes.shape[-1]}"
            )
        q = transform_features(query.to(self.prototypes.dtype), self.feature_transform, self.center)
        return prototype_logits(q, self.prototypes, self.metric, self.scale)

    def episode_logits(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        s, q = transform_episode(support, query, self.feature_transform)
        return prototype_logits(q, compute_prototypes(s, labels, n_way), self.metric, self.scale)
