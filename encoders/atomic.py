"""Crash-safe files: atomic writes, and bundles of files committed by one manifest rename.

A bundle is a folder with `manifest.json` and data files whose names carry their sha256, e.g.
`head-3fa2….safetensors`. Saving writes the new data files beside the old ones, then replaces
`manifest.json` atomically, then removes files no manifest names. A crash at any moment leaves
a manifest that names complete, checksummed files: the previous save or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

from .errors import UserInputError

MANIFEST = "manifest.json"
#: Names of bundle data files: role stem, '-', 16 hex digits of the sha256, extension.
_BUNDLE_FILE = re.compile(r"^[\w.]+-[0-9a-f]{16}(\.\w+)*$")


def fsync_dir(path: str) -> None:
    """Flush a directory entry to disk (no-op where the platform cannot)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike[str], writer: Callable[[str], None]) -> None:
    """Call `writer(tmp_path)`, fsync the result, and rename it over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Write bytes to `path` atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    write_atomically(path, _write)


def write_json_atomically(path: str | os.PathLike[str], obj: Any) -> None:
    """Write an object as indented JSON to `path` atomically."""
    write_bytes_atomically(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_bundle(
    directory: str | os.PathLike[str],
    manifest: dict[str, Any],
    files: dict[str, Callable[[str], None]],
) -> None:
    """Save data files (role name like 'head.safetensors' -> writer) and a manifest naming them."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    for role, writer in files.items():
        stem, ext = os.path.splitext(role)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ext, dir=directory)
        os.close(fd)
        try:
            writer(tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            digest = sha256_file(tmp)
            name = f"{stem}-{digest[:16]}{ext}"
            entries[role] = {"file": name, "sha256": digest, "bytes": os.path.getsize(tmp)}
            os.replace(tmp, os.path.join(directory, name))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    fsync_dir(directory)
    write_json_atomically(os.path.join(directory, MANIFEST), {**manifest, "files": entries})
    keep = {MANIFEST} | {e["file"] for e in entries.values()}
    for name in os.listdir(directory):  # data files of earlier saves, and leftovers of crashed ones
        if name not in keep and (_BUNDLE_FILE.match(name) or name.startswith(".tmp-")):
            os.unlink(os.path.join(directory, name))


def load_bundle(
    directory: str | os.PathLike[str], kind: str, max_version: int
) -> tuple[dict[str, Any], dict[str, str]]:
    """Read and verify a bundle: (manifest, role -> checked file path).

    Refuses, with a UserInputError naming the folder, a missing or unreadable manifest, another
    kind of bundle, a newer format version, and a data file that is missing or altered.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise UserInputError(f"'{directory}' is not a saved {kind}: it has no {MANIFEST}")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"'{path}' is damaged and cannot be read as JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        found = manifest.get("kind") if isinstance(manifest, dict) else None
        raise UserInputError(f"'{directory}' holds a {found or 'unknown object'}, not a {kind}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise UserInputError(
            f"'{directory}' has format version {version}, newer than this protonets reads "
            f"({max_version}); upgrade protonets to load it"
        )
    paths: dict[str, str] = {}
    for role, entry in manifest.get("files", {}).items():
        file_path = os.path.join(directory, entry["file"])
        if not os.path.isfile(file_path):
            raise UserInputError(f"'{file_path}' named by the manifest is missing")
        if os.path.getsize(file_path) != entry["bytes"] or sha256_file(file_path) != entry["sha256"]:
            raise UserInputError(
                f"'{file_path}' is truncated or altered (checksum mismatch); restore it or save again"
            )
        paths[role] = file_path
    return manifest, paths
