"""Meta-training with the MAML family on the episodic trainer: `protonets train --method maml|fomaml|anil`.

`MetaTrainer` is `protonets.training.EpisodicTrainer` with a different step: one step is a
meta-batch of `meta_batch` episodes, each adapted on its support set by `inner_steps` SGD steps
(`MetaLearner`), the meta-gradient of the query losses taken by Adam. Validation adapts on each
fixed validation episode's support set (`eval_inner_steps`) and scores its queries. Everything
else — learning-rate schedule, best checkpoint, resume, seeds, progress, JSON-lines log,
safetensors — is the episodic trainer's. (`config.episodes` counts meta-steps here.)

The best checkpoint is the trainer's encoder checkpoint (`create_encoder(checkpoint_path=DIR)`
loads the body) plus `DIR/maml/`: the head, learned inner step sizes and settings, which
`load_meta_learner(DIR)` reads back for `protonets eval --method maml --checkpoint DIR`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from protonets.encoders import Encoder, create_encoder, weights_sha256
from protonets.encoders.atomic import load_bundle, save_bundle
from protonets.encoders.errors import UserInputError

from ..stats import mean_ci95
from ..training import EpisodicTrainer, ImageSet, TrainConfig, TrainResult, augment, preload_images, to_input
from ..training import checkpoint as ckpt
from .learner import MetaLearner, TaskBatch

METHODS = ("maml", "fomaml", "anil")
LEARNER_KIND = "protonets.MetaLearner"
LEARNER_FORMAT_VERSION = 1
LEARNER_DIR = "maml"


@dataclass
class MetaConfig:
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MetaConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


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


def episode_batch(images: torch.Tensor, ways: int, shots: int) -> TaskBatch:
    """Images `[T, N, K+Q, C, H, W]` (row n = class n) -> TaskBatch with labels 0..N-1."""
    t, n, m = images.shape[:3]
    rest = images.shape[3:]
    ways_t = torch.arange(ways, device=images.device)
    return TaskBatch(
        images[:, :, :shots].reshape(t, n * shots, *rest),
        ways_t.repeat_interleave(shots).expand(t, -1),
        images[:, :, shots:].reshape(t, n * (m - shots), *rest),
        ways_t.repeat_interleave(m - shots).expand(t, -1),
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


class MetaTrainer(EpisodicTrainer):
    """The episodic trainer with MAML / FOMAML / ANIL steps (see the module docstring).

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
    ) -> None:
        if val is not None:
            require_head_width(config)
        super().__init__(encoder, train, val, config, output, progress, model_kwargs, meta)
        self.meta_config = meta_config
        self.learner = create_meta_learner(self.model, encoder.dim, config.ways, meta_config).to(self.device)
        self.optimizer = torch.optim.Adam(
            self.learner.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )

    def _tasks(
        self, index: torch.Tensor, images: torch.Tensor, ways: int, shots: int, aug: bool
    ) -> TaskBatch:
        batch = to_input(
            images[index.flatten().to(images.device)].to(self.device), self.encoder.preprocessing
        )
        if aug:
            batch = augment(batch, self.config.augment, self.generator)
        return episode_batch(batch.view(*index.shape, *batch.shape[1:]), ways, shots)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One meta-batch of episodes, one Adam step on the meta-gradient; (loss, accuracy)."""
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        index = torch.stack([self.sampler.sample() for _ in range(self.meta_config.meta_batch)])
        tasks = self._tasks(index, self.train_images, cfg.ways, cfg.shots, aug=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self.learner.meta_backward(tasks)
        self.optimizer.step()
        self.step += 1
        acc = (logits.argmax(-1) == tasks.query_y).float().mean()
        return torch.tensor(loss), acc

    def validate(self, batch_size: int = 32) -> dict[str, float]:
        """Adapt on each fixed validation episode's support set; mean query loss, accuracy, CI."""
        assert self.val_set is not None and self.val_episodes is not None
        cfg = self.config
        losses, accs = [], []
        for start in range(0, len(self.val_episodes), batch_size):
            index = self.val_episodes[start : start + batch_size]
            tasks = self._tasks(index, self.val_set.images, cfg.val_ways, cfg.val_shots, aug=False)
            loss, accuracy = query_scores(self.learner, tasks, self.meta_config.eval_inner_steps)
            losses.append(loss)
            accs.append(accuracy)
        acc, ci = mean_ci95(torch.cat(accs))
        return {"val_loss": float(torch.cat(losses).mean()), "val_acc": acc, "val_ci95": ci}

    # -- the head and learned step sizes travel with the encoder's weights ---------------------
    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.learner.state_dict().items() if not k.startswith("body.")}

    def _state_manifest(self) -> dict[str, Any]:
        return {**super()._state_manifest(), "maml": self.meta_config.to_dict()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().state_tensors()
        tensors.update({f"learner.{k}": v for k, v in self._extra_state().items()})
        return tensors

    def load_state(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> None:
        if manifest.get("maml") != self.meta_config.to_dict():
            raise UserInputError(f"'{source}' was trained with other MAML settings: {manifest.get('maml')}")
        super().load_state(manifest, tensors, source)
        extra = {k.removeprefix("learner."): v for k, v in tensors.items() if k.startswith("learner.")}
        self.learner.load_state_dict(
            {**extra, **{f"body.{k}": v for k, v in self.model.state_dict().items()}}
        )

    def _save_best(self) -> None:
        """The episodic trainer's best checkpoint, marked as MAML, plus `DIR/maml/` (head, step sizes)."""
        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._best_extra = {k: v.detach().clone() for k, v in self._extra_state().items()}
        if self.output is None:
            return
        save_learner_extra(self.output, self.learner, self.meta_config, self.config.ways)
        extra = {
            "method": self.meta_config.method,
            "head": {"name": "maml", "ways": self.config.ways, "learner": LEARNER_DIR},
            "maml": self.meta_config.to_dict(),
            "training": self.config.to_dict(),
            "step": self.step,
            "validation": {k: v for k, v in self.best.items() if k != "step"},
            **self.meta,
        }
        ckpt.save_checkpoint(
            self.output, self.model, self.encoder.name, self.encoder.preprocessing, extra, self.model_kwargs
        )

    def _restore_best(self) -> None:
        """Like the encoder's weights: the learner is left holding the best head and step sizes."""
        best_step, step = self.best["step"], self.step
        super()._restore_best()
        extra = getattr(self, "_best_extra", None)
        if extra is None and self.output is not None:
            extra = read_learner_extra(self.output)[1]
        if extra is not None and best_step != step:
            self._last_extra = {k: v.detach().clone() for k, v in self._extra_state().items()}
            self.learner.load_state_dict({**self.learner.state_dict(), **extra})

    def fit(self) -> TrainResult:
        """The episodic trainer's loop; a second `fit` goes on from the last head and weights."""
        if getattr(self, "_last_extra", None) is not None:
            self.learner.load_state_dict({**self.learner.state_dict(), **self._last_extra})
            self._last_extra = None
        return super().fit()


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
    (e.g. `eval.episodes.sample_episodes(...).indices`); only the images they use are loaded.
    steps: inner steps at test time (default: the learner's).
    """
    rows, inverse = np.unique(indices, return_inverse=True)
    images = preload_images([items[i] for i in rows], encoder.preprocessing, progress, "loading episodes")
    x = to_input(images, encoder.preprocessing).to(encoder.device)
    index = torch.as_tensor(inverse.reshape(indices.shape))
    ways = indices.shape[1]
    out = []
    for start in range(0, len(index), batch_size):
        tasks = episode_batch(x[index[start : start + batch_size].to(x.device)], ways, shots)
        logits = learner.predict(tasks.support_x, tasks.support_y, tasks.query_x, steps=steps)
        out.append((logits.argmax(-1) == tasks.query_y).double().mean(1).cpu())
    return torch.cat(out).numpy()
