"""The head contract: what a head computes and what it declares it needs from its callers.

The registry (names -> heads) is `protonets.heads.registry`, re-exported by `protonets.heads`.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import nn


def check_support(support: torch.Tensor, labels: torch.Tensor) -> None:
    """Shapes at the door: support [S, D] float, labels [S] integer class indices 0..C-1."""
    if support.dim() != 2:
        raise ValueError(f"support embeddings must be [S, D], got shape {tuple(support.shape)}")
    if labels.dim() != 1 or labels.shape[0] != support.shape[0]:
        raise ValueError(f"labels must be [S] = [{support.shape[0]}], got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if support.shape[0] and labels.min() < 0:
        raise ValueError("labels must be class indices 0..C-1, got a negative label")


class Head(nn.Module):
    """A few-shot head: `fit(support, labels)` then `forward(query)` gives logits `[Q, C]`.

    Fitted state (prototypes, support sets) lives in registered buffers, so it is in
    `state_dict()` and saved with the model; loading resizes those buffers as needed.
    """

    registry_name = "head"
    needs_checkpoint = False  # a trained head: built by `from_checkpoint(DIR)`, not from options
    checkpoint_hint = ""  # for errors: what such a folder is and how to make one
    checkpoint_env: str | None = None  # `evaluate` falls back to this environment variable for DIR
    needs_grad = False  # fine-tunes at test time: the protocol runs under no_grad, not inference_mode
    transductive = False  # uses the whole query batch (the protocol passes it in any case)
    assumes_balanced_queries = False  # transductive and expects as many queries in every class
    memory_budget = 256 << 20  # working memory of one chunk of episodes in the protocol (bytes)

    @classmethod
    def from_options(cls, **options: Any) -> Head:
        """Build from generic options: keeps the keyword arguments the constructor accepts
        (None means the constructor's default)."""
        params = inspect.signature(cls).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            options = {k: v for k, v in options.items() if k in params}
        return cls(**{k: v for k, v in options.items() if v is not None})

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike[str], **options: Any) -> Head:
        """A trained head from a checkpoint folder (heads with `needs_checkpoint`)."""
        raise NotImplementedError(f"{cls.__name__} is not loaded from a checkpoint folder")

    def episode_bytes(self, ways: int, shots: int, queries: int, dim: int) -> int:
        """Working memory of one episode in `episode_logits` (the protocol sizes chunks by it);
        default: a metric head's embeddings and distances."""
        return ways * (shots + queries) * (dim * 4 + ways * 8)

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> Head:
        """Take the support set: embeddings `[S, D]`, labels `[S]` in 0..C-1. Returns self."""
        raise NotImplementedError

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """Logits `[Q, C]` of query embeddings `[Q, D]`."""
        raise NotImplementedError

    def episode_logits(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        """Logits `[E, Q, N]` for a batch of episodes (`[E, S, D]`, `[E, S]`, `[E, Q, D]`).

        The default runs episode by episode; heads that can override it with batched tensor code.
        """
        out = []
        for s, y, q in zip(support, labels, query):
            out.append(self.fit(s, y).forward(q))
        return torch.stack(out)

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this head (saved in manifests)."""
        return {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SupportSetHead(Head):
    """A head that keeps its whole support set (buffers `support`, `labels`); `forward(query)`
    runs the head's batched `episode_logits` on that one episode (k-NN, the transductive heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("support", torch.empty(0, 0))
        self.register_buffer("labels", torch.empty(0, dtype=torch.int64))

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> SupportSetHead:
        check_support(support, labels)
        self.support = support if support.is_floating_point() else support.float()
        self.labels = labels.to(torch.int64)
        return self

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        if self.support.numel() == 0:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(support, labels) first")
        if query.dim() != 2 or query.shape[-1] != self.support.shape[-1]:
            raise ValueError(
                f"query embeddings must be [Q, {self.support.shape[-1]}], got shape {tuple(query.shape)}"
            )
        n_way = int(self.labels.max()) + 1
        query = query.to(self.support.dtype)
        return self.episode_logits(self.support[None], self.labels[None], query[None], n_way)[0]
