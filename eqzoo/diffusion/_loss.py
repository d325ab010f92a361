"""The denoising training objective, as a loss function for `eqzoo.train.make_train_step`."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Integer

from .._errors import ConfigError, ShapeError, check_floating, shape_str
from .._typing import PRNGKey
from ..models import AbstractDenoiser
from ._schedule import NoiseSchedule, check_prediction, check_timesteps


def _apply(model: AbstractDenoiser, x: Array, t: Array, labels: Array | None) -> Array:
    """The model on a batch: one timestep (and label) per image."""
    null = model.null_label
    if labels is not None and null is not None and not isinstance(labels, jax.core.Tracer):
        # Checked here: inside the vmap below the model sees traced labels it cannot check.
        host = np.asarray(labels)
        if ((host < 0) | (host > null)).any():
            bad = sorted({int(v) for v in host.ravel() if not 0 <= v <= null})[:8]
            raise ConfigError(
                f"labels {bad} are not classes of this model: they must be in [0, {null}] "
                f"({null} is the null class, for unconditional samples)."
            )
    if labels is None:
        return jax.vmap(lambda xi, ti: model(xi, ti))(x, t)
    return jax.vmap(model)(x, t, labels)


def _check_images(x: Any) -> None:
    # Cast to float32 before the model sees them, integer pixels trained as floats in [0, 255]
    # without an error (the model itself refuses integer images).
    check_floating(
        "the diffusion loss",
        x,
        "images",
        "Scale them to the range the model should generate, e.g. x.astype(jnp.float32) / 127.5 - 1 "
        "for uint8 pixels in [0, 255].",
    )


def diffusion_loss(
    model: AbstractDenoiser,
    schedule: NoiseSchedule,
    x0: Float[Array, "batch channels height width"],
    t: Int[Array, " batch"],
    noise: Float[Array, "batch channels height width"],
    labels: Integer[Array, " batch"] | None = None,
    *,
    prediction: str = "epsilon",
) -> Float[Array, ""]:
    """The mean squared error of the model's prediction at given timesteps and noise.

    Noises each clean image, `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`, runs the model on
    `(x_t, t, label)` and compares with the target in float32: the noise itself
    (`prediction="epsilon"`, DDPM's "simple" loss) or the velocity
    `sqrt(abar_t) noise - sqrt(1 - abar_t) x0` (`"v"`).

    **Arguments:**

    - `model`: the denoiser ([`eqzoo.models.AbstractDenoiser`][]), called on one image.
    - `schedule`: the [`eqzoo.diffusion.NoiseSchedule`][].
    - `x0`: a batch of clean images.
    - `t`: one integer timestep per image, in `0 .. T-1` (`ConfigError` otherwise when `t` is
      concrete; a traced `t` is not checked, and JAX clamps or wraps an index outside).
    - `noise`: the standard normal noise added to each image, the shape of `x0`.
    - `labels`: one class label per image; `None`: the model's default (the null class for
      conditional models).
    - `prediction`: `"epsilon"` or `"v"`, what the model predicts.

    **Returns:** the scalar loss (float32).
    """
    check_prediction(prediction)
    _check_images(x0)
    if x0.ndim != 4:
        raise ShapeError(
            f"diffusion_loss takes a batch of images x0 of shape (batch, channels, height, width); "
            f"got {shape_str(x0.shape)}. For one image, pass x0[None] with t of shape (1,)."
        )
    n = x0.shape[0]
    if n == 0:  # the mean over no images was NaN
        raise ShapeError("diffusion_loss takes at least one image; got an empty batch (0 images).")
    if jnp.shape(t) != (n,):
        # A scalar t failed inside jax.vmap ("vmap was requested to map its argument along axis 0")
        raise ShapeError(
            f"diffusion_loss takes one timestep per image, t of shape ({n},); got "
            f"{shape_str(jnp.shape(t))}. For one timestep for all, jnp.full(({n},), t, jnp.int32)."
        )
    check_timesteps(schedule, "diffusion_loss", t)
    if jnp.shape(noise) != x0.shape:
        # (1, c, h, w) broadcast: every image got the same noise, silently
        raise ShapeError(
            f"diffusion_loss takes noise of the images' shape {shape_str(x0.shape)}, one draw per "
            f"image; got {shape_str(jnp.shape(noise))}. Draw it with jax.random.normal(key, x0.shape)."
        )
    x0 = x0.astype(jnp.float32)
    noise = noise.astype(jnp.float32)
    x_t = schedule.add_noise(x0, noise, t)
    target = noise if prediction == "epsilon" else schedule.velocity(x0, noise, t)
    pred = _apply(model, x_t, t, labels).astype(jnp.float32)
    return jnp.mean(jnp.square(pred - target))


def make_diffusion_loss(
    schedule: NoiseSchedule, *, prediction: str = "epsilon", label_dropout: float = 0.1
) -> Callable[[AbstractDenoiser, dict[str, Any], PRNGKey], Float[Array, ""]]:
    """A `loss_fn(model, batch, key)` for [`eqzoo.train.make_train_step`][] that trains a
    denoiser on batches `{"x": images, "y": labels}` (`"y"` optional).

    Each call draws, from `key`, one timestep per image uniformly from `0 .. T-1`, standard
    normal noise, and which labels to drop: with probability `label_dropout` an image's label is
    replaced by the model's null class, so the same network also learns the unconditional
    prediction that classifier-free guidance needs (Ho & Salimans, 2022). Then it returns
    [`eqzoo.diffusion.diffusion_loss`][]. Unconditional models (`null_label is None`) ignore
    `"y"`; conditional models given no `"y"` train on the null class only. Images must be
    floating point and labels integers (`ShapeError` and `ConfigError` otherwise).

    **Arguments:**

    - `schedule`: the [`eqzoo.diffusion.NoiseSchedule`][].
    - `prediction`: `"epsilon"` or `"v"`, what the model learns to predict.
    - `label_dropout`: probability of swapping a label for the null class, in `[0, 1]`.

    **Returns:** the loss function; it returns a float32 scalar.
    """
    check_prediction(prediction)
    if not 0.0 <= label_dropout <= 1.0:
        raise ConfigError(f"make_diffusion_loss: label_dropout must be in [0, 1], got {label_dropout}.")

    def loss_fn(model: AbstractDenoiser, batch: dict[str, Any], key: PRNGKey) -> Float[Array, ""]:
        x = batch["x"]
        _check_images(x)
        if x.ndim != 4:
            raise ShapeError(
                f"the diffusion loss takes a batch of images {{'x': (batch, channels, height, width)}}; "
                f"got x of shape {shape_str(x.shape)}."
            )
        k_t, k_noise, k_drop = jax.random.split(key, 3)
        n = x.shape[0]
        if n == 0:  # the mean over no images was NaN, and the step trained on it
            raise ShapeError("the diffusion loss takes at least one image; got batch['x'] of shape " f"{shape_str(x.shape)}.")
        t = jax.random.randint(k_t, (n,), 0, schedule.num_timesteps, dtype=jnp.int32)
        noise = jax.random.normal(k_noise, x.shape, jnp.float32)
        null = model.null_label
        labels = None
        if null is not None:
            if "y" in batch:
                labels = jnp.asarray(batch["y"])
                if not jnp.issubdtype(labels.dtype, jnp.integer):  # 2.7 became class 2, silently
                    raise ConfigError(
                        f"batch['y'] must hold integer class labels; got dtype {labels.dtype.name}. "
                        "Convert with y.astype(jnp.int32) once the values are whole class ids."
                    )
                labels = labels.astype(jnp.int32)
            else:
                labels = jnp.full((n,), null, jnp.int32)
            if labels.shape != (n,):
                raise ShapeError(
                    f"batch['y'] must hold one class label per image, shape ({n},); got {shape_str(labels.shape)}."
                )
            if label_dropout > 0:
                drop = jax.random.bernoulli(k_drop, label_dropout, (n,))
                labels = jnp.where(drop, jnp.int32(null), labels)
        return diffusion_loss(model, schedule, x, t, noise, labels, prediction=prediction)

    return loss_fn
