"""Quantization-aware training: a float linear layer that computes with its int8-rounded weight."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._errors import ConfigError
from ..nn import AbstractLinear, Targets, apply_linear, replace_linears
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


def prepare_qat(model, *, targets: Targets = None):
    """A copy of `model` with each selected `equinox.nn.Linear` wrapped in a
    [`eqzoo.quant.FakeQuantLinear`][], for quantization-aware training.

    Train it as usual (every float weight stays trainable; `TrainState.create(qat_model, ...)`),
    then convert it with [`eqzoo.quant.quantize`][]: the int8 model computes what the trained
    QAT model computes. Embeddings, norms and the (tied) output head are left alone, as
    `quantize` leaves them.

    **Arguments:**

    - `model`: any model whose linear layers are `equinox.nn.Linear`s applied through
      [`eqzoo.nn.apply_linear`][] (every eqzoo model) or called directly (`equinox.nn.MLP`).
    - `targets`: which layers (see [`eqzoo.nn.Targets`][]): `None`, every `equinox.nn.Linear`
      but the routers of mixture-of-experts layers (which `quantize` keeps float), or regexes
      searched in the dotted paths [`eqzoo.nn.linear_paths`][] lists. The expert arrays of a
      mixture-of-experts layer are not linear layers and are not wrapped: `quantize` rounds
      them after training, as it would without QAT.

    **Returns:** the wrapped model (paths such as `blocks.layers.attn.q_proj.base.weight`, which
    the default sharding rules place like the unwrapped weight). **Raises:** `ConfigError` if a
    target matches no linear layer or matches one that is not a plain `equinox.nn.Linear`
    (already wrapped or quantized), or if the model has no plain linear layer to wrap.
    """
    count = []

    def wrap(path, layer):
        if targets is None and path.split(".")[-1] == "router":
            return layer  # as quantize leaves it: float, so QAT and the deployed model agree
        count.append(path)
        return FakeQuantLinear(layer)

    out = replace_linears(model, wrap, targets=targets, kinds=(eqx.nn.Linear,), what="prepare_qat")
    if not count:
        raise ConfigError(
            "prepare_qat: the model has no plain equinox.nn.Linear layer to wrap (its linear "
            "layers are already wrapped, quantized or adapted, or it has none)."
        )
    return out
