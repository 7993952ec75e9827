"""The Siamese head: symmetry, training, calibration, checkpoints, verify command, eval method."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from protonets.encoders import create_encoder
from protonets.siamese import (
    SiameseHead,
    calibrate_threshold,
    load_siamese,
    sample_pairs,
    save_siamese_checkpoint,
)
from protonets.siamese.training import SiameseConfig, SiameseTrainer, random_pairs, train_head
from protonets.training import ImageSet


def _clusters(classes: int, per_class: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize("product,hidden", [(True, 32), (False, 0)])
def test_similarity_is_symmetric(product, hidden):
    head = SiameseHead(16, hidden=hidden, product=product)
    a, b = torch.randn(50, 16), torch.randn(50, 16)
    torch.testing.assert_close(head.similarity(a, b), head.similarity(b, a))
    assert head.similarity(a, b).shape == (50,)


def test_class_score_is_max_or_mean_over_supports():
    support, labels = torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    query = torch.randn(3, 8)
    pairs = SiameseHead(8).pair_logits(query[:, None], support[None])  # [3, 6]
    best = SiameseHead(8, reduce="max").fit(support, labels)(query)
    mean = SiameseHead(8, reduce="mean").fit(support, labels)(query)
    torch.testing.assert_close(best, pairs.view(3, 3, 2).amax(-1))
    torch.testing.assert_close(mean, pairs.view(3, 3, 2).mean(-1))


def test_training_on_a_tiny_split_separates_same_from_different():
    from sklearn.metrics import roc_auc_score

    emb, labels = _clusters(30, 6)
    train, test = labels < 20, labels >= 20  # held-out classes for the test
    head, log = train_head(emb[train], labels[train], steps=150, classes=10, per_class=4, val_every=50)
    a, b, same = random_pairs(labels[test], 500, seed=3)
    with torch.no_grad():
        before = roc_auc_score(same, SiameseHead(16).pair_logits(emb[test][a], emb[test][b]))
        after = roc_auc_score(same, head.pair_logits(emb[test][a], emb[test][b]))
    assert after > 0.9 and after > before
    assert log[-1]["train_loss"] < log[0]["train_loss"]


@pytest.mark.parametrize("far", [0.0, 0.01, 0.1])
def test_calibration_meets_the_false_accept_rate(far):
    emb, labels = _clusters(10, 10)
    head = train_head(emb, labels, steps=60, classes=8, per_class=4)[0]
    a, b, same = random_pairs(labels, 800, seed=1)
    result = head.calibrate(emb[a], emb[b], same, far=far)
    decided = head.verify(emb[a], emb[b])
    assert float(decided[~same].float().mean()) <= far + 1e-12
    assert result["far"] <= far and 0.5 < result["auc"] <= 1.0
    assert float(head.threshold) == pytest.approx(result["threshold"])


def test_calibrate_threshold_errors_are_named():
    with pytest.raises(ValueError, match="both"):
        calibrate_threshold(np.zeros(4), np.ones(4, dtype=bool), 0.1)
    with pytest.raises(ValueError, match="far"):
        calibrate_threshold(np.zeros(4), np.array([1, 0, 1, 0], dtype=bool), 2.0)


def test_sample_pairs_is_balanced_and_mines_hard_negatives():
    labels = torch.arange(5).repeat_interleave(3)
    scores = torch.randn(15, 15)
    i, j, same = sample_pairs(labels, scores, torch.Generator().manual_seed(0), hard_fraction=1.0)
    assert int(same.sum()) == 15 and int((~same).sum()) == 15 and bool((i < j).all())
    neg = scores[i[~same], j[~same]]
    all_neg = torch.tensor(
        [scores[a, b] for a in range(15) for b in range(a + 1, 15) if labels[a] != labels[b]]
    )
    assert torch.equal(neg.sort().values, all_neg.topk(15).values.sort().values)


def _tiny_images(classes: int = 6, per_class: int = 4) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    patterns = (torch.rand(classes, 1, 28, 28, generator=g) > 0.7).to(torch.uint8) * 255
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = patterns[labels].clone()
    flip = torch.rand(images.shape, generator=g) < 0.05
    images[flip] = 255 - images[flip]
    return ImageSet(images, labels)


def test_joint_training_checkpoint_resume_and_loading(tmp_path):
    torch.manual_seed(0)
    encoder = create_encoder("conv4", pretrained=False)
    data = _tiny_images()
    config = SiameseConfig(
        ways=4, shots=1, queries=2, episodes=4, val_ways=3, val_shots=1, val_queries=1,
        val_episodes=5, val_every=2, augment="affine", proto_weight=0.5,
    )  # fmt: skip
    trainer = SiameseTrainer(encoder, data, data, config, output=tmp_path / "run", progress=False)
    result = trainer.fit()
    assert result.step == 4 and (tmp_path / "run" / "train_log.jsonl").is_file()
    # resume to more steps
    config2 = SiameseConfig.from_dict({**config.to_dict(), "episodes": 6})
    again = SiameseTrainer(
        create_encoder("conv4", pretrained=False), data, data, config2, tmp_path / "run", False
    )
    again.resume()
    assert again.fit().step == 6
    loaded_encoder, head, manifest = load_siamese(tmp_path / "run")
    assert manifest["method"] == "siamese" and head.dim == 64
    assert create_encoder(checkpoint_path=str(tmp_path / "run")).name == "conv4"


def _write_images(folder, count=2):
    paths = []
    for k in range(count):
        array = np.full((28, 28), 255, dtype=np.uint8)
        array[4 + 5 * k : 10 + 5 * k, 4:20] = 0
        path = folder / f"img{k}.png"
        Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths


def _saved_checkpoint(tmp_path):
    torch.manual_seed(0)
    encoder = create_encoder("conv4", pretrained=False)
    head = SiameseHead(64)
    head.threshold.fill_(0.25)
    save_siamese_checkpoint(tmp_path / "ckpt", encoder, head, {"calibration": {"target_far": 0.01}})
    return str(tmp_path / "ckpt")


def test_verify_command_prints_similarity_and_decision(tmp_path, capsys):
    from protonets.cli import main

    checkpoint = _saved_checkpoint(tmp_path)
    a, b = _write_images(tmp_path)
    assert main(["verify", a, b, "--checkpoint", checkpoint, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert 0 < doc["similarity"] < 1 and doc["same"] == (doc["similarity"] >= doc["threshold"])
    assert doc["threshold"] == pytest.approx(float(torch.sigmoid(torch.tensor(0.25))), abs=1e-6)
    assert main(["verify", a, b, "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_classifier_with_the_siamese_head(tmp_path):
    from protonets import FewShotClassifier

    checkpoint = _saved_checkpoint(tmp_path)
    paths = _write_images(tmp_path, 3)
    clf = FewShotClassifier(head="siamese", checkpoint=checkpoint).fit(paths, ["a", "b", "c"])
    assert clf.predict_proba(paths).shape == (3, 3)
    clf.save(tmp_path / "clf")
    again = FewShotClassifier.load(tmp_path / "clf")
    np.testing.assert_allclose(again.predict_proba(paths), clf.predict_proba(paths), rtol=1e-5)
    with pytest.raises(Exception, match="checkpoint=DIR"):
        FewShotClassifier(head="siamese", encoder="conv4").fit(np.random.rand(4, 64), [0, 0, 1, 1])


def test_eval_method_siamese_runs_on_episodes(monkeypatch, tmp_path):
    from protonets.episodes import sample_episodes
    from protonets.eval.protocol import evaluate

    emb, labels = _clusters(12, 8, dim=64)
    head = train_head(emb, labels, steps=80, classes=8, per_class=4)[0]
    episodes = sample_episodes(labels.numpy(), 5, 1, 3, 20, seed=0)
    acc = evaluate(emb, episodes, "siamese", head=head)
    assert acc.shape == (20,) and acc.mean() > 0.6
    monkeypatch.delenv("PROTONETS_SIAMESE_HEAD", raising=False)
    with pytest.raises(Exception, match="PROTONETS_SIAMESE_HEAD"):
        evaluate(emb, episodes, "siamese")


def _image_folder(root, classes=4, per_class=4):
    g = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        base = g.random((28, 28)) > 0.7
        for k in range(per_class):
            noisy = base ^ (g.random((28, 28)) > 0.95)
            Image.fromarray(np.where(noisy, 0, 255).astype(np.uint8)).save(root / f"class{c}" / f"{k}.png")
    return str(root)


def test_train_command_method_siamese_joint_and_frozen(tmp_path, capsys):
    from protonets.cli import main

    data = _image_folder(tmp_path / "data")
    common = ["train", "--method", "siamese", "--dataset", "folder", "--data", data, "--quiet"]
    joint = [*common, "--val-split", "none", "--ways", "3", "--shots", "1", "--queries", "2"]
    joint_out = ["--affine", "--image-size", "32", "--output", str(tmp_path / "joint")]
    assert main([*joint, "--episodes", "2", *joint_out]) == 0
    encoder, head, manifest = load_siamese(tmp_path / "joint")
    assert manifest["method"] == "siamese" and manifest["training"]["augment"] == "affine"
    assert encoder.preprocessing["input_size"] == [1, 32, 32]  # --image-size is honoured
    capsys.readouterr()
    assert main([*joint, "--episodes", "3", *joint_out[:2], "28", *joint_out[3:], "--resume"]) != 0
    assert "cannot change --image-size when resuming" in capsys.readouterr().err
    frozen = [*common, "--freeze-encoder", "--episodes", "20", "--ways", "3", "--val-every", "10"]
    assert main([*frozen, "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "frozen")]) == 0
    out = capsys.readouterr().out
    assert "threshold for FAR" in out
    _, head, manifest = load_siamese(tmp_path / "frozen")
    assert (
        manifest["frozen_encoder"]
        and head.normalize
        and manifest["head"]["calibration"]["target_far"] == 0.01
    )
