"""Speculative decoding: the model's own greedy tokens, whatever the draft proposes."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo import models
from eqzoo._errors import ConfigError, ShapeError
from eqzoo.generation import generate_batch, generate_speculative

NEW = 12


def _scaled(preset, seed, **overrides):
    # init_std is 0.02: scale the weights up so greedy decoding does not just repeat one token.
    model = models.create(preset, key=jax.random.key(seed), max_seq=40, **overrides)
    return jax.tree.map(lambda a: 4 * a if eqx.is_inexact_array(a) else a, model)


@pytest.fixture(scope="module")
def llama():
    return _scaled("tiny-llama", 0, num_layers=3)


def _prompts():
    prompts = jax.random.randint(jax.random.key(5), (3, 7), 0, 256, dtype=jnp.int32)
    return prompts, jnp.array([7, 2, 5], jnp.int32)


@pytest.mark.parametrize("draft_kind", ["other-model", "first-layer", "itself"])
def test_equals_the_models_greedy_decoding(llama, draft_kind):
    draft = {
        "other-model": lambda: _scaled("tiny-gpt2", 1),  # another family, same vocabulary
        "first-layer": lambda: eqx.tree_at(lambda m: m.blocks, llama, llama.blocks.first(1)),
        "itself": lambda: llama,
    }[draft_kind]()
    prompts, lengths = _prompts()
    reference = generate_batch(llama, prompts, lengths, max_new_tokens=NEW)
    out, stats = generate_speculative(llama, draft, prompts, lengths, max_new_tokens=NEW, num_draft=3, return_stats=True)
    np.testing.assert_array_equal(out, reference)
    rounds = np.asarray(stats["rounds"])
    assert ((rounds >= NEW // 4) & (rounds <= NEW)).all()
    if draft_kind == "itself":  # the prefill's token, then every proposal kept: 4 tokens a round
        assert (rounds == -(-(NEW - 1) // 4)).all()


def test_eos_and_a_mixture_of_experts_model(llama):
    mixtral = _scaled("tiny-mixtral", 2, num_experts=8)
    prompts, lengths = _prompts()
    reference = generate_batch(mixtral, prompts, lengths, max_new_tokens=NEW)
    eos = int(reference[0, 7 + 3])  # a token row 0 produces on its 4th step
    reference = generate_batch(mixtral, prompts, lengths, max_new_tokens=NEW, eos_token=eos, pad_token=3)
    out = generate_speculative(mixtral, llama, prompts, lengths, max_new_tokens=NEW, num_draft=2, eos_token=eos, pad_token=3)
    np.testing.assert_array_equal(out, reference)
    assert (np.asarray(out[0, 7 + 4 :]) == 3).all()


def test_capacity_experts_check_without_dropping(llama):
    # "capacity" may drop assignments when several tokens go through at once (the prefill, the
    # one-pass check), never for one token: the output is still generate_batch's (checking in
    # "capacity" gives other tokens here).
    mixtral = _scaled("tiny-mixtral", 3, moe_implementation="capacity")
    prompts, lengths = _prompts()
    reference = generate_batch(mixtral, prompts, lengths, max_new_tokens=NEW)
    for draft in (mixtral, llama):
        out = generate_speculative(mixtral, draft, prompts, lengths, max_new_tokens=NEW, num_draft=4)
        np.testing.assert_array_equal(out, reference)


def test_bad_calls(llama):
    prompts, _ = _prompts()
    with pytest.raises(ConfigError, match=r"draft's vocabulary \(512\) differs from the model's \(256\)"):
        generate_speculative(llama, _scaled("tiny-llama", 1, vocab_size=512), prompts, max_new_tokens=4)
    with pytest.raises(ConfigError, match=r"num_draft must be a positive integer, got 0"):
        generate_speculative(llama, llama, prompts, max_new_tokens=4, num_draft=0)
    with pytest.raises(ShapeError, match=r"7 \+ max_new_tokens 31 \+ one round's lookahead 3 = 41 exceeds the model's max_seq=40"):
        generate_speculative(llama, llama, prompts, max_new_tokens=31)
    full = generate_speculative(llama, llama, prompts, max_new_tokens=30, num_draft=4)  # 7 + 30 + 3 = 40: fits
    np.testing.assert_array_equal(full, generate_batch(llama, prompts, max_new_tokens=30))
    with pytest.raises(ShapeError, match=r"each prompt length must be in \[1, 7\]"):
        generate_speculative(llama, llama, prompts, jnp.array([0, 1, 2]), max_new_tokens=4)
    with pytest.raises(ConfigError, match=r"Stacked.first: n must be between 1 and num_layers=3, got 4"):
        llama.blocks.first(4)
    with pytest.raises(ConfigError, match=r"draft must be an eqzoo language model; got MLP"):
        generate_speculative(llama, models.create("mlp-small", key=jax.random.key(0)), prompts, max_new_tokens=4)
    with pytest.raises(ConfigError, match=r"max_new_tokens must be >= 1, got 0"):
        generate_speculative(llama, llama, prompts, max_new_tokens=0)
    with pytest.raises(ShapeError, match=r"integer prompts of shape \(batch, seq\); got \(7,\)"):
        generate_speculative(llama, llama, prompts[0], max_new_tokens=4)
    with pytest.raises(ConfigError, match=r"MoE implementation must be one of .* got 'sparse'"):
        _scaled("tiny-mixtral", 0).blocks.layers.mlp.with_implementation("sparse")
