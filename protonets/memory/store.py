"""`SupportMemory`: a growing store of labelled support embeddings, searched exactly or via faiss.

Layout. Every vector added gets the next row id (0, 1, 2, …). `_labels[id]` is its class slot
(-1 once removed); `_vectors[id]` its (cosine: L2-normalised) embedding when `keep_vectors`;
an optional faiss index holds the same ids. Per class slot, `_sums` and `_counts` are running
totals, so the prototype (mean) of a class is updated in O(shots) when shots are added.

Search runs exactly (blocked torch matrix products over `_vectors`) until an approximate index
exists; `index="auto"` builds one once the memory reaches `exact_limit` vectors, sized to the
data (see `indexes.py`). Reads take a shared lock and run concurrently; writes take it alone.
Across processes, `SupportMemory.updating(DIR)` holds the folder's exclusive file lock while it
re-reads, changes and saves the memory. Rows may carry a content hash of their source (`sources`)
so re-adding the same image can be detected.
"""

from __future__ import annotations

import copy
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import faiss
import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from protonets.encoders import FingerprintMismatchError, UserInputError
from protonets.encoders.atomic import bundle_lock, check_bundle_target, load_bundle, save_bundle, sha256_file

from . import _mapped as ondisk
from . import indexes
from ._inputs import as_labels, as_matrix, normalized
from .indexes import IndexParams
from .options import FORMAT_VERSION, INDEX_KINDS, KIND, METRICS, MODES  # noqa: F401 - re-exported

_QUERY_BLOCK = 256  # queries per exact-search block
_RERANK_BYTES = 64 << 20  # raw vectors gathered at once to re-rank candidates
_ROW_BLOCK = 131_072  # support rows per exact-search block (256 × 131072 floats = 128 MiB)
_ADD_BLOCK = 65_536  # rows per faiss add call when (re)building
_HASH_BYTES = 16  # bytes of a source's sha256 kept per row (128 bits: no accidental collisions)


class _RWLock:
    """Many readers or one writer; a waiting writer holds back new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _check_int(name: str, value: Any, low: int, none_ok: bool = False) -> None:
    """An int parameter >= `low` (None too when `none_ok`): TypeError / ValueError naming it."""
    if value is None and none_ok:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        kind = "an int or None" if none_ok else "an int"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


def _name_array(names: list[str | int]) -> np.ndarray:
    """Class names as a numpy array: str or int64 when uniform, object when mixed."""
    if names and all(isinstance(n, str) for n in names):
        return np.array(names, dtype=str)
    if names and all(isinstance(n, int) for n in names):
        return np.array(names, dtype=np.int64)
    out = np.empty(len(names), dtype=object)
    out[:] = names
    return out


class SupportMemory:
    """Labelled support embeddings at any scale: k-NN search and prototype classification.

    Parameters
    ----------
    dim: embedding width.
    metric: 'cosine' (embeddings are L2-normalised on the way in; scores are cosine similarities)
        or 'l2' (scores are negative squared Euclidean distances). Higher is better in both.
    index: 'flat' (exact), 'hnsw', 'ivf' (IVF-Flat), 'ivfpq' (IVF-PQ, compressed), or 'auto':
        exact below `exact_limit` vectors, then an IVF index trained and sized to the data.
    nlist, nprobe, pq_m: IVF lists, lists probed per query, PQ bytes per vector (None: sized
        to the data). hnsw_m, ef_search: HNSW graph degree and search breadth.
    rerank: re-rank `max(rerank × k, 256)` IVF-PQ candidates exactly from the kept vectors
        (0: off; None: 10 when vectors are kept); see `indexes.RERANK_MIN_CANDIDATES`.
    keep_vectors: keep the raw vectors (needed for exact search, re-ranking, retraining and
        compaction). Turn off only for IVF-PQ memories too large to keep them.
    expected_size: how many vectors you will add (sizes an index trained on an early batch).
    encoder_fingerprint: the fingerprint of the encoder that made the embeddings.
    """

    def __init__(
        self,
        dim: int,
        metric: str = "cosine",
        index: str = "auto",
        *,
        nlist: int | None = None,
        nprobe: int | None = None,
        pq_m: int | None = None,
        hnsw_m: int = 32,
        ef_search: int = 64,
        rerank: int | None = None,
        keep_vectors: bool = True,
        exact_limit: int = indexes.EXACT_LIMIT,
        expected_size: int | None = None,
        encoder_fingerprint: dict[str, Any] | None = None,
    ) -> None:
        _check_int("dim", dim, 1)
        for name, value, low in (
            ("nlist", nlist, 1),
            ("nprobe", nprobe, 1),
            ("pq_m", pq_m, 1),
            ("rerank", rerank, 0),
            ("expected_size", expected_size, 1),
        ):
            _check_int(name, value, low, none_ok=True)
        for name, value, low in (
            ("hnsw_m", hnsw_m, 2),
            ("ef_search", ef_search, 1),
            ("exact_limit", exact_limit, 0),
        ):
            _check_int(name, value, low)
        if not isinstance(keep_vectors, (bool, np.bool_)):
            raise TypeError(f"keep_vectors must be True or False, got {keep_vectors!r}")
        if encoder_fingerprint is not None and not isinstance(encoder_fingerprint, dict):
            raise TypeError(
                f"encoder_fingerprint must be a dict or None, got {type(encoder_fingerprint).__name__}"
            )
        if not isinstance(metric, str) or not isinstance(index, str):
            bad, value = ("metric", metric) if not isinstance(metric, str) else ("index", index)
            raise TypeError(f"{bad} must be a str, got {type(value).__name__}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
        if not keep_vectors and index in ("auto", "flat"):
            raise ValueError(
                f"index={index!r} searches the kept vectors: keep_vectors=False needs "
                "index='hnsw', 'ivf' or 'ivfpq'"
            )
        if rerank and not keep_vectors:
            raise ValueError("rerank needs the raw vectors: set keep_vectors=True or rerank=0")
        if pq_m is not None and dim % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide dim={dim}")
        self.dim = int(dim)
        self.metric = metric
        self.index_kind = index
        self.keep_vectors = bool(keep_vectors)
        self.exact_limit = int(exact_limit)
        self.expected_size = expected_size
        self.encoder_fingerprint = encoder_fingerprint
        if rerank is None:
            rerank = 10 if keep_vectors else 0
        self.params = IndexParams(nlist, nprobe, pq_m, hnsw_m, 80, ef_search, int(rerank))

        self._lock = _RWLock()
        self._save_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._n = 0  # row ids handed out (alive + removed)
        self._count = 0  # alive rows
        self._labels = np.empty(0, np.int32)
        self._hashes = np.zeros((0, _HASH_BYTES), np.uint8)  # per row; all zero: source unknown
        self._vectors: np.ndarray | None = np.empty((0, dim), np.float32) if keep_vectors else None
        self._names: list[str | int] = []
        self._slots: dict[str | int, int] = {}
        self._sums = np.zeros((0, dim), np.float64)
        self._counts = np.zeros(0, np.int64)
        self._index: faiss.Index | None = None
        self._trained_on = 0
        self._calibration: dict[str, Any] | None = None  # nprobe picked after training
        self._table: tuple[np.ndarray, torch.Tensor, torch.Tensor] | None = None

    def __deepcopy__(self, memo: dict) -> SupportMemory:
        """An independent copy (sklearn's `clone` deep-copies a classifier's memory)."""
        locks = ("_lock", "_save_lock", "_cache_lock")
        with self._lock.read():
            new = SupportMemory.__new__(SupportMemory)
            for key, value in self.__dict__.items():
                if key == "_index" and value is not None:
                    value = (
                        faiss.clone_index(value) if ondisk.ondisk_lists(value) is None else _ram_clone(value)
                    )
                elif key == "_vectors" and isinstance(value, np.memmap):
                    value = np.array(value)
                elif key not in locks and key != "_table":
                    value = copy.deepcopy(value, memo)
                new.__dict__[key] = value
        new._lock, new._save_lock, new._cache_lock = _RWLock(), threading.Lock(), threading.Lock()
        new._table = None
        return new

    # -- what it holds -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (
            f"SupportMemory(dim={self.dim}, metric={self.metric!r}, index={self.index_kind!r}, "
            f"structure={self.structure!r}, count={self._count}, classes={len(self.classes)})"
        )

    @property
    def count(self) -> int:
        """Vectors currently in the memory."""
        return self._count

    @property
    def classes(self) -> list[str | int]:
        """Class names with at least one vector, in the order they were first added."""
        return [name for name, c in zip(self._names, self._counts) if c > 0]

    @property
    def structure(self) -> str:
        """What answers k-NN searches now: 'flat' (exact) or the faiss index kind."""
        return "flat" if self._index is None else indexes.kind_of(self._index)

    @property
    def on_disk(self) -> bool:
        """True while the inverted lists (and vectors) are memory-mapped from the saved files."""
        return ondisk.ondisk_lists(self._index) is not None

    def class_counts(self) -> dict[str | int, int]:
        """Vectors per class."""
        return {name: int(c) for name, c in zip(self._names, self._counts) if c > 0}

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary: sizes, metric, index and its parameters."""
        with self._lock.read():
            out: dict[str, Any] = {
                "dim": self.dim,
                "metric": self.metric,
                "index": self.index_kind,
                "structure": self.structure,
                "count": self._count,
                "classes": len(self.classes),
                "removed_rows": self._n - self._count,
                "keep_vectors": self.keep_vectors,
                "encoder": (self.encoder_fingerprint or {}).get("model"),
            }
            if self.on_disk:
                out["on_disk"] = True
            if isinstance(self._index, faiss.IndexIVF):
                out["nlist"] = int(self._index.nlist)
                out["nprobe"] = self._nprobe()
                out["trained_on"] = self._trained_on
                if self._calibration and not self.params.nprobe:
                    out["calibration"] = self._calibration
                if isinstance(self._index, faiss.IndexIVFPQ):
                    out["pq_m"] = int(self._index.pq.M)
                    out["rerank"] = self.params.rerank
            return out

    # -- writing -------------------------------------------------------------------------
    def add(self, embeddings: Any, labels: Any, *, sources: Sequence[str] | None = None) -> None:
        """Add embeddings `[N, dim]` (numpy or torch, floating point) with one label each.

        Labels are str or int class names; new names start new classes. Prototypes are running
        means, so adding shots to a class never rebuilds anything. An `auto` memory that grows
        past `exact_limit` trains its approximate index here (once; again after 4× growth).
        `sources`: optional hex sha256 of each row's image file (see `has_sources`).
        """
        x = as_matrix(embeddings, self.dim, "embeddings")
        names = as_labels(labels, len(x))
        hashes = _hash_rows(sources, len(x))
        if self.metric == "cosine":
            x = normalized(x, "embeddings")
        if not len(x):
            return
        with self._lock.write():
            self._unmap()
            if self._index is None and not self.keep_vectors:
                self._index = self._trained_index(x, max(len(x), self.expected_size or 0))
            slots = np.array([self._slot(name) for name in names], dtype=np.int32)
            first = self._n
            self._append(x, slots, hashes)
            if self._index is not None:
                indexes.add(self._index, x, first)
            sums, index = torch.from_numpy(self._sums), torch.from_numpy(slots.astype(np.int64))
            for start in range(0, len(x), _ADD_BLOCK):  # float64 copies stay small
                rows = slice(start, start + _ADD_BLOCK)
                sums.index_add_(0, index[rows], torch.from_numpy(x[rows]).double())
            self._counts += np.bincount(slots, minlength=len(self._counts))
            self._table = None
            self._restructure()

    def train(self, sample: Any) -> None:
        """Train the IVF / IVF-PQ index on `sample` before adding (for streamed builds).

        Without it, an index whose vectors are not kept trains on the first batch added.
        """
        x = as_matrix(sample, self.dim, "sample")
        if self.metric == "cosine":
            x = normalized(x, "sample")
        if self.index_kind not in ("ivf", "ivfpq"):
            raise ValueError(f"train() is for index='ivf' or 'ivfpq', this memory is {self.index_kind!r}")
        with self._lock.write():
            if self._n:
                raise ValueError("train() must come before the first add()")
            self._unmap()
            self._index = self._trained_index(x, max(len(x), self.expected_size or 0))

    def remove(self, label: str | int) -> int:
        """Remove every vector of class `label`; returns how many were removed."""
        with self._lock.write():
            slot = self._slots.get(label)
            if slot is None or self._counts[slot] == 0:
                raise UserInputError(f"class {label!r} is not in this memory")
            ids = np.flatnonzero(self._labels[: self._n] == slot)
            self._unmap()
            self._labels[ids] = -1
            self._count -= len(ids)
            self._sums[slot] = 0.0
            self._counts[slot] = 0
            self._table = None
            if isinstance(self._index, faiss.IndexIVF):
                self._index.remove_ids(ids.astype(np.int64))
            dead = self._n - self._count
            if self.keep_vectors and (self._index is None or dead > self._count):
                self._compact()
                if self._index is not None:
                    self._index = None  # rebuilt below from the compacted rows
            self._restructure()
            return len(ids)

    def rename_class(self, old: str | int, new: str | int) -> None:
        """Give class `old` the name `new` (a class `new` must not hold vectors already)."""
        (new,) = as_labels([new], 1)
        with self._lock.write():
            slot = self._slots.get(old)
            if slot is None or self._counts[slot] == 0:
                raise UserInputError(
                    f"class {old!r} is not in this memory; see its classes with `memory info`"
                )
            if new == old:
                return
            target = self._slots.get(new)
            if target is not None and self._counts[target] > 0:
                raise UserInputError(f"class {new!r} already exists; remove it first or choose another name")
            if target is None:
                del self._slots[old]
                self._slots[new] = slot
                self._names[slot] = new
            else:  # `new` names an emptied class: move the rows into it
                self._labels[: self._n][self._labels[: self._n] == slot] = target
                self._sums[target], self._counts[target] = self._sums[slot], self._counts[slot]
                self._sums[slot], self._counts[slot] = 0.0, 0
            self._table = None

    def has_sources(self, sources: Sequence[str]) -> np.ndarray:
        """Which of these source hashes (hex sha256) rows in the memory already carry: bool `[N]`."""
        return np.array([c is not None for c in self.source_classes(sources)], dtype=bool)

    def source_classes(self, sources: Sequence[str]) -> list[str | int | None]:
        """The class of a row carrying each of these source hashes (hex sha256), or None."""
        wanted = _hash_rows(sources, len(sources))
        with self._lock.read():
            labels = self._labels[: self._n]
            known: dict[bytes, int] = {}
            for h, slot in zip(self._hashes[: self._n], labels):
                if slot >= 0 and h.any():
                    known.setdefault(bytes(h), int(slot))
            return [self._names[known[bytes(h)]] if bytes(h) in known else None for h in wanted]

    def rebuild(self) -> None:
        """Drop removed rows and retrain the approximate index on the kept vectors."""
        if not self.keep_vectors:
            raise ValueError("rebuild() needs the raw vectors; this memory was made with keep_vectors=False")
        with self._lock.write():
            self._unmap()
            self._compact()
            self._index = None
            self._restructure(force=True)

    def calibrate(self, seed: int = 1) -> dict[str, Any]:
        """Calibrate the search again on the stored vectors, as `add` does after training: nprobe
        and, for a re-ranked IVF-PQ memory, the shortlist (e.g. for a memory saved by an earlier
        release, before shortlists were calibrated). Nothing is retrained. `seed` draws the
        sample of stored vectors probed (`add` uses 1). Returns the calibration `info()` shows."""
        if not isinstance(self._index, faiss.IndexIVF) or self._vectors is None or self.params.nprobe:
            raise ValueError("calibrate() needs an IVF index, the kept vectors and no fixed nprobe")
        with self._lock.write():
            self._calibrate(seed=seed)
        return dict(self._calibration or {})

    # -- reading -------------------------------------------------------------------------
    def search(
        self, queries: Any, k: int = 10, exact: bool = False, return_ids: bool = False
    ) -> tuple[np.ndarray, ...]:
        """The k nearest stored vectors of each query: (scores `[Q, k]`, labels `[Q, k]`).

        Scores are cosine similarities or negative squared distances, best first. Labels are
        class names (object array); where fewer than k were found, score -inf and label None.
        `exact=True` searches the kept vectors exhaustively, ignoring the index.
        `return_ids=True` adds the row ids `[Q, k]` (-1: none), in insertion order; they stay
        valid until a remove() or rebuild() compacts the memory.
        """
        q = self._queries(queries)
        k = self._check_k(k)
        with self._lock.read():
            self._check_not_empty()
            scores, ids = self._search_ids(q, k, exact)
            labels = np.empty(ids.shape, dtype=object)
            found = ids >= 0
            names = np.empty(len(self._names), dtype=object)
            names[:] = self._names
            labels[found] = names[self._labels[ids[found]]]
        return (scores, labels, ids) if return_ids else (scores, labels)

    def classify(self, queries: Any, mode: str = "prototype", k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Class of each query and its score: (labels `[Q]`, scores `[Q]`).

        mode='prototype': nearest class mean (the dense PrototypeHead's answer; cosine memories
        match PrototypeHead(metric='cosine', feature_transform='l2n')); score = similarity to it.
        mode='knn': majority class of the k nearest vectors, ties to the class with the nearest
        vector; score = that class's best similarity among the k.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        q = self._queries(queries)
        k = self._check_k(k)
        with self._lock.read():
            self._check_not_empty()
            if mode == "prototype":
                slots, scores = self._nearest_prototype(q)
            else:
                slots, scores = self._knn_vote(q, k)
            labels = _name_array(self._names)[slots]
        return labels, scores

    def prototype_scores(self, queries: Any) -> tuple[np.ndarray, list[str | int]]:
        """Scores of every query against every class prototype: (`[Q, C]`, class names)."""
        q = self._queries(queries)
        with self._lock.read():
            self._check_not_empty()
            slots, protos, sq = self._prototype_table()
            scores = torch.cat([self._proto_block(qb, protos, sq) for qb in self._blocks(q)])
            return scores.numpy(), [self._names[s] for s in slots]

    # -- persistence ---------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Save to a folder: faiss index, labels, vectors, prototype sums and a manifest.

        Atomic: data files are content-addressed and the manifest is replaced last, so a crash
        at any moment leaves the previous save loadable. No pickle anywhere.
        """
        with self._save_lock, self._lock.read():
            n, n_cls = self._n, len(self._names)
            labels = self._labels[:n]
            on_disk = self.on_disk
            manifest = {
                "kind": KIND,
                # format 2 adds the on-disk layout (lists.ivfdata); other memories stay format 1
                "format_version": FORMAT_VERSION if on_disk else 1,
                "dim": self.dim,
                "metric": self.metric,
                "index": self.index_kind,
                "structure": self.structure,
                "count": self._count,
                "rows": n,
                "class_names": list(self._names),
                "encoder_fingerprint": self.encoder_fingerprint,
                "keep_vectors": self.keep_vectors,
                "exact_limit": self.exact_limit,
                "expected_size": self.expected_size,
                "trained_on": self._trained_on,
                "calibration": self._calibration,
                "params": self.params.to_json(),
            }
            files = {
                "labels.npy": _npy_writer(labels),
                "prototypes.safetensors": lambda p: save_file(
                    {"sums": self._sums[:n_cls], "counts": self._counts[:n_cls]}, p
                ),
            }
            if self._vectors is not None:
                v = self._vectors
                mapped = isinstance(v, np.memmap) and v.filename and v.shape == (n, self.dim)
                files["vectors.npy"] = _link_writer(v.filename) if mapped else _npy_writer(v[:n])
            if self._hashes[:n].any():
                files["sources.npy"] = _npy_writer(self._hashes[:n])
            if self._index is not None:
                index = self._index
                if on_disk:  # the lists file first: the index file names it
                    named: dict[str, str] = {}
                    files["lists.ivfdata"] = _link_writer(ondisk.ondisk_lists(index).filename, named)
                    files["index.faiss"] = _ondisk_index_writer(index, named)
                else:
                    files["index.faiss"] = lambda p: faiss.write_index(index, p)
            save_bundle(directory, manifest, files)

    @classmethod
    @contextmanager
    def updating(
        cls, directory: str | os.PathLike[str], encoder: Any = None, create: dict[str, Any] | None = None
    ) -> Iterator[SupportMemory]:
        """Read-modify-write a saved memory under its folder's exclusive lock (other processes wait).

        Yields the memory as saved now (re-read under the lock); saves it when the block ends
        without an error. `create`: SupportMemory arguments to start from when DIR holds none.
        """
        directory = os.fspath(directory)
        if create is not None:
            check_bundle_target(directory, KIND)
        elif not os.path.isfile(os.path.join(directory, "manifest.json")):
            cls.load(directory)  # says what is wrong, before any lock file is made
        with bundle_lock(directory):
            if create is not None and not os.path.exists(os.path.join(directory, "manifest.json")):
                memory = cls(**create)
            else:
                memory = cls.load(directory, encoder=encoder)
            yield memory
            memory.save(directory)

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], encoder: Any = None, *, mmap: bool = True
    ) -> SupportMemory:
        """Load a saved memory, verifying every file's checksum.

        `encoder` (an `protonets.encoders.Encoder` or its fingerprint dict) makes load refuse a memory
        built with another encoder. Refuses truncated or altered files and newer formats.
        A memory saved on disk (`memory build --on-disk` or under torchrun) is memory-mapped: its
        inverted lists and raw vectors stay in the files (read-only) and only the pages searches
        touch become resident; `mmap=False` reads them into RAM. Adding to or removing from a
        mapped memory reads it into RAM first (it is then saved in the ordinary layout).
        """
        directory = os.fspath(directory)
        manifest, files = load_bundle(directory, KIND, FORMAT_VERSION)
        try:
            mem = cls._from_manifest(manifest, files, mmap)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserInputError(
                f"'{directory}' is not a consistent SupportMemory ({exc}); save it again"
            ) from None
        if encoder is not None:
            fp = getattr(encoder, "fingerprint", encoder)
            stored = mem.encoder_fingerprint
            if stored != fp:
                if stored is None:
                    raise FingerprintMismatchError(
                        f"'{directory}' was built from embeddings with no encoder fingerprint, "
                        "so it cannot be checked against this encoder; load it without one"
                    )
                raise FingerprintMismatchError(
                    f"'{directory}' was built with encoder {stored.get('model')} (weights "
                    f"{str(stored.get('weights_sha256'))[:12]}…), but the encoder at hand is "
                    f"{fp.get('model')} (weights {str(fp.get('weights_sha256'))[:12]}…); "
                    "use the original encoder or rebuild the memory"
                )
        return mem

    @classmethod
    def _from_manifest(cls, m: dict[str, Any], files: dict[str, str], mmap: bool = True) -> SupportMemory:
        p = m["params"]
        mem = cls(
            int(m["dim"]),
            m["metric"],
            m["index"],
            nlist=p["nlist"],
            nprobe=p["nprobe"],
            pq_m=p["pq_m"],
            hnsw_m=p["hnsw_m"],
            ef_search=p["ef_search"],
            rerank=p["rerank"],
            keep_vectors=bool(m["keep_vectors"]),
            exact_limit=int(m["exact_limit"]),
            expected_size=m["expected_size"],
            encoder_fingerprint=m["encoder_fingerprint"],
        )
        n, names = int(m["rows"]), list(m["class_names"])
        if len(set(names)) != len(names) or not all(isinstance(c, (str, int)) for c in names):
            raise ValueError("class_names holds a name twice or a name that is not str or int")
        labels = np.load(files["labels.npy"], allow_pickle=False)
        if labels.dtype != np.int32 or labels.shape != (n,):
            raise ValueError(f"labels file holds {labels.dtype} {labels.shape}, expected int32 ({n},)")
        if n and (labels.max() >= len(names) or labels.min() < -1):
            raise ValueError("labels point outside class_names")
        tensors = load_file(files["prototypes.safetensors"])
        sums, counts = tensors["sums"], tensors["counts"]
        if sums.shape != (len(names), mem.dim) or counts.shape != (len(names),):
            raise ValueError(f"prototype sums have shape {sums.shape}, expected ({len(names)}, {mem.dim})")
        alive = labels[labels >= 0]
        if not np.array_equal(np.bincount(alive, minlength=len(names)), counts):
            raise ValueError("class counts disagree with the labels file")
        on_disk = "lists.ivfdata" in files
        if mem.keep_vectors:
            mode = "c" if on_disk and mmap else None  # copy-on-write: never written back
            vectors = np.load(files["vectors.npy"], allow_pickle=False, mmap_mode=mode)
            if vectors.dtype != np.float32 or vectors.shape != (n, mem.dim):
                raise ValueError(
                    f"vectors file holds {vectors.dtype} {vectors.shape}, expected float32 ({n}, {mem.dim})"
                )
            mem._vectors = vectors
        if "index.faiss" in files:
            if on_disk:
                index = ondisk.read_mapped_index(files["index.faiss"], files["lists.ivfdata"])
                if not mmap:
                    ondisk.lists_to_ram(index)
            else:
                index = faiss.read_index(files["index.faiss"])
            expected = n if isinstance(index, faiss.IndexHNSW) else len(alive)
            if index.d != mem.dim or index.ntotal != expected:
                raise ValueError(
                    f"index holds {index.ntotal} vectors of {index.d} dims, expected {expected} of {mem.dim}"
                )
            mem._index = index
        elif m["structure"] != "flat" or not mem.keep_vectors:
            raise ValueError(f"manifest names structure {m['structure']!r} but no index file")
        if "sources.npy" in files:
            hashes = np.load(files["sources.npy"], allow_pickle=False)
            if hashes.dtype != np.uint8 or hashes.shape != (n, _HASH_BYTES):
                raise ValueError(f"sources file holds {hashes.dtype} {hashes.shape}, expected ({n}, 16)")
            mem._hashes = hashes.copy()
        else:
            mem._hashes = np.zeros((n, _HASH_BYTES), np.uint8)
        mem._labels = labels.copy()
        mem._names = names
        mem._slots = {name: i for i, name in enumerate(names)}
        mem._sums, mem._counts = sums.copy(), counts.copy()
        mem._n, mem._count = n, len(alive)
        mem._trained_on = int(m["trained_on"])
        mem._calibration = m["calibration"]
        return mem

    # -- internals: storage ----------------------------------------------------------------
    def _unmap(self) -> None:
        """Read mapped vectors and inverted lists into RAM (before anything changes them)."""
        if isinstance(self._vectors, np.memmap):
            self._vectors = np.array(self._vectors)
        if self._index is not None:
            ondisk.lists_to_ram(self._index)

    def _adopt(
        self,
        *,
        index: faiss.Index,
        vectors: np.ndarray,
        labels: np.ndarray,
        names: list[str | int],
        sums: np.ndarray,
        counts: np.ndarray,
    ) -> None:
        """Take over the parts of a memory built elsewhere (`ondisk.build`): rows 0…n-1, all alive,
        `labels[i]` the class slot of row i in `names`."""
        n = len(labels)
        self._index, self._vectors, self._labels = index, vectors, labels
        self._hashes = np.zeros((n, _HASH_BYTES), np.uint8)
        self._names = list(names)
        self._slots = {name: i for i, name in enumerate(self._names)}
        self._sums, self._counts = sums, counts
        self._n = self._count = n
        self._trained_on = n
        self._calibration = None
        self._table = None

    def _slot(self, name: str | int) -> int:
        """The class slot of `name`, opening one (grown geometrically) for a new class."""
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = len(self._names)
            self._names.append(name)
            if slot == len(self._counts):
                cap = max(16, slot * 3 // 2)
                sums = np.zeros((cap, self.dim), np.float64)
                sums[:slot] = self._sums
                counts = np.zeros(cap, np.int64)
                counts[:slot] = self._counts
                self._sums, self._counts = sums, counts
        return slot

    def _append(self, x: np.ndarray, slots: np.ndarray, hashes: np.ndarray) -> None:
        need = self._n + len(x)
        if need > len(self._labels):
            cap = max(need, len(self._labels) * 3 // 2, 1024)
            self._labels = np.concatenate([self._labels[: self._n], np.empty(cap - self._n, np.int32)])
            grown_h = np.zeros((cap, _HASH_BYTES), np.uint8)
            grown_h[: self._n] = self._hashes[: self._n]
            self._hashes = grown_h
            if self._vectors is not None:
                grown = np.empty((cap, self.dim), np.float32)
                grown[: self._n] = self._vectors[: self._n]
                self._vectors = grown
        self._labels[self._n : need] = slots
        self._hashes[self._n : need] = hashes
        if self._vectors is not None:
            self._vectors[self._n : need] = x
        self._n = need
        self._count += len(x)

    def _compact(self) -> None:
        """Drop removed rows (ids are renumbered: any index must be rebuilt afterwards)."""
        if self._n == self._count:
            return
        alive = self._labels[: self._n] >= 0
        self._labels = self._labels[: self._n][alive]
        self._hashes = self._hashes[: self._n][alive]
        if self._vectors is not None:
            self._vectors = self._vectors[: self._n][alive]
        self._n = self._count

    # -- internals: index policy -----------------------------------------------------------
    def _target(self) -> str | None:
        """The index kind this memory should have now (None: exact search)."""
        kind = self.index_kind
        if kind == "flat":
            return None
        if kind == "auto":
            # hysteresis: once built, keep the index until the memory halves below the limit
            limit = self.exact_limit // 2 if self._index is not None else self.exact_limit
            return "ivf" if self._count >= max(limit, 1) else None
        if kind == "hnsw" or self._index is not None:
            return kind
        return kind if self._count >= indexes.MIN_TRAIN[kind] else None

    def _restructure(self, force: bool = False) -> None:
        """Build, grow or drop the index to match `_target()` (needs the kept vectors)."""
        if not self.keep_vectors:
            return
        target = self._target()
        if target is None:
            if self._index is not None:
                self._index = None
                self._compact()
            return
        stale = force or self._index is None or indexes.kind_of(self._index) != target
        if not stale and isinstance(self._index, faiss.IndexIVF) and self.params.nlist is None:
            stale = self._count >= 4 * self._trained_on  # grew 4× since it was sized
        if stale:
            self._compact()
            index = self._trained_index(self._vectors[: self._n], max(self._n, self.expected_size or 0))
            for start in range(0, self._n, _ADD_BLOCK):
                indexes.add(index, self._vectors[start : start + _ADD_BLOCK], start)
            self._index = index
            if isinstance(index, faiss.IndexIVF):
                self._calibrate()

    def _calibrate(self, exact_ids: np.ndarray | None = None, seed: int = 1) -> None:
        """Pick nprobe: the fewest lists for which the lower 95% (Wilson) bound of the top-1 class
        agreement with exact search reaches TARGET_AGREEMENT on a sample of stored vectors, each
        queried leaving itself out. `exact_ids`: the probes' exact top-2 ids, when computed
        elsewhere (each rank of a sharded build over its own rows)."""
        rows = indexes.sample_rows(self._n, min(indexes.CALIBRATION_PROBES, self._n), seed=seed)
        alive = self._labels[rows] >= 0
        rows = rows[alive]
        probes = self._vectors[rows]

        def best_other(ids: np.ndarray) -> np.ndarray:
            return np.where(ids[:, 0] == rows, ids[:, 1], ids[:, 0])

        exact = self._exact(probes, 2)[1] if exact_ids is None else exact_ids[alive]
        want = self._labels[best_other(exact)]
        self._calibration = None
        nlist = self._index.nlist
        shortlists = self._rerank_steps()
        for nprobe in [p for p in indexes.NPROBE_STEPS if p < nlist] + [nlist]:
            self._calibration = {"nprobe": nprobe, "probes": len(rows)}
            if shortlists:  # IVF-PQ re-ranked: the nprobe and the shortlist together
                found = self._shortlist_hits(probes, best_other(exact), nprobe, shortlists)
                for size, hits in zip(shortlists, found):
                    self._calibration["candidates"] = size
                    if indexes.wilson_lower(hits, len(rows)) >= indexes.TARGET_AGREEMENT:
                        break
            else:
                got = best_other(self._search_ids(probes, 2, exact=False)[1])
                hits = int(np.sum((got >= 0) & (self._labels[np.maximum(got, 0)] == want)))
            lower = indexes.wilson_lower(hits, len(rows))
            self._calibration["agreement"] = round(hits / max(len(rows), 1), 4)
            self._calibration["lower_bound"] = round(lower, 4)
            if lower >= indexes.TARGET_AGREEMENT:
                break

    def _rerank_steps(self) -> tuple[int, ...]:
        """The shortlist sizes calibration tries (none when nothing is re-ranked)."""
        pq = isinstance(self._index, faiss.IndexIVFPQ)
        reranks = pq and self.params.rerank and self._vectors is not None
        return indexes.RERANK_CANDIDATE_STEPS if reranks else ()

    def _shortlist_hits(
        self, probes: np.ndarray, nearest: np.ndarray, nprobe: int, sizes: tuple[int, ...]
    ) -> list[int]:
        """For each shortlist size: the probes whose exact nearest other vector is among that many
        PQ candidates (re-ranking then finds it), with `nprobe` lists probed."""
        params = indexes.search_params(self._index, self.params, None, nprobe)
        ids = self._index.search(probes, max(sizes) + 1, params=params)[1]  # +1: the probe itself
        where = ids == nearest[:, None]
        rank = np.where(where.any(1), where.argmax(1), np.iinfo(np.int64).max)
        return [int(np.sum(rank < size + 1)) for size in sizes]

    def _nprobe(self) -> int:
        """Lists probed per query: as given, else as calibrated, else the sized default."""
        if self.params.nprobe:
            return self.params.nprobe
        if self._calibration:
            return int(self._calibration["nprobe"])
        return indexes.nprobe_for(self._index.nlist)

    def _trained_index(self, data: np.ndarray, size: int) -> faiss.Index:
        """A new index of this memory's kind, trained on a sample of `data`, sized for `size`."""
        kind = self.index_kind if self.index_kind != "auto" else "ivf"
        if kind in ("ivf", "ivfpq") and len(data) < indexes.MIN_TRAIN[kind]:
            raise ValueError(
                f"an {kind} index needs at least {indexes.MIN_TRAIN[kind]} vectors to train on, "
                f"got {len(data)}: add a larger first batch or call train(sample) first"
            )
        index = indexes.new_index(kind, self.dim, self.metric, self.params, size)
        n_train = indexes.train_sample_size(index, len(data))
        if n_train:
            index.train(data[indexes.sample_rows(len(data), n_train)])
        self._trained_on = size
        self._calibration = None
        return index

    # -- internals: search -----------------------------------------------------------------
    def _queries(self, queries: Any) -> np.ndarray:
        q = as_matrix(queries, self.dim, "queries")
        return normalized(q, "queries") if self.metric == "cosine" else q

    @staticmethod
    def _check_k(k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        return int(k)

    def _check_not_empty(self) -> None:
        if not self._count:
            raise UserInputError("the memory is empty: add labelled embeddings first")

    @staticmethod
    def _blocks(q: np.ndarray, size: int = _QUERY_BLOCK) -> Iterator[torch.Tensor]:
        for start in range(0, len(q), size):
            yield torch.from_numpy(q[start : start + size])

    def _search_ids(self, q: np.ndarray, k: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
        if exact or self._index is None:
            if self._vectors is None:
                raise ValueError("exact search needs the raw vectors (keep_vectors=False here)")
            return self._exact(q, k)
        alive = None
        if isinstance(self._index, faiss.IndexHNSW) and self._n > self._count:
            alive = np.packbits(self._labels[: self._n] >= 0, bitorder="little")
        nprobe = self._nprobe() if isinstance(self._index, faiss.IndexIVF) else None
        params = indexes.search_params(self._index, self.params, alive, nprobe)
        rerank = self.params.rerank if isinstance(self._index, faiss.IndexIVFPQ) else 0
        fetch = k
        if rerank and self._vectors is not None:
            calibrated = (self._calibration or {}).get("candidates", indexes.RERANK_MIN_CANDIDATES)
            fetch = max(k * rerank, int(calibrated))
        dist, ids = self._index.search(q, fetch, params=params)
        if fetch > k:
            return self._rerank(q, ids, k)
        scores = dist if self.metric == "cosine" else -dist
        scores[ids < 0] = -np.inf
        return scores.astype(np.float32), ids

    def _exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Blocked torch brute force over the kept vectors (removed rows masked out)."""
        n = self._n
        kk = min(k, self._count)
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        rows = torch.from_numpy(self._vectors[:n])
        dead = torch.from_numpy(self._labels[:n] < 0) if n > self._count else None
        start_q = 0
        for qb in self._blocks(q):
            best_s = best_i = None
            for start in range(0, n, _ROW_BLOCK):
                xb = rows[start : start + _ROW_BLOCK]
                s = qb @ xb.T
                if self.metric == "l2":
                    s = 2 * s - (xb * xb).sum(1)
                if dead is not None:
                    s.masked_fill_(dead[start : start + len(xb)], -torch.inf)
                top_s, top_i = s.topk(min(kk, len(xb)), dim=1)
                top_i += start
                if best_s is not None:
                    top_s, pick = torch.cat([best_s, top_s], 1).topk(kk, dim=1)
                    top_i = torch.cat([best_i, top_i], 1).gather(1, pick)
                best_s, best_i = top_s, top_i
            if self.metric == "l2":
                best_s = (best_s - (qb * qb).sum(1, keepdim=True)).clamp_max(0)
            end_q = start_q + len(qb)
            out_s[start_q:end_q, :kk] = best_s.numpy()
            out_i[start_q:end_q, :kk] = best_i.numpy()
            start_q = end_q
        return out_s, out_i

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores for approximate candidates `[Q, R]`; keep the best k."""
        out_s = np.empty((len(q), k), np.float32)
        out_i = np.empty((len(q), k), np.int64)
        block = max(1, _RERANK_BYTES // (cand.shape[1] * self.dim * 4))  # gathered rows: ≤ 64 MiB
        for start in range(0, len(q), block):
            c = cand[start : start + block]
            qb = torch.from_numpy(q[start : start + block])
            x = torch.from_numpy(self._vectors[np.maximum(c, 0)])  # [B, R, D]
            s = torch.bmm(x, qb.unsqueeze(2)).squeeze(2)
            if self.metric == "l2":
                s = 2 * s - (x * x).sum(2) - (qb * qb).sum(1, keepdim=True)
            s.masked_fill_(torch.from_numpy(c < 0), -torch.inf)
            top_s, pick = s.topk(k, dim=1)
            out_s[start : start + len(c)] = top_s.numpy()
            ids = np.take_along_axis(c, pick.numpy(), 1)
            ids[~np.isfinite(out_s[start : start + len(c)])] = -1
            out_i[start : start + len(c)] = ids
        return out_s, out_i

    def _prototype_table(self) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(alive class slots, prototypes `[C, D]` float32, their squared norms), cached."""
        with self._cache_lock:
            if self._table is None:
                slots = np.flatnonzero(self._counts > 0)
                protos = self._sums[slots] / self._counts[slots, None]
                sq = (protos * protos).sum(1)
                if self.metric == "cosine":
                    protos = protos / np.sqrt(sq)[:, None]
                self._table = (
                    slots,
                    torch.from_numpy(protos.astype(np.float32)),
                    torch.from_numpy(sq.astype(np.float32)),
                )
            return self._table

    def _proto_block(self, qb: torch.Tensor, protos: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        s = qb @ protos.T
        if self.metric == "l2":
            s = -((qb * qb).sum(1, keepdim=True) - 2 * s + sq).clamp_min(0)
        return s

    def _nearest_prototype(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slots, protos, sq = self._prototype_table()
        best_s, best_j = [], []
        for qb in self._blocks(q, 1024):
            s, j = self._proto_block(qb, protos, sq).max(1)
            best_s.append(s)
            best_j.append(j)
        return slots[torch.cat(best_j).numpy()], torch.cat(best_s).numpy()

    def _knn_vote(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self._search_ids(q, k, exact=False)
        slots = np.where(ids >= 0, self._labels[np.maximum(ids, 0)], -1)
        votes = (slots[:, :, None] == slots[:, None, :]).sum(2)  # [Q, k]: class size per hit
        votes[slots < 0] = -1
        # the most-voted class wins; among equals, the earliest (nearest) hit
        pick = np.argmax(votes * (k + 1) - np.arange(k), axis=1)
        rows = np.arange(len(q))
        out_slots, out_scores = slots[rows, pick], scores[rows, pick].astype(np.float32)
        empty = out_slots < 0
        if empty.any():  # no neighbour found (sparse IVF lists): fall back to prototypes
            out_slots[empty], out_scores[empty] = self._nearest_prototype(q[empty])
        return out_slots, out_scores


def _hash_rows(sources: Sequence[str] | None, n: int) -> np.ndarray:
    """Source hashes (hex sha256 strings, or None for none) as `[n, 16]` uint8 rows."""
    out = np.zeros((n, _HASH_BYTES), np.uint8)
    if sources is None:
        return out
    if isinstance(sources, (str, bytes)) or len(sources) != n:
        raise ValueError(f"sources must hold one hex sha256 per row ({n}), got {sources!r:.60}")
    for i, text in enumerate(sources):
        try:
            out[i] = np.frombuffer(bytes.fromhex(text)[:_HASH_BYTES], np.uint8)
        except (TypeError, ValueError):
            raise ValueError(f"sources[{i}] is {text!r:.60}, not a hex sha256 (32+ digits)") from None
    return out


def _ram_clone(index: faiss.Index) -> faiss.Index:
    """An in-RAM copy of an index whose lists are mapped (faiss cannot clone those)."""
    flags = faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY
    copy_ = faiss.deserialize_index(faiss.serialize_index(index), flags)
    lists = ondisk.ondisk_lists(copy_)
    lists.filename = ondisk.ondisk_lists(index).filename
    lists.do_mmap()
    ondisk.lists_to_ram(copy_)
    return copy_


def _link_writer(source: str, named: dict[str, str] | None = None):  # noqa: ANN202
    """Write an existing, never-modified file: a hard link where possible, else a copy. With
    `named`, record the bundle name it will get (`lists-<sha256[:16]>.ivfdata`)."""

    def write(path: str) -> None:
        os.unlink(path)
        try:
            os.link(source, path)
        except OSError:
            shutil.copyfile(source, path)
        if named is not None:
            named["lists"] = f"lists-{sha256_file(path)[:16]}.ivfdata"

    return write


def _ondisk_index_writer(index: faiss.Index, named: dict[str, str]):  # noqa: ANN202
    """Write an index with mapped lists, naming its lists file by its bundle name (same folder)."""

    def write(path: str) -> None:
        lists = ondisk.ondisk_lists(index)
        mapped = lists.filename
        lists.filename = named["lists"]
        try:
            faiss.write_index(index, path)
        finally:
            lists.filename = mapped

    return write


def _npy_writer(array: np.ndarray):  # noqa: ANN202
    def write(path: str) -> None:
        with open(path, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)

    return write
