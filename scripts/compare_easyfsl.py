"""Accuracy of our heads against easyfsl's implementations of the same methods, on the same embeddings
and the same episodes (mean ± 95% CI over episodes, paired).

Embeddings: non-negative Gaussian clusters by default, or real ones (`--embeddings`): a folder
written by `protonets embed DATA --output DIR`, or an `.npz` file with `x` [N, D] and `y` [N].
easyfsl's Matching, Relation and FEAT networks are not compared: each needs its own trained
module, so the two sides would differ by their training, not by their method.

Columns: easyfsl with its defaults; ours with our defaults (the papers'); ours with easyfsl's
settings where our options can express them. easyfsl is imported from a folder
(`pip install --no-deps --target /tmp/easyfsl easyfsl`, this venv's torch untouched).

    python scripts/compare_easyfsl.py --episodes 200 --shots 1 5
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np
import torch

from protonets.episodes import gather_episodes, sample_episodes
from protonets.heads import create_head
from protonets.stats import mean_ci95

# ours -> (easyfsl class, its arguments, our options that reproduce easyfsl's settings or None)
PAIRS: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    "prototype": ("PrototypicalNetworks", {}, {}),
    "prototype-cosine": ("SimpleShot", {}, {}),
    "finetune": ("Finetune", {}, {}),
    "bd-cspn": ("BDCSPN", {}, {"scale": 1.0}),
    "laplacianshot": (
        "LaplacianShot",
        {"feature_normalization": 2.0},
        {"feature_transform": "l2n", "scale": 1.0},
    ),
    "tim": ("TIM", {}, None),
    "pt-map": ("PTMAP", {"feature_normalization": 2.0}, {"steps": 10}),
    "transductive-finetune": ("TransductiveFinetuning", {}, {}),
}


def clusters(
    classes: int, per_class: int, dim: int, noise: float, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Non-negative Gaussian clusters (features after a ReLU)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(classes, dim, generator=g)
    labels = np.repeat(np.arange(classes), per_class)
    return (centres[labels] + noise * torch.randn(len(labels), dim, generator=g)).relu(), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--embeddings", default=None, help="a `protonets embed` folder, or .npz with x [N, D] and y [N]"
    )
    parser.add_argument("--dim", type=int, default=128, help="synthetic clusters: dimensions")
    parser.add_argument("--noise", type=float, default=0.6, help="synthetic clusters: noise std")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--easyfsl", default="/tmp/easyfsl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    args = parser.parse_args()
    sys.path.insert(0, args.easyfsl)
    try:
        import easyfsl.methods as methods
    except ImportError as exc:
        raise SystemExit(
            f"easyfsl is not importable from {args.easyfsl} ({exc}); "
            f"pip install --no-deps --target {args.easyfsl} easyfsl"
        ) from None
    if args.embeddings and os.path.isdir(args.embeddings):
        from protonets.encoders.embedding_set import EmbeddingSet

        loaded = EmbeddingSet.load(args.embeddings)
        emb, labels = loaded.embeddings.float(), loaded.labels.numpy()
    elif args.embeddings:
        data = np.load(args.embeddings)
        emb, labels = torch.from_numpy(data["x"]).float(), data["y"]
    else:
        emb, labels = clusters(64, 40, args.dim, args.noise, args.seed)
    print(f"{len(emb)} embeddings of {emb.shape[1]} dims, {len(np.unique(labels))} classes")
    for shots in args.shots:
        episodes = sample_episodes(labels, args.ways, shots, args.queries, args.episodes, seed=args.seed)
        support, s_labels, query, q_labels = gather_episodes(emb, torch.from_numpy(episodes.indices), shots)
        print(
            f"\n{args.ways}-way {shots}-shot {args.queries} queries, {len(episodes)} episodes: "
            "accuracy % (mean ± 95% CI)"
        )
        print(f"{'method':>22} {'easyfsl':>14} {'ours':>14} {'ours, easyfsl settings':>24}")
        for name in args.methods:
            easy_name, easy_args, matched = PAIRS[name]
            model = getattr(methods, easy_name)(**easy_args)
            easy = []
            with torch.no_grad():
                for e in range(len(episodes)):
                    model.process_support_set(support[e], s_labels[e])
                    easy.append(float((model(query[e]).argmax(-1) == q_labels[e]).double().mean()))
            cells = [_fmt(np.array(easy))]
            for options in ({}, matched):
                if options is None:
                    cells.append("—")
                    continue
                with torch.no_grad():
                    logits = create_head(name, **options).episode_logits(support, s_labels, query, args.ways)
                cells.append(_fmt((logits.argmax(-1) == q_labels).double().mean(1).numpy()))
            print(f"{name:>22} {cells[0]:>14} {cells[1]:>14} {cells[2]:>24}")


def _fmt(acc: np.ndarray) -> str:
    mean, ci = mean_ci95(acc)
    return f"{100 * mean:.2f} ± {100 * ci:.2f}"


if __name__ == "__main__":
    main()
