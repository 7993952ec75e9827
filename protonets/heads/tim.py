"""TIM head (Boudiaf et al. 2020, TIM-GD): a linear head on L2-normalised features, started at
the prototypes and fine-tuned by Adam on support cross-entropy − (marginal − conditional
entropy of the query predictions). The marginal term favours *balanced* query predictions."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .prototype import compute_prototypes
from .transductive import TransductiveHead, adam_on_centres, entropy, one_hot


def tim_logits_from(
    cross: torch.Tensor, centre_sq: torch.Tensor, point_sq: torch.Tensor, temperature: float
) -> torch.Tensor:
    """−temperature/2 · ‖x − w‖², written as the paper's linear head, from x·wᵀ `[E, M, N]`,
    ‖w‖² `[E, 1, N]` and ‖x‖² `[E, M, 1]`."""
    return temperature * (cross - 0.5 * centre_sq - 0.5 * point_sq)


def tim_logits(x: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """`tim_logits_from` of points `[E, M, D]` and weights `[E, N, D]`."""
    return tim_logits_from(
        x @ weights.transpose(-1, -2),
        weights.pow(2).sum(-1).unsqueeze(-2),
        x.pow(2).sum(-1, keepdim=True),
        temperature,
    )


class TIMHead(TransductiveHead):
    """TIM-GD. Loss per episode: ce_weight·CE − (marginal_weight·H(Ŷ_Q) − conditional_weight·H(Ŷ_Q|X_Q)).

    temperature: logit scale; steps, lr: Adam iterations and step size.
    Defaults: the paper's (T 15, weights 0.1 / 1 / 0.1, 1000 steps, lr 1e-4;
    easyfsl: cosine logits, T 10, weights 1 / 1 / 0.1, 50 steps).
    """

    needs_grad = True
    assumes_balanced_queries = True  # the marginal-entropy term favours balanced predictions

    def __init__(
        self,
        temperature: float = 15.0,
        steps: int = 1000,
        lr: float = 1e-4,
        ce_weight: float = 0.1,
        marginal_weight: float = 1.0,
        conditional_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if int(steps) < 0:
            raise ValueError(f"steps must be >= 0 (0 = the prototype head), got {steps}")
        if not float(lr) >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        self.temperature, self.steps, self.lr = float(temperature), int(steps), float(lr)
        self.ce_weight = float(ce_weight)
        self.marginal_weight = float(marginal_weight)
        self.conditional_weight = float(conditional_weight)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "steps": self.steps,
            "lr": self.lr,
            "ce_weight": self.ce_weight,
            "marginal_weight": self.marginal_weight,
            "conditional_weight": self.conditional_weight,
        }

    def episode_bytes(self, ways: int, shots: int, queries: int, dim: int) -> int:
        return ways * (shots + queries) * dim * 24

    def information_terms(
        self, support_logits: torch.Tensor, onehot: torch.Tensor, query_logits: torch.Tensor, shots: int
    ) -> torch.Tensor:
        """Per-episode loss `[E]` (α-TIM overrides the entropies)."""
        ce = -(onehot * support_logits.log_softmax(-1)).sum(-1).mean(-1)
        p = query_logits.softmax(-1)
        marginal = entropy(p.mean(-2))
        conditional = entropy(p).mean(-1)
        return self.ce_weight * ce - (self.marginal_weight * marginal - self.conditional_weight * conditional)

    def transduce(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        s, q = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
        onehot = one_hot(labels, n_way, s.dtype)
        shots = int(onehot[0].sum(0).min())

        def loss(cross: torch.Tensor, centre_sq: torch.Tensor, point_sq: torch.Tensor) -> torch.Tensor:
            logits = tim_logits_from(cross, centre_sq, point_sq, self.temperature)
            support_logits, query_logits = logits.split([s.shape[-2], q.shape[-2]], -2)
            return self.information_terms(support_logits, onehot, query_logits, shots).sum()

        with torch.inference_mode(False):
            onehot = onehot.clone()  # saved for backward: not an inference tensor
            init = compute_prototypes(s, labels, n_way)
            weights = adam_on_centres(loss, torch.cat([s, q], -2), init, self.steps, self.lr)
        return tim_logits(q, weights, self.temperature)
