"""Siamese checkpoint folders: the encoder checkpoint of `protonets train` plus `head.safetensors`.

The folder is a regular `protonets.Checkpoint` (so `create_encoder(checkpoint_path=DIR)` and
`--checkpoint DIR` load its encoder), whose manifest also names the head: `head` = {name,
hyperparameters, threshold, calibration}. A head trained alone on frozen embeddings is saved
the same way with the encoder it was trained on (its weights are then a copy of that encoder's).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from protonets.encoders import Encoder, create_encoder, fingerprint_id
from protonets.encoders.atomic import load_bundle, save_bundle
from protonets.encoders.errors import UserInputError
from protonets.encoders.factory import CHECKPOINT_FORMAT_VERSION, CHECKPOINT_KIND, CHECKPOINT_WEIGHTS

from ..training.checkpoint import model_fingerprint
from .head import SiameseHead

HEAD_FILE = "head.safetensors"


def _writer(tensors: dict[str, torch.Tensor]):  # noqa: ANN202
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return lambda tmp: save_file(cpu, tmp)


def save_siamese_checkpoint(
    directory: str | os.PathLike[str],
    encoder: Encoder,
    head: SiameseHead,
    extra: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Write encoder weights + head as one checkpoint folder (atomically); returns the manifest."""
    model = model if model is not None else encoder.model
    fingerprint = model_fingerprint(model, encoder.name, encoder.preprocessing)
    extra = dict(extra or {})
    calibration = extra.pop("calibration", None)
    head_state = {k: v for k, v in head.state_dict().items() if k not in ("support", "labels")}
    manifest = {
        "kind": CHECKPOINT_KIND,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": encoder.name,
        "model_kwargs": model_kwargs or {},
        "preprocessing": encoder.preprocessing,
        "fingerprint": fingerprint,
        "fingerprint_id": fingerprint_id(fingerprint),
        "parameters": sum(p.numel() for p in model.parameters()),
        "head": {
            "name": "siamese",
            "hyperparameters": head.hyperparameters(),
            "threshold": float(head.threshold),
            "calibration": calibration,
        },
        **extra,
    }
    files = {CHECKPOINT_WEIGHTS: _writer(model.state_dict()), HEAD_FILE: _writer(head_state)}
    save_bundle(directory, manifest, files)
    return manifest


def _head_bundle(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    directory = os.fspath(directory)
    manifest, files = load_bundle(directory, CHECKPOINT_KIND, CHECKPOINT_FORMAT_VERSION)
    head = manifest.get("head") or {}
    if head.get("name") != "siamese" or HEAD_FILE not in files:
        raise UserInputError(
            f"checkpoint '{directory}' holds no Siamese head (its head is "
            f"'{head.get('name', 'none')}'); pass a folder written by `protonets train --method siamese`"
        )
    return manifest, files[HEAD_FILE]


def load_head_state(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The head's tensors from a Siamese checkpoint folder."""
    return load_file(_head_bundle(directory)[1])


def load_siamese_head(directory: str | os.PathLike[str]) -> tuple[SiameseHead, dict[str, Any]]:
    """(head, manifest) of a Siamese checkpoint folder; the head carries its calibrated threshold."""
    manifest, path = _head_bundle(directory)
    head = SiameseHead(**manifest["head"]["hyperparameters"])
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
