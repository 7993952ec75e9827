"""Conv-4: the timm registration, shapes, the encoder entry point, the block order."""

import pytest
import timm
import torch
from PIL import Image
from torch import nn

from protonets.encoders import UserInputError, create_encoder
from protonets.encoders.conv4 import Conv4


def test_registered_with_timm():
    assert timm.is_model("conv4")
    model = timm.create_model("conv4")
    assert isinstance(model, Conv4)
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 64)


def test_architecture_is_four_conv_bn_relu_pool_blocks():
    model = timm.create_model("conv4")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 64, (3, 3), (1, 1))
    ] + [(64, 64, (3, 3), (1, 1))] * 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    assert sum(p.numel() for p in model.parameters()) == 111_936


def test_pool_then_relu_equals_the_papers_relu_then_pool():
    """Our blocks run BN → pool → ReLU; the papers' BN → ReLU → pool gives the same values and grads."""
    torch.manual_seed(0)
    model = timm.create_model("conv4").train()
    reference = nn.Sequential(
        *[nn.Sequential(block[0], block[1], nn.ReLU(), nn.MaxPool2d(2)) for block in model.features]
    )
    x = torch.randn(8, 1, 28, 28)
    ours = model(x)
    grads = torch.autograd.grad(ours.square().sum(), list(model.parameters()))
    theirs = reference(x).flatten(1)
    ref_grads = torch.autograd.grad(theirs.square().sum(), list(model.parameters()))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_other_input_sizes_and_pools():
    rgb = timm.create_model("conv4", in_chans=3)
    assert rgb(torch.zeros(2, 3, 84, 84)).shape == (2, 1600)  # the miniImageNet embedding
    avg = timm.create_model("conv4", in_chans=3, global_pool="avg")
    assert avg(torch.zeros(2, 3, 84, 84)).shape == (2, 64)
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("conv4", global_pool="max")


def test_classifier_head():
    model = timm.create_model("conv4", num_classes=10)
    x = torch.zeros(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64) and isinstance(model.get_classifier(), nn.Identity)


def test_create_encoder_builds_conv4(make_image):
    encoder = create_encoder("conv4", pretrained=False)
    assert encoder.preprocessing["input_size"] == [1, 28, 28]
    assert encoder.dim == 64
    path = make_image("a.png", mode="1", size=(105, 105))
    result = encoder.embed([path], progress=False, num_workers=0)
    assert result.embeddings.shape == (1, 64)
    assert encoder.transform(Image.open(path).convert("RGB")).shape == (1, 28, 28)


def test_pretrained_conv4_without_checkpoint_is_a_clear_error():
    with pytest.raises(UserInputError, match="no published pretrained weights.*checkpoint"):
        create_encoder("conv4")
