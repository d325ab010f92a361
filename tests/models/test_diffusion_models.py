"""DiT and UNet: shapes, zero initialisation, the null class, scan vs unrolled, bf16, training,
parameter counts against the published models, and their error messages."""

import contextlib

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqzoo import diffusion, models, train
from eqzoo._errors import ConfigError, ShapeError

MODEL_TOL = 1e-4  # fp32, whole models
TINY = ["tiny-dit", "tiny-unet"]


@eqx.filter_jit
def _add(model, noise):
    return jax.tree.map(lambda x, n: x if n is None else x + n, model, noise, is_leaf=lambda n: n is None)


def _perturbed(model, seed, scale=0.05):
    """The model with noise added to every float leaf, so zero-initialised layers contribute
    (numpy noise, one compiled add: drawing it with jax.random would compile per shape)."""
    rng = np.random.default_rng(seed)
    noise = jax.tree.map(
        lambda x: (scale * rng.normal(size=x.shape)).astype(np.float32) if eqx.is_inexact_array(x) else None, model
    )
    return _add(model, noise)


def _inputs(config, n=3):
    x = jax.random.normal(jax.random.key(1), (n, config.in_channels, config.image_size, config.image_size))
    t = jnp.asarray([0, 250, 999][:n], jnp.int32)
    y = jnp.asarray([0, 3, 9][:n], jnp.int32)
    return x, t, y


@eqx.filter_jit
def _batched(model, x, t, y):
    return jax.vmap(model)(x, t, y)


MODELS = {}  # each tiny model built once for the module: initialisation compiles per shape


def _model(name):
    if name not in MODELS:
        MODELS[name] = models.create(name, key=jax.random.key(0))
    return MODELS[name]


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    model = _model(request.param)
    return request.param, model, _perturbed(model, 5)


def test_shapes_and_zero_init(tiny):
    name, model, perturbed = tiny
    x, t, y = _inputs(model.config)
    out = _batched(model, x, t, y)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert not np.any(np.asarray(out)), f"{name}: the zero-initialised output layer must give exactly 0"
    out = _batched(perturbed, x, t, y)
    assert np.all(np.isfinite(out)) and np.std(np.asarray(out)) > 1e-3


def test_timestep_and_label_matter_and_none_is_the_null_class(tiny):
    _, model, perturbed = tiny
    x, t, y = _inputs(model.config)
    base = _batched(perturbed, x, t, y)
    assert not np.allclose(base, _batched(perturbed, x, t + 7, y), atol=1e-4)
    assert not np.allclose(base, _batched(perturbed, x, t, (y + 1) % 10), atol=1e-4)
    null = jnp.full_like(y, model.null_label)
    unconditional = eqx.filter_jit(jax.vmap(lambda m, xi, ti: m(xi, ti), in_axes=(None, 0, 0)))(perturbed, x, t)
    np.testing.assert_allclose(unconditional, _batched(perturbed, x, t, null), atol=1e-6)
    assert model.null_label == model.config.num_classes == 10


def test_dit_scan_equals_unrolled():
    scanned = _perturbed(_model("tiny-dit"), 5)
    assert not isinstance(scanned.blocks.layers, tuple)
    unrolled = eqx.tree_at(lambda m: m.blocks, scanned, scanned.blocks.unstacked())  # a Python loop
    x, t, y = _inputs(scanned.config)
    np.testing.assert_allclose(_batched(unrolled, x, t, y), _batched(scanned, x, t, y), atol=MODEL_TOL, rtol=MODEL_TOL)
    # The config reaches the stack (shapes only, nothing compiled).
    shapes = eqx.filter_eval_shape(lambda k: models.create("tiny-dit", key=k, scan_layers=False, remat="full"), jax.random.key(0))
    assert shapes.blocks.scan is False and shapes.blocks.remat == "full"


def test_bf16_keeps_dtype_and_is_close(tiny):
    _, _, perturbed = tiny
    x, t, y = _inputs(perturbed.config)
    ref = np.asarray(_batched(perturbed, x, t, y))
    out = _batched(train.Precision.bf16().cast_to_compute(perturbed), x, t, y)
    assert out.dtype == jnp.bfloat16
    # bf16 keeps 8 bits of mantissa: a few percent of the output's scale.
    err = np.abs(np.asarray(out, np.float32) - ref).max()
    assert err < 0.05 * np.abs(ref).max(), err


def test_dit_quantizes_and_adapts_with_its_timestep_embedding():
    # The timestep MLP's first layer sets the embedding's dtype: read from the layer, not from
    # a `.weight` that an int8 (eqzoo.quant) or adapted (eqzoo.peft) layer does not have.
    from eqzoo import peft, quant

    perturbed = _perturbed(_model("tiny-dit"), 5)
    x, t, y = _inputs(perturbed.config)
    ref = np.asarray(_batched(perturbed, x, t, y))
    q = quant.quantize(perturbed)
    assert isinstance(q.time_embed.first, quant.QuantizedLinear)
    out = np.asarray(_batched(q, x, t, y))
    assert out.dtype == np.float32
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.015  # int8 rounding, as for the LMs
    adapted = peft.lora(perturbed, rank=2, key=jax.random.key(1))  # lora_b = 0: the base's function
    np.testing.assert_allclose(np.asarray(_batched(adapted, x, t, y)), ref, rtol=MODEL_TOL, atol=MODEL_TOL)
    qat = quant.prepare_qat(perturbed)
    np.testing.assert_allclose(np.asarray(_batched(quant.quantize(qat), x, t, y)), np.asarray(_batched(qat, x, t, y)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_a_few_train_steps_lower_the_loss(name):
    schedule = diffusion.NoiseSchedule.linear(100)
    model = jax.tree.map(lambda a: jnp.array(a, copy=True) if eqx.is_array(a) else a, _model(name))  # steps donate
    c = model.config
    # Structured data: each class a fixed random pattern in [-1, 1].
    patterns = jax.random.uniform(jax.random.key(2), (10, c.in_channels, c.image_size, c.image_size), minval=-1, maxval=1)
    y = jnp.arange(32, dtype=jnp.int32) % 10
    batch = {"x": patterns[y], "y": y}
    # A fixed draw of timesteps and noise to score with, before and after.
    t = jax.random.randint(jax.random.key(3), (32,), 0, 100, dtype=jnp.int32)
    noise = jax.random.normal(jax.random.key(4), batch["x"].shape)
    score = eqx.filter_jit(lambda m: diffusion.diffusion_loss(m, schedule, batch["x"], t, noise, y))
    before = float(score(model))
    assert before == pytest.approx(float(jnp.mean(noise**2)), rel=1e-6)  # the zero model predicts 0
    with jax.numpy_dtype_promotion("standard"):
        optimizer = optax.adam(3e-3)
        step = train.make_train_step(diffusion.make_diffusion_loss(schedule), optimizer)
        state = train.TrainState.create(model, optimizer, key=jax.random.key(0))
        for _ in range(25):
            state, metrics = step(state, batch)
    after = float(score(state.model))
    assert np.isfinite(float(metrics["loss"]))
    assert after < 0.8 * before, (before, after)


def _count(tree):
    return sum(x.size for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct))


def test_dit_xl2_matches_the_published_size():
    # DiT-XL/2 has 675,129,632 parameters as published (PyTorch's count), which includes the
    # fixed 256 x 1152 sin-cos table (a buffer here, not a parameter) and a second set of 4
    # output channels for the learned variance (not used by eqzoo's losses): 2*2*4*1152 + 16.
    config = models.get_config("dit-xl2")
    assert config.num_params() + 256 * 1152 + (16 * 1152 + 16) == 675_129_632
    model = eqx.filter_eval_shape(lambda k: models.create(config, key=k), jax.random.key(0))
    assert _count(model) == config.num_params()
    assert models.get_config("dit-s2").num_params() == pytest.approx(33e6, rel=0.01)  # DiT-S/2: 33 M


def test_unet_cifar10_matches_ddpm():
    assert models.get_config("unet-cifar10").num_params() == 35_746_307  # DDPM's CIFAR-10 model, 35.7 M


def _matmul_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract_dims, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract_dims])
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += times * _matmul_flops(sub)
    return total


def test_dit_flops_per_image_counts_the_matmuls():
    # Trace (never run) one image's gradient and count its matmul FLOPs; the formula is 6 x the
    # multiply-adds (the first layers' input gradients, which are not computed, are < 1%).
    config = models.get_config("dit-s2")
    model = eqx.filter_eval_shape(lambda k: models.create(config, key=k), jax.random.key(0))
    x = jax.ShapeDtypeStruct((config.in_channels, config.image_size, config.image_size), jnp.float32)

    def grads(m, x):
        return eqx.filter_grad(lambda m: jnp.sum(m(x, jnp.int32(5), jnp.int32(3))))(m)

    measured = _matmul_flops(jax.make_jaxpr(grads)(model, x).jaxpr)
    expected = config.flops_per_image()
    assert abs(measured - expected) <= 0.02 * expected, (measured, expected)


@pytest.mark.parametrize(
    "x_shape, t, label, match",
    [
        ((2, 1, 8, 8), 3, 1, r"got \(2, 1, 8, 8\).*jax.vmap\(model\)"),
        ((1, 6, 6), 3, 1, r"one image of shape \(1, 8, 8\)"),
        ((1, 8, 8), jnp.zeros((2,)), 1, "one scalar timestep"),
        ((1, 8, 8), 3, 1.5, "integer class label"),
    ],
)
@pytest.mark.parametrize("name", TINY)
def test_shape_errors(name, x_shape, t, label, match):
    model = _model(name)
    with pytest.raises(ShapeError, match=match):
        model(jnp.zeros(x_shape), t, label)


def test_out_of_range_labels_are_refused_and_the_null_label_allowed(tiny, unchecked):
    # -1 wrapped to the null class's embedding row and 99 was clamped to it: a silently
    # unconditional prediction for what the caller meant as a class.
    name, model, perturbed = tiny
    x = jax.random.normal(jax.random.key(1), (1, 8, 8))
    for label in (99, -1, jnp.int32(11), np.int64(-3)):
        for mode in (contextlib.nullcontext(), unchecked()):
            with mode, pytest.raises(
                ConfigError,
                match=rf"class label {int(label)} is not a class of this model; labels must be in \[0, 9\], or 10 \(or None\)",
            ):
                model(x, 3, label)
    forward = eqx.filter_jit(lambda m, x, label: m(x, jnp.int32(3), label))
    null = forward(perturbed, x, jnp.int32(model.null_label))
    np.testing.assert_allclose(null, forward(perturbed, x, None), atol=1e-6)  # fp32, same graph
    assert not np.allclose(null, forward(perturbed, x, jnp.int32(3)), atol=1e-4)
    # Traced labels cannot be checked; as documented, out-of-range ones read the null class.
    np.testing.assert_allclose(forward(perturbed, x, jnp.int32(99)), null, atol=1e-6)
    np.testing.assert_allclose(forward(perturbed, x, jnp.int32(-1)), null, atol=1e-6)


@pytest.mark.parametrize("checked", [True, False])
def test_images_must_be_floating_and_may_be_numpy(tiny, checked, unchecked):
    name, model, perturbed = tiny
    x = np.random.default_rng(0).normal(size=(1, 8, 8)).astype(np.float32)
    want = eqx.filter_jit(lambda m, x: m(x, jnp.int32(3), jnp.int32(1)))(perturbed, jnp.asarray(x))
    with contextlib.nullcontext() if checked else unchecked():
        # With checking on, a NumPy image was rejected by a private method's annotation (DiT).
        np.testing.assert_allclose(perturbed(x, 3, 1), want, atol=1e-5)  # fp32, eager vs jit
        # uint8 pixels were silently cast as 0..255 values (both modes, UNet; unchecked, DiT).
        with pytest.raises(ShapeError, match=r"takes floating-point images; got dtype uint8\. Convert with x\.astype\(jnp\.float32\) / 255"):
            model(np.zeros((1, 8, 8), np.uint8), 3, 1)


def test_unconditional_models_take_no_label():
    model = eqx.filter_eval_shape(lambda k: models.create("tiny-dit", key=k, num_classes=0), jax.random.key(0))
    assert model.null_label is None and model.label_embed is None
    assert eqx.filter_eval_shape(lambda m: m(jnp.zeros((1, 8, 8)), 3), model).shape == (1, 8, 8)
    with pytest.raises(ShapeError, match="num_classes=0"):
        model(jnp.zeros((1, 8, 8)), 3, 1)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: models.DiTConfig(image_size=8, patch_size=3), r"patch_size=3 must divide image_size=8; try patch_size in \[1, 2, 4, 8\]"),
        (lambda: models.DiTConfig(embed_dim=66, num_heads=6), "must be a multiple of 4"),
        (lambda: models.DiTConfig(num_heads=5), "num_heads=5 must divide embed_dim=1152"),
        (lambda: models.DiTConfig(num_classes=-1), "num_classes must be >= 0"),
        (lambda: models.DiTConfig(remat="some"), "unknown remat"),
        (lambda: models.DiTConfig(num_layers=0), "must be positive"),
        (lambda: models.UNetConfig(image_size=10, channel_mults=(1, 2, 2)), r"divisible by 2\*\*\(levels-1\)=4"),
        (lambda: models.UNetConfig(num_groups=48), "num_groups=48 must divide every level's channels"),
        (lambda: models.UNetConfig(attention_resolutions=(8, 3)), r"attention_resolutions \[3\] are not resolutions.*\(32, 16, 8, 4\)"),
        (lambda: models.UNetConfig(num_heads=3), "num_heads=3 must divide"),
        (lambda: models.UNetConfig(channel_mults=()), "channel_mults must be a non-empty tuple"),
    ],
)
def test_config_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
