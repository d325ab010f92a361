"""Preference tuning: sequence log-probabilities against the logits, DPO's value at the
reference, its gradient's direction, and a toy preference learned."""

import contextlib
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqzoo import train
from eqzoo._errors import ConfigError, ShapeError

TOL = 1e-5  # fp32


# Compiled once per model structure and shape (called eagerly, the model's layer stack runs op
# by op, each operation its own compiled program on first use).
_sequence_logprobs = eqx.filter_jit(train.sequence_logprobs)
_dpo_loss = eqx.filter_jit(train.dpo_loss)
_dpo_value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(train.dpo_loss, has_aux=True))


@pytest.fixture(scope="module")
def model(create):
    return create("tiny-llama", key=jax.random.key(0), max_seq=16)


def _rows(seed, n=4, seq=12, vocab=256):
    toks = jax.random.randint(jax.random.key(seed), (n, seq + 1), 1, vocab, dtype=jnp.int32)
    mask = jnp.arange(seq)[None, :] >= jnp.arange(2, 2 + n)[:, None]  # prompts of 2, 3, ... tokens
    return toks[:, :-1], toks[:, 1:], mask


def test_sequence_logprobs_sum_the_masked_target_logprobs(model):
    tokens, targets, mask = _rows(1)
    got = eqx.filter_jit(train.sequence_logprobs)(model, tokens, targets, mask, chunk_size=5)
    logp = jax.nn.log_softmax(eqx.filter_jit(lambda m, t: jax.vmap(m)(t))(model, tokens).astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(got, jnp.sum(jnp.where(mask, picked, 0.0), axis=-1), rtol=TOL, atol=TOL)
    assert got.shape == (4,) and got.dtype == jnp.float32


def _dpo_batch(policy, chosen, rejected):
    (ct, cy, cm), (rt, ry, rm) = chosen, rejected
    return {
        "chosen_tokens": ct, "chosen_targets": cy, "chosen_mask": cm,
        "rejected_tokens": rt, "rejected_targets": ry, "rejected_mask": rm,
        "ref_chosen_logprobs": _sequence_logprobs(policy, ct, cy, cm),
        "ref_rejected_logprobs": _sequence_logprobs(policy, rt, ry, rm),
    }


def test_dpo_at_the_reference_is_log_two_and_its_gradient_favours_chosen(model):
    batch = _dpo_batch(model, _rows(2), _rows(3))
    (loss, metrics), grads = _dpo_value_and_grad(model, batch)
    assert abs(float(loss) - np.log(2.0)) < TOL and abs(float(metrics["reward_margin"])) < TOL
    # A small step down the gradient raises the chosen responses' reward over the rejected ones.
    stepped = eqx.apply_updates(model, jax.tree.map(lambda g: -1e-2 * g, grads))
    _, after = _dpo_loss(stepped, batch)
    assert float(after["reward_margin"]) > 0 and float(after["chosen_reward"]) > float(after["rejected_reward"])
    # Label smoothing: the value at the reference is still log 2.
    smoothed, _ = _dpo_loss(model, batch, label_smoothing=0.2)
    assert abs(float(smoothed) - np.log(2.0)) < TOL


def test_dpo_training_learns_a_toy_preference(model):
    """Chosen responses repeat token 7, rejected ones token 9, after random prompts."""
    prompts = jax.random.randint(jax.random.key(4), (8, 4), 20, 250, dtype=jnp.int32)

    def side(answer):
        seq = jnp.concatenate([prompts, jnp.full((8, 9), answer, jnp.int32)], axis=1)
        mask = jnp.arange(12)[None, :] >= 3  # targets from the last prompt token on
        return seq[:, :-1], seq[:, 1:], jnp.broadcast_to(mask, (8, 12))

    batch = _dpo_batch(model, side(7), side(9))
    optimizer = optax.adam(3e-3)
    loss_fn = functools.partial(train.dpo_loss, beta=0.5)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes weak types
        state = train.TrainState.create(jax.tree.map(lambda a: jnp.array(a, copy=True) if eqx.is_array(a) else a, model),
                                        optimizer, key=jax.random.key(5))
        step = train.make_train_step(loss_fn, optimizer)
        for _ in range(15):
            state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.3 and float(metrics["reward_accuracy"]) == 1.0, metrics


def test_preference_errors(model, unchecked):
    batch = _dpo_batch(model, _rows(2), _rows(3))
    with pytest.raises(ConfigError, match=r"the batch lacks \['ref_rejected_logprobs'\]"):
        train.dpo_loss(model, {k: v for k, v in batch.items() if k != "ref_rejected_logprobs"})
    with pytest.raises(ConfigError, match=r"dpo_loss takes the batch as a dict of arrays with the keys \['chosen_tokens', .*got a list of 8 entries"):
        with unchecked():
            train.dpo_loss(model, list(batch.values()))
    with pytest.raises(ConfigError, match=r"beta must be a positive number, got 0"):
        train.dpo_loss(model, batch, beta=0)
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 0.5\)"):
        train.dpo_loss(model, batch, label_smoothing=0.5)
    with pytest.raises(ShapeError, match=r"give one rejected sequence and one reference log-probability per pair"):
        train.dpo_loss(model, {**batch, "ref_rejected_logprobs": batch["ref_rejected_logprobs"][:3]})
    tokens, targets, mask = _rows(1)
    with pytest.raises(ShapeError, match=r"sequence_logprobs: mask must have the tokens' shape \(4, 12\); got \(4, 11\)"):
        train.sequence_logprobs(model, tokens, targets, mask[:, 1:])


@pytest.mark.parametrize("checked", [True, False])
def test_sequence_logprobs_takes_numpy_and_unsigned_tokens_and_checks_the_batch(model, checked, unchecked):
    tokens, targets, mask = _rows(1)
    want = train.sequence_logprobs(model, tokens, targets, mask)
    with contextlib.nullcontext() if checked else unchecked():
        # NumPy and uint16 token corpora: the NumPy ones were rejected with checking on.
        for dtype in (np.int32, np.int64, np.uint16):
            got = train.sequence_logprobs(model, np.asarray(tokens, dtype), np.asarray(targets, dtype), np.asarray(mask))
            np.testing.assert_allclose(got, want, rtol=0, atol=0)
        # With checking on these were ~2,900-character errors that printed the whole model.
        with pytest.raises(ShapeError, match=r"one shape \(batch, seq\); got \(12,\) and \(12,\)"):
            train.sequence_logprobs(model, tokens[0], targets[0])
        with pytest.raises(ShapeError, match=r"integer tokens; got dtype float32\. Convert with tokens\.astype"):
            train.sequence_logprobs(model, tokens.astype(jnp.float32), targets)
        with pytest.raises(ShapeError, match=r"integer targets; got dtype float32"):
            train.sequence_logprobs(model, tokens, targets.astype(jnp.float32))
        with pytest.raises(ShapeError, match=r"bool or floating-point mask; got dtype int32"):
            train.sequence_logprobs(model, tokens, targets, mask.astype(jnp.int32))
        with pytest.raises(ConfigError, match=r"needs a language model with `features` and `head_weight`"):
            train.sequence_logprobs(lambda t: t, tokens, targets)
