"""Type aliases shared by `eqzoo.bayes`."""

from typing import TypeAlias

import numpy as np
from jaxtyping import Array

ArrayIn: TypeAlias = Array | np.ndarray
"""An input array: a JAX array or a NumPy array (converted with `jnp.asarray`)."""
