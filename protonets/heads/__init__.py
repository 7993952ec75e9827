"""Few-shot heads: support embeddings + labels, query embeddings -> logits.

`registry` names every head (one line each, imported on first use); `base.Head` is the contract.
Only the registry is imported with the package (listing `HEADS` imports no torch); the other
public names are imported on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protonets.encoders.lazy import lazy_exports

from .registry import HEADS, HeadSpec, build_head, create_head, head_spec, register_head

#: public name -> the submodule that defines it (imported when the name is first read)
_LAZY = {
    "Head": ".base",
    "PrototypeHead": ".prototype",
    "compute_prototypes": ".prototype",
    "prototype_logits": ".prototype",
    "transform_features": ".prototype",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .base import Head
    from .prototype import PrototypeHead, compute_prototypes, prototype_logits, transform_features


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


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
