"""`protonets embed` under torchrun, with real processes (issue 13, items 2 and 5).

Two CPU ranks (gloo) on this machine with `torchrun --standalone`, and a two-"node" run: two
`torchrun --nnodes 2` launches meeting at a c10d rendezvous on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from protonets.cli import main
from tests.test_embed import FAST, OTHER_CHECKPOINT, make_dataset, spoil, watch_opened_images

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PROTONETS_DIST_TIMEOUT": "120"}


def embed_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "protonets", "embed", str(data), "--output", str(out), "--chunk-size", "3", *FAST, *extra]


def torchrun(
    argv: list[str], nproc: int = 2, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), *argv]
    return subprocess.run(command, env=env or ENV, capture_output=True, text=True, timeout=180)


def two_nodes(argv0: list[str], argv1: list[str]) -> list[subprocess.CompletedProcess]:
    """Two torchrun launches of one process each, as nodes 0 and 1 of a c10d rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launches = []
    for rank, argv in enumerate((argv0, argv1)):
        rendezvous = ["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1"]
        rendezvous += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t"]
        launches.append(
            subprocess.Popen(
                [*TORCHRUN, *rendezvous, *argv],
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for launch in launches:
        out, err = launch.communicate(timeout=180)
        results.append(subprocess.CompletedProcess(launch.args, launch.returncode, out, err))
    return results


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("protonets: error:")]


def assert_same_set(got_dir: Path, want_dir: Path) -> float:
    from protonets.encoders.embedding_set import EmbeddingSet

    assert sorted(os.listdir(got_dir)) == ["embeddings.safetensors", "manifest.json"]  # chunks removed
    got, want = EmbeddingSet.load(got_dir), EmbeddingSet.load(want_dir)
    assert got.paths == want.paths and got.class_names == want.class_names
    assert got.labels.tolist() == want.labels.tolist() and got.fingerprint == want.fingerprint
    diff = float((got.embeddings - want.embeddings).abs().max())
    assert diff <= 1e-4
    return diff


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")  # 12 images: with 3-row chunks, rank 0 rows 0-5, rank 1 rows 6-11


@pytest.fixture
def reference(data: Path, tmp_path: Path) -> Path:
    """The single-process embedding set of `data`."""
    out = tmp_path / "reference"
    assert main(["embed", str(data), "--output", str(out), "--chunk-size", "3", *FAST]) == 0
    return out


def test_two_ranks_write_the_single_process_set(data, reference, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "two"
    proc = torchrun(embed_argv(data, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"{out}: 12 embeddings × 64 from 12 images (4 chunks)"  # rank 0 only
    assert assert_same_set(out, reference) <= 1e-4


def test_two_nodes_write_the_single_process_set(data, reference, tmp_path):
    out = tmp_path / "nodes"
    results = two_nodes(embed_argv(data, out), embed_argv(data, out))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:] + results[1].stderr[-2000:]
    assert sum(r.stdout.count("12 embeddings") for r in results) == 1
    assert_same_set(out, reference)


def test_a_bad_image_on_rank_1_stops_both_ranks_with_one_line(data, tmp_path):
    (data / "c" / "3.png").write_bytes(b"not an image")  # row 11: in rank 1's share only
    out = tmp_path / "bad"
    proc = torchrun(embed_argv(data, out))
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("protonets: error: rank 1: "), proc.stderr[-3000:]
    assert "3.png: not a readable image" in lines[0]
    assert "exitcode  : 2" in proc.stderr  # the ranks' exit status, as torchrun reports it
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr  # no worker traceback
    assert not out.exists()  # checked before anything is written


def test_different_encoders_on_two_nodes_stop_with_one_line(data, tmp_path):
    out = tmp_path / "mixed"
    results = two_nodes(embed_argv(data, out), embed_argv(data, out, "--checkpoint", str(OTHER_CHECKPOINT)))
    assert all(r.returncode != 0 for r in results)
    stderr = results[0].stderr + results[1].stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and "uses another encoder" in lines[0], stderr[-3000:]
    assert "exitcode  : 2" in stderr
    assert not out.exists()


def test_a_killed_rank_is_resumed_embedding_only_the_missing_chunks(
    data, reference, tmp_path, capsys, monkeypatch
):
    """Rank 1 dies after its first chunk; torchrun stops rank 0. A second run reuses the chunks
    that were written and gives the single-process set; a single process (another world size)
    reuses them too, opening none of their images."""
    from protonets.encoders.sharded import KILL_HOOK

    capsys.readouterr()
    out = tmp_path / "killed"
    proc = torchrun(embed_argv(data, out), env={**ENV, KILL_HOOK: "1:1"})
    assert proc.returncode != 0 and "exitcode  : 137" in proc.stderr, proc.stderr[-3000:]
    chunks = sorted(n for n in os.listdir(out / ".shards") if n.startswith("chunk-"))
    starts = [int(n.split("-")[2]) for n in chunks]
    assert 6 in starts and 9 not in starts  # rank 1: its first chunk written, its second not
    paths = sorted((data / c / f"{i}.png") for c in "abc" for i in range(4))
    reused = {str(paths[row]) for start in starts for row in range(start, start + 3)}
    single = tmp_path / "single"
    os.system(f"cp -r '{out}' '{single}'")

    proc = torchrun(embed_argv(data, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"4 chunks, {len(starts)} of 4 chunks reused)" in proc.stdout
    assert_same_set(out, reference)

    argv = embed_argv(data, single)[2:]
    opened = watch_opened_images(monkeypatch)
    assert main(argv) == 0  # one process resumes the two-rank run
    assert f"{len(starts)} of 4 chunks reused" in capsys.readouterr().out
    assert opened and not reused & set(opened)
    assert_same_set(single, reference)


def test_a_resume_splits_the_missing_chunks_across_the_ranks(data, reference, tmp_path):
    """One process killed after chunks 0-2 and 3-5: the missing chunks 6-8 and 9-11 are shared
    by the two ranks of the resumed run (rank 0 takes 6-8), instead of rank 1 embedding both
    while rank 0, whose block of the grid is done, waits. A bad image in rows 6-8 shows it."""
    from protonets.encoders.sharded import KILL_HOOK

    out = tmp_path / "resumed"
    argv = embed_argv(data, out)
    proc = subprocess.run(
        [sys.executable, *argv], env={**ENV, KILL_HOOK: "0:2"}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 137, proc.stderr[-2000:]
    row6 = data / "b" / "2.png"  # rows: a/0-3, b/0-3, c/0-3
    before, stat = spoil(row6), row6.stat()
    proc = torchrun(argv)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "2.png: not a readable image" in lines[0], proc.stderr[-3000:]
    assert not lines[0].startswith("protonets: error: rank 1: ")  # rank 0 checked rows 6-8

    row6.write_bytes(before)
    os.utime(row6, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    proc = torchrun(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(4 chunks, 2 of 4 chunks reused)" in proc.stdout
    assert_same_set(out, reference)


def test_cuda_asked_for_on_a_machine_without_cuda_is_one_line(data, tmp_path):
    """Checked before the process group (no NCCL on a machine without a GPU): one line, from rank 0."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "gpu"
    proc = torchrun(embed_argv(data, out, "--device", "cuda"))
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "--device cuda: no CUDA device is available" in lines[0], proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # the ranks' exit status, as torchrun reports it
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr  # no worker traceback
    assert not out.exists()


def test_a_bad_collective_timeout_is_one_line(data, tmp_path):
    from protonets.encoders.distributed import DEFAULT_TIMEOUT_S

    assert DEFAULT_TIMEOUT_S >= 3 * 3600  # rank-0-only phases (assembly, index merge) take long
    out = tmp_path / "timeout"
    proc = torchrun(embed_argv(data, out), env={**ENV, "PROTONETS_DIST_TIMEOUT": "30m"})
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "PROTONETS_DIST_TIMEOUT='30m'" in lines[0], proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # the ranks' exit status, as torchrun reports it
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr  # no worker traceback
