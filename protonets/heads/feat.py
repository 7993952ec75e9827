"""The 'feat' head: FEAT (Ye et al. 2020), prototypes adapted by a set-to-set transformer.

The class prototypes (mean support embeddings) of an episode attend to each other through one
single-head transformer layer (residual + layer norm), so each is adapted to the others; queries
are scored by the negative squared Euclidean distance to the adapted prototypes over a
temperature. Training is episodic, with FEAT's optional contrastive regulariser: the same
transformer adapts each class's support and query embeddings as a set, and every instance is
classified against the centres of those sets. Train with `protonets train --method feat` (with
its encoder, or `--freeze-encoder` alone); evaluate with `--head-checkpoint DIR`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .prototype import compute_prototypes, prototype_logits
from .trained import TrainedHead


class SetAttention(nn.Module):
    """One single-head self-attention layer over a set `[..., M, D]`: LayerNorm(x + W_o attn(x))."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(dim, hidden, bias=False) for _ in range(3))
        self.out = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.query(x) @ self.key(x).transpose(-1, -2) / math.sqrt(self.hidden)
        attended = self.dropout(torch.softmax(scores, dim=-1)) @ self.value(x)
        return self.norm(x + self.dropout(self.out(attended)))


class FEATHead(TrainedHead):
    """Prototypes adapted by a one-layer set-to-set transformer.

    dim: embedding width. hidden: attention width. temperature: logits = -distance² / temperature.
    normalize: L2-normalise embeddings first. dropout: in the transformer, while training.
    """

    name = "feat"
    checkpoint_hint = "a folder of `protonets train --method feat --freeze-encoder --output DIR`"

    def __init__(
        self,
        dim: int = 64,
        hidden: int = 128,
        temperature: float = 0.1,
        normalize: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or not temperature > 0:
            raise ValueError(
                f"dim, hidden and temperature must be positive, got {dim}, {hidden}, {temperature}"
            )
        self.dim, self.hidden = int(dim), int(hidden)
        self.temperature, self.normalize, self.dropout = float(temperature), bool(normalize), float(dropout)
        self.attention = SetAttention(self.dim, self.hidden, self.dropout)
        self.eval()  # built for inference (dropout off); training switches it to train()

    def episode_bytes(self, ways: int, shots: int, queries: int, dim: int) -> int:
        return ways * (shots + queries) * (dim * 4 + ways * 8) + ways * (3 * self.hidden + 4 * dim) * 4

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return F.normalize(x, dim=-1) if self.normalize else x

    def episode_logits(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        self.check_dim(self.dim, support)
        support, query = self._prepare(support), self._prepare(query)
        adapted = self.attention(compute_prototypes(support, labels, n_way))  # [E, N, D]
        return prototype_logits(query, adapted) / self.temperature

    def episode_loss(
        self,
        support: torch.Tensor,
        labels: torch.Tensor,
        query: torch.Tensor,
        query_labels: torch.Tensor,
        n_way: int,
        contrastive: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the queries, plus `contrastive` × FEAT's regulariser: each class's
        support and queries adapted as one set, every instance classified against the set centres."""
        logits = self.episode_logits(support, labels, query, n_way)
        loss = F.cross_entropy(logits.reshape(-1, n_way), query_labels.reshape(-1))
        if contrastive:
            items = torch.cat([self._prepare(support), self._prepare(query)], dim=1)  # [E, S+Q, D]
            classes = torch.cat([labels, query_labels], dim=1).to(torch.int64)
            order = torch.argsort(classes, dim=1, stable=True)  # balanced episodes: equal class sets
            items = items.gather(1, order.unsqueeze(-1).expand_as(items))
            sets = self.attention(items.view(items.shape[0], n_way, -1, items.shape[-1]))  # [E, N, M, D]
            centres = sets.mean(2)
            flat = sets.flatten(1, 2)  # [E, N*M, D]
            aux = prototype_logits(flat, centres) / self.temperature
            target = torch.arange(n_way, device=aux.device).repeat_interleave(sets.shape[2])
            loss = loss + contrastive * F.cross_entropy(aux.reshape(-1, n_way), target.repeat(aux.shape[0]))
        return loss, logits

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "hidden": self.hidden,
            "temperature": self.temperature,
            "normalize": self.normalize,
            "dropout": self.dropout,
        }
