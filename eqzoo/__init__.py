"""eqzoo: an Equinox-native model zoo and training library for JAX.

Subpackages: `eqzoo.nn`, `eqzoo.models`, `eqzoo.train`, `eqzoo.data`, `eqzoo.generation`,
`eqzoo.perf`. Imported explicitly: `eqzoo.checkpoint`, `eqzoo.sharding`, `eqzoo.peft` (LoRA),
`eqzoo.quant` (int8/int4 weights, fp8 matmuls), `eqzoo.diffusion` (its ODE sampler needs the `sciml` extra), and the
optional extras `eqzoo.hf`, `eqzoo.bayes`, `eqzoo.sciml`.
"""

import warnings as _warnings

from . import perf as perf

# XLA reads XLA_FLAGS when JAX creates its first backend, so eqzoo's GPU defaults go in before
# anything else is imported. Importing eqzoo must never fail because of them.
try:
    perf.apply_xla_flags()
except Exception as _e:
    _warnings.warn(
        f"eqzoo could not apply its default XLA flags ({type(_e).__name__}: {_e}); continuing "
        "without them. Set EQZOO_XLA_FLAGS=0 to skip this step.",
        stacklevel=2,
    )

from . import (  # noqa: E402
    data as data,
    generation as generation,
    models as models,
    nn as nn,
    train as train,
)
from .generation import generate as generate, generate_beam as generate_beam  # noqa: E402

__version__ = "0.1.0"

__all__ = ["data", "generate", "generate_beam", "generation", "models", "nn", "perf", "train"]
