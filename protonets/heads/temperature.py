"""Temperature prototype head: prototypes as ProtoNet, logits = -squared distance / temperature."""

from __future__ import annotations

from typing import Any

import torch

from .base import Head, check_support
from .prototype import compute_prototypes, prototype_logits


class TemperaturePrototypeHead(Head):
    """Nearest prototype with a softmax temperature: logits `-‖q - c_k‖² / temperature`.

    The temperature changes the probabilities (calibration), never the predicted class.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.register_buffer("prototypes", torch.empty(0, 0))

    def hyperparameters(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> TemperaturePrototypeHead:
        check_support(support, labels)
        support = support if support.is_floating_point() else support.float()
        self.prototypes = compute_prototypes(support, labels, int(labels.max()) + 1)
        return self

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        if self.prototypes.numel() == 0:
            raise RuntimeError("TemperaturePrototypeHead is not fitted: call fit(support, labels) first")
        return prototype_logits(query.to(self.prototypes.dtype), self.prototypes) / self.temperature

    def episode_logits(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        return prototype_logits(query, compute_prototypes(support, labels, n_way)) / self.temperature
