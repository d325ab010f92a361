"""Int8 weight arrays a layer reads as arrays, not linear layers: the stacked experts of a
mixture of experts (dequantized whole for training, expert by expert when decoding)."""

import jax.numpy as jnp
from jaxtyping import Array, Float, Int8, Shaped

from ..nn import AbstractWeight
from ._int8 import _check_floating, quantize_int8


class QuantizedWeight(AbstractWeight):
    """A weight `W` used as `x @ W` (contracted along its second-to-last axis), held as int8
    codes with one floating scale per output column: the experts of an [`eqzoo.nn.MoE`][]
    after [`eqzoo.quant.quantize`][].

    `codes` has `W`'s shape; `scale` is `max|W| / 127` over the contracted axis, one per
    column (and per leading index: expert, stacked layer), in `W`'s dtype, as
    [`eqzoo.quant.quantize_int8`][] computes per output row of a linear layer. The layer
    multiplies with `codes * scale` in its compute dtype: the weight is int8 at rest (half of
    bfloat16, a quarter of float32) and in memory until its layer runs.
    """

    codes: Int8[Array, "*lead contract out"]
    scale: Float[Array, "*lead out"]

    def __init__(self, weight: Shaped[Array, "*lead contract out"]):  # dtype checked below, with the fix
        """**Arguments:** `weight`, the floating array to quantize, `(*lead, contract, out)`.

        **Raises:** `ConfigError` if it is not floating point.
        """
        _check_floating(weight, "QuantizedWeight")
        codes, self.scale = quantize_int8(jnp.swapaxes(weight, -1, -2))  # rows = output columns
        self.codes = jnp.swapaxes(codes, -1, -2)

    def materialize(self, dtype) -> Float[Array, "*lead contract out"]:
        """`codes * scale` (per column) in `dtype`."""
        w = self.codes.astype(jnp.float32) * self.scale.astype(jnp.float32)[..., None, :]
        return w.astype(dtype)

    def take(self, indices, dtype) -> Float[Array, "..."]:
        """The entries at `indices` along the leading axis, dequantized: only their codes and
        scales are read."""
        codes = jnp.take(self.codes, indices, axis=0).astype(jnp.float32)
        scale = jnp.take(self.scale, indices, axis=0).astype(jnp.float32)
        return (codes * scale[..., None, :]).astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape."""
        return tuple(self.codes.shape)

    @property
    def dtype(self) -> jnp.dtype:
        """The floating dtype of the original weight (the scale's)."""
        return self.scale.dtype
