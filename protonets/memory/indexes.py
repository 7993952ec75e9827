"""FAISS indexes behind SupportMemory, and the sizing rules of `index="auto"`.

Every faiss index here stores our own row ids (0, 1, 2, … in insertion order), so one id names
the same vector in the index, in the labels array and in the optional raw-vector store.
The constants below were picked by measurement on this project's 2-core machine; see
`scripts/bench_memory.py` and the notes beside each one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import faiss
import numpy as np

APPROXIMATE = ("hnsw", "ivf", "ivfpq")

#: `auto` keeps exact (torch matrix-product) search below this many vectors. At 100k × 512 the
#: exact path still answers ~800 queries/s on 2 cores, and training an IVF index costs seconds.
EXACT_LIMIT = 100_000

#: Training vectors per inverted list (k-means sample = this × nlist, capped at the data size).
#: Measured at 1M × 512: 16/list gave the same recall as 32/list at half the training time.
TRAIN_PER_LIST = 16

#: k-means iterations for the coarse quantizer (faiss default 25; 10 loses no recall here).
KMEANS_ITERATIONS = 10

#: Fewest vectors an IVF (flat) / IVF-PQ index is trained on; below, search stays exact.
MIN_TRAIN = {"ivf": 1_000, "ivfpq": 2_560}

#: Most inverted lists sized automatically. Adding a vector costs nlist × dim multiply-adds
#: (its nearest list): 10M × 512 into 16384 lists is ~170 TFLOP, over half an hour on 2 cores.
MAX_AUTO_NLIST = 4096

#: With kept vectors, nprobe is calibrated after training: the smallest of NPROBE_STEPS for which
#: the *lower* 95% Wilson bound of the top-1 class agreement with exact search, measured on
#: CALIBRATION_PROBES stored vectors used as leave-one-out queries, reaches TARGET_AGREEMENT.
#: 2000 probes make that reachable at a measured agreement of 0.9945 (11 misses); 500 could
#: only reach it with no miss at all. Aiming at the bound, not the point estimate, keeps fresh
#: queries at ≥ 0.99 (scripts/study_auto_index.py: 20 seeds, 200k × 128).
TARGET_AGREEMENT = 0.99
CALIBRATION_PROBES = 2000
CONFIDENCE_Z = 1.96
NPROBE_STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)

#: IVF-PQ re-ranking scores at least this many PQ candidates exactly (more: `rerank × k`). PQ
#: codes of 64 bytes a 512-dim vector misorder near neighbours: at 200k × 512 (scripts/
#: bench_memory.py --ondisk) the true nearest vector was among the 10 best PQ candidates for
#: only 76% of queries, among 200 for 98-99% (then the lists probed, not PQ, are the limit).
#: Gathering 256 raw vectors costs a query 512 KiB of reads. Without a floor calibration could
#: not reach TARGET_AGREEMENT and probed every list (50k × 512: all 1024 lists, agreement 0.86
#: on fresh queries); with it, 8 lists and 0.999 (200k: 4 of 2048 lists, 5-9× the queries/s of exact search).
RERANK_MIN_CANDIDATES = 256

#: Shortlists an IVF-PQ memory with kept vectors may calibrate to (PQ candidates re-ranked
#: exactly). The 256 floor holds to 1M × 512; at 10M the true neighbour falls outside 256
#: candidates for 3% of queries (agreement 0.97 even probing every list), so calibration grows
#: the shortlist too: for each nprobe in turn, the smallest shortlist whose lower bound reaches
#: TARGET_AGREEMENT, counting a probe as a hit only when its exact neighbour is in the shortlist.
RERANK_CANDIDATE_STEPS = (256, 512, 1024, 2048, 4096)


@dataclass
class IndexParams:
    """Build and search parameters of the approximate index (None: sized to the data)."""

    nlist: int | None = None
    nprobe: int | None = None
    pq_m: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    rerank: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def wilson_lower(successes: int, trials: int, z: float = CONFIDENCE_Z) -> float:
    """Lower end of the Wilson score interval of a proportion (0 with no trials)."""
    if trials <= 0:
        return 0.0
    p = successes / trials
    centre = p + z * z / (2 * trials)
    margin = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return (centre - margin) / (1 + z * z / trials)


def faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def nlist_for(n: int) -> int:
    """Inverted lists for n vectors: the power of two nearest 4·√n, within [16, MAX_AUTO_NLIST]."""
    target = 4 * math.sqrt(max(n, 1))
    return int(min(MAX_AUTO_NLIST, max(16, 2 ** round(math.log2(target)))))


def nprobe_for(nlist: int) -> int:
    """Uncalibrated default (no kept vectors): 16 of 4096 lists, scaled with √nlist."""
    return max(1, min(nlist, round(16 * math.sqrt(nlist / 4096))))


def pq_m_for(dim: int) -> int:
    """PQ sub-quantizers: dim/8 (64 bytes a vector at 512 dims), a divisor of dim."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def new_index(kind: str, dim: int, metric: str, params: IndexParams, n: int) -> faiss.Index:
    """An empty (untrained) faiss index of `kind` for about `n` vectors."""
    fm = faiss_metric(metric)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, fm)
        index.hnsw.efConstruction = params.ef_construction
        return index
    nlist = params.nlist or nlist_for(n)
    quantizer = faiss.IndexFlat(dim, fm)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, fm)
    elif kind == "ivfpq":
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, params.pq_m or pq_m_for(dim), 8, fm)
        index.do_polysemous_training = False  # slow, and unused by our searches
        index.pq.cp.min_points_per_centroid = 1  # small samples are deliberate: no warnings
        index.pq.cp.niter = KMEANS_ITERATIONS
    else:
        raise ValueError(f"unknown index kind '{kind}'")
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.min_points_per_centroid = 1
    index.cp.seed = 1234
    return index


def train_sample_size(index: faiss.Index, n: int) -> int:
    """How many vectors to train `index` on, out of n available."""
    if isinstance(index, faiss.IndexIVF):
        size = TRAIN_PER_LIST * index.nlist
        if isinstance(index, faiss.IndexIVFPQ):
            size = max(size, 64 * 256)  # PQ codebooks: 256 centroids per sub-quantizer
        return min(n, size)
    return 0


def sample_rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Sorted row numbers of a seeded uniform sample of `size` out of `n`."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def add(index: faiss.Index, x: np.ndarray, first_id: int) -> None:
    """Add rows with ids first_id, first_id + 1, … (HNSW numbers rows itself, in order)."""
    if isinstance(index, faiss.IndexHNSW):
        if index.ntotal != first_id:
            raise RuntimeError("HNSW index out of step with the memory's ids")
        index.add(x)
    else:
        index.add_with_ids(x, np.arange(first_id, first_id + len(x), dtype=np.int64))


def search_params(
    index: faiss.Index, params: IndexParams, alive: np.ndarray | None, nprobe: int | None = None
):
    """Per-call search parameters (thread-safe: the index itself is never modified).

    `alive` is a bitmap (np.packbits, little bit order) of ids still in the memory; HNSW cannot
    delete, so removed ids are filtered out during its search.
    """
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=nprobe or nprobe_for(index.nlist))
    p = faiss.SearchParametersHNSW(efSearch=params.ef_search)
    if alive is not None:
        selector = faiss.IDSelectorBitmap(len(alive), faiss.swig_ptr(alive))
        p.sel = selector
        p.referenced_objects = [selector, alive]  # keep both alive as long as p
    return p


def kind_of(index: faiss.Index) -> str:
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    return "ivf"
