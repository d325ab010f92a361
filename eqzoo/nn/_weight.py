"""Stand-ins for weight arrays that a layer reads whole (the stacked experts of an
[`eqzoo.nn.MoE`][]), as [`eqzoo.nn.AbstractLinear`][] stands in for a linear layer."""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float


class AbstractWeight(eqx.Module):
    """A weight held in another form (int8 codes and scales, for example) that a layer turns
    into the floating array it multiplies with, through [`eqzoo.nn.weight_value`][].

    Subclasses implement `materialize` and the `shape` and `dtype` of the array they stand for,
    and may override `take` to read only the entries it picks. Inside a [`eqzoo.nn.Stacked`][]
    their array leaves carry the stacked layer axis first, and `materialize` sees one layer's
    slice.
    """

    @abc.abstractmethod
    def materialize(self, dtype) -> Float[Array, "..."]:
        """The floating weight, in `dtype`."""

    def take(self, indices, dtype) -> Float[Array, "..."]:
        """`jnp.take(materialize(dtype), indices, axis=0)`: the weight's entries along its
        leading axis (an expert each, for the experts of an [`eqzoo.nn.MoE`][]) at `indices`,
        in `dtype`. This default forms the whole weight first; subclasses override it to read
        only the entries picked (decoding a mixture of experts reads a few experts a token)."""
        return jnp.take(self.materialize(dtype), indices, axis=0)

    def take_matmul(self, x: Float[Array, "*idx contract"], indices) -> Float[Array, "*idx out"]:
        """`x @ W[indices]` for each index, in `x`'s dtype: each of `x`'s vectors times the
        weight's entry (an expert's `(contract, out)` matrix) at the matching index of
        `indices` (an integer array of `x`'s leading shape). This default multiplies with
        `take(indices, x.dtype)`, one product per index; subclasses override it to multiply
        from their stored form (int4 experts on CPU: [`eqzoo.quant.QuantizedWeight`][])."""
        return jnp.einsum("...d,...do->...o", x, self.take(indices, x.dtype))

    def einsum(self, spec: str, x: Float[Array, "..."]) -> Float[Array, "..."]:
        """`jnp.einsum(spec, x, W)` in `x`'s dtype: the product of a layer's activations `x`
        with the whole weight, as a mixture of experts' batched products take it
        (`"ecd,edh->ech"`, `"td,edh->teh"`; [`eqzoo.nn.weight_einsum`][]). This default
        multiplies with `materialize(x.dtype)`; a subclass overrides it to compute the product
        its own way ([`eqzoo.quant.Fp8Weight`][]: fp8 operands). The `"ragged"` implementation
        of [`eqzoo.nn.MoE`][], whose grouped products take float arrays, refuses a weight
        whose `computes_own_products()` is true."""
        return jnp.einsum(spec, x, self.materialize(x.dtype))

    def computes_own_products(self) -> bool:
        """Whether this weight's products are not those of its materialised array (fp8
        operands: [`eqzoo.quant.Fp8Weight`][]), so that a layer must multiply through `einsum`
        and `take_matmul` rather than `materialize`. This default: whether the class overrides
        `einsum`; a weight wrapping another one (a LoRA adapter on fp8 experts) answers for
        its base."""
        return type(self).einsum is not AbstractWeight.einsum

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this stands for."""

    @property
    @abc.abstractmethod
    def dtype(self) -> jnp.dtype:
        """The floating dtype of the weight this stands for."""


def weight_take(w: Float[Array, "..."] | AbstractWeight, indices, dtype) -> Float[Array, "..."]:
    """`w`'s entries along its leading axis at `indices`, as a floating array of `dtype`: a
    gather then a cast for an array, [`eqzoo.nn.AbstractWeight.take`][] otherwise."""
    return w.take(indices, dtype) if isinstance(w, AbstractWeight) else jnp.take(w, indices, axis=0).astype(dtype)


def weight_take_matmul(w: Float[Array, "..."] | AbstractWeight, x: Float[Array, "*idx contract"], indices) -> Float[Array, "*idx out"]:
    """`x @ w[indices]` for each index, in `x`'s dtype: a product with `weight_take(w, indices,
    x.dtype)` batched over the indices for an array, [`eqzoo.nn.AbstractWeight.take_matmul`][]
    otherwise."""
    if isinstance(w, AbstractWeight):
        return w.take_matmul(x, indices)
    return jnp.einsum("...d,...do->...o", x, weight_take(w, indices, x.dtype))


def weight_value(w: Float[Array, "..."] | AbstractWeight, dtype) -> Float[Array, "..."]:
    """`w` as a floating array of `dtype`: cast if it is an array, materialised if it is an
    [`eqzoo.nn.AbstractWeight`][]."""
    return w.materialize(dtype) if isinstance(w, AbstractWeight) else w.astype(dtype)


def weight_einsum(spec: str, x: Float[Array, "..."], w: Float[Array, "..."] | AbstractWeight) -> Float[Array, "..."]:
    """`jnp.einsum(spec, x, w)` in `x`'s dtype, the activations first: for an array, the
    product with `w` cast to `x`'s dtype; for an [`eqzoo.nn.AbstractWeight`][], its
    [`einsum`][eqzoo.nn.AbstractWeight.einsum] (which may compute it its own way: fp8 experts).
    The experts' products of [`eqzoo.nn.MoE`][] go through it."""
    if isinstance(w, AbstractWeight):
        return w.einsum(spec, x)
    return jnp.einsum(spec, x, w.astype(x.dtype))


def computes_own_products(w) -> bool:
    """Whether `w` is an [`eqzoo.nn.AbstractWeight`][] whose products are not those of its
    materialised array ([`eqzoo.nn.AbstractWeight.computes_own_products`][])."""
    return isinstance(w, AbstractWeight) and w.computes_own_products()


class AbstractWrappedWeight(AbstractWeight):
    """An [`eqzoo.nn.AbstractWeight`][] that holds the weight it stands for as `base` (a float
    array, or another `AbstractWeight`) and computes from it in its own way (fp8 products,
    fake quantization, a low-rank adapter): its `shape` and `dtype` are the base's."""

    base: eqx.AbstractVar[Float[Array, "..."] | AbstractWeight]

    @property
    def shape(self) -> tuple[int, ...]:
        """The base weight's shape."""
        return tuple(self.base.shape)

    @property
    def dtype(self) -> jnp.dtype:
        """The base weight's floating dtype."""
        return jnp.dtype(self.base.dtype)
