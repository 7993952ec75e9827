"""`protonets embed`: a dataset's images into an embedding set folder, alone or under torchrun."""

from __future__ import annotations

import argparse

from .common import add_encoder_options, positive_int


def add_parser(sub: argparse._SubParsersAction, summary: str) -> None:
    p = sub.add_parser(
        "embed",
        help=summary,
        description="Embed every image of a dataset into DIR/embeddings.safetensors and "
        "DIR/manifest.json (paths relative to DATA in row order, class names, encoder "
        "fingerprint), for `protonets eval --embeddings DIR`. Under `torchrun --nproc-per-node N "
        "-m protonets embed ...` the ranks share the images and rank 0 writes DIR; a run that "
        "was stopped embeds only what is missing when started again.",
    )
    p.add_argument("data", metavar="DATA", help="dataset root folder (images)")
    p.add_argument("--output", required=True, metavar="DIR", help="the embedding set folder to write")
    p.add_argument("--dataset", choices=["folder", "omniglot", "csv"], default="folder")
    p.add_argument(
        "--split", default=None, help="split name or file (omniglot: train/val/test; csv: the CSV)"
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out unreadable images (a warning each) instead of stopping",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an embedding set (or an unfinished run) of another dataset or encoder in DIR",
    )
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=2048,
        help="images per resumable chunk (default: %(default)s)",
    )
    add_encoder_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from protonets.encoders.distributed import start_world
    from protonets.encoders.factory import check_checkpoint
    from protonets.encoders.sharded import EmbedSource, embed_to_folder

    world, device = start_world(args.device)  # this rank's device, checked before the world

    def prepare() -> EmbedSource:
        from protonets.encoders.factory import create_encoder
        from protonets.eval.datasets import load_dataset

        dataset = load_dataset(args.dataset, args.data, args.split)
        check_checkpoint(args.checkpoint)
        encoder = create_encoder(args.encoder, checkpoint_path=args.checkpoint, device=device)
        info = {"dataset": dataset.name, "split": args.split}
        return EmbedSource(dataset.items, dataset.labels, dataset.class_names, args.data, encoder, info)

    summary = embed_to_folder(  # a shared error reaches `main`, which prints it on rank 0 only
        args.output,
        prepare,
        world,
        skip_bad=args.skip_bad,
        force=args.force,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=not args.quiet,
        chunk_rows=args.chunk_size,
    )
    if summary is not None:
        reused = f", {summary.reused} of {summary.chunks} chunks reused" if summary.reused else ""
        skipped = f", {len(summary.skipped)} unreadable image(s) skipped" if summary.skipped else ""
        print(
            f"{summary.output}: {summary.rows} embeddings × {summary.dim} from {summary.images} "
            f"images ({summary.chunks} chunks{reused}{skipped})",
            flush=True,
        )
    return 0
