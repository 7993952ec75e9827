"""A trainable head (`matching`, `relation`, `feat`) trained jointly with the encoder on images.

The ProtoNet step with the head's own loss: each step embeds one N-way episode of K + Q images
per class in one forward pass and takes one Adam step on `head.episode_loss`, through both the
head and the encoder (as the papers train Matching, Relation and FEAT on Omniglot with Conv-4).
The checkpoint is the encoder's folder plus `head.safetensors`, the same folder a
`--freeze-encoder` head writes, so `protonets eval --checkpoint DIR --head-checkpoint DIR` reads it.
"""

from __future__ import annotations

from typing import Any

import torch

from protonets.encoders.distributed import World
from protonets.encoders.errors import UserInputError

from ..episodes import split_episodes
from ..heads import create_head
from ..heads.trained import FITTED, HEAD_FILE, TrainedHead, head_tensors
from .data import augment
from .heads import TRAINED_PRESETS
from .trainer import ImageEpisodes, prefixed, validate_head


class JointHeadMethod:
    """A `TrainLoop` method: encoder and trained head together, one episode per step."""

    def __init__(self, data: ImageEpisodes, name: str, contrastive: float = 0.0, **head_kwargs: Any) -> None:
        if name not in TRAINED_PRESETS:
            raise UserInputError(f"joint training takes --method {', '.join(TRAINED_PRESETS)}, not '{name}'")
        if contrastive and name != "feat":
            raise UserInputError("the contrastive regulariser is FEAT's: use it with the feat head only")
        cfg = data.config
        self.data, self.model, self.name, self.contrastive = data, data.model, name, contrastive
        options = {**TRAINED_PRESETS[name], **head_kwargs}
        self.head: TrainedHead = create_head(name, dim=data.encoder.dim, **options)
        self.head.to(data.device)
        params = [*self.model.parameters(), *self.head.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.forward = self.episode_loss

    def episode_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, logits `[1, N*Q, N]`, query labels `[1, N*Q]`) of one episode's model inputs."""
        cfg = self.data.config
        embeddings = self.data.encoder.features(batch).float().view(1, cfg.ways, cfg.shots + cfg.queries, -1)
        support, s_labels, query, q_labels = split_episodes(embeddings, cfg.shots)
        extra = (self.contrastive,) if self.contrastive else ()
        loss, logits = self.head.episode_loss(support, s_labels, query, q_labels, cfg.ways, *extra)
        return loss, logits, q_labels

    def distribute(self, world: World) -> None:
        """Under torchrun: model and head through DistributedDataParallel (gradients averaged)."""
        from .ddp import data_parallel

        parts = {"model": self.model, "head": self.head}
        self.forward = data_parallel(parts, self.episode_loss, self.data.device)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.data.config
        batch = augment(self.data.inputs(self.data.sample()), cfg.augment, self.data.generator)
        loss, logits, labels = self.forward(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (logits.detach().argmax(-1) == labels).float().mean()

    def validate(self) -> dict[str, float]:
        return validate_head(self.data, self.head)

    def weights(self) -> dict[str, torch.Tensor]:
        head = {f"head.{k}": v for k, v in self.head.state_dict().items() if k not in FITTED}
        return {**self.data.model_weights(), **head}

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(prefixed(tensors, "model."))
        self.head.load_state_dict(prefixed(tensors, "head."), strict=False)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        self.head.train(mode)

    def save_best(self, output: str, best: dict[str, Any]) -> None:
        entries = {
            "method": self.name,
            "frozen_encoder": False,
            "head": {"name": self.head.name, "hyperparameters": self.head.hyperparameters()},
        }
        self.data.save_checkpoint(output, best, entries, {HEAD_FILE: head_tensors(self.head)})

    def read_best(self, output: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        from protonets.encoders.checkpoint import read_checkpoint_dir

        head = load_file(read_checkpoint_dir(output)["paths"][HEAD_FILE])
        return {**self.data.read_best_model(output), **{f"head.{k}": v for k, v in head.items()}}

    def state_manifest(self) -> dict[str, Any]:
        """The head's name and settings in the resume state, checked on --resume."""
        return {"joint_head": {"name": self.name, "hyperparameters": self.head.hyperparameters()}}

    def check_state(self, manifest: dict[str, Any], source: str) -> None:
        saved = manifest.get("joint_head") or {}
        if saved.get("name") != self.name or saved.get("hyperparameters") != self.head.hyperparameters():
            raise UserInputError(
                f"'{source}' was trained with the head {saved.get('name', 'none')} "
                f"{saved.get('hyperparameters', {})}, not {self.name} {self.head.hyperparameters()}; "
                "resume with the same --method and head options"
            )
