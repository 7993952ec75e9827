"""The trained-model checkpoint folder: one writer (`save_checkpoint`), one reader (`read_checkpoint_dir`).

A folder holds `manifest.json` (kind protonets.Checkpoint: model name, model kwargs,
preprocessing, fingerprint, parameter count, plus what the trainer adds: method, head, training
settings, validation scores) and `model-<sha>.safetensors`, and any extra named tensor files
(e.g. a Siamese head's `head.safetensors`). `create_encoder(checkpoint_path=DIR)` loads it.
No pickle: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from .atomic import MANIFEST, load_bundle, save_bundle
from .encoder import fingerprint_id, model_fingerprint
from .errors import UserInputError

#: Manifest `kind` and newest format version of a trained-model folder.
CHECKPOINT_KIND = "protonets.Checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_WEIGHTS = "model.safetensors"


def tensor_writer(tensors: dict[str, torch.Tensor]) -> Callable[[str], None]:
    """A `save_bundle` file writer for a dict of tensors (copied to the CPU now, saved later)."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return lambda tmp: save_file(cpu, tmp)


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    name: str,
    preprocessing: dict[str, Any],
    extra: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Save a model (plus `files`: role name -> tensors) as a checkpoint folder; returns the manifest.

    extra: manifest entries after the standard ones (method, head, training, validation …).
    """
    fingerprint = model_fingerprint(model, name, preprocessing)
    manifest = {
        "kind": CHECKPOINT_KIND,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": name,
        "model_kwargs": model_kwargs or {},
        "preprocessing": preprocessing,
        "fingerprint": fingerprint,
        "fingerprint_id": fingerprint_id(fingerprint),
        "parameters": sum(p.numel() for p in model.parameters()),
        **(extra or {}),
    }
    writers = {CHECKPOINT_WEIGHTS: tensor_writer(model.state_dict())}
    writers.update({role: tensor_writer(tensors) for role, tensors in (files or {}).items()})
    save_bundle(directory, manifest, writers)
    return manifest


def read_checkpoint_dir(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified manifest of a checkpoint folder; `manifest["weights_file"]` is its weights path
    and `manifest["paths"]` maps every file role (e.g. 'head.safetensors') to its checked path.

    The manifest names the timm model (`model`, `model_kwargs`) and the `preprocessing` it was
    trained with. A folder that is not such a checkpoint is a UserInputError saying so.
    """
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise UserInputError(
            f"checkpoint folder '{path}' has no {MANIFEST}: pass a folder written by "
            "`protonets train --output DIR`, or a weights file (.safetensors / .pth)"
        )
    manifest, files = load_bundle(path, CHECKPOINT_KIND, CHECKPOINT_FORMAT_VERSION)
    missing = [k for k in ("model", "preprocessing") if not isinstance(manifest.get(k), (str, dict))]
    if missing or CHECKPOINT_WEIGHTS not in files:
        what = ", ".join(missing + ([] if CHECKPOINT_WEIGHTS in files else [CHECKPOINT_WEIGHTS]))
        raise UserInputError(f"checkpoint folder '{path}': its {MANIFEST} lacks {what}; save it again")
    return {**manifest, "weights_file": files[CHECKPOINT_WEIGHTS], "paths": files}
