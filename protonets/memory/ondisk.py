"""Memories larger than RAM: built from an embedding set in shards (one process or `torchrun`),
with the inverted lists merged on disk and the raw vectors kept in one memory-mapped `.npy`.

FAISS's own recipe (`faiss.contrib.ondisk.merge_ondisk`): rank 0 trains the coarse quantizer
(and PQ) on a seeded sample and writes the trained, empty index into a work folder inside DIR;
every rank adds its contiguous share of rows (global row ids) to its own copy and writes it as a
shard, and writes its (cosine: normalised) rows into the shared `vectors.npy` at their offsets;
rank 0 merges the shards' inverted lists into one `OnDiskInvertedLists` file, calibrates nprobe
(the exact neighbours of the calibration probes are computed by every rank on its own rows),
and saves the memory as a bundle: `index.faiss` (quantizer, PQ, list offsets) beside
`lists.ivfdata` (the lists) and `vectors.npy`. `SupportMemory.load` maps both instead of
reading them; `build` returns the memory loaded from DIR. The work folder
(`.protonets-tmp-<pid>-<token>-build`, only files we wrote) is removed at the end, also when
torchrun stops the ranks (SIGTERM raises SystemExit while `build` runs); a later build into DIR
removes the work folders of builds whose process is gone (killed outright). With several nodes,
DIR must be on storage every node sees (and one build at a time writes into it).

Bad input (a NaN, infinite or, for cosine, all-zero row; a label outside the class names) is a
user error wherever it is met: rank 0's training sample and each rank's share are checked inside
`all_ranks_agree`, so every rank stops with the one line.

The same code runs in a single process (`memory build --on-disk`): one shard, same layout.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import faiss
import numpy as np
import torch

from protonets.encoders import UserInputError
from protonets.encoders.atomic import _TMP, TMP_PREFIX, _pid_alive
from protonets.encoders.distributed import World, all_gather, all_ranks_agree, barrier, broadcast
from protonets.encoders.embedding_set import read_mapped

from . import indexes
from ._mapped import ondisk_lists  # noqa: F401 - re-exported
from .indexes import IndexParams

#: Rows read, added and written per step of a rank's share (64k × 512 floats = 128 MiB).
CHUNK = 65_536
_WORK_SUFFIX = "-build"
_WORK_FILES = ("trained.faiss", "vectors.npy", "lists.ivfdata")  # plus shard-R.faiss, stats-R.npz


class EmbeddingFile:
    """An embedding set read lazily: rows come from a memory map of its safetensors file
    (`read_mapped`: the checks of `EmbeddingSet.load`, the sha256 only with `verify`)."""

    def __init__(self, directory: str, verify: bool = True) -> None:
        self.directory = directory
        manifest, self._x, self._y = read_mapped(directory, verify)
        self.fingerprint: dict[str, Any] = dict(manifest["fingerprint"])
        self.class_names: list[str] = list(manifest["class_names"])
        self.count, self.dim = int(manifest["count"]), int(manifest["dim"])

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.array(self._x[start:stop], dtype=np.float32)

    def take(self, ids: np.ndarray) -> np.ndarray:
        return np.array(self._x[np.sort(ids)], dtype=np.float32)

    def labels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        out = np.array(self._y[start:stop], dtype=np.int64)
        if len(out) and (out.min() < 0 or out.max() >= len(self.class_names)):
            raise UserInputError(
                f"'{self.directory}' has labels outside its {len(self.class_names)} class names; "
                "run `protonets embed` again"
            )
        return out


def prepared(x: np.ndarray, metric: str, rows: int | np.ndarray) -> np.ndarray:
    """Rows as the memory stores them (cosine: unit length); NaN / zero rows are user errors.
    `rows`: the set's row number of `x[0]`, or of every row of `x` (a sample)."""
    bad = ~np.isfinite(x).all(1)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        bad |= norms[:, 0] == 0
    if bad.any():
        at = int(np.flatnonzero(bad)[0])
        row = int(rows[at]) if isinstance(rows, np.ndarray) else rows + at
        what = "NaN or infinity" if not np.isfinite(x[bad][0]).all() else "all zeros"
        raise UserInputError(f"embedding row {row} holds {what}; embed that image again or drop it")
    return x / norms if metric == "cosine" else x


@contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence the C++ side's stdout (faiss prints 'resizing …' while it merges lists)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # pragma: no cover - no fd 1
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _work_dir(directory: str) -> str:
    return os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}{_WORK_SUFFIX}")


def _remove_stale_work(directory: str) -> None:
    """Remove the work folders of builds into `directory` whose process is gone (a crash, a
    kill): with 10M rows one holds tens of GB. Same names as the temporary files of
    `protonets.encoders.atomic`, same test (the pid, on this machine)."""
    for name in os.listdir(directory):
        match = _TMP.match(name)
        if match and name.endswith(_WORK_SUFFIX) and int(match.group(1)) != os.getpid():
            if not _pid_alive(int(match.group(1))):
                _remove_work(os.path.join(directory, name))


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While the block runs, SIGTERM (torchrun stopping a rank, a scheduler's kill) raises
    SystemExit, so `finally` blocks run and the work folder is removed; the previous handler
    is restored afterwards. Only the main thread can set handlers: elsewhere a plain block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove_work(work: str) -> None:
    """Remove the work folder: only the files this module writes there, then the folder."""
    if not work or not os.path.isdir(work):
        return
    for name in os.listdir(work):
        ours = name in _WORK_FILES or (
            name.startswith(("shard-", "stats-")) and name.endswith((".faiss", ".npz"))
        )
        if ours:
            try:
                os.unlink(os.path.join(work, name))
            except OSError:
                pass
    try:
        os.rmdir(work)
    except OSError:
        pass


def _top2_update(
    best_s: torch.Tensor, best_i: torch.Tensor, probes: torch.Tensor, x: np.ndarray, first: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running exact top-2 of the probes over one block of rows (ids from `first`)."""
    xb = torch.from_numpy(x)
    s = probes @ xb.T
    if metric == "l2":
        s = 2 * s - (xb * xb).sum(1)
    top_s, top_i = s.topk(min(2, len(x)), dim=1)
    top_s, pick = torch.cat([best_s, top_s], 1).topk(2, dim=1)
    top_i = torch.cat([best_i, top_i + first], 1).gather(1, pick)
    return top_s, top_i


def build(
    world: World,
    emb: EmbeddingFile,
    directory: str,
    *,
    kind: str,
    metric: str,
    params: IndexParams,
    fingerprint: dict[str, Any] | None,
    progress: bool = False,
) -> Any:
    """Build and save an on-disk IVF / IVF-PQ memory from `emb` into `directory` (all ranks call
    this; rank 0 returns the saved memory, mapped; the others None)."""
    from .store import SupportMemory

    n, dim = emb.count, emb.dim
    with _sigterm_exits():
        work = ""
        if world.is_main:
            os.makedirs(directory, exist_ok=True)
            _remove_stale_work(directory)
            work = _work_dir(directory)
            os.mkdir(work)
        work = broadcast(world, work)
        try:
            # bad rows are user errors: every rank stops with the one line (`all_ranks_agree`)
            with all_ranks_agree(world):
                if world.is_main:
                    index = indexes.new_index(kind, dim, metric, params, n)
                    sample = indexes.sample_rows(n, indexes.train_sample_size(index, n))
                    index.train(prepared(emb.take(sample), metric, sample))
                    faiss.write_index(index, os.path.join(work, "trained.faiss"))
                    shape = (n, dim)
                    np.lib.format.open_memmap(
                        os.path.join(work, "vectors.npy"), "w+", np.float32, shape
                    ).flush()
            with all_ranks_agree(world):  # (its all-gather is the barrier after training)
                tops = _add_share(world, emb, work, metric, params, progress and world.is_main)
            tops = all_gather(world, tops)
            barrier(world)
            if world.is_main:
                _assemble(world, emb, directory, work, kind, metric, params, fingerprint, tops)
            barrier(world)
        finally:
            if world.is_main:
                _remove_work(work)
    # the files in the work folder are gone: the memory as saved, mapped from DIR
    return SupportMemory.load(directory) if world.is_main else None


def _add_share(
    world: World,
    emb: EmbeddingFile,
    work: str,
    metric: str,
    params: IndexParams,
    progress: bool,
) -> tuple[list, list]:
    """Add this rank's rows to its copy of the trained index and to `vectors.npy`; write the
    shard and the class sums; return the calibration probes' exact top-2 over these rows."""
    from protonets.encoders.progress import progress_bar

    n, dim = emb.count, emb.dim
    index = faiss.read_index(os.path.join(work, "trained.faiss"))
    vectors = np.load(os.path.join(work, "vectors.npy"), mmap_mode="r+")
    share = world.share(n)
    n_cls = len(emb.class_names)
    sums = torch.zeros(n_cls, dim, dtype=torch.float64)
    counts = np.zeros(n_cls, np.int64)
    calibrate = params.nprobe is None
    probe_rows = indexes.sample_rows(n, min(indexes.CALIBRATION_PROBES, n), seed=1)
    probes = torch.from_numpy(prepared(emb.take(probe_rows), metric, probe_rows)) if calibrate else None
    best_s = torch.full((len(probe_rows), 2), -torch.inf)
    best_i = torch.full((len(probe_rows), 2), -1, dtype=torch.int64)
    steps = range(share.start, share.stop, CHUNK)
    for start in progress_bar(steps, enabled=progress, desc="adding", unit="chunk"):
        stop = min(start + CHUNK, share.stop)
        x = prepared(emb.rows(start, stop), metric, start)
        y = emb.labels(start, stop)
        index.add_with_ids(x, np.arange(start, stop, dtype=np.int64))
        vectors[start:stop] = x
        sums.index_add_(0, torch.from_numpy(y), torch.from_numpy(x).double())
        counts += np.bincount(y, minlength=n_cls)
        if probes is not None:
            best_s, best_i = _top2_update(best_s, best_i, probes, x, start, metric)
    vectors.flush()
    del vectors
    faiss.write_index(index, os.path.join(work, f"shard-{world.rank}.faiss"))
    del index
    np.savez(os.path.join(work, f"stats-{world.rank}.npz"), sums=sums.numpy(), counts=counts)
    return best_s.tolist(), best_i.tolist()


def _assemble(
    world: World,
    emb: EmbeddingFile,
    directory: str,
    work: str,
    kind: str,
    metric: str,
    params: IndexParams,
    fingerprint: dict[str, Any] | None,
    tops: list,
) -> None:
    """Rank 0: merge the shards' lists on disk, sum the class statistics, calibrate, save."""
    from faiss.contrib.ondisk import merge_ondisk

    from .store import SupportMemory

    dim = emb.dim
    index = faiss.read_index(os.path.join(work, "trained.faiss"))
    shards = [os.path.join(work, f"shard-{r}.faiss") for r in range(world.size)]
    with quiet_stdout():
        merge_ondisk(index, shards, os.path.join(work, "lists.ivfdata"))
    for shard in shards:
        os.unlink(shard)
    sums = np.zeros((len(emb.class_names), dim), np.float64)
    counts = np.zeros(len(emb.class_names), np.int64)
    for r in range(world.size):
        with np.load(os.path.join(work, f"stats-{r}.npz"), allow_pickle=False) as stats:
            sums += stats["sums"]
            counts += stats["counts"]
    memory = SupportMemory(
        dim,
        metric,
        kind,
        nlist=params.nlist,
        nprobe=params.nprobe,
        pq_m=params.pq_m,
        rerank=params.rerank,
        encoder_fingerprint=fingerprint,
    )
    memory._adopt(
        index=index,
        vectors=np.load(os.path.join(work, "vectors.npy"), mmap_mode="c"),
        labels=emb.labels().astype(np.int32),
        names=list(emb.class_names),
        sums=sums,
        counts=counts,
    )
    if params.nprobe is None:
        scores = torch.tensor([t[0] for t in tops])  # [ranks, P, 2]
        ids = torch.tensor([t[1] for t in tops])
        flat_s = scores.permute(1, 0, 2).reshape(scores.shape[1], -1)
        flat_i = ids.permute(1, 0, 2).reshape(ids.shape[1], -1)
        _, pick = flat_s.topk(2, dim=1)
        memory._calibrate(exact_ids=flat_i.gather(1, pick).numpy())
    memory.save(directory)
