"""Seeded episode sampling for training, driven by a `torch.Generator` whose state can be saved.

`eval.episodes.sample_episodes` draws a fixed batch of evaluation episodes with numpy; training
draws one episode per step, forever, and must resume mid-stream bit for bit. A torch Generator
does both: its state is a uint8 tensor that goes into the checkpoint's safetensors file. (It also
keeps `protonets` free of `eval` imports, as the design asks.)
"""

from __future__ import annotations

import logging

import torch

from protonets.encoders.errors import UserInputError

log = logging.getLogger(__name__)


class EpisodeSampler:
    """Draw N-way (K+Q)-image episodes from integer labels: `sample()` -> indices `[N, K+Q]`.

    Row n holds K support then Q query indices of one class. Classes with fewer than K+Q images
    are left out (one warning); fewer than N usable classes is a UserInputError.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        ways: int,
        shots: int,
        queries: int,
        generator: torch.Generator,
        split: str = "training",
    ) -> None:
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            if value < 1:
                raise UserInputError(f"{split} {name} must be at least 1, got {value}")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.generator = generator
        need = shots + queries
        classes, counts = torch.unique(labels, return_counts=True)
        usable = classes[counts >= need]
        if len(usable) < len(classes):
            log.warning(
                "%s: left out %d class(es) with fewer than %d images (%d-shot + %d queries)",
                split,
                len(classes) - len(usable),
                need,
                shots,
                queries,
            )
        if len(usable) < ways:
            raise UserInputError(
                f"{split} episodes of {ways} ways need {ways} classes with at least {need} images "
                f"each ({shots} shots + {queries} queries); the {split} data has {len(usable)}. "
                "Lower --ways/--shots/--queries or use more classes"
            )
        # members[c, j]: the j-th image of usable class c (padded with -1)
        order = torch.argsort(labels[torch.isin(labels, usable)], stable=True)
        rows = torch.nonzero(torch.isin(labels, usable)).flatten()[order]
        usable_counts = counts[counts >= need]
        width = int(usable_counts.max())
        self.members = torch.full((len(usable), width), -1, dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), usable_counts.cumsum(0)[:-1]])
        position = torch.arange(len(rows)) - offsets.repeat_interleave(usable_counts)
        self.members[torch.arange(len(usable)).repeat_interleave(usable_counts), position] = rows
        self.counts = usable_counts
        self.num_classes = len(usable)

    def sample(self) -> torch.Tensor:
        """One episode: int64 indices `[ways, shots + queries]` (support first in each row)."""
        picked = torch.randperm(self.num_classes, generator=self.generator)[: self.ways]
        keys = torch.rand(self.ways, self.members.shape[1], generator=self.generator)
        columns = torch.arange(self.members.shape[1])
        keys[columns >= self.counts[picked].unsqueeze(1)] = 2.0  # padding sorts last
        chosen = keys.argsort(1)[:, : self.shots + self.queries]
        return self.members[picked].gather(1, chosen)

    def sample_many(self, episodes: int) -> torch.Tensor:
        """`episodes` episodes at once: `[E, ways, shots + queries]`."""
        return torch.stack([self.sample() for _ in range(episodes)])
