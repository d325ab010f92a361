"""Quantization-aware training: a float linear layer (and a mixture of experts' expert weight)
that computes with its int8-rounded weight."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from .._errors import ConfigError
from ..nn import AbstractLinear, AbstractWeight, MoE, Targets, apply_linear, replace_linears
from ..nn._replace import EXPERT_FIELDS, split_expert_targets
from ._int8 import fake_quantize
from ._linear import check_features, dense_linear


class FakeQuantLinear(AbstractLinear):
    """A float linear layer trained as if its weight were int8 (fake quantization).

    `base` is an ordinary `equinox.nn.Linear` holding the float (master) weight, which the
    optimizer updates. The forward pass uses [`eqzoo.quant.fake_quantize`][]`(base.weight)`,
    the weight rounded to the grid [`eqzoo.quant.QuantizedLinear`][] will use; the backward
    pass is straight-through, so gradients reach `base.weight` as if there were no rounding.
    [`eqzoo.quant.quantize`][] turns it into a `QuantizedLinear` computing the same outputs.
    Inside a [`eqzoo.nn.Stacked`][] `base`'s arrays carry the stacked layer axis first. Build
    it with [`eqzoo.quant.prepare_qat`][].
    """

    base: eqx.nn.Linear
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(self, base: eqx.nn.Linear):
        """**Arguments:** `base`, the float `equinox.nn.Linear` to train (its arrays may carry
        leading stacked-layer axes).

        **Raises:** `ConfigError` if its weight is not floating point or it has equinox's
        `"scalar"` features.
        """
        check_features(base, "FakeQuantLinear")
        if not jnp.issubdtype(base.weight.dtype, jnp.floating):
            raise ConfigError(f"FakeQuantLinear trains floating-point weights; got dtype {base.weight.dtype}.")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features

    @property
    def dtype(self) -> jnp.dtype:
        """The float weight's dtype."""
        return self.base.weight.dtype

    def apply(self, x: Float[Array, "*shape in"]) -> Float[Array, "*shape out"]:
        """The layer with its fake-quantized weight, over the last axis of `x`, in `x`'s dtype."""
        return apply_linear(eqx.tree_at(lambda lin: lin.weight, self.base, fake_quantize(self.base.weight)), x)

    def as_linear(self) -> eqx.nn.Linear:
        """An `equinox.nn.Linear` holding the fake-quantized weight: the map this layer computes.
        (The float weight itself is `self.base`.)"""
        return dense_linear(fake_quantize(self.base.weight), self.base.bias, self.in_features, self.out_features)


class FakeQuantWeight(AbstractWeight):
    """A float expert weight of an [`eqzoo.nn.MoE`][] trained as if it were int8: what
    [`eqzoo.quant.FakeQuantLinear`][] is to a linear layer.

    `base` is the float (master) `(*lead, contract, out)` weight the optimizer updates. The layer
    multiplies with it rounded to the grid [`eqzoo.quant.QuantizedWeight`][] will use (one scale
    per expert and output column, [`eqzoo.quant.fake_quantize`][] over the contracted axis);
    gradients pass straight through to `base`. [`eqzoo.quant.quantize`][] turns it into that
    `QuantizedWeight`, computing the same outputs. Build it with [`eqzoo.quant.prepare_qat`][].
    """

    base: Float[Array, "*lead contract out"]

    def __init__(self, base: Shaped[Array, "*lead contract out"]):  # dtype checked below, with the fix
        """**Arguments:** `base`, the float expert weight to train.

        **Raises:** `ConfigError` if it is not floating point.
        """
        if not jnp.issubdtype(base.dtype, jnp.floating):
            raise ConfigError(f"FakeQuantWeight trains floating-point weights; got dtype {base.dtype}.")
        self.base = base

    def materialize(self, dtype) -> Float[Array, "*lead contract out"]:
        """The weight rounded to its int8 grid (per output column), in `dtype`."""
        return _fake_quantize_columns(self.base).astype(dtype)

    def take(self, indices, dtype) -> Float[Array, "..."]:
        """The rounded entries at `indices` along the leading axis (experts): each expert's
        columns have their own scales, so rounding only those gives the same values."""
        return _fake_quantize_columns(jnp.take(self.base, indices, axis=0)).astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape."""
        return tuple(self.base.shape)

    @property
    def dtype(self) -> jnp.dtype:
        """The float weight's dtype."""
        return self.base.dtype


def _fake_quantize_columns(w):
    # One scale per output column (the last axis), as QuantizedWeight rounds it.
    return jnp.swapaxes(fake_quantize(jnp.swapaxes(w, -1, -2)), -1, -2)


def _is_moe(x) -> bool:
    return isinstance(x, MoE)


def _wrap_experts(model) -> tuple[object, int]:
    """Every float expert array of every MoE layer as a `FakeQuantWeight`, and how many."""
    count = []

    def one(layer):
        if not _is_moe(layer):
            return layer
        for name in EXPERT_FIELDS:
            w = getattr(layer, name)
            if isinstance(w, AbstractWeight):
                raise ConfigError(
                    f"prepare_qat: the experts' {name} is a {type(w).__name__}, not a float array (already "
                    "wrapped, quantized or adapted); pass experts=False to leave the experts alone."
                )
            layer = eqx.tree_at(lambda m, name=name: getattr(m, name), layer, FakeQuantWeight(w))
            count.append(name)
        return layer

    return jax.tree.map(one, model, is_leaf=_is_moe), len(count)


def prepare_qat(model, *, targets: Targets = None, experts: bool | None = None):
    """A copy of `model` with each selected `equinox.nn.Linear` wrapped in a
    [`eqzoo.quant.FakeQuantLinear`][], and the expert weights of its mixture-of-experts layers
    in [`eqzoo.quant.FakeQuantWeight`][]s, for quantization-aware training.

    Train it as usual (every float weight stays trainable; `TrainState.create(qat_model, ...)`),
    then convert it with [`eqzoo.quant.quantize`][] (same `targets` and `experts`): the int8
    model computes what the trained QAT model computes. Embeddings, norms and the (tied) output
    head are left alone, as `quantize` leaves them.

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

    **Returns:** the wrapped model (paths such as `blocks.layers.attn.q_proj.base.weight` and
    `blocks.layers.mlp.gate_proj.base`, which the default sharding rules place like the
    unwrapped weights). **Raises:** `ConfigError` if a target matches no linear layer and no
    expert weight, or matches a linear layer that is not a plain `equinox.nn.Linear` (already
    wrapped or quantized), if an expert weight to wrap is not a float array, or if the model
    has nothing to wrap.
    """
    linear_targets, hits_experts, linears = split_expert_targets(model, targets, what="prepare_qat")
    if experts is None:
        experts = targets is None or hits_experts
    if hits_experts and not linears and not experts:
        raise ConfigError(f"prepare_qat: targets {targets!r} name only expert weights, but experts=False.")
    names_router = targets is not None and any("router" in t for t in ([targets] if isinstance(targets, str) else targets))
    count = []

    def wrap(path, layer):
        if path.split(".")[-1] == "router" and not names_router:
            return layer  # as quantize leaves it: float, so QAT and the deployed model agree
        count.append(path)
        return FakeQuantLinear(layer)

    out = model
    if linears:
        out = replace_linears(model, wrap, targets=linear_targets, kinds=(eqx.nn.Linear,), what="prepare_qat")
    n_experts = 0
    if experts:
        out, n_experts = _wrap_experts(out)
    if not count and not n_experts:
        raise ConfigError(
            "prepare_qat: the model has no plain equinox.nn.Linear layer to wrap and no float expert "
            "weight (its linear layers are already wrapped, quantized or adapted, or it has none)."
        )
    return out
