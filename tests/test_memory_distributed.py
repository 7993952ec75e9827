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
from protonets.encoders import UserInputError
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
    assert not_a_set.returncode == 2 and "not a protonets.EmbeddingSet" in not_a_set.stderr
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


def _save_edited(path, edit=None, names=None) -> str:
    """The test set with `edit(x, y)` applied; labels are written past EmbeddingSet's own check
    (a set altered by another tool, its manifest checksums made to match)."""
    from safetensors.torch import save_file

    from protonets.encoders.atomic import manifest_checksum, sha256_file

    x, y, _ = _clustered(N, seed=1)
    names = names or [f"class{i}" for i in range(CLASSES)]
    EmbeddingSet(
        torch.from_numpy(x), torch.from_numpy(y), names, [f"i/{i}.png" for i in range(N)], FP_A
    ).save(path)
    if edit is not None:
        x, y = x.copy(), y.astype(np.int64).copy()
        edit(x, y)
        data = os.path.join(path, "embeddings.safetensors")
        save_file({"embeddings": torch.from_numpy(x), "labels": torch.from_numpy(y)}, data)
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as handle:
            manifest = json.load(handle)
        manifest["data"].update(sha256=sha256_file(data), bytes=os.path.getsize(data))
        manifest["checksum"] = manifest_checksum(manifest)
        with open(os.path.join(path, "manifest.json"), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle)
    return str(path)


def _nan(row):
    def edit(x, y):
        x[row] = np.nan

    return edit


def _zero(row):
    def edit(x, y):
        x[row] = 0

    return edit


def _label(row):
    def edit(x, y):
        y[row] = CLASSES + 3

    return edit


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (_nan(3999), "rank 1: embedding row 3999 holds NaN or infinity"),  # rank 1's add loop
        (_zero(3999), "rank 1: embedding row 3999 holds all zeros"),
        (_label(3999), "rank 1: '"),  # "... has labels outside its 16 class names"
        (_nan(10), "embedding row 10 holds NaN"),  # in rank 0's training sample
    ],
    ids=["nan-rank1", "zero-rank1", "label-rank1", "nan-training"],
)
def test_bad_row_on_one_rank_stops_every_rank(tmp_path, edit, fragment):
    bad = _save_edited(tmp_path / "bad", edit)
    target = tmp_path / "m"
    done = _run(
        _torchrun(str(target), "--from-embeddings", bad, "--index", "ivf", "--nlist", "16", "--nprobe", "4")
    )
    _one_error_line(done, fragment)
    assert done.returncode == 2 or "exitcode  : 2" in done.stderr  # torchrun passes 2 on
    assert os.listdir(target) in ([], [".protonets.lock"])  # nothing saved, work folder gone


def _build_here(emb_dir: str, target: str):
    from protonets.encoders.distributed import World
    from protonets.memory.indexes import IndexParams

    return ondisk.build(
        World(),
        ondisk.EmbeddingFile(emb_dir),
        target,
        kind="ivfpq",
        metric="cosine",
        params=IndexParams(16, 4, 4, rerank=10),
        fingerprint=FP_A,
    )


def test_built_memory_outlives_its_work_folder(tmp_path, emb, queries):
    memory = _build_here(emb, str(tmp_path / "m"))
    assert memory.on_disk
    want = memory.search(queries, k=3, return_ids=True)
    memory.save(tmp_path / "copy")  # the work folder is gone: its files must not be needed
    copy = SupportMemory.load(tmp_path / "copy")
    got = copy.search(queries, k=3, return_ids=True)
    np.testing.assert_array_equal(got[2], want[2])


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_work_folders_are_removed(tmp_path, emb):
    target = tmp_path / "m"
    target.mkdir()
    dead = target / f".protonets-tmp-{_dead_pid()}-{'0' * 16}-build"
    alive = target / f".protonets-tmp-{os.getppid()}-{'1' * 16}-build"  # a running build: kept
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "vectors.npy").write_bytes(b"x" * 1000)
    _build_here(emb, str(target))
    assert not dead.exists()
    assert (alive / "vectors.npy").exists()


SIGTERMED = """
import os, signal, sys, time
from protonets.encoders.distributed import World
from protonets.memory import ondisk
from protonets.memory.indexes import IndexParams

def stopped(*args, **kwargs):  # torchrun stops a rank while it assembles
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

ondisk._assemble = stopped
try:
    ondisk.build(World(), ondisk.EmbeddingFile(sys.argv[1]), sys.argv[2], kind="ivf", metric="cosine",
                 params=IndexParams(16, 4), fingerprint=None)
except SystemExit:
    print("handler restored:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    raise
"""


def test_sigterm_removes_the_work_folder(tmp_path, emb):
    target = tmp_path / "m"
    done = subprocess.run(
        [sys.executable, "-c", SIGTERMED, emb, str(target)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 128 + 15, (done.returncode, done.stderr[-2000:])
    assert "handler restored: True" in done.stdout
    assert [n for n in os.listdir(target) if n.startswith(".protonets-tmp")] == []


@pytest.mark.parametrize("on_disk", [False, True], ids=["ram", "disk"])
def test_duplicate_class_names_are_refused(tmp_path, on_disk):
    names = [f"class{i}" for i in range(CLASSES)]
    names[9] = "class3"
    dup = _save_edited(tmp_path / "dup", names=names)
    done = _single(
        str(tmp_path / "m"), "--from-embeddings", dup, "--index", "ivf", *(["--on-disk"] if on_disk else [])
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(ERROR.findall(done.stderr)) == 1
    assert dup in done.stderr and "'class3' twice" in done.stderr
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_one_verified_reader_maps_the_set(tmp_path, emb):
    from protonets.encoders.embedding_set import read_mapped

    manifest, x, y = read_mapped(emb)
    assert isinstance(x, np.memmap) and isinstance(y, np.memmap) and x.shape == (N, DIM)
    loaded = EmbeddingSet.load(emb)
    np.testing.assert_array_equal(loaded.embeddings.numpy(), x)
    np.testing.assert_array_equal(loaded.labels.numpy(), y)
    altered = shutil.copytree(emb, tmp_path / "altered")
    data = altered / "embeddings.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1  # same size, other bytes
    data.write_bytes(bytes(raw))
    read_mapped(altered, verify=False)  # size only: the cheap check of the other ranks
    for read in (lambda: read_mapped(altered), lambda: EmbeddingSet.load(altered)):
        with pytest.raises(UserInputError, match="truncated or altered"):
            read()
