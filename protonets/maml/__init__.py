"""The MAML fine-tuning path on torch.func: MAML, FOMAML, ANIL, Meta-SGD and Proto-MAML.

- `functional`: the pure inner loop (`sgd_inner_loop`) and Proto-MAML init (`proto_init`);
- `batchnorm`: explicit BatchNorm semantics ('batch' per-task statistics, or 'frozen');
- `learner`: `MetaLearner`, meta-batches of tasks under `vmap`, meta-gradients into `.grad`;
- `head`: the registered few-shot head 'maml' (Proto-MAML init + SGD steps on the support set);
- `train`: `create_meta_learner` and `meta_train` for `protonets train --method maml|fomaml|anil`.
"""

from .batchnorm import batchnorm_mode, functional_batch_norm
from .functional import Params, linear, proto_init, sgd_inner_loop
from .learner import MetaLearner, TaskBatch

__all__ = [
    "MetaLearner",
    "Params",
    "TaskBatch",
    "batchnorm_mode",
    "functional_batch_norm",
    "linear",
    "proto_init",
    "sgd_inner_loop",
]
