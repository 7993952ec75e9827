"""The Siamese head (Koch et al. 2015): learned pair similarity, verification, one-shot classification."""

from .checkpoint import load_siamese, load_siamese_head, save_siamese_checkpoint
from .head import SiameseHead, calibrate_threshold, pair_features
from .pairs import affine_augment, pair_loss, sample_pairs
from .training import SiameseConfig, SiameseTrainer, random_pairs, train_head

__all__ = [
    "SiameseConfig",
    "SiameseHead",
    "SiameseTrainer",
    "affine_augment",
    "calibrate_threshold",
    "load_siamese",
    "load_siamese_head",
    "pair_features",
    "pair_loss",
    "random_pairs",
    "sample_pairs",
    "save_siamese_checkpoint",
    "train_head",
]
