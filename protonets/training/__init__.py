"""Episodic training: preloaded images, a seeded episode sampler, the ProtoNet trainer, checkpoints."""

from .checkpoint import LOG_FILE, load_state, read_log, save_checkpoint
from .data import AUGMENTATIONS, ImageSet, augment, preload_images, to_input
from .episodes import EpisodeSampler
from .trainer import EpisodicTrainer, TrainConfig, TrainResult

__all__ = [
    "AUGMENTATIONS",
    "LOG_FILE",
    "EpisodeSampler",
    "EpisodicTrainer",
    "ImageSet",
    "TrainConfig",
    "TrainResult",
    "augment",
    "load_state",
    "preload_images",
    "read_log",
    "save_checkpoint",
    "to_input",
]
