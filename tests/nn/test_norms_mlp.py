"""Norms against their formulas (and computing in fp32 for bf16 input); MLP and SwiGLU against
theirs; embeddings and conv blocks."""

import contextlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo import nn
from eqzoo._errors import ConfigError, ShapeError
from eqzoo.nn import MLP, ConvBlock, Embedding, LayerNorm, ResidualBlock, RMSNorm, SwiGLU

LAYER_TOL = 1e-5  # fp32, single layers
BF16_ULP = 2.0**-8  # relative spacing of bfloat16


def _np(a):
    return np.asarray(a, np.float64)


def _with_random_affine(norm, key):
    k1, k2 = jax.random.split(key)
    norm = eqx.tree_at(lambda n: n.weight, norm, 1.0 + 0.3 * jax.random.normal(k1, norm.weight.shape))
    if getattr(norm, "bias", None) is not None:
        norm = eqx.tree_at(lambda n: n.bias, norm, 0.3 * jax.random.normal(k2, norm.bias.shape))
    return norm


def rms_reference(norm, x):
    x = _np(x)
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + norm.eps) * _np(norm.weight)


def layer_norm_reference(norm, x):
    x = _np(x)
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + norm.eps) * _np(norm.weight)
    return y if norm.bias is None else y + _np(norm.bias)


NORMS = {
    "rms": (lambda: RMSNorm(256), rms_reference),
    "layer": (lambda: LayerNorm(256), layer_norm_reference),
    "layer-no-bias": (lambda: LayerNorm(256, use_bias=False), layer_norm_reference),
}


@pytest.mark.parametrize("name", sorted(NORMS))
def test_norm_matches_formula(name):
    make, reference = NORMS[name]
    norm = _with_random_affine(make(), jax.random.key(0))
    x = 3.0 * jax.random.normal(jax.random.key(1), (2, 5, 256)) + 1.0  # any leading shape
    out = norm(x)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference(norm, x), atol=LAYER_TOL, rtol=LAYER_TOL)


@pytest.mark.parametrize("name", sorted(NORMS))
def test_norm_computes_in_fp32_for_bf16_input(name):
    make, reference = NORMS[name]
    norm = _with_random_affine(make(), jax.random.key(0))
    # A large common offset: statistics taken in bf16 would be badly wrong here.
    x = (100.0 + 2.0 * jax.random.normal(jax.random.key(1), (4, 256))).astype(jnp.bfloat16)
    out = norm(x)
    assert out.dtype == jnp.bfloat16
    ref = reference(norm, x)  # float64 formula on the same bf16 values
    # Only the final rounding to bf16 may differ: half a bf16 ulp of each value, plus one ulp slack.
    np.testing.assert_allclose(_np(out), ref, rtol=BF16_ULP, atol=BF16_ULP)
    # ... and every reduction in the computation runs in float32.
    jaxpr = jax.make_jaxpr(norm)(x).jaxpr
    reductions = [e for e in jaxpr.eqns if e.primitive.name.startswith("reduce_")]
    assert reductions and all(e.invars[0].aval.dtype == jnp.float32 for e in reductions)


def _linear(lin, x):
    y = _np(x) @ _np(lin.weight).T
    return y if lin.bias is None else y + _np(lin.bias)


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


X = jax.random.normal(jax.random.key(3), (7, 16))


def test_mlp_matches_formula_and_shapes():
    mlp = MLP(16, 48, init_std=0.3, key=jax.random.key(0))
    mlp = eqx.tree_at(lambda m: (m.up.bias, m.down.bias), mlp, (0.1 * jnp.ones(48), -0.1 * jnp.ones(16)))
    assert mlp.up.weight.shape == (48, 16) and mlp.down.weight.shape == (16, 48)
    out = mlp(X)
    assert out.shape == X.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _linear(mlp.down, _gelu_tanh(_linear(mlp.up, X))), atol=LAYER_TOL, rtol=LAYER_TOL)


def test_swiglu_matches_formula_and_shapes():
    glu = SwiGLU(16, 40, init_std=0.3, key=jax.random.key(0))
    assert glu.gate.weight.shape == glu.up.weight.shape == (40, 16) and glu.down.weight.shape == (16, 40)
    assert glu.gate.bias is None  # Llama's projections have no biases
    out = glu(X)
    assert out.shape == X.shape and out.dtype == jnp.float32
    g = _linear(glu.gate, X)
    expected = _linear(glu.down, g / (1 + np.exp(-g)) * _linear(glu.up, X))
    np.testing.assert_allclose(out, expected, atol=LAYER_TOL, rtol=LAYER_TOL)


@pytest.mark.parametrize("make", [lambda k: MLP(16, 32, key=k), lambda k: SwiGLU(16, 32, key=k)], ids=["mlp", "swiglu"])
def test_feed_forward_keeps_bf16_activations(make):
    layer = make(jax.random.key(0))  # fp32 parameters
    out = layer(X.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and out.shape == X.shape


def test_embedding_lookup_and_tied_head():
    emb = Embedding(11, 4, key=jax.random.key(0))
    ids = jnp.array([3, 0, 10, 3], jnp.int32)
    np.testing.assert_array_equal(emb(ids), emb.weight[np.array([3, 0, 10, 3])])
    x = jax.random.normal(jax.random.key(1), (2, 4))
    np.testing.assert_allclose(emb.attend(x), _np(x) @ _np(emb.weight).T, atol=LAYER_TOL)
    assert emb.num_embeddings == 11


def test_conv_blocks_under_named_vmap():
    key1, key2 = jax.random.split(jax.random.key(0))
    block, state = eqx.nn.make_with_state(ConvBlock)(1, 8, key=key1)
    res, res_state = eqx.nn.make_with_state(ResidualBlock)(8, 16, stride=2, key=key2)
    images = jax.random.normal(jax.random.key(1), (4, 1, 8, 8))

    def forward(x, s1, s2):
        h, s1 = block(x, s1)
        return res(h, s2)

    batched = jax.vmap(forward, in_axes=(0, None, None), out_axes=(0, None), axis_name="batch")
    out, new_state = eqx.filter_jit(batched)(images, state, res_state)
    assert out.shape == (4, 16, 4, 4)  # stride 2 halves the resolution
    assert bool(jnp.all(out >= 0))  # ends in a ReLU
    # training mode updated the running statistics
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(res_state), jax.tree.leaves(new_state), strict=True))


K = jax.random.key(0)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: nn.Attention(64, -4, key=K), "Attention: num_heads must be a positive integer; got num_heads=-4"),
        (lambda: nn.Attention(64, 4, head_dim=0, key=K), "Attention: head_dim must be a positive integer"),
        (lambda: nn.Attention(64, 4, num_kv_heads=-2, key=K), "Attention: num_kv_heads must be a positive integer"),
        (lambda: nn.Attention(64, 4, rope_theta=0.0, key=K), r"Attention: rope_theta must be a positive number; got rope_theta=0\.0"),
        (lambda: nn.RotaryEmbedding(8, theta=-1.0), "RotaryEmbedding: theta must be a positive number"),
        (lambda: nn.SwiGLU(64, -1, key=K), "SwiGLU: hidden_dim must be a positive integer"),
        (lambda: nn.MLP(64, -3, key=K), "MLP: hidden_dim must be a positive integer"),
        (lambda: nn.Embedding(-5, 64, key=K), "Embedding: num_embeddings must be a positive integer"),
        (lambda: nn.RMSNorm(0), "RMSNorm: dim must be a positive integer; got dim=0"),
        (lambda: nn.LayerNorm(-1), "LayerNorm: dim must be a positive integer"),
        # a negative eps made every output NaN once the mean square fell below it
        (lambda: nn.RMSNorm(4, eps=-1.0), r"RMSNorm: eps must be a positive number; got eps=-1\.0"),
        (lambda: nn.LayerNorm(4, eps=float("nan")), "LayerNorm: eps must be a positive number; got eps=nan"),
        # "same" padding kernel_size // 2 grew each side of an even kernel's output by one
        (lambda: nn.Stacked(lambda k: nn.RMSNorm(4), 2.0, key=K), r"Stacked: num_layers must be a positive integer; got num_layers=2\.0"),
        # ZeroDivisionError, MLIR "invalid tensor dimension size", or a silently wider output:
        (lambda: nn.PatchEmbed(3, 8, 0, key=K), "PatchEmbed: patch_size must be a positive integer; got patch_size=0"),
        (lambda: nn.PatchEmbed(3, -8, 2, key=K), "PatchEmbed: embed_dim must be a positive integer"),
        (lambda: nn.ConvBlock(3, 8, kernel_size=0, key=K), "ConvBlock: kernel_size must be a positive integer"),
        (lambda: nn.ConvBlock(3, 8, kernel_size=4, key=K), "ConvBlock: kernel_size must be odd .*got kernel_size=4. Use 3 or 5"),
        # NaN outputs, silently:
        (lambda: nn.LayerNorm(8, eps=0.0), r"LayerNorm: eps must be a positive number; got eps=0\.0"),
        (lambda: nn.Attention(64, 4, qk_norm=True, qk_norm_eps=-1.0, key=K), "RMSNorm: eps must be a positive number"),
    ],
)
def test_layer_sizes_are_checked_when_built(build, match, unchecked):
    # These failed later, deep inside JAX (an MLIR "Invalid type", a reshape, a NaN rotary base).
    with unchecked(), pytest.raises(ConfigError, match=match):
        build()


def test_layers_check_the_width_and_dtype_of_their_input(unchecked):
    attn = nn.Attention(64, 4, key=K)
    with unchecked():  # without the annotations: a size-1 axis broadcast, integers were cast
        with pytest.raises(ShapeError, match=r"RMSNorm takes inputs whose last axis has 64 entries; got shape \(8, 1\)"):
            nn.RMSNorm(64)(jnp.ones((8, 1)))
        with pytest.raises(ShapeError, match="LayerNorm takes floating-point inputs; got dtype int32"):
            nn.LayerNorm(64)(jnp.ones((8, 64), jnp.int32))
        with pytest.raises(ShapeError, match=r"Attention takes inputs whose last axis has 64 entries; got shape \(8, 32\)"):
            attn(jnp.ones((8, 32)))
        with pytest.raises(ShapeError, match="Attention takes floating-point inputs; got dtype int32"):
            attn(jnp.ones((8, 64), jnp.int32))


def test_feed_forward_layers_name_a_wrong_width(unchecked):
    # Was JAX's "dot_general requires contracting dimensions to have the same shape".
    x = jnp.ones((8, 17))
    layers = {
        "MLP": MLP(16, 32, key=K),
        "SwiGLU": SwiGLU(16, 32, key=K),
        "MoE": nn.MoE(16, 32, 4, 2, key=K),
    }
    for name, layer in layers.items():
        for mode in (contextlib.nullcontext, unchecked):
            with mode(), pytest.raises(ShapeError, match=rf"{name} takes inputs whose last axis has 16 entries; got shape \(8, 17\)"):
                layer(x)
        with unchecked(), pytest.raises(ShapeError, match=f"{name} takes floating-point inputs; got dtype int32"):
            layer(jnp.ones((8, 16), jnp.int32))


def test_tied_head_and_rotary_name_a_wrong_width(unchecked):
    # Were JAX's "dot_general requires contracting dimensions ..." and "mul got incompatible
    # shapes for broadcasting".
    rope = nn.RotaryEmbedding(8)
    emb = Embedding(11, 4, key=K)
    for mode in (contextlib.nullcontext, unchecked):
        with mode(), pytest.raises(ShapeError, match=r"Embedding.attend takes inputs whose last axis has 4 entries; got shape \(2, 8\)"):
            emb.attend(jnp.ones((2, 8)))
        with mode(), pytest.raises(ShapeError, match=r"RotaryEmbedding\(head_dim=8\) takes queries or keys of shape \(seq, heads, 8\); got \(5, 2, 6\)"):
            rope(jnp.ones((5, 2, 6)), jnp.arange(5))


def test_embedding_takes_unsigned_ids():
    emb = Embedding(300, 8, key=K)
    ids = jnp.array([0, 7, 255], jnp.int32)
    np.testing.assert_array_equal(emb(ids.astype(jnp.uint8)), emb(ids))
    np.testing.assert_array_equal(emb(jnp.array([299], jnp.uint16)), emb.weight[299:])


def test_embedding_refuses_concrete_ids_outside_the_table():
    # jnp.take read id 12 of a 10-row table as a NaN row and -1 as the last row, silently.
    emb = Embedding(10, 4, key=K)
    for ids in ([3, 12], [-1, 3]):
        with pytest.raises(ConfigError, match=rf"Embedding: ids must lie in \[0, 10\) .*got ids from {min(ids)} to {max(ids)}"):
            emb(jnp.array(ids))
    # traced ids are not checked (a jitted step pays nothing): as jnp.take
    assert np.isnan(np.asarray(jax.jit(lambda i: emb(i))(jnp.array([12])))).all()
    assert emb(jnp.zeros((0,), jnp.int32)).shape == (0, 4)
