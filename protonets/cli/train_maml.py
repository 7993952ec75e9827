"""`protonets train --method maml|fomaml|anil`: the MAML options and trainer for the train command.

protonets/cli/train.py wires them in (see README, "MAML"): `add_train_options(parser)` once,
and `make_trainer(...)` in place of `EpisodicTrainer(...)` when `args.method in METHODS`.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from protonets.maml.options import METHODS

if TYPE_CHECKING:
    from protonets.encoders import Encoder
    from protonets.maml.train import MetaConfig, MetaTrainer
    from protonets.training import ImageSet, TrainConfig

from .common import non_negative_float
from .train_setup import frozen_embeddings

__all__ = ["METHODS", "add_train_options", "make_trainer", "meta_config"]

OPTIONS = {
    "meta_batch": "meta_batch",
    "inner_steps": "inner_steps",
    "inner_lr": "inner_lr",
    "eval_inner_steps": "eval_inner_steps",
    "chunk_size": "chunk_size",
}


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """The options of `protonets train` that only the MAML methods read (defaults: MetaConfig)."""
    g = parser.add_argument_group("MAML (--method maml|fomaml|anil; --episodes counts meta-batches)")
    g.add_argument("--meta-batch", type=int, default=None, help="episodes per meta-step (default 32)")
    g.add_argument("--inner-steps", type=int, default=None, help="SGD steps on each support set (1)")
    g.add_argument("--inner-lr", type=non_negative_float, default=None, help="their step size (0.4)")
    g.add_argument("--eval-inner-steps", type=int, default=None, help="steps when validating (3)")
    g.add_argument("--meta-sgd", action="store_true", help="learn per-parameter inner step sizes")
    g.add_argument("--proto-init", action="store_true", help="Proto-MAML: head starts at the prototypes")
    g.add_argument("--chunk-size", type=int, default=None, help="tasks per backward (bounds memory)")


def meta_config(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> MetaConfig:
    """MetaConfig from the command line, or from a resumed run's state manifest (`saved`)."""
    from protonets.maml.train import MetaConfig

    if saved is not None:
        return MetaConfig.from_dict(saved["maml"])
    given = {
        field: getattr(args, opt) for opt, field in OPTIONS.items() if getattr(args, opt, None) is not None
    }
    return MetaConfig(
        method=args.method,
        meta_sgd=bool(getattr(args, "meta_sgd", False)),
        proto_init=bool(getattr(args, "proto_init", False)),
        **given,
    )


def make_trainer(
    args: argparse.Namespace,
    encoder: Encoder,
    train: ImageSet,
    val: ImageSet | None,
    config: TrainConfig,
    saved: dict[str, Any] | None = None,
    **kwargs: Any,
) -> MetaTrainer:
    """The `MetaTrainer` for `protonets train --method maml|fomaml|anil` (kwargs as EpisodicTrainer's)."""
    from protonets.maml.train import MetaTrainer

    return MetaTrainer(
        encoder, train, val, config, meta_config(args, saved), output=os.fspath(args.output), **kwargs
    )


def run_frozen(
    args: argparse.Namespace, config: TrainConfig, split: str | None, val_split: str | None, device: str
) -> int:
    """`protonets train --method anil --freeze-encoder`: the head alone on cached embeddings."""
    import dataclasses
    import time

    import torch

    from protonets.encoders import weights_sha256
    from protonets.encoders.checkpoint import save_checkpoint
    from protonets.maml.frozen import train_frozen_anil
    from protonets.maml.train import LEARNER_DIR, create_meta_learner, save_learner_extra
    from protonets.training import checkpoint as ckpt

    start = time.time()
    meta = dataclasses.replace(meta_config(args), frozen_encoder=True)
    encoder, emb, labels, dataset_info = frozen_embeddings(args, split, val_split, device)
    name = encoder.name
    torch.manual_seed(config.seed)  # the head's starting weights come from the seed too
    learner = create_meta_learner(None, emb["train"].shape[1], config.ways, meta)
    history = train_frozen_anil(
        learner,
        emb["train"],
        labels["train"],
        emb.get("val"),
        labels.get("val"),
        config,
        meta.meta_batch,
        meta.eval_inner_steps,
        progress=not args.quiet,
    )
    best = next((r for r in reversed(history) if r.get("best")), history[-1])
    encoder_sha = weights_sha256(encoder.model)
    extra = {
        "method": "anil",
        "frozen_encoder": True,
        "head": {"name": "maml", "ways": config.ways, "learner": LEARNER_DIR},
        "maml": meta.to_dict(),
        "training": config.to_dict(),
        "step": best["step"],
        "validation": {k: best[k] for k in ("val_acc", "val_loss") if k in best},
        "dataset": dataset_info,
    }
    save_checkpoint(args.output, encoder.model, name, encoder.preprocessing, extra)
    save_learner_extra(args.output, learner, meta, config.ways, body_sha256=encoder_sha)
    ckpt.write_log(args.output, history)
    print(f"meta-trained the ANIL head on frozen {name} embeddings in {time.time() - start:.0f} s")
    if "val_acc" in best:
        print(
            f"best validation ({config.val_ways}-way {config.val_shots}-shot, {config.val_episodes} "
            f"episodes): {100 * best['val_acc']:.2f}% at step {best['step']}"
        )
    print(f"checkpoint: {args.output}  (protonets eval --method maml --checkpoint {args.output} ...)")
    return 0
