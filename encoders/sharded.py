"""Embed a whole dataset into an embedding set folder, in resumable chunks, in one process or many.

The image list is cut into fixed chunks of `chunk_rows` rows (a grid over the whole list, so the
same chunks serve any number of ranks). Rank 0 finds the chunks that are missing (chunk headers
and the images' `stat` only) and tells every rank; under `torchrun` each rank then takes a
contiguous block of the MISSING chunks (`World.share`), so a resumed run keeps every rank busy;
alone, one process takes them all. Each finished chunk is written atomically as
`DIR/.shards/chunk-<key>-<start>-<stop>.safetensors` (the embeddings, the rows kept, the images
skipped and a digest of its image files' signatures: size, mtime, ctime, inode), where `<key>` names the
encoder fingerprint and the dataset's image list. A run that was killed and started again (with
any number of ranks) embeds only the chunks that are missing, or whose image files changed
since. Rank 0 then assembles `DIR` (see `embedding_set.py`) in row order, exactly as a
single process would, and removes the chunk files of this run and nothing else.

Every input is checked on every rank before any image is embedded, inside `all_ranks_agree`, so
bad input on one rank stops all ranks with that rank's one-line error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .atomic import LOCK_FILE, MANIFEST, TMP_PREFIX, write_atomically, write_json_atomically
from .distributed import World, all_gather, all_ranks_agree, barrier, broadcast
from .embedding_set import DATA_FILE, KIND, save_embedding_set
from .encoder import Encoder
from .errors import UserInputError
from .images import ImageItem, check_images, file_signature
from .progress import progress_bar

log = logging.getLogger(__name__)

#: Rows per resumable chunk (a grid over the whole image list, the same for any number of ranks).
CHUNK_ROWS = 2048
SHARDS = ".shards"
_CHUNK = re.compile(r"^chunk-([0-9a-f]{16})-(\d{12})-(\d{12})\.safetensors$")
_RUN = re.compile(r"^run-([0-9a-f]{16})\.json$")
#: Test hook: "RANK:N" makes rank RANK exit abruptly (as if killed) after writing N chunks.
KILL_HOOK = "PROTONETS_TEST_KILL_AFTER_CHUNKS"


@dataclass
class EmbedSource:
    """What to embed: image items, integer labels into `class_names`, the dataset root that the
    saved paths are relative to, the encoder, and a description kept in the manifest."""

    items: list[ImageItem]
    labels: Sequence[int]
    class_names: list[str]
    root: str
    encoder: Encoder
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EmbedSummary:
    """What a run did: rows written, width, chunks in all and reused, skipped image paths."""

    output: str
    rows: int
    dim: int
    images: int
    chunks: int
    reused: int
    skipped: list[str]


def relative_paths(source: EmbedSource) -> list[str]:
    """Every item's path relative to the dataset root, in row order."""
    root = os.path.abspath(source.root)
    return [os.path.relpath(os.path.abspath(item.path), root) for item in source.items]


def source_signature(source: EmbedSource, paths: list[str] | None = None) -> str:
    """sha256 over the class names and every (relative path, rotation, label), in order."""
    digest = hashlib.sha256(json.dumps(list(source.class_names)).encode())
    paths = relative_paths(source) if paths is None else paths
    for path, item, label in zip(paths, source.items, source.labels):
        digest.update(f"\n{path}\t{item.rotation}\t{int(label)}".encode())
    return digest.hexdigest()


def run_key(fingerprint: dict[str, Any], signature: str) -> str:
    """16 hex digits naming one (encoder fingerprint, image list): the chunks' and runs' key."""
    blob = json.dumps({"fingerprint": fingerprint, "signature": signature}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def chunk_ranges(n: int, chunk_rows: int = CHUNK_ROWS) -> list[range]:
    """The chunk grid over `range(n)`."""
    return [range(start, min(start + chunk_rows, n)) for start in range(0, n, chunk_rows)]


def chunk_name(key: str, rows: range) -> str:
    return f"chunk-{key}-{rows.start:012d}-{rows.stop:012d}.safetensors"


def _shard_files(shards: str) -> list[tuple[str, str]]:
    """(name, key) of our chunk and run files in the shard folder."""
    if not os.path.isdir(shards):
        return []
    found = []
    for name in sorted(os.listdir(shards)):
        match = _CHUNK.match(name) or _RUN.match(name)
        if match:
            found.append((name, match.group(1)))
    return found


def _describe(manifest: dict[str, Any]) -> str:
    info = manifest.get("info") if isinstance(manifest.get("info"), dict) else {}
    model = (
        manifest.get("fingerprint", {}).get("model", "?")
        if isinstance(manifest.get("fingerprint"), dict)
        else "?"
    )
    return f"{manifest.get('count', '?')} images of {info.get('dataset', 'a dataset')} by {model}"


def check_output(output: str, key: str, fingerprint: dict[str, Any], signature: str, force: bool) -> None:
    """Refuse an --output folder this run must not write into (nothing is changed here).

    Fine: a new folder (its parent exists), an empty one, or one holding an embedding set or an
    unfinished run of the same dataset and encoder; with `force`, also a set or unfinished run of
    another dataset or encoder (replaced). Refused: a file, an unwritable folder, another kind of
    protonets folder, or a folder holding other files and no embedding set.
    """
    if not os.path.exists(output):
        parent = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(parent):
            raise UserInputError(
                f"--output '{output}': its folder '{parent}' does not exist; create it first"
            )
        if not os.access(parent, os.W_OK):
            raise UserInputError(
                f"--output '{output}': permission denied in '{parent}'; choose a writable place"
            )
        return
    if not os.path.isdir(output):
        raise UserInputError(
            f"--output '{output}' exists and is not a folder; choose a folder for the embedding set"
        )
    if not os.access(output, os.W_OK | os.X_OK):
        raise UserInputError(f"--output '{output}': permission denied; choose a writable folder")
    names = os.listdir(output)
    manifest_path = os.path.join(output, MANIFEST)
    if MANIFEST in names:
        try:
            with open(manifest_path, encoding="utf-8") as handle:
                manifest = json.load(handle)
        except (OSError, ValueError):
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
            found = manifest.get("kind") if isinstance(manifest, dict) else None
            what = f"a '{found}'" if isinstance(found, str) and found else f"a {MANIFEST} of something else"
            raise UserInputError(
                f"--output '{output}' holds {what}, not an embedding set; choose another --output"
            )
        info = manifest.get("info") if isinstance(manifest.get("info"), dict) else {}
        same = manifest.get("fingerprint") == fingerprint and info.get("signature") == signature
        if not same and not force:
            raise UserInputError(
                f"--output '{output}' holds embeddings of another dataset or encoder "
                f"({_describe(manifest)}); pass --force to replace them, or choose another --output"
            )
    else:
        ours = {DATA_FILE, SHARDS, LOCK_FILE}
        foreign = sorted(n for n in names if n not in ours and not n.startswith(TMP_PREFIX))
        if foreign:
            raise UserInputError(
                f"--output '{output}' is not empty and holds no embedding set ('{foreign[0]}' is not "
                "ours); choose a new or empty folder"
            )
    shards = os.path.join(output, SHARDS)
    others = [name for name, k in _shard_files(shards) if k != key]
    if others and not force:
        raise UserInputError(
            f"--output '{output}' holds an unfinished embedding of another dataset or encoder "
            f"('{SHARDS}/{others[0]}'); pass --force to replace it, or choose another --output"
        )


def files_digest(items: Sequence[ImageItem]) -> str:
    """16 hex digits over each image file's `file_signature`: a chunk embedded from files that
    were replaced since (an image edited or copied over between a stop and a restart) is not
    reused. `stat` alone, no file is read; a file that is gone counts as changed."""
    digest = hashlib.sha256()
    for item in items:
        try:
            digest.update(f"{file_signature(os.stat(item.path))}\n".encode())
        except OSError:
            digest.update(b"gone\n")
    return digest.hexdigest()[:16]


def _missing_chunks(
    source: EmbedSource, ranges: list[range], names: dict[int, str], key: str, dim: int, skip_bad: bool
) -> list[tuple[int, str]]:
    """(index, files digest) of every chunk that must be embedded (again), in row order."""
    missing = []
    for index, rows in enumerate(ranges):
        files = files_digest(source.items[rows.start : rows.stop])
        if not _chunk_is_reusable(names[rows.start], key, rows, dim, skip_bad, files):
            missing.append((index, files))
    return missing


def _chunk_is_reusable(path: str, key: str, rows: range, dim: int, skip_bad: bool, files: str) -> bool:
    """A chunk file of this run and row range, embedded from the same files (their
    `file_signature`), with the right shapes (header read only)."""
    if not os.path.isfile(path):
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata() or {}
            kept = handle.get_slice("rows").get_shape()
            shape = handle.get_slice("embeddings").get_shape()
        failed = json.loads(meta.get("failed", "[]"))
        start, stop = int(meta["start"]), int(meta["stop"])
    except Exception:  # noqa: BLE001 - a damaged chunk is embedded again
        return False
    if meta.get("key") != key or (start, stop) != (rows.start, rows.stop) or meta.get("files") != files:
        return False
    if list(shape) != [kept[0], dim] or kept[0] + len(failed) != len(rows):
        return False
    return skip_bad or not failed  # rows skipped earlier are not right without --skip-bad


def _write_chunk(path: str, key: str, rows: range, files: str, result: Any) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {
        "embeddings": result.embeddings.to(torch.float32).contiguous(),
        "rows": torch.tensor([rows.start + i for i in result.kept], dtype=torch.int64),
    }
    failed = [[rows.start + i, message] for i, message in result.failed]
    meta = {
        "key": key,
        "start": str(rows.start),
        "stop": str(rows.stop),
        "files": files,
        "failed": json.dumps(failed),
    }
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _read_chunk(
    path: str, key: str, rows: range, dim: int, embeddings: bool = True
) -> tuple[Any, Any, list[Any]]:
    """(embeddings, global rows kept, [[row, message] skipped]) of a chunk, checked; with
    `embeddings=False` the first item is None and the embeddings are not read (only their shape)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise UserInputError(
            f"chunk '{path}' is missing: every rank must write to the same --output folder (on a "
            "file system all nodes share); run the command again"
        )
    try:
        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata() or {}
            shape = tuple(handle.get_slice("embeddings").get_shape())
            x = handle.get_tensor("embeddings") if embeddings else None
            kept = handle.get_tensor("rows")
        failed = json.loads(meta.get("failed", "[]"))
    except Exception as exc:  # noqa: BLE001
        raise UserInputError(
            f"chunk '{path}' cannot be read ({exc}); delete it and run the command again"
        ) from None
    good = (
        meta.get("key") == key
        and shape == (len(kept), dim)
        and all(rows.start <= int(r) < rows.stop for r in kept.tolist())
        and bool((kept[1:] > kept[:-1]).all())
    )
    if not good:
        raise UserInputError(
            f"chunk '{path}' does not belong to this run; delete it and run the command again"
        )
    return x, kept, failed


def _kill_hook(world: World, written: int) -> None:
    """Tests only: exit abruptly, as a killed rank would, after writing N chunks (KILL_HOOK)."""
    spec = os.environ.get(KILL_HOOK)
    if spec and spec == f"{world.rank}:{written}":
        os._exit(137)


def embed_to_folder(
    output: str | os.PathLike[str],
    prepare: Callable[[], EmbedSource],
    world: World | None = None,
    *,
    skip_bad: bool = False,
    force: bool = False,
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> EmbedSummary | None:
    """Embed `prepare()`'s images into the embedding set folder `output`; the summary on rank 0
    (None on other ranks). `prepare` loads the dataset and builds the encoder: it runs on every
    rank inside the checking phase, so its UserInputError stops all ranks with one line."""
    world = world or World()
    output = os.fspath(output)
    shards = os.path.join(output, SHARDS)

    # 1. check everything, on every rank, before anything is written or embedded
    with all_ranks_agree(world):
        if chunk_rows < 1:
            raise UserInputError(f"chunk size must be at least 1 row, got {chunk_rows}")
        source = prepare()
        if not source.items:
            raise UserInputError(f"dataset '{source.root}' holds no images to embed")
        encoder = source.encoder
        paths = relative_paths(source)
        signature = source_signature(source, paths)
        key = run_key(encoder.fingerprint, signature)
        check_output(output, key, encoder.fingerprint, signature, force)
        dim = encoder.dim
        ranges = chunk_ranges(len(source.items), chunk_rows)
        names = {r.start: os.path.join(shards, chunk_name(key, r)) for r in ranges}
    seen = all_gather(world, {"fingerprint": encoder.fingerprint, "signature": signature, "n": len(paths)})
    with all_ranks_agree(world):
        first = seen[0]
        for rank, other in enumerate(seen):
            if other["fingerprint"] != first["fingerprint"]:
                ours, theirs = first["fingerprint"], other["fingerprint"]
                raise UserInputError(
                    f"rank {rank} uses another encoder ({theirs.get('model')}, weights "
                    f"{str(theirs.get('weights_sha256'))[:12]}) than rank 0 ({ours.get('model')}, "
                    f"weights {str(ours.get('weights_sha256'))[:12]}); give every rank the same "
                    "--encoder and --checkpoint"
                )
            if other["signature"] != first["signature"]:
                raise UserInputError(
                    f"rank {rank} sees another image list ({other['n']} images) than rank 0 "
                    f"({first['n']}); every node must see the same dataset at the same path"
                )

    # which chunks are missing: rank 0 reads the chunk headers and stats the images; then the
    # MISSING chunks are split across the ranks (a resume keeps every rank busy)
    missing: list[tuple[int, str]] | None = None
    if world.is_main:
        missing = _missing_chunks(source, ranges, names, key, dim, skip_bad)
    missing = broadcast(world, missing)
    todo = [(ranges[i], files) for i, files in (missing[j] for j in world.share(len(missing)))]
    reused = len(ranges) - len(missing)
    with all_ranks_agree(world):
        if not skip_bad:  # a bad image: one line naming it, before any batch is embedded
            check_images([source.items[i] for rows, _ in todo for i in rows])

    # 2. rank 0 starts (or continues) the run in DIR/.shards; every rank must see it
    run_file = os.path.join(shards, f"run-{key}.json")
    with all_ranks_agree(world):
        if world.is_main:
            for name, other in _shard_files(shards):
                if other != key:  # --force: an unfinished run of another dataset or encoder
                    os.unlink(os.path.join(shards, name))
            os.makedirs(shards, exist_ok=True)
            write_json_atomically(
                run_file,
                {
                    "key": key,
                    "fingerprint": encoder.fingerprint,
                    "signature": signature,
                    "images": len(paths),
                },
            )
    barrier(world)
    with all_ranks_agree(world):
        if not os.path.isfile(run_file):
            raise UserInputError(
                f"'{run_file}' written by rank 0 is not visible here: --output must be a folder "
                "every node shares"
            )

    # 3. embed this rank's share of the missing chunks
    with all_ranks_agree(world):
        total = sum(len(rows) for rows, _ in todo)
        with progress_bar(
            total=total, enabled=progress and world.is_main, desc="embedding", unit="img"
        ) as bar:
            for written, (rows, files) in enumerate(todo, start=1):
                result = encoder.embed(
                    source.items[rows.start : rows.stop],
                    batch_size=batch_size,
                    num_workers=num_workers,
                    progress=False,
                    skip_bad=skip_bad,
                )
                _write_chunk(names[rows.start], key, rows, files, result)
                bar.update(len(rows))
                _kill_hook(world, written)

    # 4. rank 0 assembles DIR in row order and removes this run's chunk files
    summary = None
    with all_ranks_agree(world):
        if world.is_main:
            summary = _assemble(output, source, paths, key, signature, ranges, names, dim, reused)
            for rows in ranges:
                os.unlink(names[rows.start])
            os.unlink(run_file)
            try:
                os.rmdir(shards)
            except OSError:
                pass  # other files are left alone
    return summary


def _assemble(
    output: str,
    source: EmbedSource,
    paths: list[str],
    key: str,
    signature: str,
    ranges: list[range],
    names: dict[int, str],
    dim: int,
    reused: int,
) -> EmbedSummary:
    import torch

    # two passes over the chunks: their rows and skipped images first, then their embeddings,
    # streamed into the data file one chunk at a time (rank 0 never holds the whole set)
    kept, skipped = [], []
    for rows in ranges:
        _, rows_kept, failed = _read_chunk(names[rows.start], key, rows, dim, embeddings=False)
        kept.append(rows_kept)
        skipped += [paths[int(row)] for row, _ in failed]
    index = torch.cat(kept).tolist() if kept else []
    rotations = [source.items[i].rotation for i in index]
    labels = torch.tensor([int(source.labels[i]) for i in index], dtype=torch.int64)
    info = {**source.info, "signature": signature, "images": len(paths), "skipped": skipped}
    chunks = (_read_chunk(names[rows.start], key, rows, dim)[0] for rows in ranges)
    save_embedding_set(
        output,
        chunks,
        labels,
        dim,
        list(source.class_names),
        [paths[i] for i in index],
        source.encoder.fingerprint,
        rotations if any(rotations) else None,
        info,
    )
    return EmbedSummary(output, len(index), dim, len(paths), len(ranges), reused, skipped)
