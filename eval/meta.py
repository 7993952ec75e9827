"""A meta-trained MAML learner evaluated on episodes, in place of the 'maml' head.

`protonets eval --method maml --checkpoint DIR`, where DIR holds a learner of `protonets train
--method maml|fomaml|anil` (a `maml/` folder), adapts that learner (body and head, as it was
meta-trained) on each episode's support images and scores its query images; a head
meta-trained on a frozen encoder (`--freeze-encoder`) adapts on the cached embeddings of that
encoder instead. Without such a folder, `maml` is the registered Proto-MAML head on embeddings.
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
from protonets.episodes import Episodes
from protonets.heads import HEADS
from protonets.maml.frozen import episode_tasks, head_features
from protonets.maml.head import MAMLHead
from protonets.maml.learner import MetaLearner
from protonets.maml.train import LEARNER_DIR, evaluate_episodes, load_meta_learner, query_scores


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

    @staticmethod
    def replaces(method: str) -> bool:
        """True for the methods a meta-trained learner runs in place of: the MAML head's."""
        return issubclass(HEADS[method], MAMLHead)

    def check_ways(self, ways: int) -> None:
        """Refuse episodes of another width than the meta-trained head, unless the learner is
        Proto-MAML without per-element head step sizes (its head starts at each episode's
        prototypes, so one checkpoint serves 5-way and 20-way episodes)."""
        trained = self.learner.head.out_features
        if trained != ways and not self.learner.any_ways:
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
        learner = self.learner.with_ways(episodes.ways)
        if learner.body is None:
            device = learner.head.weight.device
            tasks = episode_tasks(
                head_features(embeddings), torch.from_numpy(episodes.indices), episodes.shots
            ).to(device)
            return query_scores(learner, tasks, self.steps)[1].cpu().numpy()
        return evaluate_episodes(
            learner,
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
