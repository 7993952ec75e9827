"""Embedding sets: a dataset's embeddings saved in a folder a user can take anywhere.

Layout of `DIR` (format 1):
- `embeddings.safetensors`: tensors `embeddings` float32 `[N, D]` and `labels` int64 `[N]`;
- `manifest.json`: kind, format version, the encoder fingerprint, class names, every image's
  path relative to the dataset root in row order (`rotations` beside it where Omniglot rotates),
  the sha256 and size of `embeddings.safetensors`, and a checksum over the manifest itself.

Saving writes the data file, then the manifest, each atomically (temporary file, fsync, rename),
with the user's umask; `save_embedding_set` streams the rows chunk by chunk, so a set larger
than RAM (10M × 512 is 20 GB) is written holding one chunk at a time. Reading verifies the
manifest checksum and the data file's sha256 and shapes, so an edited or half-replaced set is
refused with one line, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .atomic import MANIFEST, manifest_checksum, sha256_file, write_atomically, write_json_atomically
from .atomic import read_manifest as read_bundle_manifest
from .errors import FingerprintMismatchError, UserInputError

KIND = "protonets.EmbeddingSet"
FORMAT_VERSION = 1
DATA_FILE = "embeddings.safetensors"


@dataclass
class EmbeddingSet:
    """Embeddings `[N, D]`, labels `[N]` into `class_names`, source paths, encoder fingerprint."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    paths: list[str]
    fingerprint: dict[str, Any]
    rotations: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.embeddings = torch.as_tensor(self.embeddings).to(torch.float32).contiguous()
        self.labels = torch.as_tensor(self.labels).to(torch.int64).contiguous()
        n = self.embeddings.shape[0]
        if self.embeddings.ndim != 2:
            raise UserInputError(f"embeddings must be [N, D], got shape {tuple(self.embeddings.shape)}")
        check_rows(n, self.labels, self.paths, self.class_names, self.rotations)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `directory/embeddings.safetensors` and `directory/manifest.json` atomically."""
        save_embedding_set(
            directory,
            [self.embeddings],
            self.labels,
            self.dim,
            self.class_names,
            self.paths,
            self.fingerprint,
            self.rotations,
            self.info,
        )

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], fingerprint: dict[str, Any] | None = None
    ) -> EmbeddingSet:
        """Read and verify a saved set; with `fingerprint`, refuse one made by another encoder."""
        manifest, x, y = read_mapped(directory)
        if fingerprint is not None and manifest["fingerprint"] != fingerprint:
            raise FingerprintMismatchError(
                f"'{directory}' was embedded by another encoder "
                f"({manifest['fingerprint'].get('model', manifest['fingerprint'].get('name', '?'))}) "
                "than the one in use; embed it again "
                "with this encoder, or use the encoder it names"
            )
        return cls(
            embeddings=torch.from_numpy(np.array(x)),
            labels=torch.from_numpy(np.array(y)),
            class_names=list(manifest["class_names"]),
            paths=list(manifest["paths"]),
            fingerprint=dict(manifest["fingerprint"]),
            rotations=manifest.get("rotations"),
            info=dict(manifest.get("info", {})),
        )


def check_rows(
    n: int,
    labels: torch.Tensor,
    paths: Sequence[str],
    class_names: Sequence[str],
    rotations: Sequence[int] | None,
) -> None:
    """One label (an index into `class_names`), one path and, if given, one rotation per row."""
    if tuple(labels.shape) != (n,) or len(paths) != n:
        raise UserInputError(
            f"an embedding set needs one label and one path per row: {n} rows, "
            f"{tuple(labels.shape)} labels, {len(paths)} paths"
        )
    if rotations is not None and len(rotations) != n:
        raise UserInputError(f"{len(rotations)} rotations for {n} rows")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
        raise UserInputError(f"labels must index the {len(class_names)} class names")


def save_embedding_set(
    directory: str | os.PathLike[str],
    chunks: Iterable[torch.Tensor],
    labels: torch.Tensor,
    dim: int,
    class_names: Sequence[str],
    paths: Sequence[str],
    fingerprint: dict[str, Any],
    rotations: Sequence[int] | None = None,
    info: dict[str, Any] | None = None,
) -> None:
    """Write an embedding set whose rows come as `chunks` (float32 `[n_i, dim]`, in row order),
    holding one chunk at a time: the data file (sha256 computed while writing), then the
    manifest, each atomically. `labels` `[N]` and `paths` give N."""
    directory = os.fspath(directory)
    labels = torch.as_tensor(labels).to(torch.int64).contiguous()
    n = len(labels)
    check_rows(n, labels, paths, class_names, rotations)
    os.makedirs(directory, exist_ok=True)
    data = os.path.join(directory, DATA_FILE)
    xbytes = n * dim * 4
    header = {
        "embeddings": {"dtype": "F32", "shape": [n, dim], "data_offsets": [0, xbytes]},
        "labels": {"dtype": "I64", "shape": [n], "data_offsets": [xbytes, xbytes + 8 * n]},
    }
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads its header to 8 bytes
    digest = hashlib.sha256()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:

            def put(part: bytes) -> None:
                handle.write(part)
                digest.update(part)

            put(struct.pack("<Q", len(blob)) + blob)
            rows = 0
            for chunk in chunks:
                x = torch.as_tensor(chunk).to(torch.float32).contiguous()
                if x.ndim != 2 or x.shape[1] != dim:
                    raise UserInputError(f"embeddings must be [N, {dim}], got shape {tuple(x.shape)}")
                rows += len(x)
                put(x.numpy().tobytes())
            if rows != n:
                raise UserInputError(f"{rows} embedding rows for {n} labels")
            put(labels.numpy().tobytes())

    write_atomically(data, write)
    manifest: dict[str, Any] = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "count": n,
        "dim": dim,
        "class_names": list(class_names),
        "paths": list(paths),
        "data": {"file": DATA_FILE, "sha256": digest.hexdigest(), "bytes": os.path.getsize(data)},
        "info": info or {},
    }
    if rotations is not None and any(rotations):
        manifest["rotations"] = [int(r) for r in rotations]
    manifest["checksum"] = manifest_checksum(manifest)
    write_json_atomically(os.path.join(directory, MANIFEST), manifest)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified manifest of an embedding set folder (kind, version, checksum, fields)."""
    if not os.path.isfile(os.path.join(os.fspath(directory), MANIFEST)):
        missing = "does not exist" if not os.path.exists(directory) else f"has no {MANIFEST}"
        raise UserInputError(
            f"'{directory}' is not an embedding set (it {missing}); make one with `protonets embed`"
        )
    manifest = read_bundle_manifest(directory, KIND, FORMAT_VERSION, "run `protonets embed` again")
    path = os.path.join(os.fspath(directory), MANIFEST)
    if "checksum" not in manifest:  # every embedding set has one: a missing checksum is an edit
        raise UserInputError(f"'{path}' has no checksum; run `protonets embed` again")
    for key in ("fingerprint", "class_names", "paths", "count", "dim"):
        if key not in manifest:
            raise UserInputError(f"'{path}' has no '{key}'; run `protonets embed` again")
    seen: set[Any] = set()
    for name in manifest["class_names"]:
        if name in seen:
            raise UserInputError(f"'{directory}' names class {name!r} twice; run `protonets embed` again")
        seen.add(name)
    return manifest


def read_mapped(
    directory: str | os.PathLike[str], verify: bool = True
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(verified manifest, embeddings `[N, D]` float32, labels `[N]` int64) of a saved set, the
    arrays read-only memory maps of its safetensors file: nothing is read into RAM (a set of
    10M × 512 is 20 GB). The data file's size is always checked, its sha256 with `verify` (one
    pass over the file); the safetensors header (8-byte length, JSON) must describe the shapes
    the manifest gives. `EmbeddingSet.load` copies the maps; `memory build` streams them."""
    manifest = read_manifest(directory)
    data = os.path.join(os.fspath(directory), DATA_FILE)
    entry = manifest.get("data") or {}
    if not os.path.isfile(data):
        raise UserInputError(f"'{data}' is missing; run `protonets embed` again")
    if os.path.getsize(data) != entry.get("bytes") or (verify and sha256_file(data) != entry.get("sha256")):
        raise UserInputError(
            f"'{data}' is truncated or altered (checksum mismatch); run `protonets embed` again"
        )
    count, dim = manifest["count"], manifest["dim"]
    try:
        with open(data, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        arrays = []
        for key, dtype, shape in (("embeddings", "F32", [count, dim]), ("labels", "I64", [count])):
            start, stop = header[key]["data_offsets"]
            if header[key]["dtype"] != dtype or list(header[key]["shape"]) != shape:
                raise ValueError(key)
            np_dtype = np.dtype("<f4" if dtype == "F32" else "<i8")
            if stop - start != np_dtype.itemsize * int(np.prod(shape)):
                raise ValueError(key)
            if count == 0:  # numpy cannot map zero bytes
                arrays.append(np.zeros(shape, np_dtype))
            else:
                arrays.append(np.memmap(data, np_dtype, "r", 8 + size + start, tuple(shape)))
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        raise UserInputError(
            f"'{data}' does not hold float32 'embeddings' [{count}, {dim}] and int64 'labels' "
            "as its manifest says; run `protonets embed` again"
        ) from None
    return manifest, arrays[0], arrays[1]


def as_numpy(embedding_set: EmbeddingSet) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 `[N, D]`, labels int64 `[N]`) as numpy arrays (no copy)."""
    return embedding_set.embeddings.numpy(), embedding_set.labels.numpy()
