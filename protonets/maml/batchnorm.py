"""Explicit BatchNorm semantics for the MAML inner loop (per-task batch statistics, or frozen).

Why not the modules as they are: a BatchNorm in training mode updates its running statistics in
place, so (1) under `torch.func.vmap` / `grad` it fails ("attempted to call in-place operation
... that would mutate a captured Tensor"), (2) in a per-task loop every task leaks statistics
into the next, and (3) the fused `aten.native_batch_norm` second-order backward disagrees with
the true meta-gradient under `vmap` (by ~1e-4 in float64 on a 3-layer net; see
tests/test_maml.py). Inside `batchnorm_mode` every BatchNorm of a model computes instead

- ``"batch"``: y = (x - mean_B) / sqrt(var_B + eps) · weight + bias with the statistics of the
  batch it sees (per task: the support set during adaptation, the query set when evaluating, as
  in Finn et al. 2017) — the semantics for meta-training from scratch;
- ``"frozen"``: the same with the module's running statistics — the semantics for fine-tuning a
  pretrained (timm) encoder, whose running statistics must not drift;

never writing to any buffer, so no state passes from one task to the next. Under vmap it is
written with plain differentiable tensor operations (exact second order); in a per-task loop
(`fused=True`) it calls torch's fused kernel with no buffers to update, which is exact there
and faster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("batch", "frozen")


def functional_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch norm over all dims but channels (dim 1); batch statistics unless running ones are given."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if running_mean is None or running_var is None:
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    scale = torch.rsqrt(var + eps)  # per channel: fold the affine weight in before touching x
    if weight is not None:
        scale = scale * weight.view(shape)
    if bias is None:
        return (x - mean) * scale
    return torch.addcmul(bias.view(shape), x - mean, scale)


def _is_timm_norm_act(module: nn.Module) -> bool:
    return type(module).__name__.startswith("BatchNormAct") and hasattr(module, "act")


def _patched_forward(module: nn.modules.batchnorm._BatchNorm, mode: str, fused: bool):  # noqa: ANN202
    post = _is_timm_norm_act(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        frozen = mode == "frozen"
        if frozen and module.running_mean is None:
            raise ValueError(
                f"batchnorm='frozen' needs running statistics, but {type(module).__name__} has none "
                "(track_running_stats=False); use batchnorm='batch'"
            )
        mean = module.running_mean if frozen else None
        var = module.running_var if frozen else None
        if fused:  # torch's kernel; its buffers are read only (training=False, or no buffers given)
            y = F.batch_norm(x, mean, var, module.weight, module.bias, not frozen, 0.0, module.eps)
        else:
            y = functional_batch_norm(x, module.weight, module.bias, module.eps, mean, var)
        if post:  # timm's BatchNormAct2d: norm, then dropout and activation
            y = module.act(module.drop(y))
        return y

    return forward


@contextlib.contextmanager
def batchnorm_mode(model: nn.Module, mode: str, fused: bool = False) -> Iterator[nn.Module]:
    """Within the block, every BatchNorm of `model` uses `mode` ('batch' or 'frozen') statistics.

    The modules' `forward` is swapped for a functional one and restored on exit; buffers are
    only read. Models without BatchNorm pass through unchanged. `fused`: use torch's fused
    kernel (faster; exact to second order outside vmap, but not under vmap: keep False there).
    """
    if mode not in MODES:
        raise ValueError(f"batchnorm must be one of {MODES}, got '{mode}'")
    patched: list[nn.Module] = []
    try:
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            standard = type(module).forward is nn.modules.batchnorm._BatchNorm.forward
            if not (standard or _is_timm_norm_act(module)):
                raise TypeError(
                    f"{type(module).__name__} has its own forward, so its MAML semantics are "
                    "unknown; replace it with torch.nn.BatchNorm*d or timm's BatchNormAct2d"
                )
            module.forward = _patched_forward(module, mode, fused)
            patched.append(module)
        yield model
    finally:
        for module in patched:
            del module.forward
