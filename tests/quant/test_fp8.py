"""Fp8 training matmuls: the forward within e4m3's rounding of the float product, gradients within
e5m2's, fp8 casts in the lowered program, whole-batch scales under vmap, a tiny model trained
in bf16 with fp8 products tracking the bf16 run, the way back, and the errors."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import eqzoo
import eqzoo.checkpoint
import eqzoo.hf
from eqzoo import quant
from eqzoo._errors import ConfigError
from eqzoo.train import Precision, TrainState, lm_loss, make_train_step

# Rounding to a float format with m mantissa bits is within 2^-(m+1) relatively in its normal
# range, and within half the subnormal spacing absolutely below it (spacing 2^-9 for e4m3,
# 2^-16 for e5m2, in units of the scale). So each rounded entry satisfies
# |t^ - t| <= u |t| + a * scale, and a product of rounded operands
# |sum_k a^_k b^_k - a_k b_k| <= sum_k |a^_k - a_k| |b^_k| + |a_k| |b^_k - b_k|: the bound checked
# below, entry by entry (float32 accumulation adds ~1e-6 relative, far inside it).
E4M3 = (2.0**-4, 2.0**-10)  # (u, a): 3 mantissa bits
E5M2 = (2.0**-3, 2.0**-17)  # 2 mantissa bits


def _err(t, fmt, fmax):
    """The largest rounding error of each entry of `t` scaled per tensor to `fmax`."""
    u, a = fmt
    return u * np.abs(t) + a * np.abs(t).max() / fmax


def _bound(a, ea, b, eb):
    """Bound on |a^ @ b^ - a @ b| given entrywise error bounds `ea`, `eb`."""
    return ea @ (np.abs(b) + eb) + np.abs(a) @ eb


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 64)).astype(np.float32)
    x[0, 3, 5] = 40.0  # an outlier: most entries sit far below amax, as activations do
    w = (0.1 * rng.standard_normal((48, 64))).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w)


def test_fp8_product_is_within_e4m3_rounding_of_the_float_product():  # ~0.6 s
    x, w = _data()
    y = np.asarray(quant.fp8_matmul(x, w), np.float64).reshape(-1, 48)
    x2, w = np.asarray(x, np.float64).reshape(-1, 64), np.asarray(w, np.float64)
    ref = x2 @ w.T.astype(np.float64)
    bound = _bound(x2, _err(x2, E4M3, 448.0), w.T, _err(w, E4M3, 448.0).T)
    assert np.all(np.abs(y - ref) <= bound), np.max(np.abs(y - ref) / bound)
    assert 0.005 < np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.1  # really rounded to fp8

    # The same recipe emulated in numpy (ml_dtypes' e4m3fn rounding): equal to float32 accuracy.
    def emulated(fx=448.0, fd=448.0):
        q = [np.clip(t / (np.abs(t).max() / fx), -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
             for t in (x2, w)]
        return (q[0] @ q[1].T) * (np.abs(x2).max() / fd) * (np.abs(w).max() / fd)

    np.testing.assert_allclose(y, emulated(), rtol=1e-5, atol=1e-5)
    # ... and the bound is tight enough to catch a scale mistake: quantizing at amax / 224 but
    # rescaling at amax / 448 (2x off), amax / 896 (the top half saturates), no rescale.
    for wrong in (emulated(fx=224.0), emulated(fx=896.0, fd=896.0), emulated(fd=1.0)):
        assert np.any(np.abs(wrong - ref) > bound)


def test_fp8_gradients_are_within_e5m2_rounding_and_cast_to_fp8():  # ~1.5 s
    x, w = _data()
    cot = np.random.default_rng(1).standard_normal((2, 12, 48)).astype(np.float32)

    def loss(f, x, w):  # <f(x, w), cot>: its gradient with respect to the output is `cot`
        return jnp.sum(f(x, w) * cot)

    def per_example(x, w):  # as models run: one example per call, vmapped
        return jax.vmap(quant.fp8_matmul, in_axes=(0, None))(x, w)

    def summed(x, w):  # as the train step traces its gradient
        with eqzoo.nn.summed_weight_gradients():
            return jax.grad(lambda x, w: loss(per_example, x, w), argnums=(0, 1))(x, w)

    grad = jax.jit(summed)
    dx, dw = (np.asarray(g, np.float64) for g in grad(x, w))
    g2, x2 = cot.reshape(-1, 48).astype(np.float64), np.asarray(x, np.float64).reshape(-1, 64)
    w2 = np.asarray(w, np.float64)
    eg, ex, ew = _err(g2, E5M2, 57344.0), _err(x2, E4M3, 448.0), _err(w2, E4M3, 448.0)
    ref_dx, ref_dw = g2 @ w2, g2.T @ x2
    assert np.all(np.abs(dx.reshape(-1, 64) - ref_dx) <= _bound(g2, eg, w2, ew))
    assert np.all(np.abs(dw - ref_dw) <= _bound(g2.T, eg.T, x2, ex))
    assert np.linalg.norm(dw - ref_dw) / np.linalg.norm(ref_dw) > 0.005  # rounded, not float

    # In the train step's gradient the scales are the whole batch's, as the GPU's fp8 GEMM needs
    # (scalars): the per-example computation equals the one on the whole (2, 12, 64) tensor.
    whole = jax.jit(jax.grad(lambda x, w: loss(quant.fp8_matmul, x, w), argnums=(0, 1)))(x, w)
    np.testing.assert_array_equal(np.asarray(whole[1]), np.asarray(dw, np.float32))
    # Anywhere else each example is its own product with its own scales: outputs equal a loop
    # over the examples, and `vmap` of `grad` gives each its own weight gradient (not the sum).
    one = [quant.fp8_matmul(x[i], w) for i in range(2)]
    np.testing.assert_array_equal(np.asarray(per_example(x, w)), np.asarray(jnp.stack(one)))
    assert not np.array_equal(np.asarray(per_example(x, w)), np.asarray(quant.fp8_matmul(x, w)))  # the outlier's scale
    dw_one = jax.grad(lambda x, w, c: jnp.sum(quant.fp8_matmul(x, w) * c), argnums=1)
    each = jax.jit(jax.vmap(dw_one, (0, None, 0)))
    looped = [dw_one(x[i], w, cot[i]) for i in range(2)]
    np.testing.assert_allclose(np.asarray(each(x, w, cot)), np.asarray(jnp.stack(looped)), rtol=1e-5, atol=1e-5)  # float32 sums

    # The program really casts: e4m3 operands forward, an e5m2 gradient backward.
    forward = jax.jit(per_example).lower(x, w).as_text()
    backward = grad.lower(x, w).as_text()
    assert "f8E4M3FN" in forward and "f8E5M2" not in forward
    assert "f8E5M2" in backward and "f8E4M3FN" in backward
    assert "batching_dims" not in backward  # the weight gradient: one product, not one an example


def _tiny():
    return eqzoo.models.get_config("tiny-gpt2", embed_dim=32, num_layers=2)


def _train(model, steps, batch):
    optimizer = optax.adam(1e-2)
    state = TrainState.create(model, optimizer, key=jax.random.key(2))
    loss = functools.partial(lm_loss, implementation="full")  # compiles faster than "fused"
    step = make_train_step(loss, optimizer, precision=Precision.bf16())  # donating
    losses = []
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction assumes it
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return state.model, losses


def test_fp8_training_tracks_bf16_and_unwraps_to_the_trained_weights(create, tmp_path):  # ~9 s CPU
    toks = np.random.default_rng(0).integers(0, 256, (4, 33)).astype(np.int32)
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:]}
    _, bf16 = _train(create(_tiny(), key=jax.random.key(0)), 25, batch)
    fp8_model = quant.prepare_fp8(create(_tiny(), key=jax.random.key(0)))
    trained, fp8 = _train(fp8_model, 25, batch)
    # Measured (one batch, memorised): bf16 5.554 -> 0.478, fp8 5.554 -> 0.465. Within 0.15 of
    # each other at the end: 3% of what the run learns.
    assert fp8[-1] < fp8[0] - 2.0, fp8
    assert abs(fp8[-1] - bf16[-1]) < 0.15, (fp8[-1], bf16[-1])

    # The trained parameters are the float32 weights, which unwrap_fp8 gives back as they are,
    # and which the weights file holds under the wrapped paths.
    layer = trained.blocks.layers.mlp.up
    assert isinstance(layer, quant.Fp8Linear) and layer.base.weight.dtype == jnp.float32
    plain = quant.unwrap_fp8(trained)
    assert isinstance(plain.blocks.layers.mlp.up, eqx.nn.Linear)
    assert plain.blocks.layers.mlp.up.weight is layer.base.weight
    assert eqzoo.nn.linear_paths(plain) == eqzoo.nn.linear_paths(create(_tiny(), key=jax.random.key(0)))
    eqzoo.checkpoint.save_weights(trained, tmp_path / "w.safetensors")
    loaded = eqzoo.checkpoint.load_weights(fp8_model, tmp_path / "w.safetensors")
    np.testing.assert_array_equal(np.asarray(loaded.blocks.layers.mlp.up.base.weight), np.asarray(layer.base.weight))


def test_prepare_fp8_targets_and_errors(create, tmp_path):  # ~1 s
    model = create(_tiny(), key=jax.random.key(0))
    attn = quant.prepare_fp8(model, targets="attn")
    assert isinstance(attn.blocks.layers.attn.q_proj, quant.Fp8Linear)
    assert isinstance(attn.blocks.layers.mlp.up, eqx.nn.Linear)
    with pytest.raises(ConfigError, match="nothing to wrap: the selected layers are routers.*no plain equinox.nn.Linear layer"):
        quant.prepare_fp8(quant.prepare_fp8(model))
    with pytest.raises(ConfigError, match=r"attn\.q_proj is a Fp8Linear, not one of \['Linear'\]"):
        quant.prepare_fp8(attn, targets="q_proj")
    int8 = eqx.tree_at(lambda m: m.blocks.layers.mlp.up, model, quant.QuantizedLinear(model.blocks.layers.mlp.up))
    with pytest.raises(ConfigError, match=r"mlp\.up is a QuantizedLinear"):
        quant.prepare_fp8(int8, targets="mlp.up")
    with pytest.raises(ConfigError, match="match no linear layer"):
        quant.prepare_fp8(model, targets="nothing_here")
    ints = eqx.tree_at(lambda m: m.blocks.layers.mlp.up.weight, model,
                       model.blocks.layers.mlp.up.weight.astype(jnp.int8))
    with pytest.raises(ConfigError, match=r"mlp\.up has a weight of dtype int8; fp8 products need floating"):
        quant.prepare_fp8(ints)
    with pytest.raises(ConfigError, match="no Fp8Linear layer"):
        quant.unwrap_fp8(model)
    with pytest.raises(ConfigError, match="Fp8Linear computes with floating-point weights; got dtype int8"):
        quant.Fp8Linear(ints.blocks.layers.mlp.up)
    # quantize and the Hugging Face export refuse fp8 layers with the call that unwraps them
    with pytest.raises(ConfigError, match=r"Fp8Linear.*eqzoo\.quant\.quantize\(eqzoo\.quant\.unwrap_fp8\(model\)\)"):
        quant.quantize(quant.prepare_fp8(model))
    with pytest.raises(eqzoo.hf.HFFormatError, match=r"\(Fp8Linear\)'\]\. Unwrap fp8 training layers with eqzoo\.quant\.unwrap_fp8"):
        eqzoo.hf.save_pretrained(attn, tmp_path)
    # an all-zero input or weight is a zero product, not NaN (the scale guards amax = 0)
    zero = quant.fp8_matmul(jnp.zeros((3, 8)), jnp.ones((4, 8)))
    assert np.array_equal(np.asarray(zero), np.zeros((3, 4)))
