"""The head contract and registry: a new head is one file plus one `@register_head` line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from protonets.encoders.errors import UserInputError

HEADS: dict[str, type[Head]] = {}


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    """Class decorator that makes a head buildable by `create_head(name)`."""

    def decorate(cls: type[Head]) -> type[Head]:
        HEADS[name] = cls
        cls.registry_name = name
        return cls

    return decorate


def create_head(name: str, **kwargs: Any) -> Head:
    """Build a registered head by name, e.g. `create_head("prototype", metric="cosine")`."""
    if name not in HEADS:
        raise UserInputError(f"unknown head '{name}'; choose one of {', '.join(sorted(HEADS))}")
    return HEADS[name](**kwargs)


def check_support(support: torch.Tensor, labels: torch.Tensor) -> None:
    """Shapes at the door: support [S, D] float, labels [S] integer class indices 0..C-1."""
    if support.dim() != 2:
        raise ValueError(f"support embeddings must be [S, D], got shape {tuple(support.shape)}")
    if labels.dim() != 1 or labels.shape[0] != support.shape[0]:
        raise ValueError(f"labels must be [S] = [{support.shape[0]}], got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if support.shape[0] and labels.min() < 0:
        raise ValueError("labels must be class indices 0..C-1, got a negative label")


class Head(nn.Module):
    """A few-shot head: `fit(support, labels)` then `forward(query)` gives logits `[Q, C]`.

    Fitted state (prototypes, support sets) lives in registered buffers, so it is in
    `state_dict()` and saved with the model; loading resizes those buffers as needed.
    """

    registry_name = "head"

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> Head:
        """Take the support set: embeddings `[S, D]`, labels `[S]` in 0..C-1. Returns self."""
        raise NotImplementedError

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """Logits `[Q, C]` of query embeddings `[Q, D]`."""
        raise NotImplementedError

    def episode_logits(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        """Logits `[E, Q, N]` for a batch of episodes (`[E, S, D]`, `[E, S]`, `[E, Q, D]`).

        The default runs episode by episode; heads that can override it with batched tensor code.
        """
        out = []
        for s, y, q in zip(support, labels, query):
            out.append(self.fit(s, y).forward(q))
        return torch.stack(out)

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this head (saved in manifests)."""
        return {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
