"""Checks at the door of SupportMemory: embeddings and labels in (numpy or torch), clear errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_matrix(x: Any, dim: int, name: str) -> np.ndarray:
    """A float32, C-contiguous `[N, dim]` copy-or-view of `x` (numpy array or torch tensor).

    Refuses other types, integer/bool/complex dtypes, a rank other than 2, a wrong width and
    NaN or infinity, with a ValueError naming `name`.
    """
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point()):
            raise ValueError(f"{name} must hold floating-point values, got torch dtype {x.dtype}")
        x = x.detach().to("cpu", torch.float32).numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise ValueError(
                f"{name} must hold floating-point values, got numpy dtype {x.dtype}; "
                f"convert with {name}.astype(np.float32)"
            )
    else:
        raise TypeError(
            f"{name} must be a numpy array or torch tensor of shape [N, {dim}], got {type(x).__name__}"
        )
    if x.ndim != 2:
        hint = f"; for one vector use {name}.reshape(1, -1)" if x.ndim == 1 else ""
        raise ValueError(f"{name} must be 2-D [N, {dim}], got shape {tuple(x.shape)}{hint}")
    if x.shape[1] != dim:
        raise ValueError(
            f"{name} has {x.shape[1]} dims per row, but this memory holds {dim}-dim vectors; "
            "embed with the encoder the memory was built with"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(1))[0])
        raise ValueError(f"{name} row {bad} contains NaN or infinity")
    return x


def normalized(x: np.ndarray, name: str) -> np.ndarray:
    """Rows scaled to unit L2 norm (a new array); a zero row is an error (no direction)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        bad = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise ValueError(f"{name} row {bad} is all zeros: cosine similarity needs a direction")
    return x / norms


def as_labels(labels: Any, n: int) -> list[str | int]:
    """Class labels as a list of Python str / int, one per row; other types are refused."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().tolist()
    elif isinstance(labels, np.ndarray):
        labels = labels.tolist()
    elif isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
        raise TypeError(f"labels must be a sequence of str or int (one per row), got {labels!r:.60}")
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"got {n} embeddings but {len(labels)} labels; give one label per row")
    out: list[str | int] = []
    for i, label in enumerate(labels):
        if isinstance(label, np.generic):
            label = label.item()
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise TypeError(
                f"labels[{i}] is {label!r:.60} ({type(label).__name__}); labels must be str or int"
            )
        out.append(label)
    return out
