"""Lake / Koch one-shot protocol: 20-way within-alphabet runs on Omniglot's 20 evaluation alphabets.

    .venv/bin/python scripts/eval_within_alphabet.py --checkpoint checkpoints/siamese-conv4-omniglot

Each run picks an evaluation alphabet, 20 of its characters and two drawers; one drawer's
image of each character is the support, the other's the query (20 queries). Reports mean ± 95%
CI over runs for the Siamese head and, on the same runs, the prototype (1-NN) head, plus the
verification ROC AUC (and FAR/TAR at the checkpoint's threshold) on held-out evaluation pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from protonets.encoders.atomic import write_json_atomically  # noqa: E402
from protonets.eval.datasets import omniglot_alphabets, within_alphabet_episodes  # noqa: E402
from protonets.eval.protocol import evaluate, mean_ci95  # noqa: E402
from protonets.siamese import load_siamese  # noqa: E402
from protonets.siamese.training import random_pairs  # noqa: E402
from protonets.training import preload_images, to_input  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/siamese-conv4-omniglot")
    p.add_argument(
        "--data",
        default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot"),
        help="Omniglot root (default: ../shared/data/omniglot beside the repository)",
    )
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--ways", type=int, default=20)
    p.add_argument("--pairs", type=int, default=10000, help="same and different pairs for the ROC")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    encoder, head, manifest = load_siamese(args.checkpoint)
    data, alphabet, drawer = omniglot_alphabets(args.data, background=False)
    images = preload_images(data.items, encoder.preprocessing, progress=False)
    with torch.no_grad():
        emb = torch.cat(
            [
                encoder.features(to_input(images[i : i + 2000], encoder.preprocessing)).float()
                for i in range(0, len(images), 2000)
            ]
        )
    episodes = within_alphabet_episodes(data.labels, alphabet, drawer, args.runs, args.ways, args.seed)
    results = {}
    for method, options in (("siamese", {"head": head}), ("prototype", {})):
        mean, ci = mean_ci95(evaluate(emb, episodes, method, **options))
        results[method] = {"mean": mean, "ci95": ci}
        print(f"{method:9s} {args.ways}-way within-alphabet one-shot, {args.runs} runs: "
              f"{100 * mean:.2f}% ± {100 * ci:.2f}%")  # fmt: skip
    a, b, same = random_pairs(torch.from_numpy(data.labels), args.pairs, args.seed + 11)
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        scores = head.pair_logits(emb[a], emb[b])
        accepted = scores >= head.threshold
    auc = float(roc_auc_score(same.numpy(), scores.numpy()))
    far = float(accepted[~same].float().mean())
    tar = float(accepted[same].float().mean())
    target = ((manifest.get("head") or {}).get("calibration") or {}).get("target_far")
    print(f"verification on {len(a)} held-out evaluation pairs: ROC AUC {auc:.4f}; at the "
          f"calibrated threshold (target FAR {target}): FAR {far:.4f}, TAR {tar:.4f}")  # fmt: skip
    results["verification"] = {"auc": auc, "far": far, "tar": tar, "target_far": target, "pairs": len(a)}
    results["settings"] = {
        "runs": args.runs,
        "ways": args.ways,
        "seed": args.seed,
        "checkpoint": args.checkpoint,
    }
    if args.output:
        write_json_atomically(args.output, results)
    np.set_printoptions(precision=4)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
