"""Transductive heads on small synthetic episodes where the right answer is known.

The shared contract (fit/forward, batched = per episode, evaluate, save/load) is in test_heads.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from protonets import FewShotClassifier
from protonets.cli import main
from protonets.cli.classify import ASSUME_BALANCED, TRANSDUCTIVE
from protonets.heads import HEADS, compute_prototypes, create_head
from tests.conftest import EXAMPLES

FAST = {"tim": {"steps": 300, "lr": 1e-3}, "alpha-tim": {"steps": 300, "lr": 1e-3}}
NAMES = sorted(n for n in HEADS if HEADS[n].transductive)


def _head(name: str, **options):
    return create_head(name, **{**FAST.get(name, {}), **options})


def _episodes(count=6, n_way=3, shots=2, queries=5, dim=24, spread=0.4, seed=0, support_offset=0.0):
    """Gaussian clusters: support [E, N*K, D], labels [E, N*K], queries [E, N*Q, D], labels [E, N*Q].

    Centres are positive (features after a ReLU). support_offset moves every support example of
    class c away from the other centres, by that fraction of the distance between centres: the
    support prototypes then sit off their query clusters, and only the queries can say so.
    """
    g = torch.Generator().manual_seed(seed)
    centres = 1.0 + torch.rand(count, n_way, dim, generator=g) * 2
    s_labels = torch.arange(n_way).repeat_interleave(shots).expand(count, -1)
    q_labels = torch.arange(n_way).repeat_interleave(queries).expand(count, -1)
    away = centres - centres.mean(1, keepdim=True)
    s_centres = centres + support_offset * away
    pick = lambda c, y: c.gather(1, y.unsqueeze(-1).expand(-1, -1, dim))  # noqa: E731
    support = pick(s_centres, s_labels) + spread * torch.randn(count, n_way * shots, dim, generator=g)
    query = pick(centres, q_labels) + spread * torch.randn(count, n_way * queries, dim, generator=g)
    return support, s_labels.contiguous(), query, q_labels.contiguous()


def _accuracy(logits, labels):
    return (logits.argmax(-1) == labels).double().mean().item()


def test_the_registry_declares_every_transductive_method():
    assert (
        set(TRANSDUCTIVE)
        == set(NAMES)
        >= {
            "bd-cspn",
            "laplacianshot",
            "soft-kmeans",
            "tim",
            "alpha-tim",
            "pt-map",
            "transductive-finetune",
        }
    )
    balanced = {n for n in NAMES if HEADS[n].assumes_balanced_queries}
    assert balanced == set(ASSUME_BALANCED) == {"pt-map", "tim", "bd-cspn", "laplacianshot"}
    assert HEADS["tim"].needs_grad and HEADS["alpha-tim"].needs_grad
    assert HEADS["transductive-finetune"].needs_grad and not HEADS["pt-map"].needs_grad


@pytest.mark.parametrize("name", NAMES)
def test_well_separated_clusters_are_all_right(name):
    support, labels, query, q_labels = _episodes(spread=0.2)
    with torch.no_grad():
        logits = _head(name).episode_logits(support, labels, query, 3)
    assert logits.shape == (6, 15, 3) and torch.isfinite(logits).all()
    assert _accuracy(logits, q_labels) == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_the_query_set_moves_the_prototypes(name):
    """Support examples sit off their classes' query clusters: the inductive prototype head
    errs, the transductive method (using the queries) does better."""
    support, labels, query, q_labels = _episodes(
        count=10, shots=1, queries=8, spread=0.6, support_offset=-0.6
    )
    # easyfsl's defaults for transductive-finetune barely move the prototypes
    options = {"lr": 0.05, "temperature": 5.0} if name == "transductive-finetune" else {}
    with torch.no_grad():
        inductive = _accuracy(create_head("prototype").episode_logits(support, labels, query, 3), q_labels)
        ours = _accuracy(_head(name, **options).episode_logits(support, labels, query, 3), q_labels)
    assert inductive < 0.9, "the episode must be hard for the prototype head"
    assert ours >= inductive + 0.05, (ours, inductive)


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_one_by_one_with_uneven_queries(name):
    support, labels, query, _ = _episodes(count=3, n_way=4, shots=2, queries=3, seed=4)
    query = query[:, :-1]  # 11 queries for 4 classes: not a multiple of the ways
    with torch.no_grad():
        batched = _head(name).episode_logits(support, labels, query, 4)
        single = torch.stack([_head(name).fit(s, y)(q) for s, y, q in zip(support, labels, query)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_renaming_the_classes_permutes_the_logits(name):
    support, labels, query, _ = _episodes(count=2, n_way=4, shots=2, queries=3, seed=7)
    perm = torch.tensor([2, 0, 3, 1])  # class c is called perm[c]
    with torch.no_grad():
        logits = _head(name).episode_logits(support, labels, query, 4)
        renamed = _head(name).episode_logits(support, perm[labels], query, 4)
    torch.testing.assert_close(renamed[..., perm], logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_one_query_or_mismatched_shapes_are_clear_errors(name):
    support, labels, query, _ = _episodes(count=1)
    head = _head(name).fit(support[0], labels[0])
    with pytest.raises(ValueError, match="at least 2 queries"):
        head(query[0, :1])
    with pytest.raises(ValueError, match="query embeddings must be"):
        head(query[0, :, :5])
    with pytest.raises(ValueError, match="at least 2 queries"):
        _head(name).episode_logits(support, labels, query[:, :1], 3)
    with pytest.raises(ValueError, match="does not match"):
        _head(name).episode_logits(support, labels, query[:, :, :5], 3)
    with pytest.raises(RuntimeError, match="not fitted"):
        _head(name)(query[0])


def test_alpha_tim_picks_the_papers_alpha_by_shots():
    head = create_head("alpha-tim", steps=0)
    assert head.alpha is None and head.hyperparameters()["alpha"] is None
    with pytest.raises(ValueError, match="alpha"):
        create_head("alpha-tim", alpha=1.0)


def _sinkhorn_knopp(cost, lam, iterations=20000):
    """The plain Sinkhorn–Knopp loop, in float64, run far past convergence: the reference plan."""
    plan = torch.exp(-lam * cost.double())
    for _ in range(iterations):
        plan = plan / plan.sum(-1, keepdim=True)
        plan = plan * (cost.shape[-2] / cost.shape[-1]) / plan.sum(-2, keepdim=True)
    return plan


@pytest.mark.parametrize("lam", [1.0, 10.0, 40.0])
def test_pt_map_transport_is_the_sinkhorn_projection(lam):
    from protonets.heads.pt_map import balanced_transport

    g = torch.Generator().manual_seed(1)
    cost = torch.rand(4, 13, 4, generator=g)  # 13 queries, 4 classes: 3.25 per class
    cost[0, :, 0] += 0.5  # one class far from every query: a slow case for Sinkhorn–Knopp
    plan, scalings = balanced_transport(cost, lam=lam)
    assert plan.dtype == torch.float32 and scalings.shape == (4, 4)
    torch.testing.assert_close(plan.sum(-1), torch.ones(4, 13), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(-2), torch.full((4, 4), 3.25), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.double(), _sinkhorn_knopp(cost, lam), atol=1e-5, rtol=1e-4)
    # started from its own answer, a nearby problem lands on its own projection
    nearby = cost + 0.01 * torch.rand(cost.shape, generator=g)
    warm, _ = balanced_transport(nearby, lam=lam, log_scalings=scalings)
    torch.testing.assert_close(warm.double(), _sinkhorn_knopp(nearby, lam), atol=1e-5, rtol=1e-4)


def test_pt_map_transport_gives_a_far_class_its_share():
    """A class far from every query (its column's mass underflows at first) still gets Q/N."""
    from protonets.heads.pt_map import balanced_transport

    cost = torch.rand(2, 12, 4, generator=torch.Generator().manual_seed(5))
    cost[0, :, 0] += 10.0  # exp(-100): no curvature for Newton's step at the start
    plan, _ = balanced_transport(cost, lam=10.0)
    torch.testing.assert_close(plan.sum(-2), torch.full((2, 4), 3.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.double(), _sinkhorn_knopp(cost, 10.0), atol=1e-5, rtol=1e-4)


def test_pt_map_episode_with_a_class_left_out_of_the_support_stays_finite():
    g = torch.Generator().manual_seed(6)
    support, query = torch.rand(2, 4, 8, generator=g), torch.rand(2, 9, 8, generator=g)
    labels = torch.tensor([[0, 0, 2, 2], [0, 1, 2, 2]])  # episode 0 has no example of class 1
    with torch.no_grad():
        logits = create_head("pt-map").episode_logits(support, labels, query, 3)
    assert torch.isfinite(logits).all()


def test_pt_map_transport_lets_a_broken_episode_go(monkeypatch):
    """A NaN cost ends its own episode at once (NaN plan), not after every iteration allowed,
    and leaves the others exact."""
    from protonets.heads.pt_map import balanced_transport

    solves = []
    solve = torch.linalg.solve
    monkeypatch.setattr(torch.linalg, "solve", lambda a, b: solves.append(len(a)) or solve(a, b))
    cost = torch.rand(3, 10, 5, generator=torch.Generator().manual_seed(7))
    cost[1, 4, 2] = float("nan")
    plan, _ = balanced_transport(cost, lam=10.0, max_iter=100)
    assert plan[1].isnan().any() and not plan[[0, 2]].isnan().any()
    torch.testing.assert_close(plan[[0, 2]].sum(-2), torch.full((2, 5), 2.0), atol=1e-5, rtol=0)
    assert solves and max(solves) == 2 and len(solves) < 30, solves  # the NaN episode never iterated


@pytest.mark.parametrize("running_min", [True, False])
def test_knn_graph_marks_each_querys_nearest_neighbours(running_min, monkeypatch):
    from protonets.heads import laplacianshot
    from protonets.heads.laplacianshot import knn_graph

    if running_min:
        monkeypatch.setattr(laplacianshot, "RUNNING_MIN_EPISODES", 1)
    else:  # the topk path that large episodes, small batches and other devices take
        monkeypatch.setattr(laplacianshot, "RUNNING_MIN_QUERIES", 0)
    x = torch.randn(3, 9, 5, generator=torch.Generator().manual_seed(2))
    for k in (1, 3, 8, 12):  # 12 > Q - 1: every other query
        graph = knn_graph(x, k)
        assert graph.shape == (3, 9, 9) and (graph.sum(-1) == min(k, 8)).all()
        assert (graph.diagonal(dim1=1, dim2=2) == 0).all()
        for e in range(3):
            dist = torch.cdist(x[e], x[e]) + torch.diag(torch.full((9,), float("inf")))
            expected = torch.zeros(9, 9).scatter_(1, dist.topk(min(k, 8), largest=False).indices, 1.0)
            torch.testing.assert_close(graph[e], expected)


def test_knn_graph_gives_exactly_k_neighbours_when_distances_tie(monkeypatch):
    from protonets.heads import laplacianshot
    from protonets.heads.laplacianshot import knn_graph

    monkeypatch.setattr(laplacianshot, "RUNNING_MIN_EPISODES", 1)  # the running-min path's ties

    x = torch.randn(4, 10, 6, generator=torch.Generator().manual_seed(5))
    x[1, 5] = x[1, 2]  # duplicates tie at every other query's distance
    x[2, 4:8] = x[2, 0]  # four copies of one point
    graph = knn_graph(x, 3)
    assert (graph.sum(-1) == 3).all() and (graph.diagonal(dim1=1, dim2=2) == 0).all()
    for e in range(4):
        dist = torch.cdist(x[e], x[e]) + torch.diag(torch.full((10,), float("inf")))
        chosen = dist.masked_select(graph[e].bool()).view(10, 3).sort(-1).values
        torch.testing.assert_close(chosen, dist.topk(3, largest=False).values.sort(-1).values)


def test_bd_cspn_pseudo_labels_a_tied_query_with_the_first_nearest_class():
    """Classes 0 and 1 share their support example, so a query on it is equally near both: as
    argmax picks, it joins class 0 only (class 1 keeps its support example alone)."""
    from protonets.heads.bd_cspn import rectify

    support = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    labels = torch.tensor([[0, 1, 2]])
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.3, 0.9]]])
    rectified, _ = rectify(support, labels, query, 3, 10.0)
    assert torch.allclose(rectified[0, 1], support[0, 1])  # only its support example
    assert not torch.allclose(rectified[0, 0], support[0, 0])  # moved by the tied query's shift


def test_laplacianshot_runs_with_gradients_on():
    support, labels, query, _ = _episodes(count=2, queries=6, spread=0.6)
    support.requires_grad_(True)
    query.requires_grad_(True)
    logits = create_head("laplacianshot", feature_transform=None).episode_logits(support, labels, query, 3)
    logits.sum().backward()
    assert support.grad is not None and support.grad.isfinite().all()


def test_class_softmax_and_logsumexp_match_torch():
    from protonets.heads.transductive import class_logsumexp, class_softmax

    logits = 30 * torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(class_softmax(logits), logits.softmax(-1))
    torch.testing.assert_close(class_softmax(logits, -2), logits.softmax(-2))
    torch.testing.assert_close(class_logsumexp(logits), torch.logsumexp(logits, -1))


def test_compute_prototypes_by_scatter_matches_class_means_and_keeps_dtype():
    g = torch.Generator().manual_seed(0)
    support = torch.randn(3, 20, 6, generator=g)
    labels = torch.randint(0, 5, (3, 20), generator=g)
    labels[:, :5] = torch.arange(5)
    batched = compute_prototypes(support, labels, 5)
    for e in range(3):
        expected = torch.stack([support[e][labels[e] == c].mean(0) for c in range(5)])
        torch.testing.assert_close(batched[e], expected)
        torch.testing.assert_close(compute_prototypes(support[e], labels[e], 5), batched[e])
    assert compute_prototypes(support.double(), labels, 5).dtype == torch.float64
    assert batched.dtype == torch.float32


def _classifier_episode(name="soft-kmeans", **params):
    support, labels, query, q_labels = (t[0].numpy() for t in _episodes(count=1, queries=6, spread=0.6))
    clf = FewShotClassifier(head=name, **params).fit(support, np.array(["a", "b", "c"])[labels])
    return clf, query, q_labels


def test_classifier_uses_the_whole_query_batch():
    clf, query, q_labels = _classifier_episode()
    together = clf.predict_proba(query)
    assert (together.argmax(1) == q_labels).mean() == 1.0
    first_two = clf.predict_proba(query[:2])
    assert not np.allclose(first_two, together[:2]), "the answer depends on the other queries"
    with pytest.raises(ValueError, match="at least 2 queries"):
        clf.predict_proba(query[:1])


def test_classifier_threshold_leaves_unsure_queries_out_of_the_refinement():
    clf, query, _ = _classifier_episode(metric="euclidean", scale=10.0)
    first = clf.predict_proba(query)
    threshold = float(np.sort(first.max(1))[3]) + 1e-9  # the 4 least sure queries fall below
    clf.set_params(threshold=threshold)
    proba = clf.predict_proba(query)
    unsure = first.max(1) < threshold
    assert unsure.sum() == 4
    np.testing.assert_allclose(proba[unsure], first[unsure])
    clf.set_params(threshold=None)
    np.testing.assert_allclose(proba[~unsure], clf.predict_proba(query[~unsure]), rtol=1e-6)
    labels = clf.set_params(threshold=threshold).predict(query)
    assert (labels[unsure] == "unknown").all()


def test_saved_transductive_classifier_loads_and_answers_the_same(tmp_path):
    clf, query, _ = _classifier_episode("pt-map")
    clf.save(tmp_path / "clf")
    again = FewShotClassifier.load(tmp_path / "clf")
    np.testing.assert_allclose(again.predict_proba(query), clf.predict_proba(query), rtol=1e-6)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_with_one_query_and_a_transductive_head_is_one_line_exit_2(capsys):
    query = EXAMPLES / "queries" / "lotus_image_0006.jpg"
    code, out, err = _run(capsys, "classify", EXAMPLES / "support", query, "--head", "bd-cspn", "--quiet")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "2 or more QUERY images" in err


def test_classify_help_says_the_queries_are_the_unlabelled_batch(capsys):
    with pytest.raises(SystemExit):
        main(["classify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "unlabelled batch" in text and "alpha-tim" in text


def test_classify_pt_map_warns_once_and_answers(capsys):
    code, out, err = _run(
        capsys,
        "classify",
        EXAMPLES / "support",
        EXAMPLES / "queries",
        "--head",
        "pt-map",
        "--format",
        "json",
        "--workers",
        "0",
    )  # fmt: skip (no --quiet: it silences warnings)
    assert code == 0, err
    assert err.count("assumes the queries are spread over the classes like the support set") == 1
    rows = json.loads(out)
    right = sum(r["label"] == r["query"].split("/")[-1].rsplit("_image", 1)[0] for r in rows)
    assert len(rows) == 10 and right >= 9
