"""Episodic training: sampler, learning, resume, checkpoints, the train command."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from protonets.cli import main
from protonets.encoders import UserInputError, create_encoder, open_image
from protonets.episodes import EpisodeSampler
from protonets.training import (
    EpisodicTrainer,
    ImageSet,
    TrainConfig,
    augment,
    preload_images,
    read_log,
    to_input,
)
from protonets.training.checkpoint import LOG_FILE, STATE_DIR
from tests.conftest import require_data, write_class_folder

TIMING = {"elapsed_s", "episodes_per_s"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic(classes: int, per_class: int, seed: int) -> ImageSet:
    """28×28 'characters': a sparse random template per class, partly erased, plus random ink."""
    g = torch.Generator().manual_seed(seed)
    templates = (torch.rand(classes, 1, 28, 28, generator=g) < 0.2).float()
    keep = (torch.rand(classes * per_class, 1, 28, 28, generator=g) < 0.8).float()
    noise = (torch.rand(classes * per_class, 1, 28, 28, generator=g) < 0.12).float()
    ink = torch.clamp(templates.repeat_interleave(per_class, 0) * keep + noise, 0, 1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return ImageSet((255 * (1 - ink)).to(torch.uint8), labels)


@pytest.fixture(scope="module")
def data():
    return synthetic(40, 10, 0), synthetic(10, 10, 1)


def small_config(**overrides) -> TrainConfig:
    values = dict(
        ways=5, shots=2, queries=3, episodes=12, lr_step=5, val_ways=5, val_shots=1,
        val_queries=5, val_episodes=20, val_every=4, seed=3,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def trainer(data, output=None, init_seed=0, **overrides) -> EpisodicTrainer:
    torch.manual_seed(init_seed)
    encoder = create_encoder("conv4", pretrained=False)
    return EpisodicTrainer(encoder, data[0], data[1], small_config(**overrides), output, progress=False)


# -- sampling and data -----------------------------------------------------------------------------
def test_sampler_draws_distinct_classes_and_images():
    labels = torch.tensor([0] * 6 + [1] * 6 + [2] * 3 + [3] * 7)
    sampler = EpisodeSampler(labels, 3, 2, 2, split="training")
    assert len(sampler.usable) == 3  # class 2 has too few images for 2 + 2
    rng = np.random.default_rng(0)
    for _ in range(20):
        episode = sampler.sample(rng, 1)[0]
        assert episode.shape == (3, 4)
        classes = labels[episode]
        assert (classes == classes[:, :1]).all() and len(set(classes[:, 0].tolist())) == 3
        assert len(set(episode.flatten().tolist())) == 12 and 2 not in classes
    again = EpisodeSampler(labels, 3, 2, 2)
    first = EpisodeSampler(labels, 3, 2, 2)
    assert torch.equal(again.sample(np.random.default_rng(0), 5), first.sample(np.random.default_rng(0), 5))


def test_sampler_needs_enough_classes():
    with pytest.raises(UserInputError, match="60 ways need 60 classes.*has 2"):
        EpisodeSampler(torch.tensor([0] * 10 + [1] * 10), 60, 5, 5, split="training")


def test_augment_is_seeded_and_keeps_shape():
    x = torch.rand(6, 1, 28, 28)
    a = augment(x, "flip+shift", torch.Generator().manual_seed(1))
    b = augment(x, "flip+shift", torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert augment(x, "none", torch.Generator()) is x


def test_preload_matches_the_encoder_transform(make_image):
    """Training sees exactly the numbers `Encoder.embed` would (rotations included)."""
    from protonets.encoders import ImageItem

    encoder = create_encoder("conv4", pretrained=False)
    paths = [make_image(f"{i}.png", mode="1", size=(105, 105), seed=i) for i in range(2)]
    items = [ImageItem(str(paths[0])), ImageItem(str(paths[0]), 90), ImageItem(str(paths[1]), 270)]
    images = preload_images(items, encoder.preprocessing, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 28, 28)
    for i, item in enumerate(items):
        expected = encoder.transform(open_image(item))
        assert torch.equal(to_input(images[i : i + 1], encoder.preprocessing)[0], expected)


# -- learning ----------------------------------------------------------------------------------------
def test_short_training_lowers_loss_and_raises_val_accuracy(data):
    result = trainer(data, episodes=40, val_every=10, lr_step=2000).fit()
    history = result.history
    assert [h["step"] for h in history] == [0, 10, 20, 30, 40]
    assert history[-1]["train_loss"] < 0.5 * history[1]["train_loss"]
    assert history[-1]["val_acc"] > history[0]["val_acc"] + 0.05
    assert result.best_val_acc == max(h["val_acc"] for h in history)


def test_omniglot_tiny_split_learns(tmp_path):
    root = require_data("omniglot")
    lines = (root / "splits" / "vinyals" / "train.txt").read_text().split()
    (tmp_path / "train.txt").write_text("\n".join(lines[:400:20]))  # 20 classes
    (tmp_path / "val.txt").write_text("\n".join(lines[1000:1400:40]))  # 10 others
    from protonets.eval.datasets import omniglot

    torch.manual_seed(0)
    encoder = create_encoder("conv4", pretrained=False)
    sets = []
    for name in ("train", "val"):
        ds = omniglot(root, str(tmp_path / f"{name}.txt"))
        sets.append(ImageSet(preload_images(ds.items, encoder.preprocessing, progress=False), ds.labels))
    config = small_config(episodes=30, val_every=15, lr_step=2000, val_episodes=30)
    history = EpisodicTrainer(encoder, sets[0], sets[1], config, progress=False).fit().history
    assert history[-1]["train_loss"] < history[1]["train_loss"]
    assert history[-1]["val_acc"] > history[0]["val_acc"] + 0.05


def test_same_seed_same_run(data):
    a = trainer(data, episodes=6, augment="flip+shift").fit()
    b = trainer(data, episodes=6, augment="flip+shift").fit()
    assert [h["train_loss"] for h in a.history[1:]] == [h["train_loss"] for h in b.history[1:]]


# -- resume --------------------------------------------------------------------------------------------
def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_resume_equals_uninterrupted_run(data, tmp_path):
    """Stop after the step-8 save, resume in a fresh trainer: the same steps follow, bit for bit."""
    kwargs = dict(augment="flip+shift")  # the augmentation draws from the saved generator too
    straight = tmp_path / "straight"
    trainer(data, straight, **kwargs).fit()

    stopped = tmp_path / "stopped"
    trainer(data, stopped, episodes=8, **kwargs).fit()
    resumed = trainer(data, stopped, init_seed=99, **kwargs)  # other init: the state must overwrite it
    resumed.resume()
    assert resumed.step == 8
    resumed.fit()

    a = load_file(next((straight / STATE_DIR).glob("state-*.safetensors")))
    b = load_file(next((stopped / STATE_DIR).glob("state-*.safetensors")))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _strip(read_log(straight)) == _strip(read_log(stopped))
    manifest = lambda d: json.loads((d / "manifest.json").read_text())  # noqa: E731
    assert manifest(straight)["fingerprint"] == manifest(stopped)["fingerprint"]


def test_fit_again_goes_on_from_the_last_weights(data):
    """fit() leaves the best weights in the encoder; a second fit() with more episodes continues."""
    straight = trainer(data).fit()
    t = trainer(data, episodes=8)
    t.fit()
    t.config.episodes = 12
    again = t.fit()
    assert _strip(again.history) == _strip(straight.history)


def test_resume_without_the_saved_rng_state_differs(data, tmp_path):
    """Control for the test above: the sampler's saved RNG state is what makes resume exact."""
    trainer(data, tmp_path / "a", episodes=8).fit()
    other = trainer(data, tmp_path / "a")
    other.resume()
    other.rng.bit_generator.state = np.random.default_rng(12345).bit_generator.state
    other.fit()
    straight = trainer(data, tmp_path / "b").fit()
    assert _strip(read_log(tmp_path / "a"))[-1] != _strip(straight.history)[-1]


def test_an_older_resume_state_resumes_with_one_warning(caplog):
    """checkpoints/protonet-conv4-omniglot/resume predates the numpy episode sampler: it holds only
    the torch `rng.sampler` state. It resumes, re-seeding the episodes from (seed, step), and says so."""
    from protonets.training.checkpoint import load_state
    from tests.conftest import REPO

    manifest, tensors = load_state(REPO / "checkpoints" / "protonet-conv4-omniglot")
    assert "episode_rng" not in manifest and "rng.sampler" in tensors
    step = manifest["step"]
    config = TrainConfig.from_dict({**manifest["config"], "episodes": step + 2})
    runs = []
    for _ in range(2):
        manifest, tensors = load_state(
            REPO / "checkpoints" / "protonet-conv4-omniglot"
        )  # Adam updates in place
        t = EpisodicTrainer(
            create_encoder("conv4", pretrained=False), synthetic(60, 10, 0), None, config, progress=False
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="protonets.training.loop"):
            t.loop.load_state(manifest, tensors)  # the data check is for the Omniglot run's own data
        assert len(caplog.records) == 1 and "differ from those of an uninterrupted run" in caplog.text
        expected = np.random.default_rng([config.seed, step]).bit_generator.state
        assert t.step == step and t.rng.bit_generator.state == expected
        runs.append(t.fit().history)
    assert [r["step"] for r in runs[0]] == [step + 2] and np.isfinite(runs[0][0]["train_loss"])
    assert _strip(runs[0]) == _strip(runs[1])  # the re-seeding is deterministic


def test_resume_refuses_other_data(data, tmp_path):
    trainer(data, tmp_path, episodes=4).fit()
    other = trainer((synthetic(40, 10, 5), data[1]), tmp_path)
    with pytest.raises(UserInputError, match="other data"):
        other.resume()


# -- checkpoints ---------------------------------------------------------------------------------------
def test_checkpoint_round_trip_gives_identical_embeddings(data, tmp_path, make_image):
    t = trainer(data, tmp_path)
    result = t.fit()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["step"] == result.best_step and manifest["model"] == "conv4"
    assert manifest["training"]["ways"] == 5 and manifest["fingerprint"] == t.encoder.fingerprint
    assert os.path.getsize(next(tmp_path.glob("model-*.safetensors"))) < 1 << 20

    loaded = create_encoder(checkpoint_path=tmp_path)  # the default name gives way to the checkpoint's
    assert loaded.name == "conv4" and loaded.fingerprint == t.encoder.fingerprint
    batch = to_input(data[1].images[:16], loaded.preprocessing)
    assert torch.equal(loaded.forward(batch), t.encoder.forward(batch))
    paths = [make_image(f"q{i}.png", mode="L", size=(105, 105), seed=i) for i in range(3)]
    via_files = loaded.embed(paths, progress=False, num_workers=0).embeddings
    preloaded = preload_images(paths, loaded.preprocessing, progress=False)
    assert torch.equal(via_files, t.encoder.forward(to_input(preloaded, loaded.preprocessing)))


def test_checkpoint_dir_brings_its_own_preprocessing(data, tmp_path):
    pre = {
        "input_size": [1, 32, 32],
        "mean": [0.5],
        "std": [0.25],
        "interpolation": "bicubic",
        "crop_pct": 1.0,
    }
    torch.manual_seed(0)
    encoder = create_encoder("conv4", pretrained=False, preprocessing=pre)
    train = ImageSet(torch.nn.functional.pad(data[0].images, (2, 2, 2, 2), value=255), data[0].labels)
    EpisodicTrainer(encoder, train, None, small_config(episodes=2), tmp_path, progress=False).fit()
    loaded = create_encoder(checkpoint_path=tmp_path)
    assert loaded.preprocessing == pre
    assert create_encoder("conv4", checkpoint_path=tmp_path).preprocessing == pre
    with pytest.raises(UserInputError, match="'resnet18' does not match checkpoint .* holds a 'conv4'"):
        create_encoder("resnet18", checkpoint_path=tmp_path)


def test_bad_checkpoint_dirs_are_clear_errors(data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match="has no manifest.json.*protonets train"):
        create_encoder(checkpoint_path=empty)

    run = tmp_path / "run"
    trainer(data, run, episodes=2).fit()
    with pytest.raises(UserInputError, match="holds 'protonets.TrainState', not a protonets.Checkpoint"):
        create_encoder(checkpoint_path=run / STATE_DIR)
    weights = next(run.glob("model-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(UserInputError, match="truncated or altered"):
        create_encoder(checkpoint_path=run)
    manifest = run / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format_version": 1', '"format_version": 9'))
    with pytest.raises(UserInputError, match="newer than this protonets reads"):
        create_encoder(checkpoint_path=run)
    manifest.write_text("{not json")
    with pytest.raises(UserInputError, match="damaged"):
        create_encoder(checkpoint_path=run)


def test_wrong_image_size_and_bad_config_are_errors(data):
    encoder = create_encoder("conv4", pretrained=False)
    big = ImageSet(torch.zeros(20, 1, 32, 32, dtype=torch.uint8), torch.arange(20) // 5)
    with pytest.raises(UserInputError, match=r"training images are \(1, 32, 32\).*\(1, 28, 28\)"):
        EpisodicTrainer(encoder, big, None, small_config(), progress=False)
    with pytest.raises(UserInputError, match="lr must be positive"):
        TrainConfig(lr=0)
    with pytest.raises(UserInputError, match="augment must be one of"):
        TrainConfig(augment="mixup")


# -- the command -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    """8 classes of 6 small PNGs (5 for training, 3 for validation), class lists as split files."""
    return write_class_folder(tmp_path_factory.mktemp("folder"), synthetic(8, 6, 7).images, 8, 6, 5)


def tiny_run(root):
    """`protonets train` arguments of a tiny 3-way 1-shot run on `folder_dataset`, no validation."""
    return [
        "train", "--dataset", "folder", "--data", root, "--split", root / "train.txt",
        "--val-split", "none", "--ways", 3, "--shots", 1, "--queries", 2, "--quiet",
    ]  # fmt: skip


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_command_then_eval_and_classify(folder_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    root = folder_dataset
    base = [
        "train", "--dataset", "folder", "--data", root, "--split", root / "train.txt",
        "--val-split", root / "val.txt", "--ways", 3, "--shots", 1, "--queries", 2,
        "--val-ways", 3, "--val-shots", 1, "--val-queries", 2, "--val-episodes", 5,
        "--val-every", 3, "--output", out, "--quiet",
    ]  # fmt: skip
    code, stdout, err = _run(capsys, *base, "--episodes", 6)
    assert code == 0, err
    assert "trained conv4 for 6 episodes" in stdout
    assert [r["step"] for r in read_log(out)] == [0, 3, 6]
    assert (out / LOG_FILE).is_file() and (out / STATE_DIR).is_dir()

    code, _, err = _run(capsys, *base, "--episodes", 6)
    assert code == 2 and "already holds a training run" in err and "--resume" in err
    embedded = tmp_path / "embedded"  # another kind of protonets folder is named as what it is
    assert _run(capsys, "embed", root, "--output", embedded, "--checkpoint", out, "--quiet")[0] == 0
    for extra in ([], ["--overwrite"]):
        code, _, err = _run(capsys, *base[: base.index("--output")], "--output", embedded, *extra)
        assert code == 2 and "holds a protonets.EmbeddingSet, not a protonets.Checkpoint" in err
    code, _, err = _run(capsys, *base, "--episodes", 9, "--resume", "--lr", 0.5)
    assert code == 2 and "--lr 0.5 (the run has 0.001)" in err
    code, stdout, err = _run(capsys, *base, "--episodes", 9, "--resume")
    assert code == 0, err
    assert [r["step"] for r in read_log(out)] == [0, 3, 6, 9]

    code, stdout, err = _run(
        capsys, "eval", "--dataset", "folder", "--data", root, "--split", root / "val.txt",
        "--ways", 3, "--shots", 1, "--queries", 2, "--episodes", 10, "--checkpoint", out,
        "--no-cache", "--quiet", "--workers", 0,
    )  # fmt: skip
    assert code == 0, err
    assert "| prototype | 3 | 1 | 2 | 10 |" in stdout

    support = tmp_path / "support"
    for c in (5, 6):
        (support / f"c{c}").mkdir(parents=True)
        for i in range(2):
            (support / f"c{c}" / f"{i}.png").write_bytes((root / f"c{c}" / f"{i}.png").read_bytes())
    code, stdout, err = _run(
        capsys, "classify", support, root / "c6" / "5.png", "--checkpoint", out,
        "--metric", "euclidean", "--format", "json", "--quiet", "--workers", 0,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)[0]["label"] in ("c5", "c6")


def test_train_command_errors(folder_dataset, tmp_path, capsys):
    root = folder_dataset
    code, _, err = _run(
        capsys, "train", "--dataset", "folder", "--data", root, "--ways", 20,
        "--output", tmp_path / "o", "--quiet",
    )  # fmt: skip
    assert code == 2 and "20 ways need 20 classes" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(
        capsys, "train", "--dataset", "folder", "--data", root, "--output", tmp_path, "--resume"
    )
    assert code == 2 and "no resume/ folder" in err
    code, _, err = _run(
        capsys, "eval", "--dataset", "folder", "--data", root, "--ways", 3, "--shots", 1,
        "--queries", 2, "--checkpoint", tmp_path, "--quiet",
    )  # fmt: skip
    assert code == 2 and "has no manifest.json" in err


def test_numpy_labels_are_accepted():
    s = ImageSet(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), np.array([0, 0, 1, 1]))
    assert s.labels.dtype == torch.int64 and len(s) == 4


def test_init_checkpoint_starts_from_a_trained_body(folder_dataset, tmp_path, capsys):
    """`--init-checkpoint DIR` starts a new run (any method) from DIR's model and weights."""
    from safetensors.torch import load_file

    from protonets.encoders.checkpoint import read_checkpoint_dir

    root = folder_dataset
    base = tiny_run(root)
    code, _, err = _run(capsys, *base, "--episodes", 3, "--output", tmp_path / "body")
    assert code == 0, err
    code, _, err = _run(
        capsys, *base, "--episodes", 1, "--lr", 1e-12, "--init-checkpoint", tmp_path / "body",
        "--output", tmp_path / "tuned",
    )  # fmt: skip
    assert code == 0, err
    body, tuned = read_checkpoint_dir(tmp_path / "body"), read_checkpoint_dir(tmp_path / "tuned")
    assert tuned["init_checkpoint"]["fingerprint_id"] == body["fingerprint_id"]
    before, after = load_file(body["weights_file"]), load_file(tuned["weights_file"])
    assert before.keys() == after.keys()
    learned = [k for k in before if "running_" not in k and "num_batches" not in k]  # not BN statistics
    assert learned
    for key in learned:  # one Adam step of 1e-12 from the body's weights, not a fresh start
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)

    code, _, err = _run(
        capsys, *base, "--episodes", 1, "--init-checkpoint", tmp_path / "body", "--encoder", "resnet18",
        "--output", tmp_path / "other",
    )  # fmt: skip
    assert code == 2 and "--init-checkpoint" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("method", ["relation", "siamese"])
def test_frozen_head_on_a_trained_body(method, folder_dataset, tmp_path, capsys):
    """`--freeze-encoder --init-checkpoint DIR` trains a head on DIR's trained model (e.g. a
    Conv-4 ProtoNet), writes that same model with the head, and eval reads the pair."""
    from safetensors.torch import load_file

    from protonets.encoders.checkpoint import read_checkpoint_dir

    root = folder_dataset
    base = tiny_run(root)
    code, _, err = _run(capsys, *base, "--episodes", 2, "--output", tmp_path / "body")
    assert code == 0, err
    head = [*base, "--method", method, "--freeze-encoder", "--episodes", 5]
    head += ["--init-checkpoint", tmp_path / "body"]
    code, _, err = _run(capsys, *head, "--cache-dir", tmp_path / "cache", "--output", tmp_path / "head")
    assert code == 0, err
    body, out = read_checkpoint_dir(tmp_path / "body"), read_checkpoint_dir(tmp_path / "head")
    assert out["model"] == body["model"] == "conv4"
    assert out["dataset"]["encoder_checkpoint"] == str(tmp_path / "body")
    before, after = load_file(body["weights_file"]), load_file(out["weights_file"])
    assert before.keys() == after.keys()
    for key in before:  # the encoder stayed frozen
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0)

    code, _, err = _run(
        capsys, "eval", "--dataset", "folder", "--data", root, "--split", root / "train.txt",
        "--ways", 3, "--shots", 1, "--queries", 2, "--episodes", 5, "--quiet", "--no-cache",
        "--checkpoint", tmp_path / "head", "--method", method, "--head-checkpoint", tmp_path / "head",
    )  # fmt: skip
    assert code == 0, err

    code, _, err = _run(capsys, *head, "--encoder", "resnet18", "--output", tmp_path / "other")
    assert code == 2 and "leave out --encoder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("method", ["matching", "relation", "feat"])
def test_head_trains_jointly_with_conv4_and_resumes(method, folder_dataset, tmp_path, capsys):
    """Without --freeze-encoder a trainable head trains with its encoder: both change, the folder
    holds both (eval reads it), and a stopped run resumed equals one that never stopped."""
    from safetensors.torch import load_file

    from protonets.encoders.checkpoint import read_checkpoint_dir

    root = folder_dataset
    common = [
        "train", "--method", method, "--dataset", "folder", "--data", root, "--split", root / "train.txt",
        "--ways", 3, "--shots", 1, "--queries", 2, "--quiet",
    ]  # fmt: skip
    base = [
        *common, "--val-split", root / "val.txt", "--val-ways", 3, "--val-shots", 1, "--val-queries", 2,
        "--val-episodes", 4, "--val-every", 2,
    ]  # fmt: skip
    code, _, err = _run(capsys, *base, "--episodes", 4, "--output", tmp_path / "straight")
    assert code == 0, err
    code, _, err = _run(capsys, *base, "--episodes", 2, "--output", tmp_path / "stopped")
    assert code == 0, err
    code, _, err = _run(capsys, *base, "--episodes", 4, "--output", tmp_path / "stopped", "--resume")
    assert code == 0, err
    straight, resumed = (read_checkpoint_dir(tmp_path / d) for d in ("straight", "stopped"))
    assert straight["head"]["name"] == method and straight["method"] == method
    assert straight["model"] == "conv4" and straight["step"] == resumed["step"]
    for role in ("weights_file",):
        a, b = load_file(straight[role]), load_file(resumed[role])
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    a, b = (load_file(m["paths"]["head.safetensors"]) for m in (straight, resumed))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)

    code, _, err = _run(
        capsys, "eval", "--dataset", "folder", "--data", root, "--split", root / "val.txt",
        "--ways", 3, "--shots", 1, "--queries", 2, "--episodes", 5, "--quiet", "--no-cache",
        "--checkpoint", tmp_path / "straight", "--method", method, "--head-checkpoint", tmp_path / "straight",
    )  # fmt: skip
    assert code == 0, err

    code, _, err = _run(capsys, *base, "--episodes-per-step", 2, "--output", tmp_path / "x")
    assert code == 2 and "--episodes-per-step" in err and len(err.strip().splitlines()) == 1

    last = {}  # without validation the last state is saved: one more step moves model and head
    for episodes in (1, 2):
        folder = tmp_path / f"last{episodes}"
        argv = [*common, "--val-split", "none", "--episodes", episodes, "--output", folder]
        code, _, err = _run(capsys, *argv)
        assert code == 0, err
        m = read_checkpoint_dir(folder)
        last[episodes] = (load_file(m["weights_file"]), load_file(m["paths"]["head.safetensors"]))
    for one, two in zip(last[1], last[2]):
        assert any(not torch.equal(one[k], two[k]) for k in one)


def test_joint_head_runs_refuse_what_would_not_fit(folder_dataset, tmp_path, capsys):
    """A joint run resumed with another --method or --contrastive, --metric or --hidden 0 for a
    trained head, and --pretrained with a trained body: one line, exit 2, the run untouched."""
    root = folder_dataset
    base = tiny_run(root)
    run = tmp_path / "feat"
    argv = [*base, "--method", "feat", "--contrastive", 0.1, "--episodes", 2, "--output", run]
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for argv, words in (
        (["--episodes", 3, "--resume"], "--method feat"),  # --method left out: protonet
        (["--method", "relation", "--episodes", 3, "--resume"], "--method feat"),
        (["--method", "feat", "--episodes", 3, "--resume"], "--contrastive"),  # contrastive left out
    ):
        code, _, err = _run(capsys, *base, *argv, "--output", run)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    for argv, words in (
        (["--method", "relation", "--metric", "cosine"], "--metric"),
        (["--method", "relation", "--hidden", 0], "--hidden"),
        (["--method", "relation", "--freeze-encoder", "--init-checkpoint", run, "--pretrained"], "--pretr"),
        (["--method", "siamese", "--freeze-encoder", "--init-checkpoint", tmp_path / "no"], "--init-ch"),
    ):
        code, _, err = _run(capsys, *base, *argv, "--episodes", 1, "--output", tmp_path / "new")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "new").exists()


def test_anil_head_on_a_trained_body(folder_dataset, tmp_path, capsys):
    """`--method anil --freeze-encoder --init-checkpoint DIR`: the ANIL head on DIR's model."""
    from protonets.encoders.checkpoint import read_checkpoint_dir

    root = folder_dataset
    base = tiny_run(root)
    code, _, err = _run(capsys, *base, "--episodes", 2, "--output", tmp_path / "body")
    assert code == 0, err
    code, _, err = _run(
        capsys, *base, "--method", "anil", "--freeze-encoder", "--episodes", 3, "--init-checkpoint",
        tmp_path / "body", "--cache-dir", tmp_path / "cache", "--output", tmp_path / "anil",
    )  # fmt: skip
    assert code == 0, err
    assert read_checkpoint_dir(tmp_path / "anil")["model"] == "conv4"
