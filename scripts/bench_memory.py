"""Benchmark the FAISS support memory against exact brute force, side by side in one run.

Part 1 (default): N support vectors (1,000,000 × 512) in overlapping clusters, Q queries
(10,000). Methods: exact torch brute force (the reference), faiss IndexFlatIP, and
`SupportMemory(index="auto")`. For each: build time, resident memory added, queries/s,
recall@1 (same nearest vector as exact) and top-1 class agreement with exact, and the
queries/s ratio to brute force.

Part 2 (`--ivfpq-10m`): an `ivfpq` memory of 10,000,000 × 512 (`--big-n`) added in streamed
chunks generated on the fly (the raw vectors, 20 GB, are never held), with peak resident memory,
build time, queries/s, and recall / class agreement against an exact streamed brute force.

Data: classes are grouped (`--group` classes per group); a class centre is its group centre plus
`--spread` noise, a vector is its class centre plus `--noise` noise (all scaled by 1/√dim), then
L2-normalised. Classes of one group overlap, so exact 1-NN finds the query's class only
60–90% of the time (printed): agreement on well-separated clusters would prove nothing.
Defaults: groups of 10 classes (76% exact 1-NN accuracy at 1M). A harder variant,
`--group 100 --spread 0.35 --noise 1.1` (77%), spreads each class's neighbours over many more
inverted lists; `auto` then calibrates a larger nprobe and gains less over brute force.

Part 3 (`--ondisk EMB MEM`, issue 13): the same data written as an embedding set EMB (streamed,
`--big-n` rows), built into an on-disk IVF-PQ memory MEM by `torchrun --nproc-per-node --ranks`
(`protonets memory build --from-embeddings`; skipped when MEM exists), then loaded memory-mapped
and queried: load time, resident memory (anonymous and file-backed pages) against the in-RAM
size of the same memory, top-1 class agreement and recall@1 with exact search, and queries/s
against exact streamed search over EMB, in the same run. `--compare-ram` also loads MEM into RAM
(`mmap=False`) and times that (only where it fits).

    python scripts/bench_memory.py                 # part 1, defaults of issue 4
    python scripts/bench_memory.py --ivfpq-10m     # part 2 only
    python scripts/bench_memory.py --ondisk /data/emb10m /data/mem10m --ranks 2   # part 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import faiss
import numpy as np
import torch

from protonets import SupportMemory


def rss_gib() -> float:
    """Current resident memory of this process (GiB)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gib() -> float:
    """Peak resident memory since the last `reset_peak()` (GiB)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


class Data:
    """Seeded clustered vectors, generated chunk by chunk (row i has class i % classes)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dim, self.classes, self.noise, self.seed = args.dim, args.classes, args.noise, args.seed
        g = torch.Generator().manual_seed(args.seed)
        groups = (args.classes + args.group - 1) // args.group
        scale = args.dim**-0.5
        group_centres = torch.randn(groups, args.dim, generator=g) * scale
        self.centres = group_centres.repeat_interleave(args.group, 0)[: args.classes]
        self.centres += args.spread * scale * torch.randn(args.classes, args.dim, generator=g)

    def chunk(self, start: int, n: int, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
        # never the centres' seed: with it, rows 0…10999 drew the centres' numbers as their noise
        # and sat beside the centres of the classes the queries come from (0…999), near ties
        # for 4 queries in 10 that no stored vector met (agreement 0.976 there, 1.0 elsewhere)
        g = torch.Generator().manual_seed(self.seed * 7919 + stream * 1_000_003 + start + 1)
        labels = torch.arange(start, start + n) % self.classes
        x = self.centres[labels] + self.noise * self.dim**-0.5 * torch.randn(n, self.dim, generator=g)
        return torch.nn.functional.normalize(x, dim=1).numpy(), labels.numpy()

    def block(self, n: int, stream: int, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty((n, self.dim), np.float32)
        labels = np.empty(n, np.int64)
        for start in range(0, n, chunk):
            out[start : start + chunk], labels[start : start + chunk] = self.chunk(
                start, min(chunk, n - start), stream
            )
        return out, labels


def brute_force(q: np.ndarray, x: np.ndarray, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-1 by blocked torch matrix products: (scores [Q], ids [Q])."""
    xt = torch.from_numpy(x)
    scores, ids = [], []
    for start in range(0, len(q), block):
        s, i = (torch.from_numpy(q[start : start + block]) @ xt.T).max(1)
        scores.append(s)
        ids.append(i)
    return torch.cat(scores).numpy(), torch.cat(ids).numpy()


def report(
    name: str,
    build_s: float,
    rss: float,
    qps: float,
    base_qps: float,
    ids: np.ndarray,
    exact_ids: np.ndarray,
    labels: np.ndarray,
    note: str = "",
) -> None:
    recall = (ids == exact_ids).mean()
    agree = (labels[np.maximum(ids, 0)] == labels[exact_ids]).mean()
    print(
        f"{name:<26} {build_s:>8.1f} {rss:>8.2f} {qps:>10.0f} {qps / base_qps:>7.1f}x "
        f"{recall:>9.4f} {agree:>9.4f}  {note}",
        flush=True,
    )


def header() -> None:
    print(
        f"{'method':<26} {'build s':>8} {'RSS GiB':>8} {'queries/s':>10} {'vs bf':>8} "
        f"{'recall@1':>9} {'agree@1':>9}"
    )


def part_one(args: argparse.Namespace) -> None:
    data = Data(args)
    t0 = time.perf_counter()
    x, y = data.block(args.n, stream=0)
    q, qy = data.block(args.queries, stream=1)
    print(
        f"data: {args.n:,} × {args.dim} support vectors, {args.classes:,} classes "
        f"(groups of {args.group}), {args.queries:,} queries; generated in "
        f"{time.perf_counter() - t0:.0f}s; threads: {args.threads}",
        flush=True,
    )
    print(f"process RSS with the raw data: {rss_gib():.2f} GiB", flush=True)
    header()

    t0 = time.perf_counter()
    _, exact = brute_force(q, x)
    base = args.queries / (time.perf_counter() - t0)
    report("exact torch brute force", 0.0, 0.0, base, base, exact, exact, y)
    print(
        f"  exact 1-NN finds the query's class for {(y[exact] == qy).mean():.1%} of queries "
        "(overlapping clusters: 60–90% wanted)",
        flush=True,
    )

    nf = min(args.flat_queries, args.queries)
    before = rss_gib()
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, ids = flat.search(q[:nf], 1)
    qps = nf / (time.perf_counter() - t0)
    report(
        "faiss IndexFlatIP",
        build,
        rss_gib() - before,
        qps,
        base,
        ids[:, 0],
        exact[:nf],
        y,
        f"(first {nf:,} queries)" if nf < args.queries else "",
    )
    del flat

    before = rss_gib()
    t0 = time.perf_counter()
    memory = SupportMemory(args.dim, "cosine", "auto")
    memory.add(x, y)  # one bulk add: auto sizes and trains its index for all of it
    build = time.perf_counter() - t0
    rss = rss_gib() - before
    info = memory.info()
    t0 = time.perf_counter()
    _, _, ids = memory.search(q, k=1, return_ids=True)
    qps = args.queries / (time.perf_counter() - t0)
    report("SupportMemory auto", build, rss, qps, base, ids[:, 0], exact, y)
    print(
        f"  auto chose {info['structure']}: "
        + ", ".join(f"{k}={info[k]}" for k in ("nlist", "nprobe", "trained_on", "calibration") if k in info),
        flush=True,
    )

    t0 = time.perf_counter()
    labels, _ = memory.classify(q, mode="prototype")
    pqps = args.queries / (time.perf_counter() - t0)
    print(
        f"  classify(mode='prototype') over {len(memory.classes):,} class means: "
        f"{pqps:.0f} queries/s ({pqps / base:.1f}x), accuracy {(labels == qy).mean():.1%} "
        f"(exact 1-NN: {(y[exact] == qy).mean():.1%})",
        flush=True,
    )
    for nprobe in args.sweep:
        memory.params.nprobe = nprobe
        t0 = time.perf_counter()
        _, _, ids = memory.search(q, k=1, return_ids=True)
        qps = args.queries / (time.perf_counter() - t0)
        report(f"  same index, nprobe {nprobe}", 0.0, 0.0, qps, base, ids[:, 0], exact, y)


def part_two(args: argparse.Namespace) -> None:
    data = Data(args)
    n, nq = args.big_n, args.big_queries
    q, _ = data.block(nq, stream=1)
    reset_peak()
    start_rss = rss_gib()
    print(
        f"ivfpq part: {n:,} × {args.dim} vectors streamed in chunks of {args.chunk:,} "
        f"(raw size {n * args.dim * 4 / 2**30:.1f} GiB), {nq:,} queries; threads {args.threads}",
        flush=True,
    )
    t0 = time.perf_counter()
    memory = SupportMemory(args.dim, "cosine", "ivfpq", keep_vectors=False, expected_size=n)
    sample, _ = data.block(min(n, args.train), stream=2)
    memory.train(sample)
    del sample
    train_s = time.perf_counter() - t0
    print(f"  trained on {min(n, args.train):,} vectors in {train_s:.0f}s ({memory.info()})", flush=True)
    for start in range(0, n, args.chunk):
        x, y = data.chunk(start, min(args.chunk, n - start))
        memory.add(x, y)
        if (start // args.chunk) % 10 == 9:
            print(
                f"  added {start + len(x):,} in {time.perf_counter() - t0:.0f}s, RSS {rss_gib():.2f} GiB",
                flush=True,
            )
    build = time.perf_counter() - t0
    peak = peak_rss_gib()
    t0 = time.perf_counter()
    _, _, ids = memory.search(q, k=1, return_ids=True)
    qps = nq / (time.perf_counter() - t0)
    # exact reference, streamed the same way: running best over chunks
    t0 = time.perf_counter()
    best_s = np.full(nq, -np.inf, np.float32)
    best_i = np.zeros(nq, np.int64)
    for start in range(0, n, args.chunk):
        x, _ = data.chunk(start, min(args.chunk, n - start))
        s, i = brute_force(q, x)
        better = s > best_s
        best_s[better], best_i[better] = s[better], i[better] + start
    base = nq / (time.perf_counter() - t0)  # includes regenerating the chunks: an upper bound
    labels_of = np.arange(n) % args.classes if n <= 50_000_000 else None
    print(
        f"  build {build:.0f}s, peak RSS {peak:.2f} GiB (process at start {start_rss:.2f} GiB; "
        f"limit 8 GiB), index {memory.info()}",
        flush=True,
    )
    header()
    report(
        "ivfpq (no raw vectors)",
        build,
        peak,
        qps,
        base,
        ids[:, 0],
        best_i,
        labels_of,
        "(vs streamed brute force incl. data generation)",
    )


def rss_parts_gib() -> dict[str, float]:
    """Resident memory now: total, anonymous (heap) and file-backed (mapped files) pages, GiB."""
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 2**20
    return out


def write_embedding_set(data: Data, n: int, directory: str, chunk: int) -> None:
    """A `protonets embed`-format set of n rows (class i % classes), streamed to disk."""
    from protonets.encoders.embedding_set import save_embedding_set

    t0 = time.perf_counter()
    chunks = (torch.from_numpy(data.chunk(start, min(chunk, n - start))[0]) for start in range(0, n, chunk))
    save_embedding_set(
        directory,
        chunks,
        torch.arange(n, dtype=torch.int64) % data.classes,
        data.dim,
        [f"class{i}" for i in range(data.classes)],
        [str(i) for i in range(n)],
        {"model": "synthetic", "weights_sha256": "0" * 64, "preprocessing": {}},
        info={"synthetic": "scripts/bench_memory.py"},
    )
    seconds = time.perf_counter() - t0
    print(f"  wrote embedding set {directory}: {n:,} × {data.dim} in {seconds:.0f}s", flush=True)


def part_three(args: argparse.Namespace) -> None:
    from protonets.memory.ondisk import EmbeddingFile

    emb_dir, mem_dir = args.ondisk
    data = Data(args)
    n, nq = args.big_n, args.big_queries
    print(f"on-disk part: {n:,} × {args.dim}, {nq:,} queries, build on {args.ranks} rank(s)", flush=True)
    if not os.path.exists(os.path.join(emb_dir, "manifest.json")):
        write_embedding_set(data, n, emb_dir, args.chunk)
    if not os.path.exists(os.path.join(mem_dir, "manifest.json")):
        build = ["-m", "protonets", "memory", "build", mem_dir, "--from-embeddings", emb_dir]
        build += ["--index", "ivfpq", "--quiet"]
        if args.ranks == 1:
            cmd = [sys.executable, *build, "--on-disk"]
        else:
            launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks)]
            cmd = [sys.executable, *launcher, *build]
        for flag, value in (("--rerank", args.rerank), ("--nprobe", args.nprobe)):
            if value is not None:
                cmd += [flag, str(value)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // args.ranks))}
        print("  $ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        print(f"  build: {time.perf_counter() - t0:.0f}s wall on {args.ranks} rank(s)", flush=True)
    q, _ = data.block(nq, stream=1)
    emb = EmbeddingFile(emb_dir, verify=False)
    labels = emb.labels()
    files = json.load(open(os.path.join(mem_dir, "manifest.json")))["files"]
    ram_gib = (
        sum(
            e["bytes"] for role, e in files.items() if role in ("vectors.npy", "lists.ivfdata", "index.faiss")
        )
        / 2**30
    )
    before = rss_parts_gib()
    t0 = time.perf_counter()
    memory = SupportMemory.load(mem_dir)
    load_s = time.perf_counter() - t0
    if args.recalibrate:  # the last step of a build, run again with this release's calibration
        t1 = time.perf_counter()
        calibration = memory.calibrate()
        print(f"  recalibrated in {time.perf_counter() - t1:.0f}s: {calibration}", flush=True)
    loaded = rss_parts_gib()
    reset_peak()
    t0 = time.perf_counter()
    _, _, ids = memory.search(q, k=1, return_ids=True)
    qps = nq / (time.perf_counter() - t0)
    after = rss_parts_gib()
    peak = peak_rss_gib()
    # exact reference over the embedding set, streamed from its memory map (same vectors)
    t0 = time.perf_counter()
    best_s = np.full(nq, -np.inf, np.float32)
    best_i = np.zeros(nq, np.int64)
    for start in range(0, n, args.chunk):
        s, i = brute_force(q, emb.rows(start, min(n, start + args.chunk)))
        better = s > best_s
        best_s[better], best_i[better] = s[better], i[better] + start
    base = nq / (time.perf_counter() - t0)
    info = memory.info()
    print(
        f"  loaded mapped in {load_s:.1f}s (checksums of every file included); index "
        + ", ".join(
            f"{k}={info[k]}"
            for k in ("nlist", "nprobe", "pq_m", "rerank", "on_disk", "calibration")
            if k in info
        ),
        flush=True,
    )
    print(
        f"  RSS GiB: before load {before['VmRSS']:.2f}; after load {loaded['VmRSS']:.2f} "
        f"(anon {loaded['RssAnon']:.2f}, file {loaded['RssFile']:.2f}); after {nq:,} queries "
        f"{after['VmRSS']:.2f} (anon {after['RssAnon']:.2f}, file {after['RssFile']:.2f}), peak "
        f"{peak:.2f}; the memory in RAM would hold {ram_gib:.2f} GiB (vectors + lists + index)",
        flush=True,
    )
    header()
    report(
        "ivfpq on disk + rerank",
        0.0,
        after["VmRSS"] - before["VmRSS"],
        qps,
        base,
        ids[:, 0],
        best_i,
        labels,
        "(RSS: growth over the process before load)",
    )
    if args.compare_ram:
        del memory
        before = rss_parts_gib()
        t0 = time.perf_counter()
        memory = SupportMemory.load(mem_dir, mmap=False)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, _, ids = memory.search(q, k=1, return_ids=True)
        qps = nq / (time.perf_counter() - t0)
        rss = rss_gib() - before["VmRSS"]
        report(
            "same memory read into RAM",
            load_s,
            rss,
            qps,
            base,
            ids[:, 0],
            best_i,
            labels,
            "(build s column: load s)",
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="support vectors (part 1)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--group", type=int, default=10, help="overlapping classes per group")
    p.add_argument("--spread", type=float, default=0.3, help="class centres around group centre")
    p.add_argument("--noise", type=float, default=1.2, help="vectors around class centre")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch and faiss threads (all methods)")
    p.add_argument("--chunk", type=int, default=100_000, help="vectors per add() call")
    p.add_argument(
        "--flat-queries",
        type=int,
        default=2_000,
        help="queries timed for faiss flat (it is as slow as brute force)",
    )
    p.add_argument("--sweep", type=int, nargs="*", default=[], help="extra nprobe values to time")
    p.add_argument("--ivfpq-10m", action="store_true", help="run part 2 (only)")
    p.add_argument("--big-n", type=int, default=10_000_000, help="vectors in part 2")
    p.add_argument("--big-queries", type=int, default=1_000, help="queries in part 2")
    p.add_argument("--train", type=int, default=65_536, help="training sample in part 2")
    p.add_argument("--ondisk", nargs=2, metavar=("EMB", "MEM"), help="run part 3 (only)")
    p.add_argument("--ranks", type=int, default=2, help="torchrun processes building part 3")
    p.add_argument("--rerank", type=int, default=None, help="part 3: memory build --rerank")
    p.add_argument("--nprobe", type=int, default=None, help="part 3: memory build --nprobe")
    p.add_argument("--compare-ram", action="store_true", help="part 3: also load MEM into RAM")
    p.add_argument(
        "--recalibrate", action="store_true", help="part 3: calibrate MEM's search again after loading it"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.ondisk:
        part_three(args)
    elif args.ivfpq_10m:
        part_two(args)
    else:
        part_one(args)


if __name__ == "__main__":
    main()
