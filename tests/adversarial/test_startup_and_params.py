"""Issue 15 items 5, 8 and 10: help and argument errors import no heavy library; library arguments
are checked the scikit-learn way; a warm `protonets eval` builds no model."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

HEAVY = ("torch", "timm", "faiss", "sklearn", "torchvision")
CKPT = REPO / "checkpoints" / "protonet-conv4-omniglot"


def _imported(argv: list[str]) -> tuple[int, set[str], str]:
    """Run `python -X importtime -m protonets ARGV`: (exit status, top-level heavy packages, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "protonets", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    modules = {
        line.split("|")[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    return proc.returncode, modules & set(HEAVY), "\n".join(errors)


@pytest.mark.parametrize(
    "argv, status",
    [
        (["--help"], 0),
        (["classify", "--help"], 0),
        (["eval", "--help"], 0),
        (["memory", "--help"], 0),
        (["memory", "query", "--help"], 0),
        (["memory", "calibrate", "--help"], 0),
        (["memory", "calibrate"], 2),
        (["verify", "--help"], 0),
        (["train", "--help"], 0),
        (["train", "--data", "d", "--output", "o", "--method", "nope"], 2),
        (["eval", "--bogus"], 2),
        (["classify", "s", "q", "--top-k", "0"], 2),
        (["nonsense"], 2),
    ],
)
def test_help_and_argument_errors_import_no_heavy_library(argv, status):
    code, heavy, err = _imported(argv)
    assert code == status, err
    assert not heavy, f"protonets {' '.join(argv)} imported {sorted(heavy)}"
    if status == 2:
        assert len(err.strip().splitlines()) == 1 and "error" in err, err


def test_public_names_stay_importable_and_lazy():
    code = (
        "import sys, protonets, protonets.encoders as enc\n"
        f"assert not any(m.split('.')[0] in {set(HEAVY)!r} for m in sys.modules), 'eager import'\n"
        "from protonets import FewShotClassifier, SupportMemory, HEADS, create_encoder, __all__\n"
        "from protonets.encoders import Encoder, create_encoder as ce, resolve_device, DEFAULT_ENCODER\n"
        "assert set(__all__) <= set(dir(protonets)) and ce is create_encoder\n"
        "assert set(enc.__all__) <= set(dir(enc)) and all(getattr(enc, n) for n in enc.__all__)\n"
        "print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


# -- 8: library arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, name",
    [
        ({"threshold": 2}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": "0.5"}, "threshold"),
        ({"scale": 0}, "scale"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"metric": "manhattan"}, "metric"),
        ({"feature_transform": "zca"}, "feature_transform"),
        ({"head": "no-such-head"}, "head"),
        ({"steps": -1}, "steps"),
        ({"inner_lr": 0}, "inner_lr"),
        ({"skip_bad": "yes"}, "skip_bad"),
        ({"memory": object()}, "memory"),
    ],
)
def test_classifier_parameters_are_checked_at_fit(params, name):
    from protonets import FewShotClassifier

    x = np.random.default_rng(0).normal(size=(12, 6))
    clf = FewShotClassifier(**params)  # __init__ stores only (scikit-learn's rule)
    with pytest.raises((ValueError, TypeError), match=f"'{name}' parameter of FewShotClassifier"):
        clf.fit(x, ["a", "b", "c"] * 4)


def test_threshold_set_after_fit_is_checked_and_top_k_is_validated_or_clipped():
    from protonets import FewShotClassifier

    x = np.random.default_rng(0).normal(size=(12, 6))
    clf = FewShotClassifier(metric="euclidean").fit(x, ["a", "b", "c"] * 4)
    clf.set_params(threshold=2)
    with pytest.raises(ValueError, match="'threshold' parameter"):
        clf.predict(x)
    clf.set_params(threshold=None)
    for k in (-1, 0, 1.5, "2"):
        with pytest.raises((ValueError, TypeError), match="'k' parameter of predict_top_k"):
            clf.predict_top_k(x, k=k)
    assert [len(row) for row in clf.predict_top_k(x[:2], k=10)] == [3, 3]  # clipped to the classes


@pytest.mark.parametrize(
    "params, error, words",
    [
        ({"dim": 0}, ValueError, "dim must be at least 1"),
        ({"dim": 8.0}, TypeError, "dim must be an int"),
        ({"dim": 8, "nprobe": 0}, ValueError, "nprobe"),
        ({"dim": 8, "nlist": 2.5}, TypeError, "nlist"),
        ({"dim": 8, "hnsw_m": 1}, ValueError, "hnsw_m"),
        ({"dim": 8, "ef_search": 0}, ValueError, "ef_search"),
        ({"dim": 8, "rerank": -1}, ValueError, "rerank"),
        ({"dim": 8, "exact_limit": -5}, ValueError, "exact_limit"),
        ({"dim": 8, "expected_size": 0}, ValueError, "expected_size"),
        ({"dim": 8, "keep_vectors": "no"}, TypeError, "keep_vectors"),
        ({"dim": 8, "metric": 2}, TypeError, "metric"),
        ({"dim": 8, "metric": "dot"}, ValueError, "metric"),
        ({"dim": 8, "index": "lsh"}, ValueError, "index"),
        ({"dim": 8, "encoder_fingerprint": "x"}, TypeError, "encoder_fingerprint"),
    ],
)
def test_support_memory_arguments_name_the_parameter(params, error, words):
    from protonets import SupportMemory

    with pytest.raises(error, match=words):
        SupportMemory(**params)


# -- 10: start-up paid once -------------------------------------------------------------------------
def test_a_warm_eval_builds_no_model_and_a_touched_checkpoint_is_fingerprinted_again(
    tmp_path, capsys, monkeypatch
):
    import shutil

    from PIL import Image

    import protonets.encoders.factory as factory
    from protonets.cli import main

    rng = np.random.default_rng(0)
    for c in range(4):
        for s in range(4):
            (tmp_path / "data" / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L").save(
                tmp_path / "data" / f"c{c}" / f"{s}.png"
            )
    ckpt = tmp_path / "ckpt"
    shutil.copytree(CKPT, ckpt)
    argv = ["eval", "--data", str(tmp_path / "data"), "--ways", "2", "--shots", "1", "--queries", "2"]
    argv += ["--episodes", "20", "--encoder", "conv4", "--checkpoint", str(ckpt), "--workers", "0"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    builds = []
    real = factory._build_encoder
    monkeypatch.setattr(factory, "_build_encoder", lambda *a, **k: builds.append(1) or real(*a, **k))
    assert main(argv) == 0
    cold = capsys.readouterr().out
    assert builds == [1]
    assert main(argv) == 0  # warm: every embedding cached, the fingerprint remembered
    assert capsys.readouterr().out == cold and builds == [1]
    weights = next(p for p in ckpt.iterdir() if p.suffix == ".safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert main(argv) == 0  # the weights file changed (mtime): built and fingerprinted again
    assert capsys.readouterr().out == cold and builds == [1, 1]
    (tmp_path / "data" / "c0" / "0.png").write_bytes(b"")  # a cache miss is header-checked first
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0.png" in err[0] and "empty" in err[0]
