"""`protonets train --method siamese`: the Siamese options and branch of the train command.

Two modes: the encoder and head together on images (`SiameseTrainer`), or `--freeze-encoder`:
the head alone on the frozen encoder's cached embeddings (`train_head`), for any timm encoder.
Both write a Siamese checkpoint folder (encoder weights + head + calibrated threshold).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from protonets.encoders import resolve_device
from protonets.encoders.distributed import World
from protonets.encoders.errors import UserInputError

from .train_setup import (
    check_output,
    check_resumed_method,
    frozen_embeddings,
    given_options,
    load_images,
    refuse_torchrun,
    splits,
    train_on_ranks,
)


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """The options of `protonets train` that only `--method siamese` reads."""
    g = parser.add_argument_group("siamese (--method siamese)")
    g.add_argument("--loss", choices=["bce", "contrastive"], default="bce", help="pair loss (default bce)")
    g.add_argument("--hard-fraction", type=float, default=0.5, help="share of hardest negatives (0.5)")
    g.add_argument(
        "--proto-weight", type=float, default=1.0, help="weight of the ProtoNet loss on each batch (1.0)"
    )
    g.add_argument(
        "--hidden",
        type=int,
        default=128,
        help="head width: siamese MLP (0 = Koch's weighted L1), relation, feat (matching: its "
        "embedding width, at most 256)",
    )
    g.add_argument("--no-product", action="store_true", help="pair features |a-b| only (no a*b)")
    g.add_argument("--reduce", choices=["max", "mean"], default="max", help="class score over supports")
    g.add_argument("--affine", action="store_true", help="Koch's random affine distortions")
    g.add_argument("--far", type=float, default=0.01, help="false-accept rate to calibrate for (0.01)")


def _frozen(args: argparse.Namespace, split: str | None, val_split: str | None) -> int:

    from protonets.siamese.checkpoint import save_siamese_checkpoint
    from protonets.siamese.training import random_pairs, train_head
    from protonets.training.checkpoint import write_log

    start = time.time()
    if args.resume:
        raise UserInputError("--freeze-encoder trains in seconds; start again instead of --resume")
    encoder, emb, labels, dataset_info = frozen_embeddings(
        args, split, val_split, resolve_device(args.device)
    )
    name = encoder.name
    head, history = train_head(
        emb["train"],
        labels["train"],
        emb.get("val"),
        labels.get("val"),
        steps=args.episodes or 1000,
        classes=args.ways or 32,
        per_class=(args.shots or 2) + (args.queries or 2),
        lr=args.lr or 1e-3,
        loss=args.loss,
        hard_fraction=args.hard_fraction,
        val_every=args.val_every or 100,
        seed=args.seed or 0,
        progress=not args.quiet,
        hidden=args.hidden,
        product=not args.no_product,
        reduce=args.reduce,
        normalize=True,
    )
    held = "val" if "val" in emb else "train"
    a, b, same = random_pairs(labels[held], 5000, (args.seed or 0) + 7)
    calibration = head.calibrate(emb[held][a], emb[held][b], same, args.far)
    extra: dict[str, Any] = {
        "method": "siamese",
        "frozen_encoder": True,
        "training": {"log": history, "steps": args.episodes or 1000, "loss": args.loss},
        "calibration": {**calibration, "pairs": held},
        "dataset": dataset_info,
    }
    save_siamese_checkpoint(args.output, encoder, head, extra)
    write_log(args.output, history)
    last = history[-1] if history else {}
    print(f"trained the Siamese head on frozen {name} embeddings in {time.time() - start:.0f} s")
    if "val_auc" in last:
        print(f"validation pair ROC AUC: {max(r['val_auc'] for r in history):.4f}")
    print(
        f"threshold for FAR {args.far:g} on {held} pairs: {calibration['threshold']:.3f} "
        f"(FAR {calibration['far']:.4f}, TAR {calibration['tar']:.4f}, AUC {calibration['auc']:.4f})"
    )
    print(f"checkpoint: {args.output}  (protonets eval --method siamese --head-checkpoint {args.output} ...)")
    return 0


def run(args: argparse.Namespace) -> int:
    """`protonets train --method siamese ...`, in one process or under torchrun (DDP)."""

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.freeze_encoder:
        refuse_torchrun(args, "--freeze-encoder")
        check_output(args)
        return _frozen(args, *splits(args))
    world, built, result = train_on_ranks(args, lambda saved, device, w: _build(args, saved, device, w))
    trainer, config, name, val = built
    if not world.is_main:
        return 0
    if val is not None:
        calibrate_on_images(trainer, val, args.far, config.seed, args.output)
    print(f"trained {name} + Siamese head for {result.step} steps in {result.elapsed_s:.0f} s")
    if result.best_val_acc is not None:
        print(
            f"best validation ({config.val_ways}-way {config.val_shots}-shot): "
            f"{100 * result.best_val_acc:.2f}% at step {result.best_step}"
        )
    print(f"checkpoint: {args.output}")
    return 0


def _build(args: argparse.Namespace, saved: dict[str, Any] | None, device: str, world: World) -> tuple:
    """(trainer, config, encoder name, validation images or None) of a Siamese run."""
    import torch

    from protonets.encoders import create_encoder, with_image_size
    from protonets.siamese.training import SiameseConfig, SiameseTrainer

    split, val_split = splits(args)
    given = {k: v for k, v in given_options(args).items() if k not in ("metric", "augment")}
    extra = {
        "loss": args.loss,
        "hard_fraction": args.hard_fraction,
        "proto_weight": args.proto_weight,
        "hidden": args.hidden,
        "product": not args.no_product,
        "reduce": args.reduce,
        "augment": "affine" if args.affine else (args.augment or "none"),
    }
    if saved is not None:
        check_resumed_method(args, saved)
        config = SiameseConfig.from_dict(saved["config"])
        config.episodes = given.get("episodes", config.episodes)
        name, preprocessing = saved["model"], saved["preprocessing"]
    else:
        config = SiameseConfig(**{**extra, **given})
        name, preprocessing = args.encoder or "conv4", None
    torch.manual_seed(config.seed)
    encoder = create_encoder(
        name,
        pretrained=args.pretrained and not args.resume,
        device=device,
        preprocessing=preprocessing,
    )
    encoder = with_image_size(encoder, args.image_size, resuming=args.resume)
    train = load_images(args, split, encoder.preprocessing, "training images")
    val = load_images(args, val_split, encoder.preprocessing, "validation images") if val_split else None
    meta = {
        "method": "siamese",
        "dataset": {"kind": args.dataset, "root": os.path.abspath(args.data), "train": train.info},
    }
    trainer = SiameseTrainer(
        encoder, train, val, config, output=args.output, progress=not args.quiet, meta=meta, world=world
    )
    return trainer, config, name, val


def calibrate_on_images(
    trainer: Any, val: Any, far: float, seed: int, output: str | None
) -> dict[str, float]:
    """Calibrate a trained `SiameseTrainer`'s head on pairs of the validation images; re-save."""
    import torch

    from protonets.siamese.checkpoint import save_siamese_checkpoint
    from protonets.siamese.training import random_pairs
    from protonets.training import to_input

    encoder = trainer.encoder
    with torch.no_grad():
        chunks = [
            encoder.features(to_input(val.images[i : i + 1000].to(trainer.device), encoder.preprocessing))
            for i in range(0, len(val), 1000)
        ]
    emb = torch.cat(chunks).float()
    a, b, same = random_pairs(val.labels, 5000, seed + 7)
    calibration = trainer.head.calibrate(emb[a], emb[b], same, far)
    print(
        f"threshold for FAR {far:g} on validation pairs: {calibration['threshold']:.3f} "
        f"(FAR {calibration['far']:.4f}, TAR {calibration['tar']:.4f}, AUC {calibration['auc']:.4f})"
    )
    if output is not None:
        extra = {
            "method": "siamese",
            "training": trainer.config.to_dict(),
            "step": trainer.best["step"],
            "validation": {k: v for k, v in trainer.best.items() if k != "step"},
            "calibration": calibration,
            **trainer.meta,
        }
        save_siamese_checkpoint(output, encoder, trainer.head, extra, trainer.model_kwargs)
    return calibration
