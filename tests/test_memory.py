"""SupportMemory: checks at the door, prototype/knn answers, remove, persistence, crashes, threads."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from protonets import FewShotClassifier, PrototypeHead, SupportMemory
from protonets.encoders import FingerprintMismatchError, UserInputError
from protonets.memory import store
from tests.conftest import REPO

KINDS = ["flat", "hnsw", "ivf", "ivfpq", "auto"]


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    """Tiny indexes train faster on one thread (OpenMP waits dominate on a busy machine)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _blobs(n=3000, classes=30, dim=32, noise=0.6, seed=0):
    """Clustered data: `classes` centres, integer labels, and 60 fresh queries."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = centres[y] + noise * rng.normal(size=(n, dim)).astype(np.float32)
    qy = rng.integers(0, classes, 60)
    q = centres[qy] + noise * rng.normal(size=(60, dim)).astype(np.float32)
    return x.astype(np.float32), y, q.astype(np.float32), qy


def _memory(kind, metric="cosine", **kw):
    if kind == "ivfpq":
        kw.setdefault("pq_m", 8)
    return SupportMemory(32, metric, kind, exact_limit=1000, nprobe=kw.pop("nprobe", 16), **kw)


def _filled(kind, metric="cosine", **kw):
    x, y, q, qy = _blobs()
    mem = _memory(kind, metric, **kw)
    mem.add(x[:2000], y[:2000])
    mem.add(torch.from_numpy(x[2000:]), y[2000:].tolist())  # torch in, second batch
    return mem, x, y, q, qy


# -- checks at the door --------------------------------------------------------------------
def test_add_and_query_refuse_bad_input_clearly():
    mem = SupportMemory(8)
    with pytest.raises(ValueError, match="5 dims per row.*8-dim"):
        mem.add(np.zeros((3, 5), np.float32), [1, 2, 3])
    with pytest.raises(ValueError, match="floating-point.*int64"):
        mem.add(np.zeros((3, 8), np.int64), [1, 2, 3])
    with pytest.raises(ValueError, match=r"2-D.*reshape\(1, -1\)"):
        mem.add(np.ones(8, np.float32), [1])
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        mem.add(np.array([[1.0] * 8, [np.nan] * 8], np.float32), [1, 2])
    with pytest.raises(ValueError, match="3 embeddings but 2 labels"):
        mem.add(np.ones((3, 8), np.float32), [1, 2])
    with pytest.raises(TypeError, match=r"labels\[1\].*str or int"):
        mem.add(np.ones((2, 8), np.float32), ["a", 2.5])
    with pytest.raises(ValueError, match="all zeros"):
        mem.add(np.zeros((1, 8), np.float32), ["a"])
    with pytest.raises(UserInputError, match="empty"):
        mem.search(np.ones((1, 8), np.float32))
    mem.add(torch.ones(2, 8, dtype=torch.float64), ["a", "b"])
    with pytest.raises(ValueError, match="queries has 4 dims"):
        mem.classify(np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="k must be a positive int"):
        mem.search(np.ones((1, 8), np.float32), k=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        mem.classify(np.ones((1, 8), np.float32), mode="vote")
    with pytest.raises(ValueError, match="metric must be one of"):
        SupportMemory(8, metric="dot")
    with pytest.raises(ValueError, match="keep_vectors=False needs"):
        SupportMemory(8, index="flat", keep_vectors=False)


# -- answers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_prototype_mode_equals_dense_prototype_head(metric):
    x, y, q, _ = _blobs()
    mem = SupportMemory(32, metric, "flat")
    for part in np.array_split(np.arange(len(x)), 7):  # classes grow shot by shot
        mem.add(x[part], y[part])
    order = np.array(mem.classes)  # slot order = order of first appearance
    index = {c: i for i, c in enumerate(order)}
    if metric == "cosine":
        head = PrototypeHead("cosine", feature_transform="l2n", scale=1.0)
    else:
        head = PrototypeHead("euclidean")
    head.fit(torch.from_numpy(x), torch.tensor([index[c] for c in y]))
    dense = head(torch.from_numpy(q)).numpy()

    scores, names = mem.prototype_scores(q)
    assert names == order.tolist()
    np.testing.assert_allclose(scores, dense, rtol=1e-4, atol=1e-4)
    labels, best = mem.classify(q, mode="prototype")
    np.testing.assert_array_equal(labels, order[dense.argmax(1)])
    np.testing.assert_allclose(best, dense.max(1), rtol=1e-4, atol=1e-4)


def test_exact_search_matches_numpy_brute_force():
    mem, x, y, q, _ = _filled("flat", "l2")
    scores, labels = mem.search(q, k=4)
    d = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    nearest = np.argsort(d, 1)[:, :4]
    np.testing.assert_allclose(scores, -np.take_along_axis(d, nearest, 1), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(labels[:, 0].astype(int), y[nearest[:, 0]])


@pytest.mark.parametrize("kind", KINDS)
def test_knn_and_approximate_indexes_are_sane(kind):
    mem, x, y, q, qy = _filled(kind)
    assert mem.structure == ("ivf" if kind == "auto" else kind)
    labels, scores = mem.classify(q, mode="knn", k=5)
    assert (labels == qy).mean() > 0.95
    assert scores.shape == (60,) and (scores <= 1.0001).all()
    s, lab = mem.search(q, k=5)
    se, labe = mem.search(q, k=5, exact=True)
    assert (lab[:, 0] == labe[:, 0]).mean() > 0.9  # approximate top-1 class vs exact
    assert (np.diff(s, axis=1) <= 1e-6).all()  # best first
    one, _ = mem.classify(q, mode="knn", k=1)
    np.testing.assert_array_equal(one, lab[:, 0].astype(int))


def test_auto_goes_approximate_past_the_limit_and_back():
    x, y, q, _ = _blobs(n=3000)
    mem = SupportMemory(32, exact_limit=2000)
    mem.add(x[:1999], y[:1999])
    assert mem.structure == "flat"
    mem.add(x[1999:], y[1999:])
    assert mem.structure == "ivf" and mem.info()["trained_on"] == 3000
    calibration = mem.info()["calibration"]  # nprobe picked against exact search
    assert calibration["agreement"] >= 0.99 and mem.info()["nprobe"] == calibration["nprobe"]
    for label in list(mem.classes)[:22]:  # below half the limit: exact again
        mem.remove(label)
    assert mem.structure == "flat" and len(mem) < 1000


@pytest.mark.parametrize("kind", KINDS)
def test_remove_drops_a_class_everywhere(kind):
    mem, x, y, q, qy = _filled(kind)
    before = len(mem)
    gone = int(qy[0])
    removed = mem.remove(gone)
    assert removed == (y == gone).sum() and len(mem) == before - removed
    assert gone not in mem.classes and gone not in mem.class_counts()
    _, labels, ids = mem.search(q, k=10, return_ids=True)
    assert not (labels == gone).any()
    assert (mem._labels[ids[ids >= 0]] >= 0).all()  # no removed row comes back
    for mode in ("prototype", "knn"):
        assert not (mem.classify(q, mode=mode)[0] == gone).any()
    with pytest.raises(UserInputError, match="not in this memory"):
        mem.remove(gone)
    mem.add(x[y == gone][:5], [gone] * 5)  # the class can come back
    assert mem.class_counts()[gone] == 5


def test_ivfpq_streamed_without_raw_vectors():
    x, y, q, qy = _blobs(n=6000)
    mem = SupportMemory(32, index="ivfpq", keep_vectors=False, pq_m=8, nprobe=16, expected_size=6000)
    with pytest.raises(ValueError, match="at least 2560 vectors"):
        mem.add(x[:500], y[:500])
    mem.train(x[:3000])
    for start in range(0, 6000, 1500):
        mem.add(x[start : start + 1500], y[start : start + 1500])
    assert mem.structure == "ivfpq" and len(mem) == 6000
    assert (mem.classify(q, mode="knn")[0] == qy).mean() > 0.9
    with pytest.raises(ValueError, match="raw vectors"):
        mem.search(q, exact=True)
    mem.remove(int(qy[0]))
    assert not (mem.search(q, k=10)[1] == int(qy[0])).any()


# -- persistence ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_gives_identical_answers(tmp_path, kind):
    mem, x, y, q, _ = _filled(kind, encoder_fingerprint={"model": "m", "weights_sha256": "ab"})
    mem.remove(int(y[0]))
    mem.save(tmp_path / "mem")
    again = SupportMemory.load(tmp_path / "mem", encoder={"model": "m", "weights_sha256": "ab"})
    assert again.info() == mem.info() and again.class_counts() == mem.class_counts()
    for exact in (False, True):
        s1, l1 = mem.search(q, k=7, exact=exact)
        s2, l2 = again.search(q, k=7, exact=exact)
        np.testing.assert_array_equal(l1, l2)
        np.testing.assert_array_equal(s1, s2)
    for mode in ("prototype", "knn"):
        a, b = mem.classify(q, mode=mode), again.classify(q, mode=mode)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    again.add(x[:10], ["new"] * 10)  # a loaded memory keeps growing
    assert again.class_counts()["new"] == 10
    twin = copy.deepcopy(mem)  # an independent copy answers the same
    np.testing.assert_array_equal(twin.search(q, k=3)[1], mem.search(q, k=3)[1])
    twin.add(x[:10], ["twin"] * 10)
    assert "twin" not in mem.classes


def _saved(tmp_path):
    mem, *_ = _filled("ivf", encoder_fingerprint={"model": "m", "weights_sha256": "ab"})
    mem.save(tmp_path / "mem")
    manifest = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    return tmp_path / "mem", manifest


@pytest.mark.parametrize("role", ["vectors.npy", "labels.npy", "index.faiss", "prototypes.safetensors"])
def test_load_refuses_altered_and_truncated_files(tmp_path, role):
    folder, manifest = _saved(tmp_path)
    path = folder / manifest["files"][role]["file"]
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(UserInputError, match="truncated or altered"):
        SupportMemory.load(folder)
    path.write_bytes(bytes(blob[: len(blob) // 3]))
    with pytest.raises(UserInputError, match="truncated or altered"):
        SupportMemory.load(folder)


def test_load_refuses_newer_format_wrong_dims_and_other_encoders(tmp_path):
    folder, manifest = _saved(tmp_path)
    with pytest.raises(FingerprintMismatchError, match="built with encoder m"):
        SupportMemory.load(folder, encoder={"model": "other", "weights_sha256": "cd"})
    manifest_path = folder / "manifest.json"
    edited = dict(manifest, dim=64)  # manifest says 64 dims, files hold 32
    manifest_path.write_text(json.dumps(edited))
    with pytest.raises(UserInputError, match="edited or damaged: its checksum does not match"):
        SupportMemory.load(folder)
    from protonets.encoders.atomic import manifest_checksum

    edited["checksum"] = manifest_checksum(edited)  # re-signed: the files still disagree
    manifest_path.write_text(json.dumps(edited))
    with pytest.raises(UserInputError, match="not a consistent SupportMemory.*expected"):
        SupportMemory.load(folder)
    manifest_path.write_text(json.dumps(dict(manifest, format_version=store.FORMAT_VERSION + 1)))
    with pytest.raises(UserInputError, match="newer than this protonets reads"):
        SupportMemory.load(folder)
    manifest_path.write_text(json.dumps(manifest)[:-20])
    with pytest.raises(UserInputError, match="damaged"):
        SupportMemory.load(folder)
    with pytest.raises(UserInputError, match="no manifest.json"):
        SupportMemory.load(tmp_path / "nothing")


def test_load_without_fingerprint_refuses_an_encoder(tmp_path):
    mem, *_ = _filled("flat")
    mem.save(tmp_path / "mem")
    with pytest.raises(FingerprintMismatchError, match="no encoder fingerprint"):
        SupportMemory.load(tmp_path / "mem", encoder={"model": "m"})


_CRASH = textwrap.dedent(
    """
    import os, sys, numpy as np
    sys.path.insert(0, {repo!r})
    from protonets import SupportMemory
    import protonets.memory.store as store
    mem = SupportMemory.load({folder!r})
    rng = np.random.default_rng(1)
    mem.add(rng.normal(size=(500, 32)).astype(np.float32), ["late"] * 500)
    how = sys.argv[1]
    if how == "mid-file":  # die halfway through writing the vectors file
        real = store._npy_writer
        def writer(array):
            def write(path):
                with open(path, "wb") as handle:
                    handle.write(b"\\x93NUMPY" + b"0" * 1000)
                    handle.flush()
                    if array.ndim == 2:
                        os._exit(9)
                real(array)(path)
            return write
        store._npy_writer = writer
    elif how == "before-manifest":  # all data files written, manifest not yet replaced
        import protonets.encoders.atomic as atomic
        atomic.write_json_atomically = lambda *a, **k: os._exit(9)
    elif how == "sigkill":  # save in a loop until the parent kills us
        print("saving", flush=True)
        while True:
            mem.save({folder!r})
    mem.save({folder!r})
    """
)


def test_a_process_killed_while_saving_leaves_the_previous_memory(tmp_path):
    """Three processes (run side by side: each pays torch's import) die while saving."""
    _, _, q, _ = _blobs()
    procs = {}
    for how in ("mid-file", "before-manifest", "sigkill"):
        folder, _ = _saved(tmp_path / how)
        script = tmp_path / how / "crash.py"
        script.write_text(_CRASH.format(repo=str(REPO), folder=str(folder)))
        procs[how] = (folder, subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE))
    before = SupportMemory.load(procs["mid-file"][0]).search(q, k=3)

    folder, proc = procs.pop("sigkill")
    assert proc.stdout.readline() == b"saving\n"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert len(SupportMemory.load(folder)) in (3000, 3500)  # the old memory or the new one

    for how, (folder, proc) in procs.items():
        assert proc.wait(120) == 9, how
        after = SupportMemory.load(folder)
        assert len(after) == 3000 and "late" not in after.classes, how
        s, labels = after.search(q, k=3)
        np.testing.assert_array_equal(labels, before[1])
        np.testing.assert_array_equal(s, before[0])


# -- threads ----------------------------------------------------------------------------------
def test_concurrent_queries_with_serialised_writes():
    mem, x, y, q, _ = _filled("ivf")
    probe = x[:40]  # stored vectors: their own row is always the nearest
    want = mem.search(probe, k=1)[1][:, 0]
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                labels = mem.search(probe, k=1)[1][:, 0]
                assert (labels == want).all()
                mem.classify(probe, mode="knn")
                mem.classify(probe)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def writer() -> None:
        rng = np.random.default_rng(5)
        try:
            for i in range(15):
                far = rng.normal(size=(200, 32)).astype(np.float32) + 50.0
                mem.add(far, [f"far{i}"] * 200)
                if i % 3 == 2:
                    mem.remove(f"far{i - 1}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    w = threading.Thread(target=writer)
    w.start()
    w.join(60)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert len(mem) == 3000 + 10 * 200


def test_rw_lock_lets_readers_share_and_writers_wait():
    lock = store._RWLock()
    both_in = threading.Barrier(2, timeout=5)
    with lock.read():  # a second reader gets in while the first holds the lock
        inside = []

        def second_reader() -> None:
            with lock.read():
                inside.append(True)
                both_in.wait()

        t = threading.Thread(target=second_reader)
        t.start()
        both_in.wait()
        wrote = threading.Event()

        def writer() -> None:
            with lock.write():
                wrote.set()

        w = threading.Thread(target=writer)
        w.start()
        assert not wrote.wait(0.3)  # the writer waits for the reader
    assert wrote.wait(5)
    t.join(5)
    w.join(5)
    assert inside == [True]


# -- FewShotClassifier over a memory ------------------------------------------------------------
def test_classifier_uses_a_memory_as_its_support_store():
    x, y, q, qy = _blobs()
    mem = SupportMemory(32, "cosine", "flat")
    clf = FewShotClassifier(memory=mem).fit(x[:2000], y[:2000])
    assert len(mem) == 2000
    dense = FewShotClassifier(feature_transform="l2n").fit(x[:2000], y[:2000])
    np.testing.assert_array_equal(clf.predict(q), dense.predict(q))
    columns = np.searchsorted(dense.classes_, clf.classes_)  # memory: first-seen order
    np.testing.assert_allclose(clf.predict_proba(q), dense.predict_proba(q)[:, columns], atol=1e-4)
    clf.fit(x[2000:], y[2000:])  # fit adds to the store
    assert len(mem) == 3000
    again = FewShotClassifier.from_memory(mem)
    np.testing.assert_array_equal(again.predict(q), mem.classify(q)[0])
    with pytest.raises(UserInputError, match="saving the memory"):
        again.save("unused")
    from sklearn.base import clone

    copied = clone(clf).fit(x[:10], ["copy"] * 10)  # clone copies the memory: the original stays
    assert len(copied.memory) == 3010 and len(mem) == 3000 and "copy" not in mem.classes
    with pytest.raises(ValueError, match="needs metric='euclidean'"):
        FewShotClassifier.from_memory(SupportMemory(4, "l2"), metric="cosine")


# -- the command ------------------------------------------------------------------------------
def test_memory_commands_build_add_query_info(tmp_path, capsys):
    import shutil

    from protonets.cli import main
    from tests.conftest import EXAMPLES

    support = tmp_path / "support"
    for name in ("brontosaurus", "lotus", "menorah"):
        shutil.copytree(EXAMPLES / "support" / name, support / name)
    more = tmp_path / "more"
    shutil.copytree(EXAMPLES / "support" / "euphonium", more / "euphonium")
    mem = tmp_path / "mem"
    opts = ["--quiet", "--workers", "0"]

    assert main(["memory", "build", str(mem), "--from", str(support), *opts]) == 0
    assert "15 vectors, 3 classes" in capsys.readouterr().out
    ivf = tmp_path / "ivf"
    assert main(["memory", "build", str(ivf), "--from", str(support), "--index", "ivf", *opts]) == 0
    assert "flat search for now (--index ivf is trained once" in capsys.readouterr().out
    assert main(["memory", "build", str(mem), "--from", str(support), *opts]) == 2
    assert "already holds a memory" in capsys.readouterr().err
    assert main(["memory", "add", str(mem), "--from", str(more), *opts]) == 0
    assert "20 vectors, 4 classes" in capsys.readouterr().out

    queries = EXAMPLES / "queries"
    code = main(["memory", "query", str(mem), str(queries / "euphonium_image_0006.jpg"),
                 str(queries / "lotus_image_0007.jpg"), "--format", "json", "--k", "2", *opts])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["label"] for r in rows] == ["euphonium", "lotus"]
    assert len(rows[0]["top_k"]) == 2 and rows[0]["top_k"][0][0] == "euphonium"
    code = main(["memory", "query", str(mem), str(queries / "lotus_image_0006.jpg"),
                 "--mode", "knn", "--k", "3", *opts])
    assert code == 0 and "lotus" in capsys.readouterr().out.splitlines()[2]

    assert main(["memory", "info", str(mem), "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 20 and info["class_counts"]["euphonium"] == 5
    assert info["encoder"] == "tf_efficientnet_lite0"

    files = json.loads((mem / "manifest.json").read_text())["files"]
    vectors = mem / files["vectors.npy"]["file"]
    vectors.write_bytes(vectors.read_bytes()[:-8])
    assert main(["memory", "info", str(mem)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("protonets: error:") and "truncated or altered" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["memory", "query", str(tmp_path / "none"), str(queries), *opts]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_memory_command_refuses_another_encoder(tmp_path, capsys):
    from protonets.cli import main

    mem = SupportMemory(8, encoder_fingerprint={"model": "resnet18", "weights_sha256": "0" * 64})
    mem.add(np.eye(8, dtype=np.float32), list("abcdefgh"))
    mem.save(tmp_path / "mem")
    from tests.conftest import EXAMPLES

    code = main(["memory", "query", str(tmp_path / "mem"), str(EXAMPLES / "queries"),
                 "--encoder", "tf_efficientnet_lite0", "--quiet", "--workers", "0"])
    assert code == 2
    assert "built with encoder resnet18" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "mem" / "manifest.json")


def _crowded(n: int, dim: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """Many overlapping classes, noise larger than their spread (as scripts/bench_memory.py):
    near neighbours lie close together, so 8-dim PQ codes misorder them."""
    g = torch.Generator().manual_seed(0)
    classes = 500
    centres = (torch.randn(classes // 10, dim, generator=g) * dim**-0.5).repeat_interleave(10, 0)
    centres += 0.3 * dim**-0.5 * torch.randn(classes, dim, generator=g)
    labels = torch.arange(n) % classes
    g.manual_seed(1 + stream)
    x = centres[labels] + 1.2 * dim**-0.5 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1).numpy(), labels.numpy()


def test_ivfpq_reranks_enough_candidates_to_agree_with_exact():
    """rerank 10 × k alone left the true neighbour outside the candidates for 1 query in 4
    (agreement 0.81 at 200k × 512) and calibration probed every list; a floor of candidates
    (`indexes.RERANK_MIN_CANDIDATES`) keeps agreement ≥ 0.97 with few lists probed."""
    x, y = _crowded(10_000, 64, stream=0)
    q, _ = _crowded(500, 64, stream=1)
    memory = SupportMemory(64, "cosine", "ivfpq")  # pq_m 8: dim/8, as at 512 dims
    memory.add(x, y.tolist())
    info = memory.info()
    assert info["rerank"] == 10 and info["calibration"]["lower_bound"] >= 0.99
    assert info["nprobe"] <= info["nlist"] // 8, info
    _, exact_labels, exact_ids = memory.search(q, k=1, exact=True, return_ids=True)
    _, labels, ids = memory.search(q, k=1, return_ids=True)
    assert (labels == exact_labels).mean() >= 0.97
    assert (ids == exact_ids).mean() >= 0.97


def test_ivfpq_calibration_grows_the_shortlist_when_pq_misorders_neighbours():
    """Coarse codes (4 bytes for 64 dims) push the true neighbour past 256 PQ candidates:
    calibration picks a longer shortlist with the lists probed (at 10M × 512, 256 candidates
    held agreement at 0.97 even probing every list), and fresh queries agree with exact search."""
    x, y = _crowded(20_000, 64, stream=0)
    q, _ = _crowded(500, 64, stream=1)
    memory = SupportMemory(64, "cosine", "ivfpq", pq_m=4)
    memory.add(x, y.tolist())
    calibration = memory.info()["calibration"]
    assert calibration["candidates"] > 256 and calibration["lower_bound"] >= 0.99, calibration
    _, exact_labels = memory.search(q, k=1, exact=True)
    _, labels = memory.search(q, k=1)
    assert (labels == exact_labels).mean() >= 0.98
    memory._calibration.pop("candidates")  # a memory calibrated before shortlists: the 256 floor
    _, older = memory.search(q, k=1)
    assert (older != labels).any()


def test_calibrate_again_reproduces_the_calibration_of_add():
    x, y = _crowded(20_000, 64, stream=0)
    memory = SupportMemory(64, "cosine", "ivfpq", pq_m=4)
    memory.add(x, y.tolist())
    first = memory.info()["calibration"]
    memory._calibration = {"nprobe": 1, "probes": 0}  # e.g. a memory saved by an earlier release
    assert memory.calibrate() == first == memory.info()["calibration"]
    with pytest.raises(ValueError, match="calibrate"):
        SupportMemory(64, "cosine", "ivfpq", pq_m=4, nprobe=4).calibrate()


def test_memory_calibrate_command_rewrites_only_the_calibration(tmp_path, capsys):
    from protonets.cli import main

    x, y = _crowded(20_000, 64, stream=0)
    memory = SupportMemory(64, "cosine", "ivfpq", pq_m=4)
    memory.add(x, y.tolist())
    fresh = memory.info()["calibration"]
    memory._calibration = {"nprobe": 1, "probes": 0}  # as an earlier release would have saved it
    memory.save(tmp_path / "m")
    assert main(["memory", "calibrate", str(tmp_path / "m")]) == 0
    again = SupportMemory.load(tmp_path / "m")
    assert again.info()["calibration"] == fresh and len(again) == len(x)
    flat = SupportMemory(64, "cosine", "flat")
    flat.add(x[:100], y[:100].tolist())
    flat.save(tmp_path / "flat")
    capsys.readouterr()
    assert main(["memory", "calibrate", str(tmp_path / "flat")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibrate() needs an IVF index" in err[0]


def test_querying_a_checkpoint_memory_without_the_checkpoint_says_to_pass_it(tmp_path, capsys):
    from protonets.cli import main
    from tests.conftest import EXAMPLES, REPO

    mem, weights = tmp_path / "mem", REPO / "checkpoints" / "protonet-conv4-omniglot"
    opts = ["--quiet", "--workers", "0", "--encoder", "conv4"]
    build = ["memory", "build", str(mem), "--from", str(EXAMPLES / "support"), *opts]
    assert main([*build, "--checkpoint", str(weights)]) == 0
    capsys.readouterr()
    assert main(["memory", "query", str(mem), str(EXAMPLES / "queries"), *opts]) == 2
    err = capsys.readouterr().err
    assert "built with the weights of a checkpoint (conv4, sha256 e5cdf49b8463" in err
    assert "pass --checkpoint DIR" in err


def test_memory_add_names_images_already_held_under_another_class(tmp_path, capsys):
    import shutil

    from protonets.cli import main
    from tests.conftest import EXAMPLES

    support, more = tmp_path / "support", tmp_path / "more"
    for name in ("lotus", "menorah"):
        shutil.copytree(EXAMPLES / "support" / name, support / name)
    (more / "waterlily").mkdir(parents=True)
    shutil.copy(EXAMPLES / "support" / "lotus" / "image_0001.jpg", more / "waterlily" / "copy.jpg")
    shutil.copy(EXAMPLES / "support" / "euphonium" / "image_0001.jpg", more / "waterlily" / "new.jpg")
    mem, opts = tmp_path / "mem", ["--quiet", "--workers", "0"]
    assert main(["memory", "build", str(mem), "--from", str(support), *opts]) == 0
    capsys.readouterr()
    assert main(["memory", "add", str(mem), "--from", str(more), "--workers", "0"]) == 0  # warnings on
    out, err = capsys.readouterr()
    [line] = [line for line in err.splitlines() if "another class" in line]
    assert line.startswith("protonets: warning: 1 image(s)")
    assert "copy.jpg' (waterlily) is in class 'lotus'" in line
    assert "added 1 images (skipped 1" in out
