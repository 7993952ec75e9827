"""A trainable head (`matching`, `relation`, `feat`) trained jointly with the encoder on images.

The ProtoNet step with the head's own loss: each step embeds one N-way episode of K + Q images
per class in one forward pass and takes one Adam step on `head.episode_loss`, through both the
head and the encoder (the papers' episodic setting, here on Conv-4 embedding vectors).
The checkpoint is the encoder's folder plus `head.safetensors`, the same folder a
`--freeze-encoder` head writes, so `protonets eval --checkpoint DIR --head-checkpoint DIR` reads it.
"""

from __future__ import annotations

from typing import Any

import torch

from protonets.encoders.errors import UserInputError

from ..episodes import split_episodes
from ..heads import create_head
from ..heads.trained import HEAD_FILE, TrainedHead, head_tensors, load_head_checkpoint
from .heads import TRAINED_PRESETS
from .trainer import ImageEpisodes, ProtoNetMethod, prefixed


class JointHeadMethod(ProtoNetMethod):
    """A `TrainLoop` method: encoder and trained head together, one episode per step.

    contrastive: weight of FEAT's contrastive regulariser (feat only); head_kwargs: the head's
    constructor options (e.g. `hidden`).
    """

    def __init__(self, data: ImageEpisodes, name: str, contrastive: float = 0.0, **head_kwargs: Any) -> None:
        if name not in TRAINED_PRESETS:
            raise UserInputError(f"joint training takes --method {', '.join(TRAINED_PRESETS)}, not '{name}'")
        if contrastive < 0 or (contrastive and name != "feat"):
            raise UserInputError("the contrastive regulariser takes a weight >= 0, and only with feat")
        options = {**TRAINED_PRESETS[name], **head_kwargs}
        head: TrainedHead = create_head(name, dim=data.encoder.dim, **options)
        super().__init__(data, head.to(data.device))
        self.name, self.contrastive = name, float(contrastive)

    def parts(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "head": self.head}

    def episode_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, logits `[1, N*Q, N]`, query labels `[1, N*Q]`) of one episode's model inputs."""
        cfg = self.data.config
        embeddings = self.data.encoder.features(batch).float().view(1, cfg.ways, cfg.shots + cfg.queries, -1)
        support, s_labels, query, q_labels = split_episodes(embeddings, cfg.shots)
        extra = (self.contrastive,) if self.contrastive else ()
        loss, logits = self.head.episode_loss(support, s_labels, query, q_labels, cfg.ways, *extra)
        return loss, logits, q_labels

    def weights(self) -> dict[str, torch.Tensor]:
        head = {f"head.{k}": v for k, v in head_tensors(self.head).items()}
        return {**self.data.model_weights(), **head}

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(prefixed(tensors, "model."))
        self.head.load_state_dict(prefixed(tensors, "head."), strict=False)

    def save_best(self, output: str, best: dict[str, Any]) -> None:
        entries = {
            "method": self.name,
            "frozen_encoder": False,
            "head": {"name": self.head.name, "hyperparameters": self.head.hyperparameters()},
            "head_training": {"contrastive": self.contrastive},
        }
        self.data.save_checkpoint(output, best, entries, {HEAD_FILE: head_tensors(self.head)})

    def read_best(self, output: str) -> dict[str, torch.Tensor]:
        head = head_tensors(load_head_checkpoint(output, type(self.head)))
        return {**self.data.read_best_model(output), **{f"head.{k}": v for k, v in head.items()}}

    def state_manifest(self) -> dict[str, Any]:
        """The head's name, settings and loss weight in the resume state, checked on --resume."""
        return {"joint_head": self._settings()}

    def check_state(self, manifest: dict[str, Any], source: str) -> None:
        saved = manifest.get("joint_head") or {}
        if saved != self._settings():
            raise UserInputError(
                f"'{source}' was trained with the head {saved}, not {self._settings()}; resume with "
                "the same --method, --hidden and --contrastive"
            )

    def _settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hyperparameters": self.head.hyperparameters(),
            "contrastive": self.contrastive,
        }
