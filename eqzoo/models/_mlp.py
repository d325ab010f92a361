"""A multilayer perceptron for vector inputs."""

import dataclasses
from typing import no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._errors import ConfigError, ShapeError, check_floating, check_positive, shape_str
from .._typing import PRNGKey
from ..nn import linear_dtype
from ._validate import check_integer_fields

_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jax.nn.tanh, "silu": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """Hyperparameters of an [`eqzoo.models.MLP`][].

    **Arguments:** `in_features`, `out_features`, hidden `width`, `depth` (number of hidden
    layers), `activation` (`"relu"`, `"gelu"`, `"tanh"` or `"silu"`).
    """

    in_features: int = 64
    out_features: int = 10
    width: int = 128
    depth: int = 2
    activation: str = "relu"

    def __post_init__(self):
        check_integer_fields(self)
        check_positive("MLPConfig", in_features=self.in_features, out_features=self.out_features, width=self.width)
        if self.depth < 0:
            raise ConfigError(f"MLPConfig: depth must be >= 0, got {self.depth}.")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"MLPConfig: activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}.")

    def num_params(self) -> int:
        """Number of parameters."""
        sizes = [self.in_features] + [self.width] * self.depth + [self.out_features]
        return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per example, `6 N`."""
        return 6.0 * self.num_params()


class MLP(eqx.Module):
    """A fully connected network on one feature vector: `model(x) -> outputs`."""

    config: MLPConfig = eqx.field(static=True)
    net: eqx.nn.MLP

    def __init__(self, config: MLPConfig, *, key: PRNGKey):
        """**Arguments:** `config`, an [`eqzoo.models.MLPConfig`][]; `key`, a PRNG key."""
        self.config = config
        self.net = eqx.nn.MLP(
            config.in_features, config.out_features, config.width, config.depth,
            activation=_ACTIVATIONS[config.activation], key=key,
        )

    @no_type_check  # our check below explains batching better than a generic type error
    def __call__(self, x: Float[Array, " features"], *, key: PRNGKey | None = None) -> Float[Array, " out"]:
        """**Arguments:** `x`, one feature vector of size `in_features` (vmap for a batch).

        **Returns:** the `out_features` outputs (logits for classification).
        """
        if getattr(x, "ndim", None) != 1 or x.shape[0] != self.config.in_features:
            raise ShapeError(
                f"MLP takes one vector of shape ({self.config.in_features},); got "
                f"{shape_str(getattr(x, 'shape', ()))}. For a batch, wrap the call in jax.vmap(model)."
            )
        check_floating("MLP", x, "features", "Convert with x.astype(jnp.float32).")
        return self._forward(jnp.asarray(x))  # a NumPy vector is accepted like a JAX one

    def _forward(self, x: Float[Array, " features"]) -> Float[Array, " out"]:
        # Compute in the parameters' dtype (e.g. bf16 under a mixed-precision policy).
        # linear_dtype: the floating dtype even when the layer is int8 (eqzoo.quant) or adapted
        return self.net(x.astype(linear_dtype(self.net.layers[0])))
