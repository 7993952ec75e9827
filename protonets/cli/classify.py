"""`protonets classify SUPPORT_DIR QUERY...`: label new images from a folder of labelled ones."""

from __future__ import annotations

import argparse
import sys

from protonets.encoders.errors import UserInputError

from ..heads import HEADS  # the registry's names: nothing heavy is imported
from .common import (
    add_encoder_options,
    check_inputs,
    log,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
    query_paths,
    support_folder,
    write_rows,
)

#: for --help without importing torch (tests check it against the heads' declarations)
TRANSDUCTIVE = (
    "alpha-tim",
    "bd-cspn",
    "laplacianshot",
    "pt-map",
    "soft-kmeans",
    "tim",
    "transductive-finetune",
)
#: those that assume a balanced query batch (`assumes_balanced_queries`; checked the same way)
ASSUME_BALANCED = ("bd-cspn", "laplacianshot", "pt-map", "tim")
NO_READABLE_QUERY = (
    "no QUERY image could be read (each one is skipped above); replace them or give other images"
)


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
        "siamese: --checkpoint is its Siamese checkpoint folder). A transductive head "
        f"({', '.join(TRANSDUCTIVE)}) uses all the QUERY images of this call as its unlabelled batch "
        "(needs 2 or more; answers depend on the batch); with --threshold, queries below it are "
        "answered unknown and left out of that refinement. "
        f"{', '.join(ASSUME_BALANCED)} assume the "
        "queries are spread over the classes like the support set: for a batch that may be "
        "imbalanced use alpha-tim",
    )
    p.add_argument(
        "--metric",
        choices=["euclidean", "cosine"],
        default="cosine",
        help="distance of the prototype head (default: %(default)s)",
    )
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
    p.add_argument(
        "--format", choices=["table", "json", "csv"], default="table", help="output (default: %(default)s)"
    )
    p.add_argument("--skip-bad", action="store_true", help="warn about unreadable images and go on")
    add_encoder_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    support, labels = support_folder(args.support, skip_bad=args.skip_bad)
    queries = query_paths(args.queries, skip_bad=args.skip_bad)
    # every input is checked (cheaply) before the model is built and anything is embedded
    device, support, labels, queries = check_inputs(args, support, labels, queries)
    if not queries:
        raise UserInputError(NO_READABLE_QUERY)
    from ..classifier import UNKNOWN_LABEL, FewShotClassifier

    head = HEADS[args.head]
    if head.transductive and len(queries) < 2:
        raise UserInputError(
            f"--head {args.head} is transductive: it needs 2 or more QUERY images (its unlabelled "
            f"batch), got {len(queries)}; pass more queries or use an inductive head such as prototype"
        )
    if args.threshold is not None and UNKNOWN_LABEL in set(map(str, labels)):
        raise UserInputError(
            f"support class '{UNKNOWN_LABEL}' in '{args.support}' has the name --threshold gives to the "
            "queries it rejects; rename that folder"
        )
    if head.assumes_balanced_queries:
        log.warning(
            "--head %s assumes the queries are spread over the classes like the support set, "
            "which this batch may not be; for a possibly imbalanced batch use alpha-tim (or an "
            "inductive head)",
            args.head,
        )
    clf = FewShotClassifier(
        encoder=args.encoder,
        checkpoint=args.checkpoint,
        head=args.head,
        metric=args.metric,
        feature_transform=args.feature_transform,
        threshold=args.threshold,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=device,
        skip_bad=args.skip_bad,
        progress=not args.quiet,
        steps=args.steps,
        inner_lr=args.inner_lr,
    )
    clf.fit(support, labels)
    embedded = clf.embed(queries, desc="queries")
    kept = [queries[i] for i in embedded.kept]
    rows = []
    if not kept:  # images that passed the header check but could not be decoded (--skip-bad)
        raise UserInputError(NO_READABLE_QUERY)
    if head.transductive and len(kept) < 2:
        raise UserInputError(
            f"--head {args.head} needs 2 or more readable QUERY images, got {len(kept)}; give more "
            "queries or use an inductive head such as prototype"
        )
    proba = clf.predict_proba(embedded.embeddings)  # once: a transductive head refines the
    for path, row in zip(kept, proba):  # classes once, with every query
        order = sorted(range(len(row)), key=lambda j: -row[j])[: args.top_k]
        label = clf.classes_[order[0]]
        if args.threshold is not None and row[order[0]] < args.threshold:
            label = clf.unknown_label
        rows.append(
            {
                "query": path,
                "label": str(label),
                "probability": round(float(row[order[0]]), 6),
                "top_k": [[str(clf.classes_[j]), round(float(row[j]), 6)] for j in order],
            }
        )
    write_rows(rows, args.format, sys.stdout)
    return 0
