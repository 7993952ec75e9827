"""Scaling under `torchrun`: images/s per rank for embedding, episodes/s per rank for training.

One run launches this file with PyTorch's own launcher once per world size (default 1 and 2
ranks), each rank on one torch thread (OMP_NUM_THREADS=1, `torch.set_num_threads(1)`):

    python -m torch.distributed.run --standalone --nproc-per-node N scripts/bench_distributed.py --worker ...

Every rank loads its data and builds its model first, takes a few warm-up steps, and then waits
at a barrier: the clocks start after it, so process start-up, imports, image preloading, model
building and the DDP wrap are never timed. Rank 0 gathers every rank's timings and writes them to
a JSON file that the parent reads.

Embedding: the library path of `protonets embed`, `embed_to_folder` (encoders/sharded.py), into a
fresh folder, with the chunk grid cut into 4 chunks so 1 and 2 ranks embed the same chunks. Each
rank's `encoder.embed` calls are timed (decode + preprocess + forward of its share, DataLoader
with `--workers` 0 by default: the rank's own process decodes); images/s per rank = its images /
those seconds. The whole `embed_to_folder` call (header checks, chunk writes, rank 0 assembling
the set) is timed too, as end-to-end images/s of the launch.

Training: ProtoNet steps (`EpisodicTrainer`'s `ProtoNetMethod.train_step`, wrapped in
DistributedDataParallel on 2 ranks, as `protonets train` does) of 60-way 1-shot 5-query Conv-4
episodes (the paper's 1-shot setting) on real Omniglot train images (the first `--train-classes`
classes, preloaded at 28×28). Episodes/s per rank = steps / seconds (each rank takes one episode
per step). 1 rank is the plain single process (no DDP, WORLD_SIZE=1). On 2 ranks the gloo
all-reduce of a gradient-sized buffer is timed on its own as well, and the step-time difference
to 1 rank shows what DDP (all-reduce, and two processes sharing the machine) adds to the compute.

Run it with nothing else busy on the machine (2 ranks take both cores of this one):

    .venv/bin/python scripts/bench_distributed.py --images 256 --steps 40 \
        --output benchmarks/bench_distributed.json | tee benchmarks/bench_distributed.txt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
CONV4_CHECKPOINT = REPO / "checkpoints" / "protonet-conv4-omniglot-1shot"


# -- the worker: one rank under torchrun ---------------------------------------------------------
def bench_embedding(args: argparse.Namespace, world: Any, workdir: str) -> dict[str, Any]:
    """Embed `--images` images through `embed_to_folder`; this rank's seconds in `encoder.embed`."""
    from protonets.encoders import create_encoder
    from protonets.encoders.distributed import barrier
    from protonets.encoders.sharded import EmbedSource, embed_to_folder
    from protonets.eval.datasets import image_folder, omniglot

    if args.dataset == "omniglot":
        dataset = omniglot(args.data, args.split or "test")
    else:
        dataset = image_folder(args.data, args.split)
    stride = max(1, len(dataset) // args.images)  # evenly spaced over the classes
    chosen = list(range(0, len(dataset), stride))[: args.images]
    checkpoint = args.checkpoint
    if checkpoint is None and args.encoder == "conv4":
        checkpoint = str(CONV4_CHECKPOINT)
    encoder = create_encoder(args.encoder, checkpoint_path=checkpoint)
    source = EmbedSource(
        [dataset.items[i] for i in chosen],
        [int(dataset.labels[i]) for i in chosen],
        dataset.class_names,
        args.data,
        encoder,
        {"dataset": dataset.name},
    )
    encoder.embed(source.items[: args.batch_size], batch_size=args.batch_size, num_workers=0, progress=False)

    spent = {"seconds": 0.0, "images": 0}
    embed = encoder.embed

    def timed_embed(items: list, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = embed(items, **kwargs)
        spent["seconds"] += time.perf_counter() - start
        spent["images"] += len(items)
        return result

    encoder.embed = timed_embed  # type: ignore[method-assign]
    output = os.path.join(workdir, f"embeddings-{world.size}")
    barrier(world)
    start = time.perf_counter()
    embed_to_folder(
        output,
        lambda: source,
        world,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=False,
        chunk_rows=-(-len(chosen) // 4),
    )
    wall = time.perf_counter() - start
    return {
        "encoder": encoder.name,
        "images": spent["images"],
        "embed_s": spent["seconds"],
        "images_per_s": spent["images"] / spent["seconds"] if spent["seconds"] else None,
        "embed_to_folder_wall_s": wall,
        "dim": encoder.dim,
    }


def bench_training(args: argparse.Namespace, world: Any) -> dict[str, Any]:
    """`--steps` ProtoNet steps (DDP on several ranks) after `--warmup` untimed ones."""
    import torch

    from protonets.encoders import create_encoder
    from protonets.encoders.distributed import barrier
    from protonets.eval.datasets import omniglot
    from protonets.training import EpisodicTrainer, ImageSet, TrainConfig
    from protonets.training.data import preload_images

    torch.manual_seed(0)
    encoder = create_encoder("conv4", pretrained=False)
    dataset = omniglot(OMNIGLOT, "train")
    chosen = [i for i, label in enumerate(dataset.labels) if label < args.train_classes]
    images = preload_images([dataset.items[i] for i in chosen], encoder.preprocessing, progress=False)
    train = ImageSet(images, torch.as_tensor(dataset.labels[chosen]))
    config = TrainConfig(
        ways=args.ways, shots=args.shots, queries=args.queries, episodes=args.steps, val_at_start=False
    )
    trainer = EpisodicTrainer(encoder, train, None, config, progress=False, world=world)
    method = trainer.method
    if world.distributed:
        method.distribute(world)  # what TrainLoop.run does first under torchrun
    method.train(True)
    for _ in range(args.warmup):  # DDP's first (static-graph) step, allocations
        method.train_step()
    barrier(world)
    start = time.perf_counter()
    for _ in range(args.steps):
        method.train_step()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in encoder.model.parameters() if p.requires_grad)
    figures: dict[str, Any] = {
        "episode": f"{args.ways}-way {args.shots}-shot {args.queries}-query",
        "images_per_episode": args.ways * (args.shots + args.queries),
        "steps": args.steps,
        "train_s": seconds,
        "episodes_per_s": args.steps / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        "parameters": params,
        "gradient_mb": params * 4 / 1e6,
    }
    if world.distributed:  # the all-reduce alone, on a buffer the size of the gradients
        import torch.distributed as dist

        buffer = torch.zeros(params)
        dist.all_reduce(buffer)
        barrier(world)
        start = time.perf_counter()
        for _ in range(args.steps):
            dist.all_reduce(buffer)
        figures["allreduce_ms"] = 1000 * (time.perf_counter() - start) / args.steps
    return figures


def worker(args: argparse.Namespace) -> None:
    import torch

    from protonets.encoders.distributed import all_gather, finish, init_world

    torch.set_num_threads(1)
    world = init_world("cpu")
    figures = {"rank": world.rank, "torch_threads": torch.get_num_threads()}
    figures["embed"] = bench_embedding(args, world, args.workdir)
    figures["train"] = bench_training(args, world)
    gathered = all_gather(world, figures)
    if world.is_main:
        Path(args.result).write_text(json.dumps({"world_size": world.size, "ranks": gathered}))
    finish(world)


# -- the parent: one torchrun launch per world size, then the table ------------------------------
def launch(args: argparse.Namespace, ranks: int, workdir: str) -> dict[str, Any]:
    """Run the worker on `ranks` processes with torchrun; rank 0's gathered figures."""
    result = os.path.join(workdir, f"result-{ranks}.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(ranks), __file__, "--worker", "--result", result]
    command += ["--workdir", workdir, *worker_options(args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(command, env=env, check=True, cwd=REPO)
    return json.loads(Path(result).read_text())


def worker_options(args: argparse.Namespace) -> list[str]:
    options = []
    for name in ("images", "dataset", "data", "split", "encoder", "checkpoint", "batch_size", "workers"):
        value = getattr(args, name)
        if value is not None:
            options += [f"--{name.replace('_', '-')}", str(value)]
    for name in ("steps", "warmup", "ways", "shots", "queries", "train_classes"):
        options += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return options


def summarise(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per-launch totals and the scaling efficiency of each launch against 1 rank."""
    summary: dict[str, Any] = {}
    for size, run in runs.items():
        ranks = run["ranks"]
        summary[size] = {
            "embed_images_per_s_per_rank": [r["embed"]["images_per_s"] for r in ranks],
            "embed_images_per_s_total": sum(r["embed"]["images_per_s"] for r in ranks),
            "embed_to_folder_images_per_s": sum(r["embed"]["images"] for r in ranks)
            / max(r["embed"]["embed_to_folder_wall_s"] for r in ranks),
            "train_episodes_per_s_per_rank": [r["train"]["episodes_per_s"] for r in ranks],
            "train_episodes_per_s_total": sum(r["train"]["episodes_per_s"] for r in ranks),
            "train_ms_per_step": max(r["train"]["ms_per_step"] for r in ranks),
            "allreduce_ms": max((r["train"].get("allreduce_ms") or 0.0 for r in ranks), default=0.0) or None,
        }
    if 1 in summary:
        base = summary[1]
        for size, s in summary.items():
            s["embed_scaling_efficiency"] = s["embed_images_per_s_total"] / (
                size * base["embed_images_per_s_total"]
            )
            s["train_scaling_efficiency"] = s["train_episodes_per_s_total"] / (
                size * base["train_episodes_per_s_total"]
            )
            s["ddp_overhead_ms_per_step"] = s["train_ms_per_step"] - base["train_ms_per_step"]
    return summary


def table(runs: dict[int, dict[str, Any]], summary: dict[str, Any]) -> str:
    def per_rank(values: list[float]) -> str:
        return " / ".join(f"{v:.1f}" for v in values)

    def cell(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    first = runs[min(runs)]["ranks"][0]
    lines = [
        f"Embedding: {first['embed']['images']} images, {first['embed']['encoder']}; training: "
        f"Conv-4 ProtoNet, {first['train']['episode']} episodes, {first['train']['steps']} steps; "
        "one torch thread per rank; start-up excluded.",
        "",
        "| ranks | embed img/s per rank | embed img/s total | embed_to_folder img/s | embed efficiency "
        "| train episodes/s per rank | train episodes/s total | ms/step | train efficiency "
        "| all-reduce ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, s in summary.items():
        lines.append(
            f"| {size} | {per_rank(s['embed_images_per_s_per_rank'])} | {s['embed_images_per_s_total']:.1f} "
            f"| {s['embed_to_folder_images_per_s']:.1f} | {cell(s.get('embed_scaling_efficiency'), '.2f')} "
            f"| {per_rank(s['train_episodes_per_s_per_rank'])} | {s['train_episodes_per_s_total']:.2f} "
            f"| {s['train_ms_per_step']:.1f} | {cell(s.get('train_scaling_efficiency'), '.2f')} "
            f"| {cell(s['allreduce_ms'], '.2f')} |"
        )
    train = first["train"]
    lines += [
        "",
        f"Gradient per DDP step: {train['parameters']:,} parameters × 4 B = {train['gradient_mb']:.3f} MB "
        "(all-reduced once per step; a ring all-reduce sends about 2 × (N−1)/N of it per rank).",
        "Efficiency: N-rank total / (N × 1-rank total).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to launch")
    parser.add_argument("--output", default=None, help="write every figure as JSON here")
    embed = parser.add_argument_group("embedding")
    embed.add_argument("--images", type=int, default=256, help="images to embed (evenly spaced)")
    embed.add_argument("--dataset", choices=["omniglot", "folder"], default="omniglot")
    embed.add_argument("--data", default=str(OMNIGLOT), help="dataset root")
    embed.add_argument("--split", default=None, help="omniglot split (default test) or folder split file")
    embed.add_argument("--encoder", default="conv4")
    embed.add_argument(
        "--checkpoint", default=None, help="default for conv4: checkpoints/protonet-conv4-omniglot-1shot"
    )
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=40, help="timed training steps")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    train.add_argument("--ways", type=int, default=60)
    train.add_argument("--shots", type=int, default=1)
    train.add_argument("--queries", type=int, default=5)
    train.add_argument("--train-classes", type=int, default=240, help="Omniglot train classes preloaded")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from protonets.encoders.distributed import end_rank_process

        worker(args)
        end_rank_process(0)  # no interpreter finalisation for a torchrun rank (see there why)
        return
    if args.train_classes < args.ways:
        parser.error(f"--train-classes ({args.train_classes}) must be at least --ways ({args.ways})")

    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as workdir:
        runs = {size: launch(args, size, workdir) for size in args.ranks}
    summary = summarise(runs)
    print(table(runs, summary))
    if args.output:
        report = {"settings": vars(args), "summary": summary, "runs": runs}
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
