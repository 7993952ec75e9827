"""The one confidence interval every reported accuracy carries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def mean_ci95(values: np.ndarray | torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width 1.96·std/√n (sample std); the half-width of a single
    value is undefined: NaN, never a false 0."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    acc = np.asarray(values, dtype=np.float64).ravel()
    if len(acc) == 0:
        raise ValueError("mean_ci95 needs at least one value")
    if len(acc) < 2:
        return float(acc.mean()), float("nan")
    return float(acc.mean()), float(1.96 * acc.std(ddof=1) / np.sqrt(len(acc)))


def ci_or_none(ci95: float) -> float | None:
    """A half-width as results files write it: None where there is none (one value), never NaN,
    which JSON cannot hold."""
    return ci95 if np.isfinite(ci95) else None
