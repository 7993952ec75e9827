"""`FewShotClassifier`: the scikit-learn-style front door (images or embeddings in, labels out)."""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import DataConversionWarning
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions, validate_parameter_constraints
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted

from protonets.encoders import (
    DEFAULT_ENCODER,
    EmbeddingResult,
    Encoder,
    FingerprintMismatchError,
    ImageItem,
    UserInputError,
    create_encoder,
)
from protonets.encoders.atomic import load_bundle, save_bundle

from .heads import HEADS, Head, build_head, create_head, head_spec

FORMAT_VERSION = 1
KIND = "protonets.FewShotClassifier"
#: The label of queries below `threshold` (the `unknown_label` default).
UNKNOWN_LABEL = "unknown"


def _is_embedding_array(X: Any) -> bool:
    """True unless X is a sequence of images (paths, ImageItems or PIL images)."""
    if isinstance(X, (str, os.PathLike)):
        raise UserInputError(f"expected a list of images, got the single path {X!r}; wrap it in a list")
    if isinstance(X, (list, tuple)) or (isinstance(X, np.ndarray) and X.dtype.kind in "OUS"):
        first = X[0] if len(X) else None
        return not isinstance(first, (str, os.PathLike, ImageItem, Image.Image))
    return True


def _as_embeddings(X: Any) -> torch.Tensor:
    """Checked float64 embeddings [N, D] (float64 keeps predictions independent of batch size)."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    return torch.from_numpy(np.array(check_array(X, dtype=np.float64, input_name="X")))


class FewShotClassifier(ClassifierMixin, BaseEstimator):
    """Classify images of new categories from a few labelled examples each.

    `fit(X, y)` takes image paths (or PIL images) and their labels, or precomputed embeddings
    `[N, D]`; `predict` / `predict_proba` take the same kinds of input. Images are embedded with a
    frozen timm encoder (default: the bundled offline EfficientNet-Lite0).

    Parameters
    ----------
    encoder: timm model name, or an `protonets.encoders.Encoder` to share one already built.
    checkpoint: local weights file for `encoder` (safetensors or a torch state dict).
    head: a registered head name (`protonets.HEADS`: 'prototype', 'cl2n', 'knn', 'logreg', 'maml', …);
        a head that needs a checkpoint ('siamese') is loaded from the `checkpoint` folder.
    metric: 'cosine' or 'euclidean'.
    feature_transform: None, 'l2n' or 'cl2n' (SimpleShot: centre on the support mean, then L2).
    scale: cosine logit scale (softmax temperature).
    threshold: if set, queries whose top probability is below it are labelled `unknown_label`.
    memory: a `SupportMemory` to use as the support store: `fit` adds to it, predictions use its
        class prototypes (see `from_memory` for a memory that is already filled).
    steps, inner_lr: for heads that fine-tune ('maml': Proto-MAML), SGD steps on the support set and
        their step size (None: the head's defaults).
    """

    #: scikit-learn's parameter table: checked at `fit`, `from_memory` and prediction time with a
    #: ValueError / TypeError (sklearn's InvalidParameterError) naming the parameter. `head` is
    #: checked against the registry as it is at call time (see `_validate_params`).
    _parameter_constraints: dict = {
        "encoder": [str, HasMethods(["embed"])],
        "checkpoint": [str, os.PathLike, None],
        "head": [str],
        "metric": [StrOptions({"cosine", "euclidean"})],
        "feature_transform": [StrOptions({"l2n", "cl2n"}), None],
        "scale": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "threshold": [Interval(numbers.Real, 0, 1, closed="both"), None],
        "unknown_label": "no_validation",
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "num_workers": [Interval(numbers.Integral, 0, None, closed="left")],
        "device": "no_validation",  # checked by resolve_device when the encoder is built
        "skip_bad": ["boolean"],
        "progress": ["boolean"],
        "memory": [HasMethods(["add", "classify"]), None],
        "steps": [Interval(numbers.Integral, 0, None, closed="left"), None],
        "inner_lr": [Interval(numbers.Real, 0, None, closed="neither"), None],
    }

    def _validate_params(self) -> None:
        """Check every parameter against `_parameter_constraints` (the head: a registered name)."""
        constraints = {**self._parameter_constraints, "head": [StrOptions(set(HEADS))]}
        validate_parameter_constraints(
            constraints, self.get_params(deep=False), caller_name=type(self).__name__
        )

    def __init__(
        self,
        encoder: str | Encoder = DEFAULT_ENCODER,
        checkpoint: str | None = None,
        head: str = "prototype",
        metric: str = "cosine",
        feature_transform: str | None = None,
        scale: float | None = None,
        threshold: float | None = None,
        unknown_label: Any = UNKNOWN_LABEL,
        batch_size: int = 32,
        num_workers: int = 2,
        device: str = "cpu",
        skip_bad: bool = False,
        progress: bool = False,
        memory: Any = None,
        steps: int | None = None,
        inner_lr: float | None = None,
    ) -> None:
        self.encoder = encoder
        self.checkpoint = checkpoint
        self.head = head
        self.metric = metric
        self.feature_transform = feature_transform
        self.scale = scale
        self.threshold = threshold
        self.unknown_label = unknown_label
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        self.skip_bad = skip_bad
        self.progress = progress
        self.memory = memory
        self.steps = steps
        self.inner_lr = inner_lr

    # -- embedding -----------------------------------------------------------------------------
    def get_encoder(self) -> Encoder:
        """The encoder this classifier embeds images with (built on first use)."""
        if isinstance(self.encoder, Encoder):
            return self.encoder
        if getattr(self, "_encoder", None) is None:
            self._encoder = create_encoder(self.encoder, checkpoint_path=self.checkpoint, device=self.device)
        return self._encoder

    def embed(self, images: Sequence[Any], desc: str = "embedding") -> EmbeddingResult:
        """Embed images with this classifier's encoder (bad files skipped if `skip_bad`)."""
        return self.get_encoder().embed(
            images,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            progress=self.progress,
            skip_bad=self.skip_bad,
            desc=desc,
        )

    def _query_embeddings(self, X: Any) -> torch.Tensor:
        if _is_embedding_array(X):
            x = _as_embeddings(X)
        else:
            if self.encoder_fingerprint_ is None:
                raise UserInputError(
                    "this classifier was fitted on precomputed embeddings: pass embeddings to "
                    "predict too, or fit it on images"
                )
            encoder = self.get_encoder()
            if encoder.fingerprint != self.encoder_fingerprint_:
                raise FingerprintMismatchError(
                    f"the encoder '{encoder.name}' differs from the one this classifier was "
                    "fitted with (weights or preprocessing); refit or use the original encoder"
                )
            result = self.embed(list(X), desc="queries")
            if result.failed:
                raise UserInputError(
                    f"{len(result.failed)} query image(s) could not be read; embed them with "
                    "embed() to see which, or remove them"
                )
            x = result.embeddings.double()
        if x.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {x.shape[1]} features, but FewShotClassifier is expecting "
                f"{self.n_features_in_} features as input"
            )
        return x

    # -- scikit-learn API ------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> FewShotClassifier:
        """Take the support set: images or embeddings `X` with labels `y`. Returns self."""
        self._validate_params()
        if y is None:
            raise ValueError("requires y to be passed, but the target y is None")
        if isinstance(y, (list, tuple)) and len({isinstance(v, str) for v in y}) > 1:
            example = next(v for v in y if not isinstance(v, str))
            raise ValueError(
                f"y mixes strings and numbers (e.g. {example!r}), which numpy turns into one kind, "
                f"merging e.g. {example!r} and '{example}'; give labels of one type"
            )
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            warnings.warn(
                "A column-vector y was passed when a 1d array was expected; it was flattened",
                DataConversionWarning,
                stacklevel=2,
            )
            y = y.ravel()
        if y.ndim != 1:
            raise ValueError(f"y must be 1-D labels, got shape {y.shape}")
        check_classification_targets(y)
        if self.memory is not None:
            return self._fit_memory(X, y)
        if _is_embedding_array(X):
            x = _as_embeddings(X)
            fingerprint = None
        else:
            items = list(X)
            if len(items) != len(y):
                raise ValueError(f"got {len(items)} images but {len(y)} labels")
            result = self.embed(items, desc="support")
            x, y = result.embeddings.double(), y[result.kept]
            fingerprint = self.get_encoder().fingerprint
        if x.shape[0] != len(y):
            raise ValueError(f"got {x.shape[0]} embeddings but {len(y)} labels")
        classes, y_index = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"the support set needs at least 2 classes, got 1 class: {classes.tolist()}")
        self.classes_ = classes
        self.n_features_in_ = int(x.shape[1])
        self.encoder_fingerprint_ = fingerprint
        self.head_ = self._build_head().fit(x, torch.from_numpy(y_index))
        return self

    def _build_head(self) -> Head:
        """The registered head `self.head`, its options taken from this classifier's parameters."""
        cls = head_spec(self.head).load()
        needs_checkpoint = cls.needs_checkpoint
        if needs_checkpoint and (self.checkpoint is None or not os.path.isdir(self.checkpoint)):
            raise UserInputError(f"head={self.head!r} needs checkpoint=DIR, {cls.checkpoint_hint}")
        options = {  # None: the head's own default
            "metric": self.metric,
            "feature_transform": self.feature_transform,
            "scale": self.scale,
            "steps": self.steps,
            "lr": self.inner_lr,
        }
        if not needs_checkpoint and self.checkpoint is not None and os.path.isdir(self.checkpoint):
            options["head_checkpoint"] = self.checkpoint  # e.g. a trained matching head's folder
        return build_head(self.head, self.checkpoint if needs_checkpoint else None, **options)

    # -- support memory --------------------------------------------------------------------
    @classmethod
    def from_memory(cls, memory: Any, **params: Any) -> FewShotClassifier:
        """A fitted classifier over a filled `SupportMemory` (metric taken from the memory)."""
        params.setdefault("metric", "euclidean" if memory.metric == "l2" else "cosine")
        clf = cls(memory=memory, **params)
        clf._validate_params()
        return clf._use_memory()

    def _fit_memory(self, X: Any, y: np.ndarray) -> FewShotClassifier:
        """Add the support set to the memory (never clearing it), then predict from it."""
        if _is_embedding_array(X):
            x = _as_embeddings(X)
        else:
            fp, held = self.get_encoder().fingerprint, self.memory.encoder_fingerprint
            if held != fp and (held is not None or len(self.memory)):
                raise FingerprintMismatchError(
                    "the memory holds embeddings from another encoder (or of unknown origin); "
                    "use the encoder it was built with"
                )
            items = list(X)
            if len(items) != len(y):
                raise ValueError(f"got {len(items)} images but {len(y)} labels")
            result = self.embed(items, desc="support")
            x, y = result.embeddings, y[result.kept]
            self.memory.encoder_fingerprint = fp
        self.memory.add(x, y.tolist())
        return self._use_memory()

    def _use_memory(self) -> FewShotClassifier:
        from .memory.head import MemoryHead

        memory = self.memory
        expected = "euclidean" if memory.metric == "l2" else "cosine"
        if self.metric != expected or self.feature_transform not in (None, "l2n"):
            raise ValueError(
                f"a {memory.metric} memory needs metric={expected!r} and feature_transform None, "
                f"got metric={self.metric!r}, feature_transform={self.feature_transform!r}"
            )
        if len(memory.classes) < 2:
            raise ValueError(f"the memory needs at least 2 classes, has {len(memory.classes)}")
        self.classes_ = np.asarray(memory.classes)
        self.n_features_in_ = memory.dim
        self.encoder_fingerprint_ = memory.encoder_fingerprint
        self.head_ = MemoryHead(memory, memory.classes, self.scale)
        return self

    def logits(self, X: Any) -> np.ndarray:
        """Head logits `[Q, C]` (columns follow `classes_`)."""
        check_is_fitted(self, "head_")
        with torch.inference_mode():
            return self.head_(self._query_embeddings(X)).double().numpy()

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits `[Q, C]`; for two classes, scikit-learn's `[Q]` score of `classes_[1]`."""
        logits = self.logits(X)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax class probabilities `[Q, C]` (columns follow `classes_`).

        A transductive head (`head_.transductive`) refines the classes with all of X, the
        unlabelled batch of this call; with `threshold`, a second pass leaves out the queries
        below it (they keep their first-pass probabilities and are answered unknown).
        """
        if not getattr(getattr(self, "head_", None), "transductive", False):
            return torch.softmax(torch.from_numpy(self.logits(X)), dim=1).numpy()
        x = self._query_embeddings(X)
        proba = torch.softmax(torch.from_numpy(self.logits(x)), dim=1).numpy()
        if self.threshold is not None:
            sure = proba.max(1) >= self.threshold
            if 2 <= sure.sum() < len(sure):
                again = self.logits(x[torch.from_numpy(sure)])
                proba[sure] = torch.softmax(torch.from_numpy(again), dim=1).numpy()
        return proba

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class per query; `unknown_label` below `threshold` when one is set."""
        self._validate_params()  # set_params after fit is checked too
        proba = self.predict_proba(X)
        labels = self.classes_[proba.argmax(1)]
        if self.threshold is not None:
            labels = labels.astype(object)
            labels[proba.max(1) < self.threshold] = self.unknown_label
        return labels

    def predict_top_k(self, X: Any, k: int = 3) -> list[list[tuple[Any, float]]]:
        """The k most probable (class, probability) pairs per query, best first.

        k: an int >= 1 (TypeError / ValueError otherwise); a k above the number of classes is
        clipped to it, so every query gets all classes ranked (as `numpy.argsort(...)[:k]` does).
        """
        validate_parameter_constraints(
            {"k": [Interval(numbers.Integral, 1, None, closed="left")]}, {"k": k}, caller_name="predict_top_k"
        )
        proba = self.predict_proba(X)
        order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        return [[(self.classes_[j].item(), float(row[j])) for j in idx] for row, idx in zip(proba, order)]

    # -- persistence -----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Save the fitted classifier as safetensors + JSON manifest (atomically; no pickle)."""
        check_is_fitted(self, "head_")
        if self.memory is not None:
            raise UserInputError(
                "a classifier over a SupportMemory is saved by saving the memory: "
                "memory.save(DIR), then FewShotClassifier.from_memory(SupportMemory.load(DIR))"
            )
        params = self.get_params()
        if isinstance(params["encoder"], Encoder):
            params["encoder"] = params["encoder"].name
        classes = self.classes_.tolist()
        manifest = {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "params": params,
            "classes": classes,
            "n_features_in": self.n_features_in_,
            "encoder_fingerprint": self.encoder_fingerprint_,
            "head": {"name": self.head, "hyperparameters": self.head_.hyperparameters()},
        }
        state = {k: v.contiguous() for k, v in self.head_.state_dict().items()}
        save_bundle(directory, manifest, {"head.safetensors": lambda p: save_file(state, p)})

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], encoder: Encoder | None = None, device: str | None = None
    ) -> FewShotClassifier:
        """Load a saved classifier; refuses a newer format or a mismatching encoder fingerprint."""
        manifest, files = load_bundle(directory, KIND, FORMAT_VERSION)
        try:
            params = dict(manifest["params"])
            if device is not None:
                params["device"] = device
            if encoder is not None:
                params["encoder"] = encoder
            clf = cls(**params)
            clf.classes_ = np.asarray(manifest["classes"])
            clf.n_features_in_ = int(manifest["n_features_in"])
            clf.encoder_fingerprint_ = manifest["encoder_fingerprint"]
            head = create_head(manifest["head"]["name"], **manifest["head"]["hyperparameters"])
            head.load_state_dict(load_file(files["head.safetensors"]))
            with torch.no_grad():  # one query (two: transductive): the head must score the listed classes
                width = head(torch.zeros(1 + head.transductive, clf.n_features_in_)).shape[-1]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            what = f"it lacks {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
            raise UserInputError(
                f"'{directory}' is not a consistent saved classifier ({what}); save it again"
            ) from None
        if clf.classes_.ndim != 1 or width != len(clf.classes_):
            raise UserInputError(
                f"'{directory}': its manifest lists {clf.classes_.size} classes but the saved head "
                f"scores {width}; restore the folder or save the classifier again"
            )
        clf.head_ = head
        if clf.encoder_fingerprint_ is not None:
            fp = clf.get_encoder().fingerprint
            if fp != clf.encoder_fingerprint_:
                raise FingerprintMismatchError(
                    f"'{directory}' was fitted with encoder {clf.encoder_fingerprint_['model']} "
                    f"(weights {clf.encoder_fingerprint_['weights_sha256'][:12]}…), but the encoder "
                    f"at hand is {fp['model']} (weights {fp['weights_sha256'][:12]}…)"
                )
        return clf
