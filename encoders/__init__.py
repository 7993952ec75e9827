"""Turn images into embeddings: timm models, weights, preprocessing, batching, caching.

The public names are imported on first use (PEP 562), so `import protonets.encoders` and the
light names (errors, DEFAULT_ENCODER) cost no torch or timm import; `from protonets.encoders
import create_encoder` works as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .defaults import BUNDLED_WEIGHTS, DEFAULT_ENCODER
from .errors import FingerprintMismatchError, ImageLoadError, UserInputError
from .lazy import lazy_exports

#: public name -> the submodule that defines it (imported when the name is first read)
_LAZY = {
    "read_checkpoint_dir": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    "resolve_device": ".device",
    "EmbeddingResult": ".encoder",
    "Encoder": ".encoder",
    "fingerprint_id": ".encoder",
    "model_fingerprint": ".encoder",
    "weights_sha256": ".encoder",
    "with_image_size": ".encoder",
    "create_encoder": ".factory",
    "load_state_dict_file": ".factory",
    "ImageItem": ".images",
    "list_images": ".images",
    "open_image": ".images",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .checkpoint import read_checkpoint_dir, save_checkpoint
    from .device import resolve_device
    from .encoder import (
        EmbeddingResult,
        Encoder,
        fingerprint_id,
        model_fingerprint,
        weights_sha256,
        with_image_size,
    )
    from .factory import create_encoder, load_state_dict_file
    from .images import ImageItem, list_images, open_image


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "BUNDLED_WEIGHTS",
    "DEFAULT_ENCODER",
    "EmbeddingResult",
    "Encoder",
    "FingerprintMismatchError",
    "ImageItem",
    "ImageLoadError",
    "UserInputError",
    "create_encoder",
    "fingerprint_id",
    "list_images",
    "load_state_dict_file",
    "model_fingerprint",
    "open_image",
    "read_checkpoint_dir",
    "resolve_device",
    "save_checkpoint",
    "weights_sha256",
    "with_image_size",
]
