"""The 'siamese' head: a learned pairwise similarity (Koch et al. 2015) over any encoder's embeddings.

A pair (a, b) becomes the symmetric features `|a − b|` (and, with `product=True`, `a ⊙ b`), a
small MLP turns them into one logit "same class". A query's score for a class is the max (or
mean) logit over that class's support embeddings, so the head follows the prototype head's
contract (`fit(support, labels)`, `forward(query) -> [Q, C]`). `similarity(a, b)` and
`verify(a, b)` answer verification questions; `calibrate(...)` sets the decision threshold for
a target false-accept rate from held-out pairs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protonets.encoders.errors import UserInputError

from ..heads.base import Head, check_support

REDUCTIONS = ("max", "mean")


def pair_features(a: torch.Tensor, b: torch.Tensor, product: bool = True) -> torch.Tensor:
    """Symmetric pair features `[..., D or 2D]`: `|a − b|` and optionally `a ⊙ b` (broadcasting)."""
    diff = (a - b).abs()
    if not product:
        return diff
    a, b = torch.broadcast_tensors(a, b)
    return torch.cat([diff, a * b], dim=-1)


class SiameseHead(Head):
    """Learned pair similarity; one-shot classification by the best-matching support.

    dim: embedding width; None builds the MLP on the first call (seeded, so two fresh heads agree).
    hidden: MLP width; 0 is Koch's weighted L1 (a single linear layer on the pair features).
    product: also feed `a ⊙ b` to the MLP.
    reduce: class score = 'max' or 'mean' of the pair logits over that class's supports.
    normalize: L2-normalise embeddings first (useful for pretrained encoders' features).
    """

    needs_checkpoint = True  # a trained pair scorer
    checkpoint_hint = "a Siamese checkpoint folder (`protonets train --method siamese --output DIR`)"
    checkpoint_env = "PROTONETS_SIAMESE_HEAD"
    memory_budget = 64 << 20

    def __init__(
        self,
        dim: int | None = None,
        hidden: int = 128,
        product: bool = True,
        reduce: str = "max",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got '{reduce}'")
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0: a linear layer), got {hidden}")
        self.hidden = int(hidden)
        self.product = bool(product)
        self.reduce = reduce
        self.normalize = bool(normalize)
        self.dim: int | None = None
        self.mlp: nn.Module | None = None
        if dim is not None:
            self.build(int(dim))
        self.register_buffer("support", torch.empty(0, 0))
        self.register_buffer("labels", torch.empty(0, dtype=torch.int64))
        self.register_buffer("threshold", torch.tensor(0.0))  # logit; 0 = probability 0.5

    @classmethod
    def from_checkpoint(
        cls, directory: str | os.PathLike[str], reduce: str | None = None, **_: Any
    ) -> SiameseHead:
        """The trained head of a Siamese checkpoint folder (`reduce` overrides its reduction)."""
        from .checkpoint import load_siamese_head

        head = load_siamese_head(directory)[0]
        if reduce is not None:
            head.reduce = reduce
        return head

    def episode_bytes(self, ways: int, shots: int, queries: int, dim: int) -> int:
        """The pair features of every (query, support)."""
        width = (self.dim or dim) * (2 if self.product else 1)
        return ways * ways * shots * queries * width * 4

    # -- the pair scorer ---------------------------------------------------------------------
    def build(self, dim: int) -> None:
        """Create the MLP for `dim`-wide embeddings (seeded: fresh heads start identical)."""
        width = dim * (2 if self.product else 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if self.hidden:
                self.mlp = nn.Sequential(nn.Linear(width, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
            else:
                self.mlp = nn.Linear(width, 1)
        self.dim = dim

    def _ready(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp is None:
            self.build(x.shape[-1])
        if x.shape[-1] != self.dim:
            raise UserInputError(
                f"the Siamese head takes {self.dim}-d embeddings but got {x.shape[-1]}-d; "
                "use the head trained on this encoder's embeddings"
            )
        param = next(self.mlp.parameters())
        x = x.to(param.dtype)
        return F.normalize(x, dim=-1) if self.normalize else x

    def pair_logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Logits "same class" of pairs `a[..., D]`, `b[..., D]` (broadcast); symmetric in a, b."""
        a, b = self._ready(a), self._ready(b)
        return self.mlp(pair_features(a, b, self.product)).squeeze(-1)

    # -- verification ------------------------------------------------------------------------
    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Probability that `a[i]` and `b[i]` show the same class: `[N]` in (0, 1)."""
        return torch.sigmoid(self.pair_logits(torch.as_tensor(a), torch.as_tensor(b)))

    def verify(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Same-class decisions `[N]` (bool) at the calibrated threshold (see `calibrate`)."""
        return self.pair_logits(torch.as_tensor(a), torch.as_tensor(b)) >= self.threshold

    @torch.no_grad()
    def calibrate(
        self, a: torch.Tensor, b: torch.Tensor, same: torch.Tensor, far: float = 0.01
    ) -> dict[str, float]:
        """Set the threshold for false-accept rate ≤ `far` on held-out pairs; returns the ROC figures."""
        scores = self.pair_logits(torch.as_tensor(a), torch.as_tensor(b)).double().cpu().numpy()
        result = calibrate_threshold(scores, np.asarray(same, dtype=bool), far)
        self.threshold.fill_(result["threshold"])
        return result

    # -- the head contract ---------------------------------------------------------------------
    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> SiameseHead:
        check_support(support, labels)
        self._ready(support)
        self.support = support.detach().clone()
        self.labels = labels.detach().to(torch.int64).clone()
        return self

    def _reduce(self, logits: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
        """Pair logits `[E, Q, S]`, support labels `[E, S]` -> class scores `[E, Q, N]`."""
        onehot = F.one_hot(labels, n_way).to(torch.bool).unsqueeze(1)  # [E, 1, S, N]
        pairs = logits.unsqueeze(-1)  # [E, Q, S, 1]
        if self.reduce == "max":
            return pairs.masked_fill(~onehot, float("-inf")).amax(2)
        weights = onehot.to(logits.dtype)
        return (pairs * weights).sum(2) / weights.sum(2).clamp_min(1)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        if self.support.numel() == 0:
            raise RuntimeError("this SiameseHead is not fitted; call fit(support, labels) first")
        n_way = int(self.labels.max()) + 1
        return self.episode_logits(self.support[None], self.labels[None], query[None], n_way)[0]

    def episode_logits(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        logits = self.pair_logits(query.unsqueeze(2), support.unsqueeze(1))  # [E, Q, S]
        return self._reduce(logits, labels.to(torch.int64), n_way)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "hidden": self.hidden,
            "product": self.product,
            "reduce": self.reduce,
            "normalize": self.normalize,
        }


def calibrate_threshold(scores: np.ndarray, same: np.ndarray, far: float) -> dict[str, float]:
    """The lowest threshold whose false-accept rate on (scores, same) is ≤ `far` (sklearn ROC).

    Returns threshold, the achieved false-accept and true-accept rates, and the ROC AUC.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far (target false-accept rate) must lie in [0, 1], got {far}")
    same = np.asarray(same, dtype=bool)
    if same.all() or not same.any():
        raise ValueError("calibration needs both same-class and different-class pairs")
    fpr, tpr, thresholds = roc_curve(same, scores)
    ok = np.flatnonzero(fpr <= far)
    best = ok[-1]  # fpr rises along the curve: the last admissible point accepts the most
    threshold = float(thresholds[best])
    if not np.isfinite(threshold):  # sklearn's first point (accept nothing) is +inf
        threshold = float(np.max(scores)) + 1.0
    accepted = scores >= threshold
    return {
        "threshold": threshold,
        "far": float(accepted[~same].mean()),
        "tar": float(accepted[same].mean()),
        "target_far": float(far),
        "auc": float(roc_auc_score(same, scores)),
    }
