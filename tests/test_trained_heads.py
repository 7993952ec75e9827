"""The heads trained on frozen embeddings (matching with FCE, relation, feat) and every head on
imbalanced (Dirichlet) query sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from protonets.episodes import sample_episodes
from protonets.eval.protocol import evaluate
from protonets.heads import HEADS, build_head
from protonets.heads.trained import load_head_checkpoint, save_head_checkpoint
from protonets.training.heads import TRAINED_PRESETS, train_episodic_head
from tests.conftest import EXAMPLES

TRAINABLE = sorted(TRAINED_PRESETS)


def _clusters(classes=24, per_class=20, dim=16, seed=0, spread=0.9):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


@pytest.fixture(scope="module")
def trained():
    """name -> head trained briefly on synthetic clusters (other classes than the test ones)."""
    emb, labels = _clusters(seed=1)
    heads = {}
    for name in TRAINABLE:
        heads[name] = train_episodic_head(
            name, emb, labels, ways=5, shots=1, queries=5, steps=150, lr=3e-3, seed=0
        )[0]
    return heads


@pytest.mark.parametrize("name", TRAINABLE)
def test_trains_on_clusters_and_beats_chance(name, trained):
    emb, labels = _clusters(seed=2)
    episodes = sample_episodes(labels.numpy(), 5, 1, 5, 60, seed=3)
    accuracy = evaluate(emb, episodes, name, head=trained[name]).mean()
    assert accuracy > 0.6, accuracy  # chance is 0.2


def test_training_is_seeded_and_validates():
    emb, labels = _clusters(seed=1)
    val_emb, val_labels = _clusters(classes=10, seed=4)
    kwargs = dict(ways=5, shots=1, queries=3, steps=20, val_every=10, val_episodes=20, val_shots=1)
    a, log = train_episodic_head("relation", emb, labels, val_emb, val_labels, seed=5, **kwargs)
    b, _ = train_episodic_head("relation", emb, labels, val_emb, val_labels, seed=5, **kwargs)
    assert [r["step"] for r in log] == [10, 20] and all("val_acc" in r and "val_ci95" in r for r in log)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y)


def test_feat_contrastive_regulariser_trains():
    emb, labels = _clusters(seed=1)
    log = train_episodic_head("feat", emb, labels, ways=5, shots=2, queries=3, steps=60, contrastive=0.1)[1]
    assert np.isfinite(log[-1]["train_loss"]) and log[-1]["train_acc"] > 0.5
    with pytest.raises(ValueError, match="feat head only"):
        train_episodic_head("relation", emb, labels, steps=1, contrastive=0.1)


@pytest.mark.parametrize("name", TRAINABLE)
def test_checkpoint_round_trip(name, trained, tmp_path, default_encoder):
    emb, labels = _clusters(seed=2)
    episodes = sample_episodes(labels.numpy(), 5, 2, 4, 10, seed=0)
    save_head_checkpoint(tmp_path / name, default_encoder, trained[name], {"method": name})
    again = load_head_checkpoint(tmp_path / name, HEADS[name])
    assert again.hyperparameters() == trained[name].hyperparameters()
    before = evaluate(emb, episodes, name, head=trained[name])
    np.testing.assert_array_equal(evaluate(emb, episodes, name, head_checkpoint=str(tmp_path / name)), before)
    np.testing.assert_array_equal(evaluate(emb, episodes, name, head=again), before)
    if HEADS[name].needs_checkpoint:  # the registry's way in: build_head(name, DIR)
        assert build_head(name, str(tmp_path / name)).hyperparameters() == again.hyperparameters()
    other = "relation" if name != "relation" else "feat"
    save_head_checkpoint(tmp_path / other, default_encoder, trained[other])
    with pytest.raises(ValueError, match=f"holds no {name} head"):
        load_head_checkpoint(tmp_path / other, HEADS[name])


def test_matching_works_untrained_and_takes_an_optional_checkpoint():
    emb, labels = _clusters(seed=2)
    episodes = sample_episodes(labels.numpy(), 5, 1, 5, 40, seed=0)
    assert not HEADS["matching"].needs_checkpoint
    assert not build_head("matching").fce
    assert evaluate(emb, episodes, "matching").mean() > 0.6  # plain cosine attention


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_runs_on_dirichlet_episodes(name, trained):
    """Imbalanced query sets (T = N*Q queries per episode, Dirichlet class shares) through evaluate."""
    emb, labels = _clusters(classes=12, per_class=30, seed=6, spread=0.5)
    episodes = sample_episodes(labels.numpy(), 5, 2, 4, 6, seed=1, query_balance="dirichlet", alpha=1.0)
    options = {}
    if name == "siamese":
        from protonets.siamese.training import train_head

        train_emb, train_labels = _clusters(seed=9, spread=0.5)
        options["head"] = train_head(train_emb, train_labels, steps=100, classes=8)[0]
    elif HEADS[name].needs_checkpoint:
        options["head"] = trained[name]
    accuracy = evaluate(emb, episodes, name, **options)
    assert accuracy.shape == (6,) and np.isfinite(accuracy).all()
    assert accuracy.mean() > 0.5, accuracy


def test_dirichlet_accuracy_is_the_mean_of_per_episode_accuracy():
    emb, labels = _clusters(classes=12, per_class=30, seed=6, spread=1.5)
    episodes = sample_episodes(labels.numpy(), 5, 1, 6, 30, seed=2, query_balance="dirichlet", alpha=0.5)
    ours = evaluate(emb, episodes, "prototype")
    for e in range(30):
        support = emb[episodes.indices[e, :, 0]]
        query = emb[episodes.query_index[e]]
        predicted = torch.cdist(query, support).argmin(1).numpy()
        assert ours[e] == pytest.approx((predicted == episodes.query_labels[e]).mean())


# -- the commands ---------------------------------------------------------------------------------


def _eval_argv(tmp_path, *extra):
    return [
        "eval", "--data", str(EXAMPLES / "support"), "--ways", "3", "--shots", "1", "--queries", "2",
        "--episodes", "20", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--workers", "0", *extra,
    ]  # fmt: skip


def test_eval_relation_without_head_checkpoint_is_one_line(tmp_path, capsys):
    from protonets.cli import main

    assert main(_eval_argv(tmp_path, "--method", "relation")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("protonets: error:") and "--head-checkpoint" in err[0]
    assert not (tmp_path / "cache").exists()  # refused before embedding


@pytest.mark.parametrize("alpha", ["0", "-1", "nan", "inf", "x"])
def test_bad_dirichlet_alpha_exits_2(alpha, tmp_path, capsys):
    from protonets.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(_eval_argv(tmp_path, "--query-balance", "dirichlet", "--dirichlet-alpha", alpha))
    assert exit_.value.code == 2
    assert "--dirichlet-alpha" in capsys.readouterr().err.strip().splitlines()[-1]


def test_train_relation_then_eval_with_the_checkpoint(tmp_path, capsys):
    from protonets.cli import main

    out = tmp_path / "relation"
    train = [
        "train", "--method", "relation", "--freeze-encoder", "--data", str(EXAMPLES / "support"),
        "--ways", "3", "--shots", "1", "--queries", "2", "--episodes", "30", "--val-split", "none",
        "--cache-dir", str(tmp_path / "cache"), "--output", str(out), "--quiet",
    ]  # fmt: skip
    assert main([*train[:2], "matching", *train[4:], "--episodes-per-step", "2"]) == 2  # joint: 1 a step
    assert "--freeze-encoder" in capsys.readouterr().err and not out.exists()
    assert main(train) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["head"]["name"] == "relation" and manifest["method"] == "relation"
    assert (out / "train_log.jsonl").exists()
    capsys.readouterr()
    argv = _eval_argv(tmp_path, "--method", "relation", "prototype", "--head-checkpoint", str(out))
    argv += ["--query-balance", "dirichlet", "--dirichlet-alpha", "1.5", "--output", str(tmp_path / "r.json")]
    assert main(argv) == 0
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["query_balance"] == "dirichlet" and document["dirichlet_alpha"] == 1.5
    rows = document["results"]
    assert [r["method"] for r in rows] == ["relation", "prototype"]
    assert all(r["query_balance"] == "dirichlet" and r["alpha"] == 1.5 for r in rows)
    assert all(0 <= r["accuracy"] <= 1 for r in rows)


def test_validation_of_a_joint_feat_head_runs_without_dropout():
    """The best checkpoint is chosen on deterministic scores: validation turns dropout off."""
    from protonets.encoders import create_encoder
    from protonets.training import ImageSet, TrainConfig
    from protonets.training.joint_heads import JointHeadMethod
    from protonets.training.trainer import ImageEpisodes

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(24, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    data = ImageSet(images, torch.arange(6).repeat_interleave(4))
    torch.manual_seed(0)
    encoder = create_encoder("conv4", pretrained=False)
    config = TrainConfig(ways=3, shots=1, queries=2, val_ways=3, val_shots=1, val_queries=2, val_episodes=6)
    method = JointHeadMethod(ImageEpisodes(encoder, data, data, config), "feat", dropout=0.5)
    method.train(True)
    first, second = method.validate(), method.validate()
    assert first == second and method.head.training
