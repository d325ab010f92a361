"""GPT-2, Llama and Mixtral: KV-cache decoding against the full forward pass, and input/config errors."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from eqzoo import models, train
from eqzoo._errors import ConfigError, ShapeError

MODEL_TOL = 1e-4  # fp32, whole models

FAMILIES = {
    "gpt2": models.get_config("tiny-gpt2", max_seq=32),
    "llama": models.get_config("tiny-llama", max_seq=32),  # 4 query heads share 2 kv heads
    "mixtral": models.get_config("tiny-mixtral", max_seq=32),  # and 2 of 4 experts a token
}


@eqx.filter_jit
def _forward(model, tokens, **kwargs):
    """`model(tokens, **kwargs)` compiled once per model, shape and dtype (called eagerly, the
    layer scan compiles anew on every call: ~1 s each on CI's CPUs)."""
    return model(tokens, **kwargs)


_lm_loss = eqx.filter_jit(train.lm_loss)  # the same, for the loss


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def lm(request):
    return models.create(FAMILIES[request.param], key=jax.random.key(0))


@pytest.fixture(scope="module")
def gpt2():
    return models.create(FAMILIES["gpt2"], key=jax.random.key(0))


def test_cache_decoding_equals_full_forward(lm):
    tokens = jax.random.randint(jax.random.key(1), (12,), 0, lm.config.vocab_size, dtype=jnp.int32)
    full = eqx.filter_jit(lambda m, t: m(t))(lm, tokens)
    decode = eqx.filter_jit(lambda m, t, c, i: m.decode(t, c, i))

    prompt_len = 5
    cache = lm.init_cache(16)  # larger than needed: unused positions must be masked out
    logits, cache = decode(lm, tokens[:prompt_len], cache, jnp.int32(0))  # prefill
    steps = [logits]
    for i in range(prompt_len, tokens.shape[0]):
        logits, cache = decode(lm, tokens[i : i + 1], cache, jnp.int32(i))
        steps.append(logits)
    cached = jnp.concatenate(steps)
    assert cached.shape == full.shape == (12, lm.config.vocab_size)
    np.testing.assert_allclose(cached, full, atol=MODEL_TOL, rtol=MODEL_TOL)
    assert cache.keys.shape[0] == lm.config.num_layers  # one cache per layer, stacked


def test_tied_and_untied_heads():
    untied = models.create(FAMILIES["llama"], key=jax.random.key(0))
    tied = models.create(dataclasses.replace(FAMILIES["llama"], tie_embeddings=True), key=jax.random.key(0))
    assert untied.lm_head is not None and untied.head_weight() is untied.lm_head.weight
    assert tied.lm_head is None and tied.head_weight() is tied.embed.weight
    tokens = jnp.arange(6, dtype=jnp.int32)
    # logits = final features @ head.T, checked against the formula
    logits, feats = eqx.filter_jit(lambda m, t: (m(t), m.features(t)))(tied, tokens)
    np.testing.assert_allclose(logits, np.asarray(feats, np.float64) @ np.asarray(tied.embed.weight, np.float64).T, atol=1e-5)


# ------------------------------------------------------------------------------ input errors


def test_batched_tokens_say_vmap(gpt2):
    with pytest.raises(ShapeError, match=r"got \(2, 8\).*wrap the call in jax\.vmap"):
        gpt2(jnp.zeros((2, 8), jnp.int32))


def test_batched_inputs_to_mlp_and_cnn_say_vmap():
    mlp = models.create("mlp-small", key=jax.random.key(0))
    with pytest.raises(ShapeError, match=r"MLP takes one vector.*jax\.vmap"):
        mlp(jnp.zeros((4, mlp.config.in_features)))
    cnn, state = models.create("cnn-digits", key=jax.random.key(0))
    with pytest.raises(ShapeError, match=r"CNN takes one image.*jax\.vmap"):
        cnn(jnp.zeros((4, 1, 8, 8)), state)


def test_float_tokens_are_rejected(gpt2):
    with pytest.raises(ShapeError, match=r"integer token ids; got dtype float32.*astype\(jnp\.int32\)"):
        gpt2(jnp.zeros((8,), jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.uint16, jnp.int16])
def test_unsigned_and_narrow_token_ids_are_accepted_under_type_checking(lm, dtype):
    # check_tokens accepts any integer dtype (uint16 is how large token corpora are stored), but
    # the annotations said Int (signed only): with the documented import hook on, uint8/uint16
    # ids failed in a private method while the same call worked with checking off. One unsigned
    # and one narrow signed dtype: the annotations tell dtypes apart by kind, not width.
    tokens = jnp.arange(8, dtype=jnp.int32) % lm.config.vocab_size
    want = _forward(lm, tokens)
    narrow = tokens.astype(dtype)
    np.testing.assert_allclose(_forward(lm, narrow), want, rtol=0, atol=0)  # same gather: exactly equal
    np.testing.assert_allclose(
        _forward(lm, narrow, segment_ids=jnp.ones(8, dtype), positions=jnp.arange(8, dtype=dtype)), want, rtol=0, atol=MODEL_TOL
    )
    batch = {"tokens": narrow[None, :-1], "targets": narrow[None, 1:]}
    wide = {"tokens": tokens[None, :-1], "targets": tokens[None, 1:]}
    for implementation in train.LM_LOSS_IMPLEMENTATIONS:
        got = _lm_loss(lm, batch, implementation=implementation)[0]
        np.testing.assert_allclose(got, _lm_loss(lm, wide, implementation=implementation)[0], rtol=1e-6)


def test_numpy_tokens_and_batches_are_accepted_under_type_checking(gpt2):
    # What the tokenizers and TokenLoader return; worked unchecked, a TypeCheckError checked
    # (lm_loss's message printed the whole model: ~3,000 characters).
    # Closed over (not passed) under jit, the NumPy arrays reach the annotated signatures as they
    # are, and each call compiles one program (called eagerly, one per operation of the model).
    tokens = np.arange(8, dtype=np.int32)
    np.testing.assert_allclose(eqx.filter_jit(lambda m: m(tokens))(gpt2), _forward(gpt2, jnp.asarray(tokens)), rtol=0, atol=0)
    batch = {"tokens": tokens[None, :-1], "targets": tokens[None, 1:]}
    want = _lm_loss(gpt2, jax.tree.map(jnp.asarray, batch))[0]
    np.testing.assert_allclose(eqx.filter_jit(lambda m: train.lm_loss(m, batch))(gpt2)[0], want, rtol=1e-6)


def test_too_long_sequence_names_max_seq(gpt2):
    with pytest.raises(ShapeError, match=r"length 33 .*max_seq=32"):
        gpt2(jnp.zeros((33,), jnp.int32))


def test_empty_sequence_is_rejected(gpt2):
    with pytest.raises(ShapeError, match="empty sequence"):
        gpt2(jnp.zeros((0,), jnp.int32))


def test_chunked_loss_also_checks_max_seq(gpt2):
    # lm_loss(chunk_size=...) calls model.features directly; too-long inputs must still be caught
    # (GPT-2's position table would otherwise be read out of bounds).
    tokens = jnp.zeros((2, 33), jnp.int32)
    with pytest.raises(ShapeError, match="max_seq=32"):
        train.lm_loss(gpt2, {"tokens": tokens, "targets": tokens}, chunk_size=8)
    with pytest.raises(ShapeError, match="max_seq=32"):
        train.lm_loss(gpt2, {"tokens": tokens, "targets": tokens}, implementation="chunked")


def test_cache_longer_than_max_seq_is_rejected(gpt2):
    with pytest.raises(ShapeError, match=r"max_seq=32"):
        gpt2.init_cache(64)
    # A cache built by the attention layer itself is refused by decode, as positions past
    # max_seq have no row in GPT-2's position table.
    long = gpt2.blocks[0].attn.init_cache(64, layers=gpt2.config.num_layers)
    with pytest.raises(ShapeError, match=r"GPT2\.decode: the cache covers 64 positions .*max_seq=32"):
        gpt2.decode(jnp.zeros((1,), jnp.int32), long, jnp.int32(40))


def test_positions_outside_the_position_table(gpt2):
    tokens = jnp.zeros((4,), jnp.int32)
    for bad, shown in ((jnp.array([0, 1, 2, 32]), "from 0 to 32"), (jnp.array([-1, 0, 1, 2]), "from -1 to 2")):
        with pytest.raises(ShapeError, match=rf"GPT2: positions must lie in \[0, max_seq=32\) .*; got positions {shown}"):
            gpt2(tokens, positions=bad)
        # Traced positions cannot raise: past the table their rows are NaN (not clipped);
        # negative ones index from the end, as in NumPy (-1 reads the last row).
        logits = jax.jit(lambda p: gpt2(tokens, positions=p))(bad)
        if shown.endswith("32"):
            assert np.isnan(logits[3]).all()
        else:
            wrapped = jax.jit(lambda p: gpt2(tokens, positions=p))(jnp.array([31, 0, 1, 2]))
            np.testing.assert_array_equal(logits, wrapped)


def test_decoding_past_the_cache_is_refused(gpt2):
    # Past its last position the cache write was clamped: logits silently off by ~3%.
    seq = jnp.arange(20, dtype=jnp.int32)
    cache = gpt2.init_cache(16)
    _, cache = eqx.filter_jit(lambda m, t, c: m.prefill(t, c))(gpt2, seq[:16], cache)  # one program, not one per operation
    with pytest.raises(ShapeError, match=r"GPT2\.decode: 1 token\(s\) at index 16 need cache positions 16 \.\. 16, but the cache holds positions 0 \.\. 15; .*init_cache\(17\)"):
        gpt2.decode(seq[16:17], cache, 16)
    with pytest.raises(ShapeError, match=r"3 token\(s\) at index 14 need cache positions 14 \.\. 16"):
        gpt2.decode(seq[14:17], cache, 14)
    with pytest.raises(ShapeError, match=r"at index -1 need"):
        gpt2.decode(seq[:1], cache, -1)
    with pytest.raises(ShapeError, match=r"GPT2\.prefill: 20 token\(s\) at index 0 need cache positions 0 \.\. 19"):
        gpt2.prefill(seq, cache)
    for bad in (0, 6):
        with pytest.raises(ShapeError, match=rf"GPT2\.prefill: valid_length must be in \[1, 5\] \(the tokens given\); got {bad}"):
            gpt2.prefill(seq[:5], gpt2.init_cache(16), valid_length=bad)
    logits, _ = eqx.filter_jit(lambda m, t, c: m.decode(t, c, 15))(gpt2, seq[15:16], cache)  # the last position still decodes (15 concrete: checked)
    assert logits.shape == (1, gpt2.config.vocab_size)


# ------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    "make",
    [
        lambda: models.GPT2Config(embed_dim=64, num_heads=5),
        lambda: models.LlamaConfig(embed_dim=64, num_heads=5, num_kv_heads=5),
        lambda: models.MixtralConfig(embed_dim=64, num_heads=5, num_kv_heads=5),
    ],
    ids=["gpt2", "llama", "mixtral"],
)
def test_heads_must_divide_width(make):
    with pytest.raises(ConfigError, match=r"num_heads=5 must divide embed_dim=64"):
        make()


@pytest.mark.parametrize("family", [models.LlamaConfig, models.MixtralConfig])
def test_kv_heads_must_divide_heads(family):
    with pytest.raises(ConfigError, match=r"num_kv_heads=3 must divide num_heads=4"):
        family(embed_dim=64, num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize("family", [models.GPT2Config, models.LlamaConfig, models.MixtralConfig])
def test_unknown_remat(family):
    with pytest.raises(ConfigError, match=r"unknown remat 'sometimes'.*'dots_no_batch'"):
        family(remat="sometimes")


@pytest.mark.parametrize("family", [models.LlamaConfig, models.MixtralConfig])
def test_sliding_window_config(family):
    with pytest.raises(ConfigError, match=r"sliding_window must be a positive integer or None, got 0"):
        family(sliding_window=0)
    # Attention FLOPs grow with the window, not the sequence, past it.
    windowed, full = family(sliding_window=512), family()
    assert windowed.flops_per_token(4096) == full.flops_per_token(512) < full.flops_per_token(4096)
    assert windowed.flops_per_token(256) == full.flops_per_token(256)



def test_windows_on_some_llama_layers():
    # Layers 0 and 1 full, 2 and 3 windowed (Qwen's max_window_layers=2): each layer equals a
    # model built with its kind everywhere, and the FLOPs count each layer's own span.
    kinds = ("full_attention",) * 2 + ("sliding_attention",) * 2
    config = models.get_config("tiny-llama", num_layers=4, sliding_window=3, layer_types=kinds)
    model = models.create(config, key=jax.random.key(0))
    attn = model.blocks.layers.attn
    assert attn.window_layers == (False, False, True, True) and attn.sliding_window == 3
    windowed, full = models.get_config(config, layer_types=None), models.get_config(config, sliding_window=None, layer_types=None)
    alike = {True: models.create(windowed, key=jax.random.key(0)), False: models.create(full, key=jax.random.key(0))}
    h = jax.random.normal(jax.random.key(1), (12, config.embed_dim))
    for i, w in enumerate(attn.window_layers):  # same key: same weights, whatever the windows
        np.testing.assert_allclose(_forward(model.blocks[i], h, layer=i), _forward(alike[w].blocks[i], h), atol=1e-6)
    assert not np.allclose(_forward(alike[True].blocks[0], h), _forward(alike[False].blocks[0], h), atol=1e-3)  # the window matters
    assert config.flops_per_token(64) == (windowed.flops_per_token(64) + full.flops_per_token(64)) / 2


def test_qkv_bias_adds_biases_to_query_key_value_only():
    config = models.get_config("tiny-llama", qkv_bias=True)
    attn = models.create(config, key=jax.random.key(0)).blocks.layers.attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None
    model = models.create(config, key=jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))) == config.num_params()


def test_sliding_window_model_decodes_like_its_forward_pass():
    model = models.create("tiny-llama", key=jax.random.key(0), sliding_window=3)
    tokens = jax.random.randint(jax.random.key(1), (10,), 0, 200, dtype=jnp.int32)
    full = _forward(model, tokens)
    decode = eqx.filter_jit(lambda m, t, c, i: m.decode(t, c, i))  # eagerly, each step compiled its layer scan
    logits, cache = decode(model, tokens[:4], model.init_cache(16), jnp.int32(0))
    rows = [logits]
    for t in range(4, 10):
        logits, cache = decode(model, tokens[t : t + 1], cache, jnp.int32(t))
        rows.append(logits)
    np.testing.assert_allclose(jnp.concatenate(rows), full, atol=1e-5, rtol=1e-5)
    # The window matters: position 9 differs from full causal attention.
    plain = models.create("tiny-llama", key=jax.random.key(0))
    assert float(jnp.max(jnp.abs(_forward(plain, tokens)[9] - full[9]))) > 1e-3


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'gpt5'; available presets: .*'tiny-gpt2'"):
        models.get_config("gpt5")


def test_unknown_override_field_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"GPT2Config has no field\(s\) \['n_layers'\]; valid fields: .*'num_layers'"):
        models.create("tiny-gpt2", key=jax.random.key(0), n_layers=4)


def test_non_positive_sizes():
    with pytest.raises(ConfigError, match=r"these must be positive, got \{'num_layers': 0\}"):
        models.GPT2Config(num_layers=0)


@pytest.mark.parametrize(
    "preset, changes, match",
    [
        ("tiny-gpt2", {"num_layers": 2.5}, r"GPT2Config: these must be integers, got \{'num_layers': 2.5\}"),
        ("tiny-llama", {"num_heads": True, "head_dim": 8.0}, r"LlamaConfig: these must be integers, got \{'num_heads': True, 'head_dim': 8.0\}"),
        ("tiny-llama", {"rope_theta": -1.0}, r"LlamaConfig: rope_theta must be a positive number \(the rotary base\), got -1.0"),
        ("tiny-mixtral", {"rope_theta": 0}, r"MixtralConfig: rope_theta must be a positive number"),
        ("tiny-gemma2", {"sliding_window_pattern": 2.0}, r"GemmaConfig: these must be integers, got \{'sliding_window_pattern': 2.0\}"),
        ("tiny-unet", {"channel_mults": (1, 2.0)}, r"UNetConfig: these must be integers, got \{'channel_mults': \(1, 2.0\)\}"),
        # a JAX scalar's repr reads like an integer: the message says what it is and the fix
        ("tiny-gpt2", {"vocab_size": jnp.int32(100)}, r"GPT2Config: these must be integers, got \{'vocab_size': Array\(100, dtype=int32\)\}\. That is a JAX array, not a Python int: pass int\(x\)\.$"),
    ],
)
def test_non_integer_sizes_and_a_bad_rope_base(preset, changes, match):
    # A float size passed the positivity checks and failed later inside `create` (range() of a
    # float); a negative rope base gave NaN logits. The config's own checks are called directly:
    # under the test suite's jaxtyping hook, the constructor's annotations refuse a float first.
    config = dataclasses.replace(models.get_config(preset))  # a copy: the preset itself stays intact
    for name, value in changes.items():
        object.__setattr__(config, name, value)
    with pytest.raises(ConfigError, match=match):
        config.__post_init__()


def test_register_preset_is_picked_up_and_guards_names():
    config = models.get_config("tiny-gpt2", num_layers=1)
    models.register_preset("test-only-gpt2", config)
    try:
        assert "test-only-gpt2" in models.list_presets()
        assert models.get_config("test-only-gpt2") == config
        with pytest.raises(ConfigError, match="already exists; pass overwrite=True"):
            models.register_preset("test-only-gpt2", config)
    finally:
        models._registry._PRESETS.pop("test-only-gpt2", None)


@pytest.mark.parametrize("preset, overrides", [("tiny-gpt2", {}), ("tiny-llama", {"tie_embeddings": False}), ("tiny-gemma2", {})])
def test_resize_vocab_keeps_the_old_logits_and_starts_new_tokens_at_the_mean(preset, overrides):
    # Tokens added to a tokenizer (chat markers) need rows: ids below the old size keep exactly
    # their logits; a new id's embedding and head row are the mean rows; a model that sees a new
    # id trains to a finite loss; shrinking drops the last rows.
    model = models.create(preset, key=jax.random.key(0), max_seq=32, **overrides)
    old = model.config.vocab_size
    grown = models.resize_vocab(model, old + 10)
    assert grown.config.vocab_size == old + 10 and grown.embed.weight.shape[0] == old + 10
    tokens = jax.random.randint(jax.random.key(1), (12,), 0, old)
    np.testing.assert_array_equal(np.asarray(grown(tokens))[:, :old], np.asarray(model(tokens)))  # eagerly: jitted, the two vocabulary sizes round differently
    head = grown.head_weight()
    np.testing.assert_allclose(head[old:], np.broadcast_to(np.mean(np.asarray(model.head_weight()), 0), (10, head.shape[1])), rtol=1e-6, atol=1e-7)
    new_ids = tokens.at[3].set(old + 4)
    loss, _ = _lm_loss(grown, {"tokens": new_ids[None, :-1], "targets": new_ids[None, 1:]})
    assert np.isfinite(float(loss))
    shrunk = models.resize_vocab(grown, old - 6)
    np.testing.assert_array_equal(np.asarray(shrunk.embed.weight), np.asarray(model.embed.weight[: old - 6]))
    assert models.resize_vocab(model, old) is model


def test_resize_vocab_errors():
    llama = models.create("tiny-llama", key=jax.random.key(0))
    with pytest.raises(ConfigError, match="vocab_size must be a positive integer, got 0"):
        models.resize_vocab(llama, 0)
    with pytest.raises((ConfigError, TypeCheckError), match="takes an eqzoo language model; got MLP|AbstractLM"):
        models.resize_vocab(models.create("mlp-small", key=jax.random.key(0)), 10)
    from eqzoo import peft

    adapted = peft.lora(llama, rank=2, key=jax.random.key(1))
    with pytest.raises(ConfigError, match="resize the plain model first, then adapt or quantize it"):
        models.resize_vocab(adapted, 300)


@pytest.mark.parametrize(("name", "field"), [("tiny-llama", "rms_norm_eps"), ("tiny-gemma2", "rms_norm_eps"),
                                             ("tiny-mixtral", "rms_norm_eps"), ("tiny-gpt2", "layer_norm_eps"),
                                             ("tiny-dit", "layer_norm_eps")])
def test_a_norm_epsilon_that_is_not_positive_is_refused(name, field):
    # rms_norm_eps=-1.0 made every logit NaN (rsqrt of a mean square below 1 minus 1)
    config = models.get_config(name)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match=rf"{type(config).__name__}: these must be positive, got \{{'{field}': {bad}\}}"):
            dataclasses.replace(config, **{field: bad})
