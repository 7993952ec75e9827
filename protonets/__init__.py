"""protonets: metric-based few-shot image classification.

from protonets import FewShotClassifier
clf = FewShotClassifier().fit(support_paths, support_labels)
clf.predict(query_paths)
"""

from protonets.encoders import ImageLoadError, UserInputError, create_encoder

from .classifier import FewShotClassifier
from .heads import HEADS, Head, PrototypeHead, create_head, register_head
from .memory import SupportMemory

__version__ = "0.1.0"

__all__ = [
    "HEADS",
    "FewShotClassifier",
    "Head",
    "ImageLoadError",
    "PrototypeHead",
    "SupportMemory",
    "UserInputError",
    "create_encoder",
    "create_head",
    "register_head",
]
