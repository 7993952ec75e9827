"""Crash-safe files: atomic writes, and bundles of files committed by one manifest rename.

A bundle is a folder with `manifest.json` and data files whose names carry their sha256, e.g.
`head-3fa2….safetensors`. Saving (under an exclusive lock on `.protonets.lock` in the folder)
writes the new data files beside the old ones, then replaces `manifest.json` atomically, then
removes the files the previous manifest of the same kind listed and the new one does not. A crash
at any moment leaves a manifest that names complete, checksummed files: the previous save or the
new one. A folder holding anything else (and no bundle of the same kind) is refused, never
cleaned. The manifest carries a `checksum` over its own canonical JSON, so a hand edit is refused.
Files get the user's umask, as `open()` would create them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import UserInputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock
    fcntl = None

MANIFEST = "manifest.json"
#: The lock file every writer of a bundle holds (exclusive) while it reads, changes and saves it.
LOCK_FILE = ".protonets.lock"
#: Temporary files: this prefix, the writing process id, a random token. Nothing else is cleaned.
TMP_PREFIX = ".protonets-tmp-"
_TMP = re.compile(rf"^{re.escape(TMP_PREFIX)}(\d+)-[0-9a-f]{{16}}")
#: Names of bundle data files: role stem, '-', 16 hex digits of the sha256, extension.
_BUNDLE_FILE = re.compile(r"^[\w.]+-[0-9a-f]{16}(\.\w+)*$")
_held = threading.local()  # bundle locks this thread holds (a save inside an update re-enters)


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


def current_umask() -> int:
    """The process umask (read from /proc where possible: no window with another mask)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_path(folder: str, suffix: str = "") -> str:
    """A new temporary file in `folder`, created with the user's umask; only we use this name."""
    while True:
        path = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}{suffix}")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def _finish(tmp: str) -> None:
    """fsync a written temporary file and give it the umask mode (writers may recreate it)."""
    os.chmod(tmp, 0o666 & ~current_umask())
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())


def write_atomically(path: str | os.PathLike[str], writer: Callable[[str], None]) -> None:
    """Call `writer(tmp_path)`, fsync the result, and rename it over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _tmp_path(folder, "-" + os.path.basename(path)[:64])
    try:
        writer(tmp)
        _finish(tmp)
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


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a manifest without its `checksum` field."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != "checksum"}))
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@contextmanager
def bundle_lock(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive lock of a bundle folder (created if missing); re-entrant per thread.

    Every read-modify-write of a bundle runs inside it and re-reads the bundle once it holds it.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    key = os.path.realpath(directory)
    held: set[str] = _held.__dict__.setdefault("paths", set())
    if key in held:
        yield
        return
    with open(os.path.join(directory, LOCK_FILE), "a+") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


def _previous_files(directory: str, kind: str) -> list[str] | None:
    """Data files the folder's manifest of `kind` lists (None: no manifest there)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            old = json.load(handle)
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("kind"), str):
        raise UserInputError(
            f"'{path}' is not a protonets manifest (unreadable or no kind); save into a new or empty folder"
        )
    if old["kind"] != kind:
        raise UserInputError(
            f"'{directory}' holds a {old['kind']}, not a {kind}; save into a new or empty folder"
        )
    files = old.get("files")
    names = [e.get("file") for e in files.values() if isinstance(e, dict)] if isinstance(files, dict) else []
    return [n for n in names if isinstance(n, str) and _BUNDLE_FILE.match(n)]


def check_bundle_target(directory: str | os.PathLike[str], kind: str) -> None:
    """Refuse (UserInputError) a folder a save of `kind` must not write into.

    Fine: a missing or empty folder, or one holding a bundle of the same kind (its other files
    are left alone). Refused: a file in its place, another kind of bundle, or a folder holding
    anything but our lock and temporary files, named in the one-line message.
    """
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        return
    if not os.path.isdir(directory):
        raise UserInputError(
            f"'{directory}' exists and is not a folder; choose a folder to save the {kind} in"
        )
    if _previous_files(directory, kind) is not None:
        return
    foreign = sorted(n for n in os.listdir(directory) if n != LOCK_FILE and not _TMP.match(n))
    if foreign:
        raise UserInputError(
            f"'{directory}' is not empty and holds no saved {kind} ('{foreign[0]}' is not ours): "
            "save into a new or empty folder, or move its files away"
        )


def _remove_stale_temporaries(directory: str) -> None:
    """Temporary files of our writers that died (their process is gone)."""
    for name in os.listdir(directory):
        match = _TMP.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def save_bundle(
    directory: str | os.PathLike[str],
    manifest: dict[str, Any],
    files: dict[str, Callable[[str], None]],
) -> None:
    """Save data files (role name like 'head.safetensors' -> writer) and a manifest naming them.

    Takes the bundle's lock; refuses a folder that holds anything but a bundle of the same kind
    (`check_bundle_target`); removes only files the previous manifest listed.
    """
    directory = os.fspath(directory)
    kind = str(manifest.get("kind"))
    check_bundle_target(directory, kind)  # before the lock file is created in a user's folder
    with bundle_lock(directory):
        check_bundle_target(directory, kind)
        previous = _previous_files(directory, kind) or []
        _remove_stale_temporaries(directory)
        entries: dict[str, dict[str, Any]] = {}
        for role, writer in files.items():
            stem, ext = os.path.splitext(role)
            tmp = _tmp_path(directory, ext)
            try:
                writer(tmp)
                _finish(tmp)
                digest = sha256_file(tmp)
                name = f"{stem}-{digest[:16]}{ext}"
                entries[role] = {"file": name, "sha256": digest, "bytes": os.path.getsize(tmp)}
                os.replace(tmp, os.path.join(directory, name))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        fsync_dir(directory)
        body = {k: v for k, v in manifest.items() if k != "checksum"}
        body["files"] = entries
        body["checksum"] = manifest_checksum(body)
        write_json_atomically(os.path.join(directory, MANIFEST), body)
        keep = {e["file"] for e in entries.values()}
        for name in previous:
            if name not in keep and os.path.isfile(os.path.join(directory, name)):
                os.unlink(os.path.join(directory, name))


def read_manifest(
    directory: str | os.PathLike[str], kind: str, max_version: int, remedy: str = "save again"
) -> dict[str, Any]:
    """A folder's verified `manifest.json`: present, JSON, of `kind`, a format version this
    library reads, and matching its own checksum (manifests from before checksums existed have
    none and are read as they are). Otherwise one UserInputError naming the folder; `remedy`
    ends the messages about a damaged manifest ("save again", "run `protonets embed` again" …)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise UserInputError(f"'{directory}' is not a saved {kind}: it has no {MANIFEST}")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"'{path}' is damaged and cannot be read as JSON ({exc}); {remedy}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        found = manifest.get("kind") if isinstance(manifest, dict) else None
        what = (
            f"'{found}'"
            if isinstance(found, str) and found
            else "something else (its manifest names no kind)"
        )
        raise UserInputError(f"'{directory}' holds {what}, not a {kind}; give the folder of a {kind}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise UserInputError(
            f"'{directory}' has format version {version}, newer than this protonets reads "
            f"({max_version}); upgrade protonets to load it"
        )
    if "checksum" in manifest and manifest["checksum"] != manifest_checksum(manifest):
        raise UserInputError(
            f"'{path}' was edited or damaged: its checksum does not match its contents "
            f"(class names, metric, shapes, parameters…); restore it, or {remedy}"
        )
    return manifest


def load_bundle(
    directory: str | os.PathLike[str], kind: str, max_version: int
) -> tuple[dict[str, Any], dict[str, str]]:
    """Read and verify a bundle: (manifest, role -> checked file path).

    Refuses, with a UserInputError naming the folder, what `read_manifest` refuses, and a data
    file that is missing or altered.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    manifest = read_manifest(
        directory,
        kind,
        max_version,
        "save again from the library (rename classes with `protonets memory rename`)",
    )
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise UserInputError(f"'{path}': 'files' is not a table of data files; save again")
    paths: dict[str, str] = {}
    for role, entry in files.items():
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _BUNDLE_FILE.match(name):
            raise UserInputError(f"'{path}': the entry for {role!r} names no data file of ours; save again")
        file_path = os.path.join(directory, name)
        if not os.path.isfile(file_path):
            raise UserInputError(f"'{file_path}' named by the manifest is missing")
        if os.path.getsize(file_path) != entry.get("bytes") or sha256_file(file_path) != entry.get("sha256"):
            raise UserInputError(
                f"'{file_path}' is truncated or altered (checksum mismatch); restore it or save again"
            )
        paths[role] = file_path
    return manifest, paths
