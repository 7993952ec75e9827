"""Episodic training of a trainable head (`matching`, `relation`, `feat`) on frozen embeddings.

Each step draws episodes of cached embeddings from the shared sampler, splits them with the
shared split and takes one Adam step on the head's `episode_loss`; `TrainLoop` validates on
fixed episodes of a validation split (when given), keeps the best head and logs. Minutes on a
CPU: no encoder forward pass, only the head.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from protonets.encoders.errors import UserInputError

from ..episodes import EpisodeSampler, gather_episodes, sample_episodes
from ..heads import create_head
from ..heads.trained import TrainedHead, head_tensors
from ..stats import ci_or_none, mean_ci95
from .loop import InMemoryMethod, TrainLoop

#: Constructor arguments that make each head trainable (matching learns its context embeddings).
TRAINED_PRESETS: dict[str, dict[str, Any]] = {"matching": {"fce": True}, "relation": {}, "feat": {}}


class EpisodicHead(InMemoryMethod):
    """A `TrainLoop` method: a `TrainedHead` on episodes of frozen embeddings."""

    def __init__(
        self,
        head: TrainedHead,
        embeddings: torch.Tensor,
        sampler: EpisodeSampler,
        rng: np.random.Generator,
        lr: float,
        batch: int = 1,
        contrastive: float = 0.0,
        weight_decay: float = 0.0,
        val: tuple[torch.Tensor, Any] | None = None,
    ) -> None:
        self.head = self.module = head
        self.embeddings, self.sampler, self.rng = embeddings, sampler, rng
        self.batch, self.contrastive, self.val = batch, contrastive, val
        self.optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)

    def _loss(self, support, s_labels, query, q_labels, n_way):  # noqa: ANN001, ANN202
        if self.contrastive:
            return self.head.episode_loss(support, s_labels, query, q_labels, n_way, self.contrastive)
        return self.head.episode_loss(support, s_labels, query, q_labels, n_way)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.sampler.sample(self.rng, self.batch)
        support, s_labels, query, q_labels = gather_episodes(self.embeddings, index, self.sampler.shots)
        loss, logits = self._loss(support, s_labels, query, q_labels, self.sampler.ways)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (logits.detach().argmax(-1) == q_labels).float().mean()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        assert self.val is not None
        embeddings, episodes = self.val
        self.head.eval()
        acc, losses = [], []
        for start in range(0, len(episodes), 50):
            support, s_labels, query, q_labels = episodes.gather(embeddings, start, start + 50)
            loss, logits = self.head.episode_loss(support, s_labels, query, q_labels, episodes.ways)
            acc.append((logits.argmax(-1) == q_labels).double().mean(1))
            losses.append(float(loss) * len(logits))
        self.head.train()
        mean, ci = mean_ci95(torch.cat(acc).numpy())
        return {"val_loss": sum(losses) / len(episodes), "val_acc": mean, "val_ci95": ci_or_none(ci)}

    def weights(self) -> dict[str, torch.Tensor]:
        return head_tensors(self.head)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict(tensors, strict=False)


def train_episodic_head(
    name: str,
    embeddings: torch.Tensor,
    labels: Any,
    val_embeddings: torch.Tensor | None = None,
    val_labels: Any = None,
    *,
    ways: int = 5,
    shots: int = 5,
    queries: int = 15,
    steps: int = 2000,
    batch: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    lr_step: int | None = None,
    lr_gamma: float = 0.5,
    contrastive: float = 0.0,
    val_ways: int = 5,
    val_shots: int = 5,
    val_queries: int = 15,
    val_episodes: int = 200,
    val_every: int = 200,
    seed: int = 0,
    progress: bool = False,
    **head_kwargs: Any,
) -> tuple[TrainedHead, list[dict[str, Any]]]:
    """Train the registered head `name` on frozen embeddings `[M, D]` with labels `[M]`.

    Steps of `batch` N-way K-shot Q-query episodes; with validation embeddings, the head with the
    best validation accuracy (fixed episodes, seeded) is returned. `contrastive`: weight of FEAT's
    regulariser (feat only). Returns (head in eval mode, log records).
    """
    if name not in TRAINED_PRESETS:
        raise UserInputError(f"train_episodic_head trains {', '.join(TRAINED_PRESETS)}, not '{name}'")
    if contrastive and name != "feat":
        raise UserInputError("the contrastive regulariser is FEAT's: use it with the feat head only")
    if contrastive < 0:
        raise UserInputError(f"the contrastive weight must be 0 or more, got {contrastive}")
    embeddings = torch.as_tensor(embeddings).float()
    with torch.random.fork_rng(devices=[]):  # seeded start, the caller's random state untouched
        torch.manual_seed(seed)
        head = create_head(name, dim=embeddings.shape[1], **{**TRAINED_PRESETS[name], **head_kwargs})
    sampler = EpisodeSampler(labels, ways, shots, queries, split="head training")
    val = None
    if val_embeddings is not None and val_labels is not None:
        val_labels = val_labels.numpy() if isinstance(val_labels, torch.Tensor) else np.asarray(val_labels)
        episodes = sample_episodes(val_labels, val_ways, val_shots, val_queries, val_episodes, seed + 1)
        val = (torch.as_tensor(val_embeddings).float(), episodes)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    method = EpisodicHead(head, embeddings, sampler, rng, lr, batch, contrastive, weight_decay, val)
    loop = TrainLoop(
        method,
        seed=seed,
        val_every=val_every,
        validates=val is not None,
        rng=rng,
        generator=generator,
        lr_at=(lambda step: lr * lr_gamma ** (step // lr_step)) if lr_step else None,
        progress=progress,
        desc=f"{name} head",
        unit="step",
    )
    return head, loop.run(steps).history
