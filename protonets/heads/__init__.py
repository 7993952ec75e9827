"""Few-shot heads: support embeddings + labels, query embeddings -> logits."""

from .base import HEADS, Head, create_head, register_head
from .prototype import PrototypeHead, compute_prototypes, prototype_logits, transform_features

__all__ = [
    "HEADS",
    "Head",
    "PrototypeHead",
    "compute_prototypes",
    "create_head",
    "prototype_logits",
    "register_head",
    "transform_features",
]
