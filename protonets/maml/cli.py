"""`protonets train --method maml|fomaml|anil`: the MAML options and trainer for the train command.

protonets/cli/train.py wires them in (see README, "MAML"): `add_train_options(parser)` once,
and `make_trainer(...)` in place of `EpisodicTrainer(...)` when `args.method in METHODS`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from encoders import Encoder

from ..training import ImageSet, TrainConfig
from .train import METHODS, MetaConfig, MetaTrainer

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
    g.add_argument("--inner-lr", type=float, default=None, help="their step size (0.4)")
    g.add_argument("--eval-inner-steps", type=int, default=None, help="steps when validating (3)")
    g.add_argument("--meta-sgd", action="store_true", help="learn per-parameter inner step sizes")
    g.add_argument("--proto-init", action="store_true", help="Proto-MAML: head starts at the prototypes")
    g.add_argument("--chunk-size", type=int, default=None, help="tasks per backward (bounds memory)")


def meta_config(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> MetaConfig:
    """MetaConfig from the command line, or from a resumed run's state manifest (`saved`)."""
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
    return MetaTrainer(
        encoder, train, val, config, meta_config(args, saved), output=os.fspath(args.output), **kwargs
    )
