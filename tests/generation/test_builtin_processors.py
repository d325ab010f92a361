"""The ready-made processors: the same bans as transformers' own processors, and in generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo._errors import ConfigError
from eqzoo.generation import (
    BannedSequences,
    BeforePenalty,
    MinLength,
    MinNewTokens,
    NoRepeatNGram,
    SequenceBias,
    SuppressTokens,
    SuppressTokensAtBegin,
    generate_batch,
)

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")

VOCAB = 256  # tiny-gpt2's
PROMPTS = np.array([[4, 9, 4, 9, 4], [3, 3, 0, 0, 0]], np.int32)  # bigrams that repeat
LENGTHS = np.array([5, 2])
NEW = 8


@pytest.fixture(scope="module")
def greedy(gpt2):
    return np.asarray(generate_batch(gpt2, PROMPTS, LENGTHS, max_new_tokens=NEW))


def _against_transformers(ours, theirs, *, prompt_len=3, vocab=10, total=14, rows=24, seed=0, plant=()):
    """Our processor and transformers' on the same random logits and token histories (ids from
    a small alphabet, so n-grams and phrases recur; each row at its own length, the buffer past
    it filled with other ids that must be ignored; `plant` written just before the position
    in every other row long enough): the same ids at -inf, exactly, and every other logit
    unchanged (tolerance 0: neither does arithmetic on them). Returns the banned mask."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    tokens = rng.integers(0, 4, size=(rows, total)).astype(np.int32)
    lengths = rng.integers(prompt_len, total, size=rows).astype(np.int32)  # the position being chosen
    for r in range(0, rows, 2):
        if plant and lengths[r] >= len(plant):
            tokens[r, lengths[r] - len(plant) : lengths[r]] = plant
    got = np.asarray(jax.jit(jax.vmap(ours))(logits, tokens, lengths, lengths - prompt_len))
    for r, n in enumerate(lengths):
        want = theirs(torch.as_tensor(tokens[None, r, :n], dtype=torch.long), torch.as_tensor(logits[None, r]))[0].numpy()
        np.testing.assert_array_equal(np.isneginf(got[r]), np.isneginf(want), err_msg=f"row {r}, length {n}")
        np.testing.assert_array_equal(got[r], want)
    return np.isneginf(got)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_bans_what_transformers_bans(n):
    banned = _against_transformers(NoRepeatNGram(n), lp.NoRepeatNGramLogitsProcessor(n), seed=n)
    assert banned.any() and not banned.all()


def test_banned_sequences_ban_what_transformers_bans():
    # one-token, two-token and a phrase longer than some rows' history; one starting like another
    long = [3, 1, 2, 0, 3, 1, 2, 5]  # its prefix planted in some rows; others are too short for it
    sequences = [[2], [1, 3], [0, 0, 1], long]
    kw = dict(prompt_len=1, seed=4, plant=long[:-1])
    banned = _against_transformers(BannedSequences(sequences), lp.NoBadWordsLogitsProcessor(sequences), **kw)
    assert banned[:, 2].all() and banned[:, [1, 3, 5]].any(axis=0).all() and not banned[:, [1, 3, 5]].all(axis=0).any()
    # padded to a larger shape: the same bans
    _against_transformers(BannedSequences(sequences, pad_to=(6, 12)), lp.NoBadWordsLogitsProcessor(sequences), **kw)


def test_min_tokens_and_suppression_ban_what_transformers_bans():
    # prompt length 3: transformers' MinNewTokens skips it, MinLength counts it; begin_index is
    # the prompt's length (a decoder-only model's first generated token)
    _against_transformers(MinNewTokens(4, [2, 7]), lp.MinNewTokensLengthLogitsProcessor(3, 4, [2, 7]))
    _against_transformers(MinLength(6, 5), lp.MinLengthLogitsProcessor(6, 5))
    _against_transformers(SuppressTokens([1, 8]), lp.SuppressTokensLogitsProcessor([1, 8]))
    # rows of every length, some at step 0
    banned = _against_transformers(
        SuppressTokensAtBegin([0, 9]), lp.SuppressTokensAtBeginLogitsProcessor([0, 9], 3), total=5, rows=12, seed=1
    )
    assert banned.any() and not banned.all()


def test_sequence_bias_adds_what_transformers_adds():
    # one-token (always), two ending in the same token (their biases add where both match), a
    # ban (-inf), and a phrase longer than some rows' history; biases exact in float32, so the
    # sums' order cannot matter: the same logits exactly (tolerance 0)
    long = (3, 1, 2, 0, 3, 1, 2, 5)
    bias = {(2,): 1.5, (1, 3): -2.0, (0, 1, 3): 0.75, (0, 0): -float("inf"), long: 4.25}
    kw = dict(prompt_len=1, seed=5, plant=long[:-1])
    banned = _against_transformers(SequenceBias(bias), lp.SequenceBiasLogitsProcessor(bias), **kw)
    assert banned[:, 0].any() and not banned[:, 0].all()
    # as a list of pairs, and padded to a larger shape: the same
    pairs = [[list(k), v] for k, v in bias.items()]
    _against_transformers(SequenceBias(pairs, pad_to=(7, 10)), lp.SequenceBiasLogitsProcessor(pairs), **kw)
    # the row [0, 1] before position 2: 3 gets -2.0 + 0.75, 2 gets 1.5, the rest nothing
    got = SequenceBias(bias)(jnp.zeros(6), jnp.array([0, 1, 4, 4]), jnp.int32(2), jnp.int32(0))
    np.testing.assert_array_equal(got, [0.0, 0.0, 1.5, -1.25, 0.0, 0.0])


def test_before_penalty_orders_sequence_bias_and_the_penalty_as_transformers():
    # transformers' list for sequence_bias + repetition_penalty + no_repeat_ngram_size: the bias,
    # the penalty, the n-gram ban. eqzoo's loop step (apply_processors) with the bias wrapped in
    # BeforePenalty gives the same logits (the same bans exactly; the values within one float32
    # rounding, rtol 1e-6: XLA may divide by the penalty as a multiply by its reciprocal);
    # unwrapped, the bias is added after the penalty and seen ids' values move by far more.
    from eqzoo.generation._processors import apply_processors
    from eqzoo.generation._sampling import penalize_repeats

    bias = {(2,): 1.5, (1, 3): -2.0, (0,): 3.0}
    rng = np.random.default_rng(6)
    logits = (rng.normal(size=(24, 10)) * 3).astype(np.float32)
    tokens = rng.integers(0, 4, size=(24, 14)).astype(np.int32)
    lengths = rng.integers(3, 14, size=24).astype(np.int32)

    def step(processors, logits, tokens, position):
        seen = jnp.zeros((10,), bool).at[jnp.where(jnp.arange(14) < position, tokens, 10)].set(True, mode="drop")
        return apply_processors(logits, tokens, position, position - 3, logit_bias=None, processors=processors,
                                penalize=lambda s: penalize_repeats(s, seen, jnp.float32(1.5)))

    def run(processors):
        return np.asarray(jax.jit(jax.vmap(lambda *a: step(processors, *a)))(logits, tokens, lengths))

    theirs = [lp.SequenceBiasLogitsProcessor(bias), lp.RepetitionPenaltyLogitsProcessor(1.5), lp.NoRepeatNGramLogitsProcessor(2)]
    want = np.stack([logits[r] for r in range(24)])
    for r, n in enumerate(lengths):
        row = torch.as_tensor(logits[None, r])
        for proc in theirs:
            row = proc(torch.as_tensor(tokens[None, r, :n], dtype=torch.long), row)
        want[r] = row[0].numpy()
    got = run((BeforePenalty(SequenceBias(bias)), NoRepeatNGram(2)))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    after = run((SequenceBias(bias), NoRepeatNGram(2)))
    finite = np.isfinite(want)
    assert np.abs(after - want)[finite].max() > 0.5


def test_before_penalty_refuses_what_is_not_a_processor():
    with pytest.raises(ConfigError, match=r"BeforePenalty wraps a logits processor, fn\(logits, tokens, position, step\) -> logits; got 3"):
        BeforePenalty(3)
    inner = SequenceBias({(1,): 1.0})
    assert BeforePenalty(BeforePenalty(inner)).processor is inner  # wrapping twice is wrapping once


def _bigrams(row):
    return list(zip(row[:-1], row[1:], strict=True))


def test_greedy_generation_with_no_repeat_bigram_never_repeats_one(gpt2, greedy):
    # Generation with NoRepeatNGram(2) over prompts whose bigrams repeat, and a tiny model that
    # otherwise loops: no bigram of the row (prompt included) completes twice.
    out = np.asarray(generate_batch(gpt2, PROMPTS, LENGTHS, max_new_tokens=NEW, logits_processors=[NoRepeatNGram(2)]))
    assert any(len(set(_bigrams(f[: n + NEW]))) < n + NEW - 1 for f, n in zip(greedy.tolist(), LENGTHS, strict=True))
    for row, n in zip(out.tolist(), LENGTHS, strict=True):
        row = row[: n + NEW]
        generated = _bigrams(row)[n - 1 :]  # the bigrams each generated token completes
        assert len(set(generated)) == len(generated) and not set(_bigrams(row[:n])) & set(generated), row


def test_min_new_tokens_delays_eos_and_another_value_compiles_nothing(gpt2, greedy, compile_log):
    eos = int(greedy[0, 5 + 1])  # row 0's second token: greedy decoding with this eos stops there
    kw = dict(max_new_tokens=NEW, eos_token=eos, pad_token=0)
    out = np.asarray(generate_batch(gpt2, PROMPTS, LENGTHS, logits_processors=[MinNewTokens(4, eos)], **kw))
    assert eos not in out[0, 5 : 5 + 4].tolist() and eos not in out[1, 2 : 2 + 4].tolist()
    assert out[0, 5] == greedy[0, 5] and out[0, 6] != eos
    with compile_log() as log:
        again = np.asarray(generate_batch(gpt2, PROMPTS, LENGTHS, logits_processors=[MinNewTokens(1, [eos])], **kw))
    assert log.compiled == []  # the count is traced (and the ids: an array of the same length)
    np.testing.assert_array_equal(again[0, : 5 + 2], greedy[0, : 5 + 2])  # eos allowed from step 1: it stops there
    assert (again[0, 5 + 2 :] == 0).all()


def test_built_in_processors_refuse_bad_arguments():
    with pytest.raises(ConfigError, match=r"NoRepeatNGram: n must be an integer >= 1, got 0"):
        NoRepeatNGram(0)
    with pytest.raises(ConfigError, match=r"MinNewTokens: min_new_tokens must be an integer >= 0, got -1"):
        MinNewTokens(-1, 2)
    with pytest.raises(ConfigError, match=r"MinLength: eos_tokens is empty; give at least one token id"):
        MinLength(3, [])
    with pytest.raises(ConfigError, match=r"SuppressTokens: ids must hold token ids \(integers >= 0\); got \[1, -2\]"):
        SuppressTokens([1, -2])
    with pytest.raises(ConfigError, match=r"BannedSequences: sequences must be a non-empty list of token-id lists"):
        BannedSequences([])
    with pytest.raises(ConfigError, match=r"BannedSequences: sequences\[1\] is empty"):
        BannedSequences([[1], []])
    with pytest.raises(ConfigError, match=r"pad_to must be a \(count, longest\) tuple of ints at least \(2, 2\)"):
        BannedSequences([[1], [2, 3]], pad_to=(2, 1))
    with pytest.raises(ConfigError, match=r"SequenceBias: sequence_bias must be a non-empty mapping of token-id tuple to bias"):
        SequenceBias({})
    with pytest.raises(ConfigError, match=r"SequenceBias: the bias of \(1, 2\) must be a number \(not NaN\), got nan"):
        SequenceBias({(1, 2): float("nan")})
    with pytest.raises(ConfigError, match=r"SequenceBias: sequence 1 must hold token ids \(integers >= 0\); got \[-1\]"):
        SequenceBias([([1], 1.0), ([-1], 2.0)])


def test_ids_outside_the_vocabulary_are_refused_by_generate(gpt2):
    with pytest.raises(ConfigError, match=r"logits_processors\[1\] \(BannedSequences\) holds ids \[256, 300\] outside the model's vocabulary \[0, 256\)"):
        generate_batch(gpt2, PROMPTS, LENGTHS, max_new_tokens=2, logits_processors=[NoRepeatNGram(2), BannedSequences([[300], [1, 256]])])
    with pytest.raises(ConfigError, match=r"logits_processors\[0\] \(SequenceBias\) holds ids \[999\] outside"):
        generate_batch(gpt2, PROMPTS, LENGTHS, max_new_tokens=2, logits_processors=[SequenceBias({(999, 1): 1.0})])
