"""LaplacianShot head (Ziko et al. 2020): query assignments that stay close to the rectified
prototypes and agree with their k nearest query neighbours (a Laplacian term), solved by
bound updates."""

from __future__ import annotations

from typing import Any

import torch

from .bd_cspn import rectify
from .prototype import FEATURE_TRANSFORMS, transform_episode
from .transductive import TransductiveHead, class_softmax


def knn_graph(x: torch.Tensor, k: int) -> torch.Tensor:
    """Affinities `[E, Q, Q]`: W[i, j] = 1 if j is among the k nearest neighbours of i (not i).
    A constant of the inputs (no gradient flows through it).

    On the CPU, for up to `RUNNING_MIN_QUERIES` queries and batches of `RUNNING_MIN_EPISODES`
    episodes or more, built as Wᵀ (column i marks the neighbours of i) without a per-row `topk`,
    whose cost is per row: the k smallest distances of every column are kept by a running
    min/max over the rows (2k − 1 elementwise ops a row, vectorised over episodes and columns),
    then one comparison with the k-th. An episode whose count is not exactly k (a tie at that
    distance, as duplicate queries give, or NaN) is ranked again by `topk`, as are larger
    episodes, small batches and other devices (one kernel there).
    """
    k = min(k, x.shape[-2] - 1)
    x = x.detach()
    # column i: ‖x_j‖² − 2 x_j·x_i, the distances from x_i less ‖x_i‖², which the column shares
    dist = torch.baddbmm(x.pow(2).sum(-1).unsqueeze(-1), x, x.transpose(-1, -2), alpha=-2)
    dist.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    if x.device.type != "cpu" or x.shape[-2] > RUNNING_MIN_QUERIES or x.shape[0] < RUNNING_MIN_EPISODES:
        return _topk_graph(dist, k)
    smallest = [torch.full_like(dist[:, 0], float("inf")) for _ in range(k)]  # ascending, [E, Q]
    for row in dist.unbind(-2):
        for low, high in zip(smallest[-2::-1], smallest[:0:-1]):  # (m_{k-2}, m_{k-1}) ... (m_0, m_1)
            torch.minimum(high, torch.maximum(low, row), out=high)
        torch.minimum(smallest[0], row, out=smallest[0])
    graph_t = dist.clone().le_(smallest[-1].unsqueeze(-2))  # float 0/1: [j, i] = j is near i
    tied = graph_t.sum(-2).ne(k).any(-1)
    graph = graph_t.transpose(-1, -2)
    if tied.any():
        graph[tied] = _topk_graph(dist[tied], k)
    return graph


RUNNING_MIN_QUERIES = 512  # above this, one topk over [E, Q, Q] is the faster on a CPU
RUNNING_MIN_EPISODES = 16  # below this, too: the loop's 2k − 1 ops a row cost per call, not per episode


def _topk_graph(dist: torch.Tensor, k: int) -> torch.Tensor:
    """W `[E, Q, Q]` from distances whose column i holds the distances from query i."""
    near = dist.transpose(-1, -2).topk(k, dim=-1, largest=False).indices
    return torch.zeros_like(dist).scatter_(-1, near, 1.0)


class LaplacianShotHead(TransductiveHead):
    """Minimises Σ_q a_q·y_q − λ Σ_{q,q'} W_qq' y_q·y_q' + Σ_q y_q log y_q by bound updates,
    a_q = squared distances to the BD-CSPN rectified prototypes; logits are the last update's
    (their softmax is the assignment).

    knn: neighbours per query in the graph, the query itself not counted; lam: weight λ of the
    Laplacian term; steps: at most this many bound updates (an episode stops when its bound is
    still); feature_transform: 'cl2n' as in the paper (centre on the support mean, then L2), or
    None; scale: ε of the rectification (see BD-CSPN).
    Defaults: easyfsl's 5-way settings (λ 0.7, 20 steps) and the paper's graph: knn = 3 in the
    paper's code and in easyfsl's counts the query itself, so 2 neighbours.
    """

    assumes_balanced_queries = True  # the queries are shifted as BD-CSPN shifts them

    def __init__(
        self,
        knn: int = 2,
        lam: float = 0.7,
        steps: int = 20,
        feature_transform: str | None = "cl2n",
        scale: float = 10.0,
    ) -> None:
        super().__init__()
        if int(knn) < 1:
            raise ValueError(f"knn must be at least 1, got {knn}")
        if not float(lam) >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if int(steps) < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if feature_transform not in FEATURE_TRANSFORMS:
            raise ValueError(
                f"feature_transform must be one of {FEATURE_TRANSFORMS}, got '{feature_transform}'"
            )
        self.knn, self.lam, self.steps = int(knn), float(lam), int(steps)
        self.feature_transform, self.scale = feature_transform, float(scale)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "knn": self.knn,
            "lam": self.lam,
            "steps": self.steps,
            "feature_transform": self.feature_transform,
            "scale": self.scale,
        }

    def transduce(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        s, q = transform_episode(support, query, self.feature_transform)
        prototypes, queries = rectify(s, labels, q, n_way, self.scale)
        # classes in dim -2 ([E, N, Q]): the per-query reductions then run along contiguous rows
        a = queries.squared_distances(prototypes)
        kernel_t = knn_graph(q, self.knn).transpose(-1, -2)  # the shift moves every query alike
        logits = -a
        neighbours_y = class_softmax(logits, -2) @ kernel_t  # Σ of the neighbours' assignments
        old = torch.full(a.shape[:1], float("inf"), dtype=a.dtype, device=a.device)
        active = torch.ones(a.shape[:1], dtype=torch.bool, device=a.device)
        for i in range(self.steps):
            new_logits = self.lam * neighbours_y - a
            top = new_logits.amax(-2, keepdim=True)
            new_y = (new_logits - top).exp()
            total = new_y.sum(-2, keepdim=True)
            new_y = new_y / total
            new_neighbours_y = new_y @ kernel_t
            # the bound Σ y·(log y + a − λ W y): with log y = new_logits − top − log total and
            # Σ_n y = 1, it is λ Σ y·(W y_old − W y) − Σ_q (top + log total)
            change = (new_y * (neighbours_y - new_neighbours_y)).sum((1, 2))
            bound = self.lam * change - (top + total.log()).sum((1, 2))
            neighbours_y = new_neighbours_y
            keep = active.view(-1, 1, 1)  # stopped episodes keep their last update
            logits = torch.where(keep, new_logits, logits)
            still = (bound - old).abs() <= 1e-6 * old.abs()
            if i > 1:
                active = active & ~still
            old = torch.where(active, bound, old)
            if not active.any():
                break
        return logits.transpose(-1, -2)
