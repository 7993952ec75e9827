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


def class_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the class dimension `dim`, written out: for the few classes of an episode
    this is several times faster than torch.softmax's kernel, whose cost is per row (and
    faster still when the classes are not the last dimension: the reductions then run along
    the contiguous rows)."""
    e = (logits - logits.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)


def class_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """log Σ exp over the last (class) dimension, written out for the same reason as
    `class_softmax` (finite logits)."""
    top = logits.amax(-1, keepdim=True)
    return (logits - top).exp().sum(-1).log().add(top.squeeze(-1))


def adam_on_centres(
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    points: torch.Tensor,
    init: torch.Tensor,
    steps: int,
    lr: float,
) -> torch.Tensor:
    """`steps` Adam steps on the centres W `[E, N, D]` (all episodes in one tensor), started at
    `init`, of a loss that sees them only through the fixed `points` X `[E, M, D]`:
    `loss_fn(X·Wᵀ [E, M, N], ‖W‖² [E, 1, N], ‖X‖² [E, M, 1])`.

    `loss_fn` returns the sum of the per-episode losses, so each episode's centres get their own
    gradient and, Adam being elementwise, the batch equals episodes run one by one. Autograd
    runs on the small `[E, M, N]` tensors only; the chain rule brings the gradient to W,
    ∂L/∂W = (∂L/∂(XWᵀ))ᵀ X + 2 (∂L/∂‖W‖²) W, so a step reads X twice and nothing else as large.
    Runs with gradients enabled whatever the caller's mode (no_grad or inference_mode).
    """
    with torch.inference_mode(False):
        centres = init.detach().clone()
        with torch.no_grad():
            point_sq = points.pow(2).sum(-1, keepdim=True)
        optimizer = torch.optim.Adam([centres], lr=lr)
        for _ in range(steps):
            with torch.no_grad():
                cross = (points @ centres.transpose(-1, -2)).requires_grad_(True)
                centre_sq = centres.pow(2).sum(-1).unsqueeze(-2).requires_grad_(True)
            with torch.enable_grad():
                loss_fn(cross, centre_sq, point_sq).backward()
            with torch.no_grad():
                centres.grad = cross.grad.transpose(-1, -2) @ points
                if centre_sq.grad is not None:  # a loss may ignore the norms
                    centres.grad += 2 * centre_sq.grad.transpose(-1, -2) * centres
            optimizer.step()
    return centres


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
