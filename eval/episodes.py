"""Seeded N-way K-shot Q-query episodes as one index tensor `[E, N, K+Q]`."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
from protonets.encoders.atomic import write_atomically
from protonets.encoders.errors import UserInputError

log = logging.getLogger(__name__)


@dataclass
class Episodes:
    """`indices[e, n, :shots]` are support rows of class `classes[e, n]`, the rest are queries."""

    indices: np.ndarray  # [E, N, K+Q] int64 rows of the embedding set
    classes: np.ndarray  # [E, N] int64 class ids
    ways: int
    shots: int
    queries: int
    seed: int

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def support(self) -> np.ndarray:
        return self.indices[:, :, : self.shots]

    @property
    def query(self) -> np.ndarray:
        return self.indices[:, :, self.shots :]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save as .npz (arrays + JSON settings), atomically."""
        meta = json.dumps(
            {"ways": self.ways, "shots": self.shots, "queries": self.queries, "seed": self.seed}
        )

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, indices=self.indices, classes=self.classes, meta=np.array(meta))

        write_atomically(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Episodes:
        """Load episodes saved with `save` (no pickle)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                return cls(data["indices"], data["classes"], **meta)
        except (OSError, KeyError, ValueError) as exc:
            raise UserInputError(f"episode file '{path}' cannot be read ({exc})") from None


def usable_classes(
    labels: np.ndarray, ways: int, need: int, class_names: list[str] | None = None, warn: bool = True
) -> np.ndarray:
    """Class ids with at least `need` images; error if fewer than `ways` (warns about the rest)."""
    classes, counts = np.unique(np.asarray(labels, dtype=np.int64), return_counts=True)
    small = classes[counts < need]
    usable = classes[counts >= need]
    if len(small) and warn:
        names = [class_names[c] if class_names else str(c) for c in small]
        shown = ", ".join(names[:10]) + (f", … ({len(names)} in all)" if len(names) > 10 else "")
        log.warning(
            "left out %d class(es) with fewer than %d images per episode: %s; %d remain",
            len(small),
            need,
            shown,
            len(usable),
        )
    if len(usable) < ways:
        raise UserInputError(
            f"{ways}-way episodes need {ways} classes with at least {need} images each, "
            f"only {len(usable)} have that many"
        )
    return usable


def sample_episodes(
    labels: np.ndarray,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int = 0,
    class_names: list[str] | None = None,
) -> Episodes:
    """Draw `episodes` episodes from integer `labels` with a seeded numpy Generator.

    Classes with fewer than `shots + queries` images are left out, with one warning naming them.
    The same seed and labels give the same episodes on any machine.
    """
    for name, value in (("ways", ways), ("shots", shots), ("episodes", episodes)):
        if value < 1:
            raise UserInputError(f"{name} must be at least 1, got {value}")
    if queries < 0:
        raise UserInputError(f"queries must be 0 or more, got {queries}")
    labels = np.asarray(labels, dtype=np.int64)
    need = shots + queries
    usable = usable_classes(labels, ways, need, class_names, warn=True)
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels))])
    rng = np.random.default_rng(seed)
    indices = np.empty((episodes, ways, need), dtype=np.int64)
    chosen = np.empty((episodes, ways), dtype=np.int64)
    for e in range(episodes):
        picked = rng.choice(usable, size=ways, replace=False)
        chosen[e] = picked
        for n, c in enumerate(picked):
            members = order[starts[c] : starts[c + 1]]
            indices[e, n] = members[rng.choice(len(members), size=need, replace=False)]
    return Episodes(indices, chosen, ways, shots, queries, seed)
