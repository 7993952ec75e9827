"""Logistic-regression probe: scikit-learn's LogisticRegression on the L2-normalised support set."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import Head, check_support


class LogRegHead(Head):
    """A linear probe fitted per support set (lbfgs, `max_iter` iterations, inverse penalty `C`).

    The fitted weights and biases are buffers `[C, D]`, `[C]`; logits are scikit-learn's
    decision function on L2-normalised queries (computed as it does, in float64 numpy).
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000) -> None:  # noqa: N803  (scikit-learn's name)
        super().__init__()
        if not float(C) > 0:
            raise ValueError(f"C must be > 0, got {C}")
        self.C = float(C)
        self.max_iter = int(max_iter)
        self.register_buffer("weight", torch.empty(0, 0, dtype=torch.float64))
        self.register_buffer("bias", torch.empty(0, dtype=torch.float64))

    def hyperparameters(self) -> dict[str, Any]:
        return {"C": self.C, "max_iter": self.max_iter}

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> LogRegHead:
        from sklearn.linear_model import LogisticRegression

        check_support(support, labels)
        support = support.detach() if support.is_floating_point() else support.detach().float()
        x = F.normalize(support, dim=-1)
        y = labels.detach().cpu().numpy()
        model = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(x.cpu().numpy(), y)
        n_way = int(y.max()) + 1
        coef, intercept = model.coef_, model.intercept_
        if len(model.classes_) == 2:  # binary: one score s for classes_[1]; logits [0, s]
            coef = np.concatenate([np.zeros_like(coef), coef])
            intercept = np.concatenate([np.zeros_like(intercept), intercept])
        weight = np.zeros((n_way, coef.shape[1]))
        bias = np.full(n_way, -np.inf)  # a class absent from the support set is never predicted
        weight[model.classes_], bias[model.classes_] = coef, intercept
        self.weight, self.bias = torch.from_numpy(weight), torch.from_numpy(bias)
        return self

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        if self.weight.numel() == 0:
            raise RuntimeError("LogRegHead is not fitted: call fit(support, labels) first")
        if query.shape[-1] != self.weight.shape[-1]:
            raise ValueError(
                f"query embeddings have {query.shape[-1]} dims, the fitted probe has {self.weight.shape[-1]}"
            )
        x = F.normalize(query.detach(), dim=-1).cpu().numpy()
        return torch.from_numpy(x @ self.weight.numpy().T + self.bias.numpy())
