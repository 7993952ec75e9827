"""The episodic protocol on cached embeddings: all episodes at once, in batched tensor code.

A method is a registered head (`protonets.heads.HEADS`): `evaluate` builds it from the registry
and scores its `episode_logits` over chunks of episodes, sized by what the head declares
(`episode_bytes`, `memory_budget`; `needs_grad` for test-time fine-tuning). Batched heads run as
gathers and matrix products (no Python loop per episode); a head without batched
`episode_logits` (the logistic-regression probe) runs one episode at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from protonets.encoders.errors import UserInputError
from protonets.encoders.progress import progress_bar
from protonets.episodes import Episodes
from protonets.heads import HEADS, Head, build_head
from protonets.stats import mean_ci95  # noqa: F401  (part of eval's API)

METHODS = HEADS  # the evaluation methods are the registered heads


def _chunk_size(episodes: Episodes, episode_bytes: int, budget_bytes: int) -> int:
    return max(1, min(len(episodes), budget_bytes // max(episode_bytes, 1)))


def batched_accuracy(
    embeddings: torch.Tensor,
    episodes: Episodes,
    logits_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    progress: bool = False,
    *,
    episode_bytes: int | None = None,
    budget_bytes: int = 256 << 20,
    autograd: bool = False,
    desc: str = "episodes",
) -> np.ndarray:
    """Per-episode accuracies `[E]` of `logits_fn(support, support_labels, queries)` (batched):
    each episode's correct queries over its N*Q queries, balanced or imbalanced alike.

    Episodes go through in chunks of about `budget_bytes` of working memory, `episode_bytes`
    each (default: a metric head's distances). `autograd=True` runs under `no_grad` rather than
    `inference_mode`, so that a head may enable gradients inside (test-time fine-tuning).
    """
    n, k, q = episodes.ways, episodes.shots, episodes.queries
    if episode_bytes is None:
        episode_bytes = n * (k + q) * (embeddings.shape[1] * 4 + n * 8)
    out = np.empty(len(episodes))
    step = _chunk_size(episodes, episode_bytes, budget_bytes)
    with torch.no_grad() if autograd else torch.inference_mode():
        for start in progress_bar(range(0, len(episodes), step), progress, desc=desc):
            stop = min(start + step, len(episodes))
            support, s_labels, query, q_labels = episodes.gather(embeddings, start, stop)
            predicted = logits_fn(support, s_labels, query).argmax(-1)
            out[start:stop] = (predicted == q_labels).double().mean(1).numpy()
    return out


def checkpoint_folder(method: str, directory: str | os.PathLike[str] | None) -> str | None:
    """The trained-head folder `method` will load: `directory`, else the head's environment
    variable; None for a head that needs none. A head that needs one and has none is a
    UserInputError (callers check this before long work)."""
    cls = HEADS[method]
    if not cls.needs_checkpoint:
        return None
    directory = directory or (os.environ.get(cls.checkpoint_env) if cls.checkpoint_env else None)
    if not directory:
        env = f" or set {cls.checkpoint_env}=DIR" if cls.checkpoint_env else ""
        raise UserInputError(
            f"--method {method} needs a trained head: pass --head-checkpoint DIR{env}, "
            f"DIR being {cls.checkpoint_hint}"
        )
    return os.fspath(directory)


def _build(method: str, options: dict[str, Any]) -> Head:
    """The head of `method`: a given `head` instance, or one built from the registry."""
    given = options.pop("head", None)
    if isinstance(given, Head):
        return given
    if given is not None:
        options["head_checkpoint"] = given
    directory = checkpoint_folder(method, options.get("head_checkpoint"))
    if directory is None:  # a head that may take a folder finds it in its options (`matching`)
        return build_head(method, **options)
    options.pop("head_checkpoint", None)
    return build_head(method, directory, **options)


def evaluate(
    embeddings: torch.Tensor, episodes: Episodes, method: str, progress: bool = False, **options: Any
) -> np.ndarray:
    """Per-episode accuracies `[E]` of the registered head `method` on `episodes`.

    options: generic head options, each head keeps those its constructor takes (`k`, `steps`,
    `metric`, ...); `head`: a built Head to use as is, or the folder of a head that needs a
    checkpoint (else `head_checkpoint`, else the head's environment variable); `meta`: an object
    whose `evaluate(episodes, embeddings, progress)` runs in the head's place (a meta-trained
    learner, see `protonets.eval.meta`).
    """
    if method not in HEADS:
        raise UserInputError(f"unknown method '{method}'; choose from {', '.join(sorted(HEADS))}")
    if episodes.queries < 1:
        raise UserInputError("evaluation needs at least one query per class")
    embeddings = embeddings.float()
    meta = options.pop("meta", None)
    if meta is not None:
        if not episodes.balanced:
            raise UserInputError(
                f"--method {method} with a meta-trained checkpoint runs on balanced episodes only; "
                "drop --query-balance dirichlet, or evaluate it without the meta-trained checkpoint"
            )
        return meta.evaluate(episodes, embeddings, progress)
    head = _build(method, options)
    n, k, q = episodes.ways, episodes.shots, episodes.queries
    batched = type(head).episode_logits is not Head.episode_logits
    return batched_accuracy(
        embeddings,
        episodes,
        lambda s, y, qx: head.episode_logits(s, y.contiguous(), qx, n),
        progress,
        episode_bytes=head.episode_bytes(n, k, q, embeddings.shape[1]),
        budget_bytes=head.memory_budget if batched else 0,  # a per-episode head: one at a time
        autograd=head.needs_grad,
        desc=f"{method} episodes",
    )
