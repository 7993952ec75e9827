import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

from protonets.episodes import gather_episodes, sample_episodes
from protonets.eval.protocol import METHODS, evaluate
from protonets.eval.run import run_evaluation


def _clusters(seed=0, classes=12, per_class=30, dim=16, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    labels = torch.arange(classes).repeat_interleave(per_class)
    emb = centers[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return emb, labels.numpy()


def _plain_protonet(emb, ep):
    """A per-episode reference written the obvious way."""
    out = []
    for e in range(len(ep)):
        protos = torch.stack([emb[ep.indices[e, n, : ep.shots]].mean(0) for n in range(ep.ways)])
        right = 0
        for n in range(ep.ways):
            for row in ep.indices[e, n, ep.shots :]:
                right += int(torch.argmin(((protos - emb[row]) ** 2).sum(1))) == n
        out.append(right / (ep.ways * ep.queries))
    return np.array(out)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("shots", [1, 5])
def test_vectorised_prototype_equals_plain_loop_and_nearest_centroid(shots):
    emb, labels = _clusters()
    ep = sample_episodes(labels, 5, shots, 7, episodes=40, seed=2)
    ours = evaluate(emb, ep, "prototype")
    np.testing.assert_allclose(ours, _plain_protonet(emb, ep))
    for e in range(0, 40, 7):
        s, sy, q, qy = (
            t[0].numpy() for t in gather_episodes(emb, torch.from_numpy(ep.indices[e : e + 1]), ep.shots)
        )
        ref = (NearestCentroid().fit(s, sy).predict(q) == qy).mean()
        assert ours[e] == pytest.approx(ref)


def test_knn_matches_sklearn_for_k1():
    emb, labels = _clusters(seed=1)
    ep = sample_episodes(labels, 5, 3, 5, episodes=20, seed=0)
    ours = evaluate(emb, ep, "knn", k=1)
    for e in range(20):
        s, sy, q, qy = (
            t[0].numpy() for t in gather_episodes(emb, torch.from_numpy(ep.indices[e : e + 1]), ep.shots)
        )
        ref = (KNeighborsClassifier(1).fit(s, sy).predict(q) == qy).mean()
        assert ours[e] == pytest.approx(ref)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_learns_separable_data(method):
    emb, labels = _clusters(spread=0.3)
    ep = sample_episodes(labels, 5, 2, 5, episodes=10, seed=0)
    options = {}
    if method == "siamese":  # the one method that needs a trained artifact: train it here
        from protonets.siamese.training import train_head

        train_emb, train_labels = _clusters(seed=9, spread=0.3)
        options["head"] = train_head(train_emb, torch.from_numpy(train_labels), steps=150, classes=8)[0]
    elif METHODS[method].needs_checkpoint:  # a head trained on frozen embeddings: train it here
        from protonets.training.heads import train_episodic_head

        train_emb, train_labels = _clusters(seed=9, spread=0.3)
        head = train_episodic_head(method, train_emb, train_labels, ways=5, shots=2, steps=300, lr=3e-3)
        options["head"] = head[0]
    assert evaluate(emb, ep, method, **options).mean() > 0.9


def test_chunking_does_not_change_results(monkeypatch):
    import protonets.eval.protocol as protocol

    emb, labels = _clusters()
    ep = sample_episodes(labels, 5, 1, 5, episodes=30, seed=4)
    methods = ("cl2n", "knn", "maml")
    whole = {m: evaluate(emb, ep, m) for m in methods}
    monkeypatch.setattr(protocol, "_chunk_size", lambda *a, **k: 7)  # every method chunks through it
    for m in methods:
        np.testing.assert_allclose(evaluate(emb, ep, m), whole[m], atol=1e-12, err_msg=m)


def test_same_seed_same_numbers_and_seeds_agree_within_ci():
    """Over several settings, two seeds' means differ by less than sqrt(ci1² + ci2²) almost always."""
    emb, labels = _clusters(seed=5, classes=20, spread=2.0)
    settings = dict(
        methods=["prototype", "prototype-cosine", "knn"], ways=[5, 10], shots=[1, 5], queries=10, episodes=300
    )
    a = run_evaluation(emb, labels, seed=0, **settings)
    assert a == run_evaluation(emb, labels, seed=0, **settings)
    b = run_evaluation(emb, labels, seed=1, **settings)
    within = [abs(x["accuracy"] - y["accuracy"]) <= np.hypot(x["ci95"], y["ci95"]) for x, y in zip(a, b)]
    assert len(within) == 12 and sum(within) >= 10, within
    assert all(0.3 < r["accuracy"] < 1.0 for r in a)  # a setting where the CI is not trivially 0
