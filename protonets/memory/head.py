"""`MemoryHead`: prototype logits read from a SupportMemory, for `FewShotClassifier(memory=…)`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .store import SupportMemory


class MemoryHead(torch.nn.Module):
    """Logits `[Q, C]` of queries against the memory's class prototypes, columns in `classes` order.

    Same numbers as a PrototypeHead fitted on the memory's vectors: scale × cosine (cosine
    memories), or negative squared distance (l2). Prototypes are read live from the memory.
    """

    def __init__(self, memory: SupportMemory, classes: Sequence, scale: float | None = None) -> None:
        super().__init__()
        self.memory = memory
        self.classes = list(classes)
        self.scale = 10.0 if scale is None else float(scale)  # None: the prototype head's default

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        scores, names = self.memory.prototype_scores(query)
        column = {name: j for j, name in enumerate(names)}
        missing = [c for c in self.classes if c not in column]
        if missing:
            raise RuntimeError(f"class {missing[0]!r} is no longer in the memory; fit the classifier again")
        logits = torch.from_numpy(scores[:, np.array([column[c] for c in self.classes])])
        return self.scale * logits if self.memory.metric == "cosine" else logits
