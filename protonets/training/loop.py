"""The one training loop: step, validate every `val_every`, keep the best, save, log, resume.

Every trainer (ProtoNet, Siamese, MAML, and the heads trained alone on frozen embeddings) is a
small `Method` run by `TrainLoop`: the method knows how to take a step, score the validation
data and save its best checkpoint; the loop does the rest once — the learning-rate schedule,
running means and the progress bar, the best state (in memory, and on disk through the method),
the JSON-lines log, the resume state (weights, optimiser, RNG states) and continuing from it.

Under `torchrun` (a `world` of several ranks) every rank takes the same steps on its own episodes
(a method's `distribute(world)` wraps it for DistributedDataParallel); rank 0 alone validates,
shows progress and writes the checkpoint, the log and the resume state, which holds every rank's
RNG states and the world size (a resume needs the same number of processes).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from protonets.encoders.distributed import World, all_gather, all_ranks_agree, broadcast
from protonets.encoders.errors import UserInputError
from protonets.encoders.progress import progress_bar

from . import checkpoint as ckpt

log = logging.getLogger(__name__)


class Method(Protocol):
    """What one kind of training brings to `TrainLoop`.

    Under torchrun a method also has `distribute(world)`: from then on its steps average their
    gradients over the ranks (DistributedDataParallel), starting from rank 0's weights.
    """

    optimizer: torch.optim.Optimizer

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step; (loss, accuracy) as detached tensors."""

    def validate(self) -> dict[str, float]:
        """Validation scores (e.g. val_loss, val_acc, val_ci95)."""

    def weights(self) -> dict[str, torch.Tensor]:
        """Everything learned, under prefixed names (`model.…`, `head.…`)."""

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `weights` (extra entries are ignored)."""

    def train(self, mode: bool = True) -> None:
        """Training or evaluation mode."""

    def save_best(self, output: str, best: dict[str, Any]) -> None:
        """Write the best checkpoint folder (the method's current weights are the best)."""

    def read_best(self, output: str) -> dict[str, torch.Tensor]:
        """The weights of the best checkpoint saved in `output`, as `weights()` names them."""


class InMemoryMethod:
    """Base of the methods that train one module alone and keep their best weights in memory
    (heads on frozen embeddings): by default weights, `load_weights` and the mode are
    `self.module`'s (a subclass may narrow them, e.g. leave out a head's fitted buffers)."""

    module: torch.nn.Module

    def weights(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(tensors)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save_best(self, output: str, best: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} keeps its best weights in memory")

    def read_best(self, output: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} keeps its best weights in memory")


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


def _clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


class TrainLoop:
    """Run a `Method` for `steps` steps (see the module docstring).

    rng / generator: the numpy episode Generator and the torch Generator (augmentation, pairs) the
        method draws from; their states are saved with the resume state.
    lr_at: learning rate of a step (None: the optimiser's own, and no `lr` in the records).
    validates: whether `method.validate` has data; without, the last state is the best.
    score: orders validation scores (higher is better); best_keys: what `best` keeps of them.
    output: folder for the best checkpoint, the log and the resume state; None keeps all in memory.
    world: this process's place in a `torchrun` launch (default: a single process).
    """

    def __init__(
        self,
        method: Method,
        *,
        seed: int,
        val_every: int,
        validates: bool,
        rng: np.random.Generator,
        generator: torch.Generator,
        lr_at: Callable[[int], float] | None = None,
        val_at_start: bool = False,
        output: str | os.PathLike[str] | None = None,
        progress: bool = True,
        device: torch.device | None = None,
        score: Callable[[dict[str, Any]], tuple] = lambda r: (r["val_acc"], -r["val_loss"]),
        best_keys: tuple[str, ...] = ("val_acc", "val_loss"),
        desc: str = "train",
        unit: str = "ep",
        world: World | None = None,
    ) -> None:
        self.method = method
        self.seed, self.val_every, self.validates = seed, val_every, validates
        self.rng, self.generator = rng, generator
        self.lr_at, self.val_at_start = lr_at, val_at_start
        self.output = os.fspath(output) if output is not None else None
        self.progress, self.device = progress, device or torch.device("cpu")
        self.score, self.best_keys = score, best_keys
        self.desc, self.unit = desc, unit
        self.world = world or World()
        self._distributed = False  # the method is wrapped for DDP (once, at the first run)
        self.step = 0
        self.best: dict[str, Any] = {"step": 0, **dict.fromkeys(best_keys)}
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []
        self._started = False
        self._tick = time.perf_counter()
        self._last_weights: dict[str, torch.Tensor] | None = None

    # -- the resume state ----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, manifest entries) of the resume state: weights, optimiser, RNGs, step, best."""
        tensors, groups = ckpt.optimizer_tensors(self.method.optimizer)
        tensors.update(self.method.weights())
        tensors["rng.sampler"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        manifest = {
            "step": self.step,
            "best": self.best,
            "elapsed_s": self.elapsed,
            "param_groups": groups,
            "episode_rng": self.rng.bit_generator.state,
            "world_size": self.world.size,
        }
        return tensors, manifest

    def _rng_state(self) -> dict[str, Any]:
        state = {"sampler": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"tensors": state, "episode_rng": self.rng.bit_generator.state}

    def _ranks_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The other ranks' RNG states (`rank<R>.rng.…` tensors, `episode_rng_ranks`); a collective."""
        gathered = all_gather(self.world, self._rng_state())
        tensors = {
            f"rank{r}.rng.{k}": v for r, s in enumerate(gathered[1:], 1) for k, v in s["tensors"].items()
        }
        return tensors, {"episode_rng_ranks": [s["episode_rng"] for s in gathered[1:]]}

    def load_state(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore a state from `state()`; an older state without the episode RNG re-seeds it.

        Under torchrun each rank takes its own RNG states (`rank<R>.rng.…`; rank 0: `rng.…`).
        """
        self.method.load_weights(tensors)
        ckpt.load_optimizer(self.method.optimizer, tensors, manifest["param_groups"])
        prefix = "" if self.world.rank == 0 else f"rank{self.world.rank}."
        self.generator.set_state(tensors[f"{prefix}rng.sampler"])
        torch.set_rng_state(tensors[f"{prefix}rng.torch"])
        if f"{prefix}rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors[f"{prefix}rng.cuda"], self.device)
        self.step = int(manifest["step"])
        if self.world.rank > 0:
            self.rng.bit_generator.state = manifest["episode_rng_ranks"][self.world.rank - 1]
        elif "episode_rng" in manifest:
            self.rng.bit_generator.state = manifest["episode_rng"]
        else:
            log.warning(
                "this resume state comes from an older protonets that drew episodes with another "
                "sampler: episodes are re-seeded from (seed %d, step %d), so the episodes after step "
                "%d (and the validation episodes) differ from those of an uninterrupted run",
                self.seed,
                self.step,
                self.step,
            )
            self.rng.bit_generator.state = np.random.default_rng([self.seed, self.step]).bit_generator.state
        self.best_weights = None  # the best weights live in the checkpoint folder
        self.best = dict(manifest["best"])
        self.elapsed = float(manifest.get("elapsed_s", 0.0))
        self._started = True

    def save_state(self, manifest: dict[str, Any]) -> None:
        """Write the resume state (only with an output folder), with `manifest` entries added.

        Under torchrun every rank must call it (the RNG states are gathered); rank 0 writes.
        """
        if self.output is None:
            return
        if self.world.distributed:
            ranks_tensors, ranks_entries = self._ranks_state()
        if self.world.is_main:
            tensors, entries = self.state()
            if self.world.distributed:
                tensors.update(ranks_tensors)
                entries.update(ranks_entries)
            ckpt.save_state(self.output, tensors, {**manifest, **entries})

    def resume(self, check: Callable[[dict[str, Any], str], None] | None = None) -> None:
        """Continue the run saved in the output folder; `check(manifest, folder)` refuses a mismatch.

        Under torchrun rank 0 reads the folder and sends the state to the others (every rank
        must call this; an error on rank 0 stops all of them).
        """
        from .ddp import check_world_size

        if self.output is None:
            raise UserInputError("resume needs the output folder of the run to continue")
        loaded = None
        with all_ranks_agree(self.world):
            if self.world.is_main:
                manifest, tensors = ckpt.load_state(self.output)
                check_world_size(manifest, self.world, self.output)
                if check is not None:
                    check(manifest, self.output)
                loaded = (manifest, tensors)
        manifest, tensors = broadcast(self.world, loaded)
        self.load_state(manifest, tensors)
        if self.world.is_main:
            ckpt.truncate_log(self.output, self.step)
            self.history = ckpt.read_log(self.output)

    # -- validation and the best ---------------------------------------------------------------------
    def _clock(self) -> None:
        now = time.perf_counter()
        self.elapsed += now - self._tick
        self._tick = now

    def _is_better(self, record: dict[str, Any]) -> bool:
        if self.best[self.best_keys[0]] is None:
            return True
        return self.score(record) > self.score(self.best)

    def checkpoint(self, record: dict[str, Any], manifest: dict[str, Any]) -> None:
        """Validate, keep the best, save the resume state, log a line.

        Under torchrun rank 0 validates, saves and logs, then sends its record to the others.
        """
        self._clock()
        if not self.world.is_main:
            self.save_state(manifest)  # the RNG states gathered by rank 0
            record = broadcast(self.world, None)
            if record["best"]:
                self.best = {"step": self.step, **{k: record.get(k) for k in self.best_keys}}
                self.best_weights = _clone(self.method.weights())
            self.history.append(record)
            return
        if self.validates:
            record.update(self.method.validate())
            record["best"] = self._is_better(record)
        else:
            record["best"] = True
        if record["best"]:
            self.best = {"step": self.step, **{k: record.get(k) for k in self.best_keys}}
            self.best_weights = _clone(self.method.weights())
            if self.output is not None:
                self.method.save_best(self.output, self.best)
        record["elapsed_s"] = round(self.elapsed, 3)
        self.save_state(manifest)
        self.history.append(record)
        if self.output is not None:
            ckpt.append_log(self.output, record)
        broadcast(self.world, record)

    # -- the loop ------------------------------------------------------------------------------------
    def _lr(self, step: int) -> dict[str, float]:
        return {} if self.lr_at is None else {"lr": self.lr_at(step)}

    def run(self, steps: int, manifest: Callable[[], dict[str, Any]] = dict) -> TrainResult:
        """Train up to `steps` steps (from the resumed step, if any), leave the best weights loaded.

        manifest: the caller's entries of the resume state (config, model, data signature …).
        """
        self._tick = time.perf_counter()
        if self.world.distributed and not self._distributed:
            from .ddp import rank_seed

            self.method.distribute(self.world)  # type: ignore[attr-defined]
            self._distributed = True
        if not self._started:
            torch.manual_seed(self.seed if not self.world.distributed else rank_seed(self.seed, self.world))
            self._started = True
            if self.output is not None and self.world.is_main:
                os.makedirs(self.output, exist_ok=True)
                if os.path.exists(os.path.join(self.output, ckpt.LOG_FILE)):
                    ckpt.truncate_log(self.output, -1)
            self.method.train(True)
            if self.val_at_start and self.validates:
                self.checkpoint({"step": 0, **self._lr(0)}, manifest())
        if self._last_weights is not None:  # run() again: go on from the last weights, not the best
            self.method.load_weights(self._last_weights)
            self._last_weights = None
        self.method.train(True)
        loss_sum = torch.zeros((), device=self.device)
        acc_sum = torch.zeros((), device=self.device)
        count, train_time = 0, 0.0
        enabled, desc, unit = self.progress and self.world.is_main, self.desc, self.unit
        with progress_bar(total=steps, initial=self.step, enabled=enabled, desc=desc, unit=unit) as bar:
            while self.step < steps:
                step_start = time.perf_counter()
                if self.lr_at is not None:
                    for group in self.method.optimizer.param_groups:
                        group["lr"] = self.lr_at(self.step)
                loss, acc = self.method.train_step()
                self.step += 1
                loss_sum += loss.to(self.device)
                acc_sum += acc.to(self.device)
                count += 1
                train_time += time.perf_counter() - step_start
                bar.update(1)
                if not bar.disable and count % 10 == 0:
                    running = {
                        "loss": f"{float(loss_sum) / count:.3f}",
                        "acc": f"{float(acc_sum) / count:.3f}",
                    }
                    bar.set_postfix(running, refresh=False)
                if self.step % self.val_every == 0 or self.step == steps:
                    record = {
                        "step": self.step,
                        **self._lr(self.step - 1),
                        "train_loss": float(loss_sum) / count,
                        "train_acc": float(acc_sum) / count,
                        "episodes_per_s": round(count / train_time, 4) if train_time else None,
                    }
                    self.checkpoint(record, manifest())
                    if record.get(self.best_keys[0]) is not None:
                        bar.set_postfix(
                            loss=f"{record['train_loss']:.3f}",
                            acc=f"{record['train_acc']:.3f}",
                            val=f"{record[self.best_keys[0]]:.4f}",
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
            best_val_acc=self.best.get("val_acc"),
            best_val_loss=self.best.get("val_loss"),
            history=list(self.history),
            output=self.output,
            elapsed_s=self.elapsed,
        )

    def _restore_best(self) -> None:
        """Leave the method holding the best weights (read back from the output after a resume;
        under torchrun the other ranks keep their last weights when the best is only on disk)."""
        if self.best_weights is None and self.output is not None and self.world.is_main:
            self.best_weights = self.method.read_best(self.output)
        if self.best_weights is not None and self.best["step"] != self.step:
            self._last_weights = copy.deepcopy(self.method.weights())
            self.method.load_weights(copy.deepcopy(self.best_weights))
        self.method.train(False)
