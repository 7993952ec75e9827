"""`MetaLearner`: MAML, first-order MAML, ANIL, Meta-SGD and Proto-MAML around any module and loss.

    learner = MetaLearner(head=nn.Linear(64, 5), body=conv4, adapt="all", steps=5, lr=0.4)
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    for batch in tasks:                       # TaskBatch: [T, S, ...] support, [T, Q, ...] query
        opt.zero_grad()
        loss, logits = learner.meta_backward(batch)   # meta-gradient in .grad
        opt.step()

Each task is a pure function of the meta-parameters (`torch.func.functional_call`): the inner
loop builds per-task fast weights as tensors, never copies or mutates the module, and runs for
all tasks of a meta-batch at once under `torch.func.vmap` (the default on a GPU) or one task at a
time (the default on CPU, where a loop is as fast and needs 1/T of the memory).
BatchNorm semantics are explicit (`batchnorm=`, see `protonets.maml.batchnorm`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from .batchnorm import MODES, batchnorm_mode
from .functional import Params, proto_init, sgd_inner_loop

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TaskBatch:
    """T tasks: support `[T, S, ...]` with targets `[T, S]`, query `[T, Q, ...]` with targets `[T, Q]`."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.support_x.shape[0])

    def __getitem__(self, index: slice) -> TaskBatch:
        q = None if self.query_y is None else self.query_y[index]
        return TaskBatch(self.support_x[index], self.support_y[index], self.query_x[index], q)

    def to(self, device: torch.device | str) -> TaskBatch:
        q = None if self.query_y is None else self.query_y.to(device)
        return TaskBatch(self.support_x.to(device), self.support_y.to(device), self.query_x.to(device), q)


def _lr_key(name: str) -> str:
    return name.replace(".", "__")


class MetaLearner(nn.Module):
    """A meta-learned initialisation `head(body(x))` adapted per task by a few SGD steps.

    head: the module adapted per task (e.g. a linear classifier; the whole model if no body).
    body: optional feature extractor, meta-learned; adapted too when `adapt='all'`.
    loss_fn: `loss_fn(outputs, targets) -> scalar` for support and query (cross-entropy, MSE…).
    steps, lr: inner SGD steps and step size (the initial value when `meta_sgd`).
    first_order: FOMAML (inner gradients treated as constants) instead of second-order MAML.
    adapt: 'all' (MAML), 'head' (ANIL: the body runs once per task, only the head adapts), or a
        predicate on parameter names such as 'body.features.3.0.weight' or 'head.bias'.
    meta_sgd: learn one inner step size per parameter element (Li et al. 2017).
    proto_init: 'euclidean' or 'cosine' for Proto-MAML: the linear head starts, per task, at the
        prototype head of the support features (W = 2c_k, b = -‖c_k‖²); 'cosine' expects the
        body to end with L2 normalisation. None: the head's own meta-learned weights.
    batchnorm: 'batch' (per-task batch statistics, no running-stat updates: meta-training) or
        'frozen' (the running statistics: fine-tuning a pretrained encoder).
    vmap: run the tasks of a batch at once under `torch.func.vmap` (True), or loop over them
        (False); None picks vmap for tasks on a GPU and the loop on CPU, where it is faster.
    chunk_size: tasks per forward/backward in `meta_backward` (bounds memory); None: all tasks
        at once under vmap, one at a time in the loop (the same speed there, 1/T the memory).
    """

    def __init__(
        self,
        head: nn.Module,
        body: nn.Module | None = None,
        loss_fn: LossFn = F.cross_entropy,
        *,
        steps: int = 5,
        lr: float = 0.4,
        first_order: bool = False,
        adapt: str | Callable[[str], bool] = "all",
        meta_sgd: bool = False,
        proto_init: str | None = None,
        batchnorm: str = "batch",
        vmap: bool | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if batchnorm not in MODES:
            raise ValueError(f"batchnorm must be one of {MODES}, got '{batchnorm}'")
        if proto_init not in (None, "euclidean", "cosine"):
            raise ValueError(f"proto_init must be None, 'euclidean' or 'cosine', got '{proto_init}'")
        if proto_init is not None and not isinstance(head, nn.Linear):
            raise TypeError(f"proto_init needs head=nn.Linear(D, n_way), got {type(head).__name__}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tasks or None, got {chunk_size}")
        self.head = head
        self.body = body
        self.loss_fn = loss_fn
        self.steps = steps
        self.first_order = first_order
        self.proto_init = proto_init
        self.batchnorm = batchnorm
        self.use_vmap = vmap
        self.chunk_size = chunk_size
        if adapt == "all":
            self._adapt: Callable[[str], bool] = lambda name: True
        elif adapt == "head":
            self._adapt = lambda name: name.startswith("head.")
        elif callable(adapt):
            self._adapt = adapt
        else:
            raise ValueError(f"adapt must be 'all', 'head' or a predicate on parameter names, got {adapt!r}")
        names = [n for n, _ in self._meta_params()]
        self.adapted_names = [n for n in names if self._adapt(n)]
        if not self.adapted_names:
            raise ValueError("adapt selects no parameter; nothing would be adapted per task")
        # ANIL fast path: features computed once per task when no body parameter adapts.
        self.head_only = body is not None and not any(n.startswith("body.") for n in self.adapted_names)
        self.lr = float(lr)
        self.inner_lrs = nn.ParameterDict()
        if meta_sgd:
            for name, p in self._meta_params():
                if name in self.adapted_names:
                    self.inner_lrs[_lr_key(name)] = nn.Parameter(torch.full_like(p.detach(), float(lr)))

    # -- the meta-learned model ------------------------------------------------------------
    @property
    def any_ways(self) -> bool:
        """True when tasks of any number of classes fit: a Proto-MAML head starts at each task's
        prototypes, so its meta-learned weights are never used, and no per-element step size
        (Meta-SGD) is tied to its width."""
        return (
            self.proto_init is not None
            and isinstance(self.head, nn.Linear)
            and not any(key.startswith("head__") for key in self.inner_lrs)
        )

    def with_ways(self, n_way: int) -> MetaLearner:
        """This learner for `n_way`-way tasks: itself at its own width; for a learner with
        `any_ways`, a shallow copy sharing the body with an `n_way`-wide head (else ValueError)."""
        if not isinstance(self.head, nn.Linear) or self.head.out_features == n_way:
            return self
        if not self.any_ways:
            raise ValueError(
                f"this learner was meta-trained for {self.head.out_features}-way tasks and its head "
                f"weights or step sizes depend on that width; it cannot run {n_way}-way tasks"
            )
        other = copy.copy(self)
        other._modules = dict(self._modules)  # the copy's own head; body and step sizes shared
        weight = self.head.weight
        # its weights are never read (each task starts at its prototypes): no random init, so
        # evaluating never moves the global RNG
        other.head = nn.utils.skip_init(
            nn.Linear, self.head.in_features, n_way, device=weight.device, dtype=weight.dtype
        )
        return other

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The un-adapted model `head(body(x))`."""
        return self.head(x if self.body is None else self.body(x))

    def _meta_params(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("inner_lrs.")]

    def _step_sizes(self) -> float | dict[str, torch.Tensor]:
        if len(self.inner_lrs) == 0:
            return self.lr
        return {name: self.inner_lrs[_lr_key(name)] for name in self.adapted_names}

    def hyperparameters(self) -> dict[str, Any]:
        """Settings that, with the module structure, rebuild this learner (for manifests)."""
        return {
            "steps": self.steps,
            "lr": self.lr,
            "first_order": self.first_order,
            "meta_sgd": len(self.inner_lrs) > 0,
            "proto_init": self.proto_init,
            "batchnorm": self.batchnorm,
            "adapted": self.adapted_names,
        }

    # -- one task: a pure function -------------------------------------------------------------
    def _task(
        self,
        params: Params,
        lrs: float | Params,
        xs: torch.Tensor,
        ys: torch.Tensor,
        xq: torch.Tensor,
        yq: torch.Tensor | None,
        steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor, Params]:
        """(query loss, or 0 without targets; query outputs; adapted parameters) of one task."""
        if self.head_only:
            body = {n[5:]: p for n, p in params.items() if n.startswith("body.")}
            xs = functional_call(self.body, body, (xs,))
            xq = functional_call(self.body, body, (xq,))
            params = {n: p for n, p in params.items() if n.startswith("head.")}
            net, strip = self.head, 5
        else:
            net, strip = self, 0

        def call(p: Params, x: torch.Tensor) -> torch.Tensor:
            return functional_call(net, {n[strip:]: v for n, v in p.items()}, (x,))

        if self.proto_init is not None:
            if self.head_only:
                feats = xs
            elif self.body is not None:
                body = {n[5:]: p for n, p in params.items() if n.startswith("body.")}
                feats = functional_call(self.body, body, (xs,))
            else:
                feats = xs
            init = proto_init(feats, ys, self.head.out_features, self.proto_init)
            params = {**params, "head.weight": init["weight"], "head.bias": init["bias"]}
        fixed = {n: p for n, p in params.items() if n not in self.adapted_names}
        fast = {n: p for n, p in params.items() if n in self.adapted_names}

        def support_loss(p: Params) -> torch.Tensor:
            return self.loss_fn(call({**fixed, **p}, xs), ys)

        fast = sgd_inner_loop(support_loss, fast, steps, lrs, self.first_order)
        out = call({**fixed, **fast}, xq)
        loss = out.new_zeros(()) if yq is None else self.loss_fn(out, yq)
        return loss, out, fast

    def _run(self, batch: TaskBatch, params: Params, lrs: float | Params, steps: int) -> tuple:
        if batch.support_y.dim() < 2 or batch.support_x.shape[0] != batch.query_x.shape[0]:
            raise ValueError(
                "tasks must be batched: support_x [T, S, ...], support_y [T, S], query_x [T, Q, ...] "
                f"(got {tuple(batch.support_x.shape)}, {tuple(batch.support_y.shape)}, "
                f"{tuple(batch.query_x.shape)}); add a leading task dimension for one task"
            )
        args = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        use_vmap = self._vmap_for(batch)
        with batchnorm_mode(self, self.batchnorm, fused=not use_vmap):
            if use_vmap:
                in_dims = (None, None, 0, 0, 0, None if batch.query_y is None else 0, None)
                fn = vmap(self._task, in_dims=in_dims, randomness="different")
                return fn(params, lrs, *args, steps)
            results = [
                self._task(params, lrs, *(None if a is None else a[t] for a in args), steps)
                for t in range(len(batch))
            ]
        loss = torch.stack([r[0] for r in results])
        out = torch.stack([r[1] for r in results])
        fast = {n: torch.stack([r[2][n] for r in results]) for n in results[0][2]}
        return loss, out, fast

    def _vmap_for(self, batch: TaskBatch) -> bool:
        return batch.support_x.device.type != "cpu" if self.use_vmap is None else bool(self.use_vmap)

    # -- public API --------------------------------------------------------------------------
    def task_losses(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable query losses `[T]` and query outputs `[T, Q, ...]` after adaptation."""
        if batch.query_y is None:
            raise ValueError("task_losses needs query targets: TaskBatch(..., query_y=[T, Q])")
        loss, out, _ = self._run(batch, dict(self._meta_params()), self._step_sizes(), self.steps)
        return loss, out

    def meta_backward(self, batch: TaskBatch, chunk_size: int | None = None) -> tuple[float, torch.Tensor]:
        """Accumulate the meta-gradient of the mean query loss into `.grad`; (loss, outputs).

        Tasks go through in chunks of `chunk_size` (default: the learner's), each chunk
        backpropagated before the next, so memory holds one chunk's graph.
        """
        n = len(batch)
        chunk = chunk_size or self.chunk_size or (n if self._vmap_for(batch) else 1)
        total, outputs = 0.0, []
        for start in range(0, n, chunk):
            losses, out = self.task_losses(batch[start : start + chunk])
            (losses.sum() / n).backward()
            total += float(losses.detach().sum())
            outputs.append(out.detach())
        return total / n, torch.cat(outputs)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None) -> Params:
        """Adapted parameters per task (leading dim T), without meta-gradient bookkeeping."""
        batch = TaskBatch(support_x, support_y, support_x[:, :1])
        with torch.no_grad():
            params = {n: p.detach() for n, p in self._meta_params()}
            lrs = self._step_sizes()
            lrs = lrs if isinstance(lrs, float) else {n: v.detach() for n, v in lrs.items()}
            return self._run(batch, params, lrs, self.steps if steps is None else steps)[2]

    def predict(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Query outputs `[T, Q, ...]` after adapting on each task's support set (no meta-gradient)."""
        batch = TaskBatch(support_x, support_y, query_x)
        with torch.no_grad():
            params = {n: p.detach() for n, p in self._meta_params()}
            lrs = self._step_sizes()
            lrs = lrs if isinstance(lrs, float) else {n: v.detach() for n, v in lrs.items()}
            return self._run(batch, params, lrs, self.steps if steps is None else steps)[1]
