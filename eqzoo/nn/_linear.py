"""Construction and application of linear layers over a sequence of vectors.

eqzoo's layers hold their projections as `equinox.nn.Linear`s and apply them with
[`eqzoo.nn.apply_linear`][]. Anything that replaces one of those projections — a LoRA adapter
([`eqzoo.peft`](../peft/)), an int8-quantized weight ([`eqzoo.quant`](../quant/)) — subclasses
[`eqzoo.nn.AbstractLinear`][], so every model accepts it without knowing about it.
"""

import abc

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


class AbstractLinear(eqx.Module):
    """A linear map that stands in for an `equinox.nn.Linear` inside eqzoo's layers.

    Subclasses implement `apply` (a batch of vectors along the last axis, as one matrix product)
    and `dtype` (the floating dtype of their parameters, which e.g. sizes a KV cache). Calling the
    module on one vector, as `equinox.nn.MLP` does with its layers, goes through `apply` too.
    Inside a [`eqzoo.nn.Stacked`][] every array leaf carries the stacked layer axis first, and
    `apply` sees one layer's slice.
    """

    in_features: eqx.AbstractVar[int]
    out_features: eqx.AbstractVar[int]

    @abc.abstractmethod
    def apply(self, x: Float[Array, "*shape in"]) -> Float[Array, "*shape out"]:
        """The layer applied to every vector along the last axis of `x`, in `x`'s dtype."""

    @property
    @abc.abstractmethod
    def dtype(self) -> jnp.dtype:
        """The floating dtype of the layer's parameters."""

    def as_linear(self) -> eqx.nn.Linear:
        """A plain `equinox.nn.Linear` computing the same map (one dense weight, with any
        stacked axes), for export or merging. Subclasses without one raise
        `NotImplementedError`."""
        raise NotImplementedError(f"{type(self).__name__} has no dense equivalent (as_linear).")

    def __call__(self, x: Float[Array, "*shape in"], *, key: PRNGKey | None = None) -> Float[Array, "*shape out"]:
        """`apply(x)`; `key` is accepted (and unused) like `equinox.nn.Linear`'s."""
        return self.apply(x)


def apply_linear(
    layer: eqx.nn.Linear | AbstractLinear, x: Float[Array, "*shape in"]
) -> Float[Array, "*shape out"]:
    """Apply `layer` to every vector along the last axis of `x` as one matrix product.

    An [`eqzoo.nn.AbstractLinear`][] (LoRA, quantized) applies itself.
    """
    if isinstance(layer, AbstractLinear):
        return layer.apply(x)
    y = x @ layer.weight.T.astype(x.dtype)
    if layer.bias is not None:
        y = y + layer.bias.astype(x.dtype)
    return y


def linear_dtype(layer: eqx.nn.Linear | AbstractLinear) -> jnp.dtype:
    """The floating dtype of a linear layer's parameters (`weight.dtype` of an `equinox.nn.Linear`)."""
    return layer.dtype if isinstance(layer, AbstractLinear) else layer.weight.dtype
