"""PT-MAP head (Hu et al. 2021): power-transformed features, queries assigned to classes by
optimal transport with *balanced* class marginals (the Sinkhorn projection), prototypes moved
toward the assignment-weighted means. Assumes every class has the same number of queries."""

from __future__ import annotations

from typing import Any

import torch

from .prototype import squared_distances_from
from .transductive import TransductiveHead, class_logsumexp, one_hot


def power_features(x: torch.Tensor, power: float) -> torch.Tensor:
    """sign(x)·(|x| + 1e-6)^power (the paper's transform for non-negative features), then L2."""
    y = x.abs().add_(1e-6).pow_(power).mul_(x.sign())
    return y.div_(torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min_(1e-12))


def center_normalize(x: torch.Tensor) -> torch.Tensor:
    """Subtract the set's own mean, then L2 (the paper centres support and queries separately)."""
    y = x - x.mean(-2, keepdim=True)
    return y.div_(torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min_(1e-12))


MAX_LOG_STEP = 50.0  # the largest change of a log column scaling in one Newton iteration


def dual_value(logk: torch.Tensor, g: torch.Tensor, target: float) -> torch.Tensor:
    """The transport dual `[E]` at log column scalings g `[E, N]`, rows normalised exactly."""
    return target * g.sum(-1) - class_logsumexp(logk + g.unsqueeze(-2)).sum(-1)


def balanced_transport(
    cost: torch.Tensor,
    lam: float,
    log_scalings: torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Sinkhorn projection of exp(−lam·cost) `[E, Q, N]`: rows sum to 1, columns to Q/N.

    Returns (plan `[E, Q, N]`, log column scalings `[E, N]`; pass them back as `log_scalings`
    to start the next, nearby problem from this one's answer).

    Solved by Newton's method on the dual (the log column scalings g, rows normalised exactly):
    the same fixed point as the Sinkhorn–Knopp loop, in a handful of iterations where
    Sinkhorn–Knopp can take hundreds. An episode stops when every column sum is within `tol`
    of Q/N (a NaN cost stops it at once, its plan NaN); stopped episodes leave the batch, and
    any left after `max_iter` iterations return their row-normalised plans. Float64 inside,
    the input's dtype out.
    """
    logk = (-lam * cost).double()
    episodes, queries, ways = logk.shape
    target = queries / ways
    g = logk.new_zeros(episodes, ways) if log_scalings is None else log_scalings.double().clone()
    plan = torch.empty_like(logk)
    active = torch.arange(episodes, device=logk.device)
    # M·1 = 0 and r ⟂ 1, so M + ridge has the same Newton step and is invertible; the small
    # diagonal keeps it so when a column's mass underflows (a class far from every query)
    eye = torch.eye(ways, dtype=logk.dtype, device=logk.device)
    ridge = target / ways * logk.new_ones(ways, ways) + 1e-9 * target * eye
    for _ in range(max_iter):
        lk, ga = logk[active], g[active]
        z = lk + ga.unsqueeze(-2)
        lse = class_logsumexp(z)  # [A, Q]
        p = (z - lse.unsqueeze(-1)).exp()  # rows sum to 1
        cols = p.sum(-2)
        residual = target - cols  # the dual's gradient
        done = ~(residual.abs().amax(-1) > tol)  # NaN (a broken episode) counts as done
        if done.any():
            plan[active[done]] = p[done]
            keep = ~done
            active, lk, ga, lse, p, cols, residual = (
                t[keep] for t in (active, lk, ga, lse, p, cols, residual)
            )
            if not len(active):
                break
        hessian = torch.diag_embed(cols) - p.transpose(-1, -2) @ p + ridge  # −∇² of the dual
        direction = torch.linalg.solve(hessian, residual)
        # at most MAX_LOG_STEP per scaling and iteration: a column with next to no mass (no
        # curvature) climbs in strides instead of one step the line search cannot shorten enough
        direction = direction * (MAX_LOG_STEP / direction.abs().amax(-1, keepdim=True)).clamp(max=1.0)
        value = target * ga.sum(-1) - lse.sum(-1)
        slope = (residual * direction).sum(-1)
        # backtracking (Armijo) line search; the full step, tried on all at once, nearly always passes
        step = torch.ones_like(value)
        floor = value + 1e-4 * slope - 1e-12 * value.abs()  # the full step's required value
        todo = torch.nonzero(dual_value(lk, ga + direction, target) < floor).flatten()
        for _ in range(40):
            if not len(todo):
                break
            step[todo] /= 2
            trial = ga[todo] + step[todo, None] * direction[todo]
            required = value[todo] + 1e-4 * step[todo] * slope[todo] - 1e-12 * value[todo].abs()
            todo = todo[dual_value(lk[todo], trial, target) < required]
        step[todo] = 0  # no ascent left at float64 precision: these stop where they are
        g[active] = ga + step.unsqueeze(-1) * direction
        if len(todo):
            plan[active[todo]] = p[todo]
            active = active[step > 0]
            if not len(active):
                break
    else:
        lk, ga = logk[active], g[active]
        plan[active] = (lk + ga.unsqueeze(-2)).softmax(-1)
    return plan.to(cost.dtype), g


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
        episodes, queries = q.shape[:2]
        support_assign = one_hot(labels, n_way, s.dtype).transpose(-1, -2)  # [E, N, S]
        counts = support_assign.sum(-1, keepdim=True)  # [E, N, 1]
        # The prototypes stay in the span of the support class sums and the queries, so they are
        # kept as coefficients [E, N, N+Q] over basis = [class sums; queries], and distances
        # come from the basis' Gram matrix, computed once: no pass over the features per step.
        basis = torch.cat([support_assign @ s, q], -2)  # [E, N+Q, D]
        gram = basis @ basis.transpose(-1, -2)
        query_gram = gram[:, n_way:]  # q·basis, [E, Q, N+Q]
        q_sq = query_gram[..., n_way:].diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # ‖q‖², [E, Q, 1]

        def distances(coef: torch.Tensor) -> torch.Tensor:  # ‖q − p‖², [E, Q, N]
            p_sq = ((coef @ gram) * coef).sum(-1).unsqueeze(-2)
            return squared_distances_from(query_gram @ coef.transpose(-1, -2), p_sq, q_sq)

        eye = torch.eye(n_way, dtype=s.dtype, device=s.device).expand(episodes, -1, -1)
        # the support class means (a class without support examples starts at zero)
        coef = torch.cat([eye / counts.clamp_min(1), eye.new_zeros(episodes, n_way, queries)], -1)
        scalings = None  # each transport starts from the previous one's answer
        for _ in range(self.steps):
            plan, scalings = balanced_transport(distances(coef), self.lam, scalings)
            # assignment-weighted means of the support (hard labels) and the queries (the plan)
            plan_t = plan.transpose(-1, -2)
            means = torch.cat([eye, plan_t], -1) / (counts + plan_t.sum(-1, keepdim=True))
            coef = coef + self.lr * (means - coef)
        plan, _ = balanced_transport(distances(coef), self.lam, scalings)
        return torch.log(plan.clamp_min(1e-30))
