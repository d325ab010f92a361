"""Normalisation layers that compute their statistics in float32 whatever the input dtype."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._errors import check_last_axis, check_positive_numbers, check_sizes


def _as_float32(x: Array) -> Array:
    # At least float32 (float64 stays). Not `jnp.promote_types`: under strict dtype promotion it
    # refuses bfloat16 + float32.
    return x if jnp.finfo(x.dtype).bits >= 32 else x.astype(jnp.float32)


class RMSNorm(eqx.Module):
    """Root-mean-square normalisation over the last axis, with a learned scale.

    `y = x / sqrt(mean(x**2) + eps) * (offset + weight)`, computed in float32 and returned in the
    dtype of `x` (Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization"). `offset` is 0
    for Llama-style norms; Gemma's store the scale as `1 + weight` (`offset=1`), with the weight
    starting at zero.
    """

    weight: Float[Array, " embed"]
    eps: float = eqx.field(static=True)
    offset: float = eqx.field(static=True, default=0.0)

    def __init__(self, dim: int, *, eps: float = 1e-6, offset: float = 0.0, dtype=None):
        """**Arguments:**

        - `dim`: size of the normalised (last) axis.
        - `eps`: added to the mean square for numerical stability; a positive number.
        - `offset`: added to the weight to form the scale (`1.0` for Gemma's norms, whose
          weight starts at 0 and whose checkpoints store the scale minus one). The weight
          starts at `1 - offset`, so a new norm scales by 1 either way.
        - `dtype`: parameter dtype; `None` means the default float dtype.
        """
        check_sizes("RMSNorm", dim=dim)
        check_positive_numbers("RMSNorm", eps=eps)  # a negative eps makes rsqrt of a negative mean square: NaN
        # (1 - offset) * ones, not jnp.full(..., 1.0 - offset): a Python float fill with dtype=None
        # makes a weakly typed array, which turns strong after one update and recompiles the step
        self.weight = (1.0 - offset) * jnp.ones((dim,), dtype=dtype)
        self.eps = eps
        self.offset = float(offset)

    def __call__(self, x: Float[Array, "*shape embed"]) -> Float[Array, "*shape embed"]:
        """**Arguments:** `x`, any leading shape, last axis of size `dim`.

        **Returns:** the normalised array, same shape and dtype as `x`.
        """
        check_last_axis("RMSNorm", x, self.weight.shape[-1])
        x32 = _as_float32(x)
        scale = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        weight = _as_float32(self.weight)
        if self.offset:
            weight = weight + jnp.float32(self.offset)
        return (x32 * scale * weight).astype(x.dtype)


class LayerNorm(eqx.Module):
    """Layer normalisation over the last axis with learned scale and optional bias.

    Computed in float32 and returned in the dtype of `x` (Ba et al., 2016, "Layer Normalization").
    """

    weight: Float[Array, " embed"]
    bias: Float[Array, " embed"] | None
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-5, use_bias: bool = True, dtype=None):
        """**Arguments:**

        - `dim`: size of the normalised (last) axis.
        - `eps`: added to the variance for numerical stability; a positive number.
        - `use_bias`: whether to learn an additive bias.
        - `dtype`: parameter dtype; `None` means the default float dtype.
        """
        check_sizes("LayerNorm", dim=dim)
        check_positive_numbers("LayerNorm", eps=eps)
        self.weight = jnp.ones((dim,), dtype=dtype)
        self.bias = jnp.zeros((dim,), dtype=dtype) if use_bias else None
        self.eps = eps

    def __call__(self, x: Float[Array, "*shape embed"]) -> Float[Array, "*shape embed"]:
        """**Arguments:** `x`, any leading shape, last axis of size `dim`.

        **Returns:** the normalised array, same shape and dtype as `x`.
        """
        check_last_axis("LayerNorm", x, self.weight.shape[-1])
        x32 = _as_float32(x)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * _as_float32(self.weight)
        if self.bias is not None:
            y = y + _as_float32(self.bias)
        return y.astype(x.dtype)
