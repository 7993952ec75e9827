"""The MAML fine-tuning path on torch.func: MAML, FOMAML, ANIL, Meta-SGD and Proto-MAML.

- `functional`: the pure inner loop (`sgd_inner_loop`) and Proto-MAML init (`proto_init`);
- `batchnorm`: explicit BatchNorm semantics ('batch' per-task statistics, or 'frozen');
- `learner`: `MetaLearner`, meta-batches of tasks under `vmap`, meta-gradients into `.grad`;
- `head`: the registered few-shot head 'maml' (Proto-MAML init + SGD steps on the support set);
- `train`: `create_meta_learner` and `meta_train` for `protonets train --method maml|fomaml|anil`.

The public names are imported on first use (PEP 562); `protonets.maml.options` lists the
method names without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protonets.encoders.lazy import lazy_exports

from .options import METHODS

#: public name -> the submodule that defines it (imported when the name is first read)
_LAZY = {
    "batchnorm_mode": ".batchnorm",
    "functional_batch_norm": ".batchnorm",
    "Params": ".functional",
    "linear": ".functional",
    "proto_init": ".functional",
    "sgd_inner_loop": ".functional",
    "MetaLearner": ".learner",
    "TaskBatch": ".learner",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .batchnorm import batchnorm_mode, functional_batch_norm
    from .functional import Params, linear, proto_init, sgd_inner_loop
    from .learner import MetaLearner, TaskBatch

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "METHODS",
    "MetaLearner",
    "Params",
    "TaskBatch",
    "batchnorm_mode",
    "functional_batch_norm",
    "linear",
    "proto_init",
    "sgd_inner_loop",
]
