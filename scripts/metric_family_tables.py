"""The README's metric-family tables: every registered method on balanced and Dirichlet-imbalanced
episodes, 1-shot and 5-shot, mean accuracy ± 95% CI, all methods on the same episodes.

    # frozen offline encoder (EfficientNet-Lite0) on the Caltech-101 test split
    python scripts/metric_family_tables.py --dataset caltech101 \
        --output benchmarks/metric-family-caltech101-lite0.json
    # the 1-shot Conv-4 ProtoNet on the Omniglot test split
    python scripts/metric_family_tables.py --dataset omniglot \
        --checkpoint checkpoints/protonet-conv4-omniglot-1shot \
        --output benchmarks/metric-family-omniglot-conv4.json

Trained heads (`matching`, `relation`, `feat`, `siamese`) need `--head-checkpoint METHOD=DIR`;
without one they are listed as not run, with the reason. Embeddings go through the on-disk cache.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from protonets.encoders import create_encoder
from protonets.eval.datasets import image_folder, omniglot
from protonets.eval.report import write_results
from protonets.eval.run import embed_dataset, run_evaluation
from protonets.heads import HEADS

REPO = Path(__file__).resolve().parents[1]
BALANCES = ("balanced", "dirichlet")


def pivot(rows: list[dict], methods: list[str], shots: list[int], ways: int) -> str:
    """Markdown: one row per method, one column per (query balance, shots)."""
    columns = [(b, k) for b in BALANCES for k in shots]
    header = "| method | " + " | ".join(f"{b} {ways}w{k}s" for b, k in columns) + " |"
    lines = [header, "| --- |" + " ---: |" * len(columns)]
    for m in methods:
        cells = []
        for b, k in columns:
            r = next(
                (r for r in rows if r["method"] == m and r["shots"] == k and r["query_balance"] == b),
                None,
            )
            ci = "n/a" if r is None or r["ci95"] is None else f"{100 * r['ci95']:.2f}"
            cells.append("—" if r is None else f"{100 * r['accuracy']:.2f} ± {ci}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["caltech101", "omniglot"], required=True)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--encoder", default="tf_efficientnet_lite0")
    parser.add_argument("--checkpoint", default=None, help="a trained encoder checkpoint folder")
    parser.add_argument("--head-checkpoint", nargs="*", default=[], metavar="METHOD=DIR")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered head")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--alpha", type=float, default=2.0, help="Dirichlet concentration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    data = Path(args.data)
    if args.dataset == "caltech101":
        dataset = image_folder(data / "caltech101" / "101_ObjectCategories", "caltech101/test")
    else:
        dataset = omniglot(data / "omniglot", "test")
    encoder = create_encoder(args.encoder, checkpoint_path=args.checkpoint)
    start = time.perf_counter()
    embeddings = embed_dataset(dataset, encoder, cache_dir=args.cache_dir, batch_size=64, num_workers=2)
    embedded = time.perf_counter() - start

    given = dict(item.split("=", 1) for item in args.head_checkpoint)
    methods, skipped = [], {}
    for name in args.methods or sorted(HEADS):
        if HEADS[name].needs_checkpoint and name not in given:
            skipped[name] = "needs a trained head (--head-checkpoint METHOD=DIR)"
        else:
            methods.append(name)
    options = {m: {"head_checkpoint": given.get(m)} for m in methods}

    rows, seconds = [], {}
    for balance in BALANCES:
        for method in methods:  # one method at a time, so each one's time is its own
            t = time.perf_counter()
            rows += run_evaluation(
                embeddings,
                dataset.labels,
                [method],
                [args.ways],
                args.shots,
                episodes=args.episodes,
                seed=args.seed,
                class_names=dataset.class_names,
                method_options=options,
                query_balance=balance,
                alpha=args.alpha,
            )
            seconds[f"{method}/{balance}"] = round(time.perf_counter() - t, 1)
            print(f"{method} {balance}: {seconds[f'{method}/{balance}']} s", flush=True)
    document = {
        "results": rows,
        "encoder": encoder.fingerprint,
        "seed": args.seed,
        "dirichlet_alpha": args.alpha,
        "dataset": {"name": dataset.name, "classes": dataset.num_classes, "images": len(dataset)},
        "not_run": skipped,
        "seconds": {"embedding": round(embedded, 1), **seconds},
    }
    write_results(args.output, document)
    print(pivot(rows, methods, args.shots, args.ways))
    for name, reason in skipped.items():
        print(f"not run: {name}: {reason}")
    print(json.dumps({"output": args.output}))


if __name__ == "__main__":
    main()
