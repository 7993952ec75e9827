"""The Encoder: a timm model plus its preprocessing, turning images into float32 embeddings."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import ImageLoadError, UserInputError
from .images import ImageItem, check_image, open_image
from .progress import progress_bar

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape and bytes), in order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module, name: str, preprocessing: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint of a model's current weights: timm name, weights sha256, preprocessing."""
    return {"model": name, "weights_sha256": weights_sha256(model), "preprocessing": preprocessing}


def fingerprint_id(fingerprint: dict[str, Any]) -> str:
    """A short stable id of a fingerprint (used to name cache folders)."""
    blob = json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class EmbeddingResult:
    """Embeddings of the images that could be read; `kept[i]` is the input index of row i."""

    embeddings: torch.Tensor
    kept: list[int]
    failed: list[tuple[int, str]]


class _ImageDataset(Dataset):
    def __init__(self, items: Sequence[Any], transform: Any) -> None:
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            return self.transform(open_image(self.items[index])), index, None
        except ImageLoadError as exc:
            return None, index, str(exc)


def _collate(batch: list[tuple[torch.Tensor | None, int, str | None]]):
    good = [(x, i) for x, i, _ in batch if x is not None]
    errors = [(i, e) for x, i, e in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], errors


class Encoder:
    """A frozen image encoder: `embed(images)` gives float32 `[N, D]` embeddings.

    Build one with `protonets.encoders.create_encoder`. `fingerprint` names the model, its weights and the
    preprocessing, so stored embeddings can be checked against the encoder that made them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        preprocessing: dict[str, Any],
        device: str | torch.device = "cpu",
        channels_last: bool = True,
    ) -> None:
        self.name = name
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.model = model.eval().to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._transform: Any = None
        self.fingerprint = model_fingerprint(self.model, name, preprocessing)
        self.fingerprint_id = fingerprint_id(self.fingerprint)
        self._dim: int | None = None

    @property
    def transform(self) -> Any:
        """The image preprocessing (PIL image -> tensor), built on first use (torchvision)."""
        if self._transform is None:
            from .preprocess import build_transform

            self._transform = build_transform(self.preprocessing)
        return self._transform

    @property
    def dim(self) -> int:
        """Embedding width D."""
        if self._dim is None:
            c, h, w = self.preprocessing["input_size"]
            self._dim = int(self.forward(torch.zeros(1, c, h, w)).shape[1])
        return self._dim

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features of a preprocessed batch, with gradients (for fine-tuning)."""
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        model = self.model
        if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
            return model.forward_head(model.forward_features(batch), pre_logits=True)
        return model(batch)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Embeddings of a preprocessed batch `[B, C, H, W]` as float32 on the CPU."""
        with torch.inference_mode():
            return self.features(batch).float().cpu()

    def embed(
        self,
        images: Sequence[str | ImageItem | Image.Image],
        batch_size: int = 64,
        num_workers: int = 2,
        progress: bool = True,
        skip_bad: bool = False,
        desc: str = "embedding",
    ) -> EmbeddingResult:
        """Embed image files (or PIL images) in batches through a DataLoader.

        An unreadable image raises ImageLoadError naming the file, unless `skip_bad`, which logs a
        warning and leaves it out (see `EmbeddingResult.kept`). Without `skip_bad`, every file's
        header is checked first, so a bad image is reported before any batch is embedded.
        """
        items = list(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not skip_bad:
            for item in items:
                problem = check_image(item)
                if problem is not None:
                    raise ImageLoadError(problem)
        workers = num_workers if len(items) > batch_size else 0
        loader = DataLoader(
            _ImageDataset(items, self.transform),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate,
            persistent_workers=False,
        )
        chunks: list[torch.Tensor] = []
        kept: list[int] = []
        failed: list[tuple[int, str]] = []
        with progress_bar(total=len(items), enabled=progress, desc=desc, unit="img") as bar:
            for batch, indices, errors in loader:
                for index, message in errors:
                    if not skip_bad:
                        raise ImageLoadError(message)
                    log.warning("skipped: %s", message)
                    failed.append((index, message))
                if batch is not None:
                    chunks.append(self._finite(self.forward(batch), [items[i] for i in indices]))
                    kept.extend(indices)
                bar.update(len(indices) + len(errors))
        embeddings = torch.cat(chunks) if chunks else torch.empty(0, self.dim)
        return EmbeddingResult(embeddings, kept, failed)

    def _finite(self, embeddings: torch.Tensor, items: list[Any]) -> torch.Tensor:
        """`embeddings`, or a UserInputError naming the first image whose embedding is not finite
        (NaN or inf come from broken weights, e.g. a training run that diverged, not the image)."""
        bad = ~torch.isfinite(embeddings).all(-1)
        if bad.any():
            item = items[int(bad.nonzero()[0, 0])]
            where = getattr(item, "path", item if isinstance(item, str) else "an image")
            raise UserInputError(
                f"encoder {self.name} gave NaN or inf for '{where}' ({int(bad.sum())} of "
                f"{len(items)} images in its batch): its weights are broken; use another --checkpoint"
            )
        return embeddings


class LazyEncoder(Encoder):
    """An Encoder whose fingerprint (and width) are already known, from the fingerprint cache
    (see `create_encoder(lazy=True)`): the model is built only when something needs it, e.g. an
    image that the embedding cache does not hold. Until then nothing of timm is imported."""

    def __init__(
        self,
        build: Callable[[], Encoder],
        name: str,
        preprocessing: dict[str, Any],
        fingerprint: dict[str, Any],
        dim: int,
        device: str | torch.device = "cpu",
    ) -> None:
        self._build = build
        self.name = name
        self.preprocessing = preprocessing
        self.fingerprint = fingerprint
        self.fingerprint_id = fingerprint_id(fingerprint)
        self.device = torch.device(device)
        self._dim = int(dim)
        self._transform = None

    @property
    def built(self) -> bool:
        """Whether the model has been built (some image had to be embedded)."""
        return "_build" not in self.__dict__

    def __getattr__(self, attr: str) -> Any:
        """`model`, `channels_last` …: build the encoder on first use, then act as it."""
        build = self.__dict__.pop("_build", None) if not attr.startswith("__") else None
        if build is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")
        real = build()
        if real.fingerprint != self.fingerprint:
            raise UserInputError(
                f"the weights of encoder '{self.name}' changed while keeping their file size and "
                "time; run the command again (the stale fingerprint was dropped)"
            )
        self.__dict__.update(real.__dict__)
        return getattr(self, attr)


def with_image_size(encoder: Encoder, image_size: int | None, resuming: bool = False) -> Encoder:
    """`encoder` with its input side set to `image_size` (None: unchanged).

    A resumed run keeps the size it was trained at; asking for another one is an error.
    """
    current = int(encoder.preprocessing["input_size"][-1])
    if not image_size or image_size == current:
        return encoder
    if resuming:
        raise UserInputError(
            f"cannot change --image-size when resuming: the run was trained at {current} px; "
            "leave --image-size out or start a new run"
        )
    channels = encoder.preprocessing["input_size"][0]
    pre = {**encoder.preprocessing, "input_size": [channels, image_size, image_size]}
    return Encoder(
        encoder.model, encoder.name, pre, device=encoder.device, channels_last=encoder.channels_last
    )
