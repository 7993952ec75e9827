"""Training images held in memory: decoded once into a uint8 tensor, normalised per episode.

`preload_images` runs every image through the encoder's own eval transform (the one
`Encoder.embed` uses) without its final Normalize, and stores the result as uint8; `to_input`
later divides by 255 and normalises exactly as that transform does, so a trained model sees the
same numbers at training time as `protonets eval` gives it. Each file is decoded once, also
when a dataset lists it several times (Omniglot's rotated classes).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from protonets.encoders import ImageItem, open_image
from protonets.encoders.errors import UserInputError
from protonets.encoders.progress import progress_bar

if TYPE_CHECKING:  # torchvision is imported when images are preprocessed, not with the module
    from torchvision import transforms as T

from .options import AUGMENTATIONS  # noqa: E402,F401  (re-exported: data's old home)

log = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """Images uint8 `[N, C, H, W]` with integer `labels` `[N]` (and optional class names)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(np.asarray(self.labels), dtype=torch.int64)
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be [N] = [{self.images.shape[0]}], got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def signature(self) -> str:
        """sha256 of images and labels: a resumed run checks it trains on the same data."""
        digest = hashlib.sha256()
        digest.update(f"{tuple(self.images.shape)}|".encode())
        digest.update(self.images.contiguous().numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()


def _unnormalised_transform(preprocessing: dict[str, Any]) -> T.Compose:
    from torchvision import transforms as T

    from protonets.encoders.preprocess import build_transform

    steps = build_transform(preprocessing).transforms
    if not isinstance(steps[-1], T.Normalize):  # pragma: no cover - guards a change in preprocess.py
        raise RuntimeError("build_transform no longer ends with Normalize; update preload_images")
    return T.Compose(steps[:-1])


def preload_images(
    items: Sequence[ImageItem | str],
    preprocessing: dict[str, Any],
    progress: bool = True,
    desc: str = "loading images",
) -> torch.Tensor:
    """Decode, rotate and resize every image once: uint8 `[N, C, H, W]` at the model's input size.

    Uses the encoder's eval transform minus Normalize (see the module docstring), so the values
    are exactly those `Encoder.embed` would normalise. Unreadable files raise ImageLoadError.
    """
    items = [it if isinstance(it, ImageItem) else ImageItem(str(it)) for it in items]
    transform = _unnormalised_transform(preprocessing)
    channels, height, width = preprocessing["input_size"]
    need = len(items) * channels * height * width
    if need > 8 << 30:
        log.warning(
            "holding %d images at %dx%dx%d takes %.1f GiB of memory",
            len(items),
            channels,
            height,
            width,
            need / 2**30,
        )
    out = torch.empty(len(items), channels, height, width, dtype=torch.uint8)
    order = sorted(range(len(items)), key=lambda i: items[i].path)
    with progress_bar(total=len(items), enabled=progress, desc=desc, unit="img") as bar:
        start = 0
        while start < len(order):
            path = items[order[start]].path
            stop = start
            while stop < len(order) and items[order[stop]].path == path:
                stop += 1
            image = open_image(path)
            for i in order[start:stop]:
                rotation = items[i].rotation % 360
                rotated = image.rotate(rotation, expand=True) if rotation else image
                out[i] = transform(rotated).mul(255).round_().to(torch.uint8)
            bar.update(stop - start)
            start = stop
    return out


def to_input(images: torch.Tensor, preprocessing: dict[str, Any]) -> torch.Tensor:
    """uint8 `[B, C, H, W]` -> the normalised float batch the encoder's transform would give."""
    channels = images.shape[1]
    mean = torch.tensor(preprocessing["mean"][:channels], device=images.device).view(-1, 1, 1)
    std = torch.tensor(preprocessing["std"][:channels], device=images.device).view(-1, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)


def augment(
    batch: torch.Tensor, kind: str, generator: torch.Generator, max_shift: int | None = None
) -> torch.Tensor:
    """Random horizontal flips and/or translations (zero-padded, up to 1/14 of the side) per image.

    The random numbers come from `generator` (on the CPU) so a run is repeatable and resumable.
    """
    if kind == "none":
        return batch
    if kind not in AUGMENTATIONS:
        raise UserInputError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got '{kind}'")
    b, _, h, w = batch.shape
    if "flip" in kind:
        flip = (torch.rand(b, generator=generator) < 0.5).to(batch.device)
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
    if "shift" in kind:
        pad = max_shift if max_shift is not None else max(1, round(min(h, w) / 14))
        padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(batch.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(batch.device)
        rows = (dy.view(-1, 1) + torch.arange(h, device=batch.device)).view(b, 1, h, 1)
        cols = (dx.view(-1, 1) + torch.arange(w, device=batch.device)).view(b, 1, 1, w)
        index = torch.arange(b, device=batch.device).view(b, 1, 1, 1)
        channel = torch.arange(batch.shape[1], device=batch.device).view(1, -1, 1, 1)
        batch = padded[index, channel, rows, cols]
    return batch
