"""`protonets classify SUPPORT_DIR QUERY...`: label new images from a folder of labelled ones."""

from __future__ import annotations

import argparse
import sys

from protonets.encoders import resolve_device

from ..classifier import FewShotClassifier
from ..heads import HEADS
from .common import (
    add_encoder_options,
    non_negative_int,
    positive_int,
    probability,
    query_paths,
    support_folder,
    write_rows,
)


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction, summary: str) -> None:
    p = sub.add_parser(
        "classify",
        help=summary,
        description="Classify query images against a support folder with one sub-folder of images per class.",
    )
    p.add_argument("support", metavar="SUPPORT_DIR", help="folder with one sub-folder of images per class")
    p.add_argument("queries", metavar="QUERY", nargs="+", help="image files or folders of images")
    p.add_argument(
        "--head",
        default="prototype",
        choices=sorted(HEADS),
        metavar="HEAD",
        help=f"classification head: one of {', '.join(sorted(HEADS))} (default: %(default)s; "
        "siamese: --checkpoint is its Siamese checkpoint folder)",
    )
    p.add_argument("--metric", choices=["euclidean", "cosine"], default="cosine")
    p.add_argument(
        "--steps", type=non_negative_int, default=None, help="--head maml: SGD steps on the support set"
    )
    p.add_argument(
        "--inner-lr", type=non_negative_float, default=None, help="--head maml: step size of those steps"
    )
    p.add_argument(
        "--feature-transform", choices=["cl2n", "l2n"], default=None, help="SimpleShot feature transform"
    )
    p.add_argument("--top-k", type=positive_int, default=3, help="classes listed per query")
    p.add_argument(
        "--threshold", type=probability, default=None, help="answer 'unknown' below this top probability"
    )
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--skip-bad", action="store_true", help="warn about unreadable images and go on")
    add_encoder_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    support, labels = support_folder(args.support, skip_bad=args.skip_bad)
    queries = query_paths(args.queries, skip_bad=args.skip_bad)
    clf = FewShotClassifier(
        encoder=args.encoder,
        checkpoint=args.checkpoint,
        head=args.head,
        metric=args.metric,
        feature_transform=args.feature_transform,
        threshold=args.threshold,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=resolve_device(args.device),
        skip_bad=args.skip_bad,
        progress=not args.quiet,
        steps=args.steps,
        inner_lr=args.inner_lr,
    )
    clf.fit(support, labels)
    embedded = clf.embed(queries, desc="queries")
    kept = [queries[i] for i in embedded.kept]
    rows = []
    if kept:
        top = clf.predict_top_k(embedded.embeddings, k=args.top_k)
        predicted = clf.predict(embedded.embeddings)
        for path, label, pairs in zip(kept, predicted, top):
            rows.append(
                {
                    "query": path,
                    "label": str(label),
                    "probability": round(pairs[0][1], 6),
                    "top_k": [[str(c), round(p, 6)] for c, p in pairs],
                }
            )
    write_rows(rows, args.format, sys.stdout)
    return 0
