"""MAML-path evaluation methods on cached embeddings: Proto-MAML / ANIL head fine-tuning.

`maml`: every episode starts from its prototype head (Proto-MAML init) and takes `steps` SGD
steps of support cross-entropy on a linear head over the frozen encoder's embeddings (ANIL at
test time: the body is not adapted). All episodes of a chunk adapt at once under vmap.

Given a meta-trained learner (`meta=MetaEpisodes(...)`, what `protonets eval --method maml
--checkpoint DIR` passes for a checkpoint of `protonets train --method maml|fomaml|anil`), the
method instead adapts that learner (body and head, as it was meta-trained) on each episode's
support images and scores its query images; a head meta-trained on a frozen encoder
(`--freeze-encoder`) adapts on the cached embeddings of that encoder instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from protonets.encoders import Encoder
from protonets.encoders.errors import UserInputError

from protonets.maml.frozen import episode_tasks, head_features
from protonets.maml.head import MAMLHead
from protonets.maml.learner import MetaLearner
from protonets.maml.train import LEARNER_DIR, evaluate_episodes, load_meta_learner, query_scores

from .episodes import Episodes
from .protocol import batched_accuracy, register_method


@dataclass
class MetaEpisodes:
    """A meta-trained learner with the encoder it came with and the dataset's images (by index)."""

    learner: MetaLearner
    encoder: Encoder
    items: Sequence[Any]
    steps: int | None = None  # inner steps at test time; None: the learner's (`load` passes eval_inner_steps)
    source: str = "the checkpoint"

    @classmethod
    def load(
        cls, directory: str, items: Sequence[Any], device: str = "cpu", steps: int | None = None
    ) -> MetaEpisodes:
        learner, encoder, config = load_meta_learner(directory, device)
        return cls(learner, encoder, items, config.eval_inner_steps if steps is None else steps, directory)

    def check_ways(self, ways: int) -> None:
        """Refuse episodes of another width than the meta-trained head (its weights, step sizes
        and Proto-MAML init all have the trained number of classes)."""
        trained = self.learner.head.out_features
        if trained != ways:
            raise UserInputError(
                f"'{self.source}' was meta-trained for {trained}-way episodes; evaluate it with "
                f"--ways {trained}, or meta-train another checkpoint with --ways {ways}"
            )

    def evaluate(self, episodes: Episodes, embeddings: torch.Tensor, progress: bool = False) -> np.ndarray:
        """Per-episode accuracy of the learner adapted on each episode's support set.

        A learner with a body adapts on the support images; a head meta-trained on a frozen
        encoder (no body) adapts on the episodes' `embeddings` from that encoder.
        """
        self.check_ways(episodes.ways)
        if self.learner.body is None:
            device = self.learner.head.weight.device
            tasks = episode_tasks(
                head_features(embeddings), torch.from_numpy(episodes.indices), episodes.shots
            ).to(device)
            return query_scores(self.learner, tasks, self.steps)[1].cpu().numpy()
        return evaluate_episodes(
            self.learner,
            self.encoder,
            self.items,
            episodes.indices,
            episodes.shots,
            self.steps,
            progress=progress,
        )


def is_meta_checkpoint(directory: str | None) -> bool:
    """True for a checkpoint folder written by `protonets train --method maml|fomaml|anil`."""
    return directory is not None and os.path.isdir(os.path.join(directory, LEARNER_DIR))


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
    meta: MetaEpisodes | None = None,
    **_: Any,
) -> np.ndarray:
    """Proto-MAML head fine-tuning per episode (head only, frozen embeddings); accuracies `[E]`.

    meta: evaluate this meta-trained learner on the episodes' images instead (see the module).
    """
    if meta is not None:
        return meta.evaluate(episodes, embeddings, progress)
    head = MAMLHead(metric, feature_transform, scale, steps, lr)
    return batched_accuracy(
        embeddings,
        episodes,
        lambda s, y, q: head.episode_logits(s, y.contiguous(), q, episodes.ways),
        progress,
        episode_bytes=episodes.ways * (episodes.shots + episodes.queries) * embeddings.shape[1] * 16,
        budget_bytes=128 << 20,  # inputs and their gradients
        autograd=True,
        desc="maml episodes",
    )
