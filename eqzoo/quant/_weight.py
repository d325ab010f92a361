"""Int8 or int4 weight arrays a layer reads as arrays, not linear layers: the stacked experts of a
mixture of experts (dequantized whole for training, expert by expert when decoding)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8, Shaped, UInt8

from ..nn import AbstractWeight
from ._int4 import quantize_weight, unpacked
from ._product import int4_take_product, use_int4_product


class QuantizedWeight(AbstractWeight):
    """A weight `W` used as `x @ W` (contracted along its second-to-last axis), held as integer
    codes with one floating scale per output column (and group of contracted rows): the experts
    of an [`eqzoo.nn.MoE`][] after [`eqzoo.quant.quantize`][].

    With the defaults (`bits=8`, `group_size=None`) `codes` is int8 of `W`'s shape and `scale`
    is `max|W| / 127` over the contracted axis, one per column (and per leading index: expert,
    stacked layer), in `W`'s dtype, as [`eqzoo.quant.quantize_int8`][] computes per output row of
    a linear layer. With `bits=4` the codes lie in `[-7, 7]`, packed two to a byte along the
    contracted axis (uint8 `(*lead, contract // 2, out)`); with a `group_size`, `scale` is
    `(*lead, out, contract // group_size)`, one per column and group of contracted rows. The
    layer multiplies with `codes * scale` in its compute dtype: the weight is int8 (or int4) at
    rest and in memory until its layer runs.
    """

    codes: Int8[Array, "*lead contract out"] | UInt8[Array, "*lead contract_half out"]
    scale: Float[Array, "*lead out"] | Float[Array, "*lead out groups"]
    bits: int = eqx.field(static=True, default=8)
    group_size: int | None = eqx.field(static=True, default=None)

    def __init__(
        self, weight: Shaped[Array, "*lead contract out"], *, bits: int = 8, group_size: int | None = None
    ):  # dtype checked below, with the fix
        """**Arguments:**

        - `weight`: the floating array to quantize, `(*lead, contract, out)`.
        - `bits`: 8 or 4 (int4 codes packed two to a byte along `contract`).
        - `group_size`: how many consecutive contracted rows share a scale; it must divide
          `contract`. `None`: one scale per output column.

        **Raises:** `ConfigError` if it is not floating point, `bits` is not 4 or 8,
        `group_size` does not divide `contract`, or (int4) `contract` is odd.
        """
        # Rows = output columns, so the contracted axis is last, as for a linear layer's weight.
        codes, self.scale = quantize_weight(jnp.swapaxes(weight, -1, -2), bits, group_size, "QuantizedWeight")
        self.codes = jnp.swapaxes(codes, -1, -2)
        self.bits = bits
        self.group_size = group_size

    def int_codes(self) -> Int8[Array, "*lead contract out"]:
        """The codes as int8, one per weight, in `W`'s shape: int4 codes unpacked."""
        return jnp.swapaxes(unpacked(jnp.swapaxes(self.codes, -1, -2), self.bits), -1, -2)

    def materialize(self, dtype) -> Float[Array, "*lead contract out"]:
        """`codes * scale` (per column, or column and group) in `dtype`."""
        return _dequantize(self.codes, self.scale, self.bits, dtype)

    def take(self, indices, dtype) -> Float[Array, "..."]:
        """The entries at `indices` along the leading axis, dequantized: only their codes and
        scales are read."""
        codes = jnp.take(self.codes, indices, axis=0)
        scale = jnp.take(self.scale, indices, axis=0)
        return _dequantize(codes, scale, self.bits, dtype)

    def take_matmul(self, x: Float[Array, "*idx contract"], indices) -> Float[Array, "*idx out"]:
        """`x @ W[indices]` for each index, in `x`'s dtype. Int4 on CPU (an even or no
        `group_size`) multiplies from the gathered bytes, the even inputs with the low nibbles
        and the odd ones with the high nibbles (equal to the dequantize-then-multiply product
        up to the order of the float32 sums; tested to 1e-5); otherwise the product with
        `take(indices, x.dtype)`."""
        if self.bits == 4 and use_int4_product(self.group_size):
            return int4_take_product(x, self.codes, self.scale, indices)
        return super().take_matmul(x, indices)

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape."""
        shape = tuple(self.codes.shape)
        return (*shape[:-2], shape[-2] * (2 if self.bits == 4 else 1), shape[-1])

    @property
    def dtype(self) -> jnp.dtype:
        """The floating dtype of the original weight (the scale's)."""
        return self.scale.dtype


def _dequantize(codes, scale, bits, dtype):
    """`codes * scale` in `dtype` (computed in float32), in the stored `(..., contract, out)`
    layout. Int4 rows `2i` and `2i + 1` are the low and the high nibbles of byte row `i`: each
    output row reads one contiguous row of bytes, shifted by its own amount. Unpacking along the
    last axis of the transposed `(..., out, contract)` rows, as linear layers' codes are,
    made XLA:CPU build the weight element by element (measured: a Qwen3-MoE-style 16-token int4
    prefill took 102 ms of CPU time, 42 now; float experts take 48)."""
    s32 = scale.astype(jnp.float32)
    if bits == 4:
        half, out = codes.shape[-2:]
        lead = codes.shape[:-2]
        pair = jnp.broadcast_to(codes[..., :, None, :], (*lead, half, 2, out))  # byte row i for rows 2i, 2i + 1
        shift = jnp.array([4, 0], jnp.uint8)[:, None]  # row 2i: the low nibble moved up; 2i + 1: the high one
        q = (jax.lax.bitcast_convert_type(pair << shift, jnp.int8) >> 4).reshape(*lead, 2 * half, out)
    else:
        q = codes
    if s32.ndim == codes.ndim - 1:  # one scale per output column
        return (q.astype(jnp.float32) * s32[..., None, :]).astype(dtype)
    contract, out = q.shape[-2:]
    groups = s32.shape[-1]
    rows = jnp.swapaxes(s32, -1, -2)[..., :, None, :]  # (..., groups, 1, out)
    w = q.reshape(*q.shape[:-2], groups, contract // groups, out).astype(jnp.float32) * rows
    return w.reshape(q.shape).astype(dtype)
