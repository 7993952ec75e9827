"""ANIL on a frozen encoder's cached embeddings: meta-train a linear head alone (cheap on a CPU).

The encoder never changes, so every image is embedded once (through the embedding cache) and
meta-training runs on those vectors: each step samples `meta_batch` episodes, adapts a linear
head on each support set by `inner_steps` SGD steps (from its meta-learned initialisation, or
from the prototypes with `proto_init`) and takes an Adam step on the meta-gradient of the query
losses. The head sees L2-normalised embeddings (`head_features`), so one inner step size suits
any encoder. `protonets train --method anil --freeze-encoder` drives it and writes a checkpoint
that `protonets eval --method maml --checkpoint DIR` scores on the same cached embeddings.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from protonets.encoders.errors import UserInputError

from ..episodes import EpisodeSampler, gather_episodes
from ..stats import ci_or_none, mean_ci95
from ..training import TrainConfig, TrainLoop
from ..training.loop import InMemoryMethod
from ..training.trainer import validation_episodes
from .learner import MetaLearner, TaskBatch
from .train import query_scores, require_head_width


def head_features(embeddings: torch.Tensor) -> torch.Tensor:
    """What the frozen-encoder head sees: float32 L2-normalised embeddings."""
    return F.normalize(torch.as_tensor(embeddings).float(), dim=-1)


def episode_tasks(features: torch.Tensor, index: torch.Tensor, shots: int) -> TaskBatch:
    """Episodes `[T, N, K+Q]` of row indices into `features [M, D]` -> a TaskBatch (labels 0..N-1)."""
    return TaskBatch(*gather_episodes(features, index, shots))


class FrozenAnil(InMemoryMethod):
    """A head-only `MetaLearner` meta-trained on embedding episodes (a `TrainLoop` method)."""

    def __init__(
        self,
        learner: MetaLearner,
        features: torch.Tensor,
        sampler: EpisodeSampler,
        rng: np.random.Generator,
        config: TrainConfig,
        meta_batch: int,
        val_tasks: TaskBatch | None,
        eval_steps: int | None,
    ) -> None:
        self.learner = self.module = learner
        self.features, self.sampler, self.rng = features, sampler, rng
        self.shots, self.meta_batch, self.val_tasks, self.eval_steps = (
            config.shots,
            meta_batch,
            val_tasks,
            eval_steps,
        )
        self.optimizer = torch.optim.Adam(
            learner.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        tasks = episode_tasks(self.features, self.sampler.sample(self.rng, self.meta_batch), self.shots)
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self.learner.meta_backward(tasks)
        self.optimizer.step()
        return torch.tensor(loss), (logits.argmax(-1) == tasks.query_y).float().mean()

    def validate(self) -> dict[str, float]:
        assert self.val_tasks is not None
        val_loss, val_acc = query_scores(self.learner, self.val_tasks, self.eval_steps)
        acc, ci = mean_ci95(val_acc)
        return {"val_loss": float(val_loss.mean()), "val_acc": acc, "val_ci95": ci_or_none(ci)}


def train_frozen_anil(
    learner: MetaLearner,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    val_embeddings: torch.Tensor | None,
    val_labels: torch.Tensor | None,
    config: TrainConfig,
    meta_batch: int,
    eval_steps: int | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Meta-train `learner` (a head over no body) on embeddings `[N, D]`; returns the log.

    The learner is left holding the head with the best validation accuracy (on fixed episodes,
    scored every `config.val_every` steps), or the last head without validation data.
    """
    if learner.body is not None:
        raise UserInputError(
            "train_frozen_anil meta-trains a head alone: build the MetaLearner without a body"
        )
    features, labels = head_features(embeddings), torch.as_tensor(labels, dtype=torch.int64)
    sampler = EpisodeSampler(labels, config.ways, config.shots, config.queries, split="training")
    val_tasks = None
    if val_embeddings is not None and val_labels is not None:
        require_head_width(config)
        val_tasks = episode_tasks(
            head_features(val_embeddings), validation_episodes(val_labels, config), config.val_shots
        )
    rng = np.random.default_rng(config.seed)
    method = FrozenAnil(learner, features, sampler, rng, config, meta_batch, val_tasks, eval_steps)
    loop = TrainLoop(
        method,
        seed=config.seed,
        val_every=config.val_every,
        validates=val_tasks is not None,
        rng=rng,
        generator=torch.Generator().manual_seed(config.seed),
        lr_at=config.lr_at,
        progress=progress,
        desc="anil head",
        unit="step",
    )
    history = loop.run(config.episodes).history
    if not all(math.isfinite(r["train_loss"]) for r in history):
        raise UserInputError(
            "the meta-training loss became NaN or infinite; lower --lr or --inner-lr and start again"
        )
    return history
