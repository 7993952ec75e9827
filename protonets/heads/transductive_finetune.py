"""Transductive fine-tuning head (Dhillon et al. 2020): prototypes fine-tuned by Adam on support
cross-entropy + the entropy of the query predictions (easyfsl's head-only version)."""

from __future__ import annotations

from typing import Any

import torch

from .prototype import compute_prototypes, squared_distances_from
from .transductive import TransductiveHead, adam_on_centres, entropy


def distance_logits_from(
    cross: torch.Tensor, centre_sq: torch.Tensor, point_sq: torch.Tensor, temperature: float
) -> torch.Tensor:
    """−temperature · ‖x − p‖ (Euclidean distance, not squared) from x·pᵀ `[E, M, N]`,
    ‖p‖² `[E, 1, N]` and ‖x‖² `[E, M, 1]`."""
    return -temperature * squared_distances_from(cross, centre_sq, point_sq, floor=1e-12).sqrt()


def distance_logits(x: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """`distance_logits_from` of points `[E, M, D]` and prototypes `[E, N, D]`."""
    return distance_logits_from(
        x @ prototypes.transpose(-1, -2),
        prototypes.pow(2).sum(-1).unsqueeze(-2),
        x.pow(2).sum(-1, keepdim=True),
        temperature,
    )


def check_finetune_options(steps: int, lr: float, temperature: float) -> None:
    """The options the fine-tuning heads share: steps >= 0, lr >= 0, temperature > 0."""
    if int(steps) < 0:
        raise ValueError(f"steps must be >= 0 (0 = the prototype head), got {steps}")
    if not float(lr) >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


class TransductiveFinetuneHead(TransductiveHead):
    """Loss per episode: CE(support) + mean entropy(query predictions), on the prototypes.

    steps, lr, temperature: easyfsl's defaults (25 Adam steps of 5e-5, temperature 1): the
    prototypes move little from the support means; raise `lr` for a stronger adaptation.
    """

    needs_grad = True

    def __init__(self, steps: int = 25, lr: float = 5e-5, temperature: float = 1.0) -> None:
        super().__init__()
        check_finetune_options(steps, lr, temperature)
        self.steps, self.lr, self.temperature = int(steps), float(lr), float(temperature)

    def hyperparameters(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "temperature": self.temperature}

    def episode_bytes(self, ways: int, shots: int, queries: int, dim: int) -> int:
        return ways * (shots + queries) * dim * 24

    def transduce(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        def loss(cross: torch.Tensor, centre_sq: torch.Tensor, point_sq: torch.Tensor) -> torch.Tensor:
            logits = distance_logits_from(cross, centre_sq, point_sq, self.temperature)
            support_logits, query_logits = logits.split([support.shape[-2], query.shape[-2]], -2)
            ce = -support_logits.log_softmax(-1).gather(-1, y.unsqueeze(-1))
            ent = entropy(query_logits.softmax(-1))
            return ce.squeeze(-1).mean(-1).sum() + ent.mean(-1).sum()

        with torch.inference_mode(False):
            y = labels.clone()  # saved for backward: not an inference tensor
            init = compute_prototypes(support, labels, n_way)
            points = torch.cat([support, query], -2)
            prototypes = adam_on_centres(loss, points, init, self.steps, self.lr)
        return distance_logits(query, prototypes, self.temperature)
