"""`protonets memory build --from-embeddings` under torchrun (real processes, CPU, gloo): the
two-rank on-disk memory answers like a single-process build, loads memory-mapped, re-ranks
IVF-PQ candidates exactly, refuses bad input on every rank with one line, and runs on two
"nodes" (two torchrun launches on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from protonets import SupportMemory
from protonets.encoders.embedding_set import EmbeddingSet
from protonets.memory import ondisk

N, DIM, CLASSES = 4000, 32, 16
FP_A = {"model": "resnet18", "weights_sha256": "a" * 64, "preprocessing": {"size": 224}}
FP_B = {"model": "vit_tiny", "weights_sha256": "b" * 64, "preprocessing": {"size": 224}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ERROR = re.compile(r"^protonets: error: ", re.M)


def _clustered(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(CLASSES, DIM)).astype(np.float32)
    y = np.arange(n) % CLASSES
    return (centres[y] + 0.8 * g.normal(size=(n, DIM))).astype(np.float32), y, centres


def _save_set(path, fingerprint) -> str:
    x, y, _ = _clustered(N, seed=1)
    names = [f"class{i}" for i in range(CLASSES)]
    EmbeddingSet(
        torch.from_numpy(x), torch.from_numpy(y), names, [f"i/{i}.png" for i in range(N)], fingerprint
    ).save(path)
    return str(path)


@pytest.fixture(scope="module")
def emb(tmp_path_factory) -> str:
    return _save_set(tmp_path_factory.mktemp("emb") / "set", FP_A)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return _clustered(300, seed=7)[0]


def _torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ("--standalone",)) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *extra,
        "--nproc-per-node",
        str(nproc),
        "-m",
        "protonets",
        "memory",
        "build",
        *args,
    ]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)


def _single(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "protonets", "memory", "build", *args])


def _files(directory) -> dict:
    with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as handle:
        return {role: entry["sha256"] for role, entry in json.load(handle)["files"].items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory, emb) -> dict[str, str]:
    """IVF and IVF-PQ memories: two ranks, one process on disk, one process in RAM."""
    root = tmp_path_factory.mktemp("mem")
    out = {}
    for kind in ("ivf", "ivfpq"):
        opts = ["--from-embeddings", emb, "--index", kind, "--quiet"] + (
            ["--pq-m", "4"] if kind == "ivfpq" else []
        )
        for how in ("ranks", "disk", "ram"):
            d = str(root / f"{kind}-{how}")
            if how == "ranks":
                done = _run(_torchrun(d, *opts))
            else:
                done = _single(d, *opts, *(["--on-disk"] if how == "disk" else []))
            assert done.returncode == 0, done.stderr[-2000:]
            out[f"{kind}-{how}"] = d
    return out


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_two_ranks_answer_as_one_process(built, queries, kind):
    ranks, disk, ram = (SupportMemory.load(built[f"{kind}-{h}"]) for h in ("ranks", "disk", "ram"))
    # same seeded sample → same quantizer; shards merged in row order → the very same files
    assert _files(built[f"{kind}-ranks"]) == _files(built[f"{kind}-disk"])
    want = ram.search(queries, k=5, return_ids=True)
    for memory in (ranks, disk):
        got = memory.search(queries, k=5, return_ids=True)
        np.testing.assert_array_equal(got[2], want[2])
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)
        assert memory.info()["nprobe"] == ram.info()["nprobe"]
        labels, _ = memory.classify(queries)
        np.testing.assert_array_equal(labels, ram.classify(queries)[0])
    assert ranks.encoder_fingerprint == FP_A
    assert not [n for n in os.listdir(built[f"{kind}-ranks"]) if n.startswith(".protonets-tmp")]


def test_loaded_memory_is_memory_mapped(built):
    directory = built["ivfpq-ranks"]
    memory = SupportMemory.load(directory)
    lists = ondisk.ondisk_lists(memory._index)
    assert memory.on_disk and lists is not None and lists.read_only
    assert isinstance(memory._vectors, np.memmap)
    with open("/proc/self/maps", encoding="utf-8") as handle:
        maps = handle.read()
    names = [e["file"] for e in json.load(open(os.path.join(directory, "manifest.json")))["files"].values()]
    for stem in ("lists-", "vectors-"):
        (name,) = [n for n in names if n.startswith(stem)]
        assert os.path.join(os.path.realpath(directory), name) in maps
    in_ram = SupportMemory.load(directory, mmap=False)
    assert not in_ram.on_disk and not isinstance(in_ram._vectors, np.memmap)


def test_reranking_makes_ivfpq_agree_with_exact(built, queries):
    memory = SupportMemory.load(built["ivfpq-ranks"])
    assert memory.params.rerank == 10
    _, exact_labels, exact_ids = memory.search(queries, k=1, exact=True, return_ids=True)
    _, labels, ids = memory.search(queries, k=1, return_ids=True)
    memory.params.rerank = 0
    compressed = (memory.search(queries, k=1, return_ids=True)[2] == exact_ids).mean()
    recall = (ids == exact_ids).mean()
    assert (labels == exact_labels).mean() >= 0.98
    assert recall > compressed + 0.1, (recall, compressed)  # PQ alone: 4 bytes a vector


def _one_error_line(done: subprocess.CompletedProcess, fragment: str) -> None:
    text = done.stdout + done.stderr
    assert done.returncode != 0
    assert len(ERROR.findall(text)) == 1, text[-3000:]
    line = next(x for x in text.splitlines() if x.startswith("protonets: error: "))
    assert fragment in line, line
    codes = re.findall(r"^\s+exitcode\s+:\s*(-?\d+)", text, re.M)  # torchrun's failure summary
    assert "2" in codes and set(codes) <= {"2", "-15"}, text[-3000:]  # 2, or stopped by torchrun


def test_missing_embeddings_stop_every_rank(tmp_path):
    done = _run(_torchrun(str(tmp_path / "m"), "--from-embeddings", str(tmp_path / "nope"), "--index", "ivf"))
    _one_error_line(done, "does not exist")
    assert not (tmp_path / "m").exists()


def test_embeddings_of_another_encoder_are_refused(tmp_path, built):
    other = _save_set(tmp_path / "other", FP_B)
    target = tmp_path / "m"
    not_a_set = _single(str(target), "--from-embeddings", built["ivf-ram"], "--index", "ivf")
    assert not_a_set.returncode == 2 and "not an embedding set" in not_a_set.stderr
    shutil.copytree(built["ivf-ranks"], target)
    before = _files(target)
    done = _run(_torchrun(str(target), "--from-embeddings", other, "--index", "ivf"))
    _one_error_line(done, "built with encoder resnet18")
    assert _files(target) == before


def test_foreign_folder_is_refused_and_left_alone(tmp_path, emb):
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    done = _run(_torchrun(str(target), "--from-embeddings", emb, "--index", "ivfpq"))
    _one_error_line(done, "notes.txt")
    assert sorted(os.listdir(target)) == ["notes.txt"]


def test_wrong_index_kind_under_torchrun(tmp_path, emb):
    done = _run(_torchrun(str(tmp_path / "m"), "--from-embeddings", emb, "--index", "hnsw"))
    _one_error_line(done, "--index ivf")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes(tmp_path, emb, built):
    target = str(tmp_path / "m")
    port = _free_port()
    launches = [
        subprocess.Popen(
            _torchrun(
                target,
                "--from-embeddings",
                emb,
                "--index",
                "ivf",
                "--quiet",
                nproc=1,
                extra=(
                    "--nnodes",
                    "2",
                    "--node-rank",
                    str(rank),
                    "--rdzv-backend",
                    "c10d",
                    "--rdzv-endpoint",
                    f"127.0.0.1:{port}",
                ),
            ),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=180) for p in launches]
    assert [p.returncode for p in launches] == [0, 0], outputs
    assert _files(target) == _files(built["ivf-disk"])
