"""Training the Siamese head: with its encoder on images, or alone on frozen (cached) embeddings.

`SiameseTrainer` is the episodic trainer (`protonets.training.EpisodicTrainer`: validation, best
checkpoint, resume, seeds, progress, JSON-lines log) with `SiameseMethod`: each step embeds a batch
of P classes × K images once and trains on the balanced pairs within it (BCE, optionally the
contrastive loss and hard negatives), plus `proto_weight` × the ProtoNet loss on the same batch.
Validation scores N-way K-shot episodes with the Siamese head. `train_head` fits the head alone
on an embedding set (seconds, from the embedding cache) with `HeadOnPairs` in the same loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from protonets.encoders import Encoder
from protonets.encoders.distributed import World
from protonets.encoders.errors import UserInputError

from ..episodes import EpisodeSampler, split_episodes
from ..heads import create_head
from ..training import TrainLoop, augment
from ..training.data import AUGMENTATIONS, ImageSet
from ..training.loop import InMemoryMethod
from ..training.trainer import EpisodicTrainer, ImageEpisodes, TrainConfig, prefixed, validate_head
from .checkpoint import HEAD_FILE, head_entry, head_tensors, load_head_state
from .head import SiameseHead
from .pairs import LOSSES, affine_augment, pair_loss, sample_pairs


@dataclass
class SiameseConfig(TrainConfig):
    """`TrainConfig` plus the pair settings. `ways` × (`shots` + `queries`) images make a batch."""

    ways: int = 50
    shots: int = 2
    queries: int = 2
    augment: str = "affine"
    loss: str = "bce"
    margin: float = 1.0
    hard_fraction: float = 0.5
    proto_weight: float = 1.0
    hidden: int = 128
    product: bool = True
    reduce: str = "max"
    val_ways: int = 20
    val_shots: int = 1
    val_queries: int = 1

    def __post_init__(self) -> None:
        requested = self.augment
        self.augment = "none" if requested == "affine" else requested
        super().__post_init__()
        self.augment = requested
        if requested not in (*AUGMENTATIONS, "affine"):
            raise UserInputError(f"augment must be affine or one of {', '.join(AUGMENTATIONS)}")
        if self.loss not in LOSSES:
            raise UserInputError(f"loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise UserInputError(f"hard_fraction must lie in [0, 1], got {self.hard_fraction}")
        if self.shots + self.queries < 2:
            raise UserInputError("a pair batch needs at least 2 images per class (shots + queries)")


class SiameseMethod:
    """The Siamese head and the encoder on pairs within a P×K batch, plus the ProtoNet loss."""

    def __init__(self, data: ImageEpisodes) -> None:
        cfg: SiameseConfig = data.config  # type: ignore[assignment]
        self.data, self.model = data, data.model
        with torch.no_grad():
            probe = data.encoder.features(data.inputs(torch.arange(2)))
        self.proto = create_head("prototype", metric="euclidean")
        self.head = SiameseHead(probe.shape[-1], cfg.hidden, cfg.product, cfg.reduce).to(data.device)
        params = [*self.model.parameters(), *self.head.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.forward = self.batch_loss

    def distribute(self, world: World) -> None:
        """Under torchrun: the batch loss through DistributedDataParallel (gradients averaged)."""
        from ..training.ddp import data_parallel

        parts = {"model": self.model, "head": self.head}
        self.forward = data_parallel(parts, self.batch_loss, self.data.device)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg: SiameseConfig = self.data.config  # type: ignore[assignment]
        generator = self.data.generator
        batch = self.data.inputs(self.data.sample())  # P classes × K images
        if cfg.augment == "affine":
            batch = affine_augment(batch, generator)
        else:
            batch = augment(batch, cfg.augment, generator)
        loss, pair_logits, same = self.forward(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            acc = ((pair_logits > 0) == same).float().mean()  # pair accuracy
        return loss.detach(), acc

    def batch_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, pair logits, pair is same class) of a P×K batch's model inputs."""
        cfg: SiameseConfig = self.data.config  # type: ignore[assignment]
        generator, device = self.data.generator, self.data.device
        emb = self.data.encoder.features(batch)
        labels = torch.arange(cfg.ways, device=device).repeat_interleave(cfg.shots + cfg.queries)
        with torch.no_grad():  # all pairs' scores for mining; gradients only through the chosen
            scores = self.head.pair_logits(emb.unsqueeze(1), emb.unsqueeze(0)) if cfg.hard_fraction else None
        i, j, same = sample_pairs(labels.cpu(), scores, generator, cfg.hard_fraction)
        i, j, same = i.to(device), j.to(device), same.to(device)
        pair_logits = self.head.pair_logits(emb[i], emb[j])
        distances = (emb[i] - emb[j]).norm(dim=-1) if cfg.loss == "contrastive" else None
        loss = pair_loss(pair_logits, same, cfg.loss, distances, cfg.margin)
        if cfg.proto_weight:
            episode = emb.view(1, cfg.ways, cfg.shots + cfg.queries, -1)
            support, s_labels, query, q_labels = split_episodes(episode, cfg.shots)
            logits = self.proto.episode_logits(support, s_labels, query, cfg.ways)
            loss = loss + cfg.proto_weight * F.cross_entropy(logits[0], q_labels[0])
        return loss, pair_logits, same

    def validate(self) -> dict[str, float]:
        return validate_head(self.data, self.head)

    def weights(self) -> dict[str, torch.Tensor]:
        head = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        return {**self.data.model_weights(), **head}

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(prefixed(tensors, "model."))
        self.head.load_state_dict(prefixed(tensors, "head."), strict=False)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        self.head.train(mode)

    def save_best(self, output: str, best: dict[str, Any]) -> None:
        entries = {"method": "siamese", "head": head_entry(self.head)}
        self.data.save_checkpoint(output, best, entries, {HEAD_FILE: head_tensors(self.head)})

    def read_best(self, output: str) -> dict[str, torch.Tensor]:
        head = {f"head.{k}": v for k, v in load_head_state(output).items()}
        return {**self.data.read_best_model(output), **head}


class SiameseTrainer(EpisodicTrainer):
    """The episodic trainer with `SiameseMethod` (see the module docstring).

    val_episodes: optional fixed validation episodes `[E, val_ways, val_shots + val_queries]`
        (e.g. within-alphabet Omniglot runs) in place of the randomly sampled ones.
    """

    def __init__(
        self,
        encoder: Encoder,
        train: ImageSet,
        val: ImageSet | None,
        config: SiameseConfig,
        output: str | os.PathLike[str] | None = None,
        progress: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        val_episodes: torch.Tensor | None = None,
        world: World | None = None,
    ) -> None:
        super().__init__(
            encoder, train, val, config, output, progress, model_kwargs, meta,
            method=SiameseMethod, val_episodes=val_episodes, world=world,
        )  # fmt: skip


class HeadOnPairs(InMemoryMethod):
    """`SiameseHead` alone on frozen embeddings: a P×K batch and its balanced pairs per step."""

    def __init__(
        self,
        head: SiameseHead,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        sampler: EpisodeSampler,
        rng: np.random.Generator,
        generator: torch.Generator,
        lr: float,
        loss: str,
        hard_fraction: float,
        val_pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> None:
        self.head = self.module = head
        self.embeddings, self.labels = embeddings, labels
        self.sampler, self.rng, self.generator = sampler, rng, generator
        self.loss, self.hard_fraction, self.val_pairs = loss, hard_fraction, val_pairs
        self.optimizer = torch.optim.Adam(head.parameters(), lr=lr)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.sampler.sample(self.rng, 1).flatten()
        emb, y = self.embeddings[rows], self.labels[rows]
        with torch.no_grad():
            scores = self.head.pair_logits(emb.unsqueeze(1), emb.unsqueeze(0)) if self.hard_fraction else None
        i, j, same = sample_pairs(y, scores, self.generator, self.hard_fraction)
        logits = self.head.pair_logits(emb[i], emb[j])
        distances = (emb[i] - emb[j]).norm(dim=-1) if self.loss == "contrastive" else None
        value = pair_loss(logits, same, self.loss, distances)
        self.optimizer.zero_grad(set_to_none=True)
        value.backward()
        self.optimizer.step()
        return value.detach(), ((logits.detach() > 0) == same).float().mean()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        from sklearn.metrics import roc_auc_score

        assert self.val_pairs is not None
        a, b, same, embeddings = self.val_pairs
        scores = self.head.pair_logits(embeddings[a], embeddings[b])
        return {"val_auc": float(roc_auc_score(same.numpy(), scores.numpy()))}


def train_head(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    val_embeddings: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    steps: int = 1000,
    classes: int = 32,
    per_class: int = 4,
    lr: float = 1e-3,
    loss: str = "bce",
    hard_fraction: float = 0.5,
    val_every: int = 100,
    seed: int = 0,
    progress: bool = False,
    **head_kwargs: Any,
) -> tuple[SiameseHead, list[dict[str, Any]]]:
    """Fit a `SiameseHead` alone on frozen embeddings `[N, D]` with labels `[N]` (in memory).

    Each step takes `classes` × `per_class` embeddings and their balanced pairs. With validation
    embeddings, the head with the best pair ROC AUC on them is returned. Returns (head, log).
    """
    if per_class < 2:
        raise UserInputError(f"per_class must be at least 2 (a pair), got {per_class}")
    embeddings = torch.as_tensor(embeddings).float()
    labels = torch.as_tensor(labels, dtype=torch.int64)
    torch.manual_seed(seed)
    head = SiameseHead(embeddings.shape[1], **head_kwargs)
    ways = min(classes, int(labels.unique().numel()))
    sampler = EpisodeSampler(labels, ways, 1, per_class - 1, split="head training")
    val_pairs = None
    if val_embeddings is not None and val_labels is not None:
        val_pairs = (
            *random_pairs(torch.as_tensor(val_labels), 2000, seed + 1),
            torch.as_tensor(val_embeddings).float(),
        )
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    method = HeadOnPairs(
        head, embeddings, labels, sampler, rng, generator, lr, loss, hard_fraction, val_pairs
    )
    loop = TrainLoop(
        method,
        seed=seed,
        val_every=val_every,
        validates=val_pairs is not None,
        rng=rng,
        generator=generator,
        progress=progress,
        score=lambda r: (r["val_auc"],),
        best_keys=("val_auc",),
        desc="siamese head",
        unit="step",
    )
    return head, loop.run(steps).history


def random_pairs(
    labels: torch.Tensor, count: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`count` same-class and `count` different-class index pairs (a, b, same), seeded."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique(labels, return_counts=True)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)[:-1]])
    multi = torch.nonzero(counts >= 2).flatten()
    if len(multi) == 0 or len(classes) < 2:
        raise UserInputError("pairs need at least 2 classes and a class with 2 or more images")
    c = multi[torch.randint(len(multi), (count,), generator=g)]
    first = (torch.rand(count, generator=g) * counts[c]).long()
    shift = 1 + (torch.rand(count, generator=g) * (counts[c] - 1)).long()
    second = (first + shift) % counts[c]
    pos_a, pos_b = order[starts[c] + first], order[starts[c] + second]
    neg_a = torch.randint(len(labels), (count * 3,), generator=g)
    neg_b = torch.randint(len(labels), (count * 3,), generator=g)
    keep = torch.nonzero(labels[neg_a] != labels[neg_b]).flatten()[:count]
    a = torch.cat([pos_a, neg_a[keep]])
    b = torch.cat([pos_b, neg_b[keep]])
    same = torch.cat([torch.ones(count, dtype=torch.bool), torch.zeros(len(keep), dtype=torch.bool)])
    return a, b, same
