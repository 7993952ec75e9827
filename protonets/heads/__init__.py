"""Few-shot heads: support embeddings + labels, query embeddings -> logits.

`registry` names every head (one line each, imported on first use); `base.Head` is the contract.
"""

from .base import Head
from .prototype import PrototypeHead, compute_prototypes, prototype_logits, transform_features
from .registry import HEADS, HeadSpec, build_head, create_head, head_spec, register_head

__all__ = [
    "HEADS",
    "Head",
    "HeadSpec",
    "PrototypeHead",
    "build_head",
    "compute_prototypes",
    "create_head",
    "head_spec",
    "prototype_logits",
    "register_head",
    "transform_features",
]
