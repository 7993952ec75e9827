"""Siamese-head evaluation: the `siamese` method and Omniglot's within-alphabet protocol.

`siamese`: episodes scored with a trained `SiameseHead` (class score = best pair logit over the
class's supports). The head comes from a Siamese checkpoint folder: the `head` option, or the
environment variable PROTONETS_SIAMESE_HEAD for `protonets eval --method siamese`.

`omniglot_alphabets` and `within_alphabet_episodes` give Lake et al.'s one-shot task: each run
picks an alphabet, 20 of its characters and two drawers; one drawer's images are the supports,
the other's the queries.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from protonets.encoders import ImageItem, list_images
from protonets.encoders.errors import UserInputError

from protonets.siamese import SiameseHead, load_siamese_head

from .datasets import FewShotDataset
from .episodes import Episodes
from .protocol import batched_accuracy, register_method

HEAD_ENV = "PROTONETS_SIAMESE_HEAD"
_HEADS: dict[str, SiameseHead] = {}


def _load_head(head: SiameseHead | str | None) -> SiameseHead:
    if isinstance(head, SiameseHead):
        return head
    path = head or os.environ.get(HEAD_ENV)
    if not path:
        raise UserInputError(
            f"--method siamese needs a trained head: set {HEAD_ENV}=DIR to a Siamese checkpoint "
            "folder (`protonets train --method siamese --output DIR`)"
        )
    if path not in _HEADS:
        _HEADS[path] = load_siamese_head(path)[0]
    return _HEADS[path]


@register_method("siamese")
def siamese(
    embeddings: torch.Tensor,
    episodes: Episodes,
    progress: bool = False,
    head: SiameseHead | str | None = None,
    reduce: str | None = None,
    **_: Any,
) -> np.ndarray:
    """Per-episode accuracies `[E]` of a trained Siamese head (pairs scored in chunks)."""
    model = _load_head(head)
    if model.dim != embeddings.shape[1]:
        raise UserInputError(
            f"the Siamese head takes {model.dim}-d embeddings but the encoder gives "
            f"{embeddings.shape[1]}-d; use the head trained on this encoder's embeddings"
        )
    if reduce is not None:
        model.reduce = reduce
    n, k, q = episodes.ways, episodes.shots, episodes.queries
    width = model.dim * (2 if model.product else 1)
    return batched_accuracy(
        embeddings,
        episodes,
        lambda s, y, qx: model.episode_logits(s, y, qx, n),
        progress,
        episode_bytes=n * n * k * q * width * 4,  # the pair features of every (query, support)
        budget_bytes=64 << 20,
        desc="siamese episodes",
    )


# -- Omniglot by alphabet -------------------------------------------------------------------------


def omniglot_alphabets(
    root: str | os.PathLike[str],
    background: bool = True,
    alphabets: list[str] | None = None,
    rotations: tuple[int, ...] = (0,),
) -> tuple[FewShotDataset, np.ndarray, np.ndarray]:
    """Omniglot characters of one set (images_background or images_evaluation), by alphabet.

    Returns (dataset, alphabet index per image, drawer number per image). Each (character,
    rotation) is a class, named 'Alphabet/characterNN/rotDDD' as in the Vinyals splits.
    """
    folder = Path(root) / ("images_background" if background else "images_evaluation")
    if not folder.is_dir():
        raise UserInputError(f"Omniglot folder '{folder}' does not exist; pass the Omniglot root")
    names = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if alphabets is not None:
        unknown = [a for a in alphabets if a not in names]
        if unknown:
            raise UserInputError(f"alphabet(s) {unknown} not in '{folder}'")
        names = [a for a in names if a in alphabets]
    items, labels, classes, alpha, drawer = [], [], [], [], []
    for a_index, alphabet in enumerate(names):
        for character in sorted(d.name for d in (folder / alphabet).iterdir() if d.is_dir()):
            paths = list_images(folder / alphabet / character)
            for rotation in rotations:
                classes.append(f"{alphabet}/{character}/rot{rotation:03d}")
                for path in paths:
                    match = re.search(r"_(\d+)\.png$", path)
                    items.append(ImageItem(path, rotation))
                    labels.append(len(classes) - 1)
                    alpha.append(a_index)
                    drawer.append(int(match.group(1)) if match else -1)
    dataset = FewShotDataset(
        items,
        np.asarray(labels, dtype=np.int64),
        classes,
        f"omniglot:{folder.name}",
        {"root": str(root), "alphabets": names, "rotations": list(rotations)},
    )
    return dataset, np.asarray(alpha), np.asarray(drawer)


def within_alphabet_episodes(
    labels: np.ndarray, alphabet: np.ndarray, drawer: np.ndarray, runs: int, ways: int = 20, seed: int = 0
) -> Episodes:
    """Lake et al.'s runs as Episodes `[runs, ways, 2]`: alphabet, `ways` characters, two drawers."""
    rng = np.random.default_rng(seed)
    lookup: dict[tuple[int, int], int] = {}
    for i, (c, d) in enumerate(zip(labels.tolist(), drawer.tolist())):
        lookup.setdefault((c, d), i)
    by_alphabet: dict[int, list[int]] = {}
    for c in np.unique(labels):
        by_alphabet.setdefault(int(alphabet[labels == c][0]), []).append(int(c))
    usable = [a for a, cs in by_alphabet.items() if len(cs) >= ways]
    if not usable:
        raise UserInputError(f"no alphabet has {ways} characters; lower the ways")
    drawers = np.unique(drawer[drawer >= 0])
    out = np.empty((runs, ways, 2), dtype=np.int64)
    classes = np.empty((runs, ways), dtype=np.int64)
    r = 0
    while r < runs:
        a = usable[rng.integers(len(usable))]
        chars = rng.choice(by_alphabet[a], ways, replace=False)
        d1, d2 = rng.choice(drawers, 2, replace=False)
        rows = [(lookup.get((c, d1)), lookup.get((c, d2))) for c in chars]
        if any(x is None or y is None for x, y in rows):
            continue  # a missing drawer image: draw the run again
        out[r], classes[r] = rows, chars
        r += 1
    return Episodes(out, classes, ways, 1, 1, seed)
