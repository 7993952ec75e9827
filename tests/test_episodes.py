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
    with pytest.raises(UserInputError, match="only 3 have"):
        sample_episodes(labels, 4, 5, 5, 20)


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
