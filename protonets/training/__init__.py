"""Episodic training: preloaded images, the one training loop, the ProtoNet trainer, resume states.

The public names are imported on first use (PEP 562), so `protonets.training.options` (what
`protonets train --help` lists) costs no torch import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protonets.encoders.lazy import lazy_exports

from .options import AUGMENTATIONS

#: public name -> the submodule that defines it (imported when the name is first read)
_LAZY = {
    "LOG_FILE": ".checkpoint",
    "load_state": ".checkpoint",
    "read_log": ".checkpoint",
    "ImageSet": ".data",
    "augment": ".data",
    "preload_images": ".data",
    "to_input": ".data",
    "Method": ".loop",
    "TrainLoop": ".loop",
    "TrainResult": ".loop",
    "EpisodicTrainer": ".trainer",
    "ImageEpisodes": ".trainer",
    "ProtoNetMethod": ".trainer",
    "TrainConfig": ".trainer",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .checkpoint import LOG_FILE, load_state, read_log
    from .data import ImageSet, augment, preload_images, to_input
    from .loop import Method, TrainLoop, TrainResult
    from .trainer import EpisodicTrainer, ImageEpisodes, ProtoNetMethod, TrainConfig

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "AUGMENTATIONS",
    "EpisodicTrainer",
    "ImageEpisodes",
    "ImageSet",
    "LOG_FILE",
    "Method",
    "ProtoNetMethod",
    "TrainConfig",
    "TrainLoop",
    "TrainResult",
    "augment",
    "load_state",
    "preload_images",
    "read_log",
    "to_input",
]
