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
