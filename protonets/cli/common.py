"""Options and helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
from typing import Any, TextIO

from protonets.encoders.atomic import sha256_file
from protonets.encoders.defaults import DEFAULT_ENCODER
from protonets.encoders.errors import UserInputError
from protonets.encoders.images import check_images, is_hidden, loose_images_hint, walk_images

log = logging.getLogger("protonets.cli")


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


def check_inputs(
    args: argparse.Namespace, support: list[str], labels: list[str], queries: list[str]
) -> tuple[str, list[str], list[str], list[str]]:
    """Check every input before a model is built or an image embedded: --device, --checkpoint,
    and a header check of every support and query image (an error naming the first bad one; with
    --skip-bad a warning each, and they are left out). Returns (device, support, labels, queries)."""
    device = check_device_and_checkpoint(args)
    skip_bad = getattr(args, "skip_bad", False)
    everything = support + queries
    bad = set(check_images(everything, skip_bad=skip_bad))
    if bad:
        from protonets.encoders.images import check_image

        for i in sorted(bad):
            log.warning("skipped: %s", check_image(everything[i]))
        n = len(support)
        support, labels = (
            [p for i, p in enumerate(support) if i not in bad],
            [label for i, label in enumerate(labels) if i not in bad],
        )
        queries = [q for j, q in enumerate(queries) if n + j not in bad]
    return device, support, labels, queries


def check_device_and_checkpoint(args: argparse.Namespace) -> str:
    """The checked `--device` name; `--checkpoint` checked as a weights file or checkpoint folder."""
    from protonets.encoders.device import resolve_device
    from protonets.encoders.factory import check_checkpoint

    device = resolve_device(args.device)
    check_checkpoint(getattr(args, "checkpoint", None))
    return device


def check_output_paths(paths: dict[str, str | None]) -> None:
    """Output files ({"--output": path, "--plot": path …}) must be writable where they go:
    checked before work."""
    for option, path in paths.items():
        if path is None:
            continue
        if not path.strip():
            raise UserInputError(f"{option} {path!r} is an empty name; give a file name")
        if os.path.isdir(path):
            raise UserInputError(f"output '{path}' is a folder; give a file name")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UserInputError(f"output '{path}': its folder '{folder}' does not exist; create it first")
        if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise UserInputError(f"output '{path}': permission denied; choose a writable place")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (an episode tells classes apart), got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number, 0 or more."""
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got '{text}'") from None


def open_unit_interval(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def class_images(root: str, skip_bad: bool = False) -> tuple[list[str], list[str]]:
    """Image paths and labels under `root`: each visible sub-folder is a class, read recursively.

    Broken symlinks, symlink loops and unreadable folders are an error naming the first one
    (with `skip_bad`: a warning each). A class folder without images is an error.
    """
    paths: list[str] = []
    labels: list[str] = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if is_hidden(name):
            continue
        if not os.path.isdir(folder):
            if os.path.islink(folder):
                _bad([f"'{folder}' is a broken symlink or a symlink loop"], skip_bad)
            continue
        images, problems = walk_images(folder, within=root)  # a link up to root: a loop
        _bad(problems, skip_bad)
        if not images:
            raise UserInputError(f"class folder '{folder}' holds no images; add some or remove it")
        paths += images
        labels += [name] * len(images)
    loose = loose_images_hint(root)
    if loose and paths:  # beside class folders, images directly in root belong to no class
        log.warning("'%s' is not a class: its images are left out%s", root, loose)
    warn_shared_images(paths, labels)
    return paths, labels


def _bad(problems: list[str], skip_bad: bool) -> None:
    """Broken links and the like: an error (one line), or with --skip-bad a warning each."""
    if problems and not skip_bad:
        raise UserInputError(f"{problems[0]}; fix or remove it, or pass --skip-bad to go on without it")
    for problem in problems:
        log.warning("skipped: %s", problem)


def support_folder(root: str, skip_bad: bool = False) -> tuple[list[str], list[str]]:
    """Image paths and class names from a folder with one sub-folder of images per class
    (searched recursively, as query folders are)."""
    if not os.path.isdir(root):
        raise UserInputError(f"support folder '{root}' does not exist or is not a folder")
    paths, labels = class_images(root, skip_bad=skip_bad)
    found = len(set(labels))
    if found < 2:
        raise UserInputError(
            f"support folder '{root}' needs at least 2 class sub-folders of images, found {found}"
            f"{loose_images_hint(root)}"
        )
    return paths, labels


def warn_shared_images(paths: list[str], labels: list[str]) -> None:
    """Warn when one image (the same bytes) is a support example of two classes: a query like
    it cannot be told apart, and the classes' prototypes are pulled together."""
    by_size: dict[int, list[int]] = {}
    for i, path in enumerate(paths):
        try:
            by_size.setdefault(os.path.getsize(path), []).append(i)
        except OSError:  # unreadable files are reported where they are read
            continue
    first: dict[str, int] = {}
    shared = []
    for group in (g for g in by_size.values() if len(g) > 1):
        for i in group:
            try:
                digest = sha256_file(paths[i])
            except OSError:
                continue
            j = first.setdefault(digest, i)
            if j != i and labels[j] != labels[i]:
                shared.append((j, i))
    if shared:
        shown = "; ".join(f"'{paths[j]}' ({labels[j]}) = '{paths[i]}' ({labels[i]})" for j, i in shared[:3])
        more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
        log.warning(
            "%d support image(s) are in two classes: %s%s; remove the copy from the wrong class",
            len(shared),
            shown,
            more,
        )


def query_paths(queries: list[str], skip_bad: bool = False) -> list[str]:
    """Expand query arguments (image files or folders, searched recursively) into image paths."""
    paths: list[str] = []
    for query in queries:
        if os.path.isdir(query):
            found, problems = walk_images(query)
            _bad(problems, skip_bad)
            if not found:
                raise UserInputError(f"query folder '{query}' holds no images")
            paths += found
        elif os.path.isfile(query):
            paths.append(query)
        elif os.path.islink(query):
            raise UserInputError(f"query '{query}' is a broken symlink or a symlink loop; fix or remove it")
        else:
            raise UserInputError(f"query '{query}' does not exist")
    return paths


#: Control characters (C0, DEL, C1) and line/paragraph separators, shown escaped in tables.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: Any) -> str:
    """`text` with control characters escaped (\\n, \\t, \\x1b …) so a table row never breaks."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def write_rows(rows: list[dict[str, Any]], fmt: str, out: TextIO, value: str = "probability") -> None:
    """Per-query results (`query`, `label`, `value`, `top_k`) as a table, JSON or CSV.

    JSON and CSV hold names exactly (CSV: columns top_1, top_1_<value>, top_2, ...); the table
    escapes control characters in them.
    """
    if fmt == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
    elif fmt == "csv":  # a column per ranked class and per value: any name reads back exactly
        writer = csv.writer(out)
        ranks = max((len(r["top_k"]) for r in rows), default=0)
        header = ["query", "label", value]
        for i in range(1, ranks + 1):
            header += [f"top_{i}", f"top_{i}_{value}"]
        writer.writerow(header)
        for r in rows:
            cells = [r["query"], r["label"], f"{r[value]:.4f}"]
            for c, v in r["top_k"]:
                cells += [c, f"{v:.4f}"]
            writer.writerow(cells + [""] * (len(header) - len(cells)))
    else:
        header = "prob" if value == "probability" else value
        shown = [(printable(r["query"]), printable(r["label"])) for r in rows]
        width = max([len("query")] + [len(q) for q, _ in shown])
        lwidth = max([len("label")] + [len(label) for _, label in shown])
        out.write(f"{'query':<{width}}  {'label':<{lwidth}}  {header:>7}  top-k\n")
        out.write(f"{'-' * width}  {'-' * lwidth}  {'-' * 7}  {'-' * 5}\n")
        for r, (query, label) in zip(rows, shown):
            others = ", ".join(f"{printable(c)} {v:.3f}" for c, v in r["top_k"])
            out.write(f"{query:<{width}}  {label:<{lwidth}}  {r[value]:>7.3f}  {others}\n")
