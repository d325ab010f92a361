"""`prefill` starts a sequence with attention among the prompt's positions alone (the training
path: cuDNN on GPU) and the output head at the last real position only. It must equal `decode`
at index 0 followed by `logits[valid_length - 1]`, write the same cache, and leave decoding after
it unchanged, for every cache layout: full length, sliding-window rings, and Gemma's mixed stack,
with scanned and unrolled layers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo import models, nn
from eqzoo.generation import generate_batch
from eqzoo.train import cast_floating

TOL = 1e-5  # fp32; prefill and decode-at-0 add the same terms over different key sets (masked ones are exact zeros)
WINDOW = 4


@eqx.filter_jit
def _scaled(config):
    # init_std is 0.02: scale the weights up so that the logits differ visibly between positions.
    # Built under one jit: eager initialisation compiles every small random op separately (~5 s
    # a model on CI's cores).
    model = models.create(config, key=jax.random.key(0))
    return jax.tree.map(lambda a: 4 * a if eqx.is_inexact_array(a) else a, model)


@eqx.filter_jit
def _forward(model, tokens):
    """The full forward pass, compiled once per model and length (called eagerly, the layer
    stack runs op by op, each operation its own compiled program)."""
    return model(tokens)


CONFIGS = {
    "full": lambda: models.get_config("tiny-llama", num_layers=2, max_seq=40),
    "gpt2": lambda: models.get_config("tiny-gpt2", num_layers=2, max_seq=40),
    "all-windowed": lambda: models.get_config("tiny-llama", num_layers=2, sliding_window=WINDOW, max_seq=40),
    # Gemma 2: alternating windowed / full layers, soft-capped attention logits (the XLA path)
    "mixed": lambda: models.get_config("tiny-gemma2", num_layers=3, sliding_window=WINDOW, max_seq=40),
    # mixture-of-experts layers: MoE.decode's path, not MoE.__call__'s
    "moe": lambda: models.get_config("tiny-mixtral", num_layers=2, max_seq=40),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def lm(request):
    return _scaled(CONFIGS[request.param]())


def _leaves(cache):
    return [np.asarray(a) for a in jax.tree.leaves(cache)]


@pytest.mark.parametrize("unrolled", [False, True])
def test_prefill_equals_decode_at_zero_and_decoding_after_it(lm, unrolled):
    # A right-padded prompt of 11 with 7 real tokens: longer than the window, so the rings wrap
    # while the prompt is written. Unrolled layers route a mixed cache at trace time.
    model = eqx.tree_at(lambda m: m.blocks, lm, lm.blocks.unstacked()) if unrolled else lm
    tokens = jax.random.randint(jax.random.key(1), (11,), 0, lm.config.vocab_size)
    n = jnp.int32(7)
    prefill = jax.jit(lambda m, t, c, n: m.prefill(t, c, valid_length=n))
    decode = jax.jit(lambda m, t, c, i, n: m.decode(t, c, i, valid_length=n))
    step = jax.jit(lambda m, t, c, i: m.decode(t, c, i))

    got, cache = prefill(model, tokens, model.init_cache(24), n)
    logits, want_cache = decode(model, tokens, model.init_cache(24), jnp.int32(0), n)
    assert got.shape == (lm.config.vocab_size,)
    np.testing.assert_allclose(got, logits[6], atol=TOL)
    # the forward pass over the real tokens agrees (the training path)
    np.testing.assert_allclose(got, _forward(lm, tokens[:7])[-1], atol=TOL)
    for a, b in zip(_leaves(cache), _leaves(want_cache), strict=True):
        np.testing.assert_allclose(a, b, atol=TOL)

    # three more tokens, one at a time, from each cache
    for i in range(7, 10):
        got_next, cache = step(model, tokens[i : i + 1], cache, jnp.int32(i))
        want_next, want_cache = step(model, tokens[i : i + 1], want_cache, jnp.int32(i))
        np.testing.assert_allclose(got_next, want_next, atol=TOL)
    np.testing.assert_allclose(got_next[0], _forward(lm, tokens[:10])[-1], atol=1e-4)  # fp32 through 10 positions


def test_prefill_never_reads_the_cache(lm):
    # Stale rows in the cache (left by another sequence) and an int8 cache change nothing in the
    # prefill's logits: its attention reads the prompt's own keys and values.
    tokens = jax.random.randint(jax.random.key(2), (9,), 0, lm.config.vocab_size)
    prefill = jax.jit(lambda m, t, c: m.prefill(t, c))
    clean, _ = prefill(lm, tokens, lm.init_cache(16))
    stale = jax.tree.map(lambda a: jnp.full_like(a, 3.0), lm.init_cache(16))
    np.testing.assert_array_equal(prefill(lm, tokens, stale)[0], clean)
    int8_logits, int8_cache = prefill(lm, tokens, lm.init_cache(16, dtype=jnp.int8))
    np.testing.assert_allclose(int8_logits, clean, atol=TOL)
    # ... while decode at index 0 reads the rounded keys back: its logits move.
    via_cache = jax.jit(lambda m, t, c: m.decode(t, c, jnp.int32(0)))(lm, tokens, lm.init_cache(16, dtype=jnp.int8))[0][-1]
    assert np.max(np.abs(via_cache - clean)) > 1e-4
    assert isinstance(int8_cache.keys, nn.QuantizedKV)


def test_prefill_of_a_batch_and_of_a_bfloat16_model():
    # As the decoding loops call it: vmapped over ragged rows with batch_size, lengths traced,
    # through MoE layers. Then a bf16 model with a Python-int length, eager. Tolerances: 1e-5 in
    # fp32; in bf16 1% of the largest logit.
    moe = _scaled(CONFIGS["moe"]())
    tokens = jax.random.randint(jax.random.key(3), (3, 11), 0, moe.config.vocab_size)
    lengths = jnp.array([1, 6, 11], jnp.int32)

    @jax.jit
    def both(model, tokens, lengths):
        def one(t, n):
            got, _ = model.prefill(t, model.init_cache(16), batch_size=3, valid_length=n)
            logits, _ = model.decode(t, model.init_cache(16), jnp.int32(0), batch_size=3, valid_length=n)
            return got, logits[n - 1]
        return jax.vmap(one)(tokens, lengths)

    got, want = both(moe, tokens, lengths)
    np.testing.assert_allclose(got, want, atol=TOL)
    for row, n in enumerate([1, 6, 11]):
        np.testing.assert_allclose(got[row], _forward(moe, tokens[row, :n])[-1], atol=1e-4)

    llama = cast_floating(_scaled(CONFIGS["full"]()), jnp.bfloat16)
    got, _ = llama.prefill(tokens[0], llama.init_cache(16), valid_length=7)
    want = llama.decode(tokens[0], llama.init_cache(16), jnp.int32(0), valid_length=7)[0][6]
    assert got.dtype == jnp.bfloat16
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    np.testing.assert_allclose(got, want, atol=0.01 * float(jnp.max(jnp.abs(want))))


def test_attention_prefill_matches_the_training_call():
    # One layer: a ring of 4 slots for 9 positions, a 3-token tail of padding.
    # Built and run under jit (the same computations): eagerly, every small op compiles apart.
    make = lambda k: nn.Attention(32, 4, num_kv_heads=2, sliding_window=WINDOW, backend="xla", init_std=0.3, key=k)
    attn = eqx.filter_jit(make)(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (9, 32))

    @eqx.filter_jit
    def run(attn, x):
        prefilled = attn.prefill(x, attn.init_cache(12), valid_length=6)
        decoded = attn.decode(x, attn.init_cache(12), jnp.int32(0), valid_length=6)
        return prefilled, attn(x[:6]), decoded

    (out, cache), train, (want_out, want_cache) = run(attn, x)
    np.testing.assert_allclose(out[:6], train, atol=TOL)
    np.testing.assert_allclose(out[:6], want_out[:6], atol=TOL)
    np.testing.assert_allclose(cache.keys, want_cache.keys, atol=TOL)
    assert cache.keys.shape[0] == WINDOW


@pytest.mark.gpu
def test_cudnn_prefill_matches_xla():
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN attention needs a GPU")
    kw = dict(num_kv_heads=2, sliding_window=16, window_layers=(True, False), local_rope_theta=100.0,
              init_std=0.3, key=jax.random.key(0))
    cudnn, xla = nn.Attention(64, 4, backend="cudnn", **kw), nn.Attention(64, 4, backend="xla", **kw)
    x = jax.random.normal(jax.random.key(1), (128, 64))
    for layer in (0, 1):
        cache = cudnn.init_cache(160, layers=2, dtype=jnp.bfloat16)
        got, got_cache = jax.jit(lambda x, c, i: cudnn.prefill(x, c, i))(x.astype(jnp.bfloat16), cache, jnp.int32(layer))
        want, _ = xla.prefill(x, xla.init_cache(160, layers=2), layer)
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2, rtol=5e-2)  # bf16
        assert got_cache.keys.dtype == jnp.bfloat16


@pytest.mark.gpu
def test_cudnn_prefill_in_generation_matches_xla():
    # What generate_batch sends cuDNN on GPU: ragged prompts (1 and 11 real tokens of 11) under
    # vmap, bf16. The first generated token's logits against the XLA backend's, bf16 tolerance.
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN attention needs a GPU")
    models_by_backend = {
        b: cast_floating(_scaled(models.get_config("tiny-llama", attention_backend=b, max_seq=40)), jnp.bfloat16)
        for b in ("cudnn", "xla")
    }
    tokens = jax.random.randint(jax.random.key(4), (2, 11), 0, 256)
    lengths = jnp.array([1, 11], jnp.int32)
    first = {
        b: jax.jit(jax.vmap(lambda t, n, m=m: m.prefill(t, m.init_cache(24), batch_size=2, valid_length=n)[0]))(tokens, lengths)
        for b, m in models_by_backend.items()
    }
    scale = float(jnp.max(jnp.abs(first["xla"].astype(jnp.float32))))
    np.testing.assert_allclose(first["cudnn"].astype(jnp.float32), first["xla"].astype(jnp.float32), atol=5e-2 * scale)
    out = generate_batch(models_by_backend["cudnn"], tokens, lengths, max_new_tokens=4)
    assert out.shape == (2, 15)
