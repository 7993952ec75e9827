"""Turn images into embeddings: timm models, weights, preprocessing, batching, caching."""

from . import conv4  # noqa: F401 - registers the `conv4` timm model
from .encoder import EmbeddingResult, Encoder, fingerprint_id, weights_sha256
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
    "open_image",
    "weights_sha256",
]
