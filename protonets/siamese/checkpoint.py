"""Siamese checkpoint folders: the encoder checkpoint of `protonets train` plus `head.safetensors`.

The folder is a regular `protonets.Checkpoint` (so `create_encoder(checkpoint_path=DIR)` and
`--checkpoint DIR` load its encoder), whose manifest also names the head: `head` = {name,
hyperparameters, threshold, calibration}. A head trained alone on frozen embeddings is saved
the same way with the encoder it was trained on (its weights are then a copy of that encoder's).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from protonets.encoders import Encoder, create_encoder
from protonets.encoders.checkpoint import read_checkpoint_dir, save_checkpoint
from protonets.encoders.errors import UserInputError
from protonets.heads import create_head
from protonets.heads.trained import HEAD_FILE, head_tensors

if TYPE_CHECKING:
    from .head import SiameseHead


def save_siamese_checkpoint(
    directory: str | os.PathLike[str],
    encoder: Encoder,
    head: SiameseHead,
    extra: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Write encoder weights + head as one checkpoint folder (atomically); returns the manifest."""
    extra = dict(extra or {})
    entry = head_entry(head, extra.pop("calibration", None))
    return save_checkpoint(
        directory,
        model if model is not None else encoder.model,
        encoder.name,
        encoder.preprocessing,
        {"head": entry, **extra},
        model_kwargs,
        files={HEAD_FILE: head_tensors(head)},
    )


def head_entry(head: SiameseHead, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's `head` entry of a Siamese checkpoint."""
    return {
        "name": "siamese",
        "hyperparameters": head.hyperparameters(),
        "threshold": float(head.threshold),
        "calibration": calibration,
    }


def _head_bundle(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    manifest = read_checkpoint_dir(directory)
    paths = manifest.pop("paths")
    del manifest["weights_file"]
    head = manifest.get("head") or {}
    if head.get("name") != "siamese" or HEAD_FILE not in paths:
        raise UserInputError(
            f"checkpoint '{os.fspath(directory)}' holds no Siamese head (its head is "
            f"'{head.get('name', 'none')}'); pass a folder written by `protonets train --method siamese`"
        )
    return manifest, paths[HEAD_FILE]


def load_head_state(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The head's tensors from a Siamese checkpoint folder."""
    return load_file(_head_bundle(directory)[1])


def load_siamese_head(directory: str | os.PathLike[str]) -> tuple[SiameseHead, dict[str, Any]]:
    """(head, manifest) of a Siamese checkpoint folder; the head carries its calibrated threshold."""
    manifest, path = _head_bundle(directory)
    head = create_head("siamese", **manifest["head"]["hyperparameters"])
    state = load_file(path)
    missing = [k for k in head.state_dict() if k not in state and k not in ("support", "labels")]
    if missing:
        raise UserInputError(f"'{path}' lacks head tensors {missing[:3]}; save the checkpoint again")
    head.load_state_dict(state, strict=False)
    return head.eval(), manifest


def load_siamese(
    directory: str | os.PathLike[str], device: str = "cpu"
) -> tuple[Encoder, SiameseHead, dict[str, Any]]:
    """(encoder, head, manifest) of a Siamese checkpoint folder."""
    head, manifest = load_siamese_head(directory)
    encoder = create_encoder(checkpoint_path=os.fspath(directory), device=device)
    return encoder, head.to(device), manifest
