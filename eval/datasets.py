"""Few-shot datasets as (image item, class) lists: image folders, Omniglot (Vinyals), Ravi CSVs.

Also Omniglot by alphabet, with Lake et al.'s within-alphabet one-shot runs as episodes.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protonets.encoders import ImageItem, list_images
from protonets.encoders.errors import UserInputError
from protonets.encoders.images import is_hidden, loose_images_hint
from protonets.episodes import Episodes

SPLITS_DIR = Path(__file__).resolve().parent / "splits"


@dataclass
class FewShotDataset:
    """Images (`items`), integer `labels` into `class_names`, and a description for reports."""

    items: list[ImageItem]
    labels: np.ndarray
    class_names: list[str]
    name: str
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _build(pairs: list[tuple[ImageItem, str]], order: list[str], name: str, info: dict) -> FewShotDataset:
    index = {c: i for i, c in enumerate(order)}
    items = [item for item, _ in pairs]
    labels = np.asarray([index[c] for _, c in pairs], dtype=np.int64)
    return FewShotDataset(items, labels, list(order), name, info)


def read_class_list(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a text file, one a line (blank lines and '#' comments left out)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"split file '{path}' does not exist")
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    if not names:
        raise UserInputError(f"split file '{path}' lists no classes")
    return names


def resolve_split_file(split: str, builtin_prefix: str | None = None) -> Path:
    """A split given as a file path, or a built-in name like 'caltech101/test' (eval/splits/)."""
    if os.path.isfile(split):
        return Path(split)
    candidates = [SPLITS_DIR / f"{split}.txt"]
    if builtin_prefix:
        candidates.append(SPLITS_DIR / builtin_prefix / f"{split}.txt")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    builtin = sorted(str(p.relative_to(SPLITS_DIR).with_suffix("")) for p in SPLITS_DIR.rglob("*.txt"))
    raise UserInputError(
        f"split '{split}' is neither a file nor a built-in split; built-in splits: {', '.join(builtin)}"
    )


def image_folder(root: str | os.PathLike[str], split: str | None = None) -> FewShotDataset:
    """One sub-folder of images per class (Caltech-101 and most user data).

    `split`: a text file of class names (or a built-in split name); None uses every class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserInputError(f"dataset folder '{root}' does not exist")
    present = sorted(d.name for d in root.iterdir() if d.is_dir() and not is_hidden(d.name))
    if not present:
        raise UserInputError(f"dataset folder '{root}' has no class sub-folders{loose_images_hint(root)}")
    if split is None:
        classes = present
    else:
        classes = read_class_list(resolve_split_file(split))
        missing = [c for c in classes if c not in present]
        if missing:
            raise UserInputError(
                f"split '{split}' names {len(missing)} class(es) not in '{root}', e.g. {missing[:3]}"
            )
    pairs = [(ImageItem(path), c) for c in classes for path in list_images(root / c)]
    return _build(pairs, classes, f"folder:{root.name}", {"root": str(root), "split": split})


def omniglot(root: str | os.PathLike[str], split: str = "test") -> FewShotDataset:
    """Omniglot in torchvision's layout with the Vinyals split (`Alphabet/characterNN/rotDDD`).

    Each rotation of a character is its own class; images are rotated counter-clockwise.
    `split`: 'train', 'val', 'test', 'trainval', or a split file of such lines.
    """
    root = Path(root)
    split_file = root / "splits" / "vinyals" / f"{split}.txt"
    if not split_file.is_file():
        split_file = Path(split)
        if not split_file.is_file():
            raise UserInputError(
                f"Omniglot split '{split}' not found: expected {root}/splits/vinyals/{split}.txt "
                "(train, val, test, trainval) or a split file"
            )
    lines = read_class_list(split_file)
    sets = [root / "images_background", root / "images_evaluation"]
    if not any(s.is_dir() for s in sets):
        raise UserInputError(f"'{root}' has neither images_background/ nor images_evaluation/")
    pairs: list[tuple[ImageItem, str]] = []
    folders: dict[str, Path] = {}
    for line in lines:
        character, _, rot = line.rpartition("/")
        if not rot.startswith("rot") or not character:
            raise UserInputError(f"{split_file}: line '{line}' is not 'Alphabet/characterNN/rotDDD'")
        folder = folders.get(character)
        if folder is None:
            found = [s / character for s in sets if (s / character).is_dir()]
            if not found:
                raise UserInputError(f"{split_file}: character folder '{character}' not found under {root}")
            folder = folders[character] = found[0]
        rotation = int(rot[3:])
        pairs += [(ImageItem(str(path), rotation), line) for path in list_images(folder)]
    return _build(pairs, lines, f"omniglot:{split}", {"root": str(root), "split": split})


def csv_split(csv_file: str | os.PathLike[str], image_root: str | os.PathLike[str]) -> FewShotDataset:
    """A Ravi & Larochelle style CSV (`filename,label`) with images under `image_root`."""
    csv_file, image_root = Path(csv_file), Path(image_root)
    if not csv_file.is_file():
        raise UserInputError(f"CSV split '{csv_file}' does not exist")
    with open(csv_file, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["filename", "label"]:
        rows = rows[1:]
    pairs, order = [], []
    for number, row in enumerate(rows, start=2):
        if len(row) < 2:
            raise UserInputError(f"{csv_file}:{number}: expected 'filename,label'")
        path = image_root / row[0]
        if not path.is_file():
            raise UserInputError(
                f"{csv_file}:{number}: image '{path}' not found (is --data the image folder?)"
            )
        if row[1] not in order:
            order.append(row[1])
        pairs.append((ImageItem(str(path)), row[1]))
    return _build(pairs, order, f"csv:{csv_file.stem}", {"csv": str(csv_file), "root": str(image_root)})


def load_dataset(kind: str, root: str | os.PathLike[str], split: str | None = None) -> FewShotDataset:
    """Dispatch on `kind` ('folder', 'omniglot', 'csv'), as the command line does."""
    if kind == "folder":
        return image_folder(root, split)
    if kind == "omniglot":
        return omniglot(root, split or "test")
    if kind == "csv":
        if split is None:
            raise UserInputError("--dataset csv needs --split FILE.csv (the Ravi-format CSV)")
        return csv_split(split, root)
    raise UserInputError(f"unknown dataset kind '{kind}'; use folder, omniglot or csv")


# -- Omniglot by alphabet (Lake et al.'s within-alphabet one-shot task) ---------------------------


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
    names = sorted(d.name for d in folder.iterdir() if d.is_dir() and not is_hidden(d.name))
    if alphabets is not None:
        unknown = [a for a in alphabets if a not in names]
        if unknown:
            raise UserInputError(f"alphabet(s) {unknown} not in '{folder}'")
        names = [a for a in names if a in alphabets]
    items, labels, classes, alpha, drawer = [], [], [], [], []
    for a_index, alphabet in enumerate(names):
        characters = (d.name for d in (folder / alphabet).iterdir() if d.is_dir() and not is_hidden(d.name))
        for character in sorted(characters):
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
