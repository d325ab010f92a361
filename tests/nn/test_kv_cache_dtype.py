"""A KV cache in another dtype than the model's: a floating one (new keys and values are cast
to it) or int8 codes with one scale per position and head (`eqzoo.nn.QuantizedKV`), through
every cache layout (full length, rings, a mixed stack) and the generation entry points."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import eqzoo.nn._attention as attention_module
from eqzoo import models, nn
from eqzoo._errors import ConfigError, ShapeError
from eqzoo.generation import generate_batch, generate_speculative
from eqzoo.nn._attention import _xla_attention
from eqzoo.quant import dequantize_int8, quantize_int8
from eqzoo.train import cast_floating


def _scaled(name, **overrides):
    # init_std is 0.02: scale the weights up so the logits spread (up to ~6) and greedy decoding
    # does not repeat one token.
    model = models.create(name, key=jax.random.key(0), **overrides)
    return jax.tree.map(lambda a: 4 * a if eqx.is_inexact_array(a) else a, model)


LAYOUTS = {
    # every layer windowed: one stack of rings (window 4; 16 positions wrap them)
    "rings": dict(name="tiny-llama", num_layers=2, max_seq=32, sliding_window=4),
    # a windowed layer and a full-length one, soft-capped logits: both stacks of a mixed cache
    "mixed": dict(name="tiny-gemma2", num_layers=2, max_seq=32, sliding_window=4),
}


def _decode_all(model, tokens, cache):
    # a prefill longer than the ring, a chunk of three (a ring's old slots and new rows side by
    # side), then single tokens
    decode = jax.jit(lambda c, t, i: model.decode(t, c, i))
    logits, cache = decode(cache, tokens[:7], jnp.int32(0))
    steps = [logits]
    logits, cache = decode(cache, tokens[7:10], jnp.int32(7))
    steps.append(logits)
    for i in range(10, tokens.shape[0]):
        logits, cache = decode(cache, tokens[i : i + 1], jnp.int32(i))
        steps.append(logits)
    return jnp.concatenate(steps), cache


@pytest.fixture(scope="module", params=list(LAYOUTS))
def run(request):
    """`(model, tokens, forward logits, {cache kind: (decoded logits, final cache)})`."""
    kw = dict(LAYOUTS[request.param])
    model = _scaled(kw.pop("name"), **kw)
    tokens = jax.random.randint(jax.random.key(2), (16,), 0, model.config.vocab_size)
    out = {name: _decode_all(model, tokens, model.init_cache(24, dtype=dtype))
           for name, dtype in (("float32", None), ("bfloat16", jnp.bfloat16), ("int8", jnp.int8))}
    # The reference for int8: an fp32 cache whose new rows are rounded to their int8 grid
    # (quantize, then dequantize) before they are stored.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_module, "_as_stored", lambda x, like: dequantize_int8(*quantize_int8(x)).astype(like.dtype))
        out["rounded"] = _decode_all(model, tokens, model.init_cache(24))
    return model, tokens, eqx.filter_jit(model)(tokens), out  # compiled: eagerly, op by op


def test_scaled_int8_attention_equals_attention_over_dequantized_keys():
    # The scales multiply the logits (keys) and the probabilities (values) instead of
    # dequantizing the cache: the same numbers as attending over codes * scale, to fp32 rounding.
    kq, kk, kv, ks, kt = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(kq, (3, 4, 8))
    codes_k = jax.random.randint(kk, (10, 2, 8), -127, 128).astype(jnp.int8)
    codes_v = jax.random.randint(kv, (10, 2, 8), -127, 128).astype(jnp.int8)
    k_scale, v_scale = jax.random.uniform(ks, (2, 10, 2), minval=1e-3, maxval=2e-2)
    mask = jax.random.bernoulli(kt, 0.7, (3, 10)).at[:, 0].set(True)
    got = _xla_attention(q, codes_k.astype(q.dtype), codes_v.astype(q.dtype), mask, k_scale=k_scale, v_scale=v_scale)
    want = _xla_attention(
        q, codes_k.astype(q.dtype) * k_scale[..., None], codes_v.astype(q.dtype) * v_scale[..., None], mask
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_int8_values_keep_float16_precision_at_long_contexts():
    # One query over 2,048 cached positions with small values (|v| ~ 0.01) in float16: each
    # probability times its value scale (~5e-4 * 8e-5) is below float16's normal range, so the
    # scales enter relative to the head's largest. Tolerance 5e-3 relative (measured 4.4e-4);
    # multiplying the raw scales into the probabilities gave 0.15.
    kq, kk, kv = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(kq, (1, 2, 16), jnp.float16)
    k = jax.random.normal(kk, (2048, 1, 16))
    v = 0.01 * jax.random.normal(kv, (2048, 1, 16))
    (k_codes, k_scale), (v_codes, v_scale) = quantize_int8(k), quantize_int8(v)
    mask = jnp.ones((1, 2048), bool)
    got = _xla_attention(
        q, k_codes.astype(q.dtype), v_codes.astype(q.dtype), mask,
        k_scale=k_scale.astype(q.dtype), v_scale=v_scale.astype(q.dtype),
    )
    want = _xla_attention(q.astype(jnp.float32), dequantize_int8(k_codes, k_scale), dequantize_int8(v_codes, v_scale), mask)
    assert got.dtype == jnp.float16
    err = float(jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want))
    assert err < 5e-3, err
    # Stale slots (masked: probability 0) holding rows 1e4 times larger do not set the scale the
    # live ones are measured against (measured the same 4.4e-4; measured against them: 0.41).
    stale_codes = jnp.concatenate([v_codes, jnp.full((64, 1, 16), 127, jnp.int8)])
    stale_scale = jnp.concatenate([v_scale, jnp.full((64, 1), 1e4 * float(jnp.max(v_scale)))])
    k_stale = jnp.concatenate([k_codes, jnp.zeros((64, 1, 16), jnp.int8)])
    k_scale_stale = jnp.concatenate([k_scale, jnp.zeros((64, 1))])
    mask = jnp.concatenate([mask, jnp.zeros((1, 64), bool)], axis=1)
    got = _xla_attention(
        q, k_stale.astype(q.dtype), stale_codes.astype(q.dtype), mask,
        k_scale=k_scale_stale.astype(q.dtype), v_scale=stale_scale.astype(q.dtype),
    )
    err = float(jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want))
    assert err < 5e-3, err


def test_decoding_with_a_bfloat16_cache_stays_close_to_the_forward_pass(run):
    # fp32 model, bf16 cache (new keys and values cast to it). Tolerance 2% of the largest logit
    # (~6-9): measured errors up to ~0.5%. The fp32 cache's: 1e-4 (rounding, ~2e-5).
    _, _, want, out = run
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 2.0
    np.testing.assert_allclose(out["float32"][0], want, atol=1e-4)
    got, cache = out["bfloat16"]
    assert {a.dtype for a in jax.tree.leaves(cache)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_allclose(got, want, atol=0.02 * scale)


def test_int8_decoding_equals_a_float_cache_of_rounded_rows(run):
    # Equal to the rounded-rows reference to fp32 rounding (tolerance 1e-4, measured ~6e-6): the
    # int8 path adds no error beyond the rounding of the rows, so what it loses against the exact
    # cache is quantization alone (up to ~0.4 on logits of ~9 with these sharp random weights).
    _, _, _, out = run
    got, cache = out["int8"]
    assert {a.dtype for a in jax.tree.leaves(cache)} == {jnp.dtype(jnp.int8), jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(got, out["rounded"][0], atol=1e-4)
    assert not np.allclose(got, out["float32"][0], atol=1e-3)  # the rounding is real


def test_int8_cache_on_a_bfloat16_model_follows_the_rounded_rows():
    # A bf16 model: bf16 scales, bf16 logits. The reference is a bf16 cache of rows rounded to
    # their int8 grid; it rounds the dequantized rows to bf16 once more, which the int8 path never
    # does, so the two agree to bf16 precision rather than fp32's. Tolerance 2% of the largest
    # logit (~11 on the rings layout): measured 1.4% there and 0.9% on the mixed one, against
    # 4.2% and 1.4% between the reference and the exact bf16 cache (the rounding itself).
    for layout in LAYOUTS.values():
        kw = dict(layout)
        model = cast_floating(_scaled(kw.pop("name"), **kw), jnp.bfloat16)
        tokens = jax.random.randint(jax.random.key(2), (16,), 0, model.config.vocab_size)
        got, cache = _decode_all(model, tokens, model.init_cache(24, dtype=jnp.int8))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(attention_module, "_as_stored", lambda x, like: dequantize_int8(*quantize_int8(x)).astype(like.dtype))
            want, _ = _decode_all(model, tokens, model.init_cache(24))
        assert got.dtype == jnp.bfloat16
        assert {a.dtype for a in jax.tree.leaves(cache)} == {jnp.dtype(jnp.int8), jnp.dtype(jnp.bfloat16)}
        got, want = got.astype(jnp.float32), want.astype(jnp.float32)
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 2.0
        np.testing.assert_allclose(got, want, atol=0.02 * scale)
        assert float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(want, -1))) >= 0.8


def test_int8_cache_rows_are_within_half_a_step_of_the_float_rows(run):
    # What the int8 cache holds after a prefill, a chunk and single steps: the float cache's rows
    # rounded to their grid, |codes * scale - row| <= scale / 2, scale = max|row| / 127. Compared
    # for the model's first layer, whose keys and values do not depend on the cache (later
    # layers see the first one's slightly different output).
    model, _, _, out = run
    exact, quant = out["float32"][1], out["int8"][1]
    window_layers = model.blocks.layers.attn.window_layers
    # all windowed (window_layers None): the rings are keys / values
    first = ("window_keys", "window_values") if window_layers is not None and window_layers[0] else ("keys", "values")
    for name in ("keys", "values", "window_keys", "window_values"):
        want, got = getattr(exact, name), getattr(quant, name)
        if want is None:
            assert got is None
            continue
        assert isinstance(got, nn.QuantizedKV) and got.shape == want.shape and got.dtype == jnp.int8
        if name not in first:
            continue
        want, codes, scales = want[0], got.codes[0], got.scales[0]
        written = jnp.any(want != 0, axis=-1, keepdims=True)  # slots decode wrote (the rest are 0 in both)
        assert int(jnp.sum(jnp.all(written, axis=(-2, -1)))) == min(16, want.shape[0])  # 16 positions decoded
        np.testing.assert_allclose(scales, jnp.max(jnp.abs(want), axis=-1, keepdims=True) / 127, rtol=1e-5)
        err = jnp.abs(codes.astype(want.dtype) * scales - want)
        assert bool(jnp.all(err <= scales / 2 * (1 + 1e-4) + 1e-7)), name


def test_int8_cache_memory():
    # gpt2-124m (fp32 parameters, head_dim 64): int8 codes + one fp32 scale per head and position
    # are (64 + 4) / 256 of the fp32 cache.
    model = jax.eval_shape(lambda: models.create("gpt2-124m", key=jax.random.key(0)))

    def nbytes(dtype):
        cache = jax.eval_shape(lambda m: m.init_cache(1024, dtype=dtype), model)
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))

    assert nbytes(jnp.int8) / nbytes(None) == pytest.approx(68 / 256)
    assert nbytes(jnp.bfloat16) / nbytes(None) == pytest.approx(0.5)


def test_generation_with_an_int8_cache_follows_the_float_one():
    # Greedy tokens from an int8 cache agree with the fp32 cache's on a model with spread logits
    # (a broken scale agrees on ~1/vocab of them); all three entry points take cache_dtype.
    model = _scaled("tiny-gemma2", num_layers=2, max_seq=40)
    prompts = jax.random.randint(jax.random.key(4), (3, 9), 0, model.config.vocab_size)
    lengths = jnp.array([9, 4, 6])
    want = generate_batch(model, prompts, lengths, max_new_tokens=12)
    got = generate_batch(model, prompts, lengths, max_new_tokens=12, cache_dtype=jnp.int8)
    assert float(jnp.mean(got[:, 9:] == want[:, 9:])) >= 0.9
    spec = generate_speculative(model, model, prompts, lengths, max_new_tokens=12, cache_dtype=jnp.int8)
    assert float(jnp.mean(spec[:, 9:] == want[:, 9:])) >= 0.9
    from eqzoo import generate

    one = generate(model, prompts[0], max_new_tokens=12, cache_dtype="bfloat16")
    assert float(jnp.mean(one[9:] == want[0, 9:])) >= 0.9


def test_bad_cache_dtypes_are_refused():
    model = models.create("tiny-llama", key=jax.random.key(0))
    with pytest.raises(ConfigError, match="floating or int8"):
        model.init_cache(8, dtype=jnp.int32)
    with pytest.raises(ConfigError, match="not a dtype"):
        model.init_cache(8, dtype="float-ish")
    with pytest.raises((ConfigError, TypeCheckError), match="floating or int8"):
        generate_batch(model, jnp.zeros((1, 3), jnp.int32), max_new_tokens=2, cache_dtype=jnp.uint8)
    q = model.init_cache(8, dtype=jnp.int8)
    f = model.init_cache(8)
    with pytest.raises(ConfigError, match="all int8"):
        nn.KVCache(q.keys, f.values)
    with pytest.raises(ConfigError, match="use_cache=False"):
        generate_batch(model, jnp.zeros((1, 3), jnp.int32), max_new_tokens=2, cache_dtype=jnp.int8, use_cache=False)
    with pytest.raises((ShapeError, TypeCheckError), match="scales must have shape|scales"):
        nn.QuantizedKV(jnp.zeros((4, 2, 8), jnp.int8), jnp.zeros((5, 2, 1)))
    with pytest.raises((ConfigError, TypeCheckError), match="int8|codes"):
        nn.QuantizedKV(jnp.zeros((4, 2, 8), jnp.int16), jnp.zeros((4, 2, 1)))


def test_an_int8_cache_passes_non_finite_activations_on_as_a_float_cache_does():
    """The int8 cache quantized its rows through `quantize_int8`, whose checks are for weights:
    an eager decode synced with the host at every layer, and an infinite key raised "the weight
    holds ... Fix the weights (a diverged run?)". The rows are activations: a non-finite one
    gives non-finite logits, as in a float cache."""
    model = models.create("tiny-llama", key=jax.random.key(0), num_layers=2, max_seq=16)
    model = eqx.tree_at(lambda m: m.embed.weight, model, model.embed.weight.at[5].set(jnp.inf))
    for dtype in (None, jnp.int8):
        logits, _ = model.decode(jnp.array([5]), model.init_cache(16, dtype=dtype), jnp.int32(0))
        assert not np.isfinite(np.asarray(logits)).any(), dtype
