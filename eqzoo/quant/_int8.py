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


def check_finite(w, what: str) -> None:
    """Raise `ConfigError` if `w` is concrete and holds NaN or infinity (its rows or groups would
    get a NaN or infinite scale); a traced `w` is not checked."""
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        raise ConfigError(
            f"{what}: the weight holds {int(jnp.sum(~jnp.isfinite(w)))} NaN or infinite value(s); "
            "their rows would get a NaN or infinite scale. Fix the weights (a diverged run?) first."
        )


def quantize_groups(w, qmax: int, group_size: int | None):
    """Integer codes of `w` in `[-qmax, qmax]` (int8, unpacked) and their scales
    `max|w| / qmax`, one per row (`group_size=None`: shape `(*lead, out)`) or per row and group
    of `group_size` consecutive entries of the last axis (`(*lead, out, in // group_size)`), in
    `w`'s dtype; the codes are rounded against the stored scale, in float32."""
    w32 = w.astype(jnp.float32)
    if group_size is None:
        grouped = w32[..., None, :]  # (*lead, out, 1, in)
    else:
        grouped = w32.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)  # (*lead, out, groups, size)
    scale = (jnp.max(jnp.abs(grouped), axis=-1) / qmax).astype(w.dtype)  # (*lead, out, groups)
    s32 = scale.astype(jnp.float32)
    safe = jnp.where(s32 > 0, s32, jnp.ones_like(s32))  # an all-zero group: any divisor gives 0
    q = jnp.clip(jnp.round(grouped / safe[..., None]), -qmax, qmax).astype(jnp.int8).reshape(w.shape)
    return q, (scale[..., 0] if group_size is None else scale)


def dequantize_groups(q, scale, dtype):
    """`q * scale` in `dtype` (computed in float32), `scale` per row `(*lead, out)` or per row and
    group `(*lead, out, groups)`."""
    q32 = q.astype(jnp.float32)
    s32 = scale.astype(jnp.float32)
    if scale.ndim == q.ndim - 1:
        return (q32 * s32[..., None]).astype(dtype)
    groups = scale.shape[-1]
    w = q32.reshape(*q.shape[:-1], groups, q.shape[-1] // groups) * s32[..., None]  # (*lead, out, groups, size)
    return w.reshape(q.shape).astype(dtype)


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
    check_finite(w, "quantize_int8")
    return quantize_groups(w, QMAX, None)


def dequantize_int8(
    q: Int8[Array, "*lead out in"], scale: Float[Array, "*lead out"]
) -> Float[Array, "*lead out in"]:
    """The dense weight `q * scale` (per output row), in the scale's dtype (computed in float32).

    **Arguments:** `q`, int8 codes `(*lead, out, in)`; `scale`, `(*lead, out)`.

    **Returns:** the dequantized weight, shaped like `q`.
    """
    return dequantize_groups(q, scale, scale.dtype)

