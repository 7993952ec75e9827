"""FAISS support memory: millions of labelled support embeddings, incremental classes, safe saves.

from protonets import SupportMemory
memory = SupportMemory(dim=512)            # cosine, index="auto"
memory.add(embeddings, labels)             # numpy or torch [N, 512]
labels, scores = memory.classify(queries)  # nearest prototype; mode="knn" for k-NN vote
memory.save("catalogue.mem"); SupportMemory.load("catalogue.mem", encoder=encoder)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .options import FORMAT_VERSION, INDEX_KINDS, METRICS, MODES

if TYPE_CHECKING:  # pragma: no cover
    from .store import SupportMemory


def __getattr__(name: str) -> Any:
    """`SupportMemory` (and faiss with it) is imported on first use (PEP 562)."""
    if name == "SupportMemory":
        from .store import SupportMemory

        return SupportMemory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FORMAT_VERSION", "INDEX_KINDS", "METRICS", "MODES", "SupportMemory"]
