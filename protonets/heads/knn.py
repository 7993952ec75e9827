"""k-nearest-neighbour head: the k nearest support embeddings (Euclidean) vote."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import SupportSetHead


class KNNHead(SupportSetHead):
    """Majority vote of the `k` nearest support embeddings; logits `[Q, C]` are vote counts.

    Classes with equal votes are told apart by their nearest hits (the class of the nearest
    tied neighbour wins); `k` larger than the support set means every support embedding votes.
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
        votes = F.one_hot(labels.gather(1, near.flatten(1)).view_as(near), n_way).double()
        # each vote also carries 1e-3 * 2^-rank: less than one vote in total, and the nearest
        # hit outweighs all farther ones, so equal vote counts go to the class with the nearer hits
        rank_bonus = 1e-3 * torch.pow(2.0, -torch.arange(kk, dtype=torch.float64)).view(1, 1, kk, 1)
        return (votes * (1 + rank_bonus)).sum(2)
