"""Quantization-aware training: a float linear layer (and a mixture of experts' expert weight)
that computes with its weight rounded to the int8 or int4 grid `quantize` will store."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from .._errors import ConfigError
from ..nn import AbstractLinear, Targets, apply_linear
from ..nn._replace import wrap_linears_and_experts
from ..nn._weight import AbstractWrappedWeight
from ._int4 import check_bits_and_groups, qmax
from ._int8 import _check_floating, check_finite, dequantize_groups, quantize_groups
from ._linear import check_features, dense_linear


def grid_str(bits: int, group_size: int | None, inputs: str = "inputs") -> str:
    """`"the int8 per-channel grid"`, `"the int4 grid with groups of 32 inputs"`, ...: what a
    `(bits, group_size)` pair rounds to, in words."""
    if group_size is None:
        return f"the int{bits} per-channel grid"
    return f"the int{bits} grid with groups of {group_size} {inputs}"


def fake_quantize(
    w: Float[Array, "*lead out in"], *, bits: int = 8, group_size: int | None = None
) -> Float[Array, "*lead out in"]:
    """`w` rounded to its int8 (or int4) grid in the forward pass, the identity in the backward
    pass.

    The straight-through form of `w + stop_gradient(dequantized(quantized(w)) - w)`: the value is
    exactly the weight a [`eqzoo.quant.QuantizedLinear`][] built with the same `bits` and
    `group_size` would hold (`codes * scale`, the codes rounded against the stored scale), and
    the gradient with respect to `w` is the gradient with respect to that rounded weight (the
    straight-through estimator of Bengio et al., "Estimating or Propagating Gradients Through
    Stochastic Neurons for Conditional Computation", 2013; used for QAT by Jacob et al.,
    "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", 2018). The scales follow the weight (`max|w_group| / qmax`, recomputed each
    call), as `quantize` will compute them from the trained weight.

    **Arguments:**

    - `w`: a floating weight `(*lead, out, in)`, rounded along its last axis.
    - `bits`: 8 (codes in `[-127, 127]`) or 4 (codes in `[-7, 7]`); keyword-only.
    - `group_size`: how many consecutive inputs share a scale; it must divide `in`. `None`:
      one scale per output row.

    **Returns:** the fake-quantized weight, in `w`'s shape and dtype.

    **Raises:** `ConfigError` for a weight that is not floating point or (when concrete) holds
    NaN or infinity, `bits` other than 4 or 8, a `group_size` that does not divide `in`, or
    (int4, which `quantize` packs two to a byte) an odd `in`.
    """
    _check_floating(w, "fake_quantize")
    check_bits_and_groups(bits, group_size, w.shape[-1], "fake_quantize")
    check_finite(w, "fake_quantize")
    w0 = jax.lax.stop_gradient(w)
    # quantize_int8, quantize_int4 and quantize_weight round with these same two functions
    rounded = dequantize_groups(*quantize_groups(w0, qmax(bits), group_size), w.dtype)
    # `rounded + (w - w)` rather than `w + (rounded - w)`: the same gradient, and the value is
    # bit-for-bit the rounded weight (w - w is exactly 0; rounded - w then + w can be off by an ulp).
    return rounded + (w - w0)


class FakeQuantLinear(AbstractLinear):
    """A float linear layer trained as if its weight were int8 or int4 (fake quantization).

    `base` is an ordinary `equinox.nn.Linear` holding the float (master) weight, which the
    optimizer updates. The forward pass uses [`eqzoo.quant.fake_quantize`][]`(base.weight,
    bits=bits, group_size=group_size)`, the weight rounded to the grid the
    [`eqzoo.quant.QuantizedLinear`][] with the same `bits` and `group_size` will use; the
    backward pass is straight-through, so gradients reach `base.weight` as if there were no
    rounding. [`eqzoo.quant.quantize`][]`(..., bits=bits, group_size=group_size)` turns it into
    that `QuantizedLinear`, computing the same outputs (another grid is refused).
    Inside a [`eqzoo.nn.Stacked`][] `base`'s arrays carry the stacked layer axis first. Build
    it with [`eqzoo.quant.prepare_qat`][].
    """

    base: eqx.nn.Linear
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    bits: int = eqx.field(static=True, default=8)
    group_size: int | None = eqx.field(static=True, default=None)

    def __init__(self, base: eqx.nn.Linear, *, bits: int = 8, group_size: int | None = None):
        """**Arguments:**

        - `base`: the float `equinox.nn.Linear` to train (its arrays may carry leading
          stacked-layer axes).
        - `bits`: the grid to train for, 8 (int8) or 4 (int4).
        - `group_size`: how many consecutive inputs share a scale (it must divide
          `in_features`); `None`, one scale per output row.

        **Raises:** `ConfigError` if its weight is not floating point, it has equinox's
        `"scalar"` features, or `bits` / `group_size` do not fit it (as `QuantizedLinear`).
        """
        check_features(base, "FakeQuantLinear")
        if not jnp.issubdtype(base.weight.dtype, jnp.floating):
            raise ConfigError(f"FakeQuantLinear trains floating-point weights; got dtype {base.weight.dtype}.")
        check_bits_and_groups(bits, group_size, base.in_features, "FakeQuantLinear")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.bits = bits
        self.group_size = group_size

    def rounded_weight(self) -> Float[Array, "*layers out in"]:
        """`base.weight` fake-quantized to this layer's grid (straight-through gradient)."""
        return fake_quantize(self.base.weight, bits=self.bits, group_size=self.group_size)

    @property
    def dtype(self) -> jnp.dtype:
        """The float weight's dtype."""
        return self.base.weight.dtype

    def apply(self, x: Float[Array, "*shape in"]) -> Float[Array, "*shape out"]:
        """The layer with its fake-quantized weight, over the last axis of `x`, in `x`'s dtype."""
        return apply_linear(eqx.tree_at(lambda lin: lin.weight, self.base, self.rounded_weight()), x)

    def as_linear(self) -> eqx.nn.Linear:
        """An `equinox.nn.Linear` holding the fake-quantized weight: the map this layer computes.
        (The float weight itself is `self.base`.)"""
        return dense_linear(self.rounded_weight(), self.base.bias, self.in_features, self.out_features)


class FakeQuantWeight(AbstractWrappedWeight):
    """A float expert weight of an [`eqzoo.nn.MoE`][] trained as if it were int8 or int4: what
    [`eqzoo.quant.FakeQuantLinear`][] is to a linear layer.

    `base` is the float (master) `(*lead, contract, out)` weight the optimizer updates. The layer
    multiplies with it rounded to the grid the [`eqzoo.quant.QuantizedWeight`][] with the same
    `bits` and `group_size` will use (one scale per expert and output column, and group of
    `group_size` contracted rows: [`eqzoo.quant.fake_quantize`][] over the contracted axis);
    gradients pass straight through to `base`. [`eqzoo.quant.quantize`][] with the same `bits`
    and `group_size` turns it into that `QuantizedWeight`, computing the same outputs. Build it
    with [`eqzoo.quant.prepare_qat`][].
    """

    base: Float[Array, "*lead contract out"]
    bits: int = eqx.field(static=True, default=8)
    group_size: int | None = eqx.field(static=True, default=None)

    def __init__(
        self, base: Shaped[Array, "*lead contract out"], *, bits: int = 8, group_size: int | None = None
    ):  # dtype checked below, with the fix
        """**Arguments:**

        - `base`: the float expert weight to train.
        - `bits`: the grid to train for, 8 (int8) or 4 (int4).
        - `group_size`: how many consecutive contracted rows share a scale (it must divide
          `contract`); `None`, one scale per output column.

        **Raises:** `ConfigError` if it is not floating point, or `bits` / `group_size` do not
        fit it (as `QuantizedWeight`).
        """
        if not jnp.issubdtype(base.dtype, jnp.floating):
            raise ConfigError(f"FakeQuantWeight trains floating-point weights; got dtype {base.dtype}.")
        check_bits_and_groups(bits, group_size, base.shape[-2], "FakeQuantWeight")
        self.base = base
        self.bits = bits
        self.group_size = group_size

    def materialize(self, dtype) -> Float[Array, "*lead contract out"]:
        """The weight rounded to its grid (per output column, and group), in `dtype`."""
        return self._rounded(self.base).astype(dtype)

    def take(self, indices, dtype) -> Float[Array, "..."]:
        """The rounded entries at `indices` along the leading axis (experts): each expert's
        columns have their own scales, so rounding only those gives the same values."""
        return self._rounded(jnp.take(self.base, indices, axis=0)).astype(dtype)

    def _rounded(self, w):
        # One scale per output column (the last axis), and group of contracted rows, as
        # QuantizedWeight rounds it: the contracted axis last, rounded, and back.
        return jnp.swapaxes(fake_quantize(jnp.swapaxes(w, -1, -2), bits=self.bits, group_size=self.group_size), -1, -2)


def prepare_qat(
    model, *, targets: Targets = None, experts: bool | None = None, bits: int = 8, group_size: int | None = None
):
    """A copy of `model` with each selected `equinox.nn.Linear` wrapped in a
    [`eqzoo.quant.FakeQuantLinear`][], and the expert weights of its mixture-of-experts layers
    in [`eqzoo.quant.FakeQuantWeight`][]s, for quantization-aware training.

    Train it as usual (every float weight stays trainable; `TrainState.create(qat_model, ...)`),
    then convert it with [`eqzoo.quant.quantize`][] (same `targets`, `experts`, `bits` and
    `group_size`): the quantized model computes what the trained QAT model computes (to float
    rounding). Embeddings, norms and the (tied) output head are left alone, as `quantize`
    leaves them.

    **Arguments:**

    - `model`: any model whose linear layers are `equinox.nn.Linear`s applied through
      [`eqzoo.nn.apply_linear`][] (every eqzoo model) or called directly (`equinox.nn.MLP`).
    - `targets`: which layers (see [`eqzoo.nn.Targets`][]): `None`, every `equinox.nn.Linear`
      but the routers of mixture-of-experts layers (which `quantize` keeps float), or regexes
      searched in the dotted paths [`eqzoo.nn.linear_paths`][] lists; as in `quantize`, a
      mixture-of-experts layer's expert arrays count as the paths `<layer>.gate_proj`,
      `<layer>.up_proj` and `<layer>.down_proj`, and its router is wrapped only when a target
      names `"router"`.
    - `experts`: also fake-quantize the expert weights of every [`eqzoo.nn.MoE`][] layer, as
      `quantize` rounds them. `None` (default): when `targets` is `None` or matches an expert
      array's path, which is when `quantize` quantizes them.
    - `bits`: the grid to train for, as `quantize` takes it: 8 (int8, the default) or 4 (int4,
      where QAT pays most: its step is 18x int8's).
    - `group_size`: `None` (default), one scale per output channel; or how many consecutive
      inputs (contracted rows, for experts) share a scale, e.g. `bits=4, group_size=128`. It
      must divide every selected layer's input size.

    **Returns:** the wrapped model (paths such as `blocks.layers.attn.q_proj.base.weight` and
    `blocks.layers.mlp.gate_proj.base`, which the default sharding rules place like the
    unwrapped weights). **Raises:** `ConfigError` if a target matches no linear layer and no
    expert weight, or matches a linear layer that is not a plain `equinox.nn.Linear` (already
    wrapped or quantized), if an expert weight to wrap is not a float array, if the model
    has nothing to wrap, if `bits` is not 4 or 8, or if `group_size` does not divide a selected
    layer's input size (naming the layer).
    """
    check_bits_and_groups(bits, group_size, 2 * (group_size or 1), "prepare_qat")  # bits, and group_size's type

    def linear(path, layer):
        check_bits_and_groups(bits, group_size, layer.in_features, f"prepare_qat: {path} Linear({layer.in_features} -> {layer.out_features})")
        return FakeQuantLinear(layer, bits=bits, group_size=group_size)

    def expert(path, w):
        check_bits_and_groups(bits, group_size, w.shape[-2], f"prepare_qat: {path} (experts' weight {tuple(w.shape)}, contracting {w.shape[-2]})")
        return FakeQuantWeight(w, bits=bits, group_size=group_size)

    return wrap_linears_and_experts(
        model, targets=targets, experts=experts, linear=linear, expert=expert, what="prepare_qat",
        nothing=(
            "prepare_qat: the model has no plain equinox.nn.Linear layer to wrap and no float expert "
            "weight (its linear layers are already wrapped, quantized or adapted, or it has none)."
        ),
    )
