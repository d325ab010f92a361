"""Beam search and beam sampling: their errors, the sampling law and keys (the reference tests
against transformers are in tests/hf/test_generate.py)."""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo._errors import ConfigError, ShapeError
from eqzoo.generation import generate_beam
from eqzoo.hf import GenerationConfig

PROMPT = jnp.array([5, 17, 42, 7, 99], jnp.int32)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_beams=0), ConfigError, r"generate_beam: num_beams must be an integer >= 1, got 0"),
        (dict(num_beams=2, num_return_sequences=3), ConfigError,
         r"num_return_sequences=3 exceeds num_beams=2; .* Raise num_beams to at least 3"),
        (dict(max_new_tokens=0), ConfigError, r"generate_beam: max_new_tokens must be an integer >= 1, got 0"),
        (dict(max_new_tokens=None), ConfigError, r"generate_beam needs max_new_tokens=N .*or max_length=N"),
        (dict(max_new_tokens=None, max_length=4), ConfigError,
         r"generate_beam: max_length=4 counts the prompt too, and the prompt is 5 tokens wide, .*pass max_new_tokens=N"),
        (dict(max_new_tokens=20), ShapeError, r"prompt length 5 \+ max_new_tokens 20 = 25 exceeds the model's max_seq=24"),
        (dict(temperature=0.7, top_k=5), ConfigError,
         r"got \{'temperature': 0.7, 'top_k': 5\} with do_sample=False: beam search is deterministic .* For beam "
         r"sampling pass do_sample=True and a key"),
        (dict(do_sample="yes"), ConfigError, r"generate_beam: do_sample must be True or False, got 'yes'"),
        (dict(do_sample=True), ConfigError, r"beam sampling \(do_sample=True\) needs a PRNG key: pass key=jax.random.key"),
        (dict(do_sample=True, key=jax.random.key(0), temperature=0.0), ConfigError,
         r"beam sampling \(do_sample=True\) needs a temperature > 0 .*For the deterministic search pass do_sample=False"),
        (dict(do_sample=True, key=jax.random.key(0), top_p=1.5), ConfigError, r"top_p must be in \(0, 1\] or None, got 1.5"),
        (dict(num_beam=4), ConfigError, r"generate_beam got unexpected keyword arguments \['num_beam'\]"),
        (dict(stop_sequences=[[1, 2]]), ConfigError, r"generate_beam takes no stop_sequences: .*eqzoo.generate"),
        (dict(early_stopping="sometimes"), ConfigError, r"early_stopping must be True, False or 'never' .*got 'sometimes'"),
        (dict(length_penalty=float("nan")), ConfigError, r"length_penalty must be a finite number .*got nan"),
        (dict(repetition_penalty=0.0), ConfigError, r"repetition_penalty must be a finite number > 0 .*got 0.0"),
        (dict(eos_token=300), ConfigError, r"generate_beam: eos_token \[300\] holds ids \[300\] outside the model's vocabulary"),
    ],
)
def test_generate_beam_errors(gpt2, kwargs, error, match):
    # Each is refused before anything compiles, with the rule and the fix.
    kwargs = dict(max_new_tokens=4) | kwargs
    with pytest.raises(error, match=match):
        generate_beam(gpt2, PROMPT, **kwargs)


def test_generate_beam_needs_a_language_model():
    with pytest.raises(ConfigError, match=r"generate_beam needs an eqzoo language model .*got object"):
        generate_beam(object(), PROMPT, max_new_tokens=4)


def _without_replacement_law(p, draws, keep):
    """For categories of probabilities `p` (sorted best first), the law of the set of the
    `keep` best (lowest index) among `draws` drawn one at a time without replacement: exact,
    summed over every ordered draw."""
    law: dict[tuple[int, ...], float] = {}
    for seq in itertools.permutations(range(len(p)), draws):
        prob, left = 1.0, 1.0
        for i in seq:
            prob, left = prob * p[i] / left, left - p[i]
        best = tuple(sorted(seq)[:keep])
        law[best] = law.get(best, 0.0) + prob
    return law


def test_beam_sampling_draws_without_replacement(gpt2):
    # One step of beam sampling with 2 beams: top_k=6 leaves 6 candidates on the first beam
    # (the others start at -1e9), 4 (= 2 * num_beams) are drawn without replacement from the
    # softmax of their tempered log-probabilities, and the best 2 of those 4 (max_new_tokens=1:
    # every one stops) are returned, with their tempered log-probabilities as scores (1e-5).
    # Over 20,000 keys, vmapped in one compiled call, each pair's frequency is within 5 binomial
    # standard errors (plus 1e-3) of its exact probability, from the model's logits. Drawing
    # with replacement, or the top 4 deterministically, fails this.
    n = 20_000
    tokens, scores = jax.vmap(lambda key: generate_beam(
        gpt2, PROMPT, max_new_tokens=1, num_beams=2, num_return_sequences=2, return_scores=True, do_sample=True,
        key=key, temperature=6.0, top_k=6, top_p=0.999, min_p=1e-3,  # top_p and min_p keep all 6 here
    ))(jax.random.split(jax.random.key(0), n))
    logits = eqx.filter_jit(gpt2)(PROMPT)  # compiled: eagerly, the layer stack runs op by op
    logp = np.asarray(jax.nn.log_softmax(logits[-1].astype(jnp.float32)), np.float64) / 6.0
    best = np.argsort(-logp)[:6]
    p = np.exp(logp[best] - logp[best].max())
    law = _without_replacement_law(p / p.sum(), draws=4, keep=2)
    new = np.asarray(tokens)[:, :, -1]  # (n, 2): each draw's two hypotheses' one new token, best first
    np.testing.assert_allclose(np.asarray(scores), logp[new], rtol=0, atol=1e-5)
    rank = {int(tok): r for r, tok in enumerate(best)}
    pairs = [tuple(rank[int(t)] for t in row) for row in new]  # KeyError: a token outside the top 6
    assert all(a < b for a, b in pairs)  # sorted by score
    for pair, prob in law.items():
        freq = sum(q == pair for q in pairs) / n
        assert abs(freq - prob) <= 5 * np.sqrt(prob * (1 - prob) / n) + 1e-3, (pair, freq, prob)


def test_beam_sampling_keys_and_compiles(gpt2, compile_log):
    # The same key gives the same hypotheses; other keys, other hypotheses; a new key,
    # temperature, top_p or min_p value compiles nothing.
    settings = dict(max_new_tokens=6, num_beams=3, num_return_sequences=3, eos_token=7, do_sample=True, top_k=40)
    first = generate_beam(gpt2, PROMPT, key=jax.random.key(1), temperature=4.0, top_p=0.95, min_p=0.01, **settings)
    # A model whose arrays a train step donated: JAX said only "Array has been deleted" (this
    # search's program is compiled: failing in it costs nothing more)
    gone = jax.tree.map(lambda a: jnp.array(a, copy=True) if isinstance(a, jax.Array) else a, gpt2)
    for array in jax.tree.leaves(gone):
        array.delete()
    with pytest.raises(ConfigError, match=r"generate_beam: the model's arrays were deleted.*state\.model"):
        generate_beam(gone, PROMPT, key=jax.random.key(1), temperature=4.0, top_p=0.95, min_p=0.01, **settings)
    with compile_log("_beam_jit") as log:
        again = generate_beam(gpt2, PROMPT, key=jax.random.key(1), temperature=4.0, top_p=0.95, min_p=0.01, **settings)
        others = [
            generate_beam(gpt2, PROMPT, key=jax.random.key(k), temperature=t, top_p=p, min_p=m, **settings)
            for k, t, p, m in [(2, 4.0, 0.95, 0.01), (3, 3.0, 0.9, 0.02), (4, 5.0, 0.99, 0.03)]
        ]
        # The same search from a generation_config.json that sets max_length (prompt of 5 + 6).
        file = GenerationConfig(
            eos_token=(7,), max_length=11, num_beams=3, num_return_sequences=3, temperature=4.0, top_k=40, top_p=0.95, min_p=0.01,
        )
        from_file = generate_beam(gpt2, PROMPT, key=jax.random.key(1), **file.beam_kwargs())
    np.testing.assert_array_equal(np.asarray(from_file), np.asarray(first))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
    assert not all(np.array_equal(np.asarray(o), np.asarray(first)) for o in others)
    assert len(log.compiled) == 0, log.compiled
