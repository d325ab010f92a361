"""Fp8 training matmuls: linear layers whose products take float8 operands, forward and backward,
with per-tensor scales recomputed at every call (current scaling)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jaxtyping import Array, Float

from .._errors import ConfigError
from ..nn import AbstractLinear
from ..nn._grouped import _SUMMED
from ._linear import check_features

E4M3_MAX = 448.0
"""The largest finite `float8_e4m3fn`: activations and weights are scaled so their largest
magnitude lands here."""

E5M2_MAX = 57344.0
"""The largest finite `float8_e5m2`: gradients are scaled so their largest magnitude lands here."""


def fp8_scale(x: Float[Array, "..."], fmax: float) -> Float[Array, ""]:
    """The per-tensor scale `max|x| / fmax` as a float32 scalar, 1 where `x` is all zeros (so
    `x / scale` is 0, not NaN)."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    return jnp.where(amax > 0, amax / fmax, jnp.float32(1.0))


def _to_fp8(x, scale, dtype, fmax):
    # Divided in float32 and clipped: amax / (amax / fmax) can round a hair above fmax, and
    # e4m3fn has no infinity (an overflow would be NaN).
    return jnp.clip(x.astype(jnp.float32) / scale, -fmax, fmax).astype(dtype)


def _dequantized(q, scale, dtype):
    # convert(fp8) * broadcast(scalar scale): the operand form XLA:GPU's GEMM rewriter folds
    # into a cuBLASLt fp8 GEMM (MatchFp8Param in xla/service/gpu/transforms/gemm_rewriter.cc:
    # an fp8 value, a convert to a wider type, optionally a multiply or divide by a broadcast
    # *scalar*, then only layout ops such as reshape or transpose before the dot; on CUDA one
    # operand must be e4m3fn, the output bf16/f16/f32, Ada or Hopper and CUDA 12 or newer).
    return q.astype(dtype) * scale.astype(dtype)


def _matmul(a, b, contract, dtype):
    """`a` and `b` (fp8 codes, each with its scale) multiplied over `contract`, accumulated in
    float32, returned in `dtype`."""
    (qa, sa), (qb, sb) = a, b
    out = jax.lax.dot_general(
        _dequantized(qa, sa, dtype), _dequantized(qb, sb, dtype), (contract, ((), ())),
        preferred_element_type=jnp.float32,
    )
    return out.astype(dtype)


def _forward(x, w):
    """`(x @ w.T, residuals)` with both operands in e4m3 at their own per-tensor scale; the
    residuals are the fp8 operands and scales the backward pass reads (half the bytes of bf16)."""
    sx, sw = fp8_scale(x, E4M3_MAX), fp8_scale(w, E4M3_MAX)
    xq = _to_fp8(x, sx, jnp.float8_e4m3fn, E4M3_MAX)
    wq = _to_fp8(w, sw, jnp.float8_e4m3fn, E4M3_MAX)
    rows = xq.reshape(-1, x.shape[-1])  # one 2-D GEMM: (tokens, in) x (out, in)
    y = _matmul((rows, sx), (wq, sw), ((1,), (1,)), x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0]), (xq, sx, wq, sw)


def _backward(xq, sx, wq, sw, g):
    """`(dx, dw)` for `y = x @ w.T` with the output gradient `g` in e5m2 at its per-tensor scale:
    `dx = g @ w` and `dw = g.T @ x`, each with fp8 operands (e5m2 times e4m3)."""
    sg = fp8_scale(g, E5M2_MAX)
    gq = _to_fp8(g, sg, jnp.float8_e5m2, E5M2_MAX).reshape(-1, g.shape[-1])  # (tokens, out)
    dx = _matmul((gq, sg), (wq, sw), ((1,), (0,)), g.dtype)  # (tokens, in)
    dw = _matmul((gq, sg), (xq.reshape(-1, xq.shape[-1]), sx), ((0,), (0,)), g.dtype)  # (out, in)
    return dx.reshape(xq.shape), dw


# Models take one example and the train step vmaps them, but a per-tensor scale must be one
# scalar for the whole batch to reach the GPU's fp8 GEMM: per-example scales would be a vector
# the GEMM rewriter cannot fold (it wants scalars), and the weight gradient would be one product
# per example, summed. A batched backward pass cannot tell the gradient of a batched loss
# (`grad` of `vmap`, where the weight gradients are summed) from per-example gradients (`vmap`
# of `grad`, DP-SGD, where they must stay apart), as eqzoo/nn/_grouped.py explains. So, as the
# dropless experts do, the rules below read `summed_weight_gradients()` (the train step traces
# its gradient inside it): there, under `jax.vmap` over the activations alone, the product runs
# once on the whole batched array (batch axis first) with the batch's scales, and the backward
# pass returns one weight gradient, already summed. Anywhere else every batch member is its own
# product with its own scales (an example's output then never depends on its neighbours: eval,
# generation, per-example gradients), and so is anything else batched (a batched weight: an
# ensemble).
def _whole_batch(in_batched) -> bool:
    return bool(_SUMMED.get()) and list(in_batched) == [True] + [False] * (len(in_batched) - 1)


@custom_vmap
def _forward_batchable(x, w):
    return _forward(x, w)


@_forward_batchable.def_vmap
def _forward_rule(axis_size, in_batched, x, w):
    del axis_size
    if _whole_batch(in_batched):
        return _forward_batchable(x, w), (True, (True, False, False, False))
    x_batched, w_batched = in_batched
    out = jax.vmap(_forward, in_axes=(0 if x_batched else None, 0 if w_batched else None))(x, w)
    return out, jax.tree.map(lambda _: True, out)


@custom_vmap
def _backward_batchable(xq, sx, wq, sw, g):
    return _backward(xq, sx, wq, sw, g)


@_backward_batchable.def_vmap
def _backward_rule(axis_size, in_batched, xq, sx, wq, sw, g):
    del axis_size
    if _whole_batch(in_batched[:4]) and in_batched[4]:  # the activations' batch, forwarded whole
        return _backward_batchable(xq, sx, wq, sw, g), (True, False)
    axes = [0 if b else None for b in in_batched]
    out = jax.vmap(_backward, in_axes=axes)(xq, sx, wq, sw, g)
    return out, (True, True)


@jax.custom_vjp
def _fp8_matmul(x, w):
    return _forward_batchable(x, w)[0]


def _fp8_matmul_fwd(x, w):
    return _forward_batchable(x, w)


def _fp8_matmul_bwd(residuals, g):
    return _backward_batchable(*residuals, g)


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def fp8_matmul(x: Float[Array, "*shape in"], w: Float[Array, "out in"]) -> Float[Array, "*shape out"]:
    """`x @ w.T` with float8 operands in both passes, scaled per tensor at every call.

    Forward: `x` and `w` are each divided by their scale `max|t| / 448` (1 for an all-zero
    tensor) and rounded to `float8_e4m3fn`; the product of the two fp8 tensors is accumulated in
    float32 and multiplied back by both scales. Backward (a `jax.custom_vjp`): the output
    gradient `g` is rounded to `float8_e5m2` at the scale `max|g| / 57344` (e5m2 trades a
    mantissa bit for range, as gradients need), and `dx = g @ w`, `dw = g.T @ x` are products of
    e5m2 `g` with the e4m3 `w` and `x` saved by the forward pass (float32 accumulation). This is
    "current" (just-in-time) scaling: no amax history, so nothing to carry between steps.

    In eqzoo's train step (one example per call, vmapped, its gradient traced inside
    [`eqzoo.nn.summed_weight_gradients`][]) the scales are those of the whole batch and the
    weight gradient is one product over every token. Under any other `jax.vmap` each example
    is scaled on its own (its output never depends on the rest of the batch; `jax.vmap` of
    `jax.grad` gives true per-example gradients), one product per example.
    Written so XLA:GPU rewrites each product into one cuBLASLt fp8 GEMM on Ada/Hopper GPUs
    (each dot operand is `convert(fp8) * scalar`); elsewhere, XLA runs the same arithmetic on
    the up-converted values (emulated fp8: the rounding, not the speed). The operands are
    converted back up in `x`'s dtype: under bfloat16 compute each scale and each rescaled
    operand is rounded to bfloat16 too (2^-9 relative), on top of the fp8 rounding.

    **Arguments:**

    - `x`: the inputs, any leading shape; floating point.
    - `w`: the weight `(out, in)`, cast to `x`'s dtype (the compute dtype) first.

    **Returns:** `x @ w.T` in `x`'s dtype.
    """
    return _fp8_matmul(x, w.astype(x.dtype))


class Fp8Linear(AbstractLinear):
    """A float linear layer whose matrix products run with fp8 operands during training.

    `base` is the `equinox.nn.Linear` it wraps: its float weight (and bias) are what is
    trained, saved and restored; fp8 is only how the product is computed. `apply` casts the
    weight to the input's (compute) dtype and multiplies with [`eqzoo.quant.fp8_matmul`][]
    (e4m3 operands forward, e5m2 gradients backward, per-tensor scales each call); the bias is
    added in the compute dtype. Build it with [`eqzoo.quant.prepare_fp8`][]; get the float layer
    back with `as_linear()` or, for a whole model, [`eqzoo.quant.unwrap_fp8`][].
    """

    base: eqx.nn.Linear
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(self, base: eqx.nn.Linear):
        """**Arguments:**

        - `base`: the float `equinox.nn.Linear` to wrap (its arrays may carry leading
          stacked-layer axes).

        **Raises:** `ConfigError` if its weight is not floating point or it has equinox's
        `"scalar"` features.
        """
        check_features(base, "Fp8Linear")
        if not jnp.issubdtype(base.weight.dtype, jnp.floating):
            raise ConfigError(
                f"Fp8Linear computes with floating-point weights; got dtype {base.weight.dtype}. "
                "Leave this layer out of prepare_fp8's targets."
            )
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features

    @property
    def dtype(self) -> jnp.dtype:
        """The float weight's dtype."""
        return self.base.weight.dtype

    def apply(self, x: Float[Array, "*shape in"]) -> Float[Array, "*shape out"]:
        """The layer over the last axis of `x` with fp8 operands, in `x`'s dtype."""
        y = fp8_matmul(x, self.base.weight)
        if self.base.bias is not None:
            y = y + self.base.bias.astype(x.dtype)
        return y

    def as_linear(self) -> eqx.nn.Linear:
        """The wrapped float `equinox.nn.Linear` (its weights unchanged)."""
        return self.base
