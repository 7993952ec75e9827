"""MAML meta-step speed and memory: this package against a learn2learn-style clone-and-adapt loop.

One run, same model (Conv-4 + linear head, 28×28 greyscale), same initial weights, same tasks
(5-way 1-shot, 15 queries, random images: speed does not depend on the pixels), 5 inner SGD
steps, meta-batch 32, second-order MAML:

- ours-vmap: `MetaLearner` (torch.func), all 32 tasks at once under vmap, one backward;
- ours-loop: `MetaLearner(vmap=False)`, the same core one task at a time (backward per chunk);
- l2l-loop: per task `clone_module` + `autograd.grad(create_graph=True)` + `update_module`
  and `loss.backward()`, written the way learn2learn's `MAML.clone()/adapt()` does it.

Each variant runs in its own process (so peak memory is its own), in rounds that alternate the
variants to share out the machine's noise. Reported: median (and min, the least disturbed on a
busy machine) seconds per meta-step, the ratio to l2l-loop (< 1 is faster), peak memory of the
meta-steps (CPU: peak RSS growth over the RSS before the first step; CUDA:
torch.cuda.max_memory_allocated), and the first meta-step's loss and gradient norm (all
variants compute the same numbers).

    python scripts/bench_maml.py --rounds 1 --vmap-chunk 8     # CPU: ~2 minutes
    python scripts/bench_maml.py --device cuda --rounds 3 --steps 10
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("ours-vmap", "ours-loop", "l2l-loop")


def build_body() -> nn.Module:
    """Conv-4 (encoders/conv4.py when present, else an identical stand-in): 28×28×1 -> 64."""
    try:
        import timm

        import protonets.encoders.conv4  # noqa: F401  (registers 'conv4' with timm)

        return timm.create_model("conv4", num_classes=0)
    except ImportError:

        def block(i: int, o: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        return nn.Sequential(block(1, 64), block(64, 64), block(64, 64), block(64, 64), nn.Flatten())


def make_tasks(args: argparse.Namespace, device: torch.device):  # noqa: ANN201
    from protonets.maml import TaskBatch

    g = torch.Generator().manual_seed(0)
    t, n, k, q = args.meta_batch, args.ways, args.shots, args.queries
    xs = torch.randn(t, n * k, 1, 28, 28, generator=g)
    xq = torch.randn(t, n * q, 1, 28, 28, generator=g)
    ys = torch.arange(n).repeat_interleave(k).expand(t, -1).contiguous()
    yq = torch.arange(n).repeat_interleave(q).expand(t, -1).contiguous()
    return TaskBatch(xs, ys, xq, yq).to(device)


# -- learn2learn's way (learn2learn/utils/__init__.py: clone_module, update_module; algorithms/maml.py)
def clone_module(module: nn.Module) -> nn.Module:
    """learn2learn's clone: same class, parameters `p.clone()` (in the graph); buffers shared."""
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = module._parameters.copy()
    clone._buffers = module._buffers.copy()
    clone._modules = module._modules.copy()
    for key, p in module._parameters.items():
        if p is not None:
            clone._parameters[key] = p.clone()
    for key, m in module._modules.items():
        clone._modules[key] = clone_module(m)
    return clone


def update_module(module: nn.Module, grads: list[torch.Tensor], lr: float) -> None:
    """learn2learn's `maml_update`: p ← p − lr·g, written into the clone's `_parameters`."""
    params = [m for m in module.modules() for k in m._parameters if m._parameters[k] is not None]
    keys = [k for m in module.modules() for k in m._parameters if m._parameters[k] is not None]
    for m, k, g in zip(params, keys, grads):
        m._parameters[k] = m._parameters[k] - lr * g


def l2l_meta_step(model: nn.Module, batch, steps: int, lr: float) -> float:  # noqa: ANN001
    total = 0.0
    for t in range(len(batch)):
        learner = clone_module(model)
        for _ in range(steps):
            loss = F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(
                loss, list(learner.parameters()), retain_graph=True, create_graph=True
            )
            update_module(learner, grads, lr)
        loss = F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t]) / len(batch)
        loss.backward()
        total += float(loss)
    return total


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def worker(args: argparse.Namespace) -> None:
    """One variant in this process: warm-up step, then `--steps` timed meta-steps; prints JSON."""
    from protonets.maml import MetaLearner

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    body, head = build_body(), nn.Linear(64, args.ways)
    batch = make_tasks(args, device)
    if args.worker == "l2l-loop":
        model = nn.Sequential(body, head).to(device).train()
        params = list(model.parameters())

        def step() -> float:
            return l2l_meta_step(model, batch, args.inner_steps, args.lr)
    else:
        vmap = args.worker == "ours-vmap"
        chunk = args.vmap_chunk if vmap else 1
        learner = MetaLearner(head, body, steps=args.inner_steps, lr=args.lr, vmap=vmap, chunk_size=chunk)
        learner = learner.to(device)
        params = list(learner.parameters())

        def step() -> float:
            return learner.meta_backward(batch)[0]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    base = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        for p in params:
            p.grad = None
        sync()
        start = time.perf_counter()
        losses.append(step())
        sync()
        if i >= args.warmup:  # warm-up steps: allocator, kernels
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base_cuda
    grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)))
    print(json.dumps({"times": times, "peak_mb": peak, "loss": losses[0], "grad_norm": grad_norm}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per variant, alternated")
    parser.add_argument("--steps", type=int, default=1, help="timed meta-steps per process")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (CPU 0, CUDA 2)")
    parser.add_argument(
        "--vmap-chunk", type=int, default=None, help="ours-vmap: tasks per vmapped chunk (default: all)"
    )
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = 0 if args.device == "cpu" else 2
    if args.worker:
        worker(args)
        return
    settings = ["device", "threads", "steps", "warmup", "meta_batch", "ways", "shots", "queries"]
    settings += ["inner_steps", "lr"] + (["vmap_chunk"] if args.vmap_chunk else [])
    passthrough = [x for k in settings for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    results: dict[str, dict] = {v: {"times": [], "peak_mb": [], "loss": None} for v in args.variants}
    for r in range(args.rounds):
        for variant in args.variants:
            cmd = [sys.executable, __file__, *passthrough, "--worker", variant]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            results[variant]["times"] += row["times"]
            results[variant]["peak_mb"].append(row["peak_mb"])
            results[variant]["loss"] = row["loss"]
            results[variant]["grad_norm"] = row["grad_norm"]
            print(
                f"round {r + 1}/{args.rounds} {variant}: {statistics.median(row['times']):.3f} s", flush=True
            )
    print(
        f"\nMAML meta-step, Conv-4, {args.ways}-way {args.shots}-shot, {args.queries} queries, "
        f"{args.inner_steps} inner steps, meta-batch {args.meta_batch}, second order; "
        f"device {args.device}, {args.threads} thread(s), torch {torch.__version__}\n"
    )
    ref = statistics.median(results["l2l-loop"]["times"]) if "l2l-loop" in results else None
    ref_min = min(results["l2l-loop"]["times"]) if "l2l-loop" in results else None
    print("| variant | s / meta-step: median (min) | × l2l-loop: median (min) | peak MB | loss | grad norm |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant, row in results.items():
        t, fastest = statistics.median(row["times"]), min(row["times"])
        ratio = f"{t / ref:.2f} ({fastest / ref_min:.2f})" if ref else "-"
        peak = max(row["peak_mb"])
        print(
            f"| {variant} | {t:.3f} ({fastest:.3f}) | {ratio} | {peak:.0f} | {row['loss']:.6f} "
            f"| {row['grad_norm']:.6f} |"
        )
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
