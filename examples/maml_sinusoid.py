"""MAML on Finn et al.'s (2017) sinusoid regression: y = A·sin(x − φ), 10-shot.

Tasks: amplitude A ~ U[0.1, 5], phase φ ~ U[0, π], x ~ U[-5, 5]; a 1-40-40-1 ReLU network;
second-order MAML with one inner step of 0.01, Adam 1e-3, meta-batch 25 — the paper's setting,
trained here for a few thousand meta-steps (the paper: 70,000). Prints the query loss of
held-out tasks before and after 1 and 10 adaptation steps, at the start and at the end.

    python examples/maml_sinusoid.py            # ~1-2 minutes on a laptop CPU
    python examples/maml_sinusoid.py --steps 500
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from protonets.maml import MetaLearner, TaskBatch


def sample_tasks(n: int, g: torch.Generator, shots: int = 10) -> TaskBatch:
    amplitude = torch.rand(n, 1, 1, generator=g) * 4.9 + 0.1
    phase = torch.rand(n, 1, 1, generator=g) * math.pi
    x = torch.rand(n, 2 * shots, 1, generator=g) * 10 - 5
    y = amplitude * torch.sin(x - phase)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3000, help="meta-training steps")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny model: one thread is fastest
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    learner = MetaLearner(net, loss_fn=F.mse_loss, steps=1, lr=0.01, vmap=True)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    test = sample_tasks(500, g)

    def report(when: str) -> None:
        losses = [
            float(
                F.mse_loss(
                    learner.predict(test.support_x, test.support_y, test.query_x, steps=s), test.query_y
                )
            )
            for s in (0, 1, 10)
        ]
        before, one, ten = losses
        print(f"{when}: query MSE before adaptation {before:.3f}, after 1 step {one:.3f}, after 10 {ten:.3f}")

    report("random init  ")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        loss, _ = learner.meta_backward(sample_tasks(25, g))
        optimizer.step()
        if step % 1000 == 0:
            elapsed = time.perf_counter() - start
            print(f"  meta-step {step}: post-adaptation query MSE {loss:.3f} ({elapsed:.0f} s)")
    report("meta-trained ")


if __name__ == "__main__":
    main()
