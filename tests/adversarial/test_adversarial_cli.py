"""Adversarial input to every command (issue 15, item 11): each case asserts the exit status, a
single stderr line that names the culprit, and that every file the user had is unchanged.

Cases already covered elsewhere are not repeated here: a save into a folder of user files, edited
manifests, concurrent writers, broken links in support folders, duplicate adds and escaped table
output live in tests/test_reliability.py (see the README's "Reliability" section for the list).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

CKPT = REPO / "checkpoints" / "protonet-conv4-omniglot"
SIAMESE = REPO / "checkpoints" / "siamese-conv4-omniglot"
FAST = ["--encoder", "conv4", "--checkpoint", str(CKPT), "--workers", "0", "--quiet"]


# -- the user's files ---------------------------------------------------------------------------
def _png(path: Path, seed: int = 0, size: int = 28) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    Image.fromarray(arr, "L").save(path)
    return path


def _support(root: Path, classes: int = 5, shots: int = 5) -> Path:
    for c in range(classes):
        for s in range(shots):
            _png(root / f"class{c}" / f"{s}.png", seed=100 * c + s)
    return root


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _bomb_png(path: Path, side: int = 20_000) -> Path:
    """A PNG whose header claims side × side pixels (no pixel data: the header check refuses it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root (symlinks as their target text), keyed by relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """Run `protonets ARGV` in-process: (exit status, stderr lines, stdout)."""
    from protonets.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


# -- the cases -------------------------------------------------------------------------------------
@dataclass
class Case:
    """`setup(user_dir)` makes the user's files and returns (argv, the culprit the line must name)."""

    setup: Callable[[Path], tuple[list[str], str]]
    forbidden: tuple[str, ...] = ()  # words the line must not hold (e.g. torch's unpickling advice)
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None
    no_embedding: bool = True  # refused before any model is built or image embedded
    extra: dict = field(default_factory=dict)


def _classify(u: Path, *extra: str, query: Path | None = None) -> list[str]:
    support = u / "support" if (u / "support").exists() else _support(u / "support")
    query = query or _png(u / "q.png", seed=7)
    return ["classify", str(support), str(query), *FAST, *extra]


def _device(name: str) -> Case:
    return Case(lambda u: (_classify(u, "--device", name), name))


def _checkpoint(make: Callable[[Path], None], words: str, **kw) -> Case:
    def setup(u: Path) -> tuple[list[str], str]:
        path = u / "weights.pt"
        make(path)
        argv = _classify(u)
        argv[argv.index(str(CKPT))] = str(path)
        return argv, str(path)

    return Case(setup, forbidden=("weights_only", "Traceback"), extra={"words": words}, **kw)


def _torch_save_module(path: Path) -> None:
    import torch

    torch.save(torch.nn.Linear(2, 2), path)


def _random_zip(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not weights")


def _bad_query(make: Callable[[Path], Path], words: str, **kw) -> Case:
    def setup(u: Path) -> tuple[list[str], str]:
        query = make(u)
        return _classify(u, query=query), str(query)

    return Case(setup, extra={"words": words}, **kw)


def _deny(monkeypatch: pytest.MonkeyPatch, u: Path) -> None:
    """Permission denied on q.png: chmod 000 for a normal user; as root (who reads anything), the
    check's os.access is made to answer as it would for a normal user."""
    target = str(u / "q.png")
    os.chmod(target, 0)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode, **k: False if str(p) == target else real(p, mode, **k)
        )


def _symlinked_support(loop: bool) -> Callable[[Path], tuple[list[str], str]]:
    def setup(u: Path) -> tuple[list[str], str]:
        support = _support(u / "support", classes=2)
        link = support / "class0" / ("loop" if loop else "gone.png")
        os.symlink(support / "class0" if loop else u / "missing.png", link)
        return _classify(u), str(link)

    return setup


def _memory_query(u: Path) -> tuple[list[str], str]:
    query = u / "empty.png"
    query.write_bytes(b"")
    return ["memory", "query", str(u / "mem"), str(query), *FAST], str(query)


def _eval(u: Path, *extra: str) -> list[str]:
    data = _support(u / "data", classes=6, shots=5)
    return ["eval", "--data", str(data), "--ways", "2", "--shots", "1", "--queries", "2", *FAST, *extra]


CASES = {
    # issue 15's table
    "device mps": _device("mps"),
    "device meta": _device("meta"),
    "device cuda:7": _device("cuda:7"),
    "device gpu": _device("gpu"),
    "checkpoint random .pt": _checkpoint(lambda p: p.write_bytes(np.random.bytes(4096)), "not a safetensors"),
    "checkpoint pickle": _checkpoint(lambda p: p.write_bytes(pickle.dumps({"w": [1.0]})), "pickle"),
    "checkpoint text": _checkpoint(lambda p: p.write_text("hello"), "holds text"),
    "checkpoint empty": _checkpoint(lambda p: p.write_bytes(b""), "empty"),
    "checkpoint pickled module": _checkpoint(_torch_save_module, "Python objects", no_embedding=False),
    "checkpoint zip of notes": _checkpoint(_random_zip, "not a safetensors", no_embedding=False),
    "permission denied": Case(
        lambda u: (_classify(u), str(u / "q.png")), patch=_deny, extra={"words": "permission denied"}
    ),
    "zero-byte query, 25-image support": _bad_query(lambda u: _write(u / "q0.png", b""), "empty"),
    # the README's earlier bad-input cases
    "truncated query": _bad_query(  # the header reads: found when decoding, still one line
        lambda u: _write(u / "t.png", _png(u / "full.png").read_bytes()[:60]),
        "t.png",
        no_embedding=False,
    ),
    "not an image": _bad_query(lambda u: _write(u / "n.jpg", "text"), "not a readable image"),
    "decompression bomb": _bad_query(lambda u: _bomb_png(u / "bomb.png"), "decompression bomb"),
    "missing query": Case(lambda u: (_classify(u, query=u / "nope.png"), "nope.png")),
    "missing support": Case(lambda u: (["classify", str(u / "none"), str(_png(u / "q.png")), *FAST], "none")),
    "one class": Case(
        lambda u: (["classify", str(_support(u / "s", classes=1)), str(_png(u / "q.png")), *FAST], "s")
    ),
    "empty class folder": Case(
        lambda u: (
            (_support(u / "support", classes=2) / "empty").mkdir() or _classify(u),
            str(u / "support" / "empty"),
        )
    ),
    "broken symlink in support": Case(_symlinked_support(loop=False)),
    "symlink loop in support": Case(_symlinked_support(loop=True)),
    "unknown model": Case(
        lambda u: (_classify(u)[:3] + ["--encoder", "resnet5O", "--quiet"], "resnet5O"), no_embedding=False
    ),
    "checkpoint of another model": Case(
        lambda u: (
            _classify(u)[:3] + ["--encoder", "resnet18", "--checkpoint", str(CKPT), "--quiet"],
            "resnet18",
        ),
        no_embedding=False,
    ),
    "bad argument": Case(lambda u: (["classify", str(u), "x", "--top-k", "0"], "--top-k")),
    "unknown option": Case(lambda u: (["eval", "--data", str(u), "--bogus"], "--bogus")),
    # the other commands
    "eval output folder missing": Case(lambda u: (_eval(u, "--output", str(u / "no" / "r.json")), "r.json")),
    "eval device meta": Case(lambda u: (_eval(u, "--device", "meta"), "meta")),
    "memory query empty image": Case(_memory_query),
    "memory build checkpoint text": Case(
        lambda u: (
            (u / "w.pt").write_text("hi")
            and [
                "memory",
                "build",
                str(u / "mem"),
                "--from",
                str(_support(u / "s", 2, 2)),
                "--checkpoint",
                str(u / "w.pt"),
                "--quiet",
            ],  # fmt: skip
            "w.pt",
        )
    ),
    "verify empty image": Case(
        lambda u: (
            (u / "a.png").write_bytes(b"")
            or ["verify", str(u / "a.png"), str(_png(u / "b.png")), "--checkpoint", str(SIAMESE)],
            "a.png",
        )
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_user_files(name, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.setenv("PROTONETS_CACHE", str(tmp_path / "cache"))  # never the real user cache
    argv, culprit = case.setup(user)
    before = tree_digests(user)
    if case.patch is not None:
        case.patch(monkeypatch, user)
    if case.no_embedding:  # the error must come before any model is built or image embedded
        import protonets.encoders.factory as factory

        def refuse(*args, **kwargs):
            raise AssertionError("a model was built before the bad input was reported")

        monkeypatch.setattr(factory, "_build_encoder", refuse)
    code, err, _ = run_cli(argv, capsys)
    monkeypatch.undo()
    for path in user.rglob("*"):  # undo a chmod 000 so the files can be hashed again
        if path.is_file() and not path.is_symlink() and not os.stat(path).st_mode & 0o400:
            os.chmod(path, 0o644)
    assert code == 2, (code, err)
    assert len(err) == 1, err
    assert culprit in err[0], (culprit, err[0])
    assert "error" in err[0]
    for word in case.forbidden:
        assert word not in err[0]
    if "words" in case.extra:
        assert case.extra["words"] in err[0], err[0]
    assert tree_digests(user) == before


def test_a_zero_byte_query_is_reported_before_the_support_set_is_embedded(tmp_path, capsys, monkeypatch):
    """25 support images and one empty query: refused before any image is embedded."""
    from protonets.encoders.encoder import Encoder

    embedded = []
    monkeypatch.setattr(Encoder, "embed", lambda self, images, **kw: embedded.append(len(images)))
    support = _support(tmp_path / "support", classes=5, shots=5)
    query = tmp_path / "q.png"
    query.write_bytes(b"")
    code, err, _ = run_cli(["classify", str(support), str(query), *FAST], capsys)
    assert code == 2 and len(err) == 1 and str(query) in err[0] and "empty" in err[0]
    assert embedded == []


def test_skip_bad_drops_bad_images_with_one_warning_each(tmp_path, capsys):
    support = _support(tmp_path / "support", classes=2, shots=3)
    good = _png(tmp_path / "good.png", seed=9)
    (tmp_path / "bad.png").write_bytes(b"")
    code, err, out = run_cli(
        ["classify", str(support), str(good), str(tmp_path / "bad.png"), *FAST[:-1], "--skip-bad"], capsys
    )
    assert code == 0, err
    assert len(err) == 1 and "bad.png" in err[0] and err[0].startswith("protonets: warning:")
    assert "good.png" in out and "bad.png" not in out


def test_a_library_warning_is_reworded_once(tmp_path, capsys):
    """500 classes × 1 image with the logistic-regression probe: one reworded line, no sklearn text."""
    for c in range(500):
        _png(tmp_path / "support" / f"c{c:03d}" / "a.png", seed=c, size=8)
    queries = [str(_png(tmp_path / f"q{i}.png", seed=1000 + i, size=8)) for i in range(3)]
    argv = [
        "classify",
        str(tmp_path / "support"),
        *queries,
        "--head",
        "logreg",
        "--format",
        "json",
        *FAST[:-1],
    ]
    code, err, _ = run_cli(argv, capsys)
    assert code == 0, err
    assert len(err) == 1, err
    assert err[0].startswith("protonets: warning:") and "single support image" in err[0]
    assert "_logistic.py" not in err[0] and "check_classification_targets" not in err[0]
