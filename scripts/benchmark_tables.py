"""Produce the README's benchmark tables: the offline default encoder, frozen, on Omniglot and Caltech-101.

- Omniglot, Vinyals test split (423 characters × 4 rotations), 5/20-way, 1/5-shot, 15 queries,
  1000 episodes, next to the Prototypical Networks paper's Table 1 (Conv-4 trained on Omniglot).
- Caltech-101, the documented test split (eval/splits/caltech101/test.txt), 5-way, 1/5-shot,
  15 queries, 600 episodes.

Embeddings go through the on-disk cache, so a second run costs no encoder forward.

    python scripts/benchmark_tables.py --data ../shared/data --output-dir benchmarks
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from protonets.encoders import create_encoder
from protonets.eval.datasets import image_folder, omniglot
from protonets.eval.report import markdown_table, write_results
from protonets.eval.run import embed_dataset, run_evaluation

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_PROTONET_OMNIGLOT = {(5, 1): "98.8", (5, 5): "99.7", (20, 1): "96.0", (20, 5): "98.9"}


def run(name, dataset, encoder, args, ways, shots, episodes, methods, published=None):
    start = time.perf_counter()
    embeddings = embed_dataset(
        dataset, encoder, cache_dir=args.cache_dir, batch_size=args.batch_size, num_workers=args.workers
    )
    embedded = time.perf_counter()
    results = run_evaluation(
        embeddings,
        dataset.labels,
        methods,
        ways,
        shots,
        queries=15,
        episodes=episodes,
        seed=args.seed,
        class_names=dataset.class_names,
    )
    done = time.perf_counter()
    document = {
        "results": results,
        "encoder": encoder.fingerprint,
        "seed": args.seed,
        "dataset": {"name": dataset.name, "classes": dataset.num_classes, "images": len(dataset)},
        "seconds": {"embedding": round(embedded - start, 1), "episodes": round(done - embedded, 1)},
    }
    write_results(Path(args.output_dir) / f"{name}.json", document)
    print(f"\n### {name}: {dataset.name}, {dataset.num_classes} classes, {len(dataset)} images")
    print(f"(embedding {embedded - start:.0f} s, all episodes {done - embedded:.1f} s)\n")
    print(markdown_table(results, published))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks"))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--encoder", default="tf_efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["omniglot", "caltech101"], default=None)
    args = parser.parse_args()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    encoder = create_encoder(args.encoder)
    data = Path(args.data)
    if args.only in (None, "caltech101"):
        caltech = image_folder(data / "caltech101" / "101_ObjectCategories", "caltech101/test")
        run(
            "caltech101-lite0-frozen",
            caltech,
            encoder,
            args,
            [5],
            [1, 5],
            600,
            ["prototype", "prototype-cosine", "cl2n", "knn", "logreg"],
        )
    if args.only in (None, "omniglot"):
        omni = omniglot(data / "omniglot", "test")
        run(
            "omniglot-lite0-frozen",
            omni,
            encoder,
            args,
            [5, 20],
            [1, 5],
            1000,
            ["prototype", "prototype-cosine", "cl2n"],
            PUBLISHED_PROTONET_OMNIGLOT,
        )
    print(json.dumps({"encoder": encoder.fingerprint["model"], "seed": args.seed}))


if __name__ == "__main__":
    main()
