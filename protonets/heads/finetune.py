"""Fine-tune head (Chen et al. 2019, "A Closer Look at Few-shot Classification"; easyfsl's
`Finetune`): the prototypes, fine-tuned by Adam on the support set's cross-entropy alone,
classify the queries by cosine similarity (Baseline++'s classifier, easyfsl's default) or by
Euclidean distance. Inductive: a query's answer depends on the support set only, unlike
`transductive-finetune`, which also lowers the entropy of the query predictions."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import SupportSetHead
from .prototype import compute_prototypes
from .transductive import adam_on_centres
from .transductive_finetune import check_finetune_options, distance_logits, distance_logits_from


def cosine_logits_from(
    cross: torch.Tensor, centre_sq: torch.Tensor, point_sq: torch.Tensor, temperature: float
) -> torch.Tensor:
    """temperature · cos(x, p) from x·pᵀ `[E, M, N]`, ‖p‖² `[E, 1, N]` and ‖x‖² `[E, M, 1]`,
    with F.normalize's floor on the norms."""
    return temperature * cross / (point_sq.sqrt().clamp_min(1e-12) * centre_sq.sqrt().clamp_min(1e-12))


def cosine_logits(x: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """temperature · cos(x, p): `[E, M, D]`, `[E, N, D]` -> `[E, M, N]`."""
    return temperature * F.normalize(x, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(-1, -2)


class FinetuneHead(SupportSetHead):
    """steps, lr, temperature, metric: easyfsl's defaults (200 Adam steps of 1e-4, temperature 1,
    cosine); `metric="euclidean"` scores −temperature · distance instead."""

    needs_grad = True

    def __init__(
        self, steps: int = 200, lr: float = 1e-4, temperature: float = 1.0, metric: str = "cosine"
    ) -> None:
        super().__init__()
        check_finetune_options(steps, lr, temperature)
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        self.steps, self.lr, self.temperature, self.metric = int(steps), float(lr), float(temperature), metric
        self.logits = cosine_logits if metric == "cosine" else distance_logits
        self.logits_from = cosine_logits_from if metric == "cosine" else distance_logits_from

    def hyperparameters(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "temperature": self.temperature, "metric": self.metric}

    def episode_bytes(self, ways: int, shots: int, queries: int, dim: int) -> int:
        return ways * (shots * dim * 24 + queries * (dim * 4 + ways * 8))

    def episode_logits(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        if support.dim() != 3 or query.dim() != 3 or labels.shape != support.shape[:2]:
            raise ValueError(
                f"expected support [E, S, D], labels [E, S], query [E, Q, D]; got {tuple(support.shape)}, "
                f"{tuple(labels.shape)}, {tuple(query.shape)}"
            )

        def loss(cross: torch.Tensor, centre_sq: torch.Tensor, point_sq: torch.Tensor) -> torch.Tensor:
            logits = self.logits_from(cross, centre_sq, point_sq, self.temperature)
            ce = -logits.log_softmax(-1).gather(-1, y.unsqueeze(-1))
            return ce.squeeze(-1).mean(-1).sum()  # per-episode means, summed: episodes independent

        with torch.inference_mode(False):
            s, y = support.float(), labels.to(torch.int64).clone()  # y is saved for backward
            prototypes = adam_on_centres(loss, s, compute_prototypes(s, y, n_way), self.steps, self.lr)
        return self.logits(query.float(), prototypes, self.temperature)
