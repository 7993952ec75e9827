"""What every transductive head shares: the support set kept by `fit`, the query batch as the
unlabelled set at `forward`, shape checks, and the batched Adam loop of the gradient methods.

A transductive head answers for a whole query batch at once: `forward(query)` refines the
classes with all of `query`, so the answer for one query depends on the others in the call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .base import SupportSetHead


def check_episodes(support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int) -> None:
    """Shapes at the door of `episode_logits`: `[E, S, D]`, `[E, S]`, `[E, Q, D]`, Q >= 2."""
    if support.dim() != 3 or query.dim() != 3 or labels.shape != support.shape[:2]:
        raise ValueError(
            f"expected support [E, S, D], labels [E, S], query [E, Q, D]; got {tuple(support.shape)}, "
            f"{tuple(labels.shape)}, {tuple(query.shape)}"
        )
    if query.shape[0] != support.shape[0] or query.shape[-1] != support.shape[-1]:
        raise ValueError(
            f"query {tuple(query.shape)} does not match support {tuple(support.shape)} (episodes, dims)"
        )
    if query.shape[1] < 2:
        raise ValueError(
            f"a transductive head needs at least 2 queries per call (the unlabelled batch it refines "
            f"the classes with), got {query.shape[1]}; use an inductive head such as 'prototype'"
        )
    if n_way < 2 or support.shape[1] < n_way:
        raise ValueError(f"need at least 2 classes with a support example each, got {n_way} classes")


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy of probabilities along `dim`."""
    return -(p * torch.log(p + 1e-12)).sum(dim)


def adam_steps(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], init: torch.Tensor, steps: int, lr: float
) -> torch.Tensor:
    """`steps` Adam steps on `init` ([E, ...], all episodes in one tensor) of `loss_fn`.

    `loss_fn` returns the sum of the per-episode losses, so each episode's parameters get their
    own gradient and, Adam being elementwise, the batch equals episodes run one by one.
    Runs with gradients enabled whatever the caller's mode (no_grad or inference_mode).
    """
    with torch.inference_mode(False), torch.enable_grad():
        param = init.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([param], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(param).backward()
            optimizer.step()
    return param.detach()


class TransductiveHead(SupportSetHead):
    """Base of the transductive heads: `fit` keeps the support set, `forward(query)` runs
    `transduce` with the whole query batch as the unlabelled set (batched over episodes)."""

    transductive = True
    memory_budget = 64 << 20

    def episode_bytes(self, ways: int, shots: int, queries: int, dim: int) -> int:
        n = ways * (shots + queries)
        return n * (dim * 16 + n * 8 + ways * 16)

    def episode_logits(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        check_episodes(support, labels, query, n_way)
        return self.transduce(support, labels.to(torch.int64), query.to(support.dtype), n_way)

    def transduce(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        """Logits `[E, Q, N]` of checked episodes; what each method implements."""
        raise NotImplementedError


def one_hot(labels: torch.Tensor, n_way: int, dtype: torch.dtype) -> torch.Tensor:
    """`[E, S]` class indices -> `[E, S, N]` one-hot in `dtype` (support sets are small)."""
    return F.one_hot(labels, n_way).to(dtype)
