"""Losses: cross-entropy against its formula; the chunked LM loss against the full one."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo import models, train
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


@pytest.fixture(scope="module")
def gpt2():
    # tied embeddings: the head's gradient and the embedding's gradient meet in one leaf
    return models.create("tiny-gpt2", key=jax.random.key(0), max_seq=32, num_layers=1)


def _batch(mask: bool):
    tokens = jax.random.randint(jax.random.key(3), (2, 13), 0, 256, dtype=jnp.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    if mask:
        batch["mask"] = jnp.arange(12)[None, :] < jnp.array([[12], [7]])
    return batch


@eqx.filter_jit
def _loss_and_grads(model, batch, chunk_size):
    fn = lambda m: train.lm_loss(m, batch, chunk_size=chunk_size)  # noqa: E731
    return eqx.filter_value_and_grad(fn, has_aux=True)(model)


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_chunked_loss_equals_full_loss_and_grads(gpt2, mask):
    batch = _batch(mask)
    (full, aux), full_grads = _loss_and_grads(gpt2, batch, None)
    # a ragged last chunk; one chunk longer than the sequence
    for chunk in (5,) if mask else (5, 64):
        (loss, aux_c), grads = _loss_and_grads(gpt2, batch, chunk)
        np.testing.assert_allclose(loss, full, atol=1e-5, rtol=1e-5)
        assert float(aux_c["tokens"]) == float(aux["tokens"]) == (19.0 if mask else 24.0)
        for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads), strict=True):
            np.testing.assert_allclose(g, g0, atol=1e-5, rtol=1e-5)


def test_lm_loss_errors(gpt2):
    tokens = jnp.zeros((12,), jnp.int32)
    with pytest.raises(ShapeError, match=r"one shape \(batch, seq\); got \(12,\) and \(12,\)"):
        train.lm_loss(gpt2, {"tokens": tokens, "targets": tokens})
    with pytest.raises(ConfigError, match="chunk_size must be a positive integer, got 0"):
        train.lm_loss(gpt2, _batch(False), chunk_size=0)
