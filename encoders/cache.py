"""On-disk embedding cache: each image is embedded once per encoder fingerprint.

Layout: `ROOT/<fingerprint id>/` is a bundle (see `atomic.py`): `embeddings-<sha>.npy` (float32
`[rows, D]`, memory-mapped on read), `rows-<sha>.json` with, per image key, its row and file
signature (size, mtime, ctime, inode), and `manifest.json` with the fingerprint (format 1 kept
the rows in the manifest; it is still read). Keeping the rows out of the manifest makes its
checksum cheap to verify. A changed file (any part of its signature) is embedded again; a
damaged cache (checksum mismatch, unreadable manifest) is reported, removed and rebuilt, never
used. Processes sharing a cache add rows under an exclusive lock (`ROOT/<fingerprint id>.lock`),
each on top of what the others saved, so concurrent runs never drop each other's embeddings.
`ROOT/fingerprints/<key>.json` remembers an encoder's fingerprint and width by the weights
files' path and signature (plus model name, options and library versions), so a run whose images
are all cached builds no model at all (`create_encoder(lazy=True)`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import load_bundle, save_bundle, write_json_atomically
from .encoder import Encoder
from .errors import UserInputError
from .images import ImageItem, as_item, check_images, file_signature

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock
    fcntl = None

log = logging.getLogger(__name__)

KIND = "protonets.EmbeddingCache"
FORMAT_VERSION = 2


def default_cache_dir() -> Path:
    """$PROTONETS_CACHE, else $XDG_CACHE_HOME/protonets/embeddings, else ~/.cache/protonets/embeddings."""
    if os.environ.get("PROTONETS_CACHE"):
        return Path(os.environ["PROTONETS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "protonets" / "embeddings"


FINGERPRINTS = "fingerprints"


def _fingerprint_path(root: str | os.PathLike[str] | None, key: dict[str, Any]) -> Path:
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str).encode()
    base = Path(root) if root is not None else default_cache_dir()
    return base / FINGERPRINTS / f"{hashlib.sha256(blob).hexdigest()[:32]}.json"


def known_fingerprint(
    key: dict[str, Any], root: str | os.PathLike[str] | None = None
) -> dict[str, Any] | None:
    """The remembered {"fingerprint", "dim"} for `key` (see `remember_fingerprint`), or None."""
    path = _fingerprint_path(root, key)
    try:
        with open(path, encoding="utf-8") as handle:
            entry = json.load(handle)
        if entry["key"] == json.loads(json.dumps(key, default=str)):
            return {"fingerprint": dict(entry["fingerprint"]), "dim": int(entry["dim"])}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: the model is built and the entry written again
    return None


def remember_fingerprint(
    key: dict[str, Any], fingerprint: dict[str, Any], dim: int, root: str | os.PathLike[str] | None = None
) -> None:
    """Remember an encoder's fingerprint and width under `key` (weights files' path and signature …)."""
    path = _fingerprint_path(root, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, {"key": key, "fingerprint": fingerprint, "dim": int(dim)})
    except OSError as exc:  # a read-only cache only costs speed
        log.debug("cannot remember the encoder fingerprint in %s (%s)", path, exc)


def forget_fingerprint(key: dict[str, Any], root: str | os.PathLike[str] | None = None) -> None:
    try:
        os.unlink(_fingerprint_path(root, key))
    except OSError:
        pass


def _stat_key(item: ImageItem, seen: dict[str, tuple[str, list[int]]] | None = None) -> tuple[str, list[int]]:
    """(cache key, `file_signature`) of an image; `seen` memoises per path (rotations share a file)."""
    known = seen.get(item.path) if seen is not None else None
    if known is None:
        path = os.path.abspath(item.path)
        known = (path, file_signature(os.stat(path)))
        if seen is not None:
            seen[item.path] = known
    path, stat = known
    return (path if item.rotation == 0 else f"{path}#rot{item.rotation:03d}"), stat


class EmbeddingCache:
    """Embeddings of image files for one encoder, kept on disk between runs."""

    def __init__(self, encoder: Encoder, root: str | os.PathLike[str] | None = None) -> None:
        self.encoder = encoder
        self.root = Path(root) if root is not None else default_cache_dir()
        self.directory = self.root / encoder.fingerprint_id
        self.hits = 0
        self.misses = 0
        self._rows: dict[str, list[int]] = {}  # key -> [row, *file_signature]
        self._array: np.ndarray | None = None
        self._load()

    def _load(self) -> None:
        if not (self.directory / "manifest.json").exists():
            return
        try:
            manifest, files = load_bundle(self.directory, KIND, FORMAT_VERSION)
            if manifest.get("fingerprint") != self.encoder.fingerprint:
                raise UserInputError("its fingerprint does not match the encoder")
            array = np.load(files["embeddings.npy"], mmap_mode="r", allow_pickle=False)
            if array.ndim != 2 or array.dtype != np.float32 or array.shape[0] != manifest["count"]:
                raise UserInputError(f"its array has shape {array.shape}, dtype {array.dtype}")
            if "rows.json" in files:
                with open(files["rows.json"], encoding="utf-8") as handle:
                    rows = json.load(handle)
            else:  # format 1: the rows sat in the manifest
                rows = manifest["rows"]
            if not isinstance(rows, dict) or any(not 0 <= v[0] < array.shape[0] for v in rows.values()):
                raise UserInputError("its row table does not fit its array")
            self._rows = rows
            self._array = array
        except (UserInputError, KeyError, TypeError, ValueError) as exc:
            log.warning("embedding cache %s is damaged (%s); rebuilding it", self.directory, exc)
            shutil.rmtree(self.directory, ignore_errors=True)
            self._rows, self._array = {}, None

    def __len__(self) -> int:
        return len(self._rows)

    def _save(self, array: np.ndarray) -> None:
        manifest = {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.encoder.fingerprint,
            "count": int(array.shape[0]),
        }

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)

        def write_rows(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(self._rows, handle, separators=(",", ":"))

        save_bundle(self.directory, manifest, {"embeddings.npy": write, "rows.json": write_rows})
        self._array = np.load(
            load_bundle(self.directory, KIND, FORMAT_VERSION)[1]["embeddings.npy"], mmap_mode="r"
        )

    def _append(self, entries: list[tuple[str, list[int]]], embeddings: np.ndarray) -> None:
        """Add rows under an exclusive file lock, on top of what other processes saved meanwhile."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{self.directory.name}.lock", "a+") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            self._load()
            old = self._array if self._array is not None else np.empty((0, embeddings.shape[1]), np.float32)
            array = np.concatenate([np.asarray(old), embeddings])
            for offset, (key, stat) in enumerate(entries):
                self._rows[key] = [old.shape[0] + offset, *stat]
            self._save(array)

    def embed(self, images: Sequence[Any], chunk_size: int = 4096, **embed_kwargs: Any) -> torch.Tensor:
        """Embeddings `[N, D]` of image files, computing only those not cached (saved every chunk).

        Keyword arguments go to `Encoder.embed` (batch_size, num_workers, progress). Unreadable
        images raise ImageLoadError: a cache of a dataset needs every image.
        """
        items = [as_item(x) for x in images]
        keys = []
        seen: dict[str, tuple[str, list[int]]] = {}
        for item in items:
            try:
                keys.append(_stat_key(item, seen))
            except OSError:
                raise UserInputError(f"{item.path}: no such image file") from None
        todo: list[int] = []
        seen: set[str] = set()
        for i, (key, stat) in enumerate(keys):
            stale = key not in self._rows or self._rows[key][1:] != stat
            if stale and key not in seen:
                seen.add(key)
                todo.append(i)
        self.misses += len(todo)
        self.hits += len(items) - len(todo)
        if not embed_kwargs.get("skip_bad"):  # a bad image is reported before any embedding
            check_images([items[i] for i in todo])
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            desc = f"embedding {start + len(chunk)}/{len(todo)} new images"
            result = self.encoder.embed([items[i] for i in chunk], desc=desc, **embed_kwargs)
            self._append([keys[i] for i in chunk], result.embeddings.numpy().astype(np.float32))
        rows = np.fromiter((self._rows[k][0] for k, _ in keys), dtype=np.int64, count=len(keys))
        if self._array is None:
            return torch.empty(0, self.encoder.dim)
        return torch.from_numpy(np.ascontiguousarray(self._array[rows]))
