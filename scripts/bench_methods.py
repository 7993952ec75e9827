"""Speed of the heads: how FewShotClassifier scales with the number of classes, and episodes/s of
each transductive method, batched over episodes, against easyfsl's per-task loop.

Both parts are measured side by side in one run, each side warmed up once and timed as the
best of 3 (part 2: of `--rounds`, the sides taking turns, so a change in the shared machine's
speed falls on both; absolute times on a shared 2-core machine are noise; the ratios are the
result):

1. `FewShotClassifier(head="prototype", metric="cosine")` fit and predict_proba at 10, 100,
   1,000 and 10,000 classes (5 shots, 1280-d random embeddings, 100 queries), and the time
   ratio per 10x classes (goal: at most ~12x).
2. For each transductive method, episodes/s of our batched `episode_logits`, in the chunks of
   episodes `protonets eval` uses (the head's memory budget), of the same head called one task
   at a time ("ours 1 task"; ours ÷ that is what batching alone gains: the per-call overhead it
   removes, not the arithmetic, which both do alike), and of easyfsl's implementation
   called once per task, on the same gathered embeddings and episodes. For a fair
   count of work, ours runs with easyfsl's iteration counts where the two differ (TIM: 50 steps,
   PT-MAP: 10); "ours, defaults" is the paper's settings. easyfsl comes from a folder on
   sys.path (`pip install --no-deps --target /tmp/easyfsl easyfsl`, leaving this venv's torch
   alone); without it that column is skipped with the reason.

    python scripts/bench_methods.py --episodes 600 --easyfsl-episodes 50
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from protonets import FewShotClassifier
from protonets.encoders.atomic import write_json_atomically
from protonets.episodes import gather_episodes, sample_episodes
from protonets.heads import create_head

# ours -> (our options for easyfsl's amount of work, easyfsl class, its arguments: L2-normalised
# features where easyfsl needs them, as its base class offers)
EASYFSL = {
    "bd-cspn": ({}, "BDCSPN", {}),
    "laplacianshot": ({}, "LaplacianShot", {"feature_normalization": 2.0}),
    "soft-kmeans": ({}, None, {}),
    "tim": ({"steps": 50}, "TIM", {}),
    "alpha-tim": ({"steps": 50}, None, {}),
    "pt-map": ({"steps": 10}, "PTMAP", {"feature_normalization": 2.0}),
    "transductive-finetune": ({}, "TransductiveFinetuning", {}),
}


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of `repeats` runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_best(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Fastest time of each run, in seconds, the runs taking turns round after round, so that a
    change in the shared machine's speed falls on every side alike."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for key, fn in runs.items():
            best[key] = min(best[key], best_time(fn, 1))
    return best


def scaling(classes: list[int], dim: int, shots: int, queries: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in classes:
        x = rng.standard_normal((n * shots, dim), dtype=np.float32)
        y = np.repeat(np.arange(n), shots)
        q = rng.standard_normal((queries, dim), dtype=np.float32)
        clf = FewShotClassifier(head="prototype", metric="cosine")
        repeats = 5 if n <= 1000 else 2
        fit = best_time(lambda: clf.fit(x, y), repeats)  # noqa: B023
        predict = best_time(lambda: clf.predict_proba(q), repeats)  # noqa: B023
        rows.append({"classes": n, "fit_ms": fit * 1e3, "predict_ms": predict * 1e3})
    for before, row in zip(rows, rows[1:]):
        row["fit_ratio"] = row["fit_ms"] / before["fit_ms"]
        row["predict_ratio"] = row["predict_ms"] / before["predict_ms"]
    return rows


def clusters(classes: int, per_class: int, dim: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Non-negative Gaussian clusters (features after a ReLU, as PT-MAP's power transform expects)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(classes, dim, generator=g)
    labels = np.repeat(np.arange(classes), per_class)
    x = centres[labels] + 0.35 * torch.randn(len(labels), dim, generator=g)
    return x.relu(), labels


def easyfsl_accuracy(model: Any, support, s_labels, query, q_labels, count: int) -> list[float]:  # noqa: ANN001
    """easyfsl's way: one task at a time, support set then queries; per-episode accuracy."""
    acc = []
    with torch.no_grad():
        for e in range(count):
            model.process_support_set(support[e], s_labels[e])
            acc.append(float((model(query[e]).argmax(-1) == q_labels[e]).double().mean()))
    return acc


def load_easyfsl(path: str) -> tuple[Any, str]:
    sys.path.insert(0, path)
    try:
        import easyfsl.methods as methods
    except ImportError as exc:
        return (
            None,
            f"easyfsl not importable from {path} ({exc}); pip install --no-deps --target {path} easyfsl",
        )
    return methods, ""


def transductive(args: argparse.Namespace) -> list[dict[str, Any]]:
    emb, labels = clusters(args.classes, args.per_class, args.dim, args.seed)
    episodes = sample_episodes(labels, args.ways, args.shots, args.queries, args.episodes, seed=args.seed)
    support, s_labels, query, q_labels = gather_episodes(
        emb, torch.from_numpy(episodes.indices), episodes.shots
    )
    methods, reason = load_easyfsl(args.easyfsl)
    if methods is None:
        print(f"easyfsl column skipped: {reason}")
    rows = []
    for name, (same_work, easy_name, easy_args) in EASYFSL.items():
        if args.methods and name not in args.methods:
            continue
        row: dict[str, Any] = {"method": name}
        runs: dict[str, Callable[[], Any]] = {}
        for column, options in (("ours_eps", same_work), ("ours_default_eps", {})):
            head = create_head(name, **options)
            size = head.episode_bytes(args.ways, args.shots, args.queries, args.dim)
            chunk = max(1, head.memory_budget // size)

            def run(head=head, chunk=chunk) -> torch.Tensor:  # noqa: ANN001
                parts = []
                with torch.no_grad():
                    for i in range(0, len(support), chunk):
                        part = slice(i, i + chunk)
                        logits = head.episode_logits(support[part], s_labels[part], query[part], args.ways)
                        parts.append(logits)
                return torch.cat(parts)

            run()  # warm-up
            runs[column] = run
            if column == "ours_eps":
                correct = (run().argmax(-1) == q_labels).double().mean(1).numpy()
                row["ours_acc"] = float(correct.mean())
                row["chunk"] = chunk
        count = min(args.easyfsl_episodes, len(episodes))
        # the same head called one task at a time, as easyfsl is: what batching alone gains
        head = create_head(name, **same_work)

        def one_task_at_a_time(head=head, count=count) -> None:  # noqa: ANN001
            with torch.no_grad():
                for e in range(count):
                    head.episode_logits(support[e : e + 1], s_labels[e : e + 1], query[e : e + 1], args.ways)

        one_task_at_a_time()  # warm-up
        runs["ours_task_eps"] = one_task_at_a_time
        if methods is not None and easy_name is not None:
            model = getattr(methods, easy_name)(**easy_args)
            inputs = (model, support, s_labels, query, q_labels, count)
            acc = easyfsl_accuracy(*inputs)  # warm-up, as ours
            runs["easyfsl_eps"] = lambda inputs=inputs: easyfsl_accuracy(*inputs)
            row["easyfsl_acc_first"] = float(np.mean(acc))
            row["ours_acc_first"] = float(correct[:count].mean())
        best = interleaved_best(runs, args.rounds)
        for column, seconds in best.items():
            row[column] = (count if column in ("easyfsl_eps", "ours_task_eps") else len(episodes)) / seconds
        row["batching_gain"] = row["ours_eps"] / row["ours_task_eps"]
        if "easyfsl_eps" in row:
            row["ratio"] = row["ours_eps"] / row["easyfsl_eps"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes-list", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--dim", type=int, default=1280, help="embedding size of the scaling part")
    parser.add_argument("--classes", type=int, default=64, help="classes of the synthetic embedding set")
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--episode-dim", type=int, default=640, dest="episode_dim")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument(
        "--easyfsl-episodes", type=int, default=50, help="easyfsl's per-task loop is timed on these"
    )
    parser.add_argument("--easyfsl", default="/tmp/easyfsl", help="folder holding the easyfsl package")
    parser.add_argument("--methods", nargs="*", default=None, help="only these transductive methods")
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed runs of each side, taking turns (the best is kept)"
    )
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for both sides (default: torch's)"
    )
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    result: dict[str, Any] = {"args": vars(args)}
    if not args.skip_scaling:
        result["scaling"] = scaling(args.classes_list, args.dim, 5, 100, args.seed)
        print(f"\nFewShotClassifier(prototype, cosine), 5 shots, {args.dim}-d, 100 queries")
        print(f"{'classes':>8} {'fit ms':>9} {'x per 10x':>9} {'predict ms':>11} {'x per 10x':>9}")
        for r in result["scaling"]:
            print(
                f"{r['classes']:>8} {r['fit_ms']:>9.2f} {r.get('fit_ratio', float('nan')):>9.1f} "
                f"{r['predict_ms']:>11.2f} {r.get('predict_ratio', float('nan')):>9.1f}"
            )
    args.dim = args.episode_dim
    result["transductive"] = transductive(args)
    print(
        f"\n{args.ways}-way {args.shots}-shot {args.queries} queries, {args.episodes} episodes "
        f"(easyfsl: first {args.easyfsl_episodes}), {args.dim}-d clusters; episodes/s"
    )
    print(
        f"{'method':>22} {'ours':>9} {'ours, defaults':>14} {'ours 1 task':>11} {'easyfsl':>9} {'ratio':>7}"
        f" {'batching':>8} {'acc ours/easyfsl':>17}"
    )
    for r in result["transductive"]:
        easy = f"{r['easyfsl_eps']:9.1f}" if "easyfsl_eps" in r else f"{'—':>9}"
        ratio = f"{r['ratio']:7.1f}" if "ratio" in r else f"{'—':>7}"
        acc = (
            f"{r['ours_acc_first']:.3f}/{r['easyfsl_acc_first']:.3f}"
            if "ratio" in r
            else f"{r['ours_acc']:.3f}"
        )
        print(
            f"{r['method']:>22} {r['ours_eps']:9.1f} {r['ours_default_eps']:14.1f} {r['ours_task_eps']:11.1f}"
            f" {easy} {ratio} {r['batching_gain']:8.1f} {acc:>17}"
        )
    if args.output:
        write_json_atomically(args.output, result)


if __name__ == "__main__":
    main()
