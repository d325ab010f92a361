"""`QuantizedLinear`: a linear layer holding its weight as int8 (or packed int4) codes and
per-channel (or per-channel-and-group) scales."""

from typing import NoReturn

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8, UInt8

from .._errors import ConfigError
from ..nn import AbstractLinear
from ._int4 import quantize_weight, unpacked
from ._int8 import dequantize_groups
from ._product import int4_product, use_int4_product


def check_features(layer: eqx.nn.Linear, what: str) -> None:
    """Raise `ConfigError` unless `layer` maps integer feature counts (not equinox's "scalar")."""
    if not (isinstance(layer.in_features, int) and isinstance(layer.out_features, int)):
        raise ConfigError(
            f"{what} quantizes layers with integer in/out features; got in_features="
            f"{layer.in_features!r}, out_features={layer.out_features!r} (equinox's 'scalar' "
            "features have no input axis to take a per-channel scale over)."
        )


def dense_linear(weight: Array, bias: Array | None, in_features: int, out_features: int) -> eqx.nn.Linear:
    """An `equinox.nn.Linear` holding exactly `weight` and `bias` (which may carry stacked axes)."""
    # Built abstractly (no random init of a throwaway weight), then filled in.
    template = eqx.filter_eval_shape(
        eqx.nn.Linear, in_features, out_features, use_bias=bias is not None, dtype=weight.dtype,
        key=jax.random.key(0),
    )
    if bias is None:
        return eqx.tree_at(lambda lin: lin.weight, template, weight)
    return eqx.tree_at(lambda lin: (lin.weight, lin.bias), template, (weight, bias))


class QuantizedLinear(AbstractLinear):
    """A linear layer with an int8 or int4 weight: `y = (x @ codes.T) * scale + bias`.

    Weight-only, symmetric quantization. With the defaults (`bits=8`, `group_size=None`),
    `codes` holds int8 codes in `[-127, 127]` and `scale` one floating scale per output unit.
    With `bits=4`, `codes` holds codes in `[-7, 7]` packed two to a byte (uint8, `in // 2`
    bytes per row, [`eqzoo.quant.pack_int4`][]). With a `group_size`, each output unit has one
    scale per group of `group_size` consecutive inputs (`scale` is `(out, in // group_size)`),
    which bounds the rounding by the largest weight of the group rather than of the row: the
    usual choice for int4 (e.g. 128; Frantar et al., "GPTQ", 2022, and Lin et al., "AWQ", 2023,
    use group-wise int4 scales too). Scales keep the floating dtype the original weight had.

    Per channel, the scale multiplies the product rather than the weight (the same map, since
    it is constant along the summed axis). With groups it cannot, so the codes are scaled into
    the compute dtype inside the compiled product: a temporary XLA may fuse into the matrix
    product, never a stored copy. Int4 codes are not interleaved back into the weight's order:
    the low nibbles (even inputs) and the high nibbles (odd inputs) make two products, which
    XLA:CPU fuses with their unpacking when decoding (see the CPU figures in the quantization
    guide). The optional `bias` stays floating. Inside a
    [`eqzoo.nn.Stacked`][] every array carries the stacked layer axis first. Build it from a
    float layer, or quantize a whole model with [`eqzoo.quant.quantize`][].

    It has no `weight`: the codes alone are not the weight (they are up to `127 / max|w|` times
    it, and int4 codes are packed), so code that reads `layer.weight` of a float
    `equinox.nn.Linear` fails here with an `AttributeError` rather than computing with them.
    Call the layer, or take the float weight from `as_linear()` (`codes * scale`).
    """

    codes: Int8[Array, "*layers out in"] | UInt8[Array, "*layers out in_half"]
    scale: Float[Array, "*layers out"] | Float[Array, "*layers out groups"]
    bias: Float[Array, "*layers out"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    bits: int = eqx.field(static=True, default=8)
    group_size: int | None = eqx.field(static=True, default=None)

    def __init__(self, layer: eqx.nn.Linear, *, bits: int = 8, group_size: int | None = None):
        """**Arguments:**

        - `layer`: the float `equinox.nn.Linear` to quantize (its arrays may carry leading
          stacked-layer axes). Its weight is rounded to the nearest code with
          `scale = max|w| / qmax` per output row (or row and group), `qmax` 127 for int8
          ([`eqzoo.quant.quantize_int8`][]) and 7 for int4 ([`eqzoo.quant.quantize_int4`][]).
        - `bits`: 8 (int8 codes) or 4 (int4 codes packed two to a byte).
        - `group_size`: how many consecutive inputs share a scale; it must divide
          `in_features`. `None`: one scale per output row.

        **Raises:** `ConfigError` if the weight is not floating point, the layer has
        equinox's `"scalar"` features, `bits` is not 4 or 8, `group_size` does not divide
        `in_features`, or (int4) `in_features` is odd.
        """
        check_features(layer, "QuantizedLinear")
        self.codes, self.scale = quantize_weight(layer.weight, bits, group_size, "QuantizedLinear")
        self.bias = layer.bias
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self.bits = bits
        self.group_size = group_size

    @property
    def weight(self) -> NoReturn:
        """Not available: raises `AttributeError` naming `codes`, `scale` and `as_linear()`."""
        raise AttributeError(
            f"QuantizedLinear has no `weight`: it holds int{self.bits} `codes` and a per-output-channel `scale` "
            "(the weight is codes * scale; codes alone are up to 127 / max|w| times too large). Call "
            "the layer (layer(x), or eqzoo.nn.apply_linear(layer, x)), or take the float weight from "
            "layer.as_linear().weight (eqzoo.quant.dequantize(model) for a whole model)."
        )

    @property
    def dtype(self) -> jnp.dtype:
        """The floating dtype of the original weight (the scale's dtype), never an integer one: it
        is what e.g. a KV cache for this layer's outputs is made of."""
        return self.scale.dtype

    def int_codes(self) -> Int8[Array, "*layers out in"]:
        """The codes as int8, one per weight (`(*layers, out, in)`): int4 codes unpacked."""
        return unpacked(self.codes, self.bits)

    def apply(self, x: Float[Array, "*shape in"]) -> Float[Array, "*shape out"]:
        """The layer applied to every vector along the last axis of `x`, in `x`'s dtype.

        The codes are converted to `x`'s dtype inside the product (exactly: every int8 value is
        representable in bfloat16 and wider), which accumulates in float32; a per-channel
        scale is applied to that float32 output before it is cast to `x`'s dtype. Group-wise
        scales multiply the codes (in float32, then cast to `x`'s dtype) before the product.
        Int4 contracts the even inputs with the low nibbles and the odd ones with the high
        nibbles, two float32 sums added at the end: the dequantize-then-multiply result up to
        the order of the sums (tested to 1e-5 in float32).
        """
        if self.bits == 4 and use_int4_product(self.group_size):
            # packed: the two nibbles as two contiguous halves (see _product.py); other backends,
            # and an odd group size (it splits a byte between two groups), unpack below instead
            y = int4_product(x, self.codes, self.scale).astype(x.dtype)
            return y if self.bias is None else y + self.bias.astype(x.dtype)
        codes = self.int_codes()  # (out, in) int8
        if self.group_size is None:
            # (*shape, out), in code units: up to 127 / max|w| times the layer's output, so it is
            # accumulated and kept in float32 until the scale brings it back (in float16 it could
            # overflow where the float layer does not).
            y = jnp.matmul(x, codes.T.astype(x.dtype), preferred_element_type=jnp.float32)
            y = (y * self.scale.astype(jnp.float32)).astype(x.dtype)
        else:
            w = dequantize_groups(codes, self.scale, x.dtype)  # (out, in), a temporary inside the program
            y = jnp.matmul(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias.astype(x.dtype)
        return y

    def as_linear(self) -> eqx.nn.Linear:
        """The dequantized layer: an `equinox.nn.Linear` with weight `codes * scale` in the
        original dtype (and any stacked axes), computing the same map up to rounding."""
        weight = dequantize_groups(self.int_codes(), self.scale, self.scale.dtype)
        return dense_linear(weight, self.bias, self.in_features, self.out_features)
