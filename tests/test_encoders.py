import pytest
import torch

from protonets.encoders import UserInputError, create_encoder
from protonets.encoders.offline import bundled_weights_file, map_bundled_state_dict
from tests.conftest import require_data


def test_every_bundled_tensor_is_mapped_in_order_with_its_values(default_encoder):
    source = torch.load(bundled_weights_file("tf_efficientnet_lite0"), weights_only=True)
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    own = [
        (k, v) for k, v in default_encoder.model.state_dict().items() if not k.endswith("num_batches_tracked")
    ]
    assert len(src) == len(own) == 247
    for (_, s), (name, o) in zip(src, own):
        assert s.shape == o.shape, name
        assert torch.equal(s.float(), o.float()), f"{name} was not loaded from the bundled weights"


def test_mapping_refuses_mismatched_shapes():
    with pytest.raises(UserInputError, match="does not fit"):
        map_bundled_state_dict({"a": torch.zeros(2, 3)}, {"b": torch.zeros(3, 2)})


@pytest.mark.parametrize(
    "folder,fragment",
    [
        ("strawberry", "strawberry"),
        ("accordion", "accordion"),
        ("dalmatian", "dalmatian"),
        ("soccer_ball", "soccer ball"),
    ],
)
def test_default_encoder_is_imagenet_pretrained(default_encoder, folder, fragment):
    """The full network (with classifier) names real photos' ImageNet classes confidently."""
    from timm.data import ImageNetInfo

    from protonets.encoders import open_image

    root = require_data("caltech101", "101_ObjectCategories", folder)
    x = torch.stack([default_encoder.transform(open_image(root / f"image_000{i}.jpg")) for i in range(1, 6)])
    with torch.inference_mode():
        proba = default_encoder.model(x.contiguous(memory_format=torch.channels_last)).softmax(1)
    info = ImageNetInfo()
    best, index = proba.max(1)
    right = [fragment in info.index_to_description(int(i)) for i in index]
    assert sum(right) >= 4, [info.index_to_description(int(i)) for i in index]
    assert best[torch.tensor(right)].mean() > 0.7


def test_embeddings_shape_dtype_and_fingerprint(default_encoder):
    images = sorted((__import__("pathlib").Path(__file__).parents[1] / "examples" / "queries").glob("*.jpg"))[
        :3
    ]
    result = default_encoder.embed(images, batch_size=2, num_workers=0, progress=False)
    assert result.embeddings.shape == (3, 1280) and result.embeddings.dtype == torch.float32
    assert result.kept == [0, 1, 2]
    fp = default_encoder.fingerprint
    assert fp["model"] == "tf_efficientnet_lite0"
    assert fp["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and fp["preprocessing"]["input_size"] == [
        3,
        224,
        224,
    ]
    assert len(fp["weights_sha256"]) == 64


def test_workers_give_the_same_embeddings(default_encoder):
    images = sorted(
        (__import__("pathlib").Path(__file__).parents[1] / "examples" / "support").rglob("*.jpg")
    )[:6]
    a = default_encoder.embed(images, batch_size=2, num_workers=0, progress=False).embeddings
    b = default_encoder.embed(images, batch_size=2, num_workers=2, progress=False).embeddings
    torch.testing.assert_close(a, b)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(UserInputError, match="did you mean.*tf_efficientnet_lite0"):
        create_encoder("tf_efficientnet_lite")


def test_hub_without_network_says_what_to_do(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserInputError, match="--checkpoint.*offline default"):
        create_encoder("resnet18", pretrained=True)


def test_local_checkpoint_round_trip_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    enc = create_encoder("resnet18", pretrained=False)
    state = {k: v.contiguous() for k, v in enc.model.state_dict().items()}
    save_file(state, tmp_path / "r18.safetensors")
    torch.save(state, tmp_path / "r18.pth")
    for name in ("r18.safetensors", "r18.pth"):
        again = create_encoder("resnet18", checkpoint_path=tmp_path / name)
        assert again.fingerprint == enc.fingerprint
    with pytest.raises(UserInputError, match="does not fit"):
        create_encoder("resnet34", checkpoint_path=tmp_path / "r18.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserInputError, match="junk.pth"):
        create_encoder("resnet18", checkpoint_path=tmp_path / "junk.pth")
