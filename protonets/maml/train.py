"""Meta-training with the MAML family on the episodic trainer: `protonets train --method maml|fomaml|anil`.

`MetaTrainer` is `protonets.training.EpisodicTrainer` with `MetaMethod`: one step is a
meta-batch of `meta_batch` episodes, each adapted on its support set by `inner_steps` SGD steps
(`MetaLearner`), the meta-gradient of the query losses taken by Adam. Validation adapts on each
fixed validation episode's support set (`eval_inner_steps`) and scores its queries. Everything
else — learning-rate schedule, best checkpoint, resume, seeds, progress, JSON-lines log,
safetensors — is the episodic trainer's. (`config.episodes` counts meta-steps here.)
Under `torchrun` the meta-batch is split across the ranks (each draws its share of the tasks)
and the meta-gradients are summed, each weighted by its rank's share: the gradient of the mean
query loss over the whole meta-batch, as in one process.

The best checkpoint is the trainer's encoder checkpoint (`create_encoder(checkpoint_path=DIR)`
loads the body) plus `DIR/maml/`: the head, learned inner step sizes and settings, which
`load_meta_learner(DIR)` reads back for `protonets eval --method maml --checkpoint DIR`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from protonets.encoders import Encoder, create_encoder, weights_sha256
from protonets.encoders.atomic import load_bundle, save_bundle
from protonets.encoders.distributed import World
from protonets.encoders.errors import UserInputError

from ..episodes import split_episodes
from ..stats import ci_or_none, mean_ci95
from ..training import ImageSet, TrainConfig, augment, preload_images, to_input
from ..training.trainer import DictConfig, EpisodicTrainer, ImageEpisodes, prefixed
from .learner import MetaLearner, TaskBatch
from .options import METHODS

LEARNER_KIND = "protonets.MetaLearner"
LEARNER_FORMAT_VERSION = 1
LEARNER_DIR = "maml"


@dataclass
class MetaConfig(DictConfig):
    """MAML settings. Defaults: Finn et al.'s 5-way Omniglot (1 step of 0.4; 3 at test time)."""

    method: str = "maml"
    meta_batch: int = 32
    inner_steps: int = 1
    inner_lr: float = 0.4
    eval_inner_steps: int = 3
    meta_sgd: bool = False
    proto_init: bool = False
    batchnorm: str = "batch"
    chunk_size: int | None = None
    frozen_encoder: bool = False  # ANIL head alone on cached embeddings (protonets.maml.frozen)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserInputError(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        for name in ("meta_batch",):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("inner_steps", "eval_inner_steps"):
            if getattr(self, name) < 0:
                raise UserInputError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not self.inner_lr >= 0:
            raise UserInputError(f"inner_lr must be 0 or more, got {self.inner_lr}")
        if self.frozen_encoder and self.method != "anil":
            raise UserInputError(
                "a frozen encoder leaves only the head to meta-learn: use --method anil with --freeze-encoder"
            )


def create_meta_learner(body: nn.Module | None, dim: int, ways: int, config: MetaConfig) -> MetaLearner:
    """`MetaLearner` for `config.method`: body (the encoder's model) + a linear `dim -> ways` head.

    maml / fomaml adapt every parameter (second / first order); anil adapts the head only and
    runs the body once per task. `proto_init` starts the head at the task's prototypes. With
    `config.frozen_encoder` the learner is the head alone (the body is None), on embeddings.
    """
    return MetaLearner(
        nn.Linear(dim, ways),
        None if config.frozen_encoder else body,
        F.cross_entropy,
        steps=config.inner_steps,
        lr=config.inner_lr,
        first_order=config.method == "fomaml",
        adapt="head" if config.method == "anil" else "all",
        meta_sgd=config.meta_sgd,
        proto_init="euclidean" if config.proto_init else None,
        batchnorm=config.batchnorm,
        chunk_size=config.chunk_size,
    )


def query_scores(
    learner: MetaLearner, tasks: TaskBatch, steps: int | None = None, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task query cross-entropy and accuracy `[T]` after adapting on each support set."""
    losses, accs = [], []
    for start in range(0, len(tasks), chunk):
        part = tasks[start : start + chunk]
        logits = learner.predict(part.support_x, part.support_y, part.query_x, steps=steps)
        losses.append(F.cross_entropy(logits.transpose(1, 2), part.query_y, reduction="none").mean(1))
        accs.append((logits.argmax(-1) == part.query_y).double().mean(1))
    return torch.cat(losses), torch.cat(accs)


def require_head_width(config: TrainConfig) -> None:
    """Validation episodes must have the head's width: its weights, step sizes and Proto-MAML
    init all have `config.ways` classes (a narrower episode would score empty classes)."""
    if config.val_ways != config.ways:
        raise UserInputError(
            f"MAML's head has {config.ways} outputs, so validation needs --val-ways {config.ways} "
            f"(got {config.val_ways})"
        )


class MetaMethod:
    """MAML / FOMAML / ANIL steps on a meta-batch of episodes (see the module docstring)."""

    def __init__(self, data: ImageEpisodes, meta_config: MetaConfig) -> None:
        cfg = data.config
        self.data, self.model, self.meta_config = data, data.model, meta_config
        self.learner = create_meta_learner(self.model, data.encoder.dim, cfg.ways, meta_config).to(
            data.device
        )
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        world = data.world
        if meta_config.meta_batch < world.size:
            raise UserInputError(
                f"--meta-batch {meta_config.meta_batch} is split across {world.size} processes: "
                f"give at least one task per process (--meta-batch {world.size} or more)"
            )
        self.tasks_here = len(world.share(meta_config.meta_batch))  # this rank's share
        self.world: World | None = None  # set by `distribute`

    def distribute(self, world: World) -> None:
        """Under torchrun: start from rank 0's weights; average the meta-gradients (`train_step`)."""
        from ..training.ddp import broadcast_module

        broadcast_module([self.learner])
        self.world = world

    def _tasks(self, index: torch.Tensor, images: torch.Tensor | None, shots: int) -> TaskBatch:
        batch = self.data.inputs(index, images)
        if images is None:  # the training images: augmented
            batch = augment(batch, self.data.config.augment, self.data.generator)
        return TaskBatch(*split_episodes(batch.view(*index.shape, *batch.shape[1:]), shots, item_dims=3))

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One meta-batch of episodes, one Adam step on the meta-gradient; (loss, accuracy)."""
        tasks = self._tasks(self.data.sample(self.tasks_here), None, self.data.config.shots)
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self.learner.meta_backward(tasks)
        if self.world is not None:
            from ..training.ddp import average_gradients

            average_gradients(self.learner.parameters(), self.tasks_here / self.meta_config.meta_batch)
        self.optimizer.step()
        acc = (logits.argmax(-1) == tasks.query_y).float().mean()
        return torch.tensor(loss), acc

    def validate(self, batch_size: int = 32) -> dict[str, float]:
        """Adapt on each fixed validation episode's support set; mean query loss, accuracy, CI."""
        data = self.data
        assert data.val_set is not None and data.val_episodes is not None
        losses, accs = [], []
        for start in range(0, len(data.val_episodes), batch_size):
            index = data.val_episodes[start : start + batch_size]
            tasks = self._tasks(index, data.val_set.images, data.config.val_shots)
            loss, accuracy = query_scores(self.learner, tasks, self.meta_config.eval_inner_steps)
            losses.append(loss)
            accs.append(accuracy)
        acc, ci = mean_ci95(torch.cat(accs))
        return {"val_loss": float(torch.cat(losses).mean()), "val_acc": acc, "val_ci95": ci_or_none(ci)}

    # -- the head and learned step sizes travel with the encoder's weights ---------------------
    def weights(self) -> dict[str, torch.Tensor]:
        extra = {f"learner.{k}": v for k, v in self.learner.state_dict().items() if not k.startswith("body.")}
        return {**self.data.model_weights(), **extra}

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(prefixed(tensors, "model."))
        self.learner.load_state_dict({**self.learner.state_dict(), **prefixed(tensors, "learner.")})

    def train(self, mode: bool = True) -> None:
        self.learner.train(mode)

    def state_manifest(self) -> dict[str, Any]:
        return {"maml": self.meta_config.to_dict()}

    def check_state(self, manifest: dict[str, Any], source: str) -> None:
        if manifest.get("maml") != self.meta_config.to_dict():
            raise UserInputError(f"'{source}' was trained with other MAML settings: {manifest.get('maml')}")

    def save_best(self, output: str, best: dict[str, Any]) -> None:
        """The encoder checkpoint, marked as MAML, plus `DIR/maml/` (head, step sizes)."""
        ways = self.data.config.ways
        entries = {
            "method": self.meta_config.method,
            "head": {"name": "maml", "ways": ways, "learner": LEARNER_DIR},
            "maml": self.meta_config.to_dict(),
        }
        self.data.save_checkpoint(output, best, entries)  # first: a bundle folder takes no strangers
        save_learner_extra(output, self.learner, self.meta_config, ways)

    def read_best(self, output: str) -> dict[str, torch.Tensor]:
        extra = {f"learner.{k}": v for k, v in read_learner_extra(output)[1].items()}
        return {**self.data.read_best_model(output), **extra}


class MetaTrainer(EpisodicTrainer):
    """The episodic trainer with `MetaMethod` (see the module docstring); `.learner` is its learner.

    The head has `config.ways` outputs, so validation episodes need `val_ways == ways`.
    """

    def __init__(
        self,
        encoder: Encoder,
        train: ImageSet,
        val: ImageSet | None,
        config: TrainConfig,
        meta_config: MetaConfig,
        output: str | os.PathLike[str] | None = None,
        progress: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        world: World | None = None,
    ) -> None:
        if val is not None:
            require_head_width(config)
        super().__init__(
            encoder, train, val, config, output, progress, model_kwargs, meta,
            method=lambda data: MetaMethod(data, meta_config), world=world,
        )  # fmt: skip
        self.meta_config = meta_config
        self.learner = self.method.learner


def save_learner_extra(
    directory: str | os.PathLike[str],
    learner: MetaLearner,
    config: MetaConfig,
    ways: int,
    body_sha256: str | None = None,
) -> None:
    """Write `DIR/maml/`: the head, learned step sizes and settings (safetensors + JSON).

    body_sha256: for a head without a body (frozen encoder), the weights hash of the encoder
    whose embeddings it was trained on; with a body, the body's own hash is recorded.
    """
    state = {
        k: v.detach().cpu().contiguous() for k, v in learner.state_dict().items() if not k.startswith("body.")
    }
    manifest = {
        "kind": LEARNER_KIND,
        "format_version": LEARNER_FORMAT_VERSION,
        "config": config.to_dict(),
        "ways": ways,
        "dim": learner.head.in_features,
        "body_weights_sha256": weights_sha256(learner.body) if learner.body is not None else body_sha256,
    }
    save_bundle(
        os.path.join(directory, LEARNER_DIR), manifest, {"learner.safetensors": lambda p: save_file(state, p)}
    )


def read_learner_extra(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, tensors) of `DIR/maml/`; a clear error if the folder is not a MAML checkpoint."""
    path = os.path.join(os.fspath(directory), LEARNER_DIR)
    if not os.path.isdir(path):
        raise UserInputError(
            f"'{directory}' is not a MAML checkpoint: it has no {LEARNER_DIR}/ folder "
            "(train one with protonets train --method maml)"
        )
    manifest, files = load_bundle(path, LEARNER_KIND, LEARNER_FORMAT_VERSION)
    return manifest, load_file(files["learner.safetensors"])


def load_meta_learner(
    directory: str | os.PathLike[str], device: str = "cpu"
) -> tuple[MetaLearner, Encoder, MetaConfig]:
    """(learner, encoder, config) of a meta-trained checkpoint folder written by `MetaTrainer`."""
    manifest, extra = read_learner_extra(directory)
    encoder = create_encoder(checkpoint_path=os.fspath(directory), device=device)
    if manifest.get("body_weights_sha256") not in (None, encoder.fingerprint["weights_sha256"]):
        raise UserInputError(
            f"'{directory}': the encoder weights and {LEARNER_DIR}/ come from different saves "
            "(a save was interrupted); resume the run to write both again"
        )
    config = MetaConfig.from_dict(manifest["config"])
    learner = create_meta_learner(encoder.model, int(manifest["dim"]), int(manifest["ways"]), config)
    body = {} if learner.body is None else {f"body.{k}": v for k, v in encoder.model.state_dict().items()}
    learner.load_state_dict({**extra, **body})
    return learner.to(device), encoder, config


@torch.no_grad()
def evaluate_episodes(
    learner: MetaLearner,
    encoder: Encoder,
    items: Sequence[Any],
    indices: np.ndarray,
    shots: int,
    steps: int | None = None,
    batch_size: int = 50,
    progress: bool = False,
) -> np.ndarray:
    """Per-episode query accuracy `[E]` of a meta-trained learner, adapting on each support set.

    items: the dataset's images (paths or ImageItems); indices: episodes `[E, N, K+Q]` into them
    (e.g. `protonets.episodes.sample_episodes(...).indices`); only the images they use are loaded.
    steps: inner steps at test time (default: the learner's).
    """
    rows, inverse = np.unique(indices, return_inverse=True)
    images = preload_images([items[i] for i in rows], encoder.preprocessing, progress, "loading episodes")
    x = to_input(images, encoder.preprocessing).to(encoder.device)
    index = torch.as_tensor(inverse.reshape(indices.shape))
    out = []
    for start in range(0, len(index), batch_size):
        tasks = TaskBatch(*split_episodes(x[index[start : start + batch_size].to(x.device)], shots, 3))
        logits = learner.predict(tasks.support_x, tasks.support_y, tasks.query_x, steps=steps)
        out.append((logits.argmax(-1) == tasks.query_y).double().mean(1).cpu())
    return torch.cat(out).numpy()
