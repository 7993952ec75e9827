"""Accuracy of the `protonets classify` command itself on real images of unseen categories.

Draws seeded N-way K-shot episodes from a folder dataset split (default: the Caltech-101 test
split), lays each episode out as a support folder of symlinks plus a query folder, runs
`protonets classify SUPPORT QUERIES --format json` as a user would, and scores its answers.

    python scripts/check_classify.py --shots 1 5 --episodes 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from protonets.episodes import sample_episodes
from protonets.eval.datasets import image_folder
from protonets.eval.protocol import mean_ci95

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "caltech101" / "101_ObjectCategories"


def run_episode(dataset, rows, classes, shots, extra) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        truth = {}
        for n, c in enumerate(classes):
            name = dataset.class_names[c]
            (Path(tmp) / "support" / name).mkdir(parents=True)
            (Path(tmp) / "queries").mkdir(exist_ok=True)
            for i, r in enumerate(rows[n]):
                src = dataset.items[r].path
                if i < shots:
                    os.symlink(src, Path(tmp) / "support" / name / Path(src).name)
                else:
                    link = Path(tmp) / "queries" / f"{name}__{Path(src).name}"
                    os.symlink(src, link)
                    truth[str(link)] = name
        cmd = [
            sys.executable,
            "-m",
            "protonets",
            "classify",
            f"{tmp}/support",
            f"{tmp}/queries",
            "--format",
            "json",
            "--quiet",
            *extra,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        answers = json.loads(out)
        return float(np.mean([truth[a["query"]] == a["label"] for a in answers]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--split", default="caltech101/test")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args, extra = parser.parse_known_args()
    dataset = image_folder(args.data, args.split)
    for shots in args.shots:
        ep = sample_episodes(dataset.labels, args.ways, shots, args.queries, args.episodes, args.seed)
        acc = [run_episode(dataset, ep.indices[e], ep.classes[e], shots, extra) for e in range(len(ep))]
        mean, ci = mean_ci95(np.array(acc))
        print(
            f"protonets classify, {args.ways}-way {shots}-shot {args.queries} queries, "
            f"{len(acc)} episodes: {100 * mean:.1f}% ± {100 * ci:.1f}"
        )


if __name__ == "__main__":
    main()
