"""The Siamese head (Koch et al. 2015): learned pair similarity, verification, one-shot classification.

The trainers (`SiameseTrainer`, `train_head`, `random_pairs`) live in `protonets.siamese.training`,
imported only when training, so that `import protonets` stays light.
"""

from .checkpoint import load_siamese, load_siamese_head, save_siamese_checkpoint
from .head import SiameseHead, calibrate_threshold, pair_features
from .pairs import affine_augment, pair_loss, sample_pairs

__all__ = [
    "SiameseHead",
    "affine_augment",
    "calibrate_threshold",
    "load_siamese",
    "load_siamese_head",
    "pair_features",
    "pair_loss",
    "sample_pairs",
    "save_siamese_checkpoint",
]
