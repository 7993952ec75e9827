"""Episodic training of an encoder on images; the ProtoNet method (Snell et al. 2017).

`ImageEpisodes` holds what every image trainer shares: the preloaded images on the device, the
seeded episode sampler, the fixed validation episodes and the checkpoint entries. A method (here
`ProtoNetMethod`; `SiameseMethod` and `MetaMethod` elsewhere) takes the steps, `TrainLoop` runs
it, and `EpisodicTrainer` puts the three together.

ProtoNet: each step draws an N-way episode of K support + Q query images per class, embeds all
of them in one forward pass, classifies the queries by their distance to the class prototypes
(mean support embeddings) and takes an Adam step on the cross-entropy. Every `val_every` steps
the model is scored on a fixed set of validation episodes (the same episodes each time, so
scores compare); the best one is saved as the checkpoint, the last state for resuming.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from protonets.encoders import Encoder, fingerprint_id, model_fingerprint
from protonets.encoders.checkpoint import read_checkpoint_dir, save_checkpoint
from protonets.encoders.distributed import World
from protonets.encoders.errors import UserInputError
from protonets.encoders.factory import load_state_dict_file

from ..episodes import EpisodeSampler, split_episodes
from ..heads import create_head
from ..stats import ci_or_none, mean_ci95
from .data import AUGMENTATIONS, ImageSet, augment, to_input
from .loop import Method, TrainLoop, TrainResult


class DictConfig:
    """JSON round trip of a settings dataclass (unknown keys are ignored when reading)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class TrainConfig(DictConfig):
    """Hyperparameters of an episodic run. Defaults: the paper's Omniglot setting."""

    ways: int = 60
    shots: int = 5
    queries: int = 5
    episodes: int = 10_000
    lr: float = 1e-3
    lr_step: int = 2000  # episodes between learning-rate decays
    lr_gamma: float = 0.5
    weight_decay: float = 0.0
    augment: str = "none"
    metric: str = "euclidean"
    val_ways: int = 5
    val_shots: int = 5
    val_queries: int = 15
    val_episodes: int = 100
    val_every: int = 500
    val_at_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ways", "shots", "queries", "episodes", "lr_step", "val_ways", "val_shots"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("val_queries", "val_every", "val_episodes"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserInputError(f"lr must be positive, got {self.lr}")
        if self.augment not in AUGMENTATIONS:
            raise UserInputError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got '{self.augment}'")

    def lr_at(self, step: int) -> float:
        """Step schedule: `lr × gamma^(step // lr_step)`."""
        return self.lr * self.lr_gamma ** (step // self.lr_step)


def validation_episodes(
    labels: torch.Tensor, config: TrainConfig, class_names: list[str] | None = None
) -> torch.Tensor:
    """The fixed validation episodes `[val_episodes, val_ways, val_shots + val_queries]` of a run
    (seeded by `config.seed + 1`, so every validation scores the same episodes)."""
    sampler = EpisodeSampler(
        labels, config.val_ways, config.val_shots, config.val_queries, class_names, split="validation"
    )
    return sampler.sample(np.random.default_rng(config.seed + 1), config.val_episodes)


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `tensors` named `prefix…`, without the prefix."""
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


class ImageEpisodes:
    """What an image trainer's method works with: encoder, images, samplers, checkpoint entries.

    val_episodes: fixed validation episodes in place of the sampled ones (e.g. within-alphabet).
    world: under torchrun, each rank draws its own episodes (rank 0 those of a single process).
    """

    def __init__(
        self,
        encoder: Encoder,
        train: ImageSet,
        val: ImageSet | None,
        config: TrainConfig,
        model_kwargs: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        val_episodes: torch.Tensor | None = None,
        world: World | None = None,
    ) -> None:
        expected = tuple(encoder.preprocessing["input_size"])
        for name, data in (("training", train), ("validation", val)):
            if data is not None and tuple(data.images.shape[1:]) != expected:
                raise UserInputError(
                    f"{name} images are {tuple(data.images.shape[1:])}, but encoder '{encoder.name}' "
                    f"takes {expected}; preload them with the encoder's preprocessing"
                )
        self.encoder, self.model, self.device = encoder, encoder.model, encoder.device
        self.train_set, self.val_set, self.config = train, val, config
        self.model_kwargs, self.meta = model_kwargs or {}, meta or {}
        self.world = world or World()
        seed = config.seed
        if self.world.distributed:
            from .ddp import rank_seed

            seed = rank_seed(config.seed, self.world)
        self.rng = np.random.default_rng(seed)  # the episodes
        self.generator = torch.Generator().manual_seed(seed)  # augmentation, pairs
        self.sampler = EpisodeSampler(
            train.labels, config.ways, config.shots, config.queries, train.class_names, split="training"
        )
        self.train_images = train.images.to(self.device)
        self.signature = train.signature()
        self.val_episodes = val_episodes
        if val is not None and val_episodes is None:
            self.val_episodes = validation_episodes(val.labels, config, val.class_names)

    def sample(self, count: int | None = None) -> torch.Tensor:
        """One training episode `[N, K+Q]`, or `count` of them `[count, N, K+Q]`."""
        index = self.sampler.sample(self.rng, count or 1)
        return index if count else index[0]

    def inputs(self, index: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised model inputs `[index.numel(), C, H, W]` of rows `index` (of the training images)."""
        images = self.train_images if images is None else images
        return to_input(images[index.flatten().to(images.device)].to(self.device), self.encoder.preprocessing)

    @torch.no_grad()
    def val_embeddings(self, batch_size: int = 1000) -> torch.Tensor:
        """Embeddings `[E, N, K+Q, D]` of the validation episodes (each image embedded once)."""
        assert self.val_set is not None and self.val_episodes is not None
        was_training = self.model.training
        self.model.eval()
        needed, inverse = torch.unique(self.val_episodes, return_inverse=True)
        chunks = []
        for start in range(0, len(needed), batch_size):
            images = self.val_set.images[needed[start : start + batch_size]].to(self.device)
            chunks.append(self.encoder.features(to_input(images, self.encoder.preprocessing)).float())
        self.model.train(was_training)
        return torch.cat(chunks)[inverse.to(self.device)]

    def model_weights(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, named `model.…` (as in the resume state)."""
        return {f"model.{k}": v for k, v in self.model.state_dict().items()}

    def read_best_model(self, output: str) -> dict[str, torch.Tensor]:
        """The best model weights saved in `output`, named as `model_weights` names them."""
        weights = load_state_dict_file(read_checkpoint_dir(output)["weights_file"])
        return {f"model.{k}": v for k, v in weights.items()}

    def save_checkpoint(
        self,
        output: str,
        best: dict[str, Any],
        entries: dict[str, Any],
        files: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """The best checkpoint: the model, the method's `entries`, the run's settings and scores."""
        extra = {
            **entries,
            "training": self.config.to_dict(),
            "step": best["step"],
            "validation": {k: v for k, v in best.items() if k != "step"},
            **self.meta,
        }
        save_checkpoint(
            output, self.model, self.encoder.name, self.encoder.preprocessing, extra, self.model_kwargs, files
        )

    def state_manifest(self) -> dict[str, Any]:
        """The run's entries of the resume state manifest."""
        return {
            "config": self.config.to_dict(),
            "model": self.encoder.name,
            "model_kwargs": self.model_kwargs,
            "preprocessing": self.encoder.preprocessing,
            "data_signature": self.signature,
            "meta": self.meta,
        }

    def check_state(self, manifest: dict[str, Any], source: str) -> None:
        """Refuse a resume state of another model or other data."""
        if manifest.get("model") != self.encoder.name:
            raise UserInputError(
                f"'{source}' was trained with encoder '{manifest.get('model')}', not '{self.encoder.name}'"
            )
        if manifest.get("data_signature") != self.signature:
            raise UserInputError(
                f"'{source}' was trained on other data (a different dataset, split or preprocessing); "
                "resume with the same --dataset, --data and --split"
            )


@torch.no_grad()
def validate_head(data: ImageEpisodes, head: Any) -> dict[str, float]:
    """Mean loss, accuracy and its 95% CI of `head.episode_logits` on the validation episodes."""
    cfg = data.config
    embeddings = data.val_embeddings()
    losses, accs = [], []
    was_training = head.training
    head.eval()  # a trained head's dropout off while it is scored
    for start in range(0, len(embeddings), 100):
        support, s_labels, query, labels = split_episodes(embeddings[start : start + 100], cfg.val_shots)
        logits = head.episode_logits(support, s_labels, query, cfg.val_ways)
        losses.append(F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1))
        accs.append((logits.argmax(-1) == labels).double().mean(1))
    head.train(was_training)
    acc, ci = mean_ci95(torch.cat(accs))
    return {"val_loss": float(torch.cat(losses).mean()), "val_acc": acc, "val_ci95": ci_or_none(ci)}


class ProtoNetMethod:
    """The prototype head on the encoder's embeddings: one episode, one Adam step.

    head: another head trained with the encoder (`JointHeadMethod`): its parameters join the
    optimiser, and `parts()` names every module the step trains.
    """

    def __init__(self, data: ImageEpisodes, head: Any = None) -> None:
        cfg = data.config
        self.data, self.model = data, data.model
        self.head = head if head is not None else create_head("prototype", metric=cfg.metric)
        params = [*self.model.parameters(), *self.head.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = self.episode_loss

    def parts(self) -> dict[str, torch.nn.Module]:
        """The modules a step trains, by name (DistributedDataParallel wraps them together)."""
        return {"model": self.model}

    def episode_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, logits, query labels) of one episode's model inputs `[N × (K+Q), C, H, W]`."""
        cfg = self.data.config
        embeddings = self.data.encoder.features(batch).view(cfg.ways, cfg.shots + cfg.queries, -1)
        support, s_labels, query, labels = split_episodes(embeddings, cfg.shots)
        logits = self.head.episode_logits(support, s_labels, query, cfg.ways)
        return F.cross_entropy(logits, labels), logits, labels

    def distribute(self, world: World) -> None:
        """Under torchrun: the episode loss through DistributedDataParallel (gradients averaged)."""
        from .ddp import data_parallel

        self.forward = data_parallel(self.parts(), self.episode_loss, self.data.device)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.data.config
        batch = augment(self.data.inputs(self.data.sample()), cfg.augment, self.data.generator)
        loss, logits, labels = self.forward(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels).float().mean()
        return loss.detach(), acc

    def validate(self) -> dict[str, float]:
        return validate_head(self.data, self.head)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.data.model_weights()

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(prefixed(tensors, "model."))

    def train(self, mode: bool = True) -> None:
        for module in self.parts().values():
            module.train(mode)

    def save_best(self, output: str, best: dict[str, Any]) -> None:
        head = {"name": "prototype", "metric": self.data.config.metric}
        self.data.save_checkpoint(output, best, {"method": "protonet", "head": head})

    def read_best(self, output: str) -> dict[str, torch.Tensor]:
        return self.data.read_best_model(output)


class EpisodicTrainer:
    """Train `encoder.model` episodically: `ImageEpisodes` + a method (default ProtoNet) + `TrainLoop`.

    encoder: an `protonets.encoders.Encoder` (e.g. `create_encoder("conv4", pretrained=False)`); trained in
        place, and left holding the best weights when `fit` returns.
    train / val: `ImageSet`s of preloaded uint8 images (see `preload_images`); `val` may be None
        (no validation: the last state is the best).
    output: folder for the checkpoint, the JSON-lines log and the resume state; None keeps all
        in memory (tests, benchmarks).
    meta: extra JSON saved in the checkpoint manifest (e.g. the dataset and the command line).
    world: under torchrun, this process's rank (see `TrainLoop`); default a single process.
    method: builds the method from the `ImageEpisodes` (e.g. `SiameseMethod`); a method may add
        `state_manifest()` entries and a `check_state(manifest, source)` to the resume state.
    """

    def __init__(
        self,
        encoder: Encoder,
        train: ImageSet,
        val: ImageSet | None,
        config: TrainConfig,
        output: str | os.PathLike[str] | None = None,
        progress: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        *,
        method: Callable[[ImageEpisodes], Method] = ProtoNetMethod,
        val_episodes: torch.Tensor | None = None,
        world: World | None = None,
    ) -> None:
        self.data = ImageEpisodes(encoder, train, val, config, model_kwargs, meta, val_episodes, world)
        self.encoder, self.model, self.device = encoder, encoder.model, encoder.device
        self.config, self.model_kwargs, self.meta = config, self.data.model_kwargs, self.data.meta
        self.method = method(self.data)
        self.loop = TrainLoop(
            self.method,
            seed=config.seed,
            val_every=config.val_every,
            validates=val is not None,
            rng=self.data.rng,
            generator=self.data.generator,
            lr_at=config.lr_at,
            val_at_start=config.val_at_start,
            output=output,
            progress=progress,
            device=encoder.device,
            world=self.data.world,
        )

    # the loop's progress and the method's parts, read through the trainer
    step = property(lambda self: self.loop.step)
    best = property(lambda self: self.loop.best)
    history = property(lambda self: self.loop.history)
    generator = property(lambda self: self.data.generator)
    rng = property(lambda self: self.data.rng)
    head = property(lambda self: self.method.head)

    @property
    def output(self) -> str | None:
        return self.loop.output

    @output.setter
    def output(self, value: str | os.PathLike[str] | None) -> None:
        self.loop.output = os.fspath(value) if value is not None else None

    def _state_manifest(self) -> dict[str, Any]:
        entries = self.method.state_manifest() if hasattr(self.method, "state_manifest") else {}
        return {**self.data.state_manifest(), **entries}

    def _check_state(self, manifest: dict[str, Any], source: str) -> None:
        if hasattr(self.method, "check_state"):
            self.method.check_state(manifest, source)
        self.data.check_state(manifest, source)

    def save_state(self) -> None:
        """Write the resume state (only with an output folder)."""
        self.loop.save_state(self._state_manifest())

    def resume(self) -> None:
        """Continue the run saved in the output folder: the same steps follow as without a stop."""
        self.loop.resume(self._check_state)

    def fit(self) -> TrainResult:
        """Train up to `config.episodes` steps (from the resumed step, if any); return a summary.

        The encoder is left holding the best weights, with a matching fingerprint.
        """
        result = self.loop.run(self.config.episodes, self._state_manifest)
        fingerprint = model_fingerprint(self.model, self.encoder.name, self.encoder.preprocessing)
        self.encoder.fingerprint = fingerprint
        self.encoder.fingerprint_id = fingerprint_id(fingerprint)
        return result
