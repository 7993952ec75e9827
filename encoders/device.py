"""Device names: 'auto', 'cpu', 'cuda', 'cuda:N' (and 'mps' where it exists) into a checked name."""

from __future__ import annotations

import re

from .errors import UserInputError

_CHOICES = "cpu, cuda, cuda:N or auto"
_NAME = re.compile(r"(cpu|cuda|mps)(:\d+)?")


def resolve_device(name: str) -> str:
    """The device to run on: 'auto' picks CUDA when available; a device that cannot run here is
    a `UserInputError` naming it (before any model is built).

    Names other than cpu, cuda[:N], mps[:N] and auto (e.g. 'meta', 'xla', 'gpu') are refused
    before torch is imported, so the answer is immediate.
    """
    if not isinstance(name, str):
        raise UserInputError(f"--device must be a name ({_CHOICES}), got {name!r}")
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    match = _NAME.fullmatch(name)
    if match is None:
        raise UserInputError(f"--device {name}: not a device that runs models here; use {_CHOICES}")
    kind = match.group(1)
    if kind == "cpu":
        return name
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {name}: no CUDA device is available here; use --device cpu")
        index = int(match.group(2)[1:]) if match.group(2) else None
        if index is not None and index >= torch.cuda.device_count():
            raise UserInputError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        return name
    if torch.backends.mps.is_available():
        return name
    raise UserInputError(f"--device {name}: Apple's MPS is not available on this machine; use {_CHOICES}")
