import json

import numpy as np
import pytest
import torch

from protonets import FewShotClassifier
from protonets.encoders import FingerprintMismatchError, UserInputError
from tests.conftest import EXAMPLES


def _blobs(seed=0, n=60, classes=("cat", "dog", "eel"), dim=8):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(classes), dim)) * 4
    y = np.array(classes)[rng.integers(0, len(classes), n)]
    X = centers[np.searchsorted(np.array(sorted(classes)), y)] + rng.normal(size=(n, dim))
    return X.astype(np.float32), y


def test_fit_predict_on_embeddings():
    X, y = _blobs()
    clf = FewShotClassifier(metric="euclidean").fit(X, y)
    assert clf.classes_.tolist() == ["cat", "dog", "eel"]
    assert (clf.predict(X) == y).mean() > 0.95
    proba = clf.predict_proba(X)
    assert proba.shape == (60, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    assert clf.predict_top_k(X[:2], k=2)[0][0][0] == clf.predict(X[:1])[0]


def test_threshold_answers_unknown():
    X, y = _blobs()
    far = np.full((1, 8), 0.0, dtype=np.float32)
    clf = FewShotClassifier(metric="cosine", threshold=0.999).fit(X, y)
    assert clf.predict(far)[0] == "unknown"
    assert FewShotClassifier(metric="cosine").fit(X, y).predict(far)[0] in {"cat", "dog", "eel"}


def test_fewer_than_two_classes_is_refused():
    with pytest.raises(ValueError, match="at least 2 classes"):
        FewShotClassifier().fit(np.zeros((3, 4)), ["a", "a", "a"])


def test_labels_mixing_strings_and_numbers_are_refused_not_merged():
    x = np.random.default_rng(0).random((6, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="mixes strings and numbers"):
        FewShotClassifier().fit(x, [1, "1", 2, 2, 3, 3])
    assert FewShotClassifier().fit(x, ["1", "1", "2", "2", "3", "3"]).classes_.tolist() == ["1", "2", "3"]


def test_wrong_width_is_refused():
    X, y = _blobs()
    clf = FewShotClassifier().fit(X, y)
    with pytest.raises(ValueError, match="8 features"):
        clf.predict(np.zeros((2, 5), dtype=np.float32))


def test_not_fitted():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        FewShotClassifier().predict(np.zeros((2, 5)))


def test_save_load_round_trip_on_embeddings(tmp_path):
    X, y = _blobs()
    clf = FewShotClassifier(metric="euclidean", feature_transform="cl2n").fit(X, y)
    clf.save(tmp_path / "clf")
    again = FewShotClassifier.load(tmp_path / "clf")
    np.testing.assert_array_equal(again.predict(X), clf.predict(X))
    np.testing.assert_allclose(again.predict_proba(X), clf.predict_proba(X))
    assert again.get_params()["feature_transform"] == "cl2n"


def test_load_refuses_newer_format_and_altered_files(tmp_path):
    X, y = _blobs()
    FewShotClassifier().fit(X, y).save(tmp_path / "clf")
    manifest_path = tmp_path / "clf" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = tmp_path / "clf" / manifest["files"]["head.safetensors"]["file"]
    blob = bytearray(data.read_bytes())
    blob[-1] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(UserInputError, match="altered"):
        FewShotClassifier.load(tmp_path / "clf")
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserInputError, match="newer"):
        FewShotClassifier.load(tmp_path / "clf")
    with pytest.raises(UserInputError, match="no manifest.json"):
        FewShotClassifier.load(tmp_path)


def test_images_fit_save_load_and_fingerprint_check(tmp_path, default_encoder):
    support = sorted((EXAMPLES / "support").rglob("*.jpg"))
    labels = [p.parent.name for p in support]
    queries = sorted((EXAMPLES / "queries").glob("*.jpg"))
    clf = FewShotClassifier(encoder=default_encoder, num_workers=0).fit(support, labels)
    predicted = clf.predict(queries)
    truth = [q.name.rsplit("_image", 1)[0] for q in queries]
    assert (predicted == np.array(truth)).mean() >= 0.9
    clf.save(tmp_path / "clf")
    again = FewShotClassifier.load(tmp_path / "clf", encoder=default_encoder)
    np.testing.assert_array_equal(again.predict(queries), predicted)

    # A different encoder (same name, other weights) is refused.
    from protonets.encoders import create_encoder

    other = create_encoder("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(FingerprintMismatchError, match="weights"):
        FewShotClassifier.load(tmp_path / "clf", encoder=other)


def test_embeddings_fit_refuses_image_queries():
    X, y = _blobs()
    clf = FewShotClassifier().fit(X, y)
    with pytest.raises(UserInputError, match="precomputed embeddings"):
        clf.predict([str(EXAMPLES / "queries" / "lotus_image_0006.jpg")])


def test_torch_input_and_sklearn_clone():
    from sklearn.base import clone

    X, y = _blobs()
    clf = FewShotClassifier(metric="euclidean").fit(torch.from_numpy(X), y)
    assert (clf.predict(torch.from_numpy(X)) == y).mean() > 0.95
    assert clone(clf).get_params() == clf.get_params()


def test_passes_scikit_learn_estimator_checks_on_embeddings():
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(FewShotClassifier(metric="euclidean"), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert not failed
    assert sum(r["status"] == "passed" for r in results) > 30


def test_bundle_save_removes_files_of_earlier_saves(tmp_path):
    from protonets.encoders.atomic import load_bundle, save_bundle

    def writer(data):
        return lambda p: open(p, "wb").write(data)

    save_bundle(
        tmp_path / "b",
        {"kind": "k", "format_version": 1},
        {"a.bin": writer(b"1"), "index.faiss": writer(b"2")},
    )
    save_bundle(tmp_path / "b", {"kind": "k", "format_version": 1}, {"a.bin": writer(b"3")})
    manifest, files = load_bundle(tmp_path / "b", "k", 1)
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name != ".protonets.lock") == sorted(
        ["manifest.json", manifest["files"]["a.bin"]["file"]]
    )
    assert open(files["a.bin"], "rb").read() == b"3"
