"""Int8 quantization: the rounding bound, whole models close to float, int8 storage, jit/vmap,
generation, QAT (straight-through gradients, training, exact conversion), targets, errors,
sharding and checkpoints."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqzoo
from eqzoo import quant, sharding as sh
from eqzoo._errors import ConfigError
from eqzoo.checkpoint import CheckpointMismatchError
from eqzoo.train import TrainState, cast_floating, lm_loss, make_train_step

from .helpers import _fwd, _of_type, _rel, _tokens

PRESETS = ["tiny-gpt2", "tiny-llama"]
# Relative error ||q(t) - f(t)|| / ||f(t)|| of the fp32 logits of a randomly initialised tiny
# model over 64 random tokens, measured over 3 seeds: tiny-gpt2 0.0060-0.0064, tiny-llama
# 0.0022-0.0025 (for scale: casting the float model to bfloat16 gives 0.0055 and 0.0049).
LOGITS_RTOL = 0.015


@functools.cache
def _model(preset="tiny-gpt2", **overrides):
    # Cached: models are immutable. Tests that donate buffers (train steps) build their own.
    return eqzoo.models.create(preset, key=jax.random.key(0), **overrides)


@functools.cache
def _quantized(preset="tiny-gpt2"):
    return quant.quantize(_model(preset))


# ----------------------------------------------------------------------------------- the rounding


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rounding_error_is_at_most_half_a_step_and_zero_rows_are_safe(dtype):
    w = jax.random.normal(jax.random.key(0), (3, 6, 40)) * jnp.array([1e-3, 1.0, 50.0])[:, None, None]
    w = w.at[1, 2].set(0.0).astype(dtype)  # an all-zero output row
    q, scale = quant.quantize_int8(w)
    assert q.dtype == jnp.int8 and q.shape == w.shape
    assert scale.dtype == dtype and scale.shape == (3, 6)
    q, s, w32 = np.asarray(q, np.int32), np.asarray(scale, np.float32), np.asarray(w, np.float32)
    assert np.all(np.abs(q) <= 127)
    err = np.abs(q * s[..., None] - w32)
    assert np.all(err <= s[..., None] / 2 * (1 + 1e-6) + 1e-30)
    assert s[1, 2] == 0 and np.all(q[1, 2] == 0)
    deq = np.asarray(quant.dequantize_int8(jnp.asarray(q, jnp.int8), scale))
    assert np.all(np.isfinite(deq)) and np.all(deq[1, 2] == 0)
    nonzero = np.ones((3, 6), bool)
    nonzero[1, 2] = False
    # The largest weight of each row uses (nearly) the whole int8 range.
    assert np.all(np.max(np.abs(q), axis=-1)[nonzero] >= 126)


def test_fake_quantize_is_the_rounded_weight_with_an_identity_gradient():
    w = jax.random.normal(jax.random.key(1), (5, 16))
    np.testing.assert_array_equal(
        np.asarray(quant.fake_quantize(w)), np.asarray(quant.dequantize_int8(*quant.quantize_int8(w)))
    )
    g = jax.grad(lambda w: jnp.sum(jnp.sin(quant.fake_quantize(w))))(w)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jnp.cos(quant.fake_quantize(w))), rtol=1e-6)


# ------------------------------------------------------------------------------ one layer


def test_quantized_linear_computes_its_dequantized_layer():
    lin = eqx.nn.Linear(24, 10, key=jax.random.key(0))
    layer = quant.QuantizedLinear(lin)
    assert layer.codes.dtype == jnp.int8 and layer.scale.shape == (10,) and layer.dtype == jnp.float32
    assert (layer.in_features, layer.out_features) == (24, 10)
    x = jax.random.normal(jax.random.key(1), (3, 5, 24))
    dense = quant.dequantize(layer)
    assert isinstance(dense, eqx.nn.Linear) and dense.weight.dtype == jnp.float32
    ref = x @ dense.weight.T + dense.bias
    np.testing.assert_allclose(np.asarray(eqzoo.nn.apply_linear(layer, x)), np.asarray(ref), rtol=1e-5, atol=1e-6)
    # equinox.nn.MLP-style call on one vector goes through apply too
    np.testing.assert_allclose(np.asarray(layer(x[0, 0])), np.asarray(ref[0, 0]), rtol=1e-5, atol=1e-6)
    # and the float layer is close: per-weight error <= scale / 2
    np.testing.assert_allclose(np.asarray(layer.apply(x)), np.asarray(jax.vmap(jax.vmap(lin))(x)), atol=0.02)


def test_reading_weight_of_an_int8_layer_fails_and_says_what_to_use():
    # A model of one's own that multiplies by `self.proj.weight` would compute with the codes,
    # up to 127 / max|w| times the weight (measured: outputs off by ~2000 on this one), so the
    # int8 layer has `codes`, and `.weight` raises, naming what to use.
    class Own(eqx.Module):
        proj: eqx.nn.Linear

        def __call__(self, x):
            return self.proj.weight @ x + self.proj.bias

    own = Own(eqx.nn.Linear(64, 32, key=jax.random.key(0)))
    q = quant.quantize(own)
    x = jax.random.normal(jax.random.key(1), (64,))
    with pytest.raises(AttributeError, match=r"QuantizedLinear has no `weight`: it holds int8 `codes` and .*`scale`.*as_linear\(\)\.weight"):
        q(x)
    with pytest.raises(AttributeError, match="no `weight`"):
        eqx.filter_jit(lambda m, v: m(v))(q, x)  # at trace time too
    assert not hasattr(q.proj, "weight") and q.proj.codes.dtype == jnp.int8
    dense = q.proj.as_linear()  # the documented way to the float weight
    np.testing.assert_allclose(np.asarray(dense.weight @ x + dense.bias), np.asarray(q.proj(x)), rtol=1e-5, atol=1e-6)


def test_quantize_works_on_plain_equinox_models():
    mlp = eqx.nn.MLP(8, 3, width_size=16, depth=2, key=jax.random.key(0))
    q = quant.quantize(mlp)
    assert len(_of_type(q, quant.QuantizedLinear)) == 3
    x = jax.random.normal(jax.random.key(1), (8,))
    assert _rel(_fwd(q, x), _fwd(mlp, x)) < 0.02


# ---------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("preset", PRESETS)
def test_quantized_model_is_close_stores_int8_and_leaves_embeddings_alone(preset):
    model, q = _model(preset), _quantized(preset)
    tokens = _tokens()
    logits, ref = _fwd(q, tokens), _fwd(model, tokens)
    assert logits.dtype == jnp.float32
    assert _rel(logits, ref) < LOGITS_RTOL
    # every projection is int8; the stacked layer axis is kept
    layers = _of_type(q, quant.QuantizedLinear)
    assert len(layers) == len(eqzoo.nn.linear_paths(model))
    n = model.config.num_layers
    for layer in layers:
        assert layer.codes.dtype == jnp.int8 and layer.codes.shape == (n, layer.out_features, layer.in_features)
        assert layer.scale.dtype == jnp.float32 and layer.scale.shape == (n, layer.out_features)
    assert q.embed.weight is model.embed.weight  # embeddings (and the tied head) untouched
    # the linear weights take ~4x fewer bytes than fp32 (the scales add 4 bytes per row)
    dense_bytes = sum(4 * x.codes.size for x in layers)
    int8_bytes = sum(x.codes.size + 4 * x.scale.size for x in layers)
    assert 3.7 < dense_bytes / int8_bytes <= 4
    report, float_report = quant.size_report(q), quant.size_report(model)
    assert report["int8_bytes"] == sum(x.codes.size for x in layers)
    assert report["dense_bytes"] == float_report["total_bytes"] == float_report["dense_bytes"]
    assert report["total_bytes"] < float_report["total_bytes"] and float_report["ratio"] == 1.0
    # the same figures from an abstract model, without building it
    abstract = eqx.filter_eval_shape(lambda k: quant.quantize(eqzoo.models.create(preset, key=k)), jax.random.key(0))
    assert quant.size_report(abstract) == report
    # and back: the float structure, each weight within half a step of the original
    back = quant.dequantize(q)
    assert jax.tree.structure(back) == jax.tree.structure(model)
    w, w0 = back.blocks.layers.attn.o_proj.weight, model.blocks.layers.attn.o_proj.weight
    step = q.blocks.layers.attn.o_proj.scale[..., None]
    assert w.dtype == jnp.float32 and bool(jnp.all(jnp.abs(w - w0) <= step / 2 * (1 + 1e-6)))


def test_quantized_model_under_jit_and_vmap():
    q = _quantized("tiny-llama")
    batch = jnp.stack([_tokens(16, seed=s) for s in range(3)])
    out = jax.jit(jax.vmap(q))(batch)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(_fwd(q, batch[i])), rtol=1e-5, atol=1e-5)
    # quantizing inside a trace works too
    inside = eqx.filter_jit(lambda m, t: quant.quantize(m)(t))(_model("tiny-llama"), batch[0])
    np.testing.assert_allclose(np.asarray(inside), np.asarray(out[0]), rtol=1e-5, atol=1e-5)


def test_generation_runs_with_a_float_cache_and_tracks_the_float_model():
    model, q = _model(), _quantized()
    prompt = jnp.array([5, 17, 42, 99, 3, 7], jnp.int32)
    assert q.init_cache(16).keys.dtype == jnp.float32  # sized by the float dtype, not int8
    out = eqzoo.generate(q, prompt, max_new_tokens=8)
    assert out.shape == (14,) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out[:6]), np.asarray(prompt))
    # unrolled decoding (the GPU default: each layer's int8 slice taken out of the stack once)
    unrolled = eqzoo.generation.generate_batch(q, prompt[None], max_new_tokens=8, unroll_layers=True)[0]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(unrolled))
    # the logits of the first generated token are those of the float model, to LOGITS_RTOL
    assert _rel(_fwd(q, prompt)[-1], _fwd(model, prompt)[-1]) < LOGITS_RTOL
    # teacher-forced greedy choices agree with the float model's (measured: 64/64 positions)
    tokens = _tokens()
    agree = np.mean(np.asarray(_fwd(q, tokens).argmax(-1)) == np.asarray(_fwd(model, tokens).argmax(-1)))
    assert agree >= 0.9


def test_bfloat16_model_keeps_bfloat16_scales_and_cache():
    model = cast_floating(_model("tiny-llama"), jnp.dtype(jnp.bfloat16))
    q = quant.quantize(model)
    layer = q.blocks.layers.attn.q_proj
    assert layer.codes.dtype == jnp.int8 and layer.scale.dtype == jnp.bfloat16 and layer.dtype == jnp.bfloat16
    assert q.init_cache(8).keys.dtype == jnp.bfloat16
    tokens = _tokens(32)
    out = _fwd(q, tokens)
    assert out.dtype == jnp.bfloat16
    # measured 0.0054 against the fp32 model (bf16 alone: 0.0049)
    assert _rel(out.astype(jnp.float32), _fwd(_model("tiny-llama"), tokens)) < LOGITS_RTOL
    assert quant.dequantize(q).blocks.layers.attn.q_proj.weight.dtype == jnp.bfloat16


# --------------------------------------------------------------------------------- targets, errors


def test_targets_select_layers_by_path():
    model = _model("tiny-llama")
    q = quant.quantize(model, targets=r"mlp\.")
    assert all(isinstance(getattr(q.blocks.layers.mlp, n), quant.QuantizedLinear) for n in ("gate", "up", "down"))
    assert all(isinstance(getattr(q.blocks.layers.attn, n), eqx.nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    # the rest can be quantized later
    both = quant.quantize(q)
    assert len(_of_type(both, quant.QuantizedLinear)) == 7
    with pytest.raises(ConfigError, match=r"match no linear layer.*blocks\.layers\.attn\.q_proj"):
        quant.quantize(model, targets="qproj")
    with pytest.raises(ConfigError, match="does not compile"):
        quant.quantize(model, targets="(")


def test_quantizing_twice_is_refused():
    q = _quantized()
    with pytest.raises(ConfigError, match=r"already quantized.*eqzoo\.quant\.dequantize"):
        quant.quantize(q)
    with pytest.raises(ConfigError, match=r"\['blocks\.layers\.attn\.q_proj'\] are already quantized"):
        quant.quantize(q, targets="q_proj")
    with pytest.raises(ConfigError, match="nothing to dequantize"):
        quant.dequantize(_model())


class _Wrapped(eqzoo.nn.AbstractLinear):
    # Some other wrapper of a linear layer (as eqzoo.peft.LoRALinear is).
    base: eqx.nn.Linear
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(self, base):
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features

    @property
    def dtype(self):
        return self.base.weight.dtype

    def apply(self, x):
        return eqzoo.nn.apply_linear(self.base, x)


def test_bad_weights_are_refused():
    lin = eqx.nn.Linear(4, 3, key=jax.random.key(0))
    ints = eqx.tree_at(lambda m: m.weight, lin, jnp.ones((3, 4), jnp.int32))
    with pytest.raises(ConfigError, match=r"0 has a weight of dtype int32; only floating-point weights"):
        quant.quantize([ints])
    with pytest.raises(ConfigError, match="trains floating-point weights; got dtype int32"):
        quant.FakeQuantLinear(ints)
    with pytest.raises(ConfigError, match="'scalar' features"):
        quant.QuantizedLinear(eqx.nn.Linear("scalar", 3, key=jax.random.key(0)))
    with pytest.raises(ConfigError, match=r"no float linear layer to quantize; its linear layers are none\.$"):
        quant.quantize({"w": jnp.ones(3)})
    with pytest.raises(ConfigError, match=r"0 \(_Wrapped\)'\]\. Quantize before wrapping layers"):
        quant.quantize([_Wrapped(lin)])  # e.g. a LoRA adapter
    # Some layers adapted: they stayed float beside the quantized rest, silently.
    with pytest.raises(ConfigError, match=r"\['1 \(_Wrapped\)'\] \(1 layer\(s\)\) wrap their linear layers and would stay "
                       r"float.*eqzoo.quant.quantize\(eqzoo.peft.merge\(model\)\).*Quantize before wrapping"):
        quant.quantize([lin, _Wrapped(lin)])
    assert isinstance(quant.quantize([lin, _Wrapped(lin)], targets="^0$")[0], quant.QuantizedLinear)
    diverged = eqx.tree_at(lambda m: m.weight, lin, lin.weight.at[1, 2].set(jnp.nan).at[0, 0].set(jnp.inf))
    with pytest.raises(ConfigError, match=r"the weight holds 2 NaN or infinite value\(s\)"):
        quant.quantize([diverged])


# -------------------------------------------------------------------------------------------- QAT


def test_qat_gradient_is_the_straight_through_gradient():
    lin = eqx.nn.Linear(12, 7, key=jax.random.key(0))
    layer = quant.FakeQuantLinear(lin)
    x = jax.random.normal(jax.random.key(1), (4, 12))

    def loss(layer):
        return jnp.sum(jnp.tanh(eqzoo.nn.apply_linear(layer, x)) ** 2)

    grad = eqx.filter_jit(eqx.filter_grad(loss))
    grads = grad(layer)
    # the plain layer's gradient, taken at the fake-quantized weight
    at_rounded = eqx.tree_at(lambda m: m.weight, lin, quant.fake_quantize(lin.weight))
    ref = grad(at_rounded)
    np.testing.assert_allclose(np.asarray(grads.base.weight), np.asarray(ref.weight), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads.base.bias), np.asarray(ref.bias), rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(grads.base.weight))) > 0
    # ... which is not the gradient at the float weight
    assert float(jnp.max(jnp.abs(grads.base.weight - grad(lin).weight))) > 1e-6


@pytest.mark.parametrize("preset", PRESETS)
def test_quantize_of_a_qat_model_computes_the_qat_model(preset):
    qat = quant.prepare_qat(_model(preset))
    assert "blocks.layers.attn.q_proj" in eqzoo.nn.linear_paths(qat)
    assert qat.blocks.layers.attn.q_proj.base.weight.shape == (2, 64, 64)
    tokens = _tokens(32)
    ref = _fwd(qat, tokens)
    # fp32 whole model: 1e-5 (measured max |diff| 3e-7)
    np.testing.assert_allclose(np.asarray(_fwd(quant.quantize(qat), tokens)), np.asarray(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(_fwd(quant.dequantize(qat), tokens)), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_qat_training_lowers_the_loss_and_converts_exactly():
    qat = quant.prepare_qat(_model())
    optimizer = optax.adam(3e-3)
    state = TrainState.create(qat, optimizer, key=jax.random.key(2))
    step = make_train_step(lm_loss, optimizer, donate=False)  # the cached model's buffers stay
    toks = np.random.default_rng(0).integers(0, 256, (4, 17)).astype(np.int32)
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:]}
    losses = []
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction assumes it
        for _ in range(6):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    trained = state.model
    assert isinstance(trained.blocks.layers.attn.q_proj, quant.FakeQuantLinear)
    assert trained.blocks.layers.attn.q_proj.base.weight.dtype == jnp.float32
    assert not np.array_equal(np.asarray(trained.blocks.layers.attn.q_proj.base.weight),
                              np.asarray(qat.blocks.layers.attn.q_proj.base.weight))
    # the trained QAT model converts to int8 computing the same outputs
    converted = quant.quantize(trained)
    assert converted.blocks.layers.mlp.down.codes.dtype == jnp.int8
    tokens = _tokens(32)
    np.testing.assert_allclose(np.asarray(_fwd(converted, tokens)), np.asarray(_fwd(trained, tokens)), rtol=1e-5, atol=1e-5)


def test_prepare_qat_targets_and_errors():
    qat = quant.prepare_qat(_model(), targets="attn")
    assert isinstance(qat.blocks.layers.attn.v_proj, quant.FakeQuantLinear)
    assert isinstance(qat.blocks.layers.mlp.up, eqx.nn.Linear)
    with pytest.raises(ConfigError, match="no plain equinox.nn.Linear layer to wrap"):
        quant.prepare_qat(quant.prepare_qat(_model()))
    with pytest.raises(ConfigError, match=r"attn\.q_proj is a FakeQuantLinear, not one of \['Linear'\]"):
        quant.prepare_qat(qat, targets="q_proj")
    with pytest.raises(ConfigError, match="match no linear layer"):
        quant.prepare_qat(_model(), targets="nothing_here")


# ---------------------------------------------------------------------- sharding, checkpoints, hf


def test_sharded_quantized_model_matches_one_device():
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    q = quant.quantize(eqzoo.models.create("tiny-llama", key=jax.random.key(0), num_heads=8, num_kv_heads=4))
    placed = sh.shard(q, mesh)
    q_proj = placed.blocks.layers.attn.q_proj
    assert q_proj.codes.dtype == jnp.int8
    assert q_proj.codes.sharding.spec == jax.P(None, "tensor", "fsdp")  # the float weight's layout
    assert q_proj.scale.sharding.spec == jax.P(None, "tensor")
    assert placed.blocks.layers.mlp.down.codes.sharding.spec == jax.P(None, "fsdp", "tensor")
    tokens = _tokens(16)
    forward = eqx.filter_jit(lambda m, t: m(t))
    np.testing.assert_allclose(np.asarray(forward(placed, tokens)), np.asarray(forward(q, tokens)), rtol=1e-5, atol=1e-5)
    # a QAT model's float weights are placed like the unwrapped ones
    qat = quant.prepare_qat(_model("tiny-llama"))
    specs = sh.partition_specs(qat, sh.default_rules(qat))
    assert specs.blocks.layers.attn.q_proj.base.weight == jax.P(None, "tensor", "fsdp")


def test_weights_round_trip_keeps_int8(tmp_path):
    pytest.importorskip("safetensors")
    q = _quantized("tiny-llama")
    path = tmp_path / "q.safetensors"
    eqzoo.checkpoint.save_weights(q, path)
    like = eqx.filter_eval_shape(lambda k: quant.quantize(eqzoo.models.create("tiny-llama", key=k)), jax.random.key(1))
    back = eqzoo.checkpoint.load_weights(like, path)
    assert back.blocks.layers.attn.q_proj.codes.dtype == jnp.int8
    for a, b in zip(jax.tree.leaves(eqx.filter(back, eqx.is_array)), jax.tree.leaves(eqx.filter(q, eqx.is_array)), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the fix named for a weights file is load_weights of a quantized target (it was a
    # training checkpoint's abstract_state(..., optimizer), which a file has no use for)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)q_proj\.scale: found float32\(2, 64\), not in the model.*holds int8 layers .*"
                       r"e\.g\. load_weights\(equinox\.filter_eval_shape\(lambda: eqzoo\.quant\.quantize\(eqzoo\.models\.create\(config, key=jax\.random\.key\(0\)\)\)\), path\)\.$"):
        eqzoo.checkpoint.load_weights(_model("tiny-llama"), path)


class _QuantizedLinearBeforeRename(eqx.Module):
    # QuantizedLinear's arrays as eqzoo wrote them before `weight` became `codes`.
    weight: jax.Array
    scale: jax.Array
    bias: jax.Array | None


def _before_rename(model):
    def old(x):
        return _QuantizedLinearBeforeRename(x.codes, x.scale, x.bias) if isinstance(x, quant.QuantizedLinear) else x

    return jax.tree.map(old, model, is_leaf=lambda x: isinstance(x, quant.QuantizedLinear))


def test_files_and_checkpoints_written_before_the_codes_rename_restore_unchanged(tmp_path):
    pytest.importorskip("safetensors")
    q = _quantized("tiny-llama")
    old = _before_rename(q)
    assert "blocks.layers.attn.q_proj.weight" in {sh.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(old)[0]}
    like = eqx.filter_eval_shape(lambda k: quant.quantize(eqzoo.models.create("tiny-llama", key=k)), jax.random.key(1))

    def same(a, b):
        for x, y in zip(jax.tree.leaves(eqx.filter(a, eqx.is_array)), jax.tree.leaves(eqx.filter(b, eqx.is_array)), strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # weights-only files: the int8 `weight` is read into `codes`
    eqzoo.checkpoint.save_weights(old, tmp_path / "old.safetensors")
    same(eqzoo.checkpoint.load_weights(like, tmp_path / "old.safetensors"), q)
    # a whole training state through orbax
    optimizer = optax.sgd(0.1)
    with eqzoo.checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(TrainState.create(old, optimizer, key=jax.random.key(2)))
        ckpt.wait()
    target = TrainState.create(quant.quantize(eqzoo.models.create("tiny-llama", key=jax.random.key(3))), optimizer, key=jax.random.key(2))
    with eqzoo.checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        restored = ckpt.restore(target).state
    same(restored.model, q)
    # only the old layout of the same layer is read so: an int8 `weight` of another shape is refused
    small = _before_rename(quant.quantize(eqzoo.models.create("tiny-llama", key=jax.random.key(0), embed_dim=32, num_heads=2, num_kv_heads=2)))
    eqzoo.checkpoint.save_weights(small, tmp_path / "small.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"q_proj\.codes: expected int8\(2, 64, 64\), not in the file"):
        eqzoo.checkpoint.load_weights(like, tmp_path / "small.safetensors", allow_config_change=True)


def test_restoring_int8_into_float_and_back_says_to_quantize(tmp_path):
    optimizer = optax.sgd(0.1)
    with eqzoo.checkpoint.Checkpointer(tmp_path / "int8") as ckpt:
        ckpt.save(TrainState.create(_quantized("tiny-llama"), optimizer, key=jax.random.key(2)))
        ckpt.wait()
        # the saved config is the float model's: a target built from it alone is float
        with pytest.raises(CheckpointMismatchError, match=r"(?s)q_proj\.codes: found int8.*holds int8 layers.*eqzoo\.quant\.quantize\(eqzoo\.models\.create"):
            ckpt.restore(eqzoo.checkpoint.abstract_state(ckpt.meta().config, optimizer))
        int8_target = eqzoo.checkpoint.abstract_state(lambda k: quant.quantize(eqzoo.models.create("tiny-llama", key=k)), optimizer)
        ckpt.restore(int8_target)
    with eqzoo.checkpoint.Checkpointer(tmp_path / "float") as ckpt:
        ckpt.save(TrainState.create(_model("tiny-llama"), optimizer, key=jax.random.key(2)))
        ckpt.wait()
        with pytest.raises(CheckpointMismatchError, match=r"(?s)q_proj\.codes: expected int8.*target has int8 layers.*restore the float model, then quantize"):
            ckpt.restore(int8_target)


def test_hf_export_refuses_int8_and_takes_the_dequantized_model(tmp_path):
    hf = pytest.importorskip("eqzoo.hf")
    with pytest.raises(hf.HFFormatError, match=r"QuantizedLinear.*eqzoo\.quant\.dequantize"):
        hf.save_pretrained(_quantized(), tmp_path / "bad")
    hf.save_pretrained(quant.dequantize(_quantized()), tmp_path / "ok")
    assert (tmp_path / "ok" / "config.json").is_file()


def test_quantized_mlp_preset_computes_in_float():
    # The MLP model casts its input to its first layer's dtype: the floating dtype, not int8.
    model = eqzoo.models.create("mlp-small", key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (model.config.in_features,))
    for converted in (quant.quantize(model), quant.prepare_qat(model)):
        out = converted(x)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), np.asarray(model(x)), atol=0.02)  # int8 rounding
        assert np.max(np.abs(np.asarray(out))) > 0.01


def test_float16_products_do_not_overflow_in_code_units():
    # x @ q.T is about 127 / max|w| times the layer's output; it is accumulated in float32, so a
    # float16 input with outliers gives what the float16 layer gives, not inf.
    k = jax.random.split(jax.random.key(0), 3)
    layer = eqx.nn.Linear(4096, 4, key=k[0])
    layer = eqx.tree_at(lambda lin: lin.weight, layer, 0.02 * jax.random.normal(k[1], (4, 4096)))
    layer = jax.tree.map(lambda a: a.astype(jnp.float16) if eqx.is_inexact_array(a) else a, layer)
    x = jax.random.normal(k[2], (4096,)).at[:4].set(1000.0).astype(jnp.float16)
    ref = np.asarray((x @ layer.weight.T + layer.bias).astype(jnp.float32))
    out = np.asarray(quant.QuantizedLinear(layer).apply(x).astype(jnp.float32))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.5)  # int8 rounding of 4096 terms


# ------------------------------------------------------------------------------ mixture of experts


def _mixtral(implementation="dense", **overrides):
    return eqzoo.models.create(
        "tiny-mixtral", key=jax.random.key(0), moe_implementation=implementation, moe_capacity_factor=2.0, **overrides
    )


def test_quantized_weight_rounds_each_column_within_half_a_step():
    w = jax.random.normal(jax.random.key(0), (3, 16, 8)).at[1, :, 2].set(0.0)  # (experts, in, out)
    q = quant.QuantizedWeight(w)
    assert q.codes.dtype == jnp.int8 and q.codes.shape == w.shape and q.scale.shape == (3, 8)
    assert q.shape == w.shape and q.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(q.scale), np.max(np.abs(np.asarray(w)), axis=1) / 127, rtol=1e-6)
    err = np.abs(np.asarray(q.materialize(jnp.float32)) - np.asarray(w))
    assert np.all(err <= np.asarray(q.scale)[:, None, :] / 2 + 1e-7)
    assert q.materialize(jnp.bfloat16).dtype == jnp.bfloat16
    assert np.all(np.asarray(q.codes)[1, :, 2] == 0)  # an all-zero column is safe
    with pytest.raises(ConfigError, match=r"QuantizedWeight quantizes floating-point weights; got dtype int32"):
        quant.QuantizedWeight(jnp.ones((2, 3), jnp.int32))


@pytest.mark.parametrize("implementation", ["dense", "capacity", "ragged"])
def test_quantized_mixtral_stores_int8_experts_and_stays_close(implementation):
    model = _mixtral(implementation)
    q = quant.quantize(model)
    mlp = q.blocks.layers.mlp
    for w in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert isinstance(w, quant.QuantizedWeight) and w.codes.dtype == jnp.int8
    assert isinstance(mlp.router, eqx.nn.Linear), "routers stay float by default"
    assert isinstance(q.blocks.layers.attn.q_proj, quant.QuantizedLinear)
    tokens = _tokens(24)
    forward = eqx.filter_jit(lambda m, t: m(t))
    ref, out = np.asarray(forward(model, tokens)), np.asarray(forward(q, tokens))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.015  # int8 rounding, as for dense models
    report = quant.size_report(q)
    assert report["quantized_params"] == sum(w.codes.size for w in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)) + sum(
        x.codes.size for x in (q.blocks.layers.attn.q_proj, q.blocks.layers.attn.k_proj, q.blocks.layers.attn.v_proj, q.blocks.layers.attn.o_proj)
    )
    assert report["ratio"] > 2.5  # fp32: the experts are 77% of tiny-mixtral


def test_experts_false_and_dequantize():
    model = _mixtral()
    kept = quant.quantize(model, experts=False)
    assert kept.blocks.layers.mlp.gate_proj.dtype == jnp.float32
    named = quant.quantize(model, targets="attn")  # targets name layers: experts left alone
    assert named.blocks.layers.mlp.gate_proj.dtype == jnp.float32
    assert isinstance(named.blocks.layers.attn.q_proj, quant.QuantizedLinear)
    q = quant.quantize(model)
    back = quant.dequantize(q)
    w = q.blocks.layers.mlp.down_proj
    np.testing.assert_array_equal(np.asarray(back.blocks.layers.mlp.down_proj), np.asarray(w.materialize(jnp.float32)))
    assert isinstance(back.blocks.layers.attn.q_proj, eqx.nn.Linear)


def test_quantized_mixtral_generates_and_shards():
    q = quant.quantize(_mixtral("ragged", num_heads=8, num_kv_heads=4))  # the shard_map path
    out = eqzoo.generate(q, _tokens(5), max_new_tokens=6)
    logits = eqx.filter_jit(lambda m, t: m(t))(q, out[:-1])
    np.testing.assert_array_equal(np.argmax(np.asarray(logits[4:]), -1), np.asarray(out[5:]))
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    placed = sh.shard(q, mesh)
    gate = placed.blocks.layers.mlp.gate_proj
    assert gate.codes.sharding.spec == jax.P(None, "expert", "fsdp", "tensor")  # the float experts' layout
    assert gate.scale.sharding.spec == jax.P(None, "expert", "tensor")
    assert placed.blocks.layers.mlp.down_proj.scale.sharding.spec == jax.P(None, "expert", "fsdp")
    tokens = jnp.stack([_tokens(16, seed) for seed in range(4)])

    @eqx.filter_jit
    def forward(m, t, mesh=None):
        with sh.activation_sharding(mesh):
            return sh.batch_vmap(m)(t)

    np.testing.assert_allclose(np.asarray(forward(placed, sh.shard_batch(tokens, mesh), mesh)), np.asarray(forward(q, tokens)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["dense", "capacity", "ragged"])
def test_qat_reaches_the_experts_and_quantize_computes_the_qat_model(implementation):
    # QAT once left the experts float while quantize rounded them: the deployed model computed
    # something QAT never trained. fp32 whole model: 1e-5 (the same rounded weights).
    model = _mixtral(implementation)
    qat = quant.prepare_qat(model)
    mlp = qat.blocks.layers.mlp
    for w in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert isinstance(w, quant.FakeQuantWeight) and w.base.dtype == jnp.float32
    assert isinstance(mlp.router, eqx.nn.Linear)  # float, as quantize leaves it
    tokens = _tokens(24)
    forward = eqx.filter_jit(lambda m, t: m(t))
    ref = np.asarray(forward(qat, tokens))
    assert _rel(ref, forward(quant.prepare_qat(model, experts=False), tokens)) > 1e-4  # the experts are rounded
    np.testing.assert_allclose(np.asarray(forward(quant.quantize(qat), tokens)), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(forward(quant.dequantize(qat), tokens)), ref, rtol=1e-5, atol=1e-5)
    # Straight-through: the experts' master weights get the gradient taken at the rounded weights.
    x = jax.random.normal(jax.random.key(3), (6, mlp.router.in_features))
    layer = jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, mlp)  # the first layer
    rounded = eqx.tree_at(lambda m: m.gate_proj, layer, layer.gate_proj.materialize(jnp.float32))
    loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731
    np.testing.assert_allclose(
        np.asarray(eqx.filter_grad(loss)(layer).gate_proj.base), np.asarray(eqx.filter_grad(loss)(rounded).gate_proj), rtol=1e-5, atol=1e-7
    )


def test_qat_experts_follow_quantize_targets():
    model = _mixtral()
    named = quant.prepare_qat(model, targets="attn")  # as quantize(targets="attn"): experts float
    assert named.blocks.layers.mlp.gate_proj.dtype == jnp.float32 and not isinstance(named.blocks.layers.mlp.gate_proj, quant.FakeQuantWeight)
    experts_only = quant.prepare_qat(model, targets="up_proj")
    assert isinstance(experts_only.blocks.layers.mlp.up_proj, quant.FakeQuantWeight)
    assert isinstance(experts_only.blocks.layers.attn.q_proj, eqx.nn.Linear)
    assert isinstance(quant.prepare_qat(model, experts=False).blocks.layers.mlp.gate_proj, jax.Array)
    with pytest.raises(ConfigError, match=r"prepare_qat: blocks\.layers\.mlp\.gate_proj is a FakeQuantWeight, not a float array"):
        quant.prepare_qat(experts_only, targets="attn", experts=True)
    with pytest.raises(ConfigError, match=r"prepare_qat: targets 'up_proj' name only expert weights, but experts=False"):
        quant.prepare_qat(model, targets="up_proj", experts=False)
    with pytest.raises(ConfigError, match=r"FakeQuantWeight trains floating-point weights; got dtype int32"):
        quant.FakeQuantWeight(jnp.ones((2, 3, 4), jnp.int32))


def test_hf_export_refuses_int8_experts(tmp_path):
    hf = pytest.importorskip("eqzoo.hf")
    with pytest.raises(hf.HFFormatError, match=r"blocks\.layers\.mlp\.gate_proj \(QuantizedWeight\).*eqzoo\.quant\.dequantize"):
        hf.save_pretrained(quant.quantize(_mixtral(), targets="attn", experts=True), tmp_path / "bad")


def test_targets_that_name_a_mixture_of_experts_layer_reach_its_experts():
    # "mlp" on a Mixtral quantized (or adapted) only its router, the opposite of what it means.
    from eqzoo import peft

    model = eqzoo.models.create("tiny-mixtral", key=jax.random.key(0))
    moe = quant.quantize(model, targets="mlp").blocks.layers.mlp
    assert isinstance(moe.gate_proj, quant.QuantizedWeight) and isinstance(moe.down_proj, quant.QuantizedWeight)
    assert isinstance(moe.router, eqx.nn.Linear)  # routers stay float unless named
    assert isinstance(quant.quantize(model, targets="router").blocks.layers.mlp.router, quant.QuantizedLinear)
    experts_only = quant.quantize(model, targets="up_proj")
    assert isinstance(experts_only.blocks.layers.attn.q_proj, eqx.nn.Linear)
    assert isinstance(experts_only.blocks.layers.mlp.up_proj, quant.QuantizedWeight)
    with pytest.raises(ConfigError, match="targeted expert weights are already quantized"):
        quant.quantize(experts_only, targets="mlp")
    with pytest.raises(ConfigError, match=r"are already quantized"):
        quant.quantize(quant.quantize(model))  # the float routers left alone do not hide it
    with pytest.raises(ConfigError, match=r"match no linear layer and no expert weights; .* its expert weights \['blocks\.layers\.mlp\.gate_proj'"):
        quant.quantize(model, targets="ffn")
    adapted = peft.lora(model, rank=2, targets="mlp", key=jax.random.key(1)).blocks.layers.mlp
    assert isinstance(adapted.router, peft.LoRALinear) and isinstance(adapted.gate_proj, peft.LoRAWeight)
    with pytest.raises(ConfigError, match=r"\['blocks\.layers\.attn\.q_proj \(LoRALinear\)', 'blocks\.layers\.attn\.v_proj \(LoRALinear\)'\] "
                       r"\(2 layer\(s\)\) wrap their linear layers and would stay float"):
        quant.quantize(peft.lora(model, rank=2, targets="q_proj|v_proj", experts=False, key=jax.random.key(1)))
    with pytest.raises(ConfigError, match=r"targets 'up_proj' name only expert weights, but experts=False"):
        quant.quantize(model, targets="up_proj", experts=False)
    # QAT leaves routers float, as quantize does: the deployed model's router is the trained one
    qat = quant.prepare_qat(model)
    assert isinstance(qat.blocks.layers.mlp.router, eqx.nn.Linear)
    assert isinstance(qat.blocks.layers.attn.q_proj, quant.FakeQuantLinear)
    assert isinstance(quant.quantize(qat).blocks.layers.mlp.router, eqx.nn.Linear)
