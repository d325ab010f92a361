"""`QuantizedLinear`: a linear layer holding its weight as int8 codes and a per-channel scale."""

from typing import NoReturn

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8

from .._errors import ConfigError
from ..nn import AbstractLinear
from ._int8 import dequantize_int8, quantize_int8


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
    """A linear layer with an int8 weight: `y = (x @ codes.T) * scale + bias`.

    Weight-only, symmetric, per-output-channel quantization: `codes` holds int8 codes in
    `[-127, 127]` and `scale` one floating scale per output unit, in the floating dtype the
    original weight had (so a float32 layer keeps a float32 scale and a bfloat16 one a bfloat16
    scale). The scale multiplies the product rather than the weight (the same map, since it is
    constant along the summed axis), so no dequantized copy of the weight is ever made. The
    optional `bias` stays floating. Inside a [`eqzoo.nn.Stacked`][] every array carries the
    stacked layer axis first. Build it from a float layer, or quantize a whole model with
    [`eqzoo.quant.quantize`][].

    It has no `weight`: the codes alone are not the weight (they are up to `127 / max|w|` times
    it), so code that reads `layer.weight` of a float `equinox.nn.Linear` fails here with an
    `AttributeError` rather than computing with them. Call the layer, or take the float weight
    from `as_linear()` (`codes * scale`).
    """

    codes: Int8[Array, "*layers out in"]
    scale: Float[Array, "*layers out"]
    bias: Float[Array, "*layers out"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(self, layer: eqx.nn.Linear):
        """**Arguments:**

        - `layer`: the float `equinox.nn.Linear` to quantize (its arrays may carry leading
          stacked-layer axes). Its weight is rounded to the nearest int8 code with
          `scale = max|w| / 127` per output row ([`eqzoo.quant.quantize_int8`][]).

        **Raises:** `ConfigError` if the weight is not floating point or the layer has
        equinox's `"scalar"` features.
        """
        check_features(layer, "QuantizedLinear")
        self.codes, self.scale = quantize_int8(layer.weight)
        self.bias = layer.bias
        self.in_features = layer.in_features
        self.out_features = layer.out_features

    @property
    def weight(self) -> NoReturn:
        """Not available: raises `AttributeError` naming `codes`, `scale` and `as_linear()`."""
        raise AttributeError(
            "QuantizedLinear has no `weight`: it holds int8 `codes` and a per-output-channel `scale` "
            "(the weight is codes * scale; codes alone are up to 127 / max|w| times too large). Call "
            "the layer (layer(x), or eqzoo.nn.apply_linear(layer, x)), or take the float weight from "
            "layer.as_linear().weight (eqzoo.quant.dequantize(model) for a whole model)."
        )

    @property
    def dtype(self) -> jnp.dtype:
        """The floating dtype of the original weight (the scale's dtype), never int8: it is what
        e.g. a KV cache for this layer's outputs is made of."""
        return self.scale.dtype

    def apply(self, x: Float[Array, "*shape in"]) -> Float[Array, "*shape out"]:
        """The layer applied to every vector along the last axis of `x`, in `x`'s dtype.

        The int8 codes are converted to `x`'s dtype inside the product (exactly: every int8
        value is representable in bfloat16 and wider), which accumulates in float32; the
        per-channel scale is applied to that float32 output before it is cast to `x`'s dtype.
        """
        # (*shape, out), in code units: up to 127 / max|w| times the layer's output, so it is
        # accumulated and kept in float32 until the scale brings it back (in float16 it could
        # overflow where the float layer does not).
        y = jnp.matmul(x, self.codes.T.astype(x.dtype), preferred_element_type=jnp.float32)
        y = (y * self.scale.astype(jnp.float32)).astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias.astype(x.dtype)
        return y

    def as_linear(self) -> eqx.nn.Linear:
        """The dequantized layer: an `equinox.nn.Linear` with weight `codes * scale` in the
        original dtype (and any stacked axes), computing the same map up to rounding."""
        return dense_linear(dequantize_int8(self.codes, self.scale), self.bias, self.in_features, self.out_features)
