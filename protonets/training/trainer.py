"""Episodic training of an encoder with the prototype head (Snell et al. 2017).

Each step draws an N-way episode of K support + Q query images per class, embeds all of them in
one forward pass, classifies the queries by their distance to the class prototypes (mean support
embeddings) and takes an Adam step on the cross-entropy. Every `val_every` steps the model is
scored on a fixed set of validation episodes (the same episodes each time, so scores compare);
the best one is saved as the checkpoint, the last state for resuming.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

from protonets.encoders import Encoder, fingerprint_id
from protonets.encoders.errors import UserInputError
from protonets.encoders.factory import load_state_dict_file, read_checkpoint_dir
from protonets.encoders.progress import progress_bar

from ..heads import create_head
from ..stats import mean_ci95
from . import checkpoint as ckpt
from .data import AUGMENTATIONS, ImageSet, augment, to_input
from .episodes import EpisodeSampler

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def lr_at(self, step: int) -> float:
        """Step schedule: `lr × gamma^(step // lr_step)`."""
        return self.lr * self.lr_gamma ** (step // self.lr_step)


def validation_episodes(labels: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The fixed validation episodes `[val_episodes, val_ways, val_shots + val_queries]` of a run
    (seeded by `config.seed + 1`, so every validation scores the same episodes)."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    sampler = EpisodeSampler(
        torch.as_tensor(labels, dtype=torch.int64),
        config.val_ways,
        config.val_shots,
        config.val_queries,
        generator,
        "validation",
    )
    return sampler.sample_many(config.val_episodes)


@dataclass
class TrainResult:
    """What `fit` did: steps, best validation score and step, the log records, the output folder."""

    step: int
    best_step: int
    best_val_acc: float | None
    best_val_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    output: str | None = None
    elapsed_s: float = 0.0


class EpisodicTrainer:
    """Train `encoder.model` episodically with the prototype head.

    encoder: an `protonets.encoders.Encoder` (e.g. `create_encoder("conv4", pretrained=False)`); trained in
        place, and left holding the best weights when `fit` returns.
    train / val: `ImageSet`s of preloaded uint8 images (see `preload_images`); `val` may be None
        (no validation: the last state is the best).
    output: folder for the checkpoint, the JSON-lines log and the resume state; None keeps all
        in memory (tests, benchmarks).
    meta: extra JSON saved in the checkpoint manifest (e.g. the dataset and the command line).
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
    ) -> None:
        self.encoder = encoder
        self.model = encoder.model
        self.device = encoder.device
        self.train_set, self.val_set = train, val
        self.config = config
        self.output = os.fspath(output) if output is not None else None
        self.progress = progress
        self.model_kwargs = model_kwargs or {}
        self.meta = meta or {}
        expected = tuple(encoder.preprocessing["input_size"])
        for name, data in (("training", train), ("validation", val)):
            if data is not None and tuple(data.images.shape[1:]) != expected:
                raise UserInputError(
                    f"{name} images are {tuple(data.images.shape[1:])}, but encoder '{encoder.name}' "
                    f"takes {expected}; preload them with the encoder's preprocessing"
                )
        self.head = create_head("prototype", metric=config.metric)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.sampler = EpisodeSampler(train.labels, config.ways, config.shots, config.queries, self.generator)
        self.train_images = train.images.to(self.device)
        self.val_episodes: torch.Tensor | None = None
        if val is not None:
            self.val_episodes = validation_episodes(val.labels, config)
        self.step = 0
        self.best: dict[str, Any] = {"step": 0, "val_acc": None, "val_loss": None}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []
        self._data_signature = train.signature()
        self._started = False
        self._tick = time.perf_counter()
        self._last_state: dict[str, torch.Tensor] | None = None

    # -- one step --------------------------------------------------------------------------------
    def _episode_logits(
        self, embeddings: torch.Tensor, ways: int, shots: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `[..., N*Q, N]` and query labels from embeddings `[..., N, K+Q, D]`."""
        *batch, n, m, d = embeddings.shape
        support = embeddings[..., :shots, :].reshape(*batch, n * shots, d)
        query = embeddings[..., shots:, :].reshape(*batch, n * (m - shots), d)
        ways_t = torch.arange(ways, device=embeddings.device)
        s_labels = ways_t.repeat_interleave(shots).expand(*batch, -1)
        q_labels = ways_t.repeat_interleave(m - shots).expand(*batch, -1)
        return self.head.episode_logits(support, s_labels, query, ways), q_labels

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one episode and take one optimiser step; returns (loss, accuracy) tensors."""
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        index = self.sampler.sample()  # [N, K+Q]
        batch = to_input(self.train_images[index.flatten().to(self.device)], self.encoder.preprocessing)
        batch = augment(batch, cfg.augment, self.generator)
        embeddings = self.encoder.features(batch).view(cfg.ways, cfg.shots + cfg.queries, -1)
        logits, labels = self._episode_logits(embeddings, cfg.ways, cfg.shots)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels).float().mean()
        return loss.detach(), acc

    # -- validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, batch_size: int = 1000) -> dict[str, float]:
        """Mean loss, accuracy and its 95% CI over the fixed validation episodes."""
        assert self.val_set is not None and self.val_episodes is not None
        cfg = self.config
        was_training = self.model.training
        self.model.eval()
        needed, inverse = torch.unique(self.val_episodes, return_inverse=True)
        chunks = []
        for start in range(0, len(needed), batch_size):
            rows = needed[start : start + batch_size]
            images = self.val_set.images[rows].to(self.device)
            chunks.append(self.encoder.features(to_input(images, self.encoder.preprocessing)).float())
        embeddings = torch.cat(chunks)[inverse.to(self.device)]  # [E, N, K+Q, D]
        losses, accs = [], []
        for start in range(0, len(embeddings), 100):
            logits, labels = self._episode_logits(
                embeddings[start : start + 100], cfg.val_ways, cfg.val_shots
            )
            losses.append(F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1))
            accs.append((logits.argmax(-1) == labels).double().mean(1))
        self.model.train(was_training)
        acc, ci = mean_ci95(torch.cat(accs))
        return {"val_loss": float(torch.cat(losses).mean()), "val_acc": acc, "val_ci95": ci}

    def _is_better(self, scores: dict[str, float]) -> bool:
        best_acc, best_loss = self.best["val_acc"], self.best["val_loss"]
        if best_acc is None:
            return True
        if scores["val_acc"] != best_acc:
            return scores["val_acc"] > best_acc
        return scores["val_loss"] < best_loss

    # -- saving and resuming -------------------------------------------------------------------------
    def _state_manifest(self) -> dict[str, Any]:
        groups = ckpt.optimizer_tensors(self.optimizer)[1]
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "model": self.encoder.name,
            "model_kwargs": self.model_kwargs,
            "preprocessing": self.encoder.preprocessing,
            "best": self.best,
            "elapsed_s": self.elapsed,
            "data_signature": self._data_signature,
            "param_groups": groups,
            "meta": self.meta,
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs as tensors: weights, optimiser, RNG states, best weights."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update(ckpt.optimizer_tensors(self.optimizer)[0])
        tensors["rng.sampler"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return tensors

    def load_state(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> None:
        """Restore a state saved by `save_state` (the same model, data and training settings)."""
        if manifest.get("model") != self.encoder.name:
            raise UserInputError(
                f"'{source}' was trained with encoder '{manifest.get('model')}', not '{self.encoder.name}'"
            )
        if manifest.get("data_signature") != self._data_signature:
            raise UserInputError(
                f"'{source}' was trained on other data (a different dataset, split or preprocessing); "
                "resume with the same --dataset, --data and --split"
            )
        model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state)
        ckpt.load_optimizer(self.optimizer, tensors, manifest["param_groups"])
        self.generator.set_state(tensors["rng.sampler"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.best_state = None  # the best weights live in the checkpoint folder
        self.step = int(manifest["step"])
        self.best = dict(manifest["best"])
        self.elapsed = float(manifest.get("elapsed_s", 0.0))
        self._started = True

    def save_state(self) -> None:
        """Write the resume state (only with an output folder)."""
        if self.output is not None:
            ckpt.save_state(self.output, self.state_tensors(), self._state_manifest())

    def resume(self) -> None:
        """Continue the run saved in the output folder: the same steps follow as without a stop."""
        if self.output is None:
            raise UserInputError("resume needs the output folder of the run to continue")
        manifest, tensors = ckpt.load_state(self.output)
        self.load_state(manifest, tensors, self.output)
        ckpt.truncate_log(self.output, self.step)
        self.history = ckpt.read_log(self.output)

    def _save_best(self) -> None:
        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.output is None:
            return
        extra = {
            "method": "protonet",
            "head": {"name": "prototype", "metric": self.config.metric},
            "training": self.config.to_dict(),
            "step": self.step,
            "validation": {k: v for k, v in self.best.items() if k != "step"},
            **self.meta,
        }
        ckpt.save_checkpoint(
            self.output, self.model, self.encoder.name, self.encoder.preprocessing, extra, self.model_kwargs
        )

    def _clock(self) -> None:
        now = time.perf_counter()
        self.elapsed += now - self._tick
        self._tick = now

    def _checkpoint(self, record: dict[str, Any]) -> None:
        """Validate, keep the best, save the resume state, log a line."""
        self._clock()
        if self.val_set is not None:
            record.update(self.validate())
            record["best"] = self._is_better(record)
            if record["best"]:
                self.best = {"step": self.step, "val_acc": record["val_acc"], "val_loss": record["val_loss"]}
                self._save_best()
        else:
            record["best"] = True
            self.best = {"step": self.step, "val_acc": None, "val_loss": None}
            self._save_best()
        record["elapsed_s"] = round(self.elapsed, 3)
        self.save_state()
        self.history.append(record)
        if self.output is not None:
            ckpt.append_log(self.output, record)

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train up to `config.episodes` steps (from the resumed step, if any); return a summary."""
        cfg = self.config
        self._tick = time.perf_counter()
        if not self._started:
            torch.manual_seed(cfg.seed)
            self._started = True
            if self.output is not None:
                os.makedirs(self.output, exist_ok=True)
                if os.path.exists(os.path.join(self.output, ckpt.LOG_FILE)):
                    ckpt.truncate_log(self.output, -1)
            self.model.train()
            if cfg.val_at_start and self.val_set is not None:
                self._checkpoint({"step": 0, "lr": cfg.lr_at(0)})
        if self._last_state is not None:  # fit() again: go on from the last weights, not the best
            self.model.load_state_dict(self._last_state)
            self._last_state = None
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        acc_sum = torch.zeros((), device=self.device)
        count = 0
        train_time = 0.0
        with progress_bar(
            total=cfg.episodes, initial=self.step, enabled=self.progress, desc="train", unit="ep"
        ) as bar:
            while self.step < cfg.episodes:
                step_start = time.perf_counter()
                loss, acc = self.train_step()
                loss_sum += loss
                acc_sum += acc
                count += 1
                train_time += time.perf_counter() - step_start
                bar.update(1)
                if not bar.disable and count % 10 == 0:
                    running = {
                        "loss": f"{float(loss_sum) / count:.3f}",
                        "acc": f"{float(acc_sum) / count:.3f}",
                    }
                    bar.set_postfix(running, refresh=False)
                if self.step % cfg.val_every == 0 or self.step == cfg.episodes:
                    record = {
                        "step": self.step,
                        "lr": cfg.lr_at(self.step - 1),
                        "train_loss": float(loss_sum) / count,
                        "train_acc": float(acc_sum) / count,
                        "episodes_per_s": round(count / train_time, 4) if train_time else None,
                    }
                    self._checkpoint(record)
                    if record.get("val_acc") is not None:
                        bar.set_postfix(
                            loss=f"{record['train_loss']:.3f}",
                            acc=f"{record['train_acc']:.3f}",
                            val=f"{record['val_acc']:.4f}",
                            refresh=False,
                        )
                    loss_sum.zero_()
                    acc_sum.zero_()
                    count, train_time = 0, 0.0
        self._clock()
        self._restore_best()
        return TrainResult(
            step=self.step,
            best_step=self.best["step"],
            best_val_acc=self.best["val_acc"],
            best_val_loss=self.best["val_loss"],
            history=list(self.history),
            output=self.output,
            elapsed_s=self.elapsed,
        )

    def _restore_best(self) -> None:
        """Leave the encoder holding the best weights, with a matching fingerprint."""
        if self.best_state is None and self.output is not None:
            saved = read_checkpoint_dir(self.output)
            self.best_state = load_state_dict_file(saved["weights_file"])
        if self.best_state is not None and self.best["step"] != self.step:
            self._last_state = copy.deepcopy(self.model.state_dict())
            self.model.load_state_dict(copy.deepcopy(self.best_state))
        self.model.eval()
        fingerprint = ckpt.model_fingerprint(self.model, self.encoder.name, self.encoder.preprocessing)
        self.encoder.fingerprint = fingerprint
        self.encoder.fingerprint_id = fingerprint_id(fingerprint)
