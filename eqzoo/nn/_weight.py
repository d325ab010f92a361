"""Stand-ins for weight arrays that a layer reads whole (the stacked experts of an
[`eqzoo.nn.MoE`][]), as [`eqzoo.nn.AbstractLinear`][] stands in for a linear layer."""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float


class AbstractWeight(eqx.Module):
    """A weight held in another form (int8 codes and scales, for example) that a layer turns
    into the floating array it multiplies with, through [`eqzoo.nn.weight_value`][].

    Subclasses implement `materialize` and the `shape` and `dtype` of the array they stand for.
    Inside a [`eqzoo.nn.Stacked`][] their array leaves carry the stacked layer axis first, and
    `materialize` sees one layer's slice.
    """

    @abc.abstractmethod
    def materialize(self, dtype) -> Float[Array, "..."]:
        """The floating weight, in `dtype`."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this stands for."""

    @property
    @abc.abstractmethod
    def dtype(self) -> jnp.dtype:
        """The floating dtype of the weight this stands for."""


def weight_value(w: Float[Array, "..."] | AbstractWeight, dtype) -> Float[Array, "..."]:
    """`w` as a floating array of `dtype`: cast if it is an array, materialised if it is an
    [`eqzoo.nn.AbstractWeight`][]."""
    return w.materialize(dtype) if isinstance(w, AbstractWeight) else w.astype(dtype)
