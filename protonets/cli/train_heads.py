"""`protonets train --method matching|relation|feat --freeze-encoder`: a trainable head alone.

The head trains episodically on the frozen encoder's cached embeddings (`frozen_embeddings`,
`protonets.training.heads.train_episodic_head`, the shared `TrainLoop`), in minutes on a CPU,
and is written with that encoder as one checkpoint folder: evaluate it with `protonets eval
--method NAME --head-checkpoint DIR` (the same DIR as `--checkpoint` embeds as it was trained).
"""

from __future__ import annotations

import argparse
import time

from protonets.encoders.errors import UserInputError

from .train_setup import DEFAULTS, check_output, frozen_embeddings, splits

METHODS = ("matching", "relation", "feat")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """The options of `protonets train` that only the trainable heads read."""
    g = parser.add_argument_group("trainable heads (--method matching|relation|feat --freeze-encoder)")
    g.add_argument(
        "--contrastive",
        type=float,
        default=0.0,
        help="feat: weight of FEAT's contrastive regulariser (default 0: off; the paper uses 0.01-0.1)",
    )
    g.add_argument(
        "--episodes-per-step", type=int, default=1, help="episodes averaged in each optimiser step (1)"
    )


def run(args: argparse.Namespace) -> int:
    """Train the head `args.method` on frozen embeddings and save its checkpoint folder."""
    import torch

    from protonets.encoders import resolve_device
    from protonets.heads.trained import save_head_checkpoint
    from protonets.training.checkpoint import write_log
    from protonets.training.heads import train_episodic_head

    if not args.freeze_encoder:
        raise UserInputError(
            f"--method {args.method} trains the head alone on a frozen encoder's embeddings: "
            "add --freeze-encoder (joint training with the encoder is not available)"
        )
    if args.resume:
        raise UserInputError(
            "--freeze-encoder trains in minutes from cached embeddings; start again instead of --resume"
        )
    if args.contrastive < 0 or (args.contrastive and args.method != "feat"):
        raise UserInputError("--contrastive takes a weight of 0 or more, and only with --method feat")
    if args.episodes_per_step < 1:
        raise UserInputError(f"--episodes-per-step must be at least 1, got {args.episodes_per_step}")
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
    dim = int(emb["train"].shape[1])
    hidden = min(dim, 256) if args.method == "matching" else args.hidden
    if hidden < 1:
        raise UserInputError(f"--hidden must be at least 1 for --method {args.method}, got {hidden}")
    head, history = train_episodic_head(
        args.method,
        emb["train"],
        labels["train"],
        emb.get("val"),
        labels.get("val"),
        progress=not args.quiet,
        hidden=hidden,
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
