"""The head contract, checked for every registered head: a new registry line is covered here."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from protonets import FewShotClassifier
from protonets.episodes import sample_episodes
from protonets.eval.protocol import evaluate
from protonets.heads import HEADS, Head, build_head, create_head, register_head
from protonets.heads import registry as head_registry

NAMES = sorted(HEADS)
DIM = 16


def _clusters(classes=12, per_class=10, seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, DIM, generator=g) * 2
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), DIM, generator=g), labels


def _episodes(count=4, n_way=5, shots=3, queries=4, seed=0):
    """Support `[E, N*K, D]`, labels `[E, N*K]`, queries `[E, N*Q, D]`, query labels `[E, N*Q]`."""
    out = []
    for e in range(count):
        g = torch.Generator().manual_seed(seed + e)
        centres = torch.randn(n_way, DIM, generator=g) * 2
        s_labels = torch.arange(n_way).repeat_interleave(shots)
        q_labels = torch.arange(n_way).repeat_interleave(queries)
        support = centres[s_labels] + 0.5 * torch.randn(len(s_labels), DIM, generator=g)
        query = centres[q_labels] + 0.5 * torch.randn(len(q_labels), DIM, generator=g)
        out.append((support, s_labels, query, q_labels))
    return [torch.stack(t) for t in zip(*out)]


@pytest.fixture(scope="module")
def head_checkpoint(tmp_path_factory):
    """Tiny trained checkpoint folders, name -> folder, for every head that `needs_checkpoint`
    (the Siamese head; the episodically trained heads of `protonets.training.heads`)."""
    from protonets.encoders import create_encoder
    from protonets.heads.trained import save_head_checkpoint
    from protonets.siamese import save_siamese_checkpoint
    from protonets.siamese.training import train_head
    from protonets.training.heads import TRAINED_PRESETS, train_episodic_head

    emb, labels = _clusters(classes=16, per_class=8, seed=9)
    encoder = create_encoder("conv4", pretrained=False)
    folders = {}
    for name in NAMES:
        if not HEADS[name].needs_checkpoint:
            continue
        folder = tmp_path_factory.mktemp("heads") / name
        torch.manual_seed(0)
        if name == "siamese":
            head = train_head(emb, labels, steps=150, classes=8, per_class=4)[0]
            save_siamese_checkpoint(folder, encoder, head)
        else:
            assert name in TRAINED_PRESETS, f"teach this fixture to make a checkpoint of '{name}'"
            head = train_episodic_head(name, emb, labels, ways=5, shots=2, queries=4, steps=200, lr=3e-3)[0]
            save_head_checkpoint(folder, encoder, head)
        folders[name] = str(folder)
    return folders


def _head(name: str, checkpoints: dict[str, str]) -> Head:
    """A fresh head of `name`: from its checkpoint folder if it needs one, else with defaults."""
    return build_head(name, checkpoints.get(name))


@pytest.mark.parametrize("name", NAMES)
def test_declarations(name):
    cls = HEADS[name]
    assert issubclass(cls, Head)
    for flag in ("needs_checkpoint", "needs_grad", "transductive"):
        assert isinstance(getattr(cls, flag), bool), flag
    assert cls.memory_budget > 0
    if cls.needs_checkpoint:
        assert cls.checkpoint_hint, "say what folder the head needs and how to make one"
    else:  # generic options: a head keeps what its constructor takes and ignores the rest
        assert isinstance(build_head(name, some_other_heads_option=3, steps=None), cls)


@pytest.mark.parametrize("name", NAMES)
def test_fit_forward_gives_query_by_class_logits(name, head_checkpoint):
    support, labels, query, q_labels = (t[0] for t in _episodes(1))
    head = _head(name, head_checkpoint).fit(support, labels)
    logits = head(query)
    assert logits.shape == (20, 5) and logits.is_floating_point()
    assert (logits.argmax(1) == q_labels).double().mean() > 0.6
    assert head.episode_bytes(5, 3, 4, DIM) > 0


@pytest.mark.parametrize("name", NAMES)
def test_batched_episode_logits_equal_per_episode_fit_forward(name, head_checkpoint):
    support, labels, query, _ = _episodes(4)
    with torch.no_grad():
        batched = _head(name, head_checkpoint).episode_logits(support, labels, query, 5)
        single = torch.stack(
            [_head(name, head_checkpoint).fit(s, y)(q) for s, y, q in zip(support, labels, query)]
        )
    assert batched.shape == (4, 20, 5)
    torch.testing.assert_close(batched.double(), single.double(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_scores_each_episode_as_fit_forward_does(name, head_checkpoint):
    emb, labels = _clusters()
    episodes = sample_episodes(labels.numpy(), 5, 2, 3, 12, seed=0)
    acc = evaluate(emb, episodes, name, head_checkpoint=head_checkpoint.get(name))
    assert acc.shape == (12,) and acc.mean() > 0.6
    for e in (0, 7):
        idx = torch.from_numpy(episodes.indices[e])  # [N, K+Q]
        support, query = emb[idx[:, :2].reshape(-1)], emb[idx[:, 2:].reshape(-1)]
        with torch.no_grad():
            logits = _head(name, head_checkpoint).fit(support, torch.arange(5).repeat_interleave(2))(query)
        expected = (logits.argmax(1) == torch.arange(5).repeat_interleave(3)).double().mean()
        assert acc[e] == pytest.approx(float(expected))


@pytest.mark.parametrize("name", NAMES)
def test_classifier_on_embeddings_fits_saves_and_loads(name, head_checkpoint, tmp_path):
    support, labels, query, q_labels = (t[0].numpy() for t in _episodes(1, seed=3))
    names = np.array(["a", "b", "c", "d", "e"])
    checkpoint = head_checkpoint.get(name)
    clf = FewShotClassifier(head=name, checkpoint=checkpoint).fit(support, names[labels])
    proba = clf.predict_proba(query)
    assert proba.shape == (20, 5)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    assert (clf.predict(query) == names[q_labels]).mean() > 0.6
    clf.save(tmp_path / "clf")
    again = FewShotClassifier.load(tmp_path / "clf")
    np.testing.assert_allclose(again.predict_proba(query), proba, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name, head_checkpoint):
    support, labels, query, _ = (t[0] for t in _episodes(1, seed=5))
    head = _head(name, head_checkpoint).fit(support, labels)
    fresh = create_head(name, **head.hyperparameters())
    fresh.load_state_dict(head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(query), head(query))


def test_a_head_that_needs_a_checkpoint_says_so(monkeypatch):
    for name in NAMES:
        cls = HEADS[name]
        if not cls.needs_checkpoint:
            continue
        if cls.checkpoint_env:
            monkeypatch.delenv(cls.checkpoint_env, raising=False)
        with pytest.raises(ValueError, match="checkpoint=DIR"):
            FewShotClassifier(head=name).fit(np.random.rand(4, DIM), [0, 0, 1, 1])
        emb, labels = _clusters()
        with pytest.raises(ValueError, match="--head-checkpoint"):
            evaluate(emb, sample_episodes(labels.numpy(), 5, 1, 1, 2), name)


def test_unknown_names_list_the_registry():
    with pytest.raises(ValueError, match="prototype"):
        create_head("no-such-head")
    emb, labels = _clusters()
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(emb, sample_episodes(labels.numpy(), 5, 1, 1, 2), "no-such-head")


def test_presets_name_what_the_head_is():
    assert create_head("cl2n").hyperparameters()["feature_transform"] == "cl2n"
    assert create_head("prototype-cosine").metric == "cosine"
    assert create_head("prototype-cosine", metric="euclidean").metric == "euclidean"  # explicit wins
    generic = build_head("cl2n", metric="cosine", feature_transform=None)  # generic options don't
    assert (generic.metric, generic.feature_transform) == ("euclidean", "cl2n")


def test_register_head_adds_a_users_own_head(monkeypatch):
    monkeypatch.setattr(head_registry, "_REGISTRY", dict(head_registry._REGISTRY))

    @register_head("first-support")
    class FirstSupport(Head):
        def fit(self, support, labels):
            self.protos = torch.stack([support[labels == c][0] for c in range(int(labels.max()) + 1)])
            return self

        def forward(self, query):
            return -torch.cdist(query, self.protos)

    assert "first-support" in HEADS and HEADS["first-support"] is FirstSupport
    emb, labels = _clusters()
    assert evaluate(emb, sample_episodes(labels.numpy(), 5, 1, 2, 6), "first-support").mean() > 0.6


def test_listing_heads_imports_no_eval_or_training_stack():
    code = (
        "import sys, protonets\n"
        "from protonets.cli import build_parser\n"
        "names = sorted(protonets.HEADS)\n"
        "try:\n"
        "    build_parser('classify').parse_args(['classify', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('protonets.eval', 'protonets.training', 'protonets.maml.train', 'protonets.maml.learner',\n"
        "         'protonets.siamese.training', 'sklearn.linear_model')\n"
        "print(names, sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out[-500:]


def test_knn_equal_votes_go_to_the_class_with_the_nearer_hits():
    """k=2 in a 1-shot episode: every class gets at most one vote, so the nearer one must win
    (a bonus shared by all classes would hand every tie to class 0)."""
    head = create_head("knn", k=2)
    support = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]]])  # classes 0, 1, 2
    labels = torch.tensor([[0, 1, 2]])
    query = torch.tensor([[[0.9, 0.0], [0.1, 0.0]]])  # nearest class 1, then nearest class 0
    logits = head.episode_logits(support, labels, query, 3)
    assert logits.argmax(-1).tolist() == [[1, 0]]
    # two votes beat one nearer vote: ranks 1 and 2 of class 1 against rank 0 of class 0
    support = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.1, 0.0]]])
    labels = torch.tensor([[0, 1, 1]])
    logits = create_head("knn", k=3).episode_logits(support, labels, torch.tensor([[[0.2, 0.0]]]), 2)
    assert logits.argmax(-1).tolist() == [[1]]


def test_finetune_lowers_the_support_loss_and_stays_inductive():
    """`finetune` (Chen et al.; easyfsl's Finetune): Adam on the support cross-entropy moves the
    prototypes so the support set is classified with a lower loss than by its class means; with
    0 steps it is the prototype head; a query's logits do not depend on the other queries."""
    import torch.nn.functional as F

    from protonets.heads.prototype import compute_prototypes
    from protonets.heads.transductive_finetune import distance_logits

    g = torch.Generator().manual_seed(0)
    support = torch.randn(3, 10, 8, generator=g)
    labels = torch.arange(5).repeat_interleave(2).expand(3, -1)
    query = torch.randn(3, 7, 8, generator=g)

    def support_loss(logits):
        return F.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1))

    means = distance_logits(support, compute_prototypes(support, labels, 5), 1.0)
    tuned = create_head("finetune", steps=100, lr=0.05, metric="euclidean")
    assert support_loss(tuned.episode_logits(support, labels, support, 5)) < support_loss(means) - 0.1
    for metric, twin in (("euclidean", "prototype"), ("cosine", "prototype-cosine")):
        untuned = create_head("finetune", steps=0, metric=metric).episode_logits(support, labels, query, 5)
        proto = create_head(twin).episode_logits(support, labels, query, 5)
        assert torch.equal(untuned.argmax(-1), proto.argmax(-1))
    head = create_head("finetune", steps=20, lr=0.05)
    batch = head.episode_logits(support, labels, query, 5)
    alone = torch.cat([head.episode_logits(support, labels, query[:, i : i + 1], 5) for i in range(7)], 1)
    torch.testing.assert_close(batch, alone)
    with pytest.raises(ValueError, match="steps"):
        create_head("finetune", steps=-1)
    with pytest.raises(ValueError, match="metric"):
        create_head("finetune", metric="l3")
