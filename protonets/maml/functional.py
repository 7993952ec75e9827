"""The functional MAML core: parameters are dicts of tensors, adaptation is a pure function.

Nothing here touches a module's state; everything composes with `torch.func.vmap` (one task
per vmapped slice) and with ordinary autograd outside (the meta-gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.func import grad

from ..heads.prototype import compute_prototypes

Params = dict[str, torch.Tensor]
LearningRate = float | Mapping[str, torch.Tensor]


def sgd_inner_loop(
    support_loss: Callable[[Params], torch.Tensor],
    params: Params,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
) -> Params:
    """`steps` SGD steps θ ← θ − α·∇L_support(θ); returns the adapted parameters.

    lr: one step size, or one tensor per parameter name (Meta-SGD, learned and broadcast).
    Second order (default): the steps stay differentiable, so autograd outside gives the MAML
    meta-gradient. `first_order`: the inner gradients are constants (FOMAML); the meta-gradient
    is then ∂L_query/∂θ' (plus what flows through learned step sizes).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    for _ in range(steps):
        if first_order:
            with torch.no_grad():
                grads = grad(support_loss)(params)
        else:
            grads = grad(support_loss)(params)
        params = {
            name: p - (lr[name] if isinstance(lr, Mapping) else lr) * grads[name]
            for name, p in params.items()
        }
    return params


def linear(params: Params, x: torch.Tensor) -> torch.Tensor:
    """x @ weight.T + bias, the head that `proto_init` initialises."""
    return x @ params["weight"].transpose(-1, -2) + params["bias"]


def proto_init(
    features: torch.Tensor, labels: torch.Tensor, n_way: int, metric: str = "euclidean", scale: float = 10.0
) -> Params:
    """Proto-MAML (Triantafillou et al. 2020): the linear head equal to the prototype head.

    euclidean: W = 2·c_k, b = −‖c_k‖², so x·W_k + b_k = −‖x − c_k‖² + ‖x‖² (same softmax as the
    prototype head). cosine: W = scale·c_k/‖c_k‖, b = 0 on L2-normalised features (the cosine
    prototype head exactly). Differentiable in `features`, and works batched `[..., S, D]`.
    """
    prototypes = compute_prototypes(features, labels, n_way)
    if metric == "euclidean":
        return {"weight": 2 * prototypes, "bias": -prototypes.pow(2).sum(-1)}
    if metric == "cosine":
        weight = scale * F.normalize(prototypes, dim=-1)
        return {"weight": weight, "bias": torch.zeros_like(weight[..., 0])}
    raise ValueError(f"metric must be 'euclidean' or 'cosine', got '{metric}'")
