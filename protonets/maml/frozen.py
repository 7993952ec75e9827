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
import time
from typing import Any

import torch
import torch.nn.functional as F

from protonets.encoders.errors import UserInputError
from protonets.encoders.progress import progress_bar

from ..stats import mean_ci95
from ..training import TrainConfig
from ..training.episodes import EpisodeSampler
from ..training.trainer import validation_episodes
from .learner import MetaLearner, TaskBatch
from .train import query_scores, require_head_width


def head_features(embeddings: torch.Tensor) -> torch.Tensor:
    """What the frozen-encoder head sees: float32 L2-normalised embeddings."""
    return F.normalize(torch.as_tensor(embeddings).float(), dim=-1)


def episode_tasks(features: torch.Tensor, index: torch.Tensor, shots: int) -> TaskBatch:
    """Episodes `[T, N, K+Q]` of row indices into `features [M, D]` -> a TaskBatch (labels 0..N-1)."""
    t, n, m = index.shape
    x = features[index.flatten()].view(t, n, m, -1)
    ways = torch.arange(n)
    return TaskBatch(
        x[:, :, :shots].reshape(t, n * shots, -1),
        ways.repeat_interleave(shots).expand(t, -1),
        x[:, :, shots:].reshape(t, n * (m - shots), -1),
        ways.repeat_interleave(m - shots).expand(t, -1),
    )


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
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    sampler = EpisodeSampler(labels, config.ways, config.shots, config.queries, generator)
    val_tasks = None
    if val_embeddings is not None and val_labels is not None:
        require_head_width(config)
        val_tasks = episode_tasks(
            head_features(val_embeddings), validation_episodes(val_labels, config), config.val_shots
        )
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history: list[dict[str, Any]] = []
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None
    running = {"loss": 0.0, "acc": 0.0, "count": 0}
    start = time.perf_counter()
    for step in progress_bar(range(1, config.episodes + 1), progress, desc="anil head", unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step - 1)
        index = torch.stack([sampler.sample() for _ in range(meta_batch)])
        tasks = episode_tasks(features, index, config.shots)
        optimizer.zero_grad(set_to_none=True)
        loss, logits = learner.meta_backward(tasks)
        optimizer.step()
        running["loss"] += loss
        running["acc"] += float((logits.argmax(-1) == tasks.query_y).float().mean())
        running["count"] += 1
        if step % config.val_every and step != config.episodes:
            continue
        count = running["count"]
        record: dict[str, Any] = {
            "step": step,
            "lr": config.lr_at(step - 1),
            "train_loss": running["loss"] / count,
            "train_acc": running["acc"] / count,
        }
        running = {"loss": 0.0, "acc": 0.0, "count": 0}
        if val_tasks is not None:
            val_loss, val_acc = query_scores(learner, val_tasks, eval_steps)
            acc, ci = mean_ci95(val_acc)
            record.update(val_loss=float(val_loss.mean()), val_acc=acc, val_ci95=ci)
            key = (acc, -record["val_loss"])
            record["best"] = best is None or key > (best[0], best[1])
            if record["best"]:
                best = (*key, {k: v.detach().clone() for k, v in learner.state_dict().items()})
        record["elapsed_s"] = round(time.perf_counter() - start, 3)
        history.append(record)
    if best is not None:
        learner.load_state_dict(best[2])
    if not all(math.isfinite(r["train_loss"]) for r in history):
        raise UserInputError(
            "the meta-training loss became NaN or infinite; lower --lr or --inner-lr and start again"
        )
    return history
