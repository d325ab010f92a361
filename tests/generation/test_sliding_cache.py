"""Sliding-window layers keep their KV cache in a ring of `window (+ lookahead)` slots: decoding
through it equals the full forward pass, whichever way the positions arrive (a prefill longer than
the window, chunks, single tokens; scanned or unrolled layers), padding never pushes real
positions out, and speculative decoding's rewinds find their window intact."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo import models, nn
from eqzoo._errors import ConfigError, ShapeError
from eqzoo.generation import generate_batch, generate_speculative

TOL = 1e-4  # fp32, a few layers with weights scaled 4x: logits up to ~6, rounding differences ~2e-5
WINDOW = 4


@eqx.filter_jit
def _forward(model, tokens):
    """The full forward pass, compiled once per model and length (called eagerly, the layer
    stack runs op by op, each operation its own compiled program)."""
    return model(tokens)


@eqx.filter_jit
def _scaled(config, seed):
    # init_std is 0.02: scale the weights up so greedy decoding does not just repeat one token.
    # Built under one jit: eager initialisation compiles every small random op separately.
    model = models.create(config, key=jax.random.key(seed))
    return jax.tree.map(lambda a: 4 * a if eqx.is_inexact_array(a) else a, model)


def _config(kind):
    if kind == "all-windowed":  # Mistral-style: every layer windowed, one ring stack
        return models.get_config("tiny-llama", num_layers=3, sliding_window=WINDOW, max_seq=40)
    # Gemma 3-style: windowed layers 0, 1, 3, full layer 2 with its own rotary base
    kinds = ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")
    return models.get_config(
        "tiny-gemma2", num_layers=4, layer_types=kinds, sliding_window=WINDOW, local_rope_theta=100.0,
        rope_theta=1e4, qk_norm=True, attn_logit_softcap=None, final_logit_softcap=None, max_seq=40,
    )


KINDS = ["all-windowed", "mixed"]


@pytest.fixture(scope="module", params=KINDS)
def lm(request):
    return _scaled(_config(request.param), 0)


def test_cache_layout_is_a_ring_per_windowed_layer(lm):
    cache = lm.init_cache(32)
    kv, hd = lm.blocks[0].attn.num_kv_heads, lm.blocks[0].attn.head_dim
    assert cache.max_seq == 32
    if cache.window_keys is None:  # all windowed: every layer a ring of WINDOW slots
        assert cache.keys.shape == (3, WINDOW, kv, hd)
    else:  # one full layer, three rings
        assert cache.keys.shape == (1, 32, kv, hd)
        assert cache.window_keys.shape == (3, WINDOW, kv, hd)
    assert lm.init_cache(32, lookahead=3).keys.shape[-3] in (32, WINDOW + 3)
    # a window as long as the cache needs no ring
    assert lm.init_cache(WINDOW - 1).keys.shape[-3] == WINDOW - 1


@pytest.mark.parametrize("unrolled", [False, True])
def test_decoding_through_the_ring_equals_the_forward_pass(lm, unrolled):
    # A prefill longer than the window (the ring wraps while it is written), a chunk of three at
    # index 9 (old slots and new rows side by side), then one token at a time. Unrolled layers
    # get Python ints (a mixed cache's stack chosen at trace time), scanned ones a traced index.
    model = eqx.tree_at(lambda m: m.blocks, lm, lm.blocks.unstacked()) if unrolled else lm
    tokens = jax.random.randint(jax.random.key(2), (20,), 0, lm.config.vocab_size)
    want = _forward(lm, tokens)
    decode = jax.jit(lambda m, t, c, i: m.decode(t, c, i))
    cache = model.init_cache(32)
    logits, cache = decode(model, tokens[:7], cache, jnp.int32(0))
    steps = [logits]
    logits, cache = decode(model, tokens[7:10], cache, jnp.int32(7))
    steps.append(logits)
    for i in range(10, 20):
        logits, cache = decode(model, tokens[i : i + 1], cache, jnp.int32(i))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps), want, atol=TOL)


def test_padded_prompts_keep_their_real_positions(lm):
    # Right-padded prompts of 11 (longer than the window) with 2, 5 and 11 real tokens: the
    # prefill keeps each row's last real positions in its rings, not its padding, so every row
    # decodes as it would alone and as the full forward pass does.
    prompts = jax.random.randint(jax.random.key(5), (3, 11), 0, 256, dtype=jnp.int32)
    lengths = jnp.array([2, 5, 11], jnp.int32)
    out = generate_batch(lm, prompts, lengths, max_new_tokens=6)
    reference = generate_batch(lm, prompts, lengths, max_new_tokens=6, use_cache=False)
    np.testing.assert_array_equal(out, reference)
    assert len(set(np.asarray(out[2, 11:]).tolist())) > 1  # not a degenerate repeat
    # remat (the Gemma presets train with it) is dropped for decoding; unrolled, the layers then
    # route to their caches at trace time
    remat = eqx.tree_at(lambda m: m.blocks, lm, nn._fields.with_fields(lm.blocks, remat="full"))
    np.testing.assert_array_equal(generate_batch(remat, prompts, lengths, max_new_tokens=6, unroll_layers=True), reference)


def test_chunked_prefill_of_ragged_rows_keeps_each_rows_window(lm):
    # Two rows of 9 and 7 real tokens prefilled in chunks under vmap, each chunk told how many
    # of its rows are real (valid_length, 0 once a row has ended: a one-token chunk included),
    # then each row's next token at its own length: the forward pass's logits.
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, lm.config.vocab_size)
    lengths = jnp.array([9, 7], jnp.int32)
    chunk = jax.jit(jax.vmap(lambda t, c, i, v: lm.decode(t, c, i, valid_length=v), in_axes=(0, 0, None, 0)))
    step = jax.jit(jax.vmap(lambda t, c, i: lm.decode(t, c, i), in_axes=(0, 0, 0)))
    for sizes in ([4, 4, 1], [8, 1], [3, 3, 3]):
        cache = jax.vmap(lambda _: lm.init_cache(16))(jnp.arange(2))
        start = 0
        for size in sizes:
            _, cache = chunk(tokens[:, start : start + size], cache, jnp.int32(start), jnp.clip(lengths - start, 0, size))
            start += size
        logits, _ = step(tokens[jnp.arange(2), lengths][:, None], cache, lengths)
        for row, n in enumerate(lengths.tolist()):
            np.testing.assert_allclose(logits[row, 0], _forward(lm, tokens[row, : n + 1])[n], atol=TOL, err_msg=f"{sizes}, row {row}")


def test_speculative_decoding_rewinds_within_the_ring(lm):
    # Each round writes proposals past the next start, then rewinds: the rings hold num_draft - 1
    # slots more than the window, so no position inside the window is lost (with one slot fewer
    # this test's rows differ from generate_batch's). The output is the
    # model's own greedy decoding, with a draft that disagrees often (other weights).
    draft = _scaled(models.get_config(_config("all-windowed"), num_layers=1), 7)
    prompts = jax.random.randint(jax.random.key(6), (2, 9), 0, 256, dtype=jnp.int32)
    lengths = jnp.array([9, 3], jnp.int32)
    reference = generate_batch(lm, prompts, lengths, max_new_tokens=12)
    out, stats = generate_speculative(lm, draft, prompts, lengths, max_new_tokens=12, num_draft=3, return_stats=True)
    np.testing.assert_array_equal(out, reference)
    assert (np.asarray(stats["rounds"]) < 12).any()  # some proposals kept: rewinds of several rows


def test_gemma3_1b_cache_is_a_fraction_of_full_length():
    # Gemma 3 1B: 26 layers, 1 key/value head of 256, window 512, every 6th layer full. At 32768
    # positions the full layers keep 32768 rows and the other 22 keep 512.
    config = models.get_config("gemma3-1b")
    model = eqx.filter_eval_shape(models.create, config, key=jax.random.key(0))
    cache = eqx.filter_eval_shape(lambda m: m.init_cache(32768), model)
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    full = 2 * 26 * 32768 * 1 * 256 * cache.keys.dtype.itemsize
    assert cache.keys.shape[0] == 4 and cache.window_keys.shape == (22, 512, 1, 256)
    assert nbytes == pytest.approx(full * (4 * 32768 + 22 * 512) / (26 * 32768))


def test_bad_caches_and_lookahead_name_the_problem():
    key = jax.random.key(0)
    mixed = nn.Attention(32, 2, sliding_window=4, window_layers=(True, False), key=key)
    with pytest.raises(ConfigError, match="lookahead must be a non-negative integer"):
        mixed.init_cache(8, layers=2, lookahead=-1)
    with pytest.raises(ConfigError, match="covers 2 layers"):
        mixed.init_cache(8, layers=3)
    cache = mixed.init_cache(16, layers=2)
    with pytest.raises(ConfigError, match="needs its layer index"):
        mixed.decode(jnp.ones((1, 32)), cache, jnp.int32(0))
    # one ring stack without the full layers' stack: not a cache this stack can use
    ring = nn.KVCache(cache.window_keys, cache.window_values, max_seq=16)
    with pytest.raises(ShapeError, match="two stacks of a mixed cache"):
        mixed.decode(jnp.ones((1, 32)), ring, jnp.int32(0), 1)
    with pytest.raises(ConfigError, match="together, or neither"):
        nn.KVCache(cache.keys, cache.values, cache.window_keys)
