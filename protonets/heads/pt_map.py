"""PT-MAP head (Hu et al. 2021): power-transformed features, queries assigned to classes by
Sinkhorn optimal transport with *balanced* class marginals, prototypes moved toward the
assignment-weighted means. Assumes every class has the same number of queries."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .prototype import compute_prototypes
from .transductive import TransductiveHead, one_hot


def power_features(x: torch.Tensor, power: float) -> torch.Tensor:
    """sign(x)·(|x| + 1e-6)^power (the paper's transform for non-negative features), then L2."""
    return F.normalize(x.sign() * (x.abs() + 1e-6).pow(power), dim=-1)


def center_normalize(x: torch.Tensor) -> torch.Tensor:
    """Subtract the set's own mean, then L2 (the paper centres support and queries separately)."""
    return F.normalize(x - x.mean(-2, keepdim=True), dim=-1)


def sinkhorn(cost: torch.Tensor, lam: float, eps: float = 1e-6, max_iter: int = 1000) -> torch.Tensor:
    """Transport plans `[E, Q, N]`: rows sum to 1, columns to Q/N; each episode stops when its
    row sums move less than `eps` (as the paper's loop, per episode). Converged episodes leave
    the batch, so the many that converge in a few iterations do not wait for the slowest."""
    q, n = cost.shape[-2:]
    plan = torch.exp(-lam * cost)
    plan = plan / plan.sum((-2, -1), keepdim=True)
    active = torch.arange(plan.shape[0], device=plan.device)  # episodes still iterating
    current = plan  # their plans
    rows_before = torch.zeros(cost.shape[:-1], dtype=cost.dtype, device=cost.device)
    for _ in range(max_iter):
        rows = current.sum(-1)
        done = ~((rows_before - rows).abs().amax(-1) > eps)  # NaN counts as done, as before
        if done.any():
            plan[active[done]] = current[done]
            keep = ~done
            active, current, rows = active[keep], current[keep], rows[keep]
            if not len(active):
                return plan
        rows_before = rows
        current = current / (rows.unsqueeze(-1) + 1e-10)
        current = current * ((q / n) / (current.sum(-2, keepdim=True) + 1e-10))
    plan[active] = current
    return plan


class PTMAPHead(TransductiveHead):
    """PT-MAP; logits are log of the final transport plan (rows are class probabilities).

    power: β of the power transform; lam: Sinkhorn's λ (cost = squared distance);
    lr: the step α toward the new class means; steps: prototype updates.
    Defaults: the paper's (β 0.5, λ 10, α 0.2, 20 steps; easyfsl: 10 steps, no normalisation).
    """

    assumes_balanced_queries = True  # Sinkhorn's column marginals: Q/N queries per class

    def __init__(self, power: float = 0.5, lam: float = 10.0, lr: float = 0.2, steps: int = 20) -> None:
        super().__init__()
        if not float(power) > 0:
            raise ValueError(f"power must be > 0, got {power}")
        if not float(lam) > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        if not 0 <= float(lr) <= 1:
            raise ValueError(f"lr must be in [0, 1], got {lr}")
        if int(steps) < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.power, self.lam, self.lr, self.steps = float(power), float(lam), float(lr), int(steps)

    def hyperparameters(self) -> dict[str, Any]:
        return {"power": self.power, "lam": self.lam, "lr": self.lr, "steps": self.steps}

    def transduce(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        s = center_normalize(power_features(support, self.power))
        q = center_normalize(power_features(query, self.power))
        x = torch.cat([s, q], -2)
        support_assign = one_hot(labels, n_way, s.dtype)
        prototypes = compute_prototypes(s, labels, n_way)
        for _ in range(self.steps):
            plan = sinkhorn(torch.cdist(q, prototypes).pow(2), self.lam)
            assign = torch.cat([support_assign, plan], -2)  # [E, S+Q, N]
            means = assign.transpose(-1, -2) @ x / assign.sum(-2).unsqueeze(-1)
            prototypes = prototypes + self.lr * (means - prototypes)
        plan = sinkhorn(torch.cdist(q, prototypes).pow(2), self.lam)
        return torch.log(plan.clamp_min(1e-30))
