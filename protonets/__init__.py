"""protonets: metric-based few-shot image classification.

from protonets import FewShotClassifier
clf = FewShotClassifier().fit(support_paths, support_labels)
clf.predict(query_paths)

The public names are imported on first use (PEP 562): `import protonets` and the command line's
`--help` cost no torch, timm, faiss or scikit-learn import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protonets.encoders.errors import ImageLoadError, UserInputError
from protonets.encoders.lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the module that defines it (imported when the name is first read)
_LAZY = {
    "create_encoder": "protonets.encoders.factory",
    "FewShotClassifier": "protonets.classifier",
    "HEADS": "protonets.heads.registry",
    "create_head": "protonets.heads.registry",
    "register_head": "protonets.heads.registry",
    "Head": "protonets.heads.base",
    "PrototypeHead": "protonets.heads.prototype",
    "SupportMemory": "protonets.memory.store",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .classifier import FewShotClassifier
    from .encoders.factory import create_encoder
    from .heads import HEADS, Head, PrototypeHead, create_head, register_head
    from .memory import SupportMemory


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


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
