"""Int4 codes packed two to a byte, and group-wise scales (one per output channel and group of
`group_size` consecutive inputs), for int4 and int8 weight-only quantization."""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int8, UInt8

from .._errors import ConfigError
from ._int8 import QMAX, _check_floating, check_finite, dequantize_groups, quantize_groups
from ._product import nibbles

QMAX4 = 7
"""The largest int4 code used: codes lie in `[-7, 7]`, symmetric about zero (-8 unused)."""

BITS = (4, 8)


def check_bits_and_groups(bits, group_size, in_features: int, what: str) -> None:
    """Raise `ConfigError` unless `bits` is 4 or 8 and `group_size` (None: per channel) is an
    integer >= 2 dividing `in_features`, the contracted size (even, for packed int4). A group of
    one is refused: its scale is the weight itself (the code is 0 or ±qmax), so it rounds
    nothing and stores more than the float weight."""
    if bits not in BITS or isinstance(bits, bool):
        raise ConfigError(f"{what}: bits must be 4 or 8; got {bits!r}.")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ConfigError(f"{what}: group_size must be a positive integer or None (per channel); got {group_size!r}.")
        if group_size == 1:
            raise ConfigError(
                f"{what}: group_size=1 gives every weight its own scale, so each code is 0 or ±(largest "
                "code) and the scales, in the weight's dtype, are the weights again: nothing is rounded "
                "and the layer grows. Use group_size >= 2 (32 to 128 are usual), or None for one scale "
                "per output channel."
            )
        if in_features % group_size:
            fits = [2**k for k in range(group_size.bit_length()) if 2**k <= group_size and in_features % 2**k == 0]
            hint = f"a divisor of {in_features} (group_size={fits[-1]} fits)" if fits[-1] > 1 else f"a divisor of {in_features}"
            raise ConfigError(
                f"{what}: group_size={group_size} does not divide its {in_features} inputs (the contracted "
                f"size; each group of inputs gets its own scale). Pick {hint}, group_size=None for one "
                "scale per output channel, or leave this layer out of the targets."
            )
    if bits == 4 and in_features % 2:
        raise ConfigError(
            f"{what}: int4 codes are packed two to a byte along the {in_features} inputs, an odd count. "
            "Use bits=8 for this layer, or leave it out of the targets."
        )


def pack_int4(codes: Int8[Array, "*lead n"]) -> UInt8[Array, "*lead n_half"]:
    """Pack int4 codes two to a byte along the last axis.

    Code `2i` goes to the low four bits of byte `i` and code `2i + 1` to the high four bits,
    each as a 4-bit two's complement number, so every value in `[-8, 7]` round-trips through
    [`eqzoo.quant.unpack_int4`][] (quantization itself uses `[-7, 7]`). Values outside that
    range keep only their low four bits.

    **Arguments:** `codes`, int8 codes `(*lead, n)` with `n` even.

    **Returns:** uint8 bytes `(*lead, n // 2)`: half the bytes of the int8 codes.

    **Raises:** `ConfigError` if `codes` is not int8 or its last axis is odd.
    """
    if jnp.dtype(codes.dtype) != jnp.int8 or codes.shape[-1] % 2:
        raise ConfigError(
            f"pack_int4 packs int8 codes along an even last axis; got {jnp.dtype(codes.dtype).name} of shape "
            f"{tuple(codes.shape)}."
        )
    u = jax.lax.bitcast_convert_type(codes, jnp.uint8)
    return (u[..., 0::2] & 0x0F) | (u[..., 1::2] << 4)  # uint8 shifts drop the high bits


def unpack_int4(packed: UInt8[Array, "*lead n_half"]) -> Int8[Array, "*lead n"]:
    """The int8 codes [`eqzoo.quant.pack_int4`][] packed: each byte's low four bits, then its
    high four bits, sign-extended, along the last axis.

    **Arguments:** `packed`, uint8 bytes `(*lead, m)`.

    **Returns:** int8 codes `(*lead, 2 * m)` in `[-8, 7]`.
    """
    lo, hi = nibbles(packed)
    return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def quantize_int4(
    w: Float[Array, "*lead out in"], group_size: int | None = None
) -> tuple[UInt8[Array, "*lead out in_half"], Float[Array, "*lead out"] | Float[Array, "*lead out groups"]]:
    """Round `w` to int4 codes in `[-7, 7]`, packed two to a byte, with one symmetric scale per
    output channel (row) and group of `group_size` consecutive inputs.

    `scale = max|w_group| / 7` and `q = clip(round(w / scale), -7, 7)`, so `q * scale` is within
    `scale / 2` of `w` element by element; an all-zero group gets `scale = 0` and `q = 0`. As in
    [`eqzoo.quant.quantize_int8`][], the scale is kept in `w`'s dtype and the codes are rounded
    against that stored scale (in float32). Symmetric, without a zero point: zero is exact, the
    layer needs no offset term, and only the code -8 goes unused.

    **Arguments:**

    - `w`: a floating weight `(*lead, out, in)`, `in` even (leading axes are quantized
      independently).
    - `group_size`: how many consecutive inputs share a scale; it must divide `in`. `None`:
      one scale per row.

    **Returns:** `(packed, scale)`: uint8 bytes `(*lead, out, in // 2)` ([`eqzoo.quant.pack_int4`][]),
    and the scale, `(*lead, out)` for `group_size=None`, else `(*lead, out, in // group_size)`,
    in `w`'s dtype.

    **Raises:** `ConfigError` for a weight that is not floating point or (when concrete) holds
    NaN or infinity, or a `group_size` that does not divide `in`, or an odd `in`.
    """
    _check_floating(w, "quantize_int4")
    check_bits_and_groups(4, group_size, w.shape[-1], "quantize_int4")
    check_finite(w, "quantize_int4")
    q, scale = quantize_groups(w, QMAX4, group_size)
    return pack_int4(q), scale


def dequantize_int4(
    packed: UInt8[Array, "*lead out in_half"], scale: Float[Array, "*lead out"] | Float[Array, "*lead out groups"]
) -> Float[Array, "*lead out in"]:
    """The dense weight `unpack_int4(packed) * scale` (per row, or per row and group when `scale`
    has a groups axis), in the scale's dtype (computed in float32).

    **Arguments:** `packed`, uint8 bytes `(*lead, out, in // 2)`; `scale`, `(*lead, out)` or
    `(*lead, out, groups)`.

    **Returns:** the dequantized weight `(*lead, out, in)`.
    """
    return dequantize_groups(unpack_int4(packed), scale, scale.dtype)


def qmax(bits: int) -> int:
    """The largest code of a `bits`-bit symmetric grid."""
    return QMAX4 if bits == 4 else QMAX


def quantize_weight(w, bits: int, group_size: int | None, what: str):
    """`w` `(*lead, out, in)` as stored codes (int8 `(*lead, out, in)`, or packed int4 uint8
    `(*lead, out, in // 2)`) and scales (`(*lead, out)`, or `(*lead, out, groups)`)."""
    _check_floating(w, what)
    check_bits_and_groups(bits, group_size, w.shape[-1], what)
    check_finite(w, what)
    sharding = None if isinstance(w, jax.core.Tracer) else getattr(w, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        # A weight split over a mesh: its codes and scales split the same way, each device
        # quantizing its own shard. Computed eagerly, XLA's propagation through the packing and
        # the group reshape left int4 codes whole along the split input axis (an FSDP-sharded
        # model's codes on every fsdp device: `fsdp` times the bytes).
        out = jax.eval_shape(functools.partial(_quantize_stored, bits=bits, group_size=group_size), w)
        spec = tuple(sharding.spec) + (None,) * (w.ndim - len(sharding.spec))
        scale_spec = spec if out[1].ndim == w.ndim else spec[:-1]  # a groups axis splits as the inputs
        shardings = tuple(
            NamedSharding(sharding.mesh, _dividing(s, x.shape, sharding.mesh)) for s, x in zip((spec, scale_spec), out, strict=True)
        )
        return jax.jit(_quantize_stored, static_argnames=("bits", "group_size"), out_shardings=shardings)(
            w, bits=bits, group_size=group_size
        )
    return _quantize_stored(w, bits=bits, group_size=group_size)


def _quantize_stored(w, *, bits: int, group_size: int | None):
    q, scale = quantize_groups(w, qmax(bits), group_size)
    return (pack_int4(q) if bits == 4 else q), scale


def _dividing(spec: tuple, shape: tuple[int, ...], mesh) -> P:
    """`spec` less the entries whose mesh axes do not divide their dimension of `shape`."""
    def fits(entry, size: int) -> bool:
        names = entry if isinstance(entry, tuple) else (entry,)
        return size % math.prod(int(mesh.shape[n]) for n in names) == 0

    return P(*(e if e is None or fits(e, n) else None for e, n in zip(spec, shape, strict=True)))


def unpacked(codes, bits: int):
    """Stored codes as int8 codes in the weight's layout (int4 bytes unpacked along the last axis)."""
    return unpack_int4(codes) if bits == 4 else codes
