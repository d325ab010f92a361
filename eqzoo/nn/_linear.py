"""Construction and application of `equinox.nn.Linear` over a sequence of vectors."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._typing import PRNGKey


def init_linear(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool,
    std: float,
    dtype=None,
    key: PRNGKey,
) -> eqx.nn.Linear:
    """An `equinox.nn.Linear` with weights drawn from N(0, std²) and zero bias.

    **Arguments:** sizes, `use_bias`, the initialisation `std`, parameter `dtype` and `key`.

    **Returns:** the layer; its `weight` has shape `(out_features, in_features)`.
    """
    layer = eqx.nn.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, key=key)
    weight = std * jax.random.normal(key, layer.weight.shape, dtype=layer.weight.dtype)
    layer = eqx.tree_at(lambda lin: lin.weight, layer, weight)
    if use_bias:
        layer = eqx.tree_at(lambda lin: lin.bias, layer, jnp.zeros_like(layer.bias))
    return layer


def apply_linear(layer: eqx.nn.Linear, x: Float[Array, "*shape in"]) -> Float[Array, "*shape out"]:
    """Apply `layer` to every vector along the last axis of `x` as one matrix product."""
    y = x @ layer.weight.T.astype(x.dtype)
    if layer.bias is not None:
        y = y + layer.bias.astype(x.dtype)
    return y
