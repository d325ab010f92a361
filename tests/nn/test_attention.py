"""Attention against the softmax formula written out in numpy (float64), MHA and GQA, causal."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo._errors import ConfigError, ShapeError
from eqzoo.nn import (
    MLP,
    Attention,
    RMSNorm,
    TransformerBlock,
    _attention as attention_module,
    resolve_backend,
)

LAYER_TOL = 1e-5  # fp32, single layers
EMBED, SEQ = 32, 7


def _np(a):
    return np.asarray(a, dtype=np.float64)


def _rope_reference(x, positions, theta=10000.0):
    """Rotary embedding as complex multiplication: pairs (x[i], x[i + d/2]) rotate by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    freqs = theta ** (-np.arange(0, d, 2) / d)
    z = x[..., : d // 2] + 1j * x[..., d // 2 :]
    z = z * np.exp(1j * positions[:, None, None] * freqs)
    return np.concatenate([z.real, z.imag], axis=-1)


def reference_attention(attn: Attention, x, segment_ids=None, positions=None) -> np.ndarray:
    """softmax(q k^T / sqrt(d) + causal mask) v, each query head reading kv head h // group
    (no mask for a layer built with `causal=False`); with `segment_ids`, a query sees only keys
    of its own segment; rotary angles at `positions` (default 0..seq-1)."""
    x = _np(x)

    def proj(lin):
        y = x @ _np(lin.weight).T
        return y if lin.bias is None else y + _np(lin.bias)

    seq, h, kv, d = x.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = proj(attn.q_proj).reshape(seq, h, d)
    k = proj(attn.k_proj).reshape(seq, kv, d)
    v = proj(attn.v_proj).reshape(seq, kv, d)
    if attn.rope is not None:
        pos = np.arange(seq) if positions is None else np.asarray(positions)
        q, k = _rope_reference(q, pos, attn.rope.theta), _rope_reference(k, pos, attn.rope.theta)
    k = np.repeat(k, h // kv, axis=1)  # (seq, heads, d): query head i uses kv head i // (h // kv)
    v = np.repeat(v, h // kv, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
    if attn.causal:
        scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
    if attn.sliding_window is not None:  # key j visible from query i when i - j < window
        i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
        scores = np.where(i - j < attn.sliding_window, scores, -np.inf)
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        scores = np.where(seg[:, None] == seg[None, :], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", p, v).reshape(seq, h * d)
    return o @ _np(attn.o_proj.weight).T + (0 if attn.o_proj.bias is None else _np(attn.o_proj.bias))


CASES = {
    # name: (num_heads, num_kv_heads, use_bias, use_rope)
    "mha-bias": (4, 4, True, False),
    "mha-rope": (4, 4, False, True),
    "gqa-rope": (4, 2, False, True),
    "mqa-rope": (4, 1, True, True),
}


def _layer(name, backend="xla"):
    heads, kv, bias, rope = CASES[name]
    attn = Attention(
        EMBED, heads, num_kv_heads=kv, use_bias=bias, use_rope=rope, backend=backend, init_std=0.3,
        key=jax.random.key(0),
    )
    if bias:  # non-zero biases, so the formula exercises them
        where = lambda a: (a.q_proj.bias, a.k_proj.bias, a.v_proj.bias, a.o_proj.bias)  # noqa: E731
        keys = jax.random.split(jax.random.key(1), 4)
        attn = eqx.tree_at(where, attn, tuple(0.1 * jax.random.normal(k, b.shape) for k, b in zip(keys, where(attn), strict=True)))
    return attn


X = jax.random.normal(jax.random.key(42), (SEQ, EMBED))
call = eqx.filter_jit(lambda layer, x: layer(x))  # one compile per layer structure


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_matches_softmax_formula(name):
    attn = _layer(name)
    out = call(attn, X)
    assert out.shape == (SEQ, EMBED) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference_attention(attn, X), atol=LAYER_TOL, rtol=LAYER_TOL)


def test_auto_backend_on_cpu_is_the_xla_path():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU choice")
    assert resolve_backend("auto", jnp.bfloat16) == "xla"
    assert resolve_backend("auto", jnp.float32) == "xla"
    out = call(_layer("gqa-rope", backend="auto"), X)
    np.testing.assert_allclose(out, reference_attention(_layer("gqa-rope"), X), atol=LAYER_TOL, rtol=LAYER_TOL)


def test_xla_path_matches_jax_dot_product_attention():
    # The XLA path is written out by hand; JAX's own implementation is the second reference.
    attn = _layer("gqa-rope")
    positions = jnp.arange(SEQ, dtype=jnp.int32)
    q, k, v = attn._qkv(X, positions)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    expected = attn._out(o)
    np.testing.assert_allclose(attn(X), expected, atol=LAYER_TOL, rtol=LAYER_TOL)


def test_causality():
    attn = _layer("gqa-rope")
    changed = X.at[4:].set(0.0)
    np.testing.assert_array_equal(call(attn, X)[:4], call(attn, changed)[:4])
    assert not np.allclose(call(attn, X)[4:], call(attn, changed)[4:])


@pytest.mark.parametrize("name", ["mha-bias", "gqa-rope"])
def test_bidirectional_attention_matches_unmasked_formula(name):
    heads, kv, bias, rope = CASES[name]
    attn = Attention(EMBED, heads, num_kv_heads=kv, use_bias=bias, use_rope=rope, causal=False, init_std=0.3,
                     key=jax.random.key(0))
    out = call(attn, X)
    np.testing.assert_allclose(out, reference_attention(attn, X), atol=LAYER_TOL, rtol=LAYER_TOL)
    # Every position sees the later ones: changing the tail changes the head's outputs too.
    assert not np.allclose(out[:4], call(attn, X.at[4:].set(0.0))[:4])


def test_bidirectional_attention_refuses_kv_cache_decoding():
    attn = Attention(EMBED, 4, causal=False, key=jax.random.key(0))
    with pytest.raises(ConfigError, match="decode and prefill need causal attention"):
        attn.decode(X, attn.init_cache(SEQ), jnp.int32(0))
    with pytest.raises(ConfigError, match="decode and prefill need causal attention"):
        attn.prefill(X, attn.init_cache(SEQ))


def test_bf16_input_keeps_dtype_and_is_close():
    attn = _layer("gqa-rope")
    out = call(attn, X.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), reference_attention(attn, X), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mha-bias", "gqa-rope"])
def test_cudnn_backend_matches_formula(name):
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN attention needs a GPU")
    attn = _layer(name, backend="cudnn")
    x = jax.random.normal(jax.random.key(42), (128, EMBED))
    out = call(attn, x.astype(jnp.bfloat16))  # cuDNN flash attention takes half precision only
    assert out.dtype == jnp.bfloat16
    ref = reference_attention(attn, x)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2, rtol=5e-2)  # bf16 tolerance


SEGMENTS = jnp.array([1, 1, 1, 2, 2, 3, 0], jnp.int32)  # three documents and one padding position
SEG_POSITIONS = jnp.array([0, 1, 2, 0, 1, 0, 0], jnp.int32)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["mha-bias", "gqa-rope"])
def test_segments_attend_within_their_own_segment(name, causal):
    heads, kv, bias, rope = CASES[name]
    attn = Attention(EMBED, heads, num_kv_heads=kv, use_bias=bias, use_rope=rope, causal=causal,
                     backend="xla", init_std=0.3, key=jax.random.key(0))
    out = attn(X, segment_ids=SEGMENTS, positions=SEG_POSITIONS)
    ref = reference_attention(attn, X, SEGMENTS, SEG_POSITIONS)
    np.testing.assert_allclose(out, ref, atol=LAYER_TOL, rtol=LAYER_TOL)
    # Each segment alone gives the same rows.
    for lo, hi in ((0, 3), (3, 5), (5, 6)):
        np.testing.assert_allclose(out[lo:hi], attn(X[lo:hi]), atol=LAYER_TOL, rtol=LAYER_TOL)


@pytest.mark.gpu
def test_cudnn_segments_match_formula():
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN attention needs a GPU")
    attn = _layer("gqa-rope", backend="cudnn")
    x = jax.random.normal(jax.random.key(42), (2, 128, EMBED))
    seg = jnp.stack([jnp.repeat(jnp.arange(1, 5), 32), jnp.repeat(jnp.array([1, 2]), 64)]).astype(jnp.int32)
    out = jax.jit(jax.vmap(lambda x, s: attn(x, segment_ids=s)))(x.astype(jnp.bfloat16), seg)
    for b in range(2):
        ref = reference_attention(attn, x[b], seg[b])  # positions 0..127 (the layer's default)
        np.testing.assert_allclose(out[b].astype(jnp.float32), ref, atol=5e-2, rtol=5e-2)  # bf16 tolerance


@pytest.mark.parametrize("window", [1, 3, SEQ, SEQ + 5])
def test_sliding_window_matches_formula_and_decoding(window):
    attn = Attention(EMBED, 4, num_kv_heads=2, sliding_window=window, backend="xla", init_std=0.3, key=jax.random.key(0))
    out = call(attn, X)
    np.testing.assert_allclose(out, reference_attention(attn, X), atol=LAYER_TOL, rtol=LAYER_TOL)
    # Token-by-token decoding with a KV cache sees the same window.
    cache = attn.init_cache(SEQ + 2)
    rows = []
    for t in range(SEQ):
        o, cache = attn.decode(X[t : t + 1], cache, jnp.int32(t))
        rows.append(o)
    np.testing.assert_allclose(jnp.concatenate(rows), out, atol=LAYER_TOL, rtol=LAYER_TOL)
    # With segments too: both masks apply.
    packed = attn(X, segment_ids=SEGMENTS, positions=SEG_POSITIONS)
    np.testing.assert_allclose(packed, reference_attention(attn, X, SEGMENTS, SEG_POSITIONS), atol=LAYER_TOL, rtol=LAYER_TOL)


@pytest.mark.parametrize("cap", [None, 5.0])
def test_scanned_layers_build_masks_inside_the_loop(cap, monkeypatch):
    # Two layers of a mixed-window stack (layer 0 windowed, its flag traced) with segments, run
    # by `lax.scan` under `jax.grad`, a batch of 2 by `vmap`. No mask, nor its fill value
    # broadcast to the logits' shape, is hoisted out of the layer loop as a constant of a scan
    # (without the barrier in `_attend_among` the causal mask and the fill were). Without a
    # soft cap, no mask is kept for the backward pass either: no boolean `(..., seq, seq)`
    # enters or leaves a scan (with the plain `where`, the windowed mask was a residual of
    # every layer).
    attn = Attention(EMBED, 4, num_kv_heads=2, sliding_window=3, window_layers=(True, False), backend="xla",
                     logit_softcap=cap, init_std=0.3, key=jax.random.key(0))
    xs, segs = jnp.stack([X, -X]), jnp.stack([SEGMENTS, SEGMENTS[::-1]])

    def loss(x):
        def one(x, seg):
            return jax.lax.scan(lambda h, i: (h + attn(h, segment_ids=seg, layer=i), None), x, jnp.arange(2))[0]

        return jnp.sum(jax.vmap(one)(x, segs) ** 2)

    scans = [e for e in jax.make_jaxpr(jax.grad(loss))(xs).jaxpr.eqns if e.primitive.name == "scan"]
    consts = [v.aval for e in scans for v in e.invars[: e.params["num_consts"]]]
    crossing = [v.aval for e in scans for v in (*e.invars, *e.outvars)]
    assert len(scans) == 2 and not [a for a in consts if a.shape[-2:] == (SEQ, SEQ)]
    if cap is not None:  # soft-capped logits take the plain `where` (see `_xla_attention`)
        return
    assert not [a for a in crossing if a.shape[-2:] == (SEQ, SEQ) and a.dtype == jnp.bool_]
    # The gradient is the plain masked `where`'s, exactly: the masked logits' probabilities are 0.
    got = jax.grad(loss)(xs)
    monkeypatch.setattr(attention_module, "_masked_logits", lambda logits, mask, fill: jnp.where(mask, logits, fill))
    np.testing.assert_array_equal(got, jax.grad(loss)(xs))


@pytest.mark.gpu
def test_cudnn_sliding_window_matches_formula():
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN attention needs a GPU")
    attn = Attention(EMBED, 4, num_kv_heads=2, sliding_window=16, backend="cudnn", init_std=0.3, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(42), (128, EMBED))
    out = call(attn, x.astype(jnp.bfloat16))
    np.testing.assert_allclose(out.astype(jnp.float32), reference_attention(attn, x), atol=5e-2, rtol=5e-2)  # bf16


@pytest.mark.gpu
def test_cudnn_windows_chosen_by_layer_match_xla():
    # Gemma's mixed stack on cuDNN: the traced layer index picks one of two compiled calls.
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN attention needs a GPU")
    kw = dict(num_kv_heads=2, sliding_window=16, window_layers=(True, False), local_rope_theta=100.0,
              scale=0.1, init_std=0.3, key=jax.random.key(0))
    cudnn, xla = Attention(EMBED, 4, backend="cudnn", **kw), Attention(EMBED, 4, backend="xla", **kw)
    x = jax.random.normal(jax.random.key(42), (128, EMBED)).astype(jnp.bfloat16)
    for layer in (0, 1):
        got = jax.jit(lambda x, i: cudnn(x, layer=i))(x, jnp.int32(layer)).astype(jnp.float32)
        want = xla(x.astype(jnp.float32), layer=layer)
        np.testing.assert_allclose(got, want, atol=5e-2, rtol=5e-2)  # bf16


def test_auto_backend_takes_cudnn_only_for_heads_it_supports(monkeypatch):
    # What "auto" picks on a GPU, without one: cuDNN takes half precision, heads a multiple of 8,
    # at most 128 wide before Hopper and 256 from it.
    import eqzoo.nn._attention as attention

    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    for capability, widest in ((8.0, 128), (9.0, 256)):
        monkeypatch.setattr(attention, "_cudnn_max_head_dim", lambda widest=widest: widest)
        assert attention.resolve_backend("auto", jnp.bfloat16, 128) == "cudnn"
        assert attention.resolve_backend("auto", jnp.bfloat16, 256) == ("cudnn" if capability >= 9.0 else "xla")
        assert attention.resolve_backend("auto", jnp.bfloat16, 36) == "xla"  # not a multiple of 8
        assert attention.resolve_backend("auto", jnp.float32, 64) == "xla"
        assert attention.resolve_backend("cudnn", jnp.bfloat16, 256) == "cudnn"  # explicit: as asked


def test_decode_refuses_a_cache_it_cannot_use():
    attn = Attention(EMBED, 4, num_kv_heads=2, key=jax.random.key(0))
    x = X[:5]
    cache = attn.init_cache(8)
    # Was a silent clamp: five keys for positions 6 .. 10 written into slots 3 .. 7.
    with pytest.raises(ShapeError, match=r"Attention.decode: 5 position\(s\) at index 6 need cache positions 6 .. 10, but the cache covers positions 0 .. 7; build a longer one with init_cache\(11\)"):
        attn.decode(x, cache, jnp.int32(6))
    # Were JAX's "dynamic_update_slice update shape must be smaller than operand shape".
    with pytest.raises(ShapeError, match=r"Attention.prefill: 5 position\(s\) at index 0 need cache positions 0 .. 4, but the cache covers positions 0 .. 3"):
        attn.prefill(x, attn.init_cache(4))
    other = Attention(EMBED, 4, num_kv_heads=1, key=jax.random.key(0)).init_cache(8)
    with pytest.raises(ShapeError, match=r"Attention.decode: the cache holds keys of shape \(8, 1, 8\), but this layer has num_kv_heads=2 heads of head_dim=8"):
        attn.decode(x, other, 0)
    with pytest.raises(ShapeError, match=r"Attention.decode: got a stacked cache \(3, 8, 2, 8\) .* without layer=; pass this layer's index"):
        attn.decode(x, attn.init_cache(8, layers=3), 0)
    with pytest.raises(ConfigError, match="Attention.init_cache: max_seq must be a positive integer; got max_seq=0"):
        attn.init_cache(0)
    # A Python int index is accepted (type checking on, as in these tests), like the models' decode.
    out, _ = attn.decode(x, cache, 3)
    ref, _ = attn.decode(x, cache, jnp.int32(3))
    np.testing.assert_array_equal(out, ref)
    block = TransformerBlock(RMSNorm(EMBED), attn, RMSNorm(EMBED), MLP(EMBED, 64, key=jax.random.key(1)))
    out, _ = block.decode(x, cache, 3)
    ref, _ = block.decode(x, cache, jnp.int32(3))
    np.testing.assert_array_equal(out, ref)


def test_attention_config_errors():
    key = jax.random.key(0)
    with pytest.raises(ConfigError, match=r"num_heads=5 must divide embed_dim=32 \(or pass head_dim\)"):
        Attention(32, 5, key=key)
    with pytest.raises(ConfigError, match=r"num_kv_heads=3 must divide num_heads=4"):
        Attention(32, 4, num_kv_heads=3, key=key)
    with pytest.raises(ConfigError, match=r"backend must be one of \('xla', 'cudnn', 'auto'\), got 'flash'"):
        resolve_backend("flash", jnp.float32)
    with pytest.raises(ConfigError, match=r"sliding_window must be a positive integer or None, got 0"):
        Attention(32, 4, sliding_window=0, key=key)
    with pytest.raises(ConfigError, match=r"sliding_window needs causal=True"):
        Attention(32, 4, sliding_window=4, causal=False, key=key)
    # an explicit head_dim lifts the divisibility rule
    assert Attention(32, 5, head_dim=8, key=key)(X).shape == (SEQ, 32)
