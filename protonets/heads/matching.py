"""The 'matching' head: Matching Networks (Vinyals et al. 2016) on embeddings.

A query attends over every support embedding by cosine similarity (softmax over the support);
its class probabilities are the attention mass on each class, and the logits their logarithm.
Untrained, this is plain cosine attention. With `fce=True` the full-context embeddings are
learned: a bidirectional LSTM over the support set (g, with a skip connection) and an attention
LSTM over the queries that reads the support `fce_steps` times (f), trained by `protonets train
--method matching` (with its encoder, or `--freeze-encoder` alone) and loaded with
`--head-checkpoint DIR`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .trained import TrainedHead, load_head_checkpoint


class MatchingHead(TrainedHead):
    """Cosine attention over the support set, with optional full-context embeddings (FCE).

    dim: embedding width (needed with fce). fce: learn the context embeddings.
    hidden: FCE width; embeddings are first projected to it by a linear layer (None: dim).
    fce_steps: attention-LSTM read steps over the support (None: one per support sample, as easyfsl).
    scale: cosine similarities are multiplied by it before the softmax (1 in the paper).
    """

    name = "matching"
    needs_checkpoint = False  # plain cosine attention untrained; a checkpoint adds trained FCE
    checkpoint_hint = "a folder of `protonets train --method matching --freeze-encoder --output DIR`"

    def __init__(
        self,
        dim: int | None = None,
        fce: bool = False,
        hidden: int | None = None,
        fce_steps: int | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        if fce and dim is None:
            raise ValueError("the matching head with fce=True needs dim (the embedding width)")
        if fce_steps is not None and fce_steps < 1:
            raise ValueError(f"fce_steps must be at least 1, got {fce_steps}")
        self.dim, self.fce, self.fce_steps, self.scale = dim, bool(fce), fce_steps, float(scale)
        self.hidden = None if not fce else int(hidden or dim)
        if self.fce:
            width = self.hidden
            self.project = nn.Linear(dim, width) if width != dim else nn.Identity()
            self.support_lstm = nn.LSTM(width, width, batch_first=True, bidirectional=True)
            self.query_cell = nn.LSTMCell(2 * width, width)
        self.eval()  # built for inference (dropout off); training switches it to train()

    @classmethod
    def from_options(
        cls, head_checkpoint: str | os.PathLike[str] | None = None, **options: Any
    ) -> MatchingHead:
        """Plain cosine attention, or the trained FCE head of `head_checkpoint` when given."""
        if head_checkpoint:
            return load_head_checkpoint(head_checkpoint, cls)
        return super().from_options(**options)

    def episode_bytes(self, ways: int, shots: int, queries: int, dim: int) -> int:
        width = self.hidden or dim
        return ways * (shots + queries) * (dim + 8 * width + ways * shots) * 4

    def context(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-context embeddings g(support) `[E, S, H]` and f(query) `[E, Q, H]`."""
        support, query = self.project(support), self.project(query)
        hidden = self.support_lstm(support)[0]
        width = support.shape[-1]
        g = support + hidden[..., :width] + hidden[..., width:]
        e, q = query.shape[:2]
        x = query.reshape(e * q, width)
        h, c = x, torch.zeros_like(x)
        for _ in range(self.fce_steps or support.shape[1]):
            attention = torch.softmax(h.view(e, q, width) @ g.transpose(1, 2), dim=-1)  # [E, Q, S]
            read = (attention @ g).reshape(e * q, width)
            h, c = self.query_cell(torch.cat([x, read], dim=1), (h, c))
            h = h + x
        return g, h.view(e, q, width)

    def episode_logits(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        support, query = support.float(), query.float()
        if self.fce:
            self.check_dim(self.dim, support)
            support, query = self.context(support, query)
        cosine = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)
        attention = torch.softmax(self.scale * cosine, dim=-1)  # [E, Q, S]
        onehot = F.one_hot(labels.to(torch.int64), n_way).to(attention.dtype)  # [E, S, N]
        return torch.log((attention @ onehot).clamp_min(1e-12))

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "fce": self.fce,
            "hidden": self.hidden,
            "fce_steps": self.fce_steps,
            "scale": self.scale,
        }
