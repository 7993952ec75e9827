import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestCentroid

from protonets.heads import PrototypeHead


def _data(seed=0, n_way=5, shots=4, queries=6, dim=16):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_way, dim, generator=g) * 3
    support = centers.repeat_interleave(shots, 0) + torch.randn(n_way * shots, dim, generator=g)
    labels = torch.arange(n_way).repeat_interleave(shots)
    query = centers.repeat_interleave(queries, 0) + torch.randn(n_way * queries, dim, generator=g)
    return support, labels, query


def test_euclidean_logits_are_negative_squared_distances():
    support, labels, query = _data()
    head = PrototypeHead("euclidean").fit(support, labels)
    protos = torch.stack([support[labels == c].mean(0) for c in range(5)])
    torch.testing.assert_close(head(query), -(torch.cdist(query, protos) ** 2), rtol=1e-4, atol=1e-3)


def test_matches_sklearn_nearest_centroid():
    support, labels, query = _data(seed=3)
    ours = PrototypeHead("euclidean").fit(support, labels)(query).argmax(1).numpy()
    ref = NearestCentroid().fit(support.numpy(), labels.numpy()).predict(query.numpy())
    np.testing.assert_array_equal(ours, ref)


def test_cosine_logits_are_scaled_cosine():
    support, labels, query = _data(seed=1)
    head = PrototypeHead("cosine", scale=7.0).fit(support, labels)
    protos = torch.stack([support[labels == c].mean(0) for c in range(5)])
    ref = 7.0 * torch.nn.functional.cosine_similarity(query[:, None], protos[None], dim=-1)
    torch.testing.assert_close(head(query), ref, rtol=1e-5, atol=1e-5)


def test_cl2n_centres_on_support_mean_then_normalises():
    support, labels, query = _data(seed=2)
    head = PrototypeHead("euclidean", feature_transform="cl2n").fit(support, labels)
    mean = support.mean(0)
    norm = lambda x: torch.nn.functional.normalize(x - mean, dim=-1)  # noqa: E731
    protos = torch.stack([norm(support)[labels == c].mean(0) for c in range(5)])
    torch.testing.assert_close(head(query), -(torch.cdist(norm(query), protos) ** 2), rtol=1e-4, atol=1e-5)


def test_prototypes_are_buffers_in_state_dict_and_load_back():
    support, labels, query = _data()
    head = PrototypeHead("cosine", feature_transform="cl2n").fit(support, labels)
    state = head.state_dict()
    assert set(state) == {"prototypes", "center"} and state["prototypes"].shape == (5, 16)
    fresh = PrototypeHead("cosine", feature_transform="cl2n")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(query), head(query))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="labels must be"):
        PrototypeHead().fit(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        PrototypeHead().fit(torch.zeros(4, 3), torch.zeros(4))
    head = PrototypeHead().fit(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="dims"):
        head(torch.zeros(2, 5))
    with pytest.raises(RuntimeError, match="not fitted"):
        PrototypeHead()(torch.zeros(2, 3))
