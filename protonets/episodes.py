"""Episodes: one seeded sampler and one support/query split, for evaluation and every trainer.

An episode batch is an int64 index tensor `[E, N, K+Q]` into a set of images or embeddings: row
n holds K support then Q query rows of one class. `EpisodeSampler.draw` makes them from a numpy
Generator (PCG64 is specified, so the same seed gives the same episodes on any machine);
evaluation draws a fixed batch at once (`sample_episodes`), training draws one batch per step
from a Generator whose state it saves. `split_episodes` turns `[..., N, K+Q, ...]` into support,
support labels, queries and query labels.

Realistic (imbalanced) evaluation (Veilleux et al. 2021, `query_balance="dirichlet"`): each
episode's T = N*Q queries are split across its classes by proportions drawn from Dirichlet(alpha).
Such a batch keeps the support index `[E, N, K]` in `indices` and adds a flat query index
`[E, T]` with query labels `[E, T]`: T stays fixed, so episodes still batch. `gather_episodes`
splits both layouts.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protonets.encoders.atomic import write_atomically
from protonets.encoders.errors import UserInputError

log = logging.getLogger(__name__)


QUERY_BALANCES = ("balanced", "dirichlet")


@dataclass
class Episodes:
    """`indices[e, n, :shots]` are support rows of class `classes[e, n]`, the rest are queries.

    Imbalanced batches (`query_index` set) hold only the support `[E, N, K]` in `indices`; their
    queries are `query_index[e]` with classes `query_labels[e]` (0..N-1), T = N*Q per episode,
    and `capped[e]` says a class of episode e had fewer images than its Dirichlet share.
    """

    indices: np.ndarray  # [E, N, K+Q] int64 rows of the embedding set ([E, N, K] if imbalanced)
    classes: np.ndarray  # [E, N] int64 class ids
    ways: int
    shots: int
    queries: int
    seed: int
    query_index: np.ndarray | None = None  # [E, N*Q] int64 query rows (imbalanced batches)
    query_labels: np.ndarray | None = None  # [E, N*Q] int64 their classes 0..N-1
    capped: np.ndarray | None = None  # [E] bool: a class had too few images for its share
    query_balance: str = "balanced"
    alpha: float | None = None  # the Dirichlet concentration of imbalanced batches

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def balanced(self) -> bool:
        """True for the classic layout: every class has `queries` queries in `indices`."""
        return self.query_index is None

    @property
    def support(self) -> np.ndarray:
        return self.indices[:, :, : self.shots]

    @property
    def query(self) -> np.ndarray:
        """Query rows: `[E, N, Q]` for balanced batches, the flat `[E, N*Q]` otherwise."""
        return self.indices[:, :, self.shots :] if self.balanced else self.query_index

    def gather(
        self, rows: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Support `[e, N*K, ...]`, support labels, queries `[e, N*Q, ...]` and query labels of
        episodes `start:stop`, gathered from `rows [M, ...]` (`gather_episodes`)."""
        index = torch.from_numpy(self.indices[start:stop])
        if self.balanced:
            return gather_episodes(rows, index, self.shots)
        query = torch.from_numpy(self.query_index[start:stop])
        labels = torch.from_numpy(self.query_labels[start:stop])
        return gather_episodes(rows, index, self.shots, query, labels)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save as .npz (arrays + JSON settings), atomically."""
        settings: dict[str, Any] = {
            "ways": self.ways,
            "shots": self.shots,
            "queries": self.queries,
            "seed": self.seed,
        }
        arrays = {"indices": self.indices, "classes": self.classes}
        if not self.balanced:
            settings.update(query_balance=self.query_balance, alpha=self.alpha)
            arrays.update(query_index=self.query_index, query_labels=self.query_labels)
            arrays["capped"] = self.capped if self.capped is not None else np.zeros(len(self), bool)
        meta = json.dumps(settings)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, meta=np.array(meta), **arrays)

        write_atomically(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Episodes:
        """Load episodes saved with `save` (no pickle)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                extra = {k: data[k] for k in ("query_index", "query_labels", "capped") if k in data}
                return cls(data["indices"], data["classes"], **meta, **extra)
        except (OSError, KeyError, ValueError, TypeError) as exc:
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
    if len(usable) < ways:  # the error alone: the classes it would leave out are in it
        raise UserInputError(
            f"{split} episodes of {ways} ways need {ways} classes with at least {need} images each; "
            f"the {split} data has {len(classes)}, only {len(usable)} have that many. "
            "Lower --ways, --shots or --queries, or use more classes"
        )
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

    def draw_dirichlet(
        self, rng: np.random.Generator, count: int, alpha: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`count` episodes whose N*Q queries follow Dirichlet(alpha) class proportions.

        Returns support `[count, N, K]`, class ids `[count, N]`, query rows `[count, N*Q]`,
        query labels `[count, N*Q]` and `capped [count]`: a class with fewer than K + its share
        of images gives all it has and the rest goes to the other classes (T stays N*Q).
        """
        ways, shots, total = self.ways, self.shots, self.ways * self.queries
        support = np.empty((count, ways, shots), dtype=np.int64)
        chosen = np.empty((count, ways), dtype=np.int64)
        query = np.empty((count, total), dtype=np.int64)
        labels = np.empty((count, total), dtype=np.int64)
        capped = np.zeros(count, dtype=bool)
        sizes = self._starts[1:] - self._starts[:-1]
        for e in range(count):
            picked = rng.choice(self.usable, size=ways, replace=False)
            chosen[e] = picked
            proportions = rng.dirichlet(np.full(ways, alpha))
            shares, capped[e] = _split_total(proportions, total, sizes[picked] - shots)
            labels[e] = np.repeat(np.arange(ways), shares)
            at = 0
            for n, c in enumerate(picked):
                members = self._order[self._starts[c] : self._starts[c + 1]]
                rows = members[rng.choice(len(members), size=shots + shares[n], replace=False)]
                support[e, n] = rows[:shots]
                query[e, at : at + shares[n]] = rows[shots:]
                at += shares[n]
        return support, chosen, query, labels, capped

    def sample(self, rng: np.random.Generator, count: int) -> torch.Tensor:
        """`count` episodes as an int64 tensor `[count, N, K+Q]`."""
        return torch.from_numpy(self.draw(rng, count)[0])


def _split_total(proportions: np.ndarray, total: int, room: np.ndarray) -> tuple[np.ndarray, bool]:
    """Integer shares of `total` close to `proportions` (largest remainders), none above `room`;
    the excess of a full class goes to the others by their proportions. Needs room.sum() >= total.
    Returns the shares and whether any class was capped."""
    shares = np.zeros(len(proportions), dtype=np.int64)
    capped = False
    while True:
        left = total - shares.sum()
        open_ = shares < room
        weights = np.where(open_, proportions, 0.0)
        if weights.sum() <= 0:  # only zero-proportion classes have room left
            weights = open_.astype(float)
        want = left * weights / weights.sum()
        add = np.floor(want).astype(np.int64)
        remainder = left - add.sum()
        if remainder:
            add[np.argsort(-(want - add), kind="stable")[:remainder]] += 1
        shares += add
        over = shares > room
        if not over.any():
            return shares, capped
        capped = True
        shares = np.minimum(shares, room)


def check_alpha(alpha: float) -> float:
    """A Dirichlet concentration: a finite number above 0 (NaN, 0 and negatives are refused)."""
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise UserInputError(f"the Dirichlet alpha must be a finite number above 0, got {alpha}")
    return alpha


def sample_episodes(
    labels: np.ndarray,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int = 0,
    class_names: list[str] | None = None,
    query_balance: str = "balanced",
    alpha: float = 2.0,
) -> Episodes:
    """Draw `episodes` episodes from integer `labels` with `numpy.random.default_rng(seed)`.

    Classes with fewer than `shots + queries` images are left out, with one warning naming them.
    The same seed and labels give the same episodes on any machine. `query_balance="dirichlet"`
    splits each episode's `ways * queries` queries by Dirichlet(`alpha`) class proportions.
    """
    if episodes < 1:
        raise UserInputError(f"episodes must be at least 1, got {episodes}")
    if query_balance not in QUERY_BALANCES:
        raise UserInputError(
            f"unknown query balance '{query_balance}'; choose one of {', '.join(QUERY_BALANCES)}"
        )
    sampler = EpisodeSampler(labels, ways, shots, queries, class_names)
    rng = np.random.default_rng(seed)
    if query_balance == "balanced":
        indices, classes = sampler.draw(rng, episodes)
        return Episodes(indices, classes, ways, shots, queries, seed)
    alpha = check_alpha(alpha)
    support, classes, query, query_labels, capped = sampler.draw_dirichlet(rng, episodes, alpha)
    return Episodes(
        support, classes, ways, shots, queries, seed, query, query_labels, capped, query_balance, alpha
    )


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
    rows: torch.Tensor,
    index: torch.Tensor,
    shots: int,
    query: torch.Tensor | None = None,
    query_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`split_episodes(rows[index], shots)` for an index `[..., N, K+Q]` into `rows [M, *item]`,
    gathering support and query rows directly (one copy, no intermediate `rows[index]`).

    Imbalanced episodes: `index` is the support `[..., N, K]`, `query [..., T]` the query rows
    and `query_labels [..., T]` their classes 0..N-1.
    """
    support, support_labels, balanced_query, balanced_labels = split_episodes(index, shots, item_dims=0)
    if query is None:
        query, query_labels = balanced_query, balanced_labels
    elif query_labels is None or query_labels.shape != query.shape:
        raise ValueError("imbalanced episodes need query labels of the query index's shape")
    return rows[support], support_labels, rows[query], query_labels
