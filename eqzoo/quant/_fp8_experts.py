"""Fp8 products for the experts of a mixture of experts: [`eqzoo.quant.fp8_einsum`][], the
batched products [`eqzoo.nn.MoE`][] computes, with [`eqzoo.quant.fp8_matmul`][]'s scaling; and
[`eqzoo.quant.Fp8Weight`][], the stand-in that sends an expert array's products through it."""

import functools

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jaxtyping import Array, Float, Shaped

from .._errors import ConfigError
from ..nn._weight import AbstractWrappedWeight
from ._fp8 import E4M3_MAX, E5M2_MAX, _dequantized, _to_fp8, _whole_batch, fp8_scale


def _operands(spec: str) -> tuple[str, str, str]:
    """`"ab,bc->ac"` as `("ab", "bc", "ac")`."""
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    return a, b, out


def _batched(spec: str) -> str:
    """`spec` with a new leading index on the activations and the output: the product of the
    whole batch at once (the weight shared)."""
    new = next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in spec)
    a, b, c = _operands(spec)
    return f"{new}{a},{b}->{new}{c}"


def _product(spec, a, b, dtype):
    """`einsum(spec)` of two fp8 operands (each with its scale), in float32, returned in
    `dtype`; the operands in the `convert(fp8) * scalar` form of `fp8_matmul`, converted to
    float32 (a wider type too): XLA:CPU has no batched bf16 x bf16 -> f32 product ("Unsupported
    element type for DotThunk"), which the experts' einsums are."""
    (qa, sa), (qb, sb) = a, b
    out = jnp.einsum(spec, _dequantized(qa, sa, jnp.float32), _dequantized(qb, sb, jnp.float32))
    return out.astype(dtype)


def _forward(spec, x, w):
    """`(einsum(spec, x, w), residuals)` with both operands in e4m3 at their own per-tensor
    scale; the residuals are the fp8 operands and their scales."""
    sx, sw = fp8_scale(x, E4M3_MAX), fp8_scale(w, E4M3_MAX)
    xq = _to_fp8(x, sx, jnp.float8_e4m3fn, E4M3_MAX)
    wq = _to_fp8(w, sw, jnp.float8_e4m3fn, E4M3_MAX)
    return _product(spec, (xq, sx), (wq, sw), x.dtype), (xq, sx, wq, sw)


def _backward(spec, xq, sx, wq, sw, g):
    """`(dx, dw)` for `y = einsum("a,b->c", x, w)` with the output gradient in e5m2:
    `dx = einsum("c,b->a", g, w)` and `dw = einsum("a,c->b", x, g)`, each with fp8 operands."""
    a, b, c = _operands(spec)
    sg = fp8_scale(g, E5M2_MAX)
    gq = _to_fp8(g, sg, jnp.float8_e5m2, E5M2_MAX)
    dx = _product(f"{c},{b}->{a}", (gq, sg), (wq, sw), g.dtype)
    dw = _product(f"{a},{c}->{b}", (xq, sx), (gq, sg), g.dtype)
    return dx, dw


@functools.cache
def _ops(spec: str):
    """`(forward, backward, product)` for `spec`: the batchable passes and the differentiable
    product. Batching follows `fp8_matmul` (see eqzoo/quant/_fp8.py): inside
    `summed_weight_gradients()`, under `jax.vmap` over the activations alone, the product runs
    once on the whole batch (a new leading index) with the batch's scales, and the backward pass
    returns one weight gradient, summed over the batch; otherwise every batch member is its own
    product with its own scales."""

    @custom_vmap
    def forward(x, w):
        return _forward(spec, x, w)

    @forward.def_vmap
    def _(axis_size, in_batched, x, w):
        del axis_size
        if _whole_batch(in_batched):
            return _ops(_batched(spec))[0](x, w), (True, (True, False, False, False))
        x_batched, w_batched = in_batched
        out = jax.vmap(
            functools.partial(_forward, spec), in_axes=(0 if x_batched else None, 0 if w_batched else None)
        )(x, w)
        return out, jax.tree.map(lambda _: True, out)

    @custom_vmap
    def backward(xq, sx, wq, sw, g):
        return _backward(spec, xq, sx, wq, sw, g)

    @backward.def_vmap
    def _(axis_size, in_batched, xq, sx, wq, sw, g):
        del axis_size
        if _whole_batch(in_batched[:4]) and in_batched[4]:  # the activations' batch, forwarded whole
            return _ops(_batched(spec))[1](xq, sx, wq, sw, g), (True, False)
        axes = [0 if b else None for b in in_batched]
        return jax.vmap(functools.partial(_backward, spec), in_axes=axes)(xq, sx, wq, sw, g), (True, True)

    @jax.custom_vjp
    def product(x, w):
        return forward(x, w)[0]

    product.defvjp(forward, lambda residuals, g: backward(*residuals, g))
    return forward, backward, product


def _check_spec(spec) -> str:
    """`spec` without spaces, or `ConfigError` unless it is `"<x>,<w>-><out>"` with each index of
    an operand in the other operand or the output (so that both gradients are products too)."""
    s = spec.replace(" ", "") if isinstance(spec, str) else None
    parts = None if s is None or s.count("->") != 1 or s.count(",") != 1 else _operands(s)
    if parts is not None:
        a, b, c = (p.replace("...", "") for p in parts)
        if set(a) <= set(b) | set(c) and set(b) <= set(a) | set(c) and set(c) <= set(a) | set(b):
            return s
    raise ConfigError(
        f"fp8_einsum takes a spec of two operands with an explicit output, each index of an operand also in the "
        f"other operand or the output (as in 'ecd,edh->ech'); got {spec!r}."
    )


def fp8_einsum(spec: str, x: Float[Array, "..."], w: Float[Array, "..."]) -> Float[Array, "..."]:
    """`jnp.einsum(spec, x, w)` with float8 operands in both passes, scaled per tensor at every
    call: [`eqzoo.quant.fp8_matmul`][]'s recipe for the batched products of a mixture of
    experts (`"ecd,edh->ech"`: each expert's slots times its weight).

    Forward: `x` and `w` are each rounded to `float8_e4m3fn` at their scale `max|t| / 448`, and
    their product is accumulated in float32 and scaled back. Backward (a `jax.custom_vjp`): the
    output gradient is rounded to `float8_e5m2` at `max|g| / 57344`, and the input and weight
    gradients are the products of it with the saved e4m3 weight and input. Under
    [`eqzoo.nn.summed_weight_gradients`][] (eqzoo's train step) a `jax.vmap` over `x` alone runs
    one product on the whole batch with its scales and sums the weight gradient in it; under any
    other `jax.vmap` each example has its own scales, as in `fp8_matmul`. Unlike `fp8_matmul`
    the operands are converted back up in float32 whatever `x`'s dtype (XLA:CPU has no batched
    bfloat16 product with a float32 result), so under bfloat16 compute only the fp8 rounding
    applies, and the result is rounded to `x`'s dtype once. XLA:CPU runs it emulated (the
    rounding, not the speed); whether XLA:GPU turns a given batched contraction into an fp8
    GEMM has not been measured.

    **Arguments:**

    - `spec`: `"<x indices>,<w indices>-><output indices>"`; every index of one operand must
      appear in the other or in the output (no index summed within one operand), so that the
      gradients are products of the same kind.
    - `x`: the activations, floating point.
    - `w`: the weight, cast to `x`'s dtype first.

    **Returns:** the product in `x`'s dtype.

    **Raises:** `ConfigError` for a spec of another form.
    """
    return _ops(_check_spec(spec))[2](x, w.astype(x.dtype))


class Fp8Weight(AbstractWrappedWeight):
    """A float weight array whose products run with fp8 operands during training: the experts
    of an [`eqzoo.nn.MoE`][] after [`eqzoo.quant.prepare_fp8`][].

    `base` is the float array (master weight) the optimizer updates, saves and restores; the
    layer's products with it ([`eqzoo.nn.AbstractWeight.einsum`][], which the `"dense"` and
    `"capacity"` implementations call) go through [`eqzoo.quant.fp8_einsum`][], forward and
    backward, and so do decoding's products with the experts a token chose
    (`take_matmul`, scaled over those experts). `materialize` gives the float array: MoE's
    `"ragged"` implementation, whose grouped products take float arrays, refuses the layer
    rather than bypass fp8. [`eqzoo.quant.unwrap_fp8`][] gives the plain array back.
    """

    base: Float[Array, "*lead contract out"]

    def __init__(self, base: Shaped[Array, "*lead contract out"]):  # dtype checked below, with the fix
        """**Arguments:** `base`, the float expert weight `(*lead, contract, out)`.

        **Raises:** `ConfigError` if it is not floating point.
        """
        if not jnp.issubdtype(base.dtype, jnp.floating):
            raise ConfigError(
                f"Fp8Weight computes with floating-point weights; got dtype {base.dtype}. Leave the experts "
                "out (prepare_fp8(..., experts=False))."
            )
        self.base = base

    def materialize(self, dtype) -> Float[Array, "*lead contract out"]:
        """The float weight in `dtype` (unrounded)."""
        return self.base.astype(dtype)

    def take(self, indices, dtype) -> Float[Array, "..."]:
        """The float entries at `indices` along the leading axis (experts), in `dtype`."""
        return jnp.take(self.base, indices, axis=0).astype(dtype)

    def einsum(self, spec: str, x: Float[Array, "..."]) -> Float[Array, "..."]:
        """`fp8_einsum(spec, x, base)`: fp8 operands, forward and backward."""
        return fp8_einsum(spec, x, self.base)

    def take_matmul(self, x: Float[Array, "*idx contract"], indices) -> Float[Array, "*idx out"]:
        """`x @ W[indices]` for each index with fp8 operands, the gathered experts scaled together."""
        return fp8_einsum("...d,...do->...o", x, self.take(indices, x.dtype))
