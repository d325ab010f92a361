"""Training: `TrainState`, compiled train/eval steps, losses, precision, the `fit` loop, loggers."""

from ._decay import weight_decay_mask as weight_decay_mask
from ._fit import Callback as Callback, FitResult as FitResult, evaluate as evaluate, fit as fit
from ._fused_ce import (
    auto_chunk_size as auto_chunk_size,
    fused_cross_entropy as fused_cross_entropy,
)
from ._loggers import (
    ConsoleLogger as ConsoleLogger,
    JSONLLogger as JSONLLogger,
    Logger as Logger,
    TensorBoardLogger as TensorBoardLogger,
)
from ._losses import (
    LM_LOSS_IMPLEMENTATIONS as LM_LOSS_IMPLEMENTATIONS,
    classification_loss as classification_loss,
    cross_entropy as cross_entropy,
    lm_loss as lm_loss,
    tree_global_norm as tree_global_norm,
)
from ._precision import (
    DynamicLossScale as DynamicLossScale,
    Precision as Precision,
    cast_floating as cast_floating,
)
from ._preference import (
    DPO_KEYS as DPO_KEYS,
    dpo_loss as dpo_loss,
    sequence_logprobs as sequence_logprobs,
)
from ._profile import Profile as Profile
from ._state import StateParts as StateParts, TrainState as TrainState
from ._step import (
    EvalStep as EvalStep,
    TrainStep as TrainStep,
    make_eval_step as make_eval_step,
    make_train_step as make_train_step,
)

__all__ = [
    "Callback",
    "ConsoleLogger",
    "FitResult",
    "JSONLLogger",
    "Logger",
    "Profile",
    "TensorBoardLogger",
    "evaluate",
    "fit",
    "DynamicLossScale",
    "EvalStep",
    "Precision",
    "StateParts",
    "TrainState",
    "TrainStep",
    "cast_floating",
    "classification_loss",
    "cross_entropy",
    "LM_LOSS_IMPLEMENTATIONS",
    "DPO_KEYS",
    "dpo_loss",
    "sequence_logprobs",
    "auto_chunk_size",
    "fused_cross_entropy",
    "lm_loss",
    "make_eval_step",
    "make_train_step",
    "tree_global_norm",
    "weight_decay_mask",
]
