"""Rotary embeddings: the relative-position property, a complex-number reference, Llama-3 scaling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo._errors import ConfigError
from eqzoo.nn import RopeScaling, RotaryEmbedding

LAYER_TOL = 1e-5  # fp32, single layers
HEAD_DIM = 16


def _rotate(rope, x, pos):
    return rope(x, jnp.asarray(pos, jnp.int32))


@pytest.mark.parametrize("scaling", [None, RopeScaling(factor=8.0, original_max_position_embeddings=64)], ids=["plain", "llama3"])
def test_scores_depend_only_on_relative_position(scaling):
    rope = RotaryEmbedding(HEAD_DIM, scaling=scaling)
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (1, 1, HEAD_DIM))
    k = jax.random.normal(kk, (1, 1, HEAD_DIM))
    scale = float(jnp.linalg.norm(q) * jnp.linalg.norm(k))

    def score(m, n):
        return float(jnp.sum(_rotate(rope, q, [m]) * _rotate(rope, k, [n])))

    for m, n in [(3, 1), (10, 10), (2, 9)]:
        base = score(m, n)
        for shift in (1, 7, 40):
            assert abs(score(m + shift, n + shift) - base) <= LAYER_TOL * scale, (m, n, shift)
    # ... and does depend on it: otherwise the property above would hold trivially.
    assert abs(score(5, 0) - score(0, 0)) > 1e-3 * scale


def test_matches_complex_rotation_reference():
    rope = RotaryEmbedding(HEAD_DIM, theta=500.0)
    x = jax.random.normal(jax.random.key(1), (6, 3, HEAD_DIM))
    positions = np.array([0, 1, 2, 5, 17, 31])
    out = _rotate(rope, x, positions)
    xn = np.asarray(x, np.float64)
    freqs = 500.0 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    z = (xn[..., : HEAD_DIM // 2] + 1j * xn[..., HEAD_DIM // 2 :]) * np.exp(1j * positions[:, None, None] * freqs)
    ref = np.concatenate([z.real, z.imag], axis=-1)
    np.testing.assert_allclose(out, ref, atol=LAYER_TOL, rtol=LAYER_TOL)
    np.testing.assert_allclose(out[0], x[0], atol=0)  # position 0 is the identity
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=LAYER_TOL)


def test_bf16_keeps_dtype():
    rope = RotaryEmbedding(HEAD_DIM)
    x = jax.random.normal(jax.random.key(2), (4, 2, HEAD_DIM))
    out = _rotate(rope, x.astype(jnp.bfloat16), np.arange(4))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _rotate(rope, x, np.arange(4)), atol=3e-2)


def _llama3_reference(inv_freq, factor, low, high, old_len):
    """Meta's reference `apply_scaling` for Llama 3.1, frequency by frequency."""
    low_wavelen, high_wavelen = old_len / low, old_len / high
    out = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def test_llama3_scaling_matches_reference():
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    rope = RotaryEmbedding(128, theta=500000.0, scaling=scaling)
    plain = RotaryEmbedding(128, theta=500000.0).inv_freq().astype(np.float64)
    expected = _llama3_reference(plain, 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(rope.inv_freq(), expected, rtol=LAYER_TOL)
    # all three bands are exercised: unchanged, divided by the factor, interpolated
    assert np.any(expected == plain) and np.any(np.isclose(expected, plain / 8.0))
    assert np.any((expected < plain) & ~np.isclose(expected, plain / 8.0))


def test_rope_config_errors(unchecked):
    with pytest.raises(ConfigError, match="even head_dim, got 15"):
        RotaryEmbedding(15)
    with pytest.raises(ConfigError, match="0 < low_freq_factor < high_freq_factor"):
        RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)
    # A low_freq_factor <= 0 or an original length <= 0 put the wavelength bounds at or below
    # zero: every frequency was divided by `factor` (linear scaling, silently), or 0 divided by zero.
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ConfigError, match=f"0 < low_freq_factor < high_freq_factor; got factor=8.0, low_freq_factor={bad}"):
            RopeScaling(low_freq_factor=bad)
    with unchecked():  # the annotation (int) refuses a float or a bool before eqzoo's check under the hook
        for bad in (0, -8192, 8192.5, True):
            with pytest.raises(ConfigError, match=rf"original_max_position_embeddings must be a positive integer .*; got {bad!r}\."):
                RopeScaling(original_max_position_embeddings=bad)
        assert RopeScaling(original_max_position_embeddings=np.int64(64)).apply(np.ones(2)).shape == (2,)
