"""Train Conv-4 + Siamese head on Omniglot's background set (30 alphabets) only, then calibrate.

    .venv/bin/python scripts/train_siamese_omniglot.py --output checkpoints/siamese-conv4-omniglot

Training classes: every (character, rotation) of the background alphabets except the validation
alphabets; validation: Lake's 20-way within-alphabet one-shot runs on those held-out background
alphabets (upright). After training, the verification threshold is calibrated on held-out pairs
of the validation alphabets for a 1% false-accept rate and saved in the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from protonets.encoders import UserInputError, create_encoder, resolve_device, with_image_size  # noqa: E402  # noqa: E402
from protonets.eval.datasets import omniglot_alphabets, within_alphabet_episodes  # noqa: E402
from protonets.siamese import save_siamese_checkpoint  # noqa: E402
from protonets.siamese.training import SiameseConfig, SiameseTrainer, random_pairs  # noqa: E402
from protonets.training import ImageSet, preload_images, to_input  # noqa: E402
from protonets.training.checkpoint import load_state  # noqa: E402

VAL_ALPHABETS = ["Burmese_(Myanmar)", "Futurama", "Greek"]


def load_set(root, alphabets, rotations, preprocessing, cache):  # noqa: ANN001, ANN201
    """Images uint8 + labels (+ alphabet and drawer per image), decoded once and cached in /tmp."""
    data, alpha, drawer = omniglot_alphabets(root, True, alphabets, rotations)
    if cache and os.path.isfile(cache):
        images = load_file(cache)["images"]
        if images.shape == (len(data), *preprocessing["input_size"]):
            return data, images, alpha, drawer
    images = preload_images(data.items, preprocessing, progress=False)
    if cache:
        save_file({"images": images}, cache)
    return data, images, alpha, drawer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot"),
        help="Omniglot root (default: ../shared/data/omniglot beside the repository)",
    )
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--ways", type=int, default=50, help="classes per batch")
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--queries", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-step", type=int, default=1500)
    p.add_argument("--proto-weight", type=float, default=1.0)
    p.add_argument("--loss", choices=["bce", "contrastive"], default="bce")
    p.add_argument("--hard-fraction", type=float, default=0.5)
    p.add_argument("--augment", default="affine")
    p.add_argument("--no-rotations", action="store_true", help="upright characters only")
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--val-runs", type=int, default=300)
    p.add_argument("--far", type=float, default=0.01, help="target false-accept rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument(
        "--image-size", type=int, default=None, help="input side (Conv-4 default 28; Koch et al. used 105)"
    )
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()

    torch.manual_seed(args.seed)
    saved = load_state(args.output)[0]["preprocessing"] if args.resume else None  # the run's input size
    device = resolve_device(args.device)
    encoder = create_encoder("conv4", pretrained=False, device=device, preprocessing=saved)
    encoder = with_image_size(encoder, args.image_size, resuming=args.resume)
    pre = encoder.preprocessing
    side = pre["input_size"][-1]
    rotations = (0,) if args.no_rotations else (0, 90, 180, 270)
    with_rot = "rot" if len(rotations) > 1 else "up"
    train_alphabets = [
        a
        for a in sorted(os.listdir(os.path.join(args.data, "images_background")))
        if a not in VAL_ALPHABETS and os.path.isdir(os.path.join(args.data, "images_background", a))
    ]
    cache = f"/tmp/siamese_omniglot_train_{with_rot}_{side}.safetensors"
    train_data, train_images, _, _ = load_set(args.data, train_alphabets, rotations, pre, cache)
    val_data, val_images, val_alpha, val_drawer = load_set(
        args.data, VAL_ALPHABETS, (0,), pre, f"/tmp/siamese_omniglot_val_{side}.safetensors"
    )
    print(
        f"loaded {len(train_data)} training images ({train_data.num_classes} classes), "
        f"{len(val_data)} validation images in {time.time() - start:.0f} s",
        flush=True,
    )
    train = ImageSet(train_images, train_data.labels, train_data.class_names, {"alphabets": train_alphabets})
    val = ImageSet(val_images, val_data.labels, val_data.class_names, {"alphabets": VAL_ALPHABETS})
    episodes = within_alphabet_episodes(val_data.labels, val_alpha, val_drawer, args.val_runs, 20, args.seed)
    config = SiameseConfig(
        ways=args.ways, shots=args.shots, queries=args.queries, episodes=args.steps, lr=args.lr,
        lr_step=args.lr_step, augment=args.augment, loss=args.loss, hard_fraction=args.hard_fraction,
        proto_weight=args.proto_weight, val_every=args.val_every, val_episodes=args.val_runs,
        val_ways=20, val_shots=1, val_queries=1, seed=args.seed,
    )  # fmt: skip
    meta = {
        "dataset": {
            "kind": "omniglot-background",
            "train_alphabets": len(train_alphabets),
            "val_alphabets": VAL_ALPHABETS,
            "rotations": list(rotations),
            "train_classes": train_data.num_classes,
            "train_images": len(train_data),
        },
        "command": " ".join(sys.argv),
    }
    trainer = SiameseTrainer(
        encoder, train, val, config, output=args.output, progress=not args.quiet, meta=meta,
        val_episodes=torch.from_numpy(episodes.indices),
    )  # fmt: skip
    if args.resume:
        trainer.resume()
    result = trainer.fit()
    print(
        f"trained {result.step} steps in {result.elapsed_s:.0f} s; best within-alphabet validation "
        f"{100 * (result.best_val_acc or 0):.2f}% at step {result.best_step}",
        flush=True,
    )

    # calibrate the verification threshold on held-out pairs of the validation alphabets
    with torch.no_grad():
        emb = encoder.features(to_input(val_images, pre)).float()
    a, b, same = random_pairs(torch.from_numpy(val_data.labels), 5000, args.seed + 7)
    calibration = trainer.head.calibrate(emb[a], emb[b], same, args.far)
    print("calibration on validation-alphabet pairs:", json.dumps(calibration), flush=True)
    extra = {
        "method": "siamese",
        "training": config.to_dict(),
        "step": result.best_step,
        "validation": {"val_acc": result.best_val_acc, "val_loss": result.best_val_loss},
        "calibration": calibration,
        "train_elapsed_s": round(result.elapsed_s, 1),  # over all resumed sessions
        **meta,
    }
    save_siamese_checkpoint(args.output, encoder, trainer.head, extra)
    print(f"checkpoint: {args.output}  total wall time {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserInputError as error:  # one line and status 2, as the protonets command does
        print(f"train_siamese_omniglot.py: error: {error}", file=sys.stderr)
        sys.exit(2)
