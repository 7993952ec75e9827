"""The checkpoints committed in checkpoints/: they load, match their manifests and still classify."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tests.conftest import REPO, require_data

CHECKPOINTS = REPO / "checkpoints"
COMMITTED = [
    "protonet-conv4-omniglot",
    "protonet-conv4-omniglot-1shot-trainval",
    "protonet-conv4-omniglot-1shot-trainval-12k",
    "protonet-conv4-omniglot-1shot-trainval-20k",
    "protonet-conv4-omniglot-5shot-trainval",
    "protonet-conv4-omniglot-5shot-trainval-14k",
    "siamese-conv4-omniglot",
    "maml-conv4-omniglot-scratch-cpu",
]


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_checkpoint_loads_with_its_fingerprint(name):
    from protonets.encoders import create_encoder

    manifest = json.loads((CHECKPOINTS / name / "manifest.json").read_text())
    encoder = create_encoder(checkpoint_path=str(CHECKPOINTS / name))
    assert encoder.name == "conv4" and encoder.preprocessing["input_size"] == [1, 28, 28]
    assert encoder.fingerprint_id == manifest["fingerprint_id"]


@pytest.fixture(scope="module")
def omniglot_test_episodes():
    """20 seeded 5-way 1-shot episodes (5 queries) of the Omniglot Vinyals test split."""
    from protonets.episodes import sample_episodes
    from protonets.eval.datasets import omniglot

    dataset = omniglot(str(require_data("omniglot")), "test")
    batch = sample_episodes(dataset.labels, 5, 1, 5, 20, seed=0, class_names=dataset.class_names)
    rows, inverse = np.unique(batch.indices, return_inverse=True)
    items = [dataset.items[i] for i in rows]
    return items, dataclasses.replace(batch, indices=inverse.reshape(batch.indices.shape))


def _embed(encoder, items):
    return encoder.embed(items, progress=False, num_workers=0).embeddings


def test_protonet_and_siamese_checkpoints_classify_omniglot_test_characters(omniglot_test_episodes):
    from protonets.encoders import create_encoder
    from protonets.eval.protocol import evaluate
    from protonets.siamese import load_siamese

    items, episodes = omniglot_test_episodes
    proto = create_encoder(checkpoint_path=str(CHECKPOINTS / "protonet-conv4-omniglot"))
    assert evaluate(_embed(proto, items), episodes, "prototype").mean() > 0.9
    encoder, head, _ = load_siamese(CHECKPOINTS / "siamese-conv4-omniglot")
    assert evaluate(_embed(encoder, items), episodes, "siamese", head=head).mean() > 0.85


def test_maml_checkpoint_adapts_on_omniglot_test_characters(omniglot_test_episodes):
    from protonets.maml.train import evaluate_episodes, load_meta_learner

    items, episodes = omniglot_test_episodes
    learner, encoder, config = load_meta_learner(CHECKPOINTS / "maml-conv4-omniglot-scratch-cpu")
    accuracy = evaluate_episodes(learner, encoder, items, episodes.indices, 1, config.eval_inner_steps)
    assert accuracy.mean() > 0.75
