"""The 'maml' head: Proto-MAML test-time fine-tuning on (frozen) embeddings.

The linear head starts exactly where the prototype head is (W = 2c_k, b = -‖c_k‖², or the
cosine prototype head) and takes `steps` SGD steps of support-set cross-entropy; with
`steps=0` it is the prototype head. Batches of episodes adapt at once under `torch.func.vmap`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.func import vmap

from ..heads.base import Head, check_support
from ..heads.prototype import check_metric_and_transform, transform_features
from .functional import Params, linear, proto_init, sgd_inner_loop


class MAMLHead(Head):
    """Proto-MAML: prototype-initialised linear head fine-tuned on the support set.

    metric: 'euclidean' (W = 2c_k, b = -‖c_k‖²) or 'cosine' (W = scale·c_k/‖c_k‖, b = 0 on
        L2-normalised features); the starting point is the prototype head with that metric.
    feature_transform: None, 'l2n' or 'cl2n', as for the prototype head.
    steps, lr: SGD steps on the support cross-entropy and their step size.
    """

    needs_grad = True  # fine-tunes on each support set at test time
    memory_budget = 128 << 20  # inputs and their gradients

    def __init__(
        self,
        metric: str = "cosine",
        feature_transform: str | None = None,
        scale: float = 10.0,
        steps: int = 20,
        lr: float = 1.0,
    ) -> None:
        super().__init__()
        check_metric_and_transform(metric, feature_transform)
        if int(steps) < 0:
            raise ValueError(f"steps must be >= 0 (0 = the prototype head), got {steps}")
        if float(lr) < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        self.metric = metric
        self.feature_transform = feature_transform
        self.scale = float(scale)
        self.steps = int(steps)
        self.lr = float(lr)
        self.register_buffer("weight", torch.empty(0, 0))
        self.register_buffer("bias", torch.empty(0))
        self.register_buffer("center", torch.empty(0))

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "feature_transform": self.feature_transform,
            "scale": self.scale,
            "steps": self.steps,
            "lr": self.lr,
        }

    def episode_bytes(self, ways: int, shots: int, queries: int, dim: int) -> int:
        return ways * (shots + queries) * dim * 16

    def _inputs(self, x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        x = transform_features(x, self.feature_transform, center)
        return F.normalize(x, dim=-1) if self.metric == "cosine" else x

    def _adapt(self, support: torch.Tensor, labels: torch.Tensor, n_way: int) -> tuple[Params, torch.Tensor]:
        """(adapted head, support centre) of one episode; pure, so it vmaps over episodes."""
        center = support.mean(0)
        feats = transform_features(support, self.feature_transform, center)
        params = proto_init(feats, labels, n_way, self.metric, self.scale)
        x = self._inputs(support, center)

        def support_loss(p: Params) -> torch.Tensor:
            return F.cross_entropy(linear(p, x), labels)

        return sgd_inner_loop(support_loss, params, self.steps, self.lr), center

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> MAMLHead:
        check_support(support, labels)
        with torch.inference_mode(False), torch.no_grad():
            support = support.clone() if support.is_floating_point() else support.float()
            params, center = self._adapt(support, labels.clone(), int(labels.max()) + 1)
        self.weight, self.bias, self.center = params["weight"], params["bias"], center
        return self

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        if self.weight.numel() == 0:
            raise RuntimeError("MAMLHead is not fitted: call fit(support, labels) first")
        if query.shape[-1] != self.weight.shape[-1]:
            raise ValueError(
                f"query embeddings have {query.shape[-1]} dims, the fitted head has {self.weight.shape[-1]}"
            )
        x = self._inputs(query.to(self.weight.dtype), self.center)
        return linear({"weight": self.weight, "bias": self.bias}, x)

    def episode_logits(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        """All episodes adapt at once (vmap over the episode dimension); logits `[E, Q, N]`."""

        def one(s: torch.Tensor, y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
            params, center = self._adapt(s, y, n_way)
            return linear(params, self._inputs(q, center))

        with torch.inference_mode(False), torch.no_grad():
            return vmap(one)(support.clone(), labels.clone(), query.clone())
