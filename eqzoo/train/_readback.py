"""Means of a window of steps' metrics, reduced on the device and read back in one transfer.

`fit` logs the mean of each metric over the steps since its last log, and `evaluate` the mean
over its batches. Read back as they are, each step's scalars are one device-to-host transfer
apiece: 100 steps of a 64-layer MoE's per-layer metrics are ~20,000 transfers. Here each step's
metrics are packed into one vector (one compiled program per metrics structure), the window's
vectors summed `_BLOCK` at a time into one mean (one program for every window length), and
that one vector read back.

One program over the whole window would take N x K scalar arguments: XLA:CPU took 7 to 115 s to
compile one over 100 x 199 scalars, against under a second for the two small programs here,
whose arguments cost the host the same (~1.3 us each) to pass.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ConfigError


def _accumulator_dtype() -> jnp.dtype:
    # float32, or float64 where JAX has 64-bit types enabled.
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _refuse(name: str, kind: str) -> None:
    raise ConfigError(
        f"logged metrics must be numbers or numeric arrays (each is logged as its mean, a float); "
        f"metric {name!r} is a {kind}. Return it from the loss's aux as one entry per number, e.g. "
        f"{{'{name}/a': ..., '{name}/b': ...}}."
    )


@jax.jit
def _pack(metrics: dict[str, Any]) -> jax.Array:
    """One step's metrics as a `(num_metrics,)` vector, in sorted key order (the order
    `jax.device_get` gives a dict): each metric as its mean, in float32 (an integer count, a
    bool and a bf16 value alike; an array metric by the mean of its elements)."""
    dtype = _accumulator_dtype()
    values = []
    for name in sorted(metrics):
        value = metrics[name]
        numeric = isinstance(value, jax.Array) and (
            jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating) or value.dtype == jnp.bool_
        )
        if not numeric:
            _refuse(name, f"{value.dtype} array" if isinstance(value, jax.Array) else type(value).__name__)
        values.append(jnp.mean(value.astype(dtype)))
    return jnp.stack(values)


# Vectors summed per call: one program for every window length. A program over the whole
# window's N vectors compiles anew for each N, in time that grows steeply with it (XLA:CPU: 0.3 s
# at 100, 5 s at 1,000, 3 min at 4,000), and `evaluate` over a long eval set is such a window.
_BLOCK = 32


@jax.jit
def _accumulate(total: jax.Array, block: list[jax.Array], used: jax.Array, divisor: jax.Array) -> jax.Array:
    """`(total + the sum of the used vectors of block) / divisor`: the block's unused slots (the
    last block's padding) are left out by a select, so an inf in them cannot turn into NaN."""
    stacked = jnp.stack(block)  # (_BLOCK, num_metrics)
    return (total + jnp.sum(jnp.where(used[:, None], stacked, 0), axis=0)) / divisor


def mean_metrics(window: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The mean of each metric over `window` (a list of one dict of device scalars per step),
    as Python floats, keyed in sorted order, read back from the device in one transfer.

    Float32 means on the device (float64 with `jax_enable_x64`): within float32 rounding of a
    float64 mean (tested to 1e-6 relative); an integer metric above 2**24 is rounded to float32.
    NaN and inf propagate as in any mean. Compiles one program per metrics structure (names,
    shapes, dtypes) to pack a step's metrics and one to sum them, `_BLOCK` steps a call, whatever
    the window's length: a `fit` run compiles its train metrics' and its evaluation's, however
    many times it logs.

    **Raises:** `ConfigError` if the steps' metric names differ (each name's mean would
    otherwise mix different metrics), or a metric is not a number or numeric array."""
    names = sorted(window[0])
    for i, metrics in enumerate(window):
        if sorted(metrics) != names:
            raise ConfigError(
                f"every step of a log window must return the same metric names; step 0 of the window returned "
                f"{names} and step {i} {sorted(metrics)}. Return every metric on every step (0 where it does "
                "not apply), or log the changing ones from a callback."
            )
        for name, value in metrics.items():  # what jax.jit cannot take at all (a str, a dict); dtypes in _pack
            if not isinstance(value, jax.Array | np.ndarray | np.generic | int | float):
                _refuse(name, type(value).__name__)
    if not names:
        return {}
    packed = [_pack(dict(metrics)) for metrics in window]
    total = np.zeros(packed[0].shape, packed[0].dtype)
    for start in range(0, len(packed), _BLOCK):
        block = packed[start : start + _BLOCK]
        used = np.arange(_BLOCK) < len(block)
        last = start + _BLOCK >= len(packed)
        divisor = np.asarray(len(packed) if last else 1, packed[0].dtype)
        total = _accumulate(total, block + [block[0]] * (_BLOCK - len(block)), used, divisor)
    return dict(zip(names, jax.device_get(total).tolist(), strict=True))
