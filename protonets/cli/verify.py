"""`protonets verify IMG1 IMG2`: do two images show the same class? (Siamese head.)"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from protonets.encoders.errors import UserInputError

from .common import open_unit_interval

#: The Siamese checkpoint committed with the repository (Omniglot characters).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "siamese-conv4-omniglot"


def add_parser(sub: argparse._SubParsersAction, summary: str) -> None:
    p = sub.add_parser(
        "verify",
        help=summary,
        description="Embed two images, score the pair with a trained Siamese head and decide "
        "'same' or 'different' at the threshold calibrated for the checkpoint's false-accept rate.",
    )
    p.add_argument("image1", metavar="IMG1")
    p.add_argument("image2", metavar="IMG2")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="Siamese checkpoint folder (default: the repository's checkpoints/siamese-conv4-omniglot)",
    )
    p.add_argument(
        "--threshold",
        type=open_unit_interval,
        default=None,
        help="decision threshold on the similarity in (0, 1)",
    )
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no warnings")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from protonets.encoders.device import resolve_device
    from protonets.encoders.images import check_images

    device = resolve_device(args.device)  # a device name that cannot run is refused before torch
    checkpoint = args.checkpoint or str(DEFAULT_CHECKPOINT)
    if not os.path.isdir(checkpoint):
        raise UserInputError(
            f"checkpoint folder '{checkpoint}' does not exist; pass --checkpoint DIR "
            "(a folder from `protonets train --method siamese`)"
        )
    for path in (args.image1, args.image2):
        if os.path.isdir(path):
            raise UserInputError(f"image '{path}' is a folder; give one image file")
        if not os.path.isfile(path):
            raise UserInputError(f"image '{path}' does not exist")
    check_images([args.image1, args.image2])  # empty, unreadable or not an image: said now
    import torch

    from protonets.siamese import load_siamese

    encoder, head, manifest = load_siamese(checkpoint, device=device)
    result = encoder.embed([args.image1, args.image2], progress=False, num_workers=0)
    emb = result.embeddings
    with torch.inference_mode():
        logit = float(head.pair_logits(emb[0], emb[1]))
    similarity = float(torch.sigmoid(torch.tensor(logit)))
    if args.threshold is not None:
        threshold = args.threshold
    else:
        threshold = float(torch.sigmoid(head.threshold))
    calibration = (manifest.get("head") or {}).get("calibration") or {}
    document = {
        "image1": args.image1,
        "image2": args.image2,
        "similarity": round(similarity, 6),
        "logit": round(logit, 6),
        "threshold": round(threshold, 6),
        "same": similarity >= threshold,
        "target_far": None if args.threshold is not None else calibration.get("target_far"),
        "checkpoint": checkpoint,
    }
    if args.format == "json":
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        verdict = "same" if document["same"] else "different"
        far = f", calibrated for FAR {document['target_far']:g}" if document["target_far"] is not None else ""
        print(f"{verdict}  similarity {similarity:.4f}  (threshold {threshold:.4f}{far})")
    return 0
