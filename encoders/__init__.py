"""Turn images into embeddings: timm models, weights, preprocessing, batching, caching."""

from . import conv4  # noqa: F401 - registers the `conv4` timm model
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
from .errors import FingerprintMismatchError, ImageLoadError, UserInputError
from .factory import create_encoder, load_state_dict_file
from .images import ImageItem, list_images, open_image
from .offline import BUNDLED_WEIGHTS, DEFAULT_ENCODER

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
