"""The Vision Transformer: config validation, shapes and their errors, the patch embedding as a
strided convolution, scan against unrolled layers, the bf16 policy, training, parameter counts,
and logits against Hugging Face's `ViTForImageClassification` (random, nothing downloaded)."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqzoo import models, nn, train
from eqzoo._errors import ConfigError, ShapeError

TINY = models.get_config("tiny-vit")
LAYER_TOL = 1e-5  # fp32, single layers
MODEL_TOL = 1e-4  # fp32, whole models
BF16_TOL = 0.05  # bf16 vs fp32 logits, relative to the fp32 logits' scale (~3 significant digits)


def _images(config, n=4, seed=0):
    shape = (n, config.in_channels, config.image_size, config.image_size)
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@eqx.filter_jit
def _logits(model, x):
    return jax.vmap(model)(x)


@eqx.filter_jit
def _features(model, x):
    return model.features(x)


def _create(config, seed=0, **overrides):
    return models.create(config, key=jax.random.key(seed), **overrides)


@pytest.fixture(scope="module")
def tiny():
    return _create("tiny-vit")


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"patch_size": 3}, r"patch_size=3 must divide image_size=8 .*try patch_size in \[1, 2, 4, 8\]"),
        ({"num_heads": 3}, r"num_heads=3 must divide embed_dim=64; try num_heads in"),
        ({"pool": "max"}, r"pool must be one of \('cls', 'mean'\), got 'max'"),
        ({"remat": "some"}, r"unknown remat 'some'; choose from"),
        ({"scan_layers": "yes"}, r"scan_layers must be True, False or 'auto'"),
        ({"attention_backend": "flash"}, r"attention_backend must be one of"),
        ({"num_classes": 0}, r"ViTConfig: these must be positive, got \{'num_classes': 0\}"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(overrides, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(TINY, **overrides)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_num_params_counts_every_leaf(pool):
    config = dataclasses.replace(TINY, pool=pool, in_channels=3, num_classes=7)
    model = eqx.filter_eval_shape(models.ViT, config, key=jax.random.key(0))  # shapes only
    leaves = [x for x in jax.tree.leaves(model) if isinstance(x, jax.ShapeDtypeStruct)]
    assert sum(int(np.prod(x.shape)) for x in leaves) == config.num_params()
    assert (model.cls_token is None) == (pool == "mean")
    assert model.pos_embed.weight.shape == (config.seq_len, config.embed_dim)
    assert config.seq_len == 16 + (pool == "cls")


def test_vit_b16_has_the_published_size():
    # Dosovitskiy et al. (2021) report 86M; the exact count of ViT-B/16 with a 1000-class head.
    assert models.get_config("vit-b16").num_params() == 86_567_656
    assert models.get_config("vit-s16").num_params() == 22_050_664


# ------------------------------------------------------------------------------ shapes


def test_logits_shape_and_dtype(tiny):
    out = _logits(tiny, _images(TINY))
    assert out.shape == (4, 10) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((4, 1, 8, 8), r"got \(4, 1, 8, 8\)\. eqzoo models take one image: for a batch, wrap the call in jax\.vmap\(model\)"),
        ((1, 16, 16), r"learned for 8x8 images \(16 patches of 2x2\); resize the images"),
        ((8, 8, 1), r"The channels go first: transpose with x\.transpose\(2, 0, 1\)"),
        ((3, 8, 8), r"shape \(channels, height, width\) = \(1, 8, 8\); got \(3, 8, 8\)"),
    ],
)
def test_wrong_image_shapes_explain_the_fix(tiny, shape, match):
    with pytest.raises(ShapeError, match=match):
        tiny(jnp.zeros(shape))


def test_patch_embed_is_a_strided_convolution():
    rng = np.random.default_rng(0)
    layer = nn.PatchEmbed(3, 16, 4, key=jax.random.key(1))
    layer = eqx.tree_at(lambda m: m.bias, layer, jnp.asarray(rng.normal(size=16), jnp.float32))
    x = jnp.asarray(rng.normal(size=(3, 12, 8)), jnp.float32)

    @jax.jit
    def conv(x, w, b):  # (embed, rows, cols) -> (patches, embed), patches in row-major order
        out = jax.lax.conv_general_dilated(x[None], w, window_strides=(4, 4), padding="VALID")[0]
        return (out + b[:, None, None]).reshape(16, -1).T

    ours = eqx.filter_jit(lambda m, x: m(x))(layer, x)
    assert ours.shape == (6, 16)
    np.testing.assert_allclose(ours, conv(x, layer.weight, layer.bias), atol=LAYER_TOL, rtol=LAYER_TOL)
    with pytest.raises(ShapeError, match=r"multiples of patch_size=4; got \(3, 10, 8\)"):
        layer(jnp.zeros((3, 10, 8)))


def test_mean_pooling_is_the_average_of_the_patch_tokens():
    model = _create(TINY, pool="mean")
    x = _images(TINY, n=1)[0]
    tokens = eqx.filter_jit(lambda m, x: m.final_norm(m.blocks(m.tokens(x))))(model, x)
    assert tokens.shape == (16, 64)
    np.testing.assert_allclose(_features(model, x), tokens.mean(0), atol=LAYER_TOL)


def test_attention_is_bidirectional(tiny):
    # With causal attention the first token (the class token) would ignore every patch.
    x = _images(TINY, n=1)[0]
    y = x.at[:, -2:, -2:].add(1.0)  # change only the last patch
    assert not np.allclose(_features(tiny, x), _features(tiny, y))
    assert not tiny.blocks[0].attn.causal


# ------------------------------------------------------------------------------ layers, precision


def test_scan_equals_unrolled(tiny):
    x = _images(TINY)
    assert nn.resolve_scan(tiny.config.scan_layers)  # "auto" scans on CPU
    # The same parameters, the layers sliced out of the stack and run by a Python loop.
    unrolled = eqx.tree_at(lambda m: m.blocks, tiny, tiny.blocks.unstacked())
    assert not unrolled.blocks.scan
    np.testing.assert_allclose(_logits(tiny, x), _logits(unrolled, x), atol=LAYER_TOL, rtol=LAYER_TOL)


def test_bf16_policy_computes_in_bf16_and_stays_close(tiny):
    x = _images(TINY)
    ref = _logits(tiny, x)
    half = train.Precision.bf16().cast_to_compute(tiny)
    out = _logits(half, x)
    assert out.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    assert err < BF16_TOL * float(jnp.max(jnp.abs(ref))), err


def test_train_steps_lower_the_loss_under_the_bf16_policy(tiny):
    # bf16 compute, fp32 master weights (fp32 steps: the contract suite and the sharding test).
    batch = {"x": _images(TINY, n=16, seed=1), "y": jnp.arange(16, dtype=jnp.int32) % 10}
    optimizer = optax.adamw(3e-3)
    precision = train.Precision.bf16()
    model = jax.tree.map(lambda a: jnp.array(a, copy=True) if eqx.is_array(a) else a, tiny)  # steps donate
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes weak types
        state = train.TrainState.create(model, optimizer, key=jax.random.key(0), precision=precision)
        step = train.make_train_step(train.classification_loss, optimizer, precision=precision)
        losses = []
        for _ in range(10):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.75 * losses[0], losses  # 16 random images, being memorised
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(eqx.filter(state.model, eqx.is_inexact_array)))


# ------------------------------------------------------------------------------ Hugging Face


def _hf_vit(seed: int = 0):
    """A small random `transformers.ViTForImageClassification` whose LayerNorms and biases are
    random too (at their defaults, ones and zeros, a swapped norm or bias would go unseen)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=8, patch_size=2, num_channels=3, num_labels=5,
    )
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p) + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    return model


def _hf_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x)).logits.numpy()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    pytest.importorskip("safetensors")
    model = _hf_vit()
    folder = tmp_path_factory.mktemp("hf_vit")
    model.save_pretrained(folder, safe_serialization=True)  # config.json + model.safetensors
    return model, folder


def test_logits_match_transformers(hf_folder):
    import eqzoo.hf

    hf_model, folder = hf_folder
    model = eqzoo.hf.load_pretrained(folder)
    assert isinstance(model, models.ViT)
    c = model.config
    assert (c.image_size, c.patch_size, c.in_channels, c.num_classes, c.pool) == (8, 2, 3, 5, "cls")
    assert c.layer_norm_eps == 1e-12 and c.mlp_ratio == 2
    x = np.array(_images(c, n=6, seed=2))
    ours, theirs = np.asarray(_logits(model, jnp.asarray(x))), _hf_logits(hf_model, x)
    assert np.abs(theirs).max() > 1.0  # logits of a useful scale, so MODEL_TOL means something
    err = np.abs(ours - theirs).max()
    assert err < MODEL_TOL, f"max |eqzoo - transformers| logit = {err:.2e} >= {MODEL_TOL}"


def test_save_pretrained_round_trips_through_transformers(hf_folder, tmp_path):
    from safetensors.numpy import load_file

    import eqzoo.hf

    hf_model, folder = hf_folder
    eqzoo.hf.save_pretrained(eqzoo.hf.load_pretrained(folder), tmp_path)
    original, exported = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(np.array_equal(exported[k], original[k]) for k in original)  # bitwise
    transformers = pytest.importorskip("transformers")
    reloaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "ViTForImageClassification"
    x = np.array(_images(models.get_config(TINY, in_channels=3), n=2))
    np.testing.assert_array_equal(_hf_logits(reloaded, x), _hf_logits(hf_model, x))


def test_hf_refuses_what_it_cannot_represent(tmp_path):
    import eqzoo.hf

    base = {"architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64}
    with pytest.raises(eqzoo.hf.HFFormatError, match=r"hidden_act='gelu_new'.*exact \(erf\) GELU"):
        eqzoo.hf.config_from_hf({**base, "hidden_act": "gelu_new"})
    with pytest.raises(eqzoo.hf.HFFormatError, match=r"qkv_bias=False"):
        eqzoo.hf.config_from_hf({**base, "qkv_bias": False})
    with pytest.raises(eqzoo.hf.HFFormatError, match=r"image_size=\[224, 160\].*square images"):
        eqzoo.hf.config_from_hf({**base, "image_size": [224, 160]})
    mean = _create(TINY, pool="mean")
    with pytest.raises(eqzoo.hf.HFFormatError, match=r"pool='mean'.*Use pool='cls'"):
        eqzoo.hf.save_pretrained(mean, tmp_path)
