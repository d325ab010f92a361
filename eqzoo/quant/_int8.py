"""Symmetric int8 quantization of a weight matrix, one scale per output channel (its
straight-through fake-quantized form for quantization-aware training is in `_qat.py`)."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8

from .._errors import ConfigError

QMAX = 127
"""The largest int8 code used: codes lie in `[-127, 127]`, symmetric about zero (-128 unused)."""


def _check_floating(w, what: str) -> None:
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ConfigError(
            f"{what} quantizes floating-point weights; got dtype {w.dtype}. Pass the float "
            "weight (to requantize int8 codes, dequantize them first with eqzoo.quant.dequantize)."
        )


def quantize_int8(
    w: Float[Array, "*lead out in"],
) -> tuple[Int8[Array, "*lead out in"], Float[Array, "*lead out"]]:
    """Round `w` to int8 codes with one symmetric scale per output channel (row).

    `scale = max|w| / 127` over the input (last) axis and `q = clip(round(w / scale), -127, 127)`,
    so that `q * scale` is within `scale / 2` of `w` element by element. Rows of zeros get
    `scale = 0` and `q = 0` (no division by zero). The scale is kept in `w`'s dtype, and the codes
    are rounded against that stored scale, so `q * scale` is the nearest grid point that the
    layer actually computes with. The arithmetic is done in float32.

    **Arguments:** `w`, a floating weight `(*lead, out, in)` (leading axes, e.g. a stacked layer
    axis, are quantized independently).

    **Returns:** `(q, scale)`: int8 codes of `w`'s shape, and the scale `(*lead, out)` in `w`'s
    dtype.

    **Raises:** `ConfigError` for a weight that is not floating point, or (when concrete) holds
    NaN or infinity.
    """
    _check_floating(w, "quantize_int8")
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        raise ConfigError(
            f"quantize_int8: the weight holds {int(jnp.sum(~jnp.isfinite(w)))} NaN or infinite value(s); "
            "their rows would get a NaN or infinite scale. Fix the weights (a diverged run?) first."
        )
    w32 = w.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(w32), axis=-1) / QMAX).astype(w.dtype)  # (*lead, out)
    s32 = scale.astype(jnp.float32)
    safe = jnp.where(s32 > 0, s32, jnp.ones_like(s32))  # an all-zero row: any divisor gives 0
    q = jnp.clip(jnp.round(w32 / safe[..., None]), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize_int8(
    q: Int8[Array, "*lead out in"], scale: Float[Array, "*lead out"]
) -> Float[Array, "*lead out in"]:
    """The dense weight `q * scale` (per output row), in the scale's dtype (computed in float32).

    **Arguments:** `q`, int8 codes `(*lead, out, in)`; `scale`, `(*lead, out)`.

    **Returns:** the dequantized weight, shaped like `q`.
    """
    w = q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]
    return w.astype(scale.dtype)

