"""eqzoo: an Equinox-native model zoo and training library for JAX.

Subpackages: `eqzoo.nn`, `eqzoo.models`, `eqzoo.train`, `eqzoo.data`, `eqzoo.generation`.
Optional extras are imported explicitly: `eqzoo.hf`, `eqzoo.bayes`, `eqzoo.sciml`.
"""

from . import data as data, generation as generation, models as models, nn as nn, train as train
from .generation import generate as generate

__version__ = "0.1.0"

__all__ = ["data", "generate", "generation", "models", "nn", "train"]
