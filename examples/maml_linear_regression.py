"""MAML on 1→1 linear regression: a meta-learned initialisation for a family of lines.

Each task is a line y = a·x + b (a ~ N(2, 0.5²), b ~ N(-1, 0.5²)) seen through 10 support and 10
query points. The base learner is `nn.Linear(1, 1)`; MAML learns its initialisation so that one
SGD step on a task's support set fits that task's line. `learner.adapt` returns one adapted
copy of the base learner per task (the fast weights), stacked along the task dimension.

    python examples/maml_linear_regression.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from protonets.maml import MetaLearner, TaskBatch


def sample_tasks(n: int, g: torch.Generator) -> TaskBatch:
    a = 2.0 + 0.5 * torch.randn(n, 1, 1, generator=g)
    b = -1.0 + 0.5 * torch.randn(n, 1, 1, generator=g)
    x = torch.rand(n, 20, 1, generator=g) * 4 - 2
    y = a * x + b
    return TaskBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])


def main() -> None:
    torch.set_num_threads(1)  # tiny model: one thread is fastest
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    learner = MetaLearner(nn.Linear(1, 1), loss_fn=F.mse_loss, steps=1, lr=0.3, vmap=True)
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.02)
    test = sample_tasks(200, g)

    def report(when: str) -> None:
        before = learner.predict(test.support_x, test.support_y, test.query_x, steps=0)
        after = learner.predict(test.support_x, test.support_y, test.query_x)
        print(
            f"{when}: query MSE before adaptation {F.mse_loss(before, test.query_y):.4f}, "
            f"after 1 step {F.mse_loss(after, test.query_y):.4f}"
        )

    report("random init ")
    for _ in range(300):
        optimizer.zero_grad()
        learner.meta_backward(sample_tasks(16, g))
        optimizer.step()
    report("meta-trained")
    w, b = learner.head.weight.item(), learner.head.bias.item()
    fast = learner.adapt(test.support_x[:3], test.support_y[:3])
    print(f"meta-learned initialisation: y = {w:.2f}·x {b:+.2f}")
    for t in range(3):
        a, c = fast["head.weight"][t].item(), fast["head.bias"][t].item()
        print(f"  task {t}: adapted base learner y = {a:.2f}·x {c:+.2f}")


if __name__ == "__main__":
    main()
