"""`protonets train --method matching|relation|feat`: a trainable head, alone or with its encoder.

With `--freeze-encoder` the head trains episodically on a fixed encoder's cached embeddings
(`frozen_embeddings`, `protonets.training.heads.train_episodic_head`, the shared `TrainLoop`),
in minutes on a CPU. Without it, the head and the encoder train together on images
(`protonets.training.joint_heads.JointHeadMethod`, run by the image trainer as ProtoNet is).
Either way the encoder and the head are written as one checkpoint folder: evaluate it with
`protonets eval --method NAME --head-checkpoint DIR --checkpoint DIR`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from protonets.encoders.errors import UserInputError

from .train_setup import DEFAULTS, check_output, frozen_embeddings, splits

if TYPE_CHECKING:
    from protonets.training.joint_heads import JointHeadMethod
    from protonets.training.trainer import ImageEpisodes

METHODS = ("matching", "relation", "feat")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """The options of `protonets train` that only the trainable heads read."""
    g = parser.add_argument_group("trainable heads (--method matching|relation|feat)")
    g.add_argument(
        "--contrastive",
        type=float,
        default=0.0,
        help="feat: weight of FEAT's contrastive regulariser (default 0: off; the paper uses 0.01-0.1)",
    )
    g.add_argument(
        "--episodes-per-step",
        type=int,
        default=1,
        help="--freeze-encoder: episodes averaged in each optimiser step (1)",
    )


def check_options(args: argparse.Namespace) -> None:
    """The head options that do not go together (before any data is read)."""
    if args.contrastive < 0 or (args.contrastive and args.method != "feat"):
        raise UserInputError("--contrastive takes a weight of 0 or more, and only with --method feat")
    if args.episodes_per_step < 1:
        raise UserInputError(f"--episodes-per-step must be at least 1, got {args.episodes_per_step}")
    if args.method != "matching" and args.hidden < 1:
        raise UserInputError(f"--hidden must be at least 1 for --method {args.method}, got {args.hidden}")
    if args.metric is not None:
        raise UserInputError(
            f"--metric sets the prototype head's distance; --method {args.method} scores with its own "
            "trained head: leave it out"
        )
    if args.episodes_per_step > 1 and not args.freeze_encoder:
        raise UserInputError(
            "--episodes-per-step is for --freeze-encoder; training with the encoder takes one episode a step"
        )


def joint_method(args: argparse.Namespace) -> Callable[[ImageEpisodes], JointHeadMethod]:
    """The method of `--method NAME` without --freeze-encoder: the head with its encoder."""
    from protonets.training.joint_heads import JointHeadMethod

    def build(data: ImageEpisodes) -> JointHeadMethod:
        return JointHeadMethod(data, args.method, args.contrastive, hidden=hidden(args, data.encoder.dim))

    return build


def hidden(args: argparse.Namespace, dim: int) -> int:
    """The head's hidden width: `--hidden` (matching: the embedding width, at most 256)."""
    return min(dim, 256) if args.method == "matching" else args.hidden


def run(args: argparse.Namespace) -> int:
    """Train the head `args.method` on frozen embeddings (--freeze-encoder) and save its folder."""
    import torch

    from protonets.encoders import resolve_device
    from protonets.heads.trained import save_head_checkpoint
    from protonets.training.checkpoint import write_log
    from protonets.training.heads import train_episodic_head

    if args.resume:
        raise UserInputError(
            "--freeze-encoder trains in minutes from cached embeddings; start again instead of --resume"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    check_output(args)
    start = time.time()
    split, val_split = splits(args)
    defaults = DEFAULTS[args.dataset]
    device = resolve_device(args.device)
    encoder, emb, labels, dataset_info = frozen_embeddings(args, split, val_split, device)
    settings = {
        "ways": args.ways or defaults["ways"],
        "shots": args.shots or defaults["shots"],
        "queries": args.queries or defaults["queries"],
        "steps": args.episodes or 2000,
        "batch": args.episodes_per_step,
        "lr": args.lr or 1e-3,
        "weight_decay": args.weight_decay or 0.0,
        "lr_step": args.lr_step,
        "lr_gamma": args.lr_gamma or 0.5,
        "contrastive": args.contrastive,
        "val_ways": args.val_ways or 5,
        "val_shots": args.val_shots or 5,
        "val_queries": args.val_queries or 15,
        "val_episodes": args.val_episodes or 200,
        "val_every": args.val_every or 200,
        "seed": args.seed or 0,
    }
    head, history = train_episodic_head(
        args.method,
        emb["train"],
        labels["train"],
        emb.get("val"),
        labels.get("val"),
        progress=not args.quiet,
        hidden=hidden(args, int(emb["train"].shape[1])),
        **settings,
    )
    best = max((r for r in history if "val_acc" in r), key=lambda r: r["val_acc"], default=None)
    extra = {
        "method": args.method,
        "frozen_encoder": True,
        "training": {**settings, "log": history},
        "validation": best,
        "dataset": dataset_info,
    }
    save_head_checkpoint(args.output, encoder, head, extra)
    write_log(args.output, history)
    elapsed = time.time() - start
    print(f"trained the {args.method} head on frozen {encoder.name} embeddings in {elapsed:.0f} s")
    if best is not None:
        print(
            f"best validation ({settings['val_ways']}-way {settings['val_shots']}-shot, "
            f"{settings['val_episodes']} episodes): {100 * best['val_acc']:.2f}% at step {best['step']}"
        )
    print(
        f"checkpoint: {args.output}  (protonets eval --method {args.method} --head-checkpoint "
        f"{args.output} --checkpoint {args.output} ...)"
    )
    return 0
