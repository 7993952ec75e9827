"""`protonets train`: episodic training of an encoder with the prototype head (ProtoNet)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from protonets.encoders import DEFAULT_ENCODER
from protonets.encoders.distributed import World
from protonets.encoders.errors import UserInputError

from . import train_heads, train_maml, train_siamese
from .common import at_least_two, non_negative_float, non_negative_int, positive_float, positive_int
from .train_setup import (
    DEFAULTS,
    check_resumed_method,
    given_options,
    load_images,
    refuse_torchrun,
    shared_check,
    splits,
    train_on_ranks,
    trained_body,
)

log = logging.getLogger("protonets")


def add_parser(sub: argparse._SubParsersAction, summary: str) -> None:
    from protonets.training import AUGMENTATIONS

    p = sub.add_parser(
        "train",
        help=summary,
        description="Episodic training of ProtoNet (Snell et al. 2017), a Siamese head, the MAML "
        "family, or a matching, relation or FEAT head with its encoder: N-way K-shot episodes, "
        "Adam with a step learning-rate schedule, validation "
        "episodes, best-checkpoint selection and resume. Writes DIR/manifest.json + weights (load "
        "with --checkpoint DIR), DIR/train_log.jsonl and DIR/resume/. With --freeze-encoder (siamese, anil, "
        "matching, relation, feat) only the head trains, on cached embeddings, in minutes: no DIR/resume/. "
        "Under torchrun (torchrun --nproc-per-node N -m protonets train ...) every process draws its own "
        "episode each step and the gradients are averaged (DistributedDataParallel; MAML splits "
        "--meta-batch): --episodes counts steps of N episodes; rank 0 validates and writes DIR.",
    )
    p.add_argument(
        "--method",
        choices=["protonet", "siamese", *train_maml.METHODS, *train_heads.METHODS],
        default="protonet",
    )
    p.add_argument("--dataset", choices=["folder", "omniglot", "csv"], default="folder")
    p.add_argument("--data", required=True, help="dataset root folder (images)")
    p.add_argument(
        "--split",
        default=None,
        help="training classes: omniglot split name or file (default train); folder: class-list "
        "file (default: every class folder); csv: the Ravi-format CSV",
    )
    p.add_argument(
        "--val-split",
        default=None,
        help="validation classes, as --split (omniglot default val); 'none' trains without validation",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="folder for checkpoint, log and state")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --output")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --output holds a run")

    g = p.add_argument_group("model")
    g.add_argument("--encoder", default=None, help="timm model name (default: conv4)")
    g.add_argument(
        "--pretrained", action="store_true", help="start from the encoder's pretrained weights (fine-tune)"
    )
    g.add_argument(
        "--init-checkpoint",
        default=None,
        metavar="DIR",
        help="protonet, maml, fomaml, anil, matching, relation, feat: start from a trained "
        "checkpoint folder's model and weights (e.g. MAML from a ProtoNet body); with "
        "--freeze-encoder: the fixed encoder",
    )
    g.add_argument("--image-size", type=positive_int, default=None, help="override the input side")
    g.add_argument(
        "--freeze-encoder",
        action="store_true",
        help="siamese, anil, matching, relation, feat: train the head alone on the cached "
        "embeddings of a fixed encoder: --init-checkpoint DIR's trained model, or else --encoder "
        f"pretrained (default encoder: {DEFAULT_ENCODER})",
    )
    g.add_argument("--cache-dir", default=None, help="embedding cache for --freeze-encoder")
    g.add_argument("--metric", choices=["euclidean", "cosine"], default=None, help="default: euclidean")

    g = p.add_argument_group("episodes (defaults: omniglot 60-way 5-shot 5-query, else 5/5/15)")
    g.add_argument("--ways", type=at_least_two, default=None)
    g.add_argument("--shots", type=positive_int, default=None)
    g.add_argument("--queries", type=positive_int, default=None)
    g.add_argument("--episodes", type=positive_int, default=None, help="training episodes (default 10000)")
    g.add_argument("--val-ways", type=at_least_two, default=None, help="default 5")
    g.add_argument("--val-shots", type=positive_int, default=None, help="default 5")
    g.add_argument("--val-queries", type=positive_int, default=None, help="default 15")
    g.add_argument("--val-episodes", type=positive_int, default=None, help="default 100")
    g.add_argument("--val-every", type=positive_int, default=None, help="episodes between validations (500)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=positive_float, default=None, help="Adam learning rate (default 1e-3)")
    g.add_argument("--lr-step", type=positive_int, default=None, help="episodes per decay (default 2000)")
    g.add_argument("--lr-gamma", type=positive_float, default=None, help="decay factor (default 0.5)")
    g.add_argument("--weight-decay", type=non_negative_float, default=None, help="default 0")
    g.add_argument("--augment", choices=AUGMENTATIONS, default=None, help="default none")
    g.add_argument("--seed", type=non_negative_int, default=None, help="default 0")

    g = p.add_argument_group("machine")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bars or warnings")
    train_siamese.add_train_options(p)  # --method siamese
    train_maml.add_train_options(p)  # --method maml|fomaml|anil
    train_heads.add_train_options(p)  # --method matching|relation|feat
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """`protonets train`, in one process or under `torchrun` (DistributedDataParallel)."""
    import torch

    shared_check(args, lambda: check_method_options(args))  # under torchrun: one line, from rank 0
    if args.method == "siamese":  # the Siamese head's own branch (cli/train_siamese.py)
        return train_siamese.run(args)
    if args.method in train_heads.METHODS and args.freeze_encoder:  # a head alone (cli/train_heads.py)
        refuse_torchrun(args, "--freeze-encoder")
        return train_heads.run(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.freeze_encoder:
        refuse_torchrun(args, "--freeze-encoder")
    world, built, result = train_on_ranks(args, lambda saved, device, w: _build(args, saved, device, w))
    if result is None:  # --freeze-encoder: the ANIL head alone, trained by _build
        return 0
    _, config, name = built
    if not world.is_main:
        return 0
    rate = result.step / result.elapsed_s if result.elapsed_s else 0.0
    ranks = f" on {world.size} processes" if world.distributed else ""
    print(
        f"trained {name} for {result.step} episodes{ranks} in {result.elapsed_s:.0f} s "
        f"({rate:.2f} episodes/s overall)"
    )
    if result.best_val_acc is not None:
        print(
            f"best validation ({config.val_ways}-way {config.val_shots}-shot, "
            f"{config.val_episodes} episodes): {100 * result.best_val_acc:.2f}% at episode {result.best_step}"
        )
    head = ""
    if args.method in train_heads.METHODS:
        head = f"--method {args.method} --head-checkpoint {args.output} "
    print(f"checkpoint: {args.output}  (protonets eval {head}--checkpoint {args.output} ...)")
    sys.stdout.flush()
    return 0


def check_method_options(args: argparse.Namespace) -> None:
    """Options that do not go together with --method (the same on every rank)."""
    alone = ("anil", "siamese", *train_heads.METHODS)
    takes_init = alone if args.freeze_encoder else ("protonet", *train_maml.METHODS, *train_heads.METHODS)
    if args.init_checkpoint and args.method not in takes_init:
        raise UserInputError(
            "--init-checkpoint starts the encoder of --method protonet, maml, fomaml, anil, matching, "
            "relation or feat from a trained folder, or with --freeze-encoder is the fixed encoder of "
            f"a head ({', '.join(alone)}); leave it out for --method {args.method}"
        )
    if args.method in train_heads.METHODS:
        train_heads.check_options(args)
    if args.freeze_encoder and args.method not in alone:
        raise UserInputError(
            f"--freeze-encoder trains a head alone: use it with --method {', '.join(alone)}, "
            f"not {args.method}"
        )


def _build(
    args: argparse.Namespace, saved: dict[str, Any] | None, device: str, world: World
) -> tuple[Any, Any, str]:
    """(trainer, config, encoder name) of the run; trainer None after a --freeze-encoder run."""
    import torch

    from protonets.encoders import create_encoder, with_image_size
    from protonets.training import EpisodicTrainer, TrainConfig

    defaults = DEFAULTS[args.dataset]
    split, val_split = splits(args)
    if args.dataset == "csv" and split is None:
        raise UserInputError("--dataset csv needs --split FILE.csv (the training classes' CSV)")

    given = given_options(args)
    if saved is not None:
        check_resumed_method(args, saved)
        config = TrainConfig.from_dict(saved["config"])
        differ = [
            f"--{k.replace('_', '-')} {v} (the run has {getattr(config, k)})"
            for k, v in given.items()
            if k != "episodes" and v != getattr(config, k)
        ]
        if args.encoder not in (None, saved["model"]):
            differ.append(f"--encoder {args.encoder} (the run has {saved['model']})")
        if differ:
            raise UserInputError(
                "cannot change settings when resuming: " + "; ".join(differ) + ". Leave them out "
                "(only --episodes may change), or start a new run"
            )
        config.episodes = given.get("episodes", config.episodes)
        name, preprocessing, model_kwargs = saved["model"], saved["preprocessing"], saved["model_kwargs"]
    else:
        values = {k: defaults[k] for k in ("ways", "shots", "queries")}
        if args.method in train_maml.METHODS:  # the MAML head has --ways outputs: 5-way by default
            values["ways"] = given.get("ways", 5)
            values["val_ways"] = given.get("val_ways", values["ways"])
        config = TrainConfig(**{**values, **given})
        name, preprocessing, model_kwargs = args.encoder or "conv4", None, {}
    init = None
    if args.init_checkpoint and not args.resume:  # the model, its preprocessing and weights
        init = trained_body(args)
        name, preprocessing, model_kwargs = init["model"], init["preprocessing"], init.get("model_kwargs", {})
    if args.freeze_encoder:  # the ANIL head alone on cached embeddings (cli/train_maml.py)
        train_maml.run_frozen(args, config, split, val_split, device)
        return None, config, name

    torch.manual_seed(config.seed)
    encoder = create_encoder(
        name,
        pretrained=args.pretrained and not args.resume,
        checkpoint_path=init["weights_file"] if init else None,
        device=device,
        preprocessing=preprocessing,
        **model_kwargs,
    )
    encoder = with_image_size(encoder, args.image_size, resuming=args.resume)
    train = load_images(args, split, encoder.preprocessing, "training images")
    val = load_images(args, val_split, encoder.preprocessing, "validation images") if val_split else None
    if val is None:
        log.warning("no validation split: the last state is saved as the checkpoint")
    meta = {
        "method": args.method,
        "dataset": {"kind": args.dataset, "root": os.path.abspath(args.data), "train": train.info},
    }
    if val is not None:
        meta["dataset"]["val"] = val.info
    if init is not None:
        path = os.path.abspath(args.init_checkpoint)
        meta["init_checkpoint"] = {"path": path, "fingerprint_id": init.get("fingerprint_id")}
    kwargs = {"progress": not args.quiet, "model_kwargs": model_kwargs, "meta": meta, "world": world}
    if args.method in train_maml.METHODS:
        trainer = train_maml.make_trainer(args, encoder, train, val, config, saved, **kwargs)
    elif args.method in train_heads.METHODS:  # the head with its encoder (cli/train_heads.py)
        method = train_heads.joint_method(args)
        trainer = EpisodicTrainer(encoder, train, val, config, output=args.output, method=method, **kwargs)
    else:
        trainer = EpisodicTrainer(encoder, train, val, config, output=args.output, **kwargs)
    return trainer, config, name
