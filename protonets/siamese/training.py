"""Training the Siamese head: with its encoder on images, or alone on frozen (cached) embeddings.

`SiameseTrainer` is the episodic trainer (`protonets.training.EpisodicTrainer`: validation, best
checkpoint, resume, seeds, progress, JSON-lines log) with another step: each step embeds a batch
of P classes × K images once and trains on the balanced pairs within it (BCE, optionally the
contrastive loss and hard negatives), plus `proto_weight` × the ProtoNet loss on the same batch.
Validation scores N-way K-shot episodes with the Siamese head. `train_head` fits the head alone
on an embedding set (seconds, from the embedding cache).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from protonets.encoders import Encoder
from protonets.encoders.errors import UserInputError
from protonets.encoders.progress import progress_bar

from ..heads import create_head
from ..training import EpisodicTrainer, TrainConfig, augment, to_input
from ..training.data import AUGMENTATIONS, ImageSet
from ..training.episodes import EpisodeSampler
from .checkpoint import load_head_state, save_siamese_checkpoint
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


class SiameseTrainer(EpisodicTrainer):
    """Train an encoder and a `SiameseHead` together on pairs (see the module docstring).

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
    ) -> None:
        super().__init__(encoder, train, val, config, output, progress, model_kwargs, meta)
        if val_episodes is not None:
            self.val_episodes = val_episodes
        with torch.no_grad():
            probe = self.encoder.features(to_input(train.images[:2].to(self.device), encoder.preprocessing))
        self.proto = create_head("prototype", metric="euclidean")
        self.head = SiameseHead(probe.shape[-1], config.hidden, config.product, config.reduce).to(self.device)
        params = [*self.model.parameters(), *self.head.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        self.best_head: dict[str, torch.Tensor] | None = None

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg: SiameseConfig = self.config  # type: ignore[assignment]
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        index = self.sampler.sample()  # [P, K]
        batch = to_input(self.train_images[index.flatten().to(self.device)], self.encoder.preprocessing)
        if cfg.augment == "affine":
            batch = affine_augment(batch, self.generator)
        else:
            batch = augment(batch, cfg.augment, self.generator)
        emb = self.encoder.features(batch)
        labels = torch.arange(cfg.ways, device=self.device).repeat_interleave(cfg.shots + cfg.queries)
        with torch.no_grad():  # all pairs' scores for mining; gradients only through the chosen
            scores = self.head.pair_logits(emb.unsqueeze(1), emb.unsqueeze(0)) if cfg.hard_fraction else None
        i, j, same = sample_pairs(labels.cpu(), scores, self.generator, cfg.hard_fraction)
        i, j, same = i.to(self.device), j.to(self.device), same.to(self.device)
        pair_logits = self.head.pair_logits(emb[i], emb[j])
        distances = (emb[i] - emb[j]).norm(dim=-1) if cfg.loss == "contrastive" else None
        loss = pair_loss(pair_logits, same, cfg.loss, distances, cfg.margin)
        if cfg.proto_weight:
            view = emb.view(cfg.ways, cfg.shots + cfg.queries, -1)
            support = view[:, : cfg.shots].reshape(1, -1, view.shape[-1])
            query = view[:, cfg.shots :].reshape(1, -1, view.shape[-1])
            ways = torch.arange(cfg.ways, device=self.device)
            logits = self.proto.episode_logits(
                support, ways.repeat_interleave(cfg.shots)[None], query, cfg.ways
            )
            loss = loss + cfg.proto_weight * F.cross_entropy(logits[0], ways.repeat_interleave(cfg.queries))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        with torch.no_grad():
            acc = ((pair_logits > 0) == same).float().mean()  # pair accuracy
        return loss.detach(), acc

    # -- the head in states and checkpoints ------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().state_tensors()
        tensors.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return tensors

    def load_state(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> None:
        super().load_state(manifest, tensors, source)
        self.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        self.best_head = None

    def _save_best(self) -> None:
        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.best_head = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        if self.output is None:
            return
        extra = {
            "method": "siamese",
            "training": self.config.to_dict(),
            "step": self.step,
            "validation": {k: v for k, v in self.best.items() if k != "step"},
            **self.meta,
        }
        save_siamese_checkpoint(
            self.output, self.encoder, self.head, extra, self.model_kwargs, model=self.model
        )

    def _restore_best(self) -> None:
        if self.best_head is None and self.output is not None:
            self.best_head = load_head_state(self.output)
        if self.best_head is not None and self.best["step"] != self.step:
            self.head.load_state_dict(self.best_head, strict=False)
        super()._restore_best()
        self.head.eval()


def _pk_batches(labels: torch.Tensor, classes: int, per_class: int, generator: torch.Generator):
    sampler = EpisodeSampler(labels, classes, 1, per_class - 1, generator, "head training")
    while True:
        yield sampler.sample().flatten()


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
    """Fit a `SiameseHead` alone on frozen embeddings `[N, D]` with labels `[N]`.

    Each step takes `classes` × `per_class` embeddings and their balanced pairs. With validation
    embeddings, the head with the best pair ROC AUC on them is returned. Returns (head, log).
    """
    from sklearn.metrics import roc_auc_score

    embeddings = torch.as_tensor(embeddings).float()
    labels = torch.as_tensor(labels, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = SiameseHead(embeddings.shape[1], **head_kwargs)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    batches = _pk_batches(labels, min(classes, int(labels.unique().numel())), per_class, generator)
    val_pairs = None
    if val_embeddings is not None and val_labels is not None:
        val_pairs = random_pairs(torch.as_tensor(val_labels), 2000, seed + 1)
        val_embeddings = torch.as_tensor(val_embeddings).float()
    history: list[dict[str, Any]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    running, start = 0.0, time.perf_counter()
    for step in progress_bar(range(1, steps + 1), progress, desc="siamese head"):
        rows = next(batches)
        emb, y = embeddings[rows], labels[rows]
        with torch.no_grad():
            scores = head.pair_logits(emb.unsqueeze(1), emb.unsqueeze(0)) if hard_fraction else None
        i, j, same = sample_pairs(y, scores, generator, hard_fraction)
        distances = (emb[i] - emb[j]).norm(dim=-1) if loss == "contrastive" else None
        value = pair_loss(head.pair_logits(emb[i], emb[j]), same, loss, distances)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        running += float(value.detach())
        if step % val_every == 0 or step == steps:
            record: dict[str, Any] = {"step": step, "train_loss": running / val_every}
            running = 0.0
            if val_pairs is not None:
                a, b, same_v = val_pairs
                with torch.no_grad():
                    s = head.pair_logits(val_embeddings[a], val_embeddings[b])
                record["val_auc"] = float(roc_auc_score(same_v.numpy(), s.numpy()))
                if best is None or record["val_auc"] > best[0]:
                    best = (record["val_auc"], {k: v.clone() for k, v in head.state_dict().items()})
            record["elapsed_s"] = round(time.perf_counter() - start, 3)
            history.append(record)
    if best is not None:
        head.load_state_dict(best[1])
    return head.eval(), history


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
