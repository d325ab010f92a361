"""Losses: cross-entropy against its formula; the fused and chunked LM losses against the full one."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo import train
from eqzoo._errors import ConfigError, ShapeError

LOSS_TOL = 1e-5


def test_cross_entropy_matches_formula_with_mask():
    logits = jax.random.normal(jax.random.key(0), (3, 5, 7))
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 7, dtype=jnp.int32)
    mask = jax.random.bernoulli(jax.random.key(2), 0.6, (3, 5))
    ln = np.asarray(logits, np.float64)
    logp = ln - np.log(np.exp(ln).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(train.cross_entropy(logits, targets), nll.mean(), rtol=LOSS_TOL)
    m = np.asarray(mask, np.float64)
    np.testing.assert_allclose(train.cross_entropy(logits, targets, mask), (nll * m).sum() / m.sum(), rtol=LOSS_TOL)
    # a negative target (Hugging Face's -100) counts as a masked-out position, here as in lm_loss
    ignored = jnp.where(mask, targets, -100)
    np.testing.assert_allclose(train.cross_entropy(logits, ignored), (nll * m).sum() / m.sum(), rtol=LOSS_TOL)
    np.testing.assert_allclose(train.cross_entropy(logits, ignored, jnp.ones((3, 5))), (nll * m).sum() / m.sum(), rtol=LOSS_TOL)


def test_a_mask_of_another_shape_is_refused(gpt2, unchecked):
    # A (seq,) mask meant as one weight per row broadcast along the sequence instead.
    logits, targets = jnp.zeros((3, 5, 7)), jnp.zeros((3, 5), jnp.int32)
    with unchecked(), pytest.raises(ShapeError, match=r"cross_entropy: mask must have the targets' shape \(3, 5\); got \(5,\)"):
        train.cross_entropy(logits, targets, jnp.ones((5,), bool))
    batch = _batch(False)
    with pytest.raises(ShapeError, match=r"lm_loss: batch\['mask'\] must have the tokens' shape \(2, 12\); got \(12,\)"):
        train.lm_loss(gpt2, {**batch, "mask": jnp.arange(12) < 8})


@pytest.fixture(scope="module")
def gpt2(create):
    # tied embeddings: the head's gradient and the embedding's gradient meet in one leaf
    return create("tiny-gpt2", key=jax.random.key(0), max_seq=32, num_layers=1)


def _batch(mask: bool):
    tokens = jax.random.randint(jax.random.key(3), (2, 13), 0, 256, dtype=jnp.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    if mask:
        batch["mask"] = jnp.arange(12)[None, :] < jnp.array([[12], [7]])
    return batch


@eqx.filter_jit
def _loss_and_grads(model, batch, implementation, chunk_size):
    fn = lambda m: train.lm_loss(m, batch, implementation=implementation, chunk_size=chunk_size)  # noqa: E731
    return eqx.filter_value_and_grad(fn, has_aux=True)(model)


@pytest.mark.parametrize("implementation", ["fused", "chunked"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_chunked_losses_equal_full_loss_and_grads(gpt2, mask, implementation):
    # Tolerance 1e-5 (float32): the fast paths only reorder sums over chunks.
    batch = _batch(mask)
    (full, aux), full_grads = _loss_and_grads(gpt2, batch, "full", None)
    # a ragged last chunk; one chunk longer than the sequence; the automatic size
    for chunk in (5, 64, None):
        (loss, aux_c), grads = _loss_and_grads(gpt2, batch, implementation, chunk)
        np.testing.assert_allclose(loss, full, atol=1e-5, rtol=1e-5)
        assert float(aux_c["tokens"]) == float(aux["tokens"]) == (19.0 if mask else 24.0)
        for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads), strict=True):
            np.testing.assert_allclose(g, g0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["fused", "chunked", "full"])
def test_negative_targets_are_ignored_like_masked_positions(gpt2, implementation):
    # Hugging Face marks positions that do not count with the target -100: the loss, its
    # gradients and the counted tokens equal those with a mask (tolerance 1e-5, float32), where
    # before -100 read the vocabulary's 156th class from its end and counted.
    masked = _batch(True)
    ignored = {"tokens": masked["tokens"], "targets": jnp.where(masked["mask"], masked["targets"], -100)}
    (want, aux_want), want_grads = _loss_and_grads(gpt2, masked, implementation, 5)
    (got, aux_got), got_grads = _loss_and_grads(gpt2, ignored, implementation, 5)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert float(aux_got["tokens"]) == float(aux_want["tokens"]) == 19.0
    for g, g0 in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, g0, atol=1e-5, rtol=1e-5)
    both = dict(ignored, mask=jnp.ones_like(masked["mask"]))  # a mask that keeps them does not bring them back
    np.testing.assert_allclose(_loss_and_grads(gpt2, both, implementation, 5)[0][0], want, atol=1e-5, rtol=1e-5)


def test_fused_cross_entropy_matches_float64_formula():
    # The primitive on its own, against numpy in float64 (tolerance 1e-5 relative, float32).
    b, t, d, v = 3, 11, 8, 19
    feats = jax.random.normal(jax.random.key(0), (b, t, d))
    head = 0.5 * jax.random.normal(jax.random.key(1), (v, d))
    targets = jax.random.randint(jax.random.key(2), (b, t), 0, v, dtype=jnp.int32)
    weights = jax.random.uniform(jax.random.key(3), (b, t))
    f64, h64, w64 = (np.asarray(a, np.float64) for a in (feats, head, weights))
    logits = f64 @ h64.T
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    probs = np.exp(logits - lse[..., None])
    g = (probs - np.eye(v)[np.asarray(targets)]) * w64[..., None]
    want_df, want_dh = g @ h64, np.einsum("btv,btd->vd", g, f64)
    fn = lambda f, h: train.fused_cross_entropy(f, h, targets, weights, chunk_size=4)  # noqa: E731
    value, (df, dh) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(feats, head)
    np.testing.assert_allclose(value, (w64 * nll).sum(), rtol=1e-5)
    np.testing.assert_allclose(df, want_df, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dh, want_dh, rtol=1e-5, atol=1e-6)
    # The cotangent scales the precomputed gradients: d(3 * loss) = 3 * d(loss).
    df3 = jax.grad(lambda f: 3.0 * fn(f, head))(feats)
    np.testing.assert_allclose(df3, 3.0 * want_df, rtol=1e-5, atol=1e-6)


def test_fused_loss_in_bfloat16_tracks_float32():
    # bf16 features and head (the training precision): close to the fp32 loss, gradients bf16.
    b, t, d, v = 2, 16, 32, 64
    feats = jax.random.normal(jax.random.key(0), (b, t, d))
    head = 0.2 * jax.random.normal(jax.random.key(1), (v, d))
    targets = jax.random.randint(jax.random.key(2), (b, t), 0, v, dtype=jnp.int32)
    fn = lambda f, h: train.fused_cross_entropy(f, h, targets, chunk_size=5)  # noqa: E731
    ref = fn(feats, head)
    bf = jnp.bfloat16
    value, (df, dh) = jax.value_and_grad(fn, argnums=(0, 1))(feats.astype(bf), head.astype(bf))
    assert value.dtype == jnp.float32 and df.dtype == bf and dh.dtype == bf
    np.testing.assert_allclose(value, ref, rtol=2e-2)  # bf16 inputs: ~3 significant digits


def test_auto_chunk_size_bounds_logit_memory():
    # GPT-2 124M at batch 16 x 1024: at most 512 MiB of float32 logits per chunk, a power of two.
    c = train.auto_chunk_size(16, 1024, 50304)
    assert c == 128 and 16 * c * 50304 * 4 <= 512 * 2**20
    assert train.auto_chunk_size(4, 12, 256) == 12  # small problems: one chunk
    assert train.auto_chunk_size(1024, 4096, 128256) == 1


def test_fused_cross_entropy_errors():
    f = jnp.zeros((2, 4, 8))
    h = jnp.zeros((10, 8))
    t = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ShapeError, match=r"features \(batch, seq, embed\) and targets \(batch, seq\); got \(4, 8\)"):
        train.fused_cross_entropy(f[0], h, t)
    with pytest.raises(ShapeError, match=r"head must be \(vocab, embed=8\); got \(10, 7\)"):
        train.fused_cross_entropy(f, jnp.zeros((10, 7)), t)
    with pytest.raises(ShapeError, match="targets must be integer class ids; got dtype float32"):
        train.fused_cross_entropy(f, h, t.astype(jnp.float32))
    with pytest.raises(ShapeError, match=r"weights \(2, 3\) must match targets \(2, 4\)"):
        train.fused_cross_entropy(f, h, t, jnp.ones((2, 3)))
    # a negative target has weight 0, as in cross_entropy (it indexed the head from its end)
    feats, head = jax.random.normal(jax.random.key(0), (2, 4, 8)), jax.random.normal(jax.random.key(1), (10, 8))
    targets = jnp.array([[1, -100, 3, 4], [-1, 2, 2, 9]])
    keep = (targets >= 0).astype(jnp.float32)
    np.testing.assert_allclose(
        train.fused_cross_entropy(feats, head, targets),
        train.fused_cross_entropy(feats, head, jnp.maximum(targets, 0), keep), rtol=LOSS_TOL,
    )
    with pytest.raises(ConfigError, match="chunk_size must be a positive integer, got -1"):
        train.fused_cross_entropy(f, h, t, chunk_size=-1)


def test_lm_loss_errors(gpt2, unchecked):
    tokens = jnp.zeros((12,), jnp.int32)
    with pytest.raises(ShapeError, match=r"one shape \(batch, seq\); got \(12,\) and \(12,\)"):
        train.lm_loss(gpt2, {"tokens": tokens, "targets": tokens})
    with pytest.raises(ConfigError, match="chunk_size must be a positive integer, got 0"):
        train.lm_loss(gpt2, _batch(False), chunk_size=0)
    with pytest.raises(ConfigError, match=r"implementation must be one of \('fused', 'chunked', 'full'\), got 'flash'"):
        train.lm_loss(gpt2, _batch(False), implementation="flash")
    with pytest.raises(ConfigError, match=r"lm_loss needs batch\['tokens'\] and batch\['targets'\].*has no \['targets'\] \(its keys: \['tokens'\]\)"):
        train.lm_loss(gpt2, {"tokens": _batch(False)["tokens"]})
    batch = _batch(False)
    # A (tokens, targets) tuple reached `"tokens" in batch`: "The truth value of an array ... is ambiguous"
    with unchecked(), pytest.raises(ConfigError, match=r"lm_loss takes the batch as a dict of arrays with the keys \['tokens', 'targets'\]; got a tuple of 2 entries\. Name its entries: \{'tokens': \.\.\., 'targets': \.\.\.\}"):
        train.lm_loss(gpt2, (batch["tokens"], batch["targets"]))
    with unchecked(), pytest.raises(ConfigError, match=r"lm_loss takes the batch as a dict .*got an array of shape \(2, 12\)"):
        train.lm_loss(gpt2, batch["tokens"])
    plain = eqx.nn.Linear(4, 4, key=jax.random.key(0))  # a model without features/head_weight
    with pytest.raises(ConfigError, match=r"needs a model with `features` and `head_weight`.*Linear has not\. Use implementation='full'"):
        train.lm_loss(plain, _batch(False))


@pytest.mark.parametrize("implementation", ["fused", "full"])
def test_fused_loss_never_forms_the_whole_batch_logits(implementation, create):
    # Structural check on the compiled program (bf16 compute, as in training): the fused loss
    # holds only (batch, chunk, vocab) logits; the full path, for contrast, the whole batch's.
    model = create("tiny-gpt2", key=jax.random.key(0), max_seq=64, vocab_size=512)
    model = train.cast_floating(model, jnp.dtype(jnp.bfloat16))
    tokens = jnp.zeros((4, 64), jnp.int32)
    batch = {"tokens": tokens, "targets": tokens}

    def loss(m):
        return train.lm_loss(m, batch, implementation=implementation, chunk_size=16)[0]

    hlo = jax.jit(jax.grad(loss)).lower(model).compile().as_text()
    whole = len(re.findall(r"(?:f32|bf16)\[4,64,512\]", hlo))
    chunks = len(re.findall(r"(?:f32|bf16)\[(?:4,16|64),512\]", hlo))  # 3-d or as (rows, vocab)
    if implementation == "fused":
        assert whole == 0 and chunks > 0
    else:
        assert whole > 0


class _EmbedLM(eqx.Module):
    """The least a model needs for the fused/chunked `lm_loss`: features and a head (tied)."""

    embed: jax.Array

    def features(self, tokens):
        return jnp.tanh(self.embed[tokens])

    def head_weight(self):
        return self.embed


@pytest.mark.parametrize("implementation", ["fused", "chunked"])
def test_eager_lm_loss_compiles_its_head_once(implementation, compile_log):
    # Called eagerly (a notebook), the head's chunk loop was a new scan on every call and
    # compiled again each time (a forward and a grad: 2 programs with `fused`, 3 with `chunked`).
    model = _EmbedLM(jax.random.normal(jax.random.key(0), (256, 16)))
    batch = _batch(mask=True)
    loss = lambda m: train.lm_loss(m, batch, implementation=implementation, chunk_size=5)[0]  # noqa: E731
    want, want_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))(model)
    first, first_grad = loss(model), eqx.filter_grad(loss)(model)  # eager: compiles
    with compile_log() as log:
        again, grad = loss(model), eqx.filter_grad(loss)(model)
    assert log.compiled == [], log.compiled
    np.testing.assert_array_equal(again, first)
    np.testing.assert_allclose(again, want, rtol=1e-6)  # float32: eager against jitted, same head program
    np.testing.assert_allclose(grad.embed, want_grad.embed, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grad.embed, first_grad.embed)


def test_classification_loss_names_the_keys_it_reads(unchecked):
    # A batch keyed "image"/"label" met a bare KeyError: 'x'; a tuple, "tuple indices must be integers".
    model = eqx.nn.Linear(4, 3, key=jax.random.key(0))
    x, y = jnp.ones((2, 4)), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ConfigError, match=r"classification_loss needs batch\['x'\] \(the inputs\) and batch\['y'\] \(integer labels\); the batch has no \['x', 'y'\] \(its keys: \['image', 'label'\]\)"):
        train.classification_loss(model, {"image": x, "label": y})
    with unchecked(), pytest.raises(ConfigError, match=r"classification_loss takes the batch as a dict of arrays with the keys \['x', 'y'\]; got a tuple"):
        train.classification_loss(model, (x, y))
    loss, metrics = train.classification_loss(model, {"x": x, "y": y})
    assert np.isfinite(float(loss)) and 0.0 <= float(metrics["accuracy"]) <= 1.0
