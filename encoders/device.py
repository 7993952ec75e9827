"""Device names: 'auto', 'cpu', 'cuda', 'cuda:N' (and 'mps' where it exists) into a checked name."""

from __future__ import annotations

import torch

from .errors import UserInputError

_CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(name: str) -> str:
    """The device to run on: 'auto' picks CUDA when available; a device that cannot run here is
    a `UserInputError` naming it (before any model is built)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserInputError(f"--device '{name}' is not a device name ({_CHOICES})") from None
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        return name
    if device.type == "mps" and torch.backends.mps.is_available():
        return name
    raise UserInputError(f"--device {name}: not available to run models here; use {_CHOICES}")
