"""Reproduce MAML on Omniglot (Finn et al. 2017): meta-train Conv-4, then test on 1000 episodes.

Vinyals split (train / val / test characters, each rotation its own class), Conv-4 (64 filters,
BatchNorm with per-task batch statistics, max-pool) + a linear head, second-order MAML, Adam
1e-3. Presets follow the paper's Omniglot settings:

- `5way`:  5-way 1-shot, meta-batch 32, 1 inner step of 0.4 (3 at test time); paper 98.7%;
- `20way`: 20-way 1-shot, meta-batch 16, 5 inner steps of 0.1 (5 at test time); paper 95.8%;
- `cpu`:   a small 5-way run that fits a few CPU minutes (meta-batch 4, 5 queries), for the
           learning curve on a machine without a GPU.

The run is `protonets.maml.train.MetaTrainer` (the episodic trainer: best checkpoint on the
validation episodes, resume, JSON-lines log, safetensors); the best checkpoint is then scored on
`--test-episodes` seeded test episodes (15 queries) and the result written to
`OUTPUT/test_results.json`. Only the images those episodes use are loaded.

    # GPU (about 1 h for 5way and 2-3 h for 20way on one H100 at 60k meta-steps, estimated):
    python scripts/maml_omniglot_gpu.py --preset 5way  --device cuda
    python scripts/maml_omniglot_gpu.py --preset 20way --device cuda
    # CPU (~10 minutes):
    python scripts/maml_omniglot_gpu.py --preset cpu --output /tmp/maml-omniglot-cpu
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from protonets.encoders import create_encoder
from protonets.encoders.atomic import write_json_atomically
from protonets.episodes import sample_episodes
from protonets.eval.datasets import omniglot
from protonets.maml.train import MetaConfig, MetaTrainer, evaluate_episodes, load_meta_learner
from protonets.stats import mean_ci95
from protonets.training import ImageSet, TrainConfig, preload_images

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    "5way": dict(ways=5, meta_batch=32, inner_steps=1, inner_lr=0.4, eval_inner_steps=3, queries=15,
                 steps=60000, val_every=1000, val_episodes=500, test_ways=5),
    "20way": dict(ways=20, meta_batch=16, inner_steps=5, inner_lr=0.1, eval_inner_steps=5, queries=15,
                  steps=60000, val_every=1000, val_episodes=500, test_ways=20),
    "cpu": dict(ways=5, meta_batch=4, inner_steps=1, inner_lr=0.4, eval_inner_steps=3, queries=5,
                steps=600, val_every=150, val_episodes=100, test_ways=5),
}  # fmt: skip


def load_split(root: str, split: str, preprocessing: dict, keep: np.ndarray | None = None) -> ImageSet:
    """An Omniglot split as preloaded images; `keep`: only these rows of the split (test)."""
    dataset = omniglot(root, split)
    rows = np.arange(len(dataset)) if keep is None else keep
    images = preload_images([dataset.items[i] for i in rows], preprocessing, desc=f"loading {split}")
    return ImageSet(images, dataset.labels[rows], dataset.class_names, {"split": split, "images": len(rows)})


def test(directory: str, root: str, ways: int, shots: int, episodes: int, device: str, steps: int) -> dict:
    """Accuracy of the best checkpoint on seeded test episodes (adapting on each support set)."""
    learner, encoder, _ = load_meta_learner(directory, device)
    dataset = omniglot(root, "test")
    batch = sample_episodes(
        dataset.labels, ways, shots, 15, episodes, seed=0, class_names=dataset.class_names
    )
    acc = evaluate_episodes(learner, encoder, dataset.items, batch.indices, shots, steps)
    mean, ci = mean_ci95(acc)
    return {
        "ways": ways,
        "shots": shots,
        "episodes": episodes,
        "queries": 15,
        "accuracy": mean,
        "ci95": ci,
        "inner_steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="5way")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "omniglot"))
    parser.add_argument("--output", default=None, help="default checkpoints/maml-conv4-omniglot/<preset>")
    parser.add_argument("--method", choices=["maml", "fomaml", "anil"], default="maml")
    parser.add_argument("--steps", type=int, default=None, help="meta-steps (preset's by default)")
    parser.add_argument("--test-episodes", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue the run in --output")
    parser.add_argument("--test-only", action="store_true", help="score the checkpoint in --output")
    args = parser.parse_args()
    p = PRESETS[args.preset]
    steps = args.steps or p["steps"]
    output = args.output or str(REPO / "checkpoints" / "maml-conv4-omniglot" / args.preset)
    torch.set_num_threads(args.threads)
    start = time.time()
    if not args.test_only:
        config = TrainConfig(
            ways=p["ways"], shots=1, queries=p["queries"], episodes=steps, lr=1e-3, lr_step=10**9,
            lr_gamma=1.0, val_ways=p["ways"], val_shots=1, val_queries=15, val_episodes=p["val_episodes"],
            val_every=p["val_every"], seed=args.seed,
        )  # fmt: skip
        meta = MetaConfig(
            method=args.method, meta_batch=p["meta_batch"], inner_steps=p["inner_steps"],
            inner_lr=p["inner_lr"], eval_inner_steps=p["eval_inner_steps"],
        )  # fmt: skip
        torch.manual_seed(args.seed)
        encoder = create_encoder("conv4", pretrained=False, device=args.device)
        train = load_split(args.data, "train", encoder.preprocessing)
        val = load_split(args.data, "val", encoder.preprocessing)
        print(f"loaded {len(train)} training and {len(val)} validation images in {time.time() - start:.0f} s")
        info = {"dataset": {"kind": "omniglot", "train": train.info, "val": val.info}, "preset": args.preset}
        trainer = MetaTrainer(encoder, train, val, config, meta, output=output, meta=info)
        if args.resume:
            trainer.resume()
        result = trainer.fit()
        print(
            f"trained {result.step} meta-steps in {result.elapsed_s:.0f} s; best validation "
            f"{100 * (result.best_val_acc or 0):.2f}% at meta-step {result.best_step}"
        )
    scores = test(
        output, args.data, p["test_ways"], 1, args.test_episodes, args.device, p["eval_inner_steps"]
    )
    scores["wall_s"] = round(time.time() - start, 1)
    scores["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    write_json_atomically(os.path.join(output, "test_results.json"), scores)
    print(
        f"test {scores['ways']}-way 1-shot, {scores['episodes']} episodes: "
        f"{100 * scores['accuracy']:.2f} ± {100 * scores['ci95']:.2f}%"
    )


if __name__ == "__main__":
    main()
