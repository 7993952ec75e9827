"""Soft k-means head (Ren et al. 2018): prototypes refined by the queries' soft assignments."""

from __future__ import annotations

from typing import Any

import torch

from .prototype import check_metric_and_transform, compute_prototypes, prototype_logits, transform_episode
from .transductive import TransductiveHead, one_hot


class SoftKMeansHead(TransductiveHead):
    """Prototypes, then `steps` soft k-means updates over support + queries:
    p_c = (Σ_support x + Σ_query z_c(x) x) / (n_c + Σ_query z_c(x)), z = softmax of the logits.

    metric, feature_transform, scale: as for the prototype head (the paper: squared Euclidean).
    steps: refinement passes (the paper: 1).
    """

    def __init__(
        self,
        metric: str = "euclidean",
        feature_transform: str | None = None,
        scale: float = 10.0,
        steps: int = 1,
    ) -> None:
        super().__init__()
        check_metric_and_transform(metric, feature_transform)
        if int(steps) < 0:
            raise ValueError(f"steps must be >= 0 (0 = the prototype head), got {steps}")
        self.metric, self.feature_transform = metric, feature_transform
        self.scale, self.steps = float(scale), int(steps)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "feature_transform": self.feature_transform,
            "scale": self.scale,
            "steps": self.steps,
        }

    def transduce(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        s, q = transform_episode(support, query, self.feature_transform)
        prototypes = compute_prototypes(s, labels, n_way)
        counts = one_hot(labels, n_way, s.dtype).sum(-2).unsqueeze(-1)  # [E, N, 1]
        sums = prototypes * counts
        for _ in range(self.steps):
            z = prototype_logits(q, prototypes, self.metric, self.scale).softmax(-1)  # [E, Q, N]
            prototypes = (sums + z.transpose(-1, -2) @ q) / (counts + z.sum(-2).unsqueeze(-1))
        return prototype_logits(q, prototypes, self.metric, self.scale)
