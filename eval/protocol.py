"""The episodic protocol on cached embeddings: all episodes at once, in batched tensor code.

A method maps (embeddings `[N, D]`, Episodes) to per-episode accuracies `[E]`. Metric heads run
as batched gathers and matrix products over chunks of episodes (no Python loop per episode);
the logistic-regression probe fits scikit-learn per episode, as it must.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from protonets.encoders.errors import UserInputError
from protonets.encoders.progress import progress_bar

from protonets.heads import create_head
from protonets.stats import mean_ci95  # noqa: F401  (part of eval's API)

from .episodes import Episodes

MethodFn = Callable[..., np.ndarray]
METHODS: dict[str, MethodFn] = {}


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    """Make an evaluation method available to `evaluate` and `protonets eval --method`."""

    def decorate(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        return fn

    return decorate


def episode_tensors(
    embeddings: torch.Tensor, episodes: Episodes, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support `[e, N*K, D]`, support labels `[e, N*K]`, queries `[e, N*Q, D]`, query labels."""
    idx = torch.from_numpy(episodes.indices[start:stop])
    e, n, _ = idx.shape
    k, q = episodes.shots, episodes.queries
    support = embeddings[idx[:, :, :k].reshape(e, n * k)]
    query = embeddings[idx[:, :, k:].reshape(e, n * q)]
    ways = torch.arange(n)
    support_labels = ways.repeat_interleave(k).expand(e, -1)
    query_labels = ways.repeat_interleave(q).expand(e, -1)
    return support, support_labels, query, query_labels


def _chunk_size(episodes: Episodes, episode_bytes: int, budget_bytes: int) -> int:
    return max(1, min(len(episodes), budget_bytes // max(episode_bytes, 1)))


def batched_accuracy(
    embeddings: torch.Tensor,
    episodes: Episodes,
    logits_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    progress: bool = False,
    *,
    episode_bytes: int | None = None,
    budget_bytes: int = 256 << 20,
    autograd: bool = False,
    desc: str = "episodes",
) -> np.ndarray:
    """Per-episode accuracies `[E]` of `logits_fn(support, support_labels, queries)` (batched).

    Episodes go through in chunks of about `budget_bytes` of working memory, `episode_bytes`
    each (default: a metric head's distances). `autograd=True` runs under `no_grad` rather than
    `inference_mode`, so that a head may enable gradients inside (test-time fine-tuning).
    """
    n, k, q = episodes.ways, episodes.shots, episodes.queries
    if episode_bytes is None:
        episode_bytes = n * (k + q) * (embeddings.shape[1] * 4 + n * 8)
    out = np.empty(len(episodes))
    step = _chunk_size(episodes, episode_bytes, budget_bytes)
    with torch.no_grad() if autograd else torch.inference_mode():
        for start in progress_bar(range(0, len(episodes), step), progress, desc=desc):
            stop = min(start + step, len(episodes))
            support, s_labels, query, q_labels = episode_tensors(embeddings, episodes, start, stop)
            predicted = logits_fn(support, s_labels, query).argmax(-1)
            out[start:stop] = (predicted == q_labels).double().mean(1).numpy()
    return out


def _head_method(**head_kwargs: Any) -> MethodFn:
    def run(embeddings: torch.Tensor, episodes: Episodes, progress: bool = False, **_: Any) -> np.ndarray:
        head = create_head("prototype", **head_kwargs)
        return batched_accuracy(
            embeddings, episodes, lambda s, y, q: head.episode_logits(s, y, q, episodes.ways), progress
        )

    return run


register_method("prototype")(_head_method(metric="euclidean"))
register_method("prototype-cosine")(_head_method(metric="cosine"))
register_method("cl2n")(_head_method(metric="euclidean", feature_transform="cl2n"))


@register_method("knn")
def knn(
    embeddings: torch.Tensor, episodes: Episodes, k: int = 1, progress: bool = False, **_: Any
) -> np.ndarray:
    """k nearest support embeddings (Euclidean), majority vote; ties go to the nearest neighbour."""
    kk = min(k, episodes.ways * episodes.shots)

    def logits(support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        dist = torch.cdist(query, support)  # [e, Q, S]
        near = dist.topk(kk, dim=-1, largest=False).indices  # [e, Q, kk]
        votes = torch.nn.functional.one_hot(labels.gather(1, near.flatten(1)).view_as(near), episodes.ways)
        rank_bonus = torch.linspace(1e-3, 0, kk).view(1, 1, kk, 1)  # nearer neighbours break ties
        return (votes.double() + rank_bonus).sum(2)

    return batched_accuracy(embeddings, episodes, logits, progress)


@register_method("logreg")
def logreg(
    embeddings: torch.Tensor, episodes: Episodes, C: float = 1.0, progress: bool = False, **_: Any
) -> np.ndarray:
    """Logistic-regression probe fitted on each episode's L2-normalised support set (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression

    out = np.empty(len(episodes))
    emb = torch.nn.functional.normalize(embeddings, dim=-1)
    for e in progress_bar(range(len(episodes)), progress, desc="logreg episodes"):
        support, s_labels, query, q_labels = episode_tensors(emb, episodes, e, e + 1)
        model = LogisticRegression(C=C, max_iter=1000)
        model.fit(support[0].numpy(), s_labels[0].numpy())
        out[e] = float((model.predict(query[0].numpy()) == q_labels[0].numpy()).mean())
    return out


def evaluate(
    embeddings: torch.Tensor, episodes: Episodes, method: str, progress: bool = False, **options: Any
) -> np.ndarray:
    """Per-episode accuracies `[E]` of `method` on `episodes` over an embedding set."""
    if method not in METHODS:
        raise UserInputError(f"unknown method '{method}'; choose from {', '.join(sorted(METHODS))}")
    if episodes.queries < 1:
        raise UserInputError("evaluation needs at least one query per class")
    return METHODS[method](embeddings.float(), episodes, progress=progress, **options)


from . import maml_methods, siamese_methods  # noqa: E402, F401  (register the MAML-path and Siamese methods)
