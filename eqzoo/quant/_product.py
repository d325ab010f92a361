"""The product `x @ W.T` of an int4 linear layer, computed from its packed codes and scales
without interleaving the two codes of each byte.

How XLA:CPU compiles it (JAX 0.10.2, gpt2-124m shapes; figures in `docs/quantization.md`): a
product with a few rows of `x` (decoding) becomes one loop that fuses the weight's unpacking,
conversion and scaling into the dot, vectorized along the inputs, and writes no float weight.
That loop is fast when each weight is one contiguous load (int8 per channel: a widening) and
scalarized when each weight is gathered, as `unpack_int4`'s interleaved order (code `2i` from the
low nibble of byte `i`, `2i + 1` from the high one) makes it. So the low and the high nibbles
are kept as two contiguous halves, each contracted with the matching (even or odd) inputs of `x`.
With many rows (prefill, training, a vmapped batch) XLA writes each scaled half once and calls
its library product, as it does for a dequantized weight: no threshold on the row count is
needed (measured, prefill and batch 64 included).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Int8, UInt8

# The backends whose int4 layers take `int4_product`; elsewhere they unpack the codes and run one
# product, as int8 does. Measured on CPU only. On GPU it is unmeasured (XLA:GPU may fuse the
# unpacking itself), and its two partial sums cost two all-reduces instead of one in a
# row-parallel (tensor-sharded) layer: on 8 CPU devices, `tensor=8` tiny-llama int4 g8
# forward 0.30 MiB of all-reduce against 0.17.
SPLIT_BACKENDS: frozenset[str] = frozenset({"cpu"})


def use_int4_product(group_size: int | None) -> bool:
    """Whether an int4 layer with this `group_size` takes `int4_product`
    on the default backend: on CPU, unless an odd group size splits a byte between two groups."""
    return jax.default_backend() in SPLIT_BACKENDS and (group_size is None or group_size % 2 == 0)


def nibbles(packed: UInt8[Array, "*lead n_half"]) -> tuple[Int8[Array, "*lead n_half"], Int8[Array, "*lead n_half"]]:
    """The low and high int4 codes of each byte, sign-extended to int8: codes `2i` and `2i + 1`
    of [`eqzoo.quant.pack_int4`][]'s order, as two arrays shaped like `packed`."""
    # Arithmetic right shifts of the signed byte sign-extend each nibble.
    lo = jax.lax.bitcast_convert_type(packed << 4, jnp.int8) >> 4
    hi = jax.lax.bitcast_convert_type(packed, jnp.int8) >> 4
    return lo, hi


def int4_product(
    x: Float[Array, "*shape in"], packed: UInt8[Array, "out in_half"], scale: Float[Array, " out"] | Float[Array, "out groups"]
) -> Float[Array, "*shape out"]:
    """`x @ (unpack_int4(packed) * scale).T`, accumulated in float32, in float32.

    Two products: the even inputs of `x` with the low nibbles and the odd inputs with the high
    ones, each half `(out, in // 2)` contiguous in `packed`. Per channel (`scale` `(out,)`), the
    codes are only widened (exact) and the scale multiplies the float32 sum; per group (`scale`
    `(out, groups)`), each half is scaled in float32 and cast to `x`'s dtype, as the dequantized
    weight would be. For a few rows of `x` (decoding) XLA:CPU fuses each half's unpacking and
    scaling into its product, vectorized, and never writes a float weight; for many rows it
    writes the two scaled halves and runs two library products, as it does for one dequantized
    weight.
    """
    out, half = packed.shape
    lo, hi = nibbles(packed)  # (out, in // 2) each: codes 2i and 2i + 1

    def weight(q):  # (out, in // 2) in x's dtype
        if scale.ndim == 1:
            return q.astype(x.dtype)  # exact
        groups = scale.shape[-1]
        w = q.reshape(out, groups, half // groups).astype(jnp.float32) * scale.astype(jnp.float32)[:, :, None]
        return w.reshape(out, half).astype(x.dtype)

    even = jnp.matmul(x[..., 0::2], weight(lo).T, preferred_element_type=jnp.float32)  # (*shape, out)
    odd = jnp.matmul(x[..., 1::2], weight(hi).T, preferred_element_type=jnp.float32)
    # Kept apart until both are done: XLA:CPU would otherwise fuse the sum into one product as
    # its output and, in exchange, write that product's float weight (measured: 5x slower).
    even, odd = jax.lax.optimization_barrier((even, odd))
    y = even + odd
    return y * scale.astype(jnp.float32) if scale.ndim == 1 else y


def int4_take_product(
    x: Float[Array, "*idx contract"],
    packed: UInt8[Array, "experts contract_half out"],
    scale: Float[Array, "experts out"] | Float[Array, "experts out groups"],
    indices: Int[Array, "*idx"],
) -> Float[Array, "*idx out"]:
    """`x @ W[indices]` for each index, `W` the int4 expert weights `(experts, contract, out)`
    packed along `contract` (as [`eqzoo.quant.QuantizedWeight`][] holds them), in `x`'s dtype.

    Only the chosen experts' bytes and scales are gathered. The even inputs of `x` contract
    with the low nibbles and the odd ones with the high nibbles, each half `(contract // 2,
    out)` in the stored layout, as `int4_product` does for a linear layer: per channel the
    codes are only widened and the scale multiplies the float32 sum; per group each half is
    scaled in float32 and cast to `x`'s dtype, as the dequantized weight would be. Unpacking
    to the interleaved order inside a scanned decode loop made XLA:CPU build each gathered
    float weight element by element (measured: 5x slower than this, 4-layer width-512 MoE).
    """
    codes = jnp.take(packed, indices, axis=0)  # (*idx, contract // 2, out)
    s32 = jnp.take(scale, indices, axis=0).astype(jnp.float32)  # (*idx, out[, groups])
    lo, hi = nibbles(codes)  # codes of the even and the odd inputs
    half, out = codes.shape[-2:]
    grouped = s32.ndim == codes.ndim
    if grouped:
        groups = s32.shape[-1]
        rows = jnp.swapaxes(s32, -1, -2)[..., :, None, :]  # (*idx, groups, 1, out): along out, as the codes

    def weight(q):  # (*idx, contract // 2, out) in x's dtype
        if not grouped:
            return q.astype(x.dtype)  # exact
        w = q.reshape(*q.shape[:-2], groups, half // groups, out).astype(jnp.float32) * rows
        return w.reshape(q.shape).astype(x.dtype)

    def product(xh, q):  # (*idx, contract // 2) with (*idx, contract // 2, out), batched over *idx
        return jnp.einsum("...d,...do->...o", xh, weight(q), preferred_element_type=jnp.float32)

    even, odd = product(x[..., 0::2], lo), product(x[..., 1::2], hi)
    even, odd = jax.lax.optimization_barrier((even, odd))  # as in int4_product
    y = even + odd
    return (y if grouped else y * s32).astype(x.dtype)
