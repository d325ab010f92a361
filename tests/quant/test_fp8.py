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
import eqzoo.peft
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


def test_fp8_expert_products_are_within_fp8_rounding_and_batch_as_fp8_matmul():  # ~1.5 s
    # The experts' batched product "ecd,edh->ech" (each expert's slots times its weight), the
    # same entrywise bounds as the 2-D product, forward (e4m3) and backward (e5m2 gradient).
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 6, 32)).astype(np.float32)  # (batch, experts, slots, embed)
    x[1, 2, 0, 3] = 30.0
    w = (0.1 * rng.standard_normal((4, 32, 24))).astype(np.float32)
    cot = rng.standard_normal((2, 4, 6, 24)).astype(np.float32)
    x, w, cot = jnp.asarray(x), jnp.asarray(w), jnp.asarray(cot)
    spec = "ecd,edh->ech"
    product = functools.partial(quant.fp8_einsum, spec)

    @jax.jit
    def one(x, w, c):  # an example's product and gradients
        return product(x, w), jax.grad(lambda x, w: jnp.sum(product(x, w) * c), argnums=(0, 1))(x, w)

    y, (dx, dw) = one(x[0], w, cot[0])
    y = np.asarray(y, np.float64)
    x0, w2, c0 = (np.asarray(t, np.float64) for t in (x[0], w, cot[0]))
    assert np.all(np.abs(y - x0 @ w2) <= _bound(x0, _err(x0, E4M3, 448.0), w2, _err(w2, E4M3, 448.0)))
    assert np.linalg.norm(y - x0 @ w2) / np.linalg.norm(x0 @ w2) > 0.005  # really rounded
    eg, ex, ew = _err(c0, E5M2, 57344.0), _err(x0, E4M3, 448.0), _err(w2, E4M3, 448.0)
    swap = lambda t: np.swapaxes(t, -1, -2)  # noqa: E731
    assert np.all(np.abs(np.asarray(dx, np.float64) - c0 @ swap(w2)) <= _bound(c0, eg, swap(w2), swap(ew)))
    assert np.all(np.abs(np.asarray(dw, np.float64) - swap(x0) @ c0) <= _bound(swap(x0), swap(ex), c0, eg))

    # Vmapped over the batch inside summed_weight_gradients (the train step): one product on
    # the whole batch with its scales, the weight gradient summed in it; elsewhere per example.
    def loss(x, w):
        return jnp.sum(jax.vmap(product, in_axes=(0, None))(x, w) * cot)

    @jax.jit
    def summed(x, w):
        with eqzoo.nn.summed_weight_gradients():
            return jax.grad(loss, argnums=(0, 1))(x, w)

    whole = jax.jit(jax.grad(lambda x, w: jnp.sum(quant.fp8_einsum("zecd,edh->zech", x, w) * cot), argnums=(0, 1)))(x, w)
    for got, want in zip(summed(x, w), whole, strict=True):  # equal to float32 summation order
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    per_example = jax.jit(jax.vmap(product, in_axes=(0, None)))(x, w)
    np.testing.assert_allclose(np.asarray(per_example[0]), y, rtol=1e-5, atol=1e-6)  # its own scales
    with pytest.raises(ConfigError, match=r"fp8_einsum takes a spec of two operands .*got 'ecd,edh'"):
        quant.fp8_einsum("ecd,edh", x[0], w)


@pytest.mark.parametrize("product", ["matmul", "einsum"])
def test_fp8_products_of_a_batch_of_weights_are_each_members_own(product):  # ~1 s each
    # An ensemble: a vmap over weights (the batched-weight branch of the batching rules) is one
    # product per member, forward and backward, with shared or batched inputs, also inside
    # summed_weight_gradients (which sums only over a batch of activations with one weight).
    rng = np.random.default_rng(3)
    ws = jnp.asarray((0.1 * rng.standard_normal((3, 8, 16))).astype(np.float32))
    xs = jnp.asarray(rng.standard_normal((3, 5, 16)).astype(np.float32))
    xs = xs.at[1, 0, 0].set(25.0)
    fn = quant.fp8_matmul if product == "matmul" else functools.partial(quant.fp8_einsum, "td,od->to")

    def loss(x, w):
        return jnp.sum(jnp.sin(fn(x, w)))

    one_fn = jax.jit(lambda x, w: (fn(x, w), jax.grad(loss, argnums=(0, 1))(x, w)))
    for x_axis in (None, 0):
        x = xs[0] if x_axis is None else xs
        got = jax.vmap(fn, in_axes=(x_axis, 0))(x, ws)
        with eqzoo.nn.summed_weight_gradients():
            grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(x_axis, 0)))(x, ws)
        for i in range(3):
            y, one = one_fn(x if x_axis is None else x[i], ws[i])
            # (to float32 summation order: a batched dot; another scale would be ~1e-2 off)
            np.testing.assert_allclose(np.asarray(got[i]), np.asarray(y), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(np.asarray(grads[0][i]), np.asarray(one[0]), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(np.asarray(grads[1][i]), np.asarray(one[1]), rtol=1e-6, atol=1e-6)


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


def _tiny_moe():
    return eqzoo.models.get_config("tiny-mixtral", embed_dim=32, num_layers=1)


def test_fp8_linears_of_a_dense_model_train_like_float32(create):  # ~4 s CPU: two trainings, one program
    # A one-layer tiny-gpt2 with every attention projection and MLP matrix an Fp8Linear,
    # trained 8 SGD steps on one batch as the train step differentiates (whole-batch scales),
    # beside the same model in float32: its loss falls as the float one does, rounded apart.
    config = eqzoo.models.get_config("tiny-gpt2", embed_dim=32, num_layers=1)
    toks = np.random.default_rng(1).integers(0, 256, (4, 17)).astype(np.int32)
    batch = {"tokens": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:])}

    def train(model):  # the losses of 8 steps, scanned (one body to compile)
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def step(params, _):
            with eqzoo.nn.summed_weight_gradients():
                loss, grads = jax.value_and_grad(lambda p: lm_loss(eqx.combine(p, static), batch, implementation="full")[0])(params)
            return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), loss

        return jax.lax.scan(step, params, None, length=8)[1]

    @jax.jit  # both runs, and the model's initialisation, in one program
    def runs(key):
        model = create(config, key=key)
        wrapped = quant.prepare_fp8(model)
        assert all(isinstance(x, quant.Fp8Linear) for x in (wrapped.blocks.layers.attn.q_proj, wrapped.blocks.layers.mlp.down))
        return train(model), train(wrapped)

    float32, fp8 = (np.asarray(x) for x in runs(jax.random.key(0)))
    # Measured: float32 5.526 -> 4.141, fp8 5.526 -> 4.156; at most 0.016 apart at any step
    # (1% of what the run learns; within 0.1 here).
    assert fp8[-1] < fp8[0] - 1.0, fp8
    assert np.max(np.abs(fp8 - float32)) < 0.1, (fp8, float32)
    assert np.max(np.abs(fp8 - float32)) > 1e-4  # really rounded to fp8


def test_fp8_training_tracks_bf16_and_unwraps_to_the_trained_weights(create, tmp_path):  # ~10 s CPU
    # A one-layer Mixtral: fp8 attention projections (Fp8Linear) and experts (Fp8Weight, "dense").
    toks = np.random.default_rng(0).integers(0, 256, (4, 17)).astype(np.int32)
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:]}
    _, bf16 = _train(create(_tiny_moe(), key=jax.random.key(0)), 12, batch)
    fp8_model = quant.prepare_fp8(create(_tiny_moe(), key=jax.random.key(0)))
    trained, fp8 = _train(fp8_model, 12, batch)
    # Measured (one batch, memorised): bf16 5.592 -> 1.888, fp8 5.592 -> 1.889. Within 0.15 of
    # each other at the end: 4% of what the run learns.
    assert fp8[-1] < fp8[0] - 2.0, fp8
    assert abs(fp8[-1] - bf16[-1]) < 0.15, (fp8[-1], bf16[-1])

    # The trained parameters are the float32 weights, which unwrap_fp8 gives back as they are,
    # and which the weights file holds under the wrapped paths.
    layer, experts = trained.blocks.layers.attn.q_proj, trained.blocks.layers.mlp.gate_proj
    assert isinstance(layer, quant.Fp8Linear) and layer.base.weight.dtype == jnp.float32
    assert isinstance(experts, quant.Fp8Weight) and experts.base.dtype == jnp.float32
    plain = quant.unwrap_fp8(trained)
    assert isinstance(plain.blocks.layers.attn.q_proj, eqx.nn.Linear)
    assert plain.blocks.layers.attn.q_proj.weight is layer.base.weight
    assert plain.blocks.layers.mlp.gate_proj is experts.base
    assert eqzoo.nn.linear_paths(plain) == eqzoo.nn.linear_paths(create(_tiny_moe(), key=jax.random.key(0)))
    eqzoo.checkpoint.save_weights(trained, tmp_path / "w.safetensors")
    loaded = eqzoo.checkpoint.load_weights(fp8_model, tmp_path / "w.safetensors")
    np.testing.assert_array_equal(np.asarray(loaded.blocks.layers.attn.q_proj.base.weight), np.asarray(layer.base.weight))
    np.testing.assert_array_equal(np.asarray(loaded.blocks.layers.mlp.gate_proj.base), np.asarray(experts.base))


def test_fp8_experts_of_each_moe_implementation(create):  # ~2 s
    # "dense" and "capacity" multiply fp8 experts through fp8_einsum (rounded: within a few
    # percent of the float layer, never equal); "ragged", whose grouped products take float
    # arrays, refuses them rather than bypass fp8. targets reach the experts as for quantize.
    model = create(_tiny_moe(), key=jax.random.key(0))
    experts_only = quant.prepare_fp8(model, targets="gate_proj|up_proj|down_proj")
    assert isinstance(experts_only.blocks.layers.attn.q_proj, eqx.nn.Linear)
    assert isinstance(experts_only.blocks.layers.mlp.down_proj, quant.Fp8Weight)
    assert isinstance(quant.prepare_fp8(model, experts=False).blocks.layers.mlp.up_proj, jax.Array)
    moe, fp8_moe = model.blocks[0].mlp, experts_only.blocks[0].mlp  # layer 0
    x = jax.random.normal(jax.random.key(1), (16, 32))

    @eqx.filter_jit
    def errors(moe, fp8_moe, x):
        def rel(implementation):
            want = moe.with_implementation(implementation)(x)
            got = fp8_moe.with_implementation(implementation)(x)
            return jnp.linalg.norm(got - want) / jnp.linalg.norm(want)

        return rel("dense"), rel("capacity")

    for err in errors(moe, fp8_moe, x):
        assert 0.002 < float(err) < 0.1, err
    with pytest.raises(ConfigError, match=r"implementation='ragged'\) multiplies its experts in grouped products .*gate_proj \(Fp8Weight\)"):
        eqx.filter_eval_shape(fp8_moe.with_implementation("ragged"), x)
    with pytest.raises(ConfigError, match=r"mlp\.gate_proj is a Fp8Weight, not a float array .*pass experts=False.*unwrap_fp8"):
        quant.prepare_fp8(experts_only)
    with pytest.raises(ConfigError, match=r"gate_proj is a LoRAWeight.*adapt after prepare_fp8: peft\.lora\(prepare_fp8\(model\)"):
        quant.prepare_fp8(eqx.filter_eval_shape(functools.partial(eqzoo.peft.lora, experts=True, key=jax.random.key(2)), model))
    with pytest.raises(ConfigError, match=r"the experts' gate_proj is a Fp8Weight.*quantize\(eqzoo\.quant\.unwrap_fp8\(model\)\)"):
        quant.quantize(experts_only)


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
