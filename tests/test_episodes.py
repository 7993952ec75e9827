import logging

import numpy as np
import pytest
import torch

from protonets.encoders.errors import UserInputError
from protonets.episodes import Episodes, sample_episodes


def _labels(counts):
    return np.concatenate([np.full(n, c) for c, n in enumerate(counts)])


@pytest.mark.parametrize("ways,shots,queries", [(5, 1, 15), (20, 5, 5), (3, 2, 0)])
def test_sampler_invariants(ways, shots, queries):
    labels = _labels([20] * 30)
    ep = sample_episodes(labels, ways, shots, queries, episodes=50, seed=1)
    assert ep.indices.shape == (50, ways, shots + queries) and ep.classes.shape == (50, ways)
    for e in range(50):
        assert len(set(ep.classes[e])) == ways  # exactly N distinct classes
        for n in range(ways):
            rows = ep.indices[e, n]
            assert len(set(rows)) == shots + queries  # no image twice
            assert (labels[rows] == ep.classes[e, n]).all()  # K and Q of that class
        support, query = set(ep.support[e].ravel()), set(ep.query[e].ravel())
        assert not support & query  # disjoint


def test_same_seed_same_episodes_other_seed_others():
    labels = _labels([20] * 30)
    a = sample_episodes(labels, 5, 1, 15, 100, seed=7)
    b = sample_episodes(labels, 5, 1, 15, 100, seed=7)
    c = sample_episodes(labels, 5, 1, 15, 100, seed=8)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)


def test_known_values_are_stable_across_machines():
    """numpy's default_rng(PCG64) is specified: these values must never change."""
    ep = sample_episodes(_labels([3] * 4), ways=2, shots=1, queries=1, episodes=2, seed=0)
    assert ep.indices.tolist() == [[[8, 6], [11, 9]], [[7, 8], [10, 11]]]


def test_small_classes_are_left_out_with_one_warning(caplog):
    labels = _labels([20, 3, 20, 2, 20])
    with caplog.at_level(logging.WARNING, logger="protonets.episodes"):
        ep = sample_episodes(labels, 3, 5, 5, 20, seed=0, class_names=list("abcde"))
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "b, d" in message and "3 remain" in message
    assert set(np.unique(ep.classes)) == {0, 2, 4}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="protonets.episodes"):
        with pytest.raises(UserInputError, match="only 3 have"):
            sample_episodes(labels, 4, 5, 5, 20)
    assert not caplog.records  # the error alone, one line


def test_the_trainer_names_the_classes_it_leaves_out(caplog):
    from protonets.encoders import create_encoder
    from protonets.training import EpisodicTrainer, ImageSet, TrainConfig

    labels = torch.tensor([0] * 8 + [1] * 8 + [2] * 1 + [3] * 8)  # c: 1 image, 2 needed
    train = ImageSet(torch.zeros(len(labels), 1, 28, 28, dtype=torch.uint8), labels, list("abcd"))
    config = TrainConfig(ways=2, shots=1, queries=1, episodes=1, val_ways=2, val_shots=1, val_queries=1)
    with caplog.at_level(logging.WARNING, logger="protonets.episodes"):
        EpisodicTrainer(create_encoder("conv4", pretrained=False), train, train, config, progress=False)
    assert [r.getMessage().split(": ")[2] for r in caplog.records] == ["c; 3 remain"] * 2


def test_save_and_load_round_trip(tmp_path):
    ep = sample_episodes(_labels([10] * 8), 4, 2, 3, 12, seed=3)
    ep.save(tmp_path / "episodes.npz")
    again = Episodes.load(tmp_path / "episodes.npz")
    np.testing.assert_array_equal(again.indices, ep.indices)
    assert (again.ways, again.shots, again.queries, again.seed) == (4, 2, 3, 3)
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(UserInputError, match="bad.npz"):
        Episodes.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("item", [(), (4,), (1, 3, 2)])
def test_split_works_on_any_batch_shape_and_item_shape(item):
    """Index tensors, embeddings `[..., D]` and images `[..., C, H, W]` split alike."""
    from protonets.episodes import gather_episodes, split_episodes

    ways, shots, queries = 3, 2, 4
    x = torch.randn(2, 5, ways, shots + queries, *item)
    s, sy, q, qy = split_episodes(x, shots, item_dims=len(item))
    assert s.shape == (2, 5, ways * shots, *item) and q.shape == (2, 5, ways * queries, *item)
    assert sy.shape == (2, 5, ways * shots) and qy.shape == (2, 5, ways * queries)
    for n in range(ways):
        assert torch.equal(s[:, :, n * shots : (n + 1) * shots], x[:, :, n, :shots])
        assert torch.equal(q[:, :, n * queries : (n + 1) * queries], x[:, :, n, shots:])
        assert (sy[..., n * shots : (n + 1) * shots] == n).all()
        assert (qy[..., n * queries : (n + 1) * queries] == n).all()
    rows = torch.randn(50, *item)
    index = torch.randint(50, (7, ways, shots + queries))
    for a, b in zip(gather_episodes(rows, index, shots), split_episodes(rows[index], shots, len(item))):
        assert torch.equal(a, b)


def test_balanced_layout_is_unchanged_and_gathers_as_before():
    """query_balance="balanced" gives exactly the classic episodes (same seed, same arrays)."""
    from protonets.episodes import EpisodeSampler, gather_episodes

    labels = _labels([12] * 9)
    ep = sample_episodes(labels, 4, 2, 3, 30, seed=5, query_balance="balanced")
    indices, classes = EpisodeSampler(labels, 4, 2, 3).draw(np.random.default_rng(5), 30)
    np.testing.assert_array_equal(ep.indices, indices)
    np.testing.assert_array_equal(ep.classes, classes)
    assert ep.balanced and ep.query_index is None and ep.query_balance == "balanced"
    rows = torch.randn(len(labels), 3)
    for a, b in zip(ep.gather(rows, 3, 9), gather_episodes(rows, torch.from_numpy(indices[3:9]), 2)):
        assert torch.equal(a, b)


def _dirichlet(labels, seed=0, alpha=2.0, ways=5, shots=1, queries=10, episodes=200):
    return sample_episodes(
        labels, ways, shots, queries, episodes, seed=seed, query_balance="dirichlet", alpha=alpha
    )


def test_dirichlet_totals_rows_and_labels():
    labels = _labels([60] * 12)
    ep = _dirichlet(labels)
    assert ep.indices.shape == (200, 5, 1) and ep.query_index.shape == ep.query_labels.shape == (200, 50)
    assert not ep.capped.any() and ep.alpha == 2.0 and not ep.balanced
    for e in range(200):
        support, query = ep.indices[e].ravel(), ep.query_index[e]
        assert len(set(support) | set(query)) == 5 + 50  # no image twice
        assert (labels[query] == ep.classes[e][ep.query_labels[e]]).all()  # labels name the class
        for n in range(5):
            assert (labels[ep.indices[e, n]] == ep.classes[e, n]).all()
    s, sy, q, qy = ep.gather(torch.arange(len(labels)).float()[:, None], 0, 7)
    assert s.shape == (7, 5, 1) and q.shape == (7, 50, 1) and sy.shape == (7, 5)
    assert torch.equal(q[..., 0].long(), torch.from_numpy(ep.query_index[:7]))
    assert torch.equal(qy, torch.from_numpy(ep.query_labels[:7]))


def test_dirichlet_is_seeded_and_proportions_vary():
    labels = _labels([60] * 12)
    a, b, c = _dirichlet(labels, seed=3), _dirichlet(labels, seed=3), _dirichlet(labels, seed=4)
    for name in ("indices", "classes", "query_index", "query_labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.query_index, c.query_index)
    counts = np.stack([np.bincount(row, minlength=5) for row in a.query_labels])  # [E, N]
    assert (counts.sum(1) == 50).all()
    assert len({tuple(row) for row in counts}) > 150  # proportions differ from episode to episode
    assert (counts != 10).any(1).mean() > 0.95  # almost never balanced
    assert counts.min() == 0 or counts.std() > 3
    # smaller alpha, stronger imbalance: the largest class takes more of the queries
    sharp = np.stack([np.bincount(r, minlength=5) for r in _dirichlet(labels, alpha=0.5).query_labels])
    flat = np.stack([np.bincount(r, minlength=5) for r in _dirichlet(labels, alpha=50).query_labels])
    assert sharp.max(1).mean() > counts.max(1).mean() > flat.max(1).mean()


def test_dirichlet_caps_small_classes_and_says_so():
    """A class with fewer images than its share gives all it has; the rest go to the others."""
    labels = _labels([4, 4, 4, 40, 40, 40])  # 1 shot: room for 3 queries in the small classes
    ep = _dirichlet(labels, ways=3, shots=1, queries=3, episodes=300, alpha=1.0)
    sizes = np.bincount(labels)
    for e in range(300):
        counts = np.bincount(ep.query_labels[e], minlength=3)
        assert counts.sum() == 9
        room = sizes[ep.classes[e]] - 1
        assert (counts <= room).all()
        if ep.capped[e]:
            assert (counts == room)[room < 9].any()  # a small class gave all it has
    assert ep.capped.any() and not ep.capped.all()
    all_small = np.isin(ep.classes, [0, 1, 2]).all(1)  # three small classes: exactly 3 each
    assert all_small.any()
    for e in np.flatnonzero(all_small):
        assert np.bincount(ep.query_labels[e], minlength=3).tolist() == [3, 3, 3]


def test_split_total_keeps_the_total_and_the_order():
    from protonets.episodes import _split_total

    shares, capped = _split_total(np.array([0.7, 0.2, 0.1]), 10, np.array([100, 100, 100]))
    assert shares.tolist() == [7, 2, 1] and not capped
    shares, capped = _split_total(np.array([0.9, 0.05, 0.05]), 10, np.array([3, 100, 100]))
    assert shares.tolist() == [3, 4, 3]  # the excess 6 split evenly, ties by class order
    assert capped and shares.sum() == 10


def test_dirichlet_save_load_round_trip_and_bad_alpha(tmp_path):
    ep = _dirichlet(_labels([20] * 8), episodes=15, queries=3)
    ep.save(tmp_path / "d.npz")
    again = Episodes.load(tmp_path / "d.npz")
    for name in ("indices", "classes", "query_index", "query_labels", "capped"):
        np.testing.assert_array_equal(getattr(again, name), getattr(ep, name))
    assert (again.query_balance, again.alpha, again.queries) == ("dirichlet", 2.0, 3)
    for alpha in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UserInputError, match="alpha"):
            _dirichlet(_labels([20] * 8), alpha=alpha)
    with pytest.raises(UserInputError, match="balanced, dirichlet"):
        sample_episodes(_labels([20] * 8), 3, 1, 2, 4, query_balance="skewed")
