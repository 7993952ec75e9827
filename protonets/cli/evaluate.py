"""`protonets eval`: benchmark methods on a dataset's episodes from cached embeddings."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from protonets.encoders.factory import create_encoder

from .common import (
    add_encoder_options,
    at_least_two,
    check_device_and_checkpoint,
    check_output_paths,
    non_negative_int,
    positive_float,
    positive_int,
)

DEFAULT_DIRICHLET_ALPHA = 2.0


def add_parser(sub: argparse._SubParsersAction, summary: str) -> None:
    from protonets.heads import HEADS as METHODS  # the registry's names: nothing heavy is imported

    p = sub.add_parser(
        "eval",
        help=summary,
        description="Embed a dataset once (cached on disk), then evaluate methods on seeded "
        "N-way K-shot episodes; prints a Markdown table.",
    )
    p.add_argument(
        "--dataset",
        choices=["folder", "omniglot", "csv"],
        default=None,
        help="dataset layout (default: folder)",
    )
    p.add_argument("--data", default=None, help="dataset root folder (images); or give --embeddings")
    p.add_argument(
        "--split", default=None, help="split name or file (omniglot: train/val/test; csv: the CSV)"
    )
    p.add_argument(
        "--embeddings",
        default=None,
        metavar="DIR",
        help="evaluate an embedding set folder from `protonets embed` instead of images "
        "(replaces --data, --dataset and --split)",
    )
    p.add_argument(
        "--ways", type=at_least_two, nargs="+", default=[5], help="classes per episode (default: 5)"
    )
    p.add_argument(
        "--shots", type=positive_int, nargs="+", default=[1, 5], help="support images a class (default: 1 5)"
    )
    p.add_argument(
        "--queries", type=positive_int, default=15, help="query images per class (default: %(default)s)"
    )
    p.add_argument(
        "--episodes", type=positive_int, default=600, help="episodes per setting (default: %(default)s)"
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the episodes (default: %(default)s)"
    )
    p.add_argument(
        "--query-balance",
        choices=["balanced", "dirichlet"],
        default="balanced",
        help="balanced: --queries queries per class; dirichlet: each episode's ways × queries "
        "queries split across its classes by Dirichlet(--dirichlet-alpha) proportions, as in "
        "realistic transductive evaluation (Veilleux et al. 2021); every method sees the same "
        "episodes (default: %(default)s)",
    )
    p.add_argument(
        "--dirichlet-alpha",
        type=positive_float,
        default=None,
        help="Dirichlet concentration for --query-balance dirichlet: smaller is more imbalanced "
        f"(default: {DEFAULT_DIRICHLET_ALPHA})",
    )
    p.add_argument(
        "--method",
        nargs="+",
        default=["prototype"],
        choices=sorted(METHODS),
        metavar="METHOD",
        help=f"one or more of {', '.join(sorted(METHODS))} (default: prototype)",
    )
    p.add_argument(
        "--head-checkpoint",
        nargs="+",
        default=None,
        metavar="[METHOD=]DIR",
        help="trained head folder for the methods that need one (siamese: a Siamese checkpoint "
        "folder, else $PROTONETS_SIAMESE_HEAD); METHOD=DIR gives one method its own folder, as in "
        "--method feat relation --head-checkpoint feat=DIR1 relation=DIR2",
    )
    p.add_argument(
        "--maml-steps",
        type=non_negative_int,
        default=None,
        help="inner steps for --method maml (default: a meta-trained checkpoint's own test-time "
        "steps; 20 for Proto-MAML on a plain encoder)",
    )
    p.add_argument("--knn-k", type=positive_int, default=1, help="neighbours for --method knn")
    p.add_argument(
        "--cache-dir", default=None, help="embedding cache (default: ~/.cache/protonets/embeddings)"
    )
    p.add_argument("--no-cache", action="store_true", help="embed without reading or writing the cache")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="draw accuracy against shots here (needs the plot extra)")
    add_encoder_options(p)
    p.set_defaults(run=run)


def check_result_files(output: str | None, plot: str | None) -> None:
    """--output and --plot, before any work: writable, two different files, a plot type we
    draw, and no existing file replaced unless `protonets eval` wrote it (a results JSON, a plot)."""
    from protonets.encoders.errors import UserInputError
    from protonets.eval.report import PLOT_TYPES, written_by_eval

    check_output_paths({"--output": output, "--plot": plot})
    if plot is not None:
        suffix = os.path.splitext(plot)[1].lower()
        if suffix and suffix not in PLOT_TYPES:
            raise UserInputError(
                f"--plot '{plot}': cannot draw a '{suffix}' file; end the name in {', '.join(PLOT_TYPES)}"
            )
    if output is not None and plot is not None and os.path.realpath(output) == os.path.realpath(plot):
        raise UserInputError(f"--output and --plot are the same file '{output}'; give the plot another name")
    for option, path, kind in (("--output", output, "results"), ("--plot", plot, "plot")):
        if path is not None and os.path.exists(path) and not written_by_eval(path, kind):
            raise UserInputError(
                f"{option} '{path}' already exists and is not a {kind} file of protonets eval; "
                "choose a new name (or move that file away)"
            )


def run(args: argparse.Namespace) -> int:
    from protonets.encoders.errors import UserInputError
    from protonets.episodes import usable_classes
    from protonets.eval.datasets import load_dataset
    from protonets.eval.meta import MetaEpisodes, is_meta_checkpoint
    from protonets.eval.run import embed_dataset

    for option in ("ways", "shots", "method"):  # a value given twice is one setting, scored once
        setattr(args, option, list(dict.fromkeys(getattr(args, option))))
    if args.dirichlet_alpha is not None and args.query_balance != "dirichlet":
        raise UserInputError("--dirichlet-alpha applies to --query-balance dirichlet; add that or drop it")
    if args.dirichlet_alpha is None:
        args.dirichlet_alpha = DEFAULT_DIRICHLET_ALPHA
    if args.embeddings is not None:
        return run_from_embeddings(args)
    if args.data is None:
        raise UserInputError(
            "--data is required: the dataset root folder (or --embeddings DIR from `protonets embed`)"
        )
    dataset = load_dataset(args.dataset or "folder", args.data, args.split)
    for ways in args.ways:  # refuse impossible settings before the (long) embedding pass
        for shots in args.shots:
            usable_classes(dataset.labels, ways, shots + args.queries, warn=False)
    device = check_device_and_checkpoint(args)  # device, checkpoint and output paths: before work
    check_result_files(args.output, args.plot)
    method_options = _method_options(args)
    encoder = None
    if is_meta_checkpoint(args.checkpoint) and any(map(MetaEpisodes.replaces, args.method)):
        # a meta-trained learner adapts on each episode's images, as it was trained to
        if args.query_balance != "balanced":
            raise UserInputError(
                "a meta-trained MAML checkpoint is evaluated on balanced episodes only; drop "
                "--query-balance dirichlet or --method maml"
            )
        meta = MetaEpisodes.load(args.checkpoint, dataset.items, device, steps=args.maml_steps)
        for ways in args.ways:
            meta.check_ways(ways)
        for method in filter(MetaEpisodes.replaces, args.method):
            method_options[method]["meta"] = meta
        encoder = meta.encoder  # the checkpoint folder names the model
    if encoder is None:
        # lazy: with every image cached (and the weights' fingerprint known), no model is built
        encoder = create_encoder(
            args.encoder,
            checkpoint_path=args.checkpoint,
            device=device,
            lazy=not args.no_cache,
            fingerprint_cache=args.cache_dir,
        )
    check_head_bodies(method_options, encoder.fingerprint)  # before the (long) embedding pass
    embeddings = embed_dataset(
        dataset,
        encoder,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=not args.quiet,
    )
    dataset_doc = {
        "name": dataset.name,
        "split": args.split,
        "classes": dataset.num_classes,
        "images": len(dataset),
    }
    title = f"{dataset.name} ({encoder.name})"
    return _evaluate_and_report(
        args,
        embeddings,
        dataset.labels,
        dataset.class_names,
        method_options,
        encoder.fingerprint,
        dataset_doc,
        title,
    )


def _method_options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every method's head options (None: the head's default); a trained head's folder checked.

    --knn-k and --maml-steps belong to the method they are named after, not to every head.
    """
    from protonets.encoders.errors import UserInputError
    from protonets.eval.protocol import checkpoint_folder
    from protonets.heads import HEADS

    folders = head_checkpoints(args.head_checkpoint or [], args.method)
    trained = [m for m in args.method if m in HEADS and HEADS[m].checkpoint_hint]
    if folders and not trained:
        raise UserInputError(
            f"--head-checkpoint '{' '.join(args.head_checkpoint)}' is for a trained head "
            f"({', '.join(sorted(n for n, h in HEADS.items() if h.checkpoint_hint))}), and no --method "
            "here is one; drop it or add that method"
        )
    named = {"knn": {"k": args.knn_k}, "maml": {"steps": args.maml_steps}}
    options = {m: dict(named.get(m, {})) for m in args.method}
    for method in trained:  # a bare DIR serves the trained heads without their own METHOD=DIR
        options[method]["head_checkpoint"] = folders.get(method, folders.get(""))
    for method in args.method:  # a trained head without its folder: refuse before embedding
        folder = checkpoint_folder(method, options[method].get("head_checkpoint"))  # or $ENV's
        if folder is not None:
            options[method]["head_checkpoint"] = folder
    return options


def check_head_bodies(
    method_options: dict[str, dict[str, Any]], fingerprint: dict[str, Any] | None, embedding_set: bool = False
) -> None:
    """A trained head's folder names its head and records the encoder it was trained on: another
    method's folder, or a head of another encoder than the embeddings', is refused before any
    scoring (such a head gives numbers, wrong ones, without a word)."""
    from protonets.encoders.checkpoint import read_checkpoint_dir
    from protonets.encoders.errors import UserInputError

    def describe(fp: dict[str, Any]) -> str:
        weights = fp.get("weights_sha256")
        return f"{fp.get('model', '?')}, weights {weights[:12] if weights else 'pretrained/random'}"

    for method, options in method_options.items():
        if "meta" in options:  # a meta-trained learner brings its own body
            continue
        directory = options.get("head_checkpoint")  # resolved by _method_options
        if not directory:
            continue
        manifest = read_checkpoint_dir(directory)
        head = (manifest.get("head") or {}).get("name")
        if head != method:
            raise UserInputError(
                f"--method {method}: '{directory}' holds a {head or 'no'} head, not a {method} one; "
                f"give a folder of `protonets train --method {method}`"
            )
        recorded = manifest.get("fingerprint")
        if fingerprint is not None and recorded and recorded != fingerprint:
            fix = (
                f"embed the images again with that body (protonets embed DATA --checkpoint {directory})"
                if embedding_set
                else f"pass --checkpoint {directory} to embed with the body it was trained with"
            )
            raise UserInputError(
                f"--method {method}: the head in '{directory}' was trained on another encoder "
                f"({describe(recorded)}) than the embeddings' ({describe(fingerprint)}); {fix}, "
                "or use a head trained on this encoder"
            )


def head_checkpoints(values: list[str], methods: list[str]) -> dict[str, str]:
    """--head-checkpoint's `[METHOD=]DIR` values -> {method: DIR}, "" for the one bare DIR that
    the trained methods without their own take. `METHOD=` counts only for a method name (a
    folder may hold '=')."""
    from protonets.encoders.errors import UserInputError
    from protonets.heads import HEADS

    folders: dict[str, str] = {}
    for value in values:
        method, sep, directory = value.partition("=")
        if not (sep and method in HEADS):
            method, directory = "", value
        elif method not in methods:
            raise UserInputError(
                f"--head-checkpoint {value}: '{method}' is not among --method ({' '.join(methods)}); "
                "add it there or drop this folder"
            )
        elif not HEADS[method].checkpoint_hint:
            raise UserInputError(f"--head-checkpoint {value}: {method} takes no trained head folder; drop it")
        if not directory:
            raise UserInputError(f"--head-checkpoint {value!r} names no folder; write METHOD=DIR or DIR")
        if method in folders:
            which = f"method '{method}'" if method else "the methods without METHOD=DIR"
            raise UserInputError(f"--head-checkpoint gives {which} two folders; give one")
        folders[method] = directory
    return folders


def _evaluate_and_report(
    args: argparse.Namespace,
    embeddings: Any,
    labels: Any,
    class_names: list[str],
    method_options: dict[str, dict[str, Any]],
    fingerprint: dict[str, Any],
    dataset_doc: dict[str, Any],
    title: str,
) -> int:
    """Run every method on the shared episodes; print the table, write --output and --plot."""
    from protonets.eval.report import markdown_table, plot_accuracy, write_results
    from protonets.eval.run import run_evaluation

    results = run_evaluation(
        embeddings,
        labels,
        args.method,
        args.ways,
        args.shots,
        queries=args.queries,
        episodes=args.episodes,
        seed=args.seed,
        class_names=class_names,
        progress=not args.quiet,
        method_options=method_options,
        query_balance=args.query_balance,
        alpha=args.dirichlet_alpha,
    )
    document = {
        "results": results,
        "encoder": fingerprint,
        "seed": args.seed,
        "query_balance": args.query_balance,
        "dataset": dataset_doc,
    }
    if args.query_balance == "dirichlet":
        document["dirichlet_alpha"] = args.dirichlet_alpha
    print(markdown_table(results))
    if args.output:
        write_results(args.output, document)
    if args.plot:
        plot_accuracy(results, args.plot, title=title)
    sys.stdout.flush()
    return 0


def run_from_embeddings(args: argparse.Namespace) -> int:
    """`eval --embeddings DIR`: the same protocol on a saved embedding set, no image read."""
    from protonets.encoders.defaults import DEFAULT_ENCODER
    from protonets.encoders.embedding_set import EmbeddingSet, read_manifest
    from protonets.encoders.errors import UserInputError
    from protonets.episodes import usable_classes
    from protonets.eval.meta import MetaEpisodes, is_meta_checkpoint

    for option in ("data", "dataset", "split"):
        if getattr(args, option) is not None:
            raise UserInputError(
                f"--{option} conflicts with --embeddings: the embedding set already names its "
                f"images; drop --{option} (or --embeddings to embed the images again)"
            )
    if args.checkpoint is not None and is_meta_checkpoint(args.checkpoint):
        if any(map(MetaEpisodes.replaces, args.method)):
            raise UserInputError(
                "a meta-trained MAML checkpoint adapts on each episode's images, which --embeddings "
                "does not hold; evaluate it with --data"
            )
    manifest = read_manifest(args.embeddings)  # one line for a folder that is no set, before work
    made_by = manifest["fingerprint"].get("model")
    if args.checkpoint is None and args.encoder not in (DEFAULT_ENCODER, made_by):
        raise UserInputError(
            f"--encoder {args.encoder}: '{args.embeddings}' was embedded by {made_by}; drop --encoder "
            "(the set names its encoder) or embed the images again with this one"
        )
    check_result_files(args.output, args.plot)
    method_options = _method_options(args)
    fingerprint = None
    if args.checkpoint is not None:  # a named encoder must be the one that made the set
        device = check_device_and_checkpoint(args)
        fingerprint = create_encoder(args.encoder, checkpoint_path=args.checkpoint, device=device).fingerprint
    embedded = EmbeddingSet.load(args.embeddings, fingerprint=fingerprint)
    check_head_bodies(method_options, embedded.fingerprint, embedding_set=True)
    labels = embedded.labels.numpy()
    for ways in args.ways:
        for shots in args.shots:
            usable_classes(labels, ways, shots + args.queries, warn=False)
    name = embedded.info.get("dataset", "embeddings")
    dataset_doc = {
        "name": name,
        "split": embedded.info.get("split"),
        "classes": len(embedded.class_names),
        "images": len(embedded),
        "embeddings": args.embeddings,
    }
    title = f"{name} ({embedded.fingerprint.get('model', '?')})"
    return _evaluate_and_report(
        args,
        embedded.embeddings,
        labels,
        embedded.class_names,
        method_options,
        embedded.fingerprint,
        dataset_doc,
        title,
    )
