"""What every `protonets train` method shares: dataset defaults, splits, options given, images,
the output-folder check, the torchrun sequence of the image trainers (`train_on_ranks`), and the
frozen encoder's embeddings for `--freeze-encoder` heads."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from protonets.encoders import DEFAULT_ENCODER
from protonets.encoders.atomic import check_bundle_target
from protonets.encoders.distributed import World, launched_by_torchrun
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
    see `protonets.encoders.distributed.rank_device`) and quieten ranks other than 0; a single
    process gets `World()`. A bad --device is one line, from rank 0 alone."""
    from protonets.encoders.distributed import start_world as join

    world, device = join(args.device)
    if not world.is_main:  # rank 0 alone shows progress, warnings and results
        args.quiet = True
        logging.getLogger("protonets").setLevel(logging.ERROR)
    return world, device


def refuse_torchrun(args: argparse.Namespace, what: str) -> None:
    """A mode that runs in one process only: under torchrun, one line (from rank 0) and exit 2."""
    if launched_by_torchrun():
        shared_check(args, lambda: _raise(f"{what} runs in one process: launch it without torchrun"))


def _raise(message: str) -> None:
    raise UserInputError(message)


def shared_check(args: argparse.Namespace, check: Callable[[], None]) -> None:
    """Run `check` (it raises a UserInputError for bad options); under torchrun on every rank of
    the world (joined here), so that rank 0 alone prints the error."""
    if not launched_by_torchrun():
        check()
        return
    from protonets.encoders.distributed import all_ranks_agree

    world, _ = start_world(args)
    with all_ranks_agree(world):
        check()


def saved_run(args: argparse.Namespace, world: World) -> dict[str, Any] | None:
    """The resume state's manifest of `--output` with `--resume` (None without)."""
    from protonets.training.checkpoint import load_state
    from protonets.training.ddp import check_world_size

    if args.resume and args.freeze_encoder:
        raise UserInputError(
            "--freeze-encoder trains in minutes from cached embeddings; start again instead of --resume"
        )
    if not args.resume:
        return None
    saved, _ = load_state(args.output)
    check_world_size(saved, world, args.output)
    return saved


def train_on_ranks(
    args: argparse.Namespace, build: Callable[[dict[str, Any] | None, str, World], tuple[Any, ...]]
) -> tuple[World, tuple[Any, ...], Any]:
    """The sequence every image trainer runs, in one process or under torchrun: join the world;
    rank 0 checks --output and reads the resume state (--resume), which every rank receives;
    every rank builds its trainer (`build(saved, device, world)` → (trainer, ...)); the ranks
    check they train the same data from the same weights; resume, fit, leave the world.

    Returns (world, what `build` returned, the `TrainResult`); the result is None when `build`
    returned no trainer (it trained by itself, e.g. `--method anil --freeze-encoder`).
    """
    from protonets.encoders.distributed import all_ranks_agree, broadcast, finish

    world, device = start_world(args)
    saved: dict[str, Any] | None = None
    with all_ranks_agree(world):  # bad input on any rank stops every rank
        if world.is_main:  # rank 0 alone reads and writes the output folder
            check_output(args)
            saved = saved_run(args, world)
    saved = broadcast(world, saved)
    with all_ranks_agree(world):
        built = build(saved, device, world)
    trainer = built[0]
    if trainer is None:
        return world, built, None
    check_same_training(world, trainer)
    if args.resume:
        trainer.resume()
    result = trainer.fit()
    finish(world)
    return world, built, result


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors' names, shapes, dtypes and values."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_same_training(world: World, trainer: Any) -> None:
    """Under torchrun, refuse ranks that would train on other data (e.g. another dataset copy on
    one node) or from other starting weights: one line naming the first such rank."""
    if not world.distributed:
        return
    from protonets.encoders.distributed import all_gather, all_ranks_agree

    data = trainer.data
    mine = {
        "data": data.signature,
        "classes": list(data.train_set.class_names or []),
        "images": len(data.train_set),
        "weights": weights_digest(trainer.method.weights()),
    }
    seen = all_gather(world, mine)
    with all_ranks_agree(world):
        first = seen[0]
        for rank, other in enumerate(seen):
            if (other["data"], other["classes"]) != (first["data"], first["classes"]):
                raise UserInputError(
                    f"rank {rank} would train on other data ({other['images']} images of "
                    f"{len(other['classes'])} classes) than rank 0 ({first['images']} images of "
                    f"{len(first['classes'])} classes); every node must see the same dataset "
                    "(--data, --split) with the same files"
                )
            if other["weights"] != first["weights"]:
                raise UserInputError(
                    f"rank {rank} would start from other model weights than rank 0; give every "
                    "node the same --encoder, --pretrained weights and --init-checkpoint"
                )


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
    from protonets.encoders.checkpoint import CHECKPOINT_KIND
    from protonets.training.checkpoint import LOG_FILE, STATE_DIR

    if os.path.isfile(os.path.join(args.output, "manifest.json")):  # another kind of folder, named as such
        check_bundle_target(args.output, CHECKPOINT_KIND)
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
        check_bundle_target(args.output, CHECKPOINT_KIND)


def check_resumed_method(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    """Refuse to resume a run with another --method (its weights and optimiser would not fit).
    Older resume states name no method: it is read from the method's own entries when it can be."""
    method = (saved.get("meta") or {}).get("method")
    if method is None and "joint_head" in saved:
        method = saved["joint_head"].get("name")
    if method is None and "maml" in saved:
        method = saved["maml"].get("method")
    if method is not None and method != args.method:
        raise UserInputError(
            f"'{args.output}' holds a --method {method} run: resume it with --method {method}, "
            "or start a new run in another folder"
        )


def trained_body(args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint manifest of `--init-checkpoint DIR` (a trained body), checked: it exists,
    and neither `--encoder` (another model) nor `--pretrained` contradicts it."""
    from protonets.encoders.checkpoint import read_checkpoint_dir
    from protonets.encoders.factory import check_checkpoint

    path = args.init_checkpoint
    if not os.path.isdir(path):
        raise UserInputError(
            f"--init-checkpoint '{path}' is not a folder: pass a checkpoint folder written by "
            "`protonets train`"
        )
    check_checkpoint(path)
    body = read_checkpoint_dir(path)
    if args.encoder not in (None, body["model"]) or args.pretrained:
        raise UserInputError(
            f"--init-checkpoint '{path}' holds a trained {body['model']}: "
            "leave out --encoder and --pretrained"
        )
    return body


def frozen_embeddings(
    args: argparse.Namespace, split: str | None, val_split: str | None, device: str
) -> tuple[Encoder, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """What a `--freeze-encoder` head trains on: (fixed encoder, embeddings, labels, dataset info).

    The encoder is the trained model of `--init-checkpoint DIR` (e.g. a Conv-4 ProtoNet body), or
    else `--encoder` (default: the offline default) pretrained; `--image-size` resizes it.
    Embeddings and labels are keyed 'train' (and 'val' with a validation split) and come through
    the embedding cache (`--cache-dir`). The info names the checkpoint the encoder came from.
    """
    import torch

    from protonets.encoders import create_encoder, with_image_size
    from protonets.eval.datasets import load_dataset
    from protonets.eval.run import embed_dataset

    if args.init_checkpoint:
        model = trained_body(args)["model"]
        encoder = create_encoder(model, checkpoint_path=args.init_checkpoint, device=device)
    else:
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
    if args.init_checkpoint:
        info["encoder_checkpoint"] = os.path.abspath(args.init_checkpoint)
    return encoder, embeddings, labels, info
