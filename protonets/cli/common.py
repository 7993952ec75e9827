"""Options and helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import csv
import json
import os
from typing import Any, TextIO

import torch

from protonets.encoders import DEFAULT_ENCODER, Encoder, create_encoder, list_images
from protonets.encoders.errors import UserInputError


def add_encoder_options(parser: argparse.ArgumentParser) -> None:
    """--encoder, --checkpoint, --device, --batch-size, --workers, --quiet."""
    group = parser.add_argument_group("encoder")
    group.add_argument(
        "--encoder", default=DEFAULT_ENCODER, help="timm model name (default: %(default)s, offline)"
    )
    group.add_argument(
        "--checkpoint",
        default=None,
        help="a trained checkpoint folder (protonets train --output DIR: model, weights and "
        "preprocessing), or a weights file for --encoder (safetensors or state dict)",
    )
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    group.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    group.add_argument("--workers", type=non_negative_int, default=2, help="image decoding processes")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or warnings")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def resolve_device(name: str) -> str:
    """'auto' picks CUDA when available; a CUDA device that is not there is a clear error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"--device {name}: no CUDA device is available here; use --device cpu")
    try:
        torch.device(name)
    except RuntimeError:
        raise UserInputError(f"--device '{name}' is not a device name (cpu, cuda, cuda:0, auto)") from None
    return name


def support_folder(root: str) -> tuple[list[str], list[str]]:
    """Image paths and class names from a folder with one sub-folder of images per class."""
    if not os.path.isdir(root):
        raise UserInputError(f"support folder '{root}' does not exist or is not a folder")
    classes = sorted(
        d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
    )
    paths: list[str] = []
    labels: list[str] = []
    for name in classes:
        images = list_images(os.path.join(root, name))
        if not images:
            raise UserInputError(
                f"class folder '{os.path.join(root, name)}' holds no images; add some or remove it"
            )
        paths += images
        labels += [name] * len(images)
    if len(classes) < 2:
        raise UserInputError(
            f"support folder '{root}' needs at least 2 class sub-folders of images, found {len(classes)}"
        )
    return paths, labels


def query_paths(queries: list[str]) -> list[str]:
    """Expand query arguments (image files or folders, searched recursively) into image paths."""
    paths: list[str] = []
    for query in queries:
        if os.path.isdir(query):
            found = []
            for folder, dirs, _files in os.walk(query):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += list_images(folder)
            if not found:
                raise UserInputError(f"query folder '{query}' holds no images")
            paths += found
        elif os.path.isfile(query):
            paths.append(query)
        else:
            raise UserInputError(f"query '{query}' does not exist")
    return paths


def write_rows(rows: list[dict[str, Any]], fmt: str, out: TextIO, value: str = "probability") -> None:
    """Per-query results (`query`, `label`, `value`, `top_k`) as a table, JSON or CSV."""
    if fmt == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(["query", "label", value, "top_k"])
        for r in rows:
            top = ";".join(f"{c}:{v:.4f}" for c, v in r["top_k"])
            writer.writerow([r["query"], r["label"], f"{r[value]:.4f}", top])
    else:
        header = "prob" if value == "probability" else value
        width = max([len("query")] + [len(r["query"]) for r in rows])
        lwidth = max([len("label")] + [len(r["label"]) for r in rows])
        out.write(f"{'query':<{width}}  {'label':<{lwidth}}  {header:>7}  top-k\n")
        out.write(f"{'-' * width}  {'-' * lwidth}  {'-' * 7}  {'-' * 5}\n")
        for r in rows:
            others = ", ".join(f"{c} {v:.3f}" for c, v in r["top_k"])
            out.write(f"{r['query']:<{width}}  {r['label']:<{lwidth}}  {r[value]:>7.3f}  {others}\n")


def with_image_size(encoder: Encoder, image_size: int | None, resuming: bool = False) -> Encoder:
    """`encoder` with its input side set to `--image-size` (None: unchanged).

    A resumed run keeps the size it was trained at; asking for another one is an error.
    """
    current = int(encoder.preprocessing["input_size"][-1])
    if not image_size or image_size == current:
        return encoder
    if resuming:
        raise UserInputError(
            f"cannot change --image-size when resuming: the run was trained at {current} px; "
            "leave --image-size out or start a new run"
        )
    channels = encoder.preprocessing["input_size"][0]
    pre = {**encoder.preprocessing, "input_size": [channels, image_size, image_size]}
    return Encoder(
        encoder.model, encoder.name, pre, device=encoder.device, channels_last=encoder.channels_last
    )


def frozen_embeddings(
    args: argparse.Namespace, split: str | None, val_split: str | None, device: str
) -> tuple[Encoder, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """What a `--freeze-encoder` head trains on: (pretrained encoder, embeddings, labels, dataset info).

    The encoder is `--encoder` (default: the offline default), pretrained and resized by
    `--image-size`; embeddings and labels are keyed 'train' (and 'val' with a validation split)
    and come through the embedding cache (`--cache-dir`).
    """
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
