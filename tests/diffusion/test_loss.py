"""The denoising loss against a hand computation, and make_diffusion_loss's random draws."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo._errors import ConfigError, ShapeError
from eqzoo.diffusion import NoiseSchedule, diffusion_loss, make_diffusion_loss

from .denoisers import Affine

TOL = 1e-5  # float32, a mean of a few hundred squares


def _affine():
    return Affine(jnp.float32(0.7), jnp.float32(0.003), jnp.asarray([0.5, -1.0, 2.0, 0.25], jnp.float32))


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_loss_matches_hand_computation(prediction):
    sched = NoiseSchedule.linear(50)
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    noise = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    t = np.array([0, 7, 30, 49], np.int32)
    labels = np.array([0, 2, 3, 1], np.int32)
    model = _affine()
    got = diffusion_loss(model, sched, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise), jnp.asarray(labels), prediction=prediction)

    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 50))[t].reshape(4, 1, 1, 1)
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    pred = 0.7 * x_t + np.asarray([0.5, -1.0, 2.0, 0.25])[labels].reshape(4, 1, 1, 1) + 0.003 * t.reshape(4, 1, 1, 1)
    target = noise if prediction == "epsilon" else np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0
    assert float(got) == pytest.approx(np.mean((pred - target) ** 2), rel=TOL)


def test_label_dropout_swaps_in_the_null_class():
    sched = NoiseSchedule.linear(50)
    x = jax.random.normal(jax.random.key(0), (16, 1, 2, 2))
    y = jnp.arange(16, dtype=jnp.int32) % 3
    model, key = _affine(), jax.random.key(1)
    null = jnp.full((16,), model.null_label, jnp.int32)
    keep = make_diffusion_loss(sched, label_dropout=0.0)
    drop = make_diffusion_loss(sched, label_dropout=1.0)
    # Same key, same timesteps and noise: dropping every label is training on the null class.
    assert float(drop(model, {"x": x, "y": y}, key)) == float(keep(model, {"x": x, "y": null}, key))
    assert float(keep(model, {"x": x, "y": y}, key)) != float(keep(model, {"x": x, "y": null}, key))
    # No "y" at all: the null class too.
    assert float(keep(model, {"x": x}, key)) == float(keep(model, {"x": x, "y": null}, key))


def test_label_dropout_rate():
    # A model predicting 0 for real labels and 100 for the null class: the loss is
    # mean(noise^2) + 1e4 * (fraction dropped), so the fraction can be read off.
    sched = NoiseSchedule.linear(50)
    model = Affine(jnp.float32(0.0), jnp.float32(0.0), jnp.asarray([0.0, 0.0, 100.0], jnp.float32))
    x = jnp.zeros((8192, 1, 1, 1))
    y = jnp.zeros((8192,), jnp.int32)
    loss = make_diffusion_loss(sched, label_dropout=0.3)(model, {"x": x, "y": y}, jax.random.key(0))
    fraction = (float(loss) - 1.0) / 1e4  # binomial sd 0.005; mean(noise^2) = 1 +- 0.016
    assert abs(fraction - 0.3) < 0.02, fraction


def test_loss_errors():
    sched = NoiseSchedule.linear(10)
    with pytest.raises(ConfigError, match="prediction must be one of"):
        make_diffusion_loss(sched, prediction="x0")
    with pytest.raises(ConfigError, match="label_dropout must be in"):
        make_diffusion_loss(sched, label_dropout=1.5)
    with pytest.raises(ShapeError, match=r"got x of shape \(3, 4\)"):
        make_diffusion_loss(sched)(_affine(), {"x": jnp.zeros((3, 4))}, jax.random.key(0))
    with pytest.raises(ShapeError, match=r"batch\['y'\] must hold one class label per image, shape \(3,\); got \(2,\)"):
        make_diffusion_loss(sched)(_affine(), {"x": jnp.zeros((3, 1, 2, 2)), "y": jnp.zeros((2,), jnp.int32)}, jax.random.key(0))


@pytest.mark.parametrize("checked", [True, False])
def test_integer_images_and_float_labels_are_refused(checked, unchecked):
    # Both were cast silently: uint8 pixels trained as floats in [0, 255] (the model refuses
    # integer images, but it only saw the cast), and labels 2.7 as class 2.
    loss = make_diffusion_loss(NoiseSchedule.linear(10))
    x = jnp.zeros((3, 1, 2, 2))
    with contextlib.nullcontext() if checked else unchecked():
        with pytest.raises(ShapeError, match=r"diffusion loss takes floating-point images; got dtype uint8\. .*x\.astype\(jnp\.float32\) / 127\.5 - 1"):
            loss(_affine(), {"x": np.zeros((3, 1, 2, 2), np.uint8)}, jax.random.key(0))
        with pytest.raises(ConfigError, match=r"batch\['y'\] must hold integer class labels; got dtype float32\. Convert with y\.astype\(jnp\.int32\)"):
            loss(_affine(), {"x": x, "y": jnp.array([0.0, 1.0, 2.7])}, jax.random.key(0))
    with unchecked(), pytest.raises(ShapeError, match=r"floating-point images; got dtype int32"):
        diffusion_loss(_affine(), NoiseSchedule.linear(10), jnp.zeros((3, 1, 2, 2), jnp.int32), jnp.zeros(3, jnp.int32), x)


def test_concrete_out_of_range_labels_are_refused():
    # Inside the loss's vmap the model sees traced labels it cannot check: -1 would read the
    # null class's row and 99 be clamped to it, silently.
    sched = NoiseSchedule.linear(10)
    x, t = jnp.zeros((2, 1, 2, 2)), jnp.array([1, 2], jnp.int32)
    for bad, shown in (([0, 99], "[99]"), ([-1, 1], "[-1]")):
        with pytest.raises(ConfigError, match=rf"labels \{shown}\ are not classes of this model: they must be in \[0, 3\]"):
            diffusion_loss(_affine(), sched, x, t, jnp.zeros_like(x), jnp.asarray(bad, jnp.int32))
    # the null class (3) is a valid label
    assert np.isfinite(float(diffusion_loss(_affine(), sched, x, t, jnp.zeros_like(x), jnp.asarray([3, 0], jnp.int32))))


def test_diffusion_loss_refuses_timesteps_and_noise_that_do_not_fit(unchecked):
    # t = T trained at abar_{T-1} (JAX clamps the index) and noise of shape (1, c, h, w) gave
    # every image the same draw, both silently; a scalar t failed inside jax.vmap.
    sched = NoiseSchedule.linear(50)
    x0, noise, t = jnp.ones((3, 1, 2, 2)), jnp.zeros((3, 1, 2, 2)), jnp.array([0, 7, 49], jnp.int32)
    model = _affine()
    with pytest.raises(ConfigError, match=r"diffusion_loss: timesteps must lie in \[0, 49\] .*got t=50 at index \(2,\)"):
        diffusion_loss(model, sched, x0, t.at[2].set(50), noise)
    with unchecked():  # the annotations refuse these first when checking is on
        with pytest.raises(ShapeError, match=r"diffusion_loss takes noise of the images' shape \(3, 1, 2, 2\), one draw per image; got \(1, 1, 2, 2\)"):
            diffusion_loss(model, sched, x0, t, noise[:1])
        with pytest.raises(ShapeError, match=r"diffusion_loss takes one timestep per image, t of shape \(3,\); got \(\)\. .*jnp\.full"):
            diffusion_loss(model, sched, x0, jnp.int32(7), noise)
        with pytest.raises(ShapeError, match=r"diffusion_loss takes a batch of images x0 of shape \(batch, channels, height, width\); got \(1, 2, 2\)\. For one image, pass x0\[None\]"):
            diffusion_loss(model, sched, x0[0], t[:1], noise[0])
        with pytest.raises(ConfigError, match=r"diffusion_loss takes integer timesteps .*got dtype float32"):
            diffusion_loss(model, sched, x0, t.astype(jnp.float32), noise)
    assert np.isfinite(float(diffusion_loss(model, sched, x0, t, noise)))
    # an empty batch: the mean over no images was NaN, and a train step trained on it
    with pytest.raises(ShapeError, match=r"the diffusion loss takes at least one image; got batch\['x'\] of shape \(0, 1, 2, 2\)"):
        make_diffusion_loss(sched)(model, {"x": jnp.zeros((0, 1, 2, 2))}, jax.random.key(0))
    with unchecked(), pytest.raises(ShapeError, match=r"diffusion_loss takes at least one image"):
        diffusion_loss(model, sched, x0[:0], t[:0], noise[:0])
