"""Stores on disk (issue 15): locks across processes, saves that touch only their own files,
tamper-evident manifests, the user's umask, folders read recursively, safe table output."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from protonets import FewShotClassifier, SupportMemory
from protonets.encoders import UserInputError
from protonets.encoders.atomic import (
    TMP_PREFIX,
    load_bundle,
    manifest_checksum,
    save_bundle,
    write_json_atomically,
)
from tests.conftest import EXAMPLES, REPO

USER_FILES = {
    "backup-20240101abcdef12.tar.gz": b"a user's backup",
    "photo-0a1b2c3d4e5f6789.jpg": b"a user's photo",
    ".tmp-draft.txt": b"a user's draft",
}


def _writer(data: bytes):
    def write(path: str) -> None:
        with open(path, "wb") as handle:
            handle.write(data)

    return write


def _user_folder(path):
    path.mkdir(parents=True, exist_ok=True)
    for name, data in USER_FILES.items():
        (path / name).write_bytes(data)
    return path


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir() if p.is_file()}


def _memory(n=40, dim=8, seed=0, **kw):
    rng = np.random.default_rng(seed)
    mem = SupportMemory(dim, **kw)
    mem.add(rng.normal(size=(n, dim)).astype(np.float32), [f"c{i % 4}" for i in range(n)])
    return mem


def _fitted_classifier():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6)).astype(np.float32)
    return FewShotClassifier(metric="euclidean").fit(x, ["a", "b", "c"] * 4)


# -- 2: a save touches only its own files ---------------------------------------------------
@pytest.mark.parametrize("saver", ["bundle", "memory", "classifier"])
def test_a_save_refuses_a_folder_holding_user_files_and_leaves_them(tmp_path, saver):
    folder = _user_folder(tmp_path / "out")
    before = _digests(folder)
    with pytest.raises(UserInputError) as err:
        if saver == "bundle":
            save_bundle(folder, {"kind": "k", "format_version": 1}, {"a.bin": _writer(b"1")})
        elif saver == "memory":
            _memory().save(folder)
        else:
            _fitted_classifier().save(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message
    assert "'.tmp-draft.txt' is not ours" in message  # the first foreign file, sorted
    assert _digests(folder) == before
    assert sorted(os.listdir(folder)) == sorted(USER_FILES)  # not even a lock file was added


def test_a_save_removes_only_files_its_previous_manifest_listed(tmp_path):
    folder = tmp_path / "b"
    save_bundle(folder, {"kind": "k", "format_version": 1}, {"a.bin": _writer(b"1")})
    first = json.loads((folder / "manifest.json").read_text())["files"]["a.bin"]["file"]
    _user_folder(folder)  # the user adds files to a bundle of ours: they are kept
    dead = folder / f"{TMP_PREFIX}999999999-{'0' * 16}.bin"  # a crashed writer's temporary file
    dead.write_bytes(b"x")
    alive = folder / f"{TMP_PREFIX}{os.getpid()}-{'1' * 16}.bin"  # a live writer's: not touched
    alive.write_bytes(b"y")
    save_bundle(folder, {"kind": "k", "format_version": 1}, {"a.bin": _writer(b"2")})
    manifest, files = load_bundle(folder, "k", 1)
    names = set(os.listdir(folder))
    assert first not in names and open(files["a.bin"], "rb").read() == b"2"
    assert set(USER_FILES) <= names and alive.name in names and dead.name not in names
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in USER_FILES} == USER_FILES


def test_a_save_refuses_another_kind_and_a_forged_file_entry(tmp_path):
    folder = tmp_path / "b"
    save_bundle(folder, {"kind": "k", "format_version": 1}, {"a.bin": _writer(b"1")})
    with pytest.raises(UserInputError, match="holds a k, not a protonets.SupportMemory"):
        _memory().save(folder)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["a.bin"]["file"] = "../victim.txt"  # a hostile manifest
    manifest.pop("checksum")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserInputError, match="names no data file of ours"):
        load_bundle(folder, "k", 1)
    save_bundle(folder, {"kind": "k", "format_version": 1}, {"a.bin": _writer(b"2")})
    assert victim.read_text() == "keep me"


def test_memory_build_refuses_a_folder_with_user_files_before_embedding(tmp_path, capsys):
    from protonets.cli import main

    folder = _user_folder(tmp_path / "mem")
    before = _digests(folder)
    start = time.perf_counter()
    code = main(["memory", "build", str(folder), "--from", str(EXAMPLES / "support"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("protonets: error:") and len(err.strip().splitlines()) == 1
    assert str(folder) in err and ".tmp-draft.txt" in err
    assert time.perf_counter() - start < 5  # refused before any model is built
    assert _digests(folder) == before


# -- 6: the user's umask ----------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_get_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        _memory().save(tmp_path / "mem")
        write_json_atomically(tmp_path / "results.json", {"a": 1})
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    paths = [p for p in (tmp_path / "mem").iterdir()] + [tmp_path / "results.json"]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert len(modes) >= 5 and set(modes.values()) == {expected}, modes


# -- 1: writers across processes -------------------------------------------------------------
_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    sys.path.insert(0, {repo!r})
    from protonets import SupportMemory
    folder, i, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rng = np.random.default_rng(i)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.01)
    with SupportMemory.updating(folder) as memory:
        time.sleep(0.3)  # a slow read-modify-write: without the lock, the others' rows are lost
        memory.add(x, [f"writer{{i}}"] * len(x))
    """
)


def test_concurrent_writers_all_keep_their_rows(tmp_path):
    folder = tmp_path / "mem"
    _memory(n=40).save(folder)
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(repo=str(REPO)))
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(folder), str(i), str(go)], stdout=subprocess.PIPE)
        for i in range(3)
    ]
    for proc in procs:
        assert proc.stdout.readline() == b"ready\n"
    go.touch()
    assert [proc.wait(timeout=180) for proc in procs] == [0] * 3
    memory = SupportMemory.load(folder)
    assert memory.count == 40 + 3 * 50
    assert all(memory.class_counts()[f"writer{i}"] == 50 for i in range(3))


# -- 3: tamper-evident manifests ---------------------------------------------------------------
def _edit(folder, change, resign=False):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if resign:
        manifest["checksum"] = manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))


def _swap(m):
    m["class_names"][0], m["class_names"][1] = m["class_names"][1], m["class_names"][0]


@pytest.mark.parametrize(
    "change", [_swap, lambda m: m.update(metric="l2"), lambda m: m["params"].update(nprobe=3)]
)
def test_an_edited_memory_manifest_is_refused(tmp_path, change):
    _memory().save(tmp_path / "mem")
    _edit(tmp_path / "mem", change)
    with pytest.raises(UserInputError, match="edited or damaged: its checksum does not match") as err:
        SupportMemory.load(tmp_path / "mem")
    assert "\n" not in str(err.value)


def test_manifests_written_before_checksums_still_load(tmp_path):
    from protonets.encoders.checkpoint import read_checkpoint_dir

    mem = _memory()
    mem.save(tmp_path / "mem")
    _edit(tmp_path / "mem", lambda m: m.pop("checksum"))
    assert SupportMemory.load(tmp_path / "mem").class_counts() == mem.class_counts()
    for name in ("protonet-conv4-omniglot", "siamese-conv4-omniglot"):
        folder = REPO / "checkpoints" / name
        assert "checksum" not in json.loads((folder / "manifest.json").read_text())
        assert read_checkpoint_dir(folder)["kind"] == "protonets.Checkpoint"


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda m: m["classes"].pop(), "lists 2 classes but the saved head scores 3"),
        (lambda m: m.pop("classes"), "it lacks 'classes'"),
    ],
)
def test_an_inconsistent_classifier_manifest_is_one_clear_error(tmp_path, change, words):
    _fitted_classifier().save(tmp_path / "clf")
    _edit(tmp_path / "clf", change)
    with pytest.raises(UserInputError, match="checksum does not match"):
        FewShotClassifier.load(tmp_path / "clf")
    _edit(tmp_path / "clf", lambda m: None, resign=True)  # consistent checksum, wrong content
    with pytest.raises(UserInputError) as err:
        FewShotClassifier.load(tmp_path / "clf")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_rename_class_method_and_command(tmp_path, capsys):
    from protonets.cli import main

    mem = _memory()
    q = np.random.default_rng(5).normal(size=(10, 8)).astype(np.float32)
    before = mem.classify(q)[0]
    mem.rename_class("c1", "one")
    assert "one" in mem.classes and "c1" not in mem.classes
    assert [("one" if c == "c1" else c) for c in before] == list(mem.classify(q)[0])
    with pytest.raises(UserInputError, match="'c2' already exists"):
        mem.rename_class("c0", "c2")
    mem.remove("c2")
    mem.rename_class("c0", "c2")  # into an emptied class name
    assert mem.class_counts()["c2"] == 10
    mem.save(tmp_path / "mem")
    assert main(["memory", "rename", str(tmp_path / "mem"), "c3", "three"]) == 0
    assert "three" in SupportMemory.load(tmp_path / "mem").classes
    assert main(["memory", "rename", str(tmp_path / "mem"), "nope", "x"]) == 2
    err = capsys.readouterr().err
    assert "class 'nope' is not in this memory" in err and len(err.strip().splitlines()) == 1
    assert main(["memory", "rename", str(tmp_path / "none"), "a", "b"]) == 2
    assert not (tmp_path / "none").exists()


# -- 7: table output is safe for any name --------------------------------------------------------
def test_table_escapes_control_characters_and_json_csv_stay_exact():
    import csv

    from protonets.cli.common import write_rows

    name = "we\nird\tname\x1b[31m"
    rows = [{"query": f"/x/{name}.jpg", "label": name, "probability": 0.5, "top_k": [[name, 0.5]]}]
    out = io.StringIO()
    write_rows(rows, "table", out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\x1b" not in out.getvalue() and "\t" not in out.getvalue()
    assert "we\\nird\\tname\\x1b[31m" in lines[2]
    out = io.StringIO()
    write_rows(rows, "json", out)
    assert json.loads(out.getvalue())[0]["label"] == name
    out = io.StringIO()
    write_rows(rows, "csv", out)
    assert list(csv.reader(io.StringIO(out.getvalue())))[1][1] == name


def test_csv_gives_each_ranked_class_its_own_cells_whatever_the_names():
    import csv

    from protonets.cli.common import write_rows

    odd = ["a;b:0.5", 'c,"d"', "e\nf"]
    rows = [
        {"query": "q1.jpg", "label": odd[0], "score": 0.9, "top_k": [[odd[0], 0.9], [odd[1], 0.25], [odd[2], 0.125]]},  # noqa: E501
        {"query": "q2.jpg", "label": odd[1], "score": 0.8, "top_k": [[odd[1], 0.8]]},  # fewer ranks
    ]
    out = io.StringIO()
    write_rows(rows, "csv", out, value="score")
    table = list(csv.reader(io.StringIO(out.getvalue())))
    ranked = ["top_1", "top_1_score", "top_2", "top_2_score", "top_3", "top_3_score"]
    assert table[0] == ["query", "label", "score", *ranked]
    assert table[1][3::2] == odd and table[1][4::2] == ["0.9000", "0.2500", "0.1250"]
    assert table[2][3:5] == [odd[1], "0.8000"] and table[2][5:] == ["", "", "", ""]


# -- 4: folders read as users expect --------------------------------------------------------------
def test_support_folders_are_read_recursively_and_bad_links_reported(tmp_path, caplog):
    from protonets.cli.common import class_images, support_folder

    root = tmp_path / "support"
    for cls in ("a", "b"):
        shutil.copytree(EXAMPLES / "support" / ("lotus" if cls == "a" else "menorah"), root / cls)
    (root / "a" / "deeper").mkdir()
    shutil.copy(EXAMPLES / "support" / "lotus" / "image_0001.jpg", root / "a" / "deeper" / "x.jpg")
    paths, labels = support_folder(str(root))
    assert len(paths) == 11 and labels.count("a") == 6
    os.symlink(root / "missing.jpg", root / "b" / "broken.jpg")
    with pytest.raises(UserInputError, match="broken.jpg' is a broken symlink.*--skip-bad"):
        support_folder(str(root))
    os.unlink(root / "b" / "broken.jpg")
    os.symlink(root / "a", root / "a" / "deeper" / "loop")
    with pytest.raises(UserInputError, match="loop' is a symlink loop"):
        class_images(str(root))
    with caplog.at_level(logging.WARNING, logger="protonets"):
        assert len(class_images(str(root), skip_bad=True)[0]) == 11
    assert any("symlink loop" in r.getMessage() for r in caplog.records)


def test_memory_add_skips_images_already_in_the_memory(tmp_path, capsys):
    from protonets.cli import main

    support = tmp_path / "support"
    shutil.copytree(EXAMPLES / "support" / "lotus", support / "lotus")
    nested = support / "menorah" / "nested"
    shutil.copytree(EXAMPLES / "support" / "menorah", nested)
    mem = tmp_path / "mem"
    opts = ["--quiet", "--workers", "0"]
    assert main(["memory", "build", str(mem), "--from", str(support), *opts]) == 0
    assert "10 vectors, 2 classes" in capsys.readouterr().out  # the nested folder counts
    assert main(["memory", "add", str(mem), "--from", str(support), *opts]) == 0
    out = capsys.readouterr().out
    assert "added 0 images (skipped 10 already in the memory" in out and "10 vectors" in out
    assert main(["memory", "add", str(mem), "--from", str(support), "--allow-duplicates", *opts]) == 0
    assert "added 10 images to" in capsys.readouterr().out
    os.symlink(tmp_path / "gone.jpg", support / "lotus" / "gone.jpg")
    assert main(["memory", "add", str(mem), "--from", str(support), *opts]) == 2
    err = capsys.readouterr().err
    assert "gone.jpg' is a broken symlink" in err and len(err.strip().splitlines()) == 1
    assert main(["memory", "add", str(mem), "--from", str(support), "--skip-bad", *opts]) == 0
    captured = capsys.readouterr()
    assert "skipped 10 already" in captured.out
    assert SupportMemory.load(mem).count == 20
    # the same content twice in one added folder (a copy, or the same photo under two classes)
    fresh = tmp_path / "fresh"
    (fresh / "x").mkdir(parents=True)
    (fresh / "y").mkdir()
    shutil.copy(EXAMPLES / "queries" / sorted(os.listdir(EXAMPLES / "queries"))[0], fresh / "x" / "one.jpg")
    shutil.copy(fresh / "x" / "one.jpg", fresh / "x" / "copy.jpg")
    shutil.copy(fresh / "x" / "one.jpg", fresh / "y" / "same.jpg")
    assert main(["memory", "add", str(mem), "--from", str(fresh), *opts]) == 0
    assert "added 1 images (skipped 2 already in the memory or repeated" in capsys.readouterr().out
    assert SupportMemory.load(mem).count == 21


# -- 9: the auto index keeps its promise ------------------------------------------------------------
def test_wilson_lower_bound():
    from protonets.memory.indexes import wilson_lower

    assert wilson_lower(500, 500) == pytest.approx(0.99238, abs=1e-4)  # 500/500 barely passes
    assert wilson_lower(499, 500) < 0.99 < wilson_lower(1989, 2000)
    assert wilson_lower(0, 0) == 0.0


def test_auto_index_calibrates_on_the_lower_bound_and_fresh_queries_agree():
    rng = np.random.default_rng(3)
    dim, classes = 32, 200
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, 20_000)
    x = centres[y] + 1.6 * rng.normal(size=(len(y), dim)).astype(np.float32)
    q = centres[rng.integers(0, classes, 3000)] + 1.6 * rng.normal(size=(3000, dim)).astype(np.float32)
    memory = SupportMemory(dim, index="auto", exact_limit=5000)
    memory.add(x, y)
    info = memory.info()
    cal = info["calibration"]
    assert info["structure"] == "ivf" and cal["probes"] == 2000
    assert cal["lower_bound"] >= 0.99 and cal["agreement"] > cal["lower_bound"]
    fresh = np.mean(memory.search(q, k=1)[1][:, 0] == memory.search(q, k=1, exact=True)[1][:, 0])
    assert fresh >= 0.99
