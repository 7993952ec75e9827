import json
import os
import shutil

import pytest
import torch
from torch import nn

from protonets.encoders import Encoder
from protonets.encoders.cache import EmbeddingCache
from tests.conftest import EXAMPLES

PRE = {
    "input_size": [3, 16, 16],
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "interpolation": "bilinear",
    "crop_pct": 1.0,
}


class CountingNet(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3)
        self.images_seen = 0

    def forward(self, x):
        self.images_seen += x.shape[0]
        return self.conv(x).mean((2, 3))


def _encoder(seed=0):
    return Encoder(CountingNet(seed), "counting-net", PRE, channels_last=False)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(EXAMPLES / "support" / "lotus", folder)
    return sorted(folder.glob("*.jpg"))


def test_second_pass_costs_no_forward(tmp_path, images):
    enc = _encoder()
    first = EmbeddingCache(enc, tmp_path / "cache").embed(images, num_workers=0, progress=False)
    seen = enc.model.images_seen
    assert seen == len(images)
    cache = EmbeddingCache(enc, tmp_path / "cache")
    second = cache.embed(images, num_workers=0, progress=False)
    assert enc.model.images_seen == seen and cache.hits == len(images) and cache.misses == 0
    torch.testing.assert_close(first, second)
    direct = enc.embed(images, num_workers=0, progress=False).embeddings
    torch.testing.assert_close(first, direct)


def test_changed_file_is_embedded_again(tmp_path, images):
    enc = _encoder()
    EmbeddingCache(enc, tmp_path / "cache").embed(images, num_workers=0, progress=False)
    shutil.copy(EXAMPLES / "support" / "menorah" / "image_0001.jpg", images[0])
    os.utime(images[0], ns=(1, 1))
    cache = EmbeddingCache(enc, tmp_path / "cache")
    out = cache.embed(images, num_workers=0, progress=False)
    assert cache.misses == 1
    torch.testing.assert_close(out[0], enc.embed(images[:1], num_workers=0, progress=False).embeddings[0])


def test_a_file_rewritten_with_its_old_size_and_mtime_put_back_is_embedded_again(tmp_path, images):
    """As `cp -p` or unpacking an archive leaves it: other bytes, the same size and mtime."""
    enc = _encoder()
    EmbeddingCache(enc, tmp_path / "cache").embed(images, num_workers=0, progress=False)
    other = min(images[1:], key=lambda p: p.stat().st_size)
    stat = images[0].stat()
    padding = stat.st_size - other.stat().st_size  # bytes after a JPEG's end are not read
    images[0].write_bytes(other.read_bytes() + b"\0" * padding)
    os.utime(images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (images[0].stat().st_size, images[0].stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    cache = EmbeddingCache(enc, tmp_path / "cache")
    out = cache.embed(images, num_workers=0, progress=False)
    assert cache.misses == 1
    torch.testing.assert_close(out[0], out[images.index(other)])


def test_other_encoder_gets_its_own_entries(tmp_path, images):
    a, b = _encoder(0), _encoder(1)
    ea = EmbeddingCache(a, tmp_path / "cache").embed(images, num_workers=0, progress=False)
    cache_b = EmbeddingCache(b, tmp_path / "cache")
    eb = cache_b.embed(images, num_workers=0, progress=False)
    assert cache_b.misses == len(images) and not torch.allclose(ea, eb)


def test_damaged_cache_is_detected_and_rebuilt(tmp_path, images, caplog):
    enc = _encoder()
    first = EmbeddingCache(enc, tmp_path / "cache").embed(images, num_workers=0, progress=False)
    folder = tmp_path / "cache" / enc.fingerprint_id
    manifest = json.loads((folder / "manifest.json").read_text())
    data = folder / manifest["files"]["embeddings.npy"]["file"]
    blob = bytearray(data.read_bytes())
    blob[-3] ^= 0x55  # flip bits inside the last embedding
    data.write_bytes(bytes(blob))
    cache = EmbeddingCache(enc, tmp_path / "cache")
    assert "damaged" in caplog.text and len(cache) == 0
    again = cache.embed(images, num_workers=0, progress=False)
    assert cache.misses == len(images)
    torch.testing.assert_close(again, first)

    (folder / "manifest.json").write_text("{not json")
    cache = EmbeddingCache(enc, tmp_path / "cache")
    assert len(cache) == 0


def test_rotated_items_are_distinct_entries(tmp_path, images):
    from protonets.encoders import ImageItem

    enc = _encoder()
    items = [ImageItem(str(images[0]), 0), ImageItem(str(images[0]), 90)]
    cache = EmbeddingCache(enc, tmp_path / "cache")
    out = cache.embed(items, num_workers=0, progress=False)
    assert cache.misses == 2 and not torch.allclose(out[0], out[1])


def test_two_writers_keep_each_others_rows(tmp_path, images):
    """Two caches opened before either writes (two processes, say) both end up in the file."""
    enc = _encoder()
    first, second = EmbeddingCache(enc, tmp_path / "cache"), EmbeddingCache(enc, tmp_path / "cache")
    a = first.embed(images[:2], num_workers=0, progress=False)
    b = second.embed(images[2:], num_workers=0, progress=False)
    fresh = EmbeddingCache(enc, tmp_path / "cache")
    assert len(fresh) == len(images)
    out = fresh.embed(images, num_workers=0, progress=False)
    assert fresh.misses == 0
    torch.testing.assert_close(out, torch.cat([a, b]))
