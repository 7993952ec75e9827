"""k-nearest-neighbour head: the k nearest support embeddings (Euclidean) vote."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import SupportSetHead


class KNNHead(SupportSetHead):
    """Majority vote of the `k` nearest support embeddings; logits `[Q, C]` are vote counts.

    Ties between classes go to the lower class index (argmax); `k` larger than the support set
    means every support embedding votes.
    """

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = int(k)

    def hyperparameters(self) -> dict[str, Any]:
        return {"k": self.k}

    def episode_logits(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        kk = min(self.k, support.shape[-2])
        dist = torch.cdist(query, support)  # [E, Q, S]
        near = dist.topk(kk, dim=-1, largest=False).indices  # [E, Q, kk]
        votes = F.one_hot(labels.gather(1, near.flatten(1)).view_as(near), n_way)
        rank_bonus = torch.linspace(1e-3, 0, kk).view(1, 1, kk, 1)  # as the eval method always had it
        return (votes.double() + rank_bonus).sum(2)
