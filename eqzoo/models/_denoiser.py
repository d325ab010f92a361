"""What the diffusion models (DiT, UNet) share: their interface, the timestep embedding, input checks."""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Real

from .._errors import ConfigError, ShapeError, check_floating, shape_str
from .._typing import PRNGKey
from ..nn import AbstractLinear, apply_linear, init_linear, linear_dtype
from ._validate import IMAGE_FIX


class AbstractDenoiser(eqx.Module):
    """A diffusion model's network: `model(x, t, label) -> prediction`, for one image.

    `x` is one noisy image `(channels, height, width)`, `t` its diffusion timestep (a scalar;
    integer-valued for the discrete schedules of [`eqzoo.diffusion`](../diffusion/), but any float works),
    `label` its class (an int32 scalar) or `None`. The prediction has the shape of `x`: the noise
    (epsilon) or the velocity v, whichever the model was trained against
    ([`eqzoo.diffusion.make_diffusion_loss`][]).

    Class-conditional models hold one extra, learned "null" class, index `null_label`
    (`= num_classes`), which stands for "no label": the loss swaps it in for a fraction of the
    labels, and classifier-free guidance contrasts it with the real label. A label outside
    `[0, num_classes]` raises `ConfigError` when it is concrete; a traced one (under `jax.jit` or
    `jax.vmap`) cannot be checked, and the embedding lookup then reads the null class's row for
    it (JAX wraps -1 to the last row and clamps indices past the end), so check data labels
    before the training step.
    """

    @property
    @abc.abstractmethod
    def null_label(self) -> int | None:
        """The index of the null class (`num_classes`), or `None` for an unconditional model."""

    @abc.abstractmethod
    def __call__(
        self,
        x: Float[Array, "channels height width"],
        t: Real[Array, ""] | float | int,
        label: Int[Array, ""] | int | None = None,
        *,
        key: PRNGKey | None = None,
    ) -> Float[Array, "channels height width"]:
        """The prediction for one noisy image at timestep `t` (see the class docstring)."""


def sinusoidal_embedding(t: Float[Array, ""], dim: int, max_period: float = 10000.0) -> Float[Array, " dim"]:
    """`[cos(t w_0), ..., cos(t w_{k-1}), sin(t w_0), ...]` with `w_i = max_period^(-i/k)`, `k = dim/2`
    (the Transformer's position encoding applied to the timestep; Ho et al., 2020)."""
    half = dim // 2
    freqs = jnp.asarray(np.exp(-math.log(max_period) * np.arange(half) / half), jnp.float32)
    angles = jnp.asarray(t, jnp.float32) * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)])


class TimestepEmbedding(eqx.Module):
    """A sinusoidal embedding of the timestep followed by `Linear -> SiLU -> Linear`."""

    first: eqx.nn.Linear | AbstractLinear
    second: eqx.nn.Linear | AbstractLinear
    frequency_dim: int = eqx.field(static=True)

    def __init__(self, frequency_dim: int, hidden_dim: int, out_dim: int, *, key: PRNGKey):
        """**Arguments:** sinusoid width `frequency_dim`, MLP `hidden_dim` and `out_dim`, `key`."""
        k1, k2 = jax.random.split(key)
        self.first = init_linear(frequency_dim, hidden_dim, use_bias=True, std=0.02, key=k1)
        self.second = init_linear(hidden_dim, out_dim, use_bias=True, std=0.02, key=k2)
        self.frequency_dim = frequency_dim

    def __call__(self, t: Float[Array, ""]) -> Float[Array, " embed"]:
        """**Arguments:** a scalar timestep. **Returns:** its embedding, in the params' dtype."""
        # linear_dtype, not first.weight: an int8 or adapted layer (eqzoo.quant, eqzoo.peft) has none
        h = sinusoidal_embedding(t, self.frequency_dim).astype(linear_dtype(self.first))
        return apply_linear(self.second, jax.nn.silu(apply_linear(self.first, h)))


def check_denoiser_inputs(
    model: str, x, t, label, *, channels: int, image_size: int, num_classes: int
) -> tuple[Array, Array, Array | None]:
    """Raise `ShapeError` unless `x` is one floating-point `(channels, image_size, image_size)`
    image, `t` a scalar and `label` an integer scalar (or `None`), and `ConfigError` unless a
    concrete label is in `[0, num_classes]` (the last being the null class); **returns** `(x, t, label)` as JAX
    arrays, with a `None` label replaced by the null class of a conditional model."""
    expected = (channels, image_size, image_size)
    shape = tuple(getattr(x, "shape", ()))
    if shape != expected:
        hint = (
            " eqzoo models take one image: for a batch, wrap the call in "
            "jax.vmap(model)(x, t, labels) (or in_axes=(0, 0, None) without labels)."
            if len(shape) == 4 and shape[1:] == expected
            else ""
        )
        raise ShapeError(f"{model} takes one image of shape {shape_str(expected)}; got {shape_str(shape)}.{hint}")
    check_floating(model, x, "images", IMAGE_FIX)
    x, t = jnp.asarray(x), jnp.asarray(t)  # a NumPy image is accepted like a JAX one
    if t.shape != ():
        raise ShapeError(
            f"{model} takes one scalar timestep t; got shape {shape_str(t.shape)}. For a batch of "
            "images with their own timesteps, vmap over both: jax.vmap(model)(x, t, labels)."
        )
    if num_classes == 0:
        if label is not None:
            raise ShapeError(f"{model} was built with num_classes=0 (unconditional); call it without a label.")
        return x, t, None
    if label is None:
        return x, t, jnp.asarray(num_classes, jnp.int32)
    label = jnp.asarray(label)
    if label.shape != () or not jnp.issubdtype(label.dtype, jnp.integer):
        raise ShapeError(
            f"{model} takes one integer class label (a scalar); got shape {shape_str(label.shape)} "
            f"and dtype {label.dtype}. For a batch, vmap over x, t and the labels together."
        )
    # The embedding lookup would read a wrong row silently: -1 wraps to the null class and JAX
    # clamps 99 to it. A traced label (under jit or vmap) cannot be read, so is not checked.
    if not isinstance(label, jax.core.Tracer) and not 0 <= int(label) <= num_classes:
        raise ConfigError(
            f"{model}: class label {int(label)} is not a class of this model; labels must be in "
            f"[0, {num_classes - 1}], or {num_classes} (or None) for the null class of "
            "classifier-free guidance."
        )
    return x, t, label
