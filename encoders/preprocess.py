"""Preprocessing: a plain dict (stored in fingerprints and manifests) and the transform it builds."""

from __future__ import annotations

import math
from typing import Any

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode


def preprocessing_from_timm(model: torch.nn.Module) -> dict[str, Any]:
    """The eval-time preprocessing timm declares for `model` (input size, mean, std, resize)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": str(cfg.get("interpolation", "bilinear")),
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
    }


def build_transform(pre: dict[str, Any]) -> T.Compose:
    """PIL RGB image -> normalised float tensor [C, H, W], as timm's eval transform does.

    A square input is resized on its shorter side to size / crop_pct, then centre-cropped.
    A one-channel input size turns the image greyscale first (e.g. Conv-4 on Omniglot).
    """
    channels, height, width = pre["input_size"]
    crop_pct = float(pre.get("crop_pct", 1.0))
    interpolation = InterpolationMode(pre.get("interpolation", "bilinear"))
    steps: list[Any] = []
    if channels == 1:
        steps.append(T.Grayscale(num_output_channels=1))
    if height == width:
        steps.append(T.Resize(math.floor(height / crop_pct), interpolation=interpolation))
    else:
        size = (math.floor(height / crop_pct), math.floor(width / crop_pct))
        steps.append(T.Resize(size, interpolation=interpolation))
    steps += [
        T.CenterCrop((height, width)),
        T.ToTensor(),
        T.Normalize(mean=pre["mean"][:channels], std=pre["std"][:channels]),
    ]
    return T.Compose(steps)
