"""Int4 (and group-wise) quantization: packing, the rounding bound per group, whole models close to
float, bytes halved against int8, errors, stacked and expert weights, generation, checkpoints,
sharding."""

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
from eqzoo.quant import _product as quant_product
from eqzoo.train import TrainState, cast_floating

from .helpers import _fwd, _of_type, _rel, _tokens

# Relative error ||q(t) - f(t)|| / ||f(t)|| of the fp32 logits of randomly initialised tiny
# models over 64 random tokens, 3 seeds. Int4's step is 127 / 7 = 18x int8's, and the error
# follows: int8 per channel 0.0060-0.0063 (tiny-gpt2), 0.0023-0.0025 (tiny-llama); int4 per
# channel 0.107-0.113 and 0.040-0.048; int4 with groups of 16 inputs 0.080-0.086 and
# 0.032-0.041. The bound leaves ~1.5x room over the worst seed.
INT4_RTOL = {"tiny-gpt2": 0.15, "tiny-llama": 0.07}
GROUP = 16  # divides every input size of the tiny presets (64, 176, 256)


# Quantized under jit: one compiled program, rather than every small op dispatched on its own
# (the same arrays). `create` compiles its build already.
_create = eqzoo.models.create
_quantize = eqx.filter_jit(quant.quantize)


@functools.cache
def _model(preset="tiny-llama", **overrides):
    return _create(preset, key=jax.random.key(0), **overrides)


@functools.cache
def _int4(preset="tiny-llama", group_size=GROUP):
    return _quantize(_model(preset), bits=4, group_size=group_size)


def _abstract(preset, **kwargs):
    return eqx.filter_eval_shape(lambda k: quant.quantize(eqzoo.models.create(preset, key=k), **kwargs), jax.random.key(0))


def _same_arrays(a, b):
    la, lb = jax.tree.leaves(eqx.filter(a, eqx.is_array)), jax.tree.leaves(eqx.filter(b, eqx.is_array))
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- packing, rounding


def test_packing_round_trips_every_pair_of_codes():
    lo, hi = np.meshgrid(np.arange(-8, 8), np.arange(-8, 8), indexing="ij")
    codes = jnp.asarray(np.stack([lo.ravel(), hi.ravel()], -1).reshape(2, 256), jnp.int8)  # all 256 pairs
    packed = quant.pack_int4(codes)
    assert packed.dtype == jnp.uint8 and packed.shape == (2, 128) and packed.nbytes == codes.nbytes // 2
    assert sorted(np.asarray(packed).ravel().tolist()) == list(range(256))  # each byte once: no two pairs collide
    back = quant.unpack_int4(packed)
    assert back.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(back), np.asarray(codes))  # -8, -7 and 7 included
    # low nibble first: [-1, 7] is 0x7F; [7, -8] is 0x87
    np.testing.assert_array_equal(np.asarray(quant.pack_int4(jnp.array([-1, 7, 7, -8], jnp.int8))), [0x7F, 0x87])
    np.testing.assert_array_equal(np.asarray(jax.jit(quant.unpack_int4)(packed)), np.asarray(codes))
    with pytest.raises(ConfigError, match=r"pack_int4 packs int8 codes along an even last axis; got int8 of shape \(3,\)"):
        quant.pack_int4(jnp.zeros(3, jnp.int8))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("group_size", [None, 8])
def test_int4_rounding_is_within_half_a_step_of_each_group(dtype, group_size):
    # rows of very different magnitudes, and inside a row groups of different magnitudes
    w = jax.random.normal(jax.random.key(0), (3, 6, 32)) * jnp.array([1e-3, 1.0, 50.0])[:, None, None]
    w = w * jnp.repeat(jnp.array([1.0, 10.0, 0.1, 1.0]), 8)
    w = w.at[1, 2].set(0.0).at[2, 3, 8:16].set(0.0).astype(dtype)  # a zero row, a zero group
    packed, scale = quant.quantize_int4(w, group_size)
    groups = 1 if group_size is None else 32 // group_size
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 6, 16)
    assert scale.dtype == dtype and scale.shape == ((3, 6) if group_size is None else (3, 6, groups))
    q = np.asarray(quant.unpack_int4(packed), np.int32).reshape(3, 6, groups, -1)
    s = np.asarray(scale, np.float32).reshape(3, 6, groups)
    assert np.all(np.abs(q) <= quant.QMAX4)
    err = np.abs(q * s[..., None] - np.asarray(w, np.float32).reshape(3, 6, groups, -1))
    assert np.all(err <= s[..., None] / 2 * (1 + 1e-6) + 1e-30)
    nonzero = s > 0
    assert np.all(np.max(np.abs(q), axis=-1)[nonzero] == 7)  # each group uses the whole range
    assert np.all(q[1, 2] == 0) and np.all(s[1, 2] == 0)
    deq = quant.dequantize_int4(packed, scale)
    assert deq.dtype == dtype and bool(jnp.all(jnp.isfinite(deq)))
    np.testing.assert_array_equal(np.asarray(deq, np.float32).reshape(q.shape), (q * s[..., None]).astype(np.asarray(deq).dtype).astype(np.float32))
    if group_size is not None:  # the groups of a row see their own magnitude: the small group is finer
        assert s[1, 0, 2] < s[1, 0, 1] / 20


# ------------------------------------------------------------------------------------ one layer


@pytest.mark.parametrize(("bits", "group_size"), [(4, None), (4, 8), (8, 8)])
def test_quantized_linear_computes_its_dequantized_layer(bits, group_size):
    lin = eqx.nn.Linear(24, 10, key=jax.random.key(0))
    layer = quant.QuantizedLinear(lin, bits=bits, group_size=group_size)
    assert (layer.bits, layer.group_size) == (bits, group_size)
    assert layer.codes.dtype == (jnp.uint8 if bits == 4 else jnp.int8)
    assert layer.codes.shape == (10, 24 // (8 // bits)) and layer.int_codes().shape == (10, 24)
    assert layer.scale.shape == ((10,) if group_size is None else (10, 3))
    x = jax.random.normal(jax.random.key(1), (3, 5, 24))
    dense = layer.as_linear()
    assert isinstance(dense, eqx.nn.Linear) and dense.weight.dtype == jnp.float32
    ref = x @ dense.weight.T + dense.bias
    # fp32, one layer: 1e-5
    np.testing.assert_allclose(np.asarray(eqzoo.nn.apply_linear(layer, x)), np.asarray(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(layer))(x[0])), np.asarray(ref[0]), rtol=1e-5, atol=1e-6)
    # and the float weight within half a step of each code
    step = layer.scale if group_size is None else jnp.repeat(layer.scale, group_size, axis=-1)
    assert bool(jnp.all(jnp.abs(dense.weight - lin.weight) <= (step[:, None] if group_size is None else step) / 2 * (1 + 1e-6)))


_apply = eqx.filter_jit(lambda layer, x: layer.apply(x))


def _dequantized_reference(layer, x):
    # The plain path: the float weight codes * scale in x's dtype, then one product (float32 sums).
    w = quant.dequantize_int4(layer.codes, layer.scale.astype(jnp.float32)).astype(x.dtype)
    return jnp.matmul(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype) + layer.bias.astype(x.dtype)


@pytest.mark.parametrize(
    ("group_size", "rows", "split"),
    [(None, (), True), (None, (64,), True), (8, (), True), (8, (1,), True), (8, (3, 5), True), (8, (64,), True),
     (3, (2,), True), (None, (2,), False), (8, (2,), False)],
)
def test_int4_product_equals_dequantize_then_dot_for_every_row_count(group_size, rows, split, monkeypatch):
    # Decoding (one row, vmapped or not), a few rows, and many rows (prefill, training) all take
    # the split-nibble product on CPU; each equals the dequantize-then-dot reference and so does
    # its gradient (QLoRA trains through it). An odd group size (3) splits bytes between groups
    # and unpacks, as every int4 layer does on the other backends (split=False: as on GPU).
    if not split:
        monkeypatch.setattr(quant_product, "SPLIT_BACKENDS", frozenset())
    assert quant_product.use_int4_product(group_size) == (split and group_size != 3)
    lin = eqx.nn.Linear(48, 24, key=jax.random.key(0))
    layer = quant.QuantizedLinear(lin, bits=4, group_size=group_size)
    x = jax.random.normal(jax.random.key(1), (*rows, 48))
    ref = _dequantized_reference(layer, x)
    # fp32, one layer: 1e-5 (the two halves are summed separately: a different order of the sums)
    np.testing.assert_allclose(np.asarray(_apply(layer, x)), np.asarray(ref), rtol=1e-5, atol=1e-6)
    if rows:
        np.testing.assert_allclose(np.asarray(eqx.filter_jit(lambda layer, x: jax.vmap(layer.apply)(x))(layer, x)), np.asarray(ref), rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(jnp.sin(layer.apply(x))))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(_dequantized_reference(layer, x))))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-6)


def test_bfloat16_int4_product_equals_dequantize_then_dot():
    lin = cast_floating(eqx.nn.Linear(256, 32, key=jax.random.key(0)), jnp.bfloat16)
    layer = quant.QuantizedLinear(lin, bits=4, group_size=128)
    x = jax.random.normal(jax.random.key(1), (2, 256), jnp.bfloat16)
    y, ref = _apply(layer, x), _dequantized_reference(layer, x)
    assert y.dtype == jnp.bfloat16
    # bfloat16 output: the same products in float32, then one rounding each (2^-8 relative), and
    # the two halves' float32 sums added in another order: within 1e-2 relative.
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2)


def test_int4_decode_product_never_interleaves_the_nibbles():
    # XLA:CPU fuses a one-row product's weight into a vectorized loop over the inputs; the
    # interleaved low/high order of unpack_int4 made that loop gather every weight (76.6 ms per
    # token against int8's 46.6 on gpt2-124m). The compiled one-row product must hold neither the
    # interleave (a concatenate) nor a float copy of the weight.
    lin = eqx.nn.Linear(256, 96, key=jax.random.key(0))
    layer = quant.QuantizedLinear(lin, bits=4, group_size=128)
    hlo = jax.jit(lambda x: layer.apply(x)).lower(jnp.ones((1, 256))).compile().as_text()
    assert "concatenate(" not in hlo
    assert "f32[96,256]" not in hlo and "f32[256,96]" not in hlo


# ----------------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_int4_model_is_close_to_float_and_takes_half_the_bytes_of_int8(preset):
    model, q4 = _model(preset), _int4(preset)
    q8 = _abstract(preset)  # sizes only
    tokens = _tokens()
    assert _rel(_fwd(q4, tokens), _fwd(model, tokens)) < INT4_RTOL[preset]
    layers, layers8 = _of_type(q4, quant.QuantizedLinear), _of_type(q8, quant.QuantizedLinear)
    n = model.config.num_layers
    for layer in layers:
        assert layer.codes.dtype == jnp.uint8 and layer.codes.shape == (n, layer.out_features, layer.in_features // 2)
        assert layer.scale.shape == (n, layer.out_features, layer.in_features // GROUP)
    np.testing.assert_array_equal(np.asarray(q4.embed.weight), np.asarray(model.embed.weight))  # left float
    r4, r8 = quant.size_report(q4), quant.size_report(q8)
    # exact counts: each of tiny-gpt2's 2 layers holds 4*64*64 + 2*64*256 linear weights, and each
    # of tiny-llama's 2*64*64 (q, o) + 2*32*64 (k, v: 2 kv heads) + 3*64*176 (SwiGLU)
    params = {"tiny-gpt2": 2 * (4 * 64 * 64 + 2 * 64 * 256), "tiny-llama": 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 176)}[preset]
    assert r4["quantized_params"] == r8["quantized_params"] == params
    assert r8["int8_bytes"] == params and r4["int8_bytes"] == 0
    assert r4["int4_bytes"] == params // 2 == sum(x.codes.nbytes for x in layers) == sum(x.codes.size for x in layers8) // 2
    assert r4["float_bytes"] - r8["float_bytes"] == 4 * (params // GROUP - sum(x.scale.size for x in layers8))  # the group scales
    assert r4["dense_bytes"] == r8["dense_bytes"] == quant.size_report(model)["total_bytes"]
    assert quant.size_report(_abstract(preset, bits=4, group_size=GROUP)) == r4
    # and back: the float structure, each weight within half a step of its group's scale
    back = quant.dequantize(q4)
    assert jax.tree.structure(back) == jax.tree.structure(model)
    w, w0 = back.blocks.layers.attn.o_proj.weight, model.blocks.layers.attn.o_proj.weight
    step = jnp.repeat(q4.blocks.layers.attn.o_proj.scale, GROUP, axis=-1)
    assert w.dtype == jnp.float32 and bool(jnp.all(jnp.abs(w - w0) <= step / 2 * (1 + 1e-6)))


def test_bfloat16_int4_keeps_bfloat16_scales():
    model = cast_floating(_model(), jnp.dtype(jnp.bfloat16))
    q = _quantize(model, bits=4, group_size=GROUP)
    layer = q.blocks.layers.mlp.down
    assert layer.codes.dtype == jnp.uint8 and layer.scale.dtype == jnp.bfloat16 and layer.dtype == jnp.bfloat16
    out = _fwd(q, _tokens(32))
    assert out.dtype == jnp.bfloat16
    assert _rel(out.astype(jnp.float32), _fwd(_model(), _tokens(32))) < INT4_RTOL["tiny-llama"]


def test_bits_and_group_size_errors_name_the_layer_and_the_fix():
    model = _model()
    with pytest.raises(
        ConfigError,
        match=r"quantize: blocks\.layers\.mlp\.down Linear\(176 -> 64\): group_size=32 does not divide its 176 inputs.*"
        r"Pick a divisor of 176 \(group_size=16 fits\), group_size=None for one scale per output channel",
    ):
        quant.quantize(model, bits=4, group_size=32)
    eqx.filter_eval_shape(quant.quantize, model, bits=4, group_size=32, targets="attn")  # the attention's 64 inputs are fine
    with pytest.raises(ConfigError, match=r"quantize: bits must be 4 or 8; got 3"):
        quant.quantize(model, bits=3)
    with pytest.raises(ConfigError, match=r"group_size must be a positive integer or None \(per channel\); got 0"):
        quant.quantize(model, bits=4, group_size=0)
    with pytest.raises(ConfigError, match=r"quantize: group_size=1 gives every weight its own scale.*Use group_size >= 2"):
        quant.quantize(model, bits=4, group_size=1)  # the scales would be the weights again
    with pytest.raises(ConfigError, match=r"int4 codes are packed two to a byte along the 5 inputs, an odd count"):
        quant.quantize(eqx.nn.Linear(5, 3, key=jax.random.key(0)), bits=4)
    with pytest.raises(ConfigError, match=r"gate_proj \(experts' weight \(2, 4, 64, 128\), contracting 64\): group_size=48 does not divide"):
        _abstract("tiny-mixtral", bits=4, group_size=48, targets="mlp")
    with pytest.raises(ConfigError, match=r"trained by prepare_qat for the int8 per-channel grid.*quantize\(eqzoo\.quant\.dequantize\(model\), bits=4, group_size=16\)"):
        eqx.filter_eval_shape(lambda m: quant.quantize(quant.prepare_qat(m), bits=4, group_size=GROUP), model)
    with pytest.raises(ConfigError, match=r"already quantized"):
        quant.quantize(_int4())


# ------------------------------------------------------------------------------ stacked, experts


def test_int4_experts_pack_along_the_contracted_axis():
    model = _model("tiny-mixtral")
    q = _quantize(model, bits=4, group_size=GROUP)
    for name in ("gate_proj", "up_proj", "down_proj"):
        w, w0 = getattr(q.blocks.layers.mlp, name), getattr(model.blocks.layers.mlp, name)
        contract, out = w0.shape[-2:]
        assert isinstance(w, quant.QuantizedWeight) and w.codes.dtype == jnp.uint8
        assert w.codes.shape == (*w0.shape[:-2], contract // 2, out) and w.shape == w0.shape
        assert w.scale.shape == (*w0.shape[:-2], out, contract // GROUP)
        np.testing.assert_array_equal(np.asarray(jnp.swapaxes(w.int_codes(), -1, -2)), np.asarray(quant.unpack_int4(jnp.swapaxes(w.codes, -1, -2))))
        dense = w.materialize(jnp.float32)
        step = jnp.swapaxes(jnp.repeat(w.scale, GROUP, axis=-1), -1, -2)  # (..., contract, out)
        assert bool(jnp.all(jnp.abs(dense - w0) <= step / 2 * (1 + 1e-6)))
        layer0 = jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, w)  # one layer's slice, as the stack sees it
        idx = jnp.array([3, 1, 3])
        np.testing.assert_array_equal(np.asarray(layer0.take(idx, jnp.float32)), np.asarray(dense[0][idx]))
    assert isinstance(q.blocks.layers.mlp.router, eqx.nn.Linear)
    tokens = _tokens(24)
    # measured 0.036 (int4, groups of 16); the dense Llama bound applies
    assert _rel(_fwd(q, tokens), _fwd(model, tokens)) < INT4_RTOL["tiny-llama"]
    assert quant.size_report(q)["int4_bytes"] == quant.size_report(_abstract("tiny-mixtral"))["int8_bytes"] // 2


def _unpacked_reference(w):
    """An int4 `QuantizedWeight`'s float32 weight the interleaved way: codes unpacked along the
    contracted axis of its transposed `(..., out, contract)` rows, then scaled."""
    rows = quant.dequantize_int4(jnp.swapaxes(w.codes, -1, -2), w.scale.astype(jnp.float32))
    return jnp.swapaxes(rows, -1, -2)


@pytest.mark.parametrize("group_size", [None, 2, 3])
def test_int4_experts_materialize_by_rows_without_the_interleave(group_size):
    # Odd sizes (6 contracted rows, 5 columns, 3 experts, 2 stacked layers); group 3 splits a byte.
    w0 = jax.random.normal(jax.random.key(0), (2, 3, 6, 5))
    w = quant.QuantizedWeight(w0, bits=4, group_size=group_size)
    # The same float32 products of the same codes and scales: bit-exact.
    np.testing.assert_array_equal(np.asarray(w.materialize(jnp.float32)), np.asarray(_unpacked_reference(w)))
    # Byte row i gives weight rows 2i and 2i + 1 (a broadcast); interleaving the two nibbles
    # along the contracted axis of the transposed rows (a concatenate) made XLA:CPU build the
    # weight element by element (Qwen3-MoE-style int4 prefill 102 ms CPU time, 42 now).
    hlo = jax.jit(lambda w: w.materialize(jnp.float32)).lower(w).compile().as_text()
    assert "concatenate(" not in hlo


@pytest.mark.parametrize("implementation", ["dense", "capacity", "ragged"])
def test_int4_moe_prefill_equals_the_unpacked_experts(implementation):
    # 5 tokens through every expert path of an MoE with odd sizes (embed 6, hidden 10, 3 experts,
    # top 2; groups of 2), int4 experts against the same layer holding their unpacked float weights.
    moe = eqzoo.nn.MoE(6, 10, 3, 2, implementation=implementation, capacity_factor=2.0, key=jax.random.key(1))
    names = ("gate_proj", "up_proj", "down_proj")
    q = eqx.tree_at(lambda m: [getattr(m, n) for n in names], moe,
                    [quant.QuantizedWeight(getattr(moe, n), bits=4, group_size=2) for n in names])
    ref = jax.tree.map(
        lambda a: _unpacked_reference(a) if isinstance(a, quant.QuantizedWeight) else a,
        q, is_leaf=lambda a: isinstance(a, quant.QuantizedWeight),
    )
    x = jax.random.normal(jax.random.key(2), (5, 6))
    # the same float32 products (embed-batched einsums either way): within 1e-5
    call = eqx.filter_jit(lambda m, x: m(x))
    np.testing.assert_allclose(np.asarray(call(q, x)), np.asarray(call(ref, x)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- generation, LoRA


def test_int4_generation_is_deterministic_and_compiles_once(compile_log):
    q = _int4()
    prompt = jnp.array([5, 17, 42, 99, 3, 7], jnp.int32)
    out = eqzoo.generate(q, prompt, max_new_tokens=8)
    assert out.shape == (14,)
    with compile_log() as log:
        again = eqzoo.generate(q, prompt, max_new_tokens=8)
    assert log.compiled == []
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    unrolled = eqzoo.generation.generate_batch(q, prompt[None], max_new_tokens=8, unroll_layers=True)[0]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(unrolled))
    # greedy decoding through the KV cache picks what the whole-sequence forward picks
    logits = _fwd(q, out[:-1])
    np.testing.assert_array_equal(np.argmax(np.asarray(logits[5:]), -1), np.asarray(out[6:]))


def test_lora_on_an_int4_base_trains_and_merges_to_float():
    from eqzoo import peft
    from eqzoo.train import lm_loss, make_train_step

    q = _int4()
    adapted = peft.lora(q, rank=4, key=jax.random.key(1))
    assert isinstance(adapted.blocks.layers.attn.q_proj.base, quant.QuantizedLinear)
    tokens = jnp.arange(12, dtype=jnp.int32)
    np.testing.assert_allclose(np.asarray(_fwd(adapted, tokens)), np.asarray(_fwd(q, tokens)), atol=1e-5)  # lora_b = 0
    optimizer = optax.sgd(0.5)
    state = TrainState.create(adapted, optimizer, trainable=peft.adapter_filter(adapted), key=jax.random.key(2))
    step = make_train_step(lm_loss, optimizer, donate=False)
    toks = np.random.default_rng(0).integers(0, 256, (4, 17)).astype(np.int32)
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:]}
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    tuned = state.model
    _same_arrays(tuned.blocks.layers.attn.q_proj.base, q.blocks.layers.attn.q_proj)  # the base stayed int4, frozen
    merged = peft.merge(tuned)
    assert merged.blocks.layers.attn.q_proj.weight.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(_fwd(merged, tokens)), np.asarray(_fwd(tuned, tokens)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ checkpoints, sharding


def test_int4_weights_and_checkpoints_round_trip_bit_exact(tmp_path):
    pytest.importorskip("safetensors")
    q = _int4()

    def build(k):
        return quant.quantize(eqzoo.models.create("tiny-llama", key=k), bits=4, group_size=GROUP)

    eqzoo.checkpoint.save_weights(q, tmp_path / "q.safetensors")
    back = eqzoo.checkpoint.load_weights(eqx.filter_eval_shape(build, jax.random.key(1)), tmp_path / "q.safetensors")
    assert back.blocks.layers.attn.q_proj.codes.dtype == jnp.uint8 and back.blocks.layers.attn.q_proj.bits == 4
    _same_arrays(back, q)
    optimizer = optax.sgd(0.1)
    with eqzoo.checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(TrainState.create(q, optimizer, key=jax.random.key(2)))
        ckpt.wait()
        restored = ckpt.restore(eqzoo.checkpoint.abstract_state(build, optimizer)).state
    _same_arrays(restored.model, q)
    hf = pytest.importorskip("eqzoo.hf")
    with pytest.raises(hf.HFFormatError, match=r"QuantizedLinear.*eqzoo\.quant\.dequantize"):
        hf.save_pretrained(q, tmp_path / "bad")


def test_sharded_int4_model_matches_one_device():
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    q = _quantize(_model(num_heads=8, num_kv_heads=4), bits=4, group_size=GROUP)
    placed = sh.shard(q, mesh)
    q_proj = placed.blocks.layers.attn.q_proj
    assert q_proj.codes.dtype == jnp.uint8
    assert q_proj.codes.sharding.spec == jax.P(None, "tensor", "fsdp")  # the float weight's layout, packed
    assert q_proj.scale.sharding.spec == jax.P(None, "tensor")  # outputs split, groups whole
    assert placed.blocks.layers.mlp.down.codes.sharding.spec == jax.P(None, "fsdp", "tensor")
    tokens = _tokens(16)
    # fp32 whole model: 1e-5
    np.testing.assert_allclose(np.asarray(_fwd(placed, tokens)), np.asarray(_fwd(q, tokens)), rtol=1e-5, atol=1e-5)


def test_quantizing_a_sharded_model_keeps_each_weights_split():
    # Quantized where it lies (loaded or initialised sharded): codes split as their float weight,
    # scales as its rows (and its input split on the groups axis), values those of one device
    # (int8 goes through the same code: quant._int4.quantize_weight).
    # Eager quantization left int4 codes whole along the fsdp-split inputs: fsdp times the bytes.
    mesh = sh.make_mesh("fsdp=4,tensor=2")
    model = _model(num_heads=8, num_kv_heads=4)
    placed = sh.shard(model, mesh)
    for bits, group_size in ((4, GROUP), (4, None)):
        q = quant.quantize(placed, bits=bits, group_size=group_size)  # eagerly, as a user calls it
        q_proj, down = q.blocks.layers.attn.q_proj, q.blocks.layers.mlp.down
        assert q_proj.codes.sharding.spec == jax.P(None, "tensor", "fsdp")  # (layers, out, in [/ 2])
        assert down.codes.sharding.spec == jax.P(None, "fsdp", "tensor")
        assert q_proj.codes.addressable_shards[0].data.size == q_proj.codes.size // 8
        assert q_proj.scale.sharding.spec == (jax.P(None, "tensor") if group_size is None else jax.P(None, "tensor", "fsdp"))
        _same_arrays(jax.device_get(q), _quantize(model, bits=bits, group_size=group_size))
    # Experts (layers, experts, contract, out): the same, through the transposed rows.
    moe = _model("tiny-mixtral", num_heads=8, num_kv_heads=4)
    placed = sh.shard(moe, mesh)
    q = quant.quantize(placed, bits=4, group_size=GROUP)
    gate = q.blocks.layers.mlp.gate_proj
    # (expert=1 here: a spec naming it or not is the same layout)
    assert gate.codes.sharding.is_equivalent_to(placed.blocks.layers.mlp.gate_proj.sharding, 4)  # P(None, "expert", "fsdp", "tensor")
    assert gate.scale.sharding.is_equivalent_to(jax.NamedSharding(mesh, jax.P(None, None, "tensor", "fsdp")), 4)  # (layers, experts, out, groups)
    _same_arrays(jax.device_get(q), _quantize(moe, bits=4, group_size=GROUP))


# ------------------------------------------------------------------------------------- int4 QAT


@pytest.mark.parametrize("group_size", [None, 8])
def test_int4_fake_quantize_is_the_stored_weight_with_an_identity_gradient(group_size):
    w = jax.random.normal(jax.random.key(0), (3, 6, 32)) * jnp.repeat(jnp.array([1.0, 10.0, 0.1, 1.0]), 8)
    fq = quant.fake_quantize(w, bits=4, group_size=group_size)
    # bit-exact: the weight an int4 QuantizedLinear stores, codes * scale
    np.testing.assert_array_equal(np.asarray(fq), np.asarray(quant.dequantize_int4(*quant.quantize_int4(w, group_size))))
    assert _rel(fq, w) > 5 * _rel(quant.fake_quantize(w), w)  # int4's grid, not int8's
    c = jax.random.normal(jax.random.key(1), w.shape)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(quant.fake_quantize(v, bits=4, group_size=group_size) * c)))(w)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(c))  # straight through: exactly the identity
    with pytest.raises(ConfigError, match=r"fake_quantize: group_size=12 does not divide its 32 inputs"):
        quant.fake_quantize(w, bits=4, group_size=12)
    with pytest.raises(ConfigError, match=r"fake_quantize: int4 codes are packed two to a byte along the 5 inputs"):
        quant.fake_quantize(w[..., :5], bits=4)
    with pytest.raises(ConfigError, match=r"fake_quantize: group_size=1 gives every weight its own scale"):
        quant.fake_quantize(w, bits=8, group_size=1)  # would round nothing
    with pytest.raises(ConfigError, match=r"fake_quantize: bits must be 4 or 8; got 2"):
        quant.fake_quantize(w, bits=2)


@pytest.mark.parametrize(("preset", "group_size"), [("tiny-llama", GROUP), ("tiny-llama", None), ("tiny-mixtral", GROUP)])
def test_quantize_of_an_int4_qat_model_computes_the_qat_model(preset, group_size):
    model = _model(preset)
    qat = quant.prepare_qat(model, bits=4, group_size=group_size)
    wrapped = _of_type(qat, quant.FakeQuantLinear) + _of_type(qat, quant.FakeQuantWeight)
    assert len(wrapped) == (7 if preset == "tiny-llama" else 4 + 3)  # 4 attention projections + 3 expert arrays
    assert all((x.bits, x.group_size) == (4, group_size) for x in wrapped)
    layer = qat.blocks.layers.attn.o_proj
    assert _rel(layer.rounded_weight(), quant.fake_quantize(layer.base.weight)) > 0.01  # int4's grid, not int8's
    tokens = _tokens(32)
    ref = _fwd(qat, tokens)
    q = _quantize(qat, bits=4, group_size=group_size)
    # What quantize stores for the untrained QAT model is what it stores for the float model, bit for bit.
    _same_arrays(q, _int4(preset, group_size))
    # fp32 whole model, the same rounded weights: 1e-5 (measured max |diff| 0 with groups; 1.5e-7
    # per channel, where the scale multiplies the product's output rather than the weight).
    np.testing.assert_allclose(np.asarray(_fwd(q, tokens)), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_int4_qat_beats_rounding_after_training_on_a_tiny_regression():
    # Least squares with correlated inputs: the float optimum W rounded to int4 per channel (PTQ),
    # against 100 steps of int4 QAT from W (Adam, cosine-decayed from 1e-3), then quantized.
    # Rounding each weight to its nearest code ignores how the errors add up through correlated
    # inputs; QAT moves codes to compensate. Measured QAT / PTQ mean squared error, seeds 0-4:
    # 0.80, 0.72, 0.68, 0.71, 0.74 (without the decay, QAT's codes keep flipping and it can end
    # worse than PTQ: the schedule matters).
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-3, 100))

    def mse(layer, x, y):
        return jnp.mean((eqzoo.nn.apply_linear(layer, x) - y) ** 2)

    @eqx.filter_jit  # one compile: the data are arguments
    def fine_tune(qat, x, y):
        def body(carry, _):
            layer, opt = carry
            grads = jax.grad(lambda lay: mse(lay[0], x, y))(layer)
            updates, opt = optimizer.update(grads, opt)
            return (optax.apply_updates(layer, updates), opt), None

        (layer, _), _ = jax.lax.scan(body, (qat, optimizer.init(qat)), None, length=100)
        return layer

    def trial(seed):
        k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
        x = jax.random.normal(k1, (256, 32)) @ jax.random.normal(k2, (32, 32)) / np.sqrt(32)
        w = jax.random.normal(k3, (8, 32))
        y = x @ w.T
        float_layer = eqx.tree_at(lambda m: m.weight, eqx.nn.Linear(32, 8, use_bias=False, key=k3), w)  # the optimum: error 0
        ptq = float(mse(quant.quantize([float_layer], bits=4)[0], x, y))
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction assumes it
            trained = fine_tune(quant.prepare_qat([float_layer], bits=4), x, y)
        deployed = quant.quantize(trained, bits=4)[0]
        assert deployed.codes.dtype == jnp.uint8
        # the trained QAT layer converts to the int4 layer it computed (fp32, one layer: 1e-5)
        np.testing.assert_allclose(float(mse(deployed, x, y)), float(mse(trained[0], x, y)), rtol=1e-5)
        return ptq, float(mse(deployed, x, y))

    results = [trial(seed) for seed in range(3)]
    assert all(qat < 0.85 * ptq for ptq, qat in results), results


def test_int4_qat_errors_name_the_layer_the_grid_and_the_fix():
    model = _model()
    with pytest.raises(ConfigError, match=r"prepare_qat: bits must be 4 or 8; got 3"):
        quant.prepare_qat(model, bits=3)
    with pytest.raises(ConfigError, match=r"prepare_qat: blocks\.layers\.mlp\.down Linear\(176 -> 64\): group_size=32 does not divide its 176 inputs.*group_size=16 fits"):
        quant.prepare_qat(model, bits=4, group_size=32)
    with pytest.raises(ConfigError, match=r"prepare_qat: blocks\.layers\.mlp\.gate_proj \(experts' weight \(2, 4, 64, 128\), contracting 64\): group_size=48 does not divide"):
        eqx.filter_eval_shape(lambda m: quant.prepare_qat(m, bits=4, group_size=48, targets="mlp"), _model("tiny-mixtral"))
    with pytest.raises(ConfigError, match=r"FakeQuantLinear: int4 codes are packed two to a byte along the 5 inputs"):
        quant.FakeQuantLinear(eqx.nn.Linear(5, 3, key=jax.random.key(0)), bits=4)
    with pytest.raises(ConfigError, match=r"FakeQuantWeight: group_size=3 does not divide its 4 inputs"):
        quant.FakeQuantWeight(jnp.ones((2, 4, 6)), bits=4, group_size=3)
    # quantize to another grid than the one trained for: refused, naming both and the call
    qat4 = eqx.filter_eval_shape(lambda m: quant.prepare_qat(m, bits=4, group_size=GROUP), model)
    with pytest.raises(
        ConfigError,
        match=r"quantize: blocks\.layers\.attn\.q_proj was trained by prepare_qat for the int4 grid with groups of 16 inputs "
        r"\(bits=4, group_size=16\); quantizing it with bits=8, group_size=None would not compute what it trained\. "
        r"Convert it with quantize\(model, bits=4, group_size=16\)",
    ):
        eqx.filter_eval_shape(quant.quantize, qat4)
    with pytest.raises(ConfigError, match=r"trained by prepare_qat for the int4 grid with groups of 16 inputs.*bits=4, group_size=None"):
        eqx.filter_eval_shape(lambda m: quant.quantize(m, bits=4), qat4)
    mixtral = eqx.filter_eval_shape(lambda m: quant.prepare_qat(m, bits=4, group_size=GROUP, targets="mlp"), _model("tiny-mixtral"))
    with pytest.raises(ConfigError, match=r"mlp\.gate_proj was trained by prepare_qat for the int4 grid with groups of 16 contracted rows"):
        eqx.filter_eval_shape(lambda m: quant.quantize(m, bits=4, group_size=32, targets="mlp"), mixtral)


def test_restoring_into_a_target_quantized_otherwise_names_bits_and_group_size(tmp_path):
    pytest.importorskip("safetensors")
    from eqzoo.checkpoint import CheckpointMismatchError
    from eqzoo.checkpoint._meta import _quant_layout

    def build(**kwargs):
        return lambda k: quant.quantize(eqzoo.models.create("tiny-llama", key=k), **kwargs)

    q = _int4()  # groups of 16
    eqzoo.checkpoint.save_weights(q, tmp_path / "q.safetensors")
    saved = r"blocks\.layers\.[\w.]+ holds int4 codes \(uint8, packed two to a byte\) with groups of 16, the target "
    fix = r"Build the target with eqzoo\.quant\.quantize\(\.\.\., bits=4, group_size=16\)"
    for kwargs, target in [({}, r"int8 codes with one scale per output channel"), ({"bits": 4, "group_size": 8}, r"int4 codes .* with groups of 8")]:
        like = eqx.filter_eval_shape(build(**kwargs), jax.random.key(1))
        with pytest.raises(CheckpointMismatchError, match=rf"(?s)\nThe file holds int4 layers quantized otherwise than the target's: .*{saved}{target} \(6 more layer\(s\) alike\)\. {fix}") as err:
            eqzoo.checkpoint.load_weights(like, tmp_path / "q.safetensors")
        assert "cast=True" not in str(err.value)  # a shape and a dtype differ: casting would not help
    optimizer = optax.sgd(0.1)
    with eqzoo.checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(TrainState.create(q, optimizer, key=jax.random.key(2)))
        ckpt.wait()
        with pytest.raises(CheckpointMismatchError, match=rf"(?s)\nThe checkpoint holds int4 layers quantized otherwise.*{saved}int8 codes.*{fix}"):
            ckpt.restore(eqzoo.checkpoint.abstract_state(build(), optimizer))
        # the saved config is the float model's: a float target is told the bits and group size
        with pytest.raises(CheckpointMismatchError, match=r"(?s)holds int4 layers .*quantize\(eqzoo\.models\.create\(config, key=k\), bits=4, group_size=16\)"):
            ckpt.restore(eqzoo.checkpoint.abstract_state(ckpt.meta().config, optimizer))
    # the layout read back from shapes alone, for linear layers and experts alike
    for kwargs in ({}, {"bits": 4}, {"bits": 4, "group_size": 16}, {"bits": 8, "group_size": 32}):
        abstract = _abstract("tiny-mixtral", **kwargs)
        layers = _of_type(abstract, quant.QuantizedLinear) + _of_type(abstract, quant.QuantizedWeight)
        assert len(layers) == 7
        for x in layers:
            spec = lambda a: {"shape": list(a.shape), "dtype": jnp.dtype(a.dtype).name}  # noqa: E731
            assert _quant_layout(spec(x.codes), spec(x.scale)) == (x.bits, x.group_size), (type(x).__name__, kwargs)
