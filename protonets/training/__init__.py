"""Episodic training: preloaded images, the one training loop, the ProtoNet trainer, resume states."""

from .checkpoint import LOG_FILE, load_state, read_log
from .data import AUGMENTATIONS, ImageSet, augment, preload_images, to_input
from .loop import Method, TrainLoop, TrainResult
from .trainer import EpisodicTrainer, ImageEpisodes, ProtoNetMethod, TrainConfig

__all__ = [
    "AUGMENTATIONS",
    "LOG_FILE",
    "EpisodicTrainer",
    "ImageEpisodes",
    "ImageSet",
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
