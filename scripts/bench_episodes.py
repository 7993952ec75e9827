"""Evaluation speed: this package's protocol against a per-episode loop that re-embeds every episode.

One run, same data, encoder and episodes (5-way 5-shot 15 queries, 600 episodes by default):
- ours, cold: an empty embedding cache, so the time includes embedding every image once, then
  all episodes in batched tensor code;
- ours, warm: the cache filled, so only loading embeddings and the episodes;
- the command, warm: `protonets eval` as a user runs it on the filled cache, start-up included
  (a new process: imports, no model built), one warm-up run then the median of 3;
- baseline: for each episode, decode, preprocess and embed its support and query images, then
  the prototype head (how easyfsl's `evaluate` works). It is timed on the first
  `--baseline-episodes` episodes (its cost per episode is constant) and both sides' accuracies are
  compared on exactly those episodes.

    python scripts/bench_episodes.py --episodes 600 --baseline-episodes 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from protonets.encoders import create_encoder, open_image
from protonets.encoders.cache import EmbeddingCache
from protonets.episodes import sample_episodes
from protonets.eval.datasets import image_folder
from protonets.eval.protocol import evaluate
from protonets.heads import PrototypeHead

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "caltech101" / "101_ObjectCategories"


def baseline(encoder, dataset, episodes, count: int) -> np.ndarray:
    """Per-episode loop: load and embed the episode's images, prototypes, accuracy."""
    out = []
    k = episodes.shots
    for e in range(count):
        rows = episodes.indices[e]  # [N, K+Q]
        images = torch.stack([encoder.transform(open_image(dataset.items[r])) for r in rows.ravel()])
        emb = encoder.forward(images).view(rows.shape[0], rows.shape[1], -1)
        support = emb[:, :k].reshape(-1, emb.shape[-1])
        labels = torch.arange(rows.shape[0]).repeat_interleave(k)
        query = emb[:, k:].reshape(-1, emb.shape[-1])
        truth = torch.arange(rows.shape[0]).repeat_interleave(rows.shape[1] - k)
        predicted = PrototypeHead("euclidean").fit(support, labels)(query).argmax(1)
        out.append(float((predicted == truth).double().mean()))
    return np.array(out)


def command_seconds(args: argparse.Namespace, cache_dir: str) -> float:
    """Median wall seconds of `protonets eval` on the filled cache (after one warm-up run)."""
    argv = [
        sys.executable, "-m", "protonets", "eval", "--dataset", "folder", "--data", str(args.data),
        "--split", args.split, "--ways", str(args.ways), "--shots", str(args.shots), "--queries",
        str(args.queries), "--episodes", str(args.episodes), "--seed", str(args.seed), "--method",
        "prototype", "--cache-dir", cache_dir, "--quiet",
    ]  # fmt: skip
    times = []
    for _ in range(4):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--split", default="caltech101/test")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--baseline-episodes", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    dataset = image_folder(args.data, args.split)
    encoder = create_encoder()
    episodes = sample_episodes(dataset.labels, args.ways, args.shots, args.queries, args.episodes, args.seed)
    with tempfile.TemporaryDirectory() as cache_dir:

        def ours() -> np.ndarray:
            cache = EmbeddingCache(encoder, cache_dir)
            emb = cache.embed(dataset.items, num_workers=args.workers, progress=False)
            return evaluate(emb, episodes, "prototype")

        start = time.perf_counter()
        acc_cold = ours()
        t_cold = time.perf_counter() - start
        start = time.perf_counter()
        acc_warm = ours()
        t_warm = time.perf_counter() - start
        t_command = command_seconds(args, cache_dir)
    start = time.perf_counter()
    acc_base = baseline(encoder, dataset, episodes, args.baseline_episodes)
    t_base = time.perf_counter() - start

    b = args.baseline_episodes
    base_rate = b / t_base
    figures = {
        "dataset": f"{dataset.name} {args.split}: {dataset.num_classes} classes, {len(dataset)} images",
        "setting": f"{args.ways}-way {args.shots}-shot {args.queries}-query",
        "episodes": args.episodes,
        "ours_cold_episodes_per_s": round(args.episodes / t_cold, 2),
        "ours_warm_episodes_per_s": round(args.episodes / t_warm, 1),
        "baseline_episodes_per_s": round(base_rate, 4),
        "baseline_timed_on_episodes": b,
        "speedup_cold": round(args.episodes / t_cold / base_rate, 1),
        "speedup_warm": round(args.episodes / t_warm / base_rate, 1),
        "command_warm_seconds_with_startup": round(t_command, 2),
        "speedup_warm_command": round(args.episodes / t_command / base_rate, 1),
        "ours_accuracy_all_episodes": round(float(acc_cold.mean()), 4),
        "ours_accuracy_first_episodes": round(float(acc_cold[:b].mean()), 4),
        "baseline_accuracy_first_episodes": round(float(acc_base.mean()), 4),
        "max_abs_episode_accuracy_difference": float(np.abs(acc_cold[:b] - acc_base).max()),
        "cold_equals_warm": bool(np.array_equal(acc_cold, acc_warm)),
    }
    for key, value in figures.items():
        print(f"{key:38s} {value}")
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
