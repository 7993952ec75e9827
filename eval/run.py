"""`run_evaluation`: embed a dataset once (cached), then every method × ways × shots on shared episodes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from protonets.encoders import Encoder
from protonets.encoders.cache import EmbeddingCache
from protonets.episodes import sample_episodes

from .datasets import FewShotDataset
from .protocol import evaluate, mean_ci95
from .report import result_row


def embed_dataset(
    dataset: FewShotDataset,
    encoder: Encoder,
    cache_dir: str | None = None,
    use_cache: bool = True,
    **embed_kwargs: Any,
) -> torch.Tensor:
    """Embeddings `[N, D]` of every image of the dataset, through the on-disk cache by default."""
    if use_cache:
        return EmbeddingCache(encoder, cache_dir).embed(dataset.items, **embed_kwargs)
    return encoder.embed(dataset.items, **embed_kwargs).embeddings


def run_evaluation(
    embeddings: torch.Tensor,
    labels: np.ndarray,
    methods: Sequence[str],
    ways: Sequence[int],
    shots: Sequence[int],
    queries: int = 15,
    episodes: int = 600,
    seed: int = 0,
    class_names: list[str] | None = None,
    progress: bool = False,
    method_options: dict[str, dict[str, Any]] | None = None,
    query_balance: str = "balanced",
    alpha: float = 2.0,
) -> list[dict[str, Any]]:
    """Result rows for every (method, ways, shots); all methods see the same episodes (paired).

    query_balance: "balanced" (Q queries per class) or "dirichlet" (the N*Q queries of each
    episode split by Dirichlet(`alpha`) class proportions, Veilleux et al. 2021).
    """
    rows = []
    for n in ways:
        for k in shots:
            batch = sample_episodes(labels, n, k, queries, episodes, seed, class_names, query_balance, alpha)
            capped = None if batch.capped is None else int(batch.capped.sum())
            for method in methods:
                options = (method_options or {}).get(method, {})
                acc = evaluate(embeddings, batch, method, progress=progress, **options)
                mean, ci = mean_ci95(acc)
                rows.append(
                    result_row(
                        method, n, k, queries, mean, ci, episodes, batch.query_balance, batch.alpha, capped
                    )
                )
    return rows
