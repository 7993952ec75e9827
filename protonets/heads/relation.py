"""The 'relation' head: Relation Networks (Sung et al. 2018) on embeddings.

A learned relation module, an MLP on the concatenated (class prototype, query) pair, scores how
well a query matches each class; trained with mean squared error against the one-hot labels, as
in the paper. Prototypes are mean support embeddings (the paper sums K-shot feature maps; the
mean keeps the input scale the same at every shot count). The logits are the module's
pre-sigmoid outputs, so argmax and softmax order classes as the relation scores do. Train with
`protonets train --method relation` (with its encoder, or `--freeze-encoder` alone); evaluate
with `--head-checkpoint DIR`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .prototype import compute_prototypes
from .trained import TrainedHead


class RelationHead(TrainedHead):
    """An MLP relation module over (prototype, query) pairs.

    dim: embedding width. hidden: MLP width. normalize: L2-normalise embeddings first.
    """

    name = "relation"
    checkpoint_hint = "a folder of `protonets train --method relation --freeze-encoder --output DIR`"

    def __init__(self, dim: int = 64, hidden: int = 128, normalize: bool = True) -> None:
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"dim and hidden must be at least 1, got {dim} and {hidden}")
        self.dim, self.hidden, self.normalize = int(dim), int(hidden), bool(normalize)
        self.relation = nn.Sequential(
            nn.Linear(2 * self.dim, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.hidden // 2 or 1),
            nn.ReLU(),
            nn.Linear(self.hidden // 2 or 1, 1),
        )
        self.eval()  # built for inference (dropout off); training switches it to train()

    def episode_bytes(self, ways: int, shots: int, queries: int, dim: int) -> int:
        """The (query, class) pair features and their hidden layer."""
        return ways * ways * queries * (2 * dim + 2 * self.hidden) * 4 + ways * (shots + queries) * dim * 4

    def episode_logits(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        self.check_dim(self.dim, support)
        support, query = support.float(), query.float()
        if self.normalize:
            support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
        prototypes = compute_prototypes(support, labels, n_way)  # [E, N, D]
        e, q, n = query.shape[0], query.shape[1], prototypes.shape[1]
        pairs = torch.cat(
            [prototypes.unsqueeze(1).expand(e, q, n, -1), query.unsqueeze(2).expand(e, q, n, -1)], dim=-1
        )
        return self.relation(pairs).squeeze(-1)  # [E, Q, N]

    def episode_loss(
        self,
        support: torch.Tensor,
        labels: torch.Tensor,
        query: torch.Tensor,
        query_labels: torch.Tensor,
        n_way: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squared error of the relation scores (sigmoid) against the one-hot labels."""
        logits = self.episode_logits(support, labels, query, n_way)
        target = F.one_hot(query_labels.to(torch.int64), n_way).to(logits.dtype)
        return F.mse_loss(torch.sigmoid(logits), target), logits

    def hyperparameters(self) -> dict[str, Any]:
        return {"dim": self.dim, "hidden": self.hidden, "normalize": self.normalize}
