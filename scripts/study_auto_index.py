"""Does `SupportMemory(index="auto")` keep its promise on fresh queries? (issue 15, item 9)

For each seed: N vectors (default 200,000 × 128) in Gaussian clusters (groups of confusable
classes, as in `bench_memory.py`), an `auto` memory (IVF, nprobe calibrated so that the lower
95% Wilson bound of the calibration agreement reaches 0.99), and Q fresh queries from the same
distribution. Printed per seed: lists, calibrated nprobe, calibration agreement and its lower
bound, the fresh top-1 class agreement with exact search, and the exact 1-NN class accuracy
(how hard the data is). The summary counts the seeds whose fresh agreement is ≥ 0.99.

    python scripts/study_auto_index.py                  # 20 seeds, 200k × 128
    python scripts/study_auto_index.py --seeds 3 --n 50000

`--one-build` studies the 1M benchmark's own data (`bench_memory.py` part 1: 1,000,000 × 512,
10,000 classes, seed 0) with one memory built once: each seed draws its own calibration sample
(`SupportMemory.calibrate(seed)`) and its own fresh queries. Building twenty 1M memories would
take about two hours of this 2-core machine; what varies from seed to seed here is what the
promise depends on, the calibration sample and the queries.

    python scripts/study_auto_index.py --one-build --n 1000000 --dim 512 --classes 10000 --queries 5000
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch

from protonets import SupportMemory


def clusters(n: int, q: int, dim: int, classes: int, group: int, spread: float, noise: float, seed: int):
    """(support [n, dim], labels [n], queries [q, dim], query labels [q]), L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    scale = dim**-0.5
    groups = torch.randn((classes + group - 1) // group, dim, generator=g) * scale
    centres = groups.repeat_interleave(group, 0)[:classes]
    centres = centres + spread * scale * torch.randn(classes, dim, generator=g)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        y = torch.randint(0, classes, (m,), generator=g)
        x = centres[y] + noise * scale * torch.randn(m, dim, generator=g)
        return torch.nn.functional.normalize(x, dim=1).numpy(), y.numpy()

    x, y = draw(n)
    qx, qy = draw(q)
    return x, y, qx, qy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=2_000)
    p.add_argument("--group", type=int, default=10, help="confusable classes per group")
    p.add_argument("--spread", type=float, default=0.3)
    p.add_argument("--noise", type=float, default=1.2)
    p.add_argument("--queries", type=int, default=10_000, help="fresh queries per seed")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--one-build", action="store_true", help="bench_memory's data, one memory, a calibration per seed"
    )
    args = p.parse_args()
    if args.one_build:
        return one_build(args)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print("seed  nlist  nprobe  calib_agree  calib_lower  fresh_agree  exact_1nn_acc  build_s")
    fresh = []
    for seed in range(args.seeds):
        x, y, q, qy = clusters(
            args.n, args.queries, args.dim, args.classes, args.group, args.spread, args.noise, seed
        )
        start = time.perf_counter()
        memory = SupportMemory(args.dim, index="auto")
        memory.add(x, y)
        fresh.append(fresh_row(seed, memory, q, qy, time.perf_counter() - start))
    summary(fresh)


def fresh_row(seed: int, memory: SupportMemory, q: np.ndarray, qy: np.ndarray, seconds: float) -> float:
    """Print one seed's row (the memory's calibration, fresh agreement, 1-NN accuracy); the agreement."""
    info = memory.info()
    approx = memory.search(q, k=1)[1][:, 0]
    exact = memory.search(q, k=1, exact=True)[1][:, 0]
    agree = float(np.mean(approx == exact))
    cal = info.get("calibration", {})
    print(
        f"{seed:>4}  {info.get('nlist', '-'):>5}  {info.get('nprobe', '-'):>6}  "
        f"{cal.get('agreement', float('nan')):>11.4f}  {cal.get('lower_bound', float('nan')):>11.4f}  "
        f"{agree:>11.4f}  {float(np.mean(exact == qy)):>13.3f}  {seconds:>7.1f}",
        flush=True,
    )
    return agree


def summary(fresh: list[float]) -> None:
    ok = sum(a >= 0.99 for a in fresh)
    print(
        f"fresh agreement >= 0.99 in {ok} of {len(fresh)} seeds; min {min(fresh):.4f}, "
        f"mean {np.mean(fresh):.4f}"
    )


def one_build(args: argparse.Namespace) -> None:
    """The 1M benchmark's data, one `auto` memory; per seed a calibration sample and fresh queries."""
    from bench_memory import Data

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    args.seed = 0
    data = Data(args)
    x, y = data.block(args.n, stream=0)
    start = time.perf_counter()
    memory = SupportMemory(args.dim, index="auto")
    memory.add(x, y)
    print(f"built once in {time.perf_counter() - start:.0f}s: {memory.info().get('calibration')}", flush=True)
    print("seed  nlist  nprobe  calib_agree  calib_lower  fresh_agree  exact_1nn_acc  calib_s")
    fresh = []
    for seed in range(args.seeds):
        start = time.perf_counter()
        memory.calibrate(seed=seed + 1)  # seed 1 is the sample `add` used
        took = time.perf_counter() - start
        q, qy = data.block(args.queries, stream=seed + 1)
        fresh.append(fresh_row(seed, memory, q, qy, took))
    summary(fresh)


if __name__ == "__main__":
    main()
