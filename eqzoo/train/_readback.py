"""Means of a window of steps' metrics, reduced on the device and read back in one transfer.

`fit` logs the mean of each metric over the steps since its last log, and `evaluate` the mean
over its batches. Read back as they are, each step's scalars are one device-to-host transfer
apiece: 100 steps of a 64-layer MoE's per-layer metrics are ~20,000 transfers. Here each step's
metrics are packed into one vector (one compiled program per metrics structure), the window's
vectors summed `_BLOCK` at a time into one mean (one program for every window length), and
that one vector read back. Integer metrics ride in the same vector as exact sums in a pair of
integer words (a float32 sum rounds above 2**24; see `_carry`), the floats as their bits.

One program over the whole window would take N x K scalar arguments: XLA:CPU took 7 to 115 s to
compile one over 100 x 199 scalars, against under a second for the two small programs here,
whose arguments cost the host the same (~1.3 us each) to pass.
"""

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ConfigError


def _accumulator_dtype() -> jnp.dtype:
    # float32, or float64 where JAX has 64-bit types enabled.
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _word_dtype() -> jnp.dtype:
    # int32, or int64 with 64-bit types: the width of the float accumulator, so that one vector
    # of words carries both (a float's bits by `bitcast_convert_type`).
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.int64))


# An integer metric's sum is carried as two words, `hi * 2**limb + lo` with `0 <= lo < 2**limb`
# (limb = 16 with int32 words): a sum of values near 2**31 overflows int32 after two steps, and
# with no 64-bit types enabled int32 is the widest integer on the device. The lo words are added
# at most `_chunk()` (2**14) or `_BLOCK + 1` at a time, so their sum stays below 2**31 and the
# carry out of it is exact; the hi words are added modulo 2**32 (XLA's integer adds wrap), which
# is exact whenever the true hi word fits. With int32 words the sum is exact while |sum| < 2**47
# (~1.4e14: a step's 2**20 tokens for 2**27 steps); with int64 words, while |sum| < 2**95.
def _limb() -> int:
    return _word_dtype().itemsize * 4


def _words_range() -> int:
    """The hi and lo words hold a sum exactly while |sum| < 2**_words_range() (2**47 with int32)."""
    return _word_dtype().itemsize * 8 - 1 + _limb()


def _chunk() -> int:
    return 2 ** (_word_dtype().itemsize * 8 - 2 - _limb())  # 2**14 with int32 words


def _carry(hi: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(hi, lo)` with the bits of `lo` above the limb moved into `hi` (`lo >= 0`)."""
    return hi + (lo >> _limb()), lo & (2 ** _limb() - 1)


def _is_integer(value: Any) -> bool:
    """Whether a metric is summed exactly as an integer (an integer or bool array or scalar)."""
    dtype = getattr(value, "dtype", None)  # a jax or NumPy array or scalar, or a tracer of one
    return isinstance(value, int) if dtype is None else dtype.kind in "iub"  # a Python bool is an int


def _split(value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The `(hi, lo)` words of the sum of an integer array's elements."""
    word = _word_dtype()
    x = value.reshape(-1)
    if x.size == 0:
        return jnp.zeros((), word), jnp.zeros((), word)
    if x.dtype == jnp.bool_ or x.dtype.itemsize < word.itemsize:
        x = x.astype(word)  # value-preserving: int8/16, uint8/16, bool (and int32 under x64)
    # In x's own dtype, so that a uint32 above 2**31 splits exactly too: hi < 2**16 fits int32.
    hi, lo = (x >> _limb()).astype(word), (x & (2 ** _limb() - 1)).astype(word)
    while lo.shape[0] > 1:  # sum _chunk() words at a time, carrying after each
        pad = -lo.shape[0] % min(_chunk(), lo.shape[0])
        hi, lo = (jnp.pad(w, (0, pad)).reshape(-1, min(_chunk(), w.shape[0])) for w in (hi, lo))
        hi, lo = _carry(jnp.sum(hi, axis=1), jnp.sum(lo, axis=1))
    return hi.reshape(()), lo.reshape(())


def _refuse(name: str, kind: str) -> None:
    raise ConfigError(
        f"logged metrics must be numbers or numeric arrays (each is logged as its mean, a float); "
        f"metric {name!r} is a {kind}. Return it from the loss's aux as one entry per number, e.g. "
        f"{{'{name}/a': ..., '{name}/b': ...}}."
    )


@functools.partial(jax.jit, static_argnames="integers")
def _pack(metrics: dict[str, Any], integers: tuple[tuple[str, int], ...]) -> jax.Array:
    """One step's metrics as one vector of words (int32, int64 with 64-bit types), in sorted key
    order (the order `jax.device_get` gives a dict): first each metric's mean in float32 (float64
    with 64-bit types; a bf16 value in float32, an array metric by the mean of its elements), as
    the words of its bits; then the integer (and bool) metrics' exact element sums as their hi words,
    then their lo words (see `_carry`). An integer metric's float mean stands in for its exact
    sum where that sum is past the words' range.

    `integers` names the integer metrics of the window's first step, with their sizes: checked
    here, at trace time (once per metrics structure, not per step), against this step's."""
    dtype, word = _accumulator_dtype(), _word_dtype()
    floats, his, los, sizes = [], [], [], dict(integers)
    for name in sorted(metrics):
        value = metrics[name]
        numeric = isinstance(value, jax.Array) and (
            jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating) or value.dtype == jnp.bool_
        )
        if not numeric:
            _refuse(name, f"{value.dtype} array" if isinstance(value, jax.Array) else type(value).__name__)
        floats.append(jnp.mean(value.astype(dtype)))
        if name in sizes:
            if not _is_integer(value) or value.size != sizes[name]:
                got = f"an integer with {value.size} elements" if _is_integer(value) else f"a {value.dtype}"
                raise ConfigError(
                    f"metric {name!r} is an integer with {sizes[name]} elements on the first step of the log "
                    f"window and {got} on another (its mean is its exact sum over the window divided by elements "
                    f"x steps). Return it with one dtype kind and size on every step, or cast it to float "
                    f"(`.astype(jnp.float32)`) to average each step's mean."
                )
            hi, lo = _split(value)
            his.append(hi)
            los.append(lo)
    # One bitcast of the float vector: one per scalar doubled this program's run time on XLA:CPU.
    words = jax.lax.bitcast_convert_type(jnp.stack(floats), word)
    return jnp.concatenate([words, jnp.stack(his + los)]) if his else words


# Vectors summed per call: one program for every window length. A program over the whole
# window's N vectors compiles anew for each N, in time that grows steeply with it (XLA:CPU: 0.3 s
# at 100, 5 s at 1,000, 3 min at 4,000), and `evaluate` over a long eval set is such a window.
_BLOCK = 32


@functools.partial(jax.jit, static_argnames="num_floats")
def _accumulate(
    total: jax.Array, block: list[jax.Array], used: jax.Array, divisor: jax.Array, *, num_floats: int
) -> jax.Array:
    """`total` plus the used vectors of block, as `_pack` lays them out: the float metrics'
    `(total + sum) / divisor`, the integer metrics' exact `(hi, lo)` sums (no division: the host
    divides). The block's unused slots (the last block's padding) are left out by a select, so
    an inf in them cannot turn into NaN."""
    dtype = _accumulator_dtype()
    stacked = jnp.where(used[:, None], jnp.stack(block), 0)  # (_BLOCK, num_words); bits 0 are 0.0
    floats = jax.lax.bitcast_convert_type(total[:num_floats], dtype)
    floats = (floats + jnp.sum(jax.lax.bitcast_convert_type(stacked[:, :num_floats], dtype), axis=0)) / divisor
    num_ints = (total.shape[0] - num_floats) // 2
    hi = total[num_floats : num_floats + num_ints] + jnp.sum(stacked[:, num_floats : num_floats + num_ints], axis=0)
    lo = total[num_floats + num_ints :] + jnp.sum(stacked[:, num_floats + num_ints :], axis=0)  # < (_BLOCK + 1) * 2**_LIMB
    hi, lo = _carry(hi, lo)
    return jnp.concatenate([jax.lax.bitcast_convert_type(floats, total.dtype), hi, lo])


def mean_metrics(window: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The mean of each metric over `window` (a list of one dict of device scalars per step),
    as Python floats, keyed in sorted order, read back from the device in one transfer.

    Float metrics: float32 means on the device (float64 with `jax_enable_x64`), within float32
    rounding of a float64 mean (tested to 1e-6 relative). Integer and bool metrics: the exact
    sum of their elements over the window, in two int32 words on the device (int64 words with
    `jax_enable_x64`), divided on the host by elements x steps, so a count of 2**24 + 1 a step
    comes back as 2**24 + 1; past 2**46 in magnitude (2**94 with int64 words: the words hold
    2**47, and the float mean tells which side a sum is on), the float mean. NaN and inf propagate as in any mean. Compiles one program per metrics structure (names,
    shapes, dtypes) to pack a step's metrics and one to sum them, `_BLOCK` steps a call, whatever
    the window's length: a `fit` run compiles its train metrics' and its evaluation's, however
    many times it logs.

    **Raises:** `ConfigError` if the steps' metric names differ (each name's mean would
    otherwise mix different metrics), an integer metric on one step is a float on another or
    changes its number of elements, or a metric is not a number or numeric array."""
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
    # The integer metrics of the first step, with their sizes (what `_pack` checks the others against).
    integers = tuple((name, int(np.size(value))) for name, value in sorted(window[0].items()) if _is_integer(value))
    packed = [_pack(dict(metrics), integers) for metrics in window]
    total = np.zeros(packed[0].shape, packed[0].dtype)
    for start in range(0, len(packed), _BLOCK):
        block = packed[start : start + _BLOCK]
        used = np.arange(_BLOCK) < len(block)
        last = start + _BLOCK >= len(packed)
        divisor = np.asarray(len(packed) if last else 1, _accumulator_dtype())
        total = _accumulate(total, block + [block[0]] * (_BLOCK - len(block)), used, divisor, num_floats=len(names))
    words = jax.device_get(total)
    means = dict(zip(names, words[: len(names)].view(_accumulator_dtype()).tolist(), strict=True))
    his, los = np.split(words[len(names) :], 2)
    for (name, elements), hi, lo in zip(integers, his.tolist(), los.tolist(), strict=True):
        count = elements * len(window)
        # The exact sum, as a Python int, then one correctly rounded division; unless the float
        # mean says the sum is past the words' range (it wrapped): then the float mean stays.
        if count and abs(means[name]) * count < 2.0 ** (_words_range() - 1):
            means[name] = (hi * 2 ** _limb() + lo) / count
    return means

