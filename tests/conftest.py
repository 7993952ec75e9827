"""Shared fixtures: the real data folder, one default encoder per session, tiny image factories."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PROTONETS_DATA", REPO.parent / "shared" / "data"))
EXAMPLES = REPO / "examples"


def require_data(*parts: str) -> Path:
    """Path under the shared data folder; fails under CI=true if missing, skips (with reason) elsewhere."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        message = f"test data not found: {path} (set PROTONETS_DATA to the shared data folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def default_encoder():
    from protonets.encoders import create_encoder

    return create_encoder()


@pytest.fixture
def make_image(tmp_path):
    """Write a small random image in a given mode and format; returns its path."""

    def make(name: str = "img.png", mode: str = "RGB", size=(40, 30), seed: int = 0, **save_kwargs):
        rng = np.random.default_rng(seed)
        arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGB").convert(mode)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **save_kwargs)
        return path

    return make


def write_class_folder(root: Path, images, classes: int, per_class: int, train: int) -> Path:
    """Save `images` (uint8 `[classes * per_class, 1, H, W]`) as `root/c<k>/<i>.png`, with split
    files `train.txt` (the first `train` classes) and `val.txt` (the others); returns `root`."""
    for c in range(classes):
        (root / f"c{c}").mkdir()
        for i in range(per_class):
            Image.fromarray(images[c * per_class + i, 0].numpy()).save(root / f"c{c}" / f"{i}.png")
    (root / "train.txt").write_text("\n".join(f"c{c}" for c in range(train)))
    (root / "val.txt").write_text("\n".join(f"c{c}" for c in range(train, classes)))
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module (use: `pytestmark = pytest.mark.usefixtures(...)`):
    tiny models and ops run faster without OpenMP spinning on a small shared CPU, and each
    torchrun rank has one thread too."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
