"""MAML-path evaluation methods on cached embeddings: Proto-MAML / ANIL head fine-tuning.

`maml`: every episode starts from its prototype head (Proto-MAML init) and takes `steps` SGD
steps of support cross-entropy on a linear head over the frozen encoder's embeddings (ANIL at
test time: the body is not adapted). All episodes of a chunk adapt at once under vmap.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from encoders.progress import progress_bar
from protonets.maml.head import MAMLHead

from .episodes import Episodes
from .protocol import episode_tensors, register_method


def _chunk(episodes: Episodes, dim: int, budget_bytes: int = 128 << 20) -> int:
    per_episode = episodes.ways * (episodes.shots + episodes.queries) * dim * 4 * 4  # inputs + grads
    return max(1, min(len(episodes), budget_bytes // max(per_episode, 1)))


@register_method("maml")
def maml(
    embeddings: torch.Tensor,
    episodes: Episodes,
    progress: bool = False,
    steps: int = 20,
    lr: float = 1.0,
    metric: str = "cosine",
    feature_transform: str | None = None,
    scale: float = 10.0,
    **_: Any,
) -> np.ndarray:
    """Proto-MAML head fine-tuning per episode (head only, frozen embeddings); accuracies `[E]`."""
    head = MAMLHead(metric, feature_transform, scale, steps, lr)
    out = np.empty(len(episodes))
    step = _chunk(episodes, embeddings.shape[1])
    with torch.no_grad():
        for start in progress_bar(range(0, len(episodes), step), progress, desc="maml episodes"):
            stop = min(start + step, len(episodes))
            support, s_labels, query, q_labels = episode_tensors(embeddings, episodes, start, stop)
            logits = head.episode_logits(support, s_labels.contiguous(), query, episodes.ways)
            out[start:stop] = (logits.argmax(-1) == q_labels).double().mean(1).numpy()
    return out
