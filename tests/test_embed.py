"""`protonets embed` in one process, and `protonets eval --embeddings` (issue 13, item 1)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protonets.cli import main

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "protonet-conv4-omniglot"
OTHER_CHECKPOINT = REPO / "checkpoints" / "protonet-conv4-omniglot-1shot"
#: conv4 from a bundled checkpoint: small, offline and quick on the CPU
ENCODER = ["--encoder", "conv4", "--checkpoint", str(CHECKPOINT), "--device", "cpu"]
FAST = [*ENCODER, "--workers", "0", "--batch-size", "4", "--quiet"]


def make_dataset(root: Path, classes: str = "abc", per_class: int = 4, seed: int = 0) -> Path:
    """`root/<class>/<i>.png`: small random greyscale images."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(28, 28), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i}.png")
    return root


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) -> sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def spoil(path: Path) -> bytes:
    """Make an image unreadable without changing its size or modification time; its old bytes."""
    before, stat = path.read_bytes(), path.stat()
    path.write_bytes(b"x" * len(before))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return before


def watch_opened_images(monkeypatch) -> list[str]:  # noqa: ANN001
    """The paths of the images that embedding opens from now on, in this process (--workers 0)."""
    from protonets.encoders import encoder

    opened: list[str] = []
    real = encoder.open_image

    def open_and_note(item):  # noqa: ANN001, ANN202
        opened.append(os.path.abspath(getattr(item, "path", item)))
        return real(item)

    monkeypatch.setattr(encoder, "open_image", open_and_note)
    return opened


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("protonets: error: "), err
    return lines[0]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


def test_embed_writes_the_portable_format_and_round_trips(data, tmp_path, capsys):
    from safetensors.torch import load_file

    from protonets.encoders import create_encoder
    from protonets.encoders.embedding_set import EmbeddingSet
    from protonets.eval.datasets import load_dataset

    out = tmp_path / "set"
    assert main(["embed", str(data), "--output", str(out), "--chunk-size", "5", *FAST]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: 12 embeddings × 64 from 12 images (3 chunks)"
    assert sorted(os.listdir(out)) == ["embeddings.safetensors", "manifest.json"]  # chunks removed
    tensors = load_file(out / "embeddings.safetensors")
    assert tensors["embeddings"].dtype.is_floating_point and tuple(tensors["embeddings"].shape) == (12, 64)
    assert (
        str(tensors["embeddings"].dtype) == "torch.float32" and str(tensors["labels"].dtype) == "torch.int64"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["class_names"] == ["a", "b", "c"]
    assert manifest["paths"] == [f"{c}/{i}.png" for c in "abc" for i in range(4)]  # relative, in row order
    assert tensors["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4

    encoder = create_encoder("conv4", checkpoint_path=CHECKPOINT)
    assert manifest["fingerprint"] == encoder.fingerprint
    loaded = EmbeddingSet.load(out, fingerprint=encoder.fingerprint)
    dataset = load_dataset("folder", data)
    direct = encoder.embed(dataset.items, batch_size=4, num_workers=0, progress=False).embeddings
    assert float((loaded.embeddings - direct).abs().max()) <= 1e-5
    assert loaded.paths == manifest["paths"] and loaded.labels.tolist() == dataset.labels.tolist()


def test_eval_from_embeddings_equals_eval_on_images(data, tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["embed", str(data), "--output", str(out), *FAST]) == 0
    episodes = ["--ways", "3", "--shots", "1", "2", "--queries", "2", "--episodes", "30", "--seed", "5"]
    episodes += ["--method", "prototype", "knn", "--quiet"]
    on_images = [
        "eval",
        "--data",
        str(data),
        *episodes,
        *FAST,
        "--no-cache",
        "--output",
        str(tmp_path / "a.json"),
    ]
    assert main(on_images) == 0
    assert main(["eval", "--embeddings", str(out), *episodes, "--output", str(tmp_path / "b.json")]) == 0
    capsys.readouterr()
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert a["results"] == b["results"] and len(a["results"]) == 4
    assert a["encoder"] == b["encoder"] and b["dataset"]["images"] == 12 and b["dataset"]["classes"] == 3

    # an encoder named beside the set must be the one that made it
    assert main(["eval", "--embeddings", str(out), "--encoder", "resnet18", "--quiet"]) == 2
    assert "was embedded by conv4" in one_error_line(capsys.readouterr().err)
    other = ["--encoder", "conv4", "--checkpoint", str(OTHER_CHECKPOINT), "--quiet"]
    assert main(["eval", "--embeddings", str(out), *episodes, *other]) == 2
    assert "embedded by another encoder (conv4)" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--data", "DATA"], "--data conflicts with --embeddings"),
        (["--dataset", "omniglot"], "--dataset conflicts with --embeddings"),
        (["--split", "test"], "--split conflicts with --embeddings"),
    ],
)
def test_eval_embeddings_conflicts_with_the_image_options(data, tmp_path, capsys, extra, words):
    extra = [str(data) if e == "DATA" else e for e in extra]
    assert main(["eval", "--embeddings", str(tmp_path), *extra, "--quiet"]) == 2
    assert words in one_error_line(capsys.readouterr().err)


def test_eval_needs_data_or_embeddings_and_refuses_a_folder_that_is_no_set(tmp_path, capsys):
    assert main(["eval", "--quiet"]) == 2
    assert "--data is required" in one_error_line(capsys.readouterr().err)
    assert main(["eval", "--embeddings", str(tmp_path), "--quiet"]) == 2
    assert "not an embedding set" in one_error_line(capsys.readouterr().err)


def test_bad_inputs_exit_2_with_one_line_before_anything_is_written(data, tmp_path, capsys):
    out = tmp_path / "set"
    (data / "c" / "3.png").write_bytes(b"not an image")
    assert main(["embed", str(data), "--output", str(out), *FAST]) == 2
    assert "3.png: not a readable image" in one_error_line(capsys.readouterr().err)
    assert not out.exists()

    assert main(["embed", str(data), "--output", str(out), "--skip-bad", *FAST]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 11 and "c/3.png" not in manifest["paths"]
    assert manifest["info"]["skipped"] == ["c/3.png"]

    text = tmp_path / "weights.txt"
    text.write_text("hello")
    bad_checkpoint = ["--encoder", "conv4", "--checkpoint", str(text), "--quiet"]
    assert main(["embed", str(data), "--output", str(tmp_path / "x"), *bad_checkpoint]) == 2
    assert "weights.txt" in one_error_line(capsys.readouterr().err)

    assert main(["embed", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x"), *FAST]) == 2
    assert "nowhere" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()

    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    assert main(["embed", str(data), "--output", str(a_file), "--skip-bad", *FAST]) == 2
    assert "is not a folder" in one_error_line(capsys.readouterr().err)

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    assert main(["embed", str(data), "--output", str(foreign), "--skip-bad", *FAST]) == 2
    assert "holiday.jpg" in one_error_line(capsys.readouterr().err)
    assert os.listdir(foreign) == ["holiday.jpg"]


def test_a_set_of_another_dataset_or_encoder_is_refused_and_untouched_and_force_replaces_it(
    data, tmp_path, capsys
):
    out = tmp_path / "set"
    assert main(["embed", str(data), "--output", str(out), *FAST]) == 0
    before = folder_digest(out)
    other = make_dataset(tmp_path / "other", classes="xy", per_class=3, seed=1)
    assert main(["embed", str(other), "--output", str(out), *FAST]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "another dataset or encoder" in line and "--force" in line and "12 images" in line
    other_encoder = [*FAST, "--checkpoint", str(OTHER_CHECKPOINT)]
    assert main(["embed", str(data), "--output", str(out), *other_encoder]) == 2
    assert "another dataset or encoder" in one_error_line(capsys.readouterr().err)
    assert folder_digest(out) == before  # left untouched

    assert main(["embed", str(data), "--output", str(out), *FAST]) == 0  # same dataset and encoder
    assert main(["embed", str(other), "--output", str(out), *FAST, "--force"]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["class_names"] == ["x", "y"]


def test_a_killed_run_resumes_from_its_chunks(data, tmp_path, capsys, monkeypatch):
    """A process killed after two of four chunks: a second run embeds only the other two (it
    opens none of the first two chunks' images)."""
    from protonets.encoders.embedding_set import EmbeddingSet
    from protonets.encoders.sharded import KILL_HOOK

    reference = tmp_path / "reference"
    assert main(["embed", str(data), "--output", str(reference), *FAST]) == 0
    out = tmp_path / "set"
    argv = ["embed", str(data), "--output", str(out), "--chunk-size", "3", *FAST]
    env = {**os.environ, KILL_HOOK: "0:2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "protonets", *argv], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    chunks = sorted(os.listdir(out / ".shards"))
    assert [c.split("-")[2:] for c in chunks if c.startswith("chunk-")] == [
        ["000000000000", "000000000003.safetensors"],
        ["000000000003", "000000000006.safetensors"],
    ]
    other_encoder = [*FAST, "--checkpoint", str(OTHER_CHECKPOINT)]
    assert main(["embed", str(data), "--output", str(out), *other_encoder]) == 2  # not mixed in
    assert "unfinished embedding of another" in one_error_line(capsys.readouterr().err)

    opened = watch_opened_images(monkeypatch)
    assert main(argv) == 0
    assert "(4 chunks, 2 of 4 chunks reused)" in capsys.readouterr().out
    reused = {str(data / name) for name in ("a/0.png", "a/1.png", "a/2.png", "a/3.png", "b/0.png", "b/1.png")}
    assert len(opened) == 6 and not reused & set(opened)  # rows 6-11 only
    assert sorted(os.listdir(out)) == ["embeddings.safetensors", "manifest.json"]
    got, want = EmbeddingSet.load(out), EmbeddingSet.load(reference)
    assert got.paths == want.paths and float((got.embeddings - want.embeddings).abs().max()) <= 1e-5


def test_images_replaced_between_a_stop_and_a_restart_are_embedded_again(data, tmp_path, capsys):
    """A chunk is reused only while its images' files are unchanged (size, mtime, ctime, inode):
    an image replaced after the kill, or rewritten with its old size and mtime put back (as
    `cp -p` leaves it), is embedded again, not mixed in from the old chunk."""
    from protonets.encoders.embedding_set import EmbeddingSet
    from protonets.encoders.sharded import KILL_HOOK

    out = tmp_path / "set"
    argv = ["embed", str(data), "--output", str(out), "--chunk-size", "3", *FAST]
    env = {**os.environ, KILL_HOOK: "0:2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "protonets", *argv], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]  # chunks of rows 0-2 and 3-5 written
    make_dataset(tmp_path / "other", classes="a", per_class=1, seed=7)
    os.replace(tmp_path / "other" / "a" / "0.png", data / "a" / "1.png")  # row 1: another image
    row4, stat = data / "b" / "0.png", (data / "b" / "0.png").stat()
    row4.write_bytes(row4.read_bytes())  # rewritten, its mtime put back: only its ctime says so
    os.utime(row4, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert main(argv) == 0
    out_text = capsys.readouterr().out
    assert "(4 chunks)" in out_text and "reused" not in out_text  # both written chunks embedded again
    fresh = tmp_path / "fresh"
    assert main(["embed", str(data), "--output", str(fresh), *FAST]) == 0
    got, want = EmbeddingSet.load(out), EmbeddingSet.load(fresh)
    assert got.paths == want.paths and float((got.embeddings - want.embeddings).abs().max()) <= 1e-5


def test_a_set_streamed_in_chunks_reads_back_as_one(tmp_path):
    """`save_embedding_set` writes rows chunk by chunk (rank 0's assembly holds one chunk at a
    time) into the same file `EmbeddingSet.save` writes; a wrong row count writes nothing."""
    import torch
    from safetensors.torch import load_file

    from protonets.encoders.embedding_set import EmbeddingSet, save_embedding_set

    x = torch.randn(10, 3)
    labels = torch.tensor([0, 1] * 5)
    fields = (["a", "b"], [f"{i}.png" for i in range(10)], {"model": "m"})
    save_embedding_set(tmp_path / "chunks", (x[i : i + 4] for i in range(0, 10, 4)), labels, 3, *fields)
    EmbeddingSet(x, labels, *fields).save(tmp_path / "whole")
    assert (tmp_path / "chunks" / "embeddings.safetensors").read_bytes() == (
        tmp_path / "whole" / "embeddings.safetensors"
    ).read_bytes()
    tensors = load_file(tmp_path / "chunks" / "embeddings.safetensors")  # the safetensors library
    assert torch.equal(tensors["embeddings"], x) and torch.equal(tensors["labels"], labels)
    loaded = EmbeddingSet.load(tmp_path / "chunks")
    assert torch.equal(loaded.embeddings, x) and torch.equal(loaded.labels, labels)
    with pytest.raises(Exception, match="9 embedding rows for 10 labels"):
        save_embedding_set(tmp_path / "short", [x[:9]], labels, 3, *fields)
    assert not (tmp_path / "short" / "manifest.json").exists()
    assert [p.name for p in (tmp_path / "short").iterdir()] == []


def test_an_encoder_with_broken_weights_is_one_line_naming_an_image(tmp_path):
    """NaN weights (a diverged training run) give NaN embeddings: refused, not written or scored."""
    import torch

    from protonets.encoders import create_encoder
    from protonets.encoders.errors import UserInputError

    data = make_dataset(tmp_path / "data", classes="a", per_class=3)
    encoder = create_encoder("conv4", checkpoint_path=str(CHECKPOINT), device="cpu")
    with torch.no_grad():
        next(encoder.model.parameters()).fill_(float("nan"))
    images = sorted(str(p) for p in (data / "a").iterdir())
    with pytest.raises(UserInputError, match=r"gave NaN or inf for '.*0\.png' \(3 of 3 images"):
        encoder.embed(images, num_workers=0, progress=False)
