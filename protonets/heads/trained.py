"""What the heads trained on a frozen encoder's embeddings share (`matching`, `relation`, `feat`).

A `TrainedHead` keeps its fitted support set in buffers and scores queries with batched
`episode_logits`; training (`protonets.training.heads`) calls `episode_loss` on episodes of
cached embeddings. Its checkpoint folder is an encoder checkpoint (the frozen encoder, so
`--checkpoint DIR` embeds as the head expects) plus `head.safetensors`, the manifest's `head`
entry naming the head and its hyperparameters, as the Siamese head's folders do.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from protonets.encoders.checkpoint import read_checkpoint_dir, save_checkpoint
from protonets.encoders.errors import UserInputError

from .base import Head, SupportSetHead, check_support

HEAD_FILE = "head.safetensors"
FITTED = ("support", "labels")  # buffers of the fitted support set, not saved in checkpoints


class TrainedHead(SupportSetHead):
    """A head with learned weights: `fit` stores a detached float32 copy of the support set,
    `forward` runs `episode_logits` on it (`SupportSetHead`)."""

    name = "trained"  # the registry name, written in and checked against checkpoint folders
    needs_checkpoint = True
    memory_budget = 64 << 20

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike[str], **_: Any) -> TrainedHead:
        return load_head_checkpoint(directory, cls)

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> TrainedHead:
        check_support(support, labels)
        return super().fit(support.detach().float().clone(), labels.detach().clone())

    def check_dim(self, dim: int | None, x: torch.Tensor) -> None:
        """Refuse embeddings of another width than the head was trained on."""
        if dim is not None and x.shape[-1] != dim:
            raise UserInputError(
                f"the {self.name} head takes {dim}-d embeddings but got {x.shape[-1]}-d; "
                "use the head trained on this encoder's embeddings"
            )

    def episode_loss(
        self,
        support: torch.Tensor,
        labels: torch.Tensor,
        query: torch.Tensor,
        query_labels: torch.Tensor,
        n_way: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, logits `[E, Q, N]`) of a batch of episodes; cross-entropy by default."""
        logits = self.episode_logits(support, labels, query, n_way)
        return F.cross_entropy(logits.reshape(-1, n_way), query_labels.reshape(-1)), logits


def head_tensors(head: Head) -> dict[str, torch.Tensor]:
    """The learned tensors of a head (not its fitted support set)."""
    return {k: v.detach().contiguous() for k, v in head.state_dict().items() if k not in FITTED}


def save_head_checkpoint(
    directory: str | os.PathLike[str],
    encoder: Any,
    head: TrainedHead,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the frozen encoder + the trained head as one checkpoint folder (atomically)."""
    entry = {"name": head.name, "hyperparameters": head.hyperparameters()}
    return save_checkpoint(
        directory,
        encoder.model,
        encoder.name,
        encoder.preprocessing,
        {"head": entry, **(extra or {})},
        files={HEAD_FILE: head_tensors(head)},
    )


def load_head_checkpoint(directory: str | os.PathLike[str], cls: type[TrainedHead]) -> TrainedHead:
    """The trained head of class `cls` saved in a checkpoint folder by `save_head_checkpoint`."""
    from safetensors.torch import load_file

    manifest = read_checkpoint_dir(directory)
    entry = manifest.get("head") or {}
    paths = manifest["paths"]
    if entry.get("name") != cls.name or HEAD_FILE not in paths:
        raise UserInputError(
            f"checkpoint '{os.fspath(directory)}' holds no {cls.name} head (its head is "
            f"'{entry.get('name', 'none')}'); pass a folder written by "
            f"`protonets train --method {cls.name}` (with or without --freeze-encoder)"
        )
    head = cls(**entry["hyperparameters"])
    state = load_file(paths[HEAD_FILE])
    missing = [k for k in head.state_dict() if k not in state and k not in FITTED]
    if missing:
        raise UserInputError(f"'{paths[HEAD_FILE]}' lacks head tensors {missing[:3]}; train the head again")
    head.load_state_dict(state, strict=False)
    return head.eval()
