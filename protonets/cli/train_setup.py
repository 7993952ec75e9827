"""What every `protonets train` method shares: dataset defaults, splits, options given, images,
the output-folder check, and the frozen encoder's embeddings for `--freeze-encoder` heads."""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING, Any

from protonets.encoders import DEFAULT_ENCODER, resolve_device
from protonets.encoders.atomic import check_bundle_target
from protonets.encoders.distributed import World, init_world, launched_by_torchrun
from protonets.encoders.errors import UserInputError

if TYPE_CHECKING:
    import torch

    from protonets.encoders import Encoder

#: Per-dataset defaults: the paper's Omniglot setting; a small-data setting elsewhere.
DEFAULTS = {
    "omniglot": {"ways": 60, "shots": 5, "queries": 5, "split": "train", "val_split": "val"},
    "folder": {"ways": 5, "shots": 5, "queries": 15, "split": None, "val_split": None},
    "csv": {"ways": 5, "shots": 5, "queries": 15, "split": None, "val_split": None},
}
#: Options that set the TrainConfig; None on the command line means "not given".
CONFIG_OPTIONS = {
    "ways": "ways",
    "shots": "shots",
    "queries": "queries",
    "episodes": "episodes",
    "lr": "lr",
    "lr_step": "lr_step",
    "lr_gamma": "lr_gamma",
    "weight_decay": "weight_decay",
    "augment": "augment",
    "metric": "metric",
    "val_ways": "val_ways",
    "val_shots": "val_shots",
    "val_queries": "val_queries",
    "val_episodes": "val_episodes",
    "val_every": "val_every",
    "seed": "seed",
}


def start_world(args: argparse.Namespace) -> tuple[World, str]:
    """(world, device): under torchrun, join the process group (`--device cuda`: this rank's GPU,
    cuda:LOCAL_RANK) and quieten ranks other than 0; a single process gets `World()`."""
    device = resolve_device(args.device)
    if device == "cuda" and launched_by_torchrun():
        import torch

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    world = init_world(device)
    if not world.is_main:  # rank 0 alone shows progress, warnings and results
        args.quiet = True
        logging.getLogger("protonets").setLevel(logging.ERROR)
    return world, device


def refuse_torchrun(args: argparse.Namespace, what: str) -> None:
    """A mode that runs in one process only: under torchrun, one line (from rank 0) and exit 2."""
    if launched_by_torchrun():
        from protonets.encoders.distributed import all_ranks_agree

        world, _ = start_world(args)
        with all_ranks_agree(world):
            raise UserInputError(f"{what} runs in one process: launch it without torchrun")


def splits(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(training split, validation split or None) from the options and the dataset's defaults."""
    defaults = DEFAULTS[args.dataset]
    split = args.split or defaults["split"]
    val_split = args.val_split or defaults["val_split"]
    if val_split is not None and val_split.lower() == "none":
        val_split = None
    return split, val_split


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        field: getattr(args, opt) for opt, field in CONFIG_OPTIONS.items() if getattr(args, opt) is not None
    }


def load_images(args: argparse.Namespace, split: str | None, preprocessing: dict[str, Any], what: str):
    from protonets.eval.datasets import load_dataset
    from protonets.training import ImageSet, preload_images

    dataset = load_dataset(args.dataset, args.data, split)
    images = preload_images(dataset.items, preprocessing, progress=not args.quiet, desc=f"loading {what}")
    info = {"name": dataset.name, "split": split, "classes": dataset.num_classes, "images": len(dataset)}
    return ImageSet(images, dataset.labels, dataset.class_names, info)


def check_output(args: argparse.Namespace) -> None:
    from protonets.training.checkpoint import LOG_FILE, STATE_DIR

    held = [n for n in ("manifest.json", LOG_FILE, STATE_DIR) if os.path.exists(os.path.join(args.output, n))]
    if held and not (args.resume or args.overwrite):
        resume = "" if args.freeze_encoder else "pass --resume to continue it, "
        raise UserInputError(
            f"--output '{args.output}' already holds a training run ({', '.join(held)}); {resume}"
            "pass --overwrite to start afresh, or choose another folder"
        )
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserInputError(f"--output '{args.output}' exists and is not a folder")
    if not held:  # a new run: refuse a folder of the user's own files before training starts
        from protonets.encoders.checkpoint import CHECKPOINT_KIND

        check_bundle_target(args.output, CHECKPOINT_KIND)


def frozen_embeddings(
    args: argparse.Namespace, split: str | None, val_split: str | None, device: str
) -> tuple[Encoder, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """What a `--freeze-encoder` head trains on: (pretrained encoder, embeddings, labels, dataset info).

    The encoder is `--encoder` (default: the offline default), pretrained and resized by
    `--image-size`; embeddings and labels are keyed 'train' (and 'val' with a validation split)
    and come through the embedding cache (`--cache-dir`).
    """
    import torch

    from protonets.encoders import create_encoder, with_image_size
    from protonets.eval.datasets import load_dataset
    from protonets.eval.run import embed_dataset

    encoder = create_encoder(args.encoder or DEFAULT_ENCODER, pretrained=True, device=device)
    encoder = with_image_size(encoder, args.image_size)
    sets = {"train": load_dataset(args.dataset, args.data, split)}
    if val_split:
        sets["val"] = load_dataset(args.dataset, args.data, val_split)
    embeddings = {
        k: embed_dataset(d, encoder, cache_dir=args.cache_dir, progress=not args.quiet)
        for k, d in sets.items()
    }
    labels = {k: torch.from_numpy(d.labels) for k, d in sets.items()}
    info = {"kind": args.dataset, "root": os.path.abspath(args.data), "split": split, "val": val_split}
    return encoder, embeddings, labels, info
