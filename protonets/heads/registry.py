"""The head registry: the one list of heads that `classify --head`, `eval --method`,
`FewShotClassifier(head=...)` and the shared tests read.

One line per head: its name, "module:Class" and optional preset keyword arguments (what the
name means: `cl2n` is the prototype head with the cl2n transform). Modules are imported on first
use, so listing the names imports nothing heavy. `@register_head(name)` adds a user's own class.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protonets.encoders.errors import UserInputError, did_you_mean

if TYPE_CHECKING:
    from .base import Head


@dataclass
class HeadSpec:
    """A registry line: the head class (or "module:Class", imported on first use) and its presets."""

    target: str | type[Head]
    presets: dict[str, Any] = field(default_factory=dict)

    def load(self) -> type[Head]:
        if isinstance(self.target, str):
            module, _, name = self.target.partition(":")
            self.target = getattr(importlib.import_module(module), name)
        return self.target


def _line(target: str, **presets: Any) -> HeadSpec:
    return HeadSpec(target, presets)


_REGISTRY: dict[str, HeadSpec] = {
    "prototype": _line("protonets.heads.prototype:PrototypeHead"),
    "prototype-cosine": _line("protonets.heads.prototype:PrototypeHead", metric="cosine"),
    "cl2n": _line("protonets.heads.prototype:PrototypeHead", metric="euclidean", feature_transform="cl2n"),
    "knn": _line("protonets.heads.knn:KNNHead"),
    "logreg": _line("protonets.heads.logreg:LogRegHead"),
    "finetune": _line("protonets.heads.finetune:FinetuneHead"),
    "maml": _line("protonets.maml.head:MAMLHead"),
    "siamese": _line("protonets.siamese.head:SiameseHead"),
    "temperature-prototype": _line("protonets.heads.temperature:TemperaturePrototypeHead"),
    "matching": _line("protonets.heads.matching:MatchingHead"),
    "relation": _line("protonets.heads.relation:RelationHead"),
    "feat": _line("protonets.heads.feat:FEATHead"),
    "bd-cspn": _line("protonets.heads.bd_cspn:BDCSPNHead"),
    "laplacianshot": _line("protonets.heads.laplacianshot:LaplacianShotHead"),
    "soft-kmeans": _line("protonets.heads.soft_kmeans:SoftKMeansHead"),
    "tim": _line("protonets.heads.tim:TIMHead"),
    "alpha-tim": _line("protonets.heads.alpha_tim:AlphaTIMHead"),
    "pt-map": _line("protonets.heads.pt_map:PTMAPHead"),
    "transductive-finetune": _line("protonets.heads.transductive_finetune:TransductiveFinetuneHead"),
}


class _Heads(Mapping[str, "type[Head]"]):
    """Read-only view name -> head class; the class is imported when looked up, not when listed."""

    def __getitem__(self, name: str) -> type[Head]:
        return _REGISTRY[name].load()

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __repr__(self) -> str:
        return f"HEADS({', '.join(_REGISTRY)})"


HEADS: Mapping[str, type[Head]] = _Heads()


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    """Class decorator that makes a head buildable by `create_head(name)` (and `eval --method`)."""

    def decorate(cls: type[Head]) -> type[Head]:
        _REGISTRY[name] = HeadSpec(cls)
        cls.registry_name = name
        return cls

    return decorate


def head_spec(name: str) -> HeadSpec:
    """The registry line of `name`; an unknown name is a UserInputError listing the choices."""
    if name not in _REGISTRY:
        choices = ", ".join(sorted(_REGISTRY))
        raise UserInputError(f"unknown head '{name}'; choose one of {choices}{did_you_mean(name, _REGISTRY)}")
    return _REGISTRY[name]


def create_head(name: str, **kwargs: Any) -> Head:
    """Build a registered head by name, e.g. `create_head("prototype", metric="cosine")`.

    Keyword arguments override the name's presets (like `functools.partial`).
    """
    spec = head_spec(name)
    return spec.load()(**{**spec.presets, **kwargs})


def build_head(name: str, checkpoint: str | None = None, **options: Any) -> Head:
    """Build a head from generic options (each head keeps the ones its constructor takes).

    The name's presets win over generic options (`cl2n` stays cl2n whatever `feature_transform`
    a caller passes for every head). A head that `needs_checkpoint` loads from `checkpoint`.
    """
    spec = head_spec(name)
    cls = spec.load()
    options = {**options, **spec.presets}
    if cls.needs_checkpoint:
        if checkpoint is None:
            raise UserInputError(f"head '{name}' needs a checkpoint folder: {cls.checkpoint_hint}")
        return cls.from_checkpoint(checkpoint, **options)
    return cls.from_options(**options)
