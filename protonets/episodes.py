"""Episodes: one seeded sampler and one support/query split, for evaluation and every trainer.

An episode batch is an int64 index tensor `[E, N, K+Q]` into a set of images or embeddings: row
n holds K support then Q query rows of one class. `EpisodeSampler.draw` makes them from a numpy
Generator (PCG64 is specified, so the same seed gives the same episodes on any machine);
evaluation draws a fixed batch at once (`sample_episodes`), training draws one batch per step
from a Generator whose state it saves. `split_episodes` turns `[..., N, K+Q, ...]` into support,
support labels, queries and query labels.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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


def _as_labels(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    return np.asarray(labels, dtype=np.int64)


def usable_classes(
    labels: np.ndarray,
    ways: int,
    need: int,
    class_names: list[str] | None = None,
    warn: bool = True,
    split: str = "evaluation",
) -> np.ndarray:
    """Class ids with at least `need` images; error if fewer than `ways` (warns about the rest)."""
    classes, counts = np.unique(_as_labels(labels), return_counts=True)
    small = classes[counts < need]
    usable = classes[counts >= need]
    if len(small) and warn:
        names = [class_names[c] if class_names else str(c) for c in small]
        shown = ", ".join(names[:10]) + (f", … ({len(names)} in all)" if len(names) > 10 else "")
        log.warning(
            "%s: left out %d class(es) with fewer than %d images per episode: %s; %d remain",
            split,
            len(small),
            need,
            shown,
            len(usable),
        )
    if len(usable) < ways:
        raise UserInputError(
            f"{split} episodes of {ways} ways need {ways} classes with at least {need} images each; "
            f"the {split} data has {len(classes)}, only {len(usable)} have that many. "
            "Lower --ways, --shots or --queries, or use more classes"
        )
    return usable


class EpisodeSampler:
    """N-way (K+Q)-image episodes from integer labels, drawn from a numpy Generator.

    Classes with fewer than K+Q images are left out (one warning); fewer than N usable classes
    is a UserInputError naming `split`.
    """

    def __init__(
        self,
        labels: Any,
        ways: int,
        shots: int,
        queries: int,
        class_names: list[str] | None = None,
        split: str = "evaluation",
    ) -> None:
        for name, value in (("ways", ways), ("shots", shots)):
            if value < 1:
                raise UserInputError(f"{split} {name} must be at least 1, got {value}")
        if queries < 0:
            raise UserInputError(f"{split} queries must be 0 or more, got {queries}")
        labels = _as_labels(labels)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.usable = usable_classes(labels, ways, shots + queries, class_names, True, split)
        self._order = np.argsort(labels, kind="stable")
        self._starts = np.concatenate([[0], np.cumsum(np.bincount(labels))])

    def draw(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        """`count` episodes: indices `[count, N, K+Q]` and their class ids `[count, N]`."""
        need = self.shots + self.queries
        indices = np.empty((count, self.ways, need), dtype=np.int64)
        chosen = np.empty((count, self.ways), dtype=np.int64)
        for e in range(count):
            picked = rng.choice(self.usable, size=self.ways, replace=False)
            chosen[e] = picked
            for n, c in enumerate(picked):
                members = self._order[self._starts[c] : self._starts[c + 1]]
                indices[e, n] = members[rng.choice(len(members), size=need, replace=False)]
        return indices, chosen

    def sample(self, rng: np.random.Generator, count: int) -> torch.Tensor:
        """`count` episodes as an int64 tensor `[count, N, K+Q]`."""
        return torch.from_numpy(self.draw(rng, count)[0])


def sample_episodes(
    labels: np.ndarray,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int = 0,
    class_names: list[str] | None = None,
) -> Episodes:
    """Draw `episodes` episodes from integer `labels` with `numpy.random.default_rng(seed)`.

    Classes with fewer than `shots + queries` images are left out, with one warning naming them.
    The same seed and labels give the same episodes on any machine.
    """
    if episodes < 1:
        raise UserInputError(f"episodes must be at least 1, got {episodes}")
    sampler = EpisodeSampler(labels, ways, shots, queries, class_names)
    indices, classes = sampler.draw(np.random.default_rng(seed), episodes)
    return Episodes(indices, classes, ways, shots, queries, seed)


def split_episodes(
    x: torch.Tensor, shots: int, item_dims: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split episodes `[..., N, K+Q, *item]` into support `[..., N*K, *item]`, support labels
    `[..., N*K]`, queries `[..., N*Q, *item]` and query labels `[..., N*Q]` (labels 0..N-1).

    item_dims: trailing dimensions of one item: 1 for embeddings `[D]`, 3 for images `[C, H, W]`,
    0 for the index tensor itself (then gather the rows afterwards).
    """
    end = x.dim() - item_dims
    *batch, ways, size = x.shape[:end]
    item = x.shape[end:]
    support = x.narrow(end - 1, 0, shots).reshape(*batch, ways * shots, *item)
    query = x.narrow(end - 1, shots, size - shots).reshape(*batch, ways * (size - shots), *item)
    classes = torch.arange(ways, device=x.device)
    support_labels = classes.repeat_interleave(shots).expand(*batch, -1)
    query_labels = classes.repeat_interleave(size - shots).expand(*batch, -1)
    return support, support_labels, query, query_labels


def gather_episodes(
    rows: torch.Tensor, index: torch.Tensor, shots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`split_episodes(rows[index], shots)` for an index `[..., N, K+Q]` into `rows [M, *item]`,
    gathering support and query rows directly (one copy, no intermediate `rows[index]`)."""
    support, support_labels, query, query_labels = split_episodes(index, shots, item_dims=0)
    return rows[support], support_labels, rows[query], query_labels
