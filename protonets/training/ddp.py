"""Training under `torchrun`: per-rank seeds, DistributedDataParallel, gradients averaged by hand.

A single process never imports this module's torch.distributed parts: every function here is
called only when `world.distributed` (see `protonets.encoders.distributed`). Each rank draws its
own episodes; DDP averages the gradients, so a step on W ranks is one step on the mean loss of
W episodes (the effective batch). Rank 0's seeds are the single process's, so its episodes are
the ones a single process would draw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from protonets.encoders.distributed import World
from protonets.encoders.errors import UserInputError


def rank_seed(seed: int, world: World) -> int:
    """The seed of this rank's episodes and RNGs: `seed` on rank 0, one derived from (seed, rank) else."""
    if world.rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, world.rank]).generate_state(1)[0])


def check_world_size(manifest: dict[str, Any], world: World, source: str) -> None:
    """Refuse to resume a run saved by another number of processes (its RNG streams are per rank)."""
    saved = int(manifest.get("world_size", 1))
    if saved != world.size:
        raise UserInputError(
            f"--resume: '{source}' was trained by {saved} process(es) and this launch has {world.size}; "
            f"resume with the same number of processes (torchrun --nnodes × --nproc-per-node = {saved})"
        )


class LossModule(nn.Module):
    """A method's loss as a module's `forward`, so DistributedDataParallel can wrap it.

    parts: the modules whose parameters the loss trains; loss: called with `forward`'s arguments.
    """

    def __init__(self, parts: dict[str, nn.Module], loss: Callable[..., Any]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.loss = loss

    def forward(self, *args: Any) -> Any:
        return self.loss(*args)


def data_parallel(parts: dict[str, nn.Module], loss: Callable[..., Any], device: torch.device) -> nn.Module:
    """`loss` wrapped in DistributedDataParallel over `parts` (rank 0's weights broadcast to all).

    `static_graph`: every step uses the same parameters, so unused ones (e.g. a timm classifier
    behind `pre_logits`) are found once, in the first step, instead of at every step.
    """
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(LossModule(parts, loss), device_ids=ids, static_graph=True)


def broadcast_module(modules: Iterable[nn.Module]) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a module)."""
    import torch.distributed as dist

    with torch.no_grad():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)


def average_gradients(params: Iterable[nn.Parameter], weight: float) -> None:
    """Sum `weight × grad` over the ranks into every rank's `.grad`, in one all-reduce.

    weight: this rank's share of the global batch (its tasks / all tasks), so that the sum of
    per-rank mean gradients is the gradient of the mean over all tasks.
    """
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    used = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([*(g.reshape(-1) * weight for g in grads), used])
    dist.all_reduce(flat)
    offset = 0
    for p, g, anywhere in zip(params, grads, flat[-len(params) :].tolist()):
        # a parameter no rank used keeps no gradient (Adam skips it, as in one process)
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone() if anywhere else None
        offset += g.numel()
