"""Gemma's pieces against plain references: per-layer windows and rotary bases picked by layer
index, soft-capped losses through every loss path, decoding with the KV cache, and config errors.
(Parity with transformers' Gemma, Gemma 2 and Gemma 3 is in tests/hf.)"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo import models, nn, train
from eqzoo._errors import ConfigError, ShapeError

TOL = 1e-5  # fp32, a few layers


def _gemma3_like(**overrides):
    # Windows on layers 0, 1 and 3; layer 2 full, with its own rotary base; query/key norms.
    config = models.get_config(
        "tiny-gemma2", num_layers=4, layer_types=("sliding_attention", "sliding_attention", "full_attention", "sliding_attention"),
        local_rope_theta=100.0, rope_theta=1e4, qk_norm=True, attn_logit_softcap=None, final_logit_softcap=None,
    )
    return models.get_config(config, **overrides)


def _randomize_norms(model, key):
    # Norm weights start at 0 (scale 1 + 0): make the offset matter.
    def is_norm(x):
        return isinstance(x, nn.RMSNorm)

    norms = [x for x in jax.tree.leaves(model, is_leaf=is_norm) if is_norm(x)]
    keys = jax.random.split(key, len(norms))
    new = [eqx.tree_at(lambda n: n.weight, n, 0.3 * jax.random.normal(k, n.weight.shape)) for n, k in zip(norms, keys, strict=True)]
    return eqx.tree_at(lambda m: [x for x in jax.tree.leaves(m, is_leaf=is_norm) if is_norm(x)], model, new)


@eqx.filter_jit
def _decode(attn, x, cache, index, layer):
    return attn.decode(x, cache, index, layer)


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_each_layer_attends_as_its_kind_says(layer):
    # A layer of the mixed stack, told its index (as a traced array, as inside the scan), equals
    # a layer built with its kind fixed: the window and the local rotary base on sliding layers.
    kinds = (True, True, False, True)
    kw = dict(num_kv_heads=2, head_dim=16, qk_norm=True, init_std=0.2, key=jax.random.key(0))
    mixed = nn.Attention(64, 4, sliding_window=3, window_layers=kinds, rope_theta=1e4, local_rope_theta=100.0, **kw)
    fixed = nn.Attention(64, 4, sliding_window=3 if kinds[layer] else None, rope_theta=100.0 if kinds[layer] else 1e4, **kw)
    x = jax.random.normal(jax.random.key(1), (12, 64))
    want = fixed(x)
    traced = jax.jit(lambda x, i: mixed(x, layer=i))(x, jnp.int32(layer))
    np.testing.assert_allclose(traced, want, atol=TOL)
    np.testing.assert_allclose(mixed(x, layer=layer), want, atol=TOL)
    # decode: prefill 7 then one token at a time, the cache stacked over the 4 layers (compiled:
    # two programs serve every layer index; eagerly each operation compiled its own)
    cache = jax.tree.map(lambda a: jnp.broadcast_to(a, (4,) + a.shape), mixed.init_cache(16))
    out, cache = _decode(mixed, x[:7], cache, jnp.int32(0), jnp.int32(layer))
    outs = [out]
    for i in range(7, 12):
        out, cache = _decode(mixed, x[i : i + 1], cache, jnp.int32(i), jnp.int32(layer))
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs), want, atol=TOL)


@pytest.mark.parametrize("name", ["tiny-gemma2", "gemma3-like"])
def test_scan_unrolled_and_cached_decoding_agree(name):
    config = _gemma3_like() if name == "gemma3-like" else models.get_config(name)
    model = _randomize_norms(models.create(config, key=jax.random.key(0)), jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (20,), 0, config.vocab_size)
    # Compiled: called eagerly, a stack loops over its layers op by op rather than scanning.
    forward, decode = eqx.filter_jit(lambda m, t: m(t)), eqx.filter_jit(lambda m, t, c, i: m.decode(t, c, i))
    full = forward(model, tokens)
    unrolled = eqx.tree_at(lambda m: m.blocks, model, model.blocks.unstacked())
    np.testing.assert_allclose(forward(unrolled, tokens), full, atol=TOL)
    cache = model.init_cache(32)
    logits, cache = decode(model, tokens[:9], cache, jnp.int32(0))
    steps = [logits]
    for i in range(9, 20):
        logits, cache = decode(model, tokens[i : i + 1], cache, jnp.int32(i))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps), full, atol=TOL)


def test_softcapped_losses_agree_on_every_path():
    # Gemma 2's cap of 30 bends this model's logits (raw ones reach about 18): the fused and
    # chunked losses, and their gradients, must go through the cap as model.logits does.
    model = models.create("tiny-gemma2", key=jax.random.key(0))
    assert model.logit_softcap == 30.0
    raw = 0.3 * jax.random.normal(jax.random.key(9), model.embed.weight.shape)
    model = eqx.tree_at(lambda m: m.embed.weight, model, raw)
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 256)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "mask": jnp.broadcast_to(jnp.arange(16) % 3 != 0, (2, 16))}
    logits = eqx.filter_jit(lambda m, t: jax.vmap(m)(t))(model, batch["tokens"])
    assert float(jnp.max(jnp.abs(logits))) < 30.0  # the cap is on

    @eqx.filter_jit  # one program per loss path (eagerly, one per operation)
    def loss_and_grads(model, impl):
        return eqx.filter_value_and_grad(lambda m: train.lm_loss(m, batch, implementation=impl, chunk_size=4)[0])(model)

    results = {impl: loss_and_grads(model, impl) for impl in ("full", "chunked", "fused")}
    loss, grads = results["full"]
    uncapped = eqx.filter_jit(lambda m, t: jax.vmap(lambda f: f @ m.embed.weight.T)(jax.vmap(m.features)(t)))(model, batch["tokens"])
    uncapped = train.cross_entropy(uncapped, batch["targets"], batch["mask"])
    assert abs(float(loss - uncapped)) > 1e-2  # the cap changes the loss
    for impl in ("chunked", "fused"):
        np.testing.assert_allclose(results[impl][0], loss, rtol=TOL)
        for a, b in zip(jax.tree.leaves(results[impl][1]), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(a, b, atol=TOL)


def test_rms_norm_offset_scales_by_one_plus_weight():
    norm = nn.RMSNorm(8, eps=1e-6, offset=1.0)
    np.testing.assert_array_equal(norm.weight, np.zeros(8))  # scale 1 at init
    norm = eqx.tree_at(lambda n: n.weight, norm, jnp.linspace(-0.5, 0.5, 8))
    x = jax.random.normal(jax.random.key(0), (3, 8))
    want = x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * (1.0 + norm.weight)
    np.testing.assert_allclose(norm(x), want, rtol=1e-6)


def test_config_and_layer_errors_name_the_fix():
    with pytest.raises(ConfigError, match="one of .* for each of the num_layers=4"):
        models.get_config("tiny-gemma2", layer_types=("full_attention",) * 3)
    with pytest.raises(ConfigError, match="unknown kinds"):
        models.get_config("tiny-gemma2", layer_types=("local",) * 4)
    with pytest.raises(ConfigError, match="sliding_window is None"):
        models.get_config("tiny-gemma2", sliding_window=None, layer_types=("sliding_attention",) * 4)
    with pytest.raises(ConfigError, match="activation"):
        models.get_config("tiny-gemma2", activation="relu")
    with pytest.raises(ConfigError, match="local_rope_theta is the rotary base of the sliding layers"):
        models.get_config("tiny-gemma2", sliding_window=None, local_rope_theta=100.0)
    with pytest.raises(ConfigError, match="attn_logit_softcap has no cuDNN implementation; use attention_backend='auto'"):
        models.get_config("tiny-gemma2", attention_backend="cudnn")
    key = jax.random.key(0)
    with pytest.raises(ConfigError, match="given together with sliding_window"):
        nn.Attention(32, 2, window_layers=(True, False), key=key)
    with pytest.raises(ConfigError, match="needs use_rope=True and window_layers"):
        nn.Attention(32, 2, local_rope_theta=100.0, key=key)
    with pytest.raises(ConfigError, match="no cuDNN implementation"):
        nn.Attention(32, 2, logit_softcap=50.0, backend="cudnn", key=key)
    mixed = nn.Attention(32, 2, sliding_window=4, window_layers=(True, False), key=key)
    with pytest.raises(ConfigError, match="needs its layer index"):
        mixed(jnp.ones((5, 32)))
    with pytest.raises(ShapeError, match=r"stacked cache .* got one layer's cache \(8, 2, 16\)"):
        mixed.decode(jnp.ones((1, 32)), mixed.init_cache(8), jnp.int32(0), jnp.int32(1))


def test_windows_and_pattern_resolve_as_transformers_does():
    assert models.get_config("tiny-gemma2").resolved_layer_types == ("sliding_attention", "full_attention") * 2
    c = models.get_config("gemma3-1b")
    kinds = c.resolved_layer_types
    assert [i for i, k in enumerate(kinds) if k == "full_attention"] == [5, 11, 17, 23]
    assert models.get_config("tiny-gemma2", sliding_window=None).resolved_layer_types == ("full_attention",) * 4
    assert models.get_config("tiny-gemma2", sliding_window_pattern=None).resolved_layer_types == ("sliding_attention",) * 4


def test_layer_kinds_have_one_canonical_spelling():
    c = models.get_config("tiny-gemma2")
    explicit = models.get_config(c, layer_types=("sliding_attention", "full_attention") * 2)
    assert explicit == c and explicit.layer_types is None and explicit.sliding_window_pattern == 2
    odd = ("full_attention", "sliding_attention", "sliding_attention", "full_attention")
    kept = models.get_config(c, layer_types=odd)
    assert kept.layer_types == odd and kept.sliding_window_pattern is None and kept.resolved_layer_types == odd
    assert hash(explicit) == hash(c)
    # A pattern the user gives is kept (so later edits see it), even where it changes nothing.
    assert models.get_config(c, sliding_window_pattern=9).sliding_window_pattern == 9
    assert models.get_config("gemma2-2b", sliding_window=None).sliding_window_pattern == 2


def test_bad_options_of_the_new_layer_settings_name_the_problem():
    from jaxtyping import TypeCheckError

    from eqzoo.train import fused_cross_entropy

    key = jax.random.key(0)
    with pytest.raises(ConfigError, match="rope_type must be 'llama3' or 'linear', got 'yarn'"):
        nn.RopeScaling(rope_type="yarn")
    with pytest.raises(ConfigError, match=r"rope_type='linear'\) needs factor > 0"):
        nn.RopeScaling(factor=0.0, rope_type="linear")
    with pytest.raises(ConfigError, match="SwiGLU: activation must be one of"):
        nn.SwiGLU(8, 16, activation="relu", key=key)
    with pytest.raises(ConfigError, match="scale must be a positive number or None, got 0.0"):
        nn.Attention(32, 2, scale=0.0, key=key)
    with pytest.raises(ConfigError, match="logit_softcap must be a positive number or None"):
        nn.Attention(32, 2, logit_softcap=-1.0, key=key)
    mixed = nn.Attention(32, 2, sliding_window=4, window_layers=(True, False), key=key)
    # a stack longer than its window pattern: refused before a traced index could run past it
    model = models.create("tiny-gemma2", key=key)
    longer = eqx.tree_at(lambda m: m.blocks, model, nn.Stacked.from_layers([model.blocks[i] for i in (0, 1, 2, 3, 0)]))
    with pytest.raises(ShapeError, match="stack has 5 layers but its attention's window_layers covers 4"):
        longer(jnp.zeros((3,), jnp.int32))
    with pytest.raises(ShapeError, match="stack has 5 layers"):
        longer.decode(jnp.zeros((3,), jnp.int32), model.init_cache(8), jnp.int32(0))
    with pytest.raises(ConfigError, match=r"layer=5 is outside window_layers \(length 2\)"):
        mixed(jnp.ones((5, 32)), layer=5)
    with pytest.raises(ConfigError, match="layer must be an integer index, got True"):
        mixed(jnp.ones((5, 32)), layer=True)
    with pytest.raises(ConfigError, match="sliding_window_pattern must be a positive integer or None, got 0"):
        models.get_config("tiny-gemma2", sliding_window_pattern=0)
    with pytest.raises(ConfigError, match="final_logit_softcap must be a positive number or None, got 0.0"):
        models.get_config("tiny-gemma2", final_logit_softcap=0.0)
    # The test suite's jaxtyping hook checks the field's type before GemmaConfig does.
    with pytest.raises((ConfigError, TypeCheckError), match="layer_types"):
        models.get_config("tiny-gemma2", layer_types=["full_attention"] * 4)
    feats, head = jnp.ones((1, 4, 8)), jnp.ones((16, 8))
    with pytest.raises(ConfigError, match="softcap must be a positive number or None, got 0"):
        fused_cross_entropy(feats, head, jnp.zeros((1, 4), jnp.int32), softcap=0)
