"""Decoding: the KV cache changes nothing, batches equal single prompts, eos, sampling, errors."""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqzoo
import eqzoo.hf
from eqzoo import models, nn
from eqzoo._errors import ConfigError, ShapeError
from eqzoo.generation import generate_batch, sample_logits
from eqzoo.generation._sampling import (
    check_sampling,
    check_stop_sequences,
    check_stop_tokens,
    top_k_setting,
    traced_settings,
)

NEW = 8  # tokens generated per call


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def lm(request):
    # init_std is 0.02: scale the weights up so greedy decoding does not just repeat one token.
    model = models.create(request.param, key=jax.random.key(0), max_seq=24)
    return jax.tree.map(lambda a: 8 * a if _is_float(a) else a, model)


@pytest.fixture(scope="module")
def llama():
    model = models.create("tiny-llama", key=jax.random.key(0), max_seq=24)
    return jax.tree.map(lambda a: 8 * a if _is_float(a) else a, model)


def _is_float(a):
    return isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating)


PROMPT = jnp.array([5, 17, 42, 7, 99], jnp.int32)


@eqx.filter_jit
def _forward(model, tokens):
    """The full forward pass, compiled once per model and length (called eagerly, a model's
    layer scan compiles anew on every call: ~1 s each on CI's CPUs)."""
    return model(tokens)


@pytest.fixture(scope="module")
def greedy(llama):
    return eqzoo.generate(llama, PROMPT, max_new_tokens=NEW)


def test_greedy_with_and_without_cache_agree(lm):
    cached = eqzoo.generate(lm, PROMPT, max_new_tokens=NEW)
    uncached = eqzoo.generate(lm, PROMPT, max_new_tokens=NEW, use_cache=False)
    assert cached.shape == (PROMPT.shape[0] + NEW,) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(cached[: PROMPT.shape[0]], PROMPT)
    np.testing.assert_array_equal(cached, uncached)
    assert len(set(np.asarray(cached[PROMPT.shape[0] :]).tolist())) > 1  # not a degenerate repeat
    # greedy: each new token is the argmax of the full forward pass over the tokens before it
    logits = _forward(lm, cached[:-1])
    np.testing.assert_array_equal(jnp.argmax(logits[PROMPT.shape[0] - 1 :], -1), cached[PROMPT.shape[0] :])


def test_unrolled_and_scanned_decode_loops_agree(lm):
    # Unrolling the layer loop (the GPU default) must give the same tokens as the model's scan.
    prompts = jnp.stack([PROMPT, jnp.roll(PROMPT, 2)])
    unrolled = generate_batch(lm, prompts, max_new_tokens=NEW, unroll_layers=True)
    scanned = generate_batch(lm, prompts, max_new_tokens=NEW, unroll_layers=False)
    np.testing.assert_array_equal(unrolled, scanned)
    np.testing.assert_array_equal(generate_batch(lm, prompts, max_new_tokens=NEW), scanned)  # "auto"
    assert lm.blocks.scan == "auto"  # the model passed in is left as it was


def test_unroll_auto_resolves_per_backend(llama):
    from eqzoo.generation import UNROLL_DECODE_DEFAULTS, resolve_unroll

    for backend, want in UNROLL_DECODE_DEFAULTS.items():
        assert resolve_unroll("auto", backend) is want
    assert resolve_unroll("auto", "cpu") is False and resolve_unroll("auto", "gpu") is True
    assert resolve_unroll(True, "cpu") is True
    with pytest.raises(ConfigError, match="unroll_layers must be True, False or 'auto', got 'always'"):
        generate_batch(llama, PROMPT[None], max_new_tokens=2, unroll_layers="always")


def test_batch_of_ragged_prompts_equals_one_at_a_time(llama):
    prompts = [PROMPT, jnp.array([3, 1], jnp.int32)]
    padded = jnp.stack([jnp.pad(p, (0, 5 - p.shape[0])) for p in prompts])
    lengths = jnp.array([p.shape[0] for p in prompts], jnp.int32)
    out = generate_batch(llama, padded, lengths, max_new_tokens=NEW, pad_token=0)
    assert out.shape == (2, 5 + NEW)
    for row, p in zip(out, prompts, strict=True):
        single = eqzoo.generate(llama, p, max_new_tokens=NEW)
        n = p.shape[0] + NEW
        np.testing.assert_array_equal(row[:n], single)
        np.testing.assert_array_equal(row[n:], 0)  # padding after prompt + new tokens


def test_eos_stops_and_pads(llama, greedy):
    n = PROMPT.shape[0]
    eos = int(greedy[n + 2])  # the third generated token
    first = n + int(np.argmax(np.asarray(greedy[n:]) == eos))  # where it first appears
    out = eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, eos_token=eos, pad_token=255)
    np.testing.assert_array_equal(out[: first + 1], greedy[: first + 1])  # up to and with eos
    assert first + 1 < out.shape[0] and bool(jnp.all(out[first + 1 :] == 255))


def test_decoding_stops_once_every_row_has_eos(llama, greedy, monkeypatch):
    # Each decode step reports the position it writes (instrumenting the real model): with eos
    # in every row the loop ends at the last row's eos; with a row that never produces it, it
    # runs all NEW steps. The tokens are those of the full loop either way.
    n = PROMPT.shape[0]
    eos = int(greedy[n + 2])
    first = n + int(np.argmax(np.asarray(greedy[n:]) == eos))
    positions = []
    decode = models.AbstractLM.decode

    def counted(self, tokens, cache, index, **kw):
        jax.debug.callback(lambda i: positions.append(int(np.max(i))), index)
        return decode(self, tokens, cache, index, **kw)

    monkeypatch.setattr(models.AbstractLM, "decode", counted)
    both = generate_batch(llama, jnp.stack([PROMPT, PROMPT]), max_new_tokens=NEW, eos_token=eos, pad_token=254)
    assert max(positions) == first  # eos is decoded at `first` in both rows, then the loop ends
    for row in both:
        np.testing.assert_array_equal(row[: first + 1], greedy[: first + 1])
        assert bool(jnp.all(row[first + 1 :] == 254))

    positions.clear()
    other = jnp.roll(PROMPT, 2)
    want = eqzoo.generate(llama, other, max_new_tokens=NEW)
    assert eos not in np.asarray(want[n:]).tolist()  # this row never stops
    mixed = generate_batch(llama, jnp.stack([PROMPT, other]), max_new_tokens=NEW, eos_token=eos, pad_token=253)
    assert max(positions) == n + NEW - 2  # every step but the last token's, which needs none
    np.testing.assert_array_equal(mixed[0, : first + 1], greedy[: first + 1])
    assert bool(jnp.all(mixed[0, first + 1 :] == 253))
    np.testing.assert_array_equal(mixed[1], want)


def test_logprobs_are_the_models_own_scores(llama, greedy):
    # Each generated token's log-probability equals the forward pass's log-softmax at the
    # position before it (fp32; tolerance 1e-5, the KV cache's rounding against the full pass),
    # whatever the sampling settings; 0 over the prompt and after eos. The tokens are unchanged.
    n = PROMPT.shape[0]
    tokens, logps = eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, return_logprobs=True)
    np.testing.assert_array_equal(tokens, greedy)
    want = jnp.take_along_axis(jax.nn.log_softmax(_forward(llama, tokens[:-1])), tokens[1:, None], axis=-1)[:, 0]
    assert logps.shape == tokens.shape and logps.dtype == jnp.float32
    np.testing.assert_allclose(logps[n:], want[n - 1 :], atol=1e-5)
    assert bool(jnp.all(logps[:n] == 0)) and bool(jnp.all(logps[n:] < 0))

    prompts = jnp.stack([PROMPT, jnp.roll(PROMPT, 2)])
    kw = dict(max_new_tokens=NEW, key=jax.random.key(5), temperature=1.5, top_k=20, return_logprobs=True)
    sampled, logps = generate_batch(llama, prompts, **kw)
    np.testing.assert_array_equal(sampled, generate_batch(llama, prompts, **{**kw, "return_logprobs": False}))
    for row in range(2):
        want = jnp.take_along_axis(jax.nn.log_softmax(_forward(llama, sampled[row, :-1])), sampled[row, 1:, None], axis=-1)[:, 0]
        np.testing.assert_allclose(logps[row, n:], want[n - 1 :], atol=1e-5)
    np.testing.assert_allclose(generate_batch(llama, prompts, use_cache=False, **kw)[1], logps, atol=1e-5)

    eos = int(greedy[n + 2])
    first = n + int(np.argmax(np.asarray(greedy[n:]) == eos))
    _, logps = eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, eos_token=eos, return_logprobs=True)
    assert float(logps[first]) < 0 and bool(jnp.all(logps[first + 1 :] == 0))
    with pytest.raises(ConfigError, match="return_logprobs must be True or False, got 'yes'"):
        eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, return_logprobs="yes")


def test_top_k_1_and_tiny_top_p_equal_greedy(llama, greedy):
    key = jax.random.key(3)
    top_k = eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, key=key, temperature=1.0, top_k=1)
    top_p = eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, key=key, temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(top_k, greedy)
    np.testing.assert_array_equal(top_p, greedy)


def test_sampling_is_deterministic_given_key(llama):
    kw = dict(max_new_tokens=NEW, temperature=2.0)
    a = eqzoo.generate(llama, PROMPT, key=jax.random.key(1), **kw)
    b = eqzoo.generate(llama, PROMPT, key=jax.random.key(1), **kw)
    c = eqzoo.generate(llama, PROMPT, key=jax.random.key(2), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(c[: PROMPT.shape[0]], PROMPT)


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([0.05, 0.4, 0.3, 0.2, 0.05]))
    keys = jax.random.split(jax.random.key(0), 500)
    draw = jax.jit(jax.vmap(lambda k, top_k, top_p: sample_logits(logits, k, temperature=1.0, top_k=top_k, top_p=top_p),
                            in_axes=(0, None, None)), static_argnums=(1, 2))
    assert set(np.asarray(draw(keys, 2, None)).tolist()) == {1, 2}  # the two most likely
    # nucleus 0.75: 0.4 + 0.3 < 0.75, so the third most likely (0.2) is still needed
    assert set(np.asarray(draw(keys, None, 0.75)).tolist()) == {1, 2, 3}
    assert set(np.asarray(draw(keys, None, None)).tolist()) == {0, 1, 2, 3, 4}
    assert int(sample_logits(logits, None)) == 1  # greedy needs no key


def test_sample_logits_refuses_a_batch_of_logits():
    # Unchecked, a (batch, vocab) array gave one argmax over the flattened array (index 3 here,
    # not [1, 0]) and top-k filtered every row by the last row's k-th logit: wrong, silently.
    logits = jnp.array([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])
    for settings in ({}, {"temperature": 1.0, "top_k": 1}):
        with pytest.raises(ShapeError, match=r"one position's logits, shape \(vocab,\); got \(2, 3\)"):
            sample_logits(logits, jax.random.key(0), **settings)
    rows = jax.vmap(lambda row, k: sample_logits(row, k, temperature=1.0, top_k=1))(logits, jax.random.split(jax.random.key(0), 2))
    np.testing.assert_array_equal(rows, [1, 0])


def test_sample_logits_takes_a_traced_temperature_and_top_p(compile_log):
    # In a hand-written jitted step the temperature and top-p are arguments: one compile for every
    # value (they raised TracerBoolConversionError); a temperature <= 0 picks the greedy token.
    logits = jnp.log(jnp.array([0.05, 0.4, 0.3, 0.2, 0.05]))
    keys = jax.random.split(jax.random.key(0), 500)
    draw = jax.jit(jax.vmap(lambda k, t, p: sample_logits(logits, k, temperature=t, top_p=p), in_axes=(0, None, None)))
    draw(keys, 1.0, 0.75)
    with compile_log() as log:
        tokens = {(t, p): set(np.asarray(draw(keys, t, p)).tolist()) for t, p in ((1.0, 0.75), (1.0, 1.0), (0.0, 1.0), (-1.0, 1.0), (1.0, 0.1))}
    assert log.compiled == []
    assert tokens[(1.0, 0.75)] == {1, 2, 3} and tokens[(1.0, 1.0)] == {0, 1, 2, 3, 4}
    assert tokens[(0.0, 1.0)] == tokens[(-1.0, 1.0)] == tokens[(1.0, 0.1)] == {1}  # greedy; the top token alone
    with pytest.raises(ConfigError, match=r"needs a PRNG key.*a traced temperature may be > 0"):
        jax.jit(lambda t: sample_logits(logits, None, temperature=t))(0.5)


def test_eos_token_may_be_an_array_of_ids(llama, greedy):
    # generation_config's ids as a NumPy or JAX array stop as the same list does.
    stops = [int(greedy[PROMPT.shape[0] + 2]), 1]
    want = eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, eos_token=stops)
    assert (np.asarray(want[PROMPT.shape[0] + 3 :]) == 0).all()  # it did stop
    for ids in (np.asarray(stops), jnp.asarray(stops, jnp.int32)):
        np.testing.assert_array_equal(eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, eos_token=ids), want)
    with pytest.raises(ConfigError, match=r"each eos_token must be an integer token id, got 1.5"):
        eqzoo.generate(llama, PROMPT, max_new_tokens=2, eos_token=np.array([1.5]))


def test_several_eos_tokens_stop_at_the_first_of_any(llama, greedy):
    # eos_token may list several ids (a generation_config.json's eos_token_id often does): each
    # row stops at the first token that is any of them; speculative decoding agrees.
    prompts = jnp.stack([PROMPT, jnp.roll(PROMPT, 1)])
    full = generate_batch(llama, prompts, max_new_tokens=NEW)
    n = PROMPT.shape[0]
    stops = (int(full[0, n + 4]), int(full[1, n + 1]))
    out = generate_batch(llama, prompts, max_new_tokens=NEW, eos_token=list(stops), pad_token=255)
    for row in range(2):
        toks = np.asarray(full[row, n:])
        first = n + int(np.argmax(np.isin(toks, stops)))
        np.testing.assert_array_equal(out[row, : first + 1], full[row, : first + 1])
        assert (np.asarray(out[row, first + 1 :]) == 255).all() and first + 1 < out.shape[1]
    speculative = eqzoo.generation.generate_speculative(llama, llama, prompts, max_new_tokens=NEW, num_draft=2, eos_token=stops, pad_token=255)
    np.testing.assert_array_equal(speculative, out)
    single = eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, eos_token=np.int64(stops[0]), pad_token=255)  # a NumPy integer
    np.testing.assert_array_equal(single, generate_batch(llama, PROMPT[None], max_new_tokens=NEW, eos_token=stops[0], pad_token=255)[0])


@pytest.mark.parametrize(
    "eos, pad, match",
    [
        ("x", 0, r"eos_token must be an integer token id, got 'x'"),
        (1.5, 0, r"eos_token must be an integer token id, got 1.5"),
        ([3, None], 0, r"each eos_token must be an integer token id, got None"),
        ([], 0, r"eos_token is an empty sequence; pass None"),
        ([3, 256], 0, r"eos_token \[3, 256\] holds ids \[256\] outside the model's vocabulary \[0, 256\)"),
        (-1, 0, r"eos_token \[-1\] holds ids \[-1\] outside"),
        (3, "pad", r"pad_token must be an integer token id, got 'pad'"),
        (True, 0, r"eos_token must be an integer token id, got True"),
        (3, np.bool_(False), r"pad_token must be an integer token id, got np\.False_"),
    ],
)
def test_bad_stop_tokens_are_refused(llama, eos, pad, match):
    with pytest.raises(ConfigError, match=match):
        eqzoo.generate(llama, PROMPT, max_new_tokens=2, eos_token=eos, pad_token=pad)
    with pytest.raises(ConfigError, match=match):
        eqzoo.generation.generate_speculative(llama, llama, PROMPT[None], max_new_tokens=2, eos_token=eos, pad_token=pad)


def test_a_vanishing_temperature_samples_the_greedy_tokens(llama, greedy):
    # Dividing raw logits by float32's smallest normal number overflowed to inf - inf = NaN and
    # gave garbage; shifted by the largest logit first, the largest becomes 0 and the rest -inf.
    # (Subnormal temperatures are refused: GPUs flush them to 0; test_generation_errors.)
    tiny = float(np.finfo(np.float32).tiny)
    out = eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, temperature=tiny, key=jax.random.key(3))
    np.testing.assert_array_equal(out, greedy)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "nocache"])
def test_padding_and_pad_token_may_hold_any_id(llama, use_cache):
    # Padding past a row's length, and pad_token, outside the vocabulary: embedded as they were,
    # they gave NaN (attention multiplies even masked-out values by zero) and a row of zeros.
    lengths = jnp.array([5, 3])
    clean = jnp.stack([PROMPT, PROMPT.at[3:].set(0)])
    want = generate_batch(llama, clean, lengths, max_new_tokens=4, use_cache=use_cache, return_logprobs=True)
    for pad in (-1, 256, 10**6):
        padded = jnp.stack([PROMPT, PROMPT.at[3:].set(pad)])
        tokens, logps = generate_batch(
            llama, padded, lengths, max_new_tokens=4, use_cache=use_cache, pad_token=pad, return_logprobs=True
        )
        np.testing.assert_array_equal(np.where(np.asarray(want[0]) == 0, pad, want[0])[:, 5:], tokens[:, 5:])
        np.testing.assert_array_equal(tokens[1, 3:7], want[0][1, 3:7])  # row 1's generated tokens
        np.testing.assert_allclose(logps, want[1], atol=1e-6)


def test_sampling_settings_are_arguments_of_the_compiled_loop(llama, greedy):
    # A server's per-request temperature or top-p compiles nothing new; top-k sets a shape.
    # (NEW tokens, as the other tests here: their compiled loops serve these calls too.)
    from eqzoo.generation._generate import _generate_batch_jit

    def run(**settings):
        return eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, key=jax.random.key(0), **settings)

    run(temperature=0.7, top_p=0.9)
    before = _generate_batch_jit._cached._cache_size()
    outs = [run(temperature=t, top_p=p) for t, p in ((0.3, 0.5), (1.1, 0.95), (1e-6, 0.9))]
    assert _generate_batch_jit._cached._cache_size() == before
    np.testing.assert_array_equal(outs[-1], greedy)  # and the traced values are the ones used
    # so are the stop and pad ids (only how many stop ids there are is part of the program)
    stop = int(greedy[6])
    assert stop != int(greedy[5])  # so the first stop ends the rows at position 6, the second at 5
    first = eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, eos_token=[stop, 1], pad_token=7)
    before = _generate_batch_jit._cached._cache_size()
    other = eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, eos_token=[int(greedy[5]), 2], pad_token=9)
    assert _generate_batch_jit._cached._cache_size() == before
    np.testing.assert_array_equal(first, greedy.at[7:].set(7))  # stopped at the stop id, padded
    np.testing.assert_array_equal(other, greedy.at[6:].set(9))


def test_numpy_integer_counts_are_static_like_ints(llama):
    # A NumPy integer (from a config, an array of lengths) is an array to eqx.filter_jit: passed
    # on as it is, max_new_tokens would be traced and fail to set the output's shape.
    from eqzoo.generation._generate import _generate_batch_jit

    key = jax.random.key(0)
    want = eqzoo.generate(llama, PROMPT, max_new_tokens=3, temperature=0.7, top_k=5, key=key)
    before = _generate_batch_jit._cached._cache_size()
    got = eqzoo.generate(llama, PROMPT, max_new_tokens=np.int64(3), temperature=0.7, top_k=np.int32(5), key=key)
    np.testing.assert_array_equal(got, want)
    assert _generate_batch_jit._cached._cache_size() == before  # the same compiled loop
    # and so is a legacy uint32 key: the same draws as the typed key with its bits
    legacy = eqzoo.generate(llama, PROMPT, max_new_tokens=3, temperature=0.7, top_k=5, key=jax.random.key_data(key))
    np.testing.assert_array_equal(legacy, want)
    # A generation_config.json's max_length counts the prompt (5 tokens here): 3 new tokens.
    file = eqzoo.hf.GenerationConfig(max_length=8, temperature=0.7, top_k=5)
    np.testing.assert_array_equal(eqzoo.generate(llama, PROMPT, **file.kwargs(key=key)), want)
    assert _generate_batch_jit._cached._cache_size() == before


def test_decoding_a_model_a_train_step_took_says_to_use_the_trained_one(llama, greedy):
    # TrainState.create(model, ...) holds model's arrays and the first train step donates them;
    # decoding `model` afterwards (as the README warns against) got JAX's "Array has been deleted
    # with shape=float32[...]". Donation deletes the arrays, as `delete` does here.
    gone = jax.tree.map(lambda a: jnp.array(a, copy=True) if eqx.is_array(a) else a, llama)
    for array in jax.tree.leaves(gone):
        array.delete()
    with pytest.raises(ConfigError, match=r"generate: the model's arrays were deleted\. A train step donates .*decode with the trained one, state\.model"):
        eqzoo.generate(gone, PROMPT, max_new_tokens=NEW)  # the program `greedy` compiled
    np.testing.assert_array_equal(eqzoo.generate(llama, PROMPT, max_new_tokens=NEW), greedy)  # a live model decodes


def test_integer_settings_given_as_jax_scalars_say_to_pass_an_int(llama):
    # "max_new_tokens must be an integer >= 1, got Array(3, dtype=int32)": 3 is one, in an array.
    hint = r"That is a JAX array, not a Python int: pass int\(x\)\."
    with pytest.raises(ConfigError, match=r"generate: max_new_tokens must be an integer >= 1, got Array\(3, dtype=int32\)\. " + hint):
        eqzoo.generate(llama, PROMPT, max_new_tokens=jnp.int32(3))
    with pytest.raises(ConfigError, match=r"generate_beam: num_beams must be an integer >= 1, got Array\(2, dtype=int32\)\. " + hint):
        eqzoo.generation.generate_beam(llama, PROMPT, max_new_tokens=3, num_beams=jnp.int32(2))
    with pytest.raises(ConfigError, match=r"NoRepeatNGram: n must be an integer >= 1, got Array\(3, dtype=int32\)\. " + hint):
        eqzoo.generation.NoRepeatNGram(jnp.int32(3))
    with pytest.raises(ConfigError, match=r"generate: max_new_tokens must be an integer >= 1, got 0\.$"):
        eqzoo.generate(llama, PROMPT, max_new_tokens=0)  # no hint where the value itself is wrong


def test_generation_errors(llama):
    with pytest.raises(ConfigError, match=r"generate: max_length=5 counts the prompt too, and the prompt is 5 tokens wide"):
        eqzoo.generate(llama, PROMPT, max_length=5)
    with pytest.raises(ConfigError, match=r"generate_batch needs max_new_tokens=N .*or max_length=N"):
        generate_batch(llama, PROMPT[None])
    with pytest.raises(ShapeError, match=r"prompt length 5 \+ max_new_tokens 20 = 25 exceeds the model's max_seq=24"):
        eqzoo.generate(llama, PROMPT, max_new_tokens=20)
    with pytest.raises(ConfigError, match=r"temperature must be a finite number >= 0 \(0 means greedy\), got -1"):
        eqzoo.generate(llama, PROMPT, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ConfigError, match=r"temperature must be a finite number >= 0 .*got nan"):
        eqzoo.generate(llama, PROMPT, max_new_tokens=2, temperature=float("nan"), key=jax.random.key(0))
    with pytest.raises(ConfigError, match=r"prompt token ids \[-1, 300\] lie outside the model's vocabulary \[0, 256\)"):
        eqzoo.generate(llama, PROMPT.at[0].set(300).at[1].set(-1), max_new_tokens=2)
    # uint8 ids are ids (comparing them with the vocabulary size 256 wrapped it to 0)
    np.testing.assert_array_equal(
        eqzoo.generate(llama, PROMPT.astype(jnp.uint8), max_new_tokens=NEW), eqzoo.generate(llama, PROMPT, max_new_tokens=NEW)
    )
    with pytest.raises(ShapeError, match=r"prompts do not form one array .*Right-pad prompts of different lengths"):
        generate_batch(llama, [[1, 2, 3], [4, 5]], max_new_tokens=2)
    # With max_length the prompts' width is read first: ragged prompts got NumPy's ValueError
    speculative = lambda model, *a, **k: eqzoo.generation.generate_speculative(model, model, *a, **k)  # noqa: E731
    for who, fn in (("generate_batch", generate_batch), ("generate_stream", eqzoo.generation.generate_stream),
                    ("generate_beam", eqzoo.generation.generate_beam), ("generate_speculative", speculative)):
        with pytest.raises(ShapeError, match=f"{who}: the prompts do not form one array .*Right-pad prompts"):
            fn(llama, [[1, 2, 3], [4, 5]], max_length=8)
    with pytest.raises(ShapeError, match=r"prompts must be token ids, an integer array; got a dict with keys \['attention_mask', 'input_ids'\]"):
        generate_batch(llama, {"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}, max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"needs a PRNG key: pass key=jax\.random\.key\(seed\)"):
        eqzoo.generate(llama, PROMPT, max_new_tokens=2, temperature=0.7)
    with pytest.raises(ConfigError, match=r"top_k must be a positive integer or None, got 0 \(None turns top-k off, as "
                       r"transformers' 0 does\)"):
        eqzoo.generate(llama, PROMPT, max_new_tokens=2, key=jax.random.key(0), temperature=1.0, top_k=0)
    # 1e-46 is 0 in float32: generate stayed greedy, while speculative decoding divided by zero
    # and emitted token 0 over and over, and beam sampling drew from all -inf scores
    for decode in (eqzoo.generate, lambda m, p, **k: eqzoo.generation.generate_speculative(m, m, p[None], **k),
                   lambda *a, **k: eqzoo.generation.generate_beam(*a, num_beams=2, do_sample=True, **k)):
        with pytest.raises(ConfigError, match=r"temperature 1e-46 is 0 or subnormal in float32, which the decoders compute in; "
                           r"pass 0 for greedy decoding, or a temperature .* such as 1e-3"):
            decode(llama, PROMPT, max_new_tokens=2, key=jax.random.key(0), temperature=1e-46)
    with pytest.raises(ConfigError, match=r"temperature 1e-40 is 0 or subnormal in float32"):  # GPUs flush it to 0
        check_sampling(1e-40, None, None)
    check_sampling(1e-3, None, None)
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\] or None, got 0.0"):
        eqzoo.generate(llama, PROMPT, max_new_tokens=2, key=jax.random.key(0), temperature=1.0, top_p=0.0)
    for bad in (0, 2.0, True):
        with pytest.raises(ConfigError, match=f"max_new_tokens must be an integer >= 1, got {bad!r}"):
            eqzoo.generate(llama, PROMPT, max_new_tokens=bad)
    with pytest.raises(ConfigError, match=r"top_k must be a positive integer or None, got 2\.5"):
        eqzoo.generate(llama, PROMPT, max_new_tokens=2, key=jax.random.key(0), temperature=1.0, top_k=2.5)
    with pytest.raises(ConfigError, match=r"key must be one PRNG key, jax\.random\.key\(seed\); got 0"):
        eqzoo.generate(llama, PROMPT, max_new_tokens=2, key=0, temperature=1.0)
    eqzoo.generate(llama, PROMPT, max_new_tokens=NEW, key=jax.random.PRNGKey(0), temperature=1.0)  # a legacy key
    with pytest.raises(ConfigError, match="key must be one PRNG key"):  # not the default implementation's shape
        eqzoo.generate(llama, PROMPT, max_new_tokens=2, key=jnp.zeros((4,), jnp.uint32), temperature=1.0)
    with pytest.raises(ShapeError, match="lengths must be integers .*got dtype float32"):
        generate_batch(llama, jnp.stack([PROMPT, PROMPT]), jnp.array([3.7, 5.0]), max_new_tokens=2)
    with pytest.raises(ConfigError, match="generate needs an eqzoo language model .* as its first argument; got ArrayImpl"):
        eqzoo.generate(PROMPT, llama, max_new_tokens=2)  # swapped
    with pytest.raises(ShapeError, match=r"one prompt of shape \(seq,\); got \(2, 5\).*generate_batch"):
        eqzoo.generate(llama, jnp.stack([PROMPT, PROMPT]), max_new_tokens=2)
    with pytest.raises(ShapeError, match="prompt token ids must be integers; got dtype float32"):
        eqzoo.generate(llama, PROMPT.astype(jnp.float32), max_new_tokens=2)
    with pytest.raises(ShapeError, match=r"each prompt length must be in \[1, 5\]; got \[0, 5\]"):
        generate_batch(llama, jnp.stack([PROMPT, PROMPT]), jnp.array([0, 5]), max_new_tokens=2)
    with pytest.raises(ConfigError, match="needs an eqzoo language model"):
        eqzoo.generate(models.create("mlp-small", key=jax.random.key(0)), PROMPT, max_new_tokens=2)


@dataclasses.dataclass(frozen=True)
class _OwnConfig:
    vocab_size: int = 128
    max_seq: int = 16


@dataclasses.dataclass(frozen=True)
class _NoVocabConfig:
    max_seq: int = 16


class _OwnDecoder(models.AbstractLM):
    """A decoder of the user's own, built from eqzoo.nn layers as the AbstractLM docstring says."""

    config: Any = eqx.field(static=True)
    embed: nn.Embedding
    blocks: nn.Stacked
    final_norm: nn.RMSNorm
    lm_head: nn.Embedding | None

    def __init__(self, config, *, key):
        k1, k2 = jax.random.split(key)
        self.config = config

        def block(k):
            a, b = jax.random.split(k)
            return nn.TransformerBlock(nn.RMSNorm(16), nn.Attention(16, 4, num_kv_heads=2, key=a), nn.RMSNorm(16), nn.SwiGLU(16, 32, key=b))

        self.embed = nn.Embedding(128, 16, key=k1)
        self.blocks = nn.Stacked(block, 2, key=k2)
        self.final_norm = nn.RMSNorm(16)
        self.lm_head = None


def test_own_abstract_lm_subclass_decodes_greedily_and_needs_config_fields():
    # Built in one compiled program each (eagerly, one per initialiser operation).
    build = eqx.filter_jit(lambda config, key: _OwnDecoder(config, key=key))
    model = build(_OwnConfig(), jax.random.key(0))
    out = eqzoo.generate(model, PROMPT, max_new_tokens=5)
    # the reference: the full forward pass, one token at a time (on one padded length: one compile)
    seq = _penalised_greedy(model, PROMPT, 5, 1.0)
    np.testing.assert_array_equal(np.asarray(out), seq)  # greedy: exact
    broken = build(_NoVocabConfig(), jax.random.key(0))
    with pytest.raises(ConfigError, match=r"_OwnDecoder.config must have integer fields vocab_size and max_seq .*lacks \['vocab_size'\]"):
        eqzoo.generate(broken, PROMPT, max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"generate_speculative \(draft\): _OwnDecoder.config must have integer fields"):
        eqzoo.generation.generate_speculative(model, broken, PROMPT[None], max_new_tokens=2)  # an AttributeError before
    with pytest.raises(ConfigError, match="got MLP. A model of your own decodes by subclassing eqzoo.models.AbstractLM"):
        eqzoo.generate(models.create("mlp-small", key=jax.random.key(0)), PROMPT, max_new_tokens=2)


def test_attention_mask_takes_left_and_right_padding(llama):
    # transformers pads decoder-only batches on the left; read through `lengths` that padding
    # became part of the prompt and the prompt's end was cut off, without a word.
    prompts = [PROMPT, jnp.array([3, 1], jnp.int32), jnp.array([9, 8, 7, 6], jnp.int32)]
    singles = [eqzoo.generate(llama, p, max_new_tokens=NEW) for p in prompts]
    for side in ("left", "right"):
        widths = [(5 - p.shape[0], 0) if side == "left" else (0, 5 - p.shape[0]) for p in prompts]
        ids = jnp.stack([jnp.pad(p, w, constant_values=11) for p, w in zip(prompts, widths, strict=True)])
        mask = jnp.stack([jnp.pad(jnp.ones_like(p), w) for p, w in zip(prompts, widths, strict=True)])
        out = generate_batch(llama, ids, max_new_tokens=NEW, attention_mask=mask, pad_token=11)
        for row, p, single in zip(out, prompts, singles, strict=True):  # greedy: exact
            n = p.shape[0] + NEW
            np.testing.assert_array_equal(row[:n], single, err_msg=side)
            np.testing.assert_array_equal(row[n:], 11)
    # a boolean NumPy mask (as a tokenizer may return) works too
    ids = np.array([[0, 0, 0, 3, 1], [5, 17, 42, 7, 99]])
    out = generate_batch(llama, ids, max_new_tokens=NEW, attention_mask=ids > 0)
    np.testing.assert_array_equal(out[0, : 2 + NEW], singles[1])


def test_left_padded_prompts_with_lengths_are_refused(llama):
    ids = jnp.array([[5, 17, 42, 7, 99], [0, 0, 0, 3, 1]])
    with pytest.raises(ShapeError, match=r"prompt rows \[1\] look left-padded: they start with pad_token 0 .*attention_mask="):
        generate_batch(llama, ids, jnp.array([5, 2]), max_new_tokens=2)
    # right padding with pad_token, and a prompt that starts with pad_token, are not left padding
    generate_batch(llama, jnp.array([[0, 0, 3, 0, 0]]), jnp.array([3]), max_new_tokens=NEW)  # NEW: the compiled loop of `greedy`


def test_attention_mask_errors(llama):
    ids = jnp.stack([PROMPT, PROMPT])
    with pytest.raises(ConfigError, match="pass lengths or attention_mask, not both"):
        generate_batch(llama, ids, jnp.array([5, 5]), max_new_tokens=2, attention_mask=jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ShapeError, match=r"attention_mask must have the prompts' shape \(2, 5\); got \(2, 4\)"):
        generate_batch(llama, ids, max_new_tokens=2, attention_mask=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ShapeError, match="attention_mask must hold 0/1 integers or booleans; got dtype float32"):
        generate_batch(llama, ids, max_new_tokens=2, attention_mask=jnp.ones((2, 5)))
    with pytest.raises(ShapeError, match=r"attention_mask must hold only 0 \(padding\) and 1 \(token\); got \[1, 2\]"):
        generate_batch(llama, ids, max_new_tokens=2, attention_mask=jnp.array([[1, 1, 1, 1, 1], [2, 1, 1, 1, 1]]))
    with pytest.raises(ShapeError, match=r"attention_mask rows \[0, 1\] are not one run of tokens padded on the left or on the right"):
        generate_batch(llama, ids, max_new_tokens=2, attention_mask=jnp.array([[1, 0, 1, 1, 1], [0, 0, 0, 0, 0]]))


@eqx.filter_jit
def _next_logits(model, tokens, n):
    return model(tokens)[n - 1]  # causal: positions past n do not change it


def _penalised_greedy(model, prompt, new, penalty):
    """A plain reference: the full forward pass each step, transformers' penalty on every id
    in the prompt or generated so far, then the argmax."""
    tokens = list(np.asarray(prompt).tolist())
    for _ in range(new):
        buf = jnp.asarray(tokens + [0] * (model.max_seq - len(tokens)), jnp.int32)  # one shape: one compile
        logits = np.array(_next_logits(model, buf, jnp.asarray(len(tokens))), np.float32)
        seen = sorted(set(tokens))
        logits[seen] = np.where(logits[seen] < 0, logits[seen] * penalty, logits[seen] / penalty)
        tokens.append(int(np.argmax(logits)))
    return np.asarray(tokens)


REPEATS = jnp.array([5, 8, 174, 234, 99], jnp.int32)  # its greedy continuation repeats a token


def test_repetition_penalty_counts_prompt_and_generated_tokens_not_padding(llama):
    want = _penalised_greedy(llama, REPEATS, NEW, 1.8)
    short = REPEATS[2:]
    want_short = _penalised_greedy(llama, short, NEW, 1.8)
    # Padding is never "seen": pad with the id the short row generates first, which the
    # penalty would push down had the padding counted; on the right and on the left.
    pad = int(want_short[3])
    right = jnp.stack([REPEATS, jnp.concatenate([short, jnp.full((2,), pad, jnp.int32)])])
    out = generate_batch(llama, right, jnp.array([5, 3]), max_new_tokens=NEW, repetition_penalty=1.8, pad_token=pad)
    np.testing.assert_array_equal(out[0], want)
    np.testing.assert_array_equal(out[1, : 3 + NEW], want_short)
    assert not np.array_equal(_penalised_greedy(llama, REPEATS, NEW, 1.0), want)  # the penalty changes this continuation
    left = jnp.stack([REPEATS, jnp.concatenate([jnp.full((2,), pad, jnp.int32), short])])
    mask = jnp.array([[1] * 5, [0, 0, 1, 1, 1]])
    out = generate_batch(llama, left, attention_mask=mask, max_new_tokens=NEW, repetition_penalty=1.8, pad_token=pad)
    np.testing.assert_array_equal(out[0], want)
    np.testing.assert_array_equal(out[1, : 3 + NEW], want_short)


def test_sample_logits_min_p_filters_after_temperature():
    logits = jnp.log(jnp.array([0.05, 0.4, 0.3, 0.2, 0.05]))
    keys = jax.random.split(jax.random.key(0), 500)
    draw = jax.jit(jax.vmap(lambda k, t, m: sample_logits(logits, k, temperature=t, min_p=m), in_axes=(0, None, None)))
    # min_p 0.3 keeps p >= 0.3 * 0.4 = 0.12 at temperature 1; at temperature 0.5 the
    # probabilities are squared and renormalised (0.2 falls to 0.25 of the top): it keeps two
    assert set(np.asarray(draw(keys, 1.0, 0.3)).tolist()) == {1, 2, 3}
    assert set(np.asarray(draw(keys, 0.5, 0.3)).tolist()) == {1, 2}
    assert set(np.asarray(draw(keys, 1.0, 0.0)).tolist()) == {0, 1, 2, 3, 4}
    assert set(np.asarray(draw(keys, 1.0, 1.0)).tolist()) == {1}  # the top token always passes


def test_penalty_min_p_and_stop_sequences_are_arguments_of_the_compiled_loop(llama, compile_log):
    # A sweep over the penalty and min-p, or other stop ids of the same lengths, compiles nothing.
    def run(penalty, min_p, stop):
        return eqzoo.generate(
            llama, PROMPT, max_new_tokens=NEW, temperature=0.7, key=jax.random.key(0), repetition_penalty=penalty,
            min_p=min_p, stop_sequences=[stop, [3]],
        )

    run(1.2, 0.1, [1, 2])
    with compile_log() as log:
        outs = [run(p, m, s) for p, m, s in ((1.5, 0.3, [4, 5]), (1.8, 1.0, [254, 255]))]
    assert log.compiled == []
    # min_p 1.0 keeps only the top token: the penalised greedy decoding (the traced values are used)
    np.testing.assert_array_equal(outs[-1], _penalised_greedy(llama, PROMPT, NEW, 1.8))


def _stopped(tokens, n, stops, pad):
    """`tokens` (a prompt of `n` then generated ones) as a stop at the first generated
    position that ends one of `stops` leaves them: kept up to it, `pad` after."""
    out = np.array(tokens)
    gen = out[n:].tolist()
    for j in range(len(gen)):
        if any(len(s) <= j + 1 and gen[j + 1 - len(s) : j + 1] == list(s) for s in stops):
            out[n + j + 1 :] = pad
            return out, j
    return out, None


def test_stop_sequences_stop_where_the_generated_tokens_end_with_one(llama):
    prompts = jnp.stack([PROMPT, jnp.roll(PROMPT, 1)])
    full = np.asarray(generate_batch(llama, prompts, max_new_tokens=NEW))
    n = PROMPT.shape[0]
    span = [int(full[0, n + 3]), int(full[0, n + 4])]  # a stop across two generated tokens
    assert span[1] not in full[0, n : n + 4].tolist()  # so no earlier token ends it
    # a stop that begins in the prompt matches nothing: only generated tokens count
    across = [int(full[1, n - 1]), int(full[1, n])]
    eos = int(full[1, n + 2])  # row 1 stops at eos; either kind stops a row
    stops = [np.asarray(span), across]  # arrays of ids are accepted
    out = np.asarray(generate_batch(llama, prompts, max_new_tokens=NEW, stop_sequences=stops, eos_token=eos, pad_token=255))
    row0, at0 = _stopped(full[0], n, [span, across, [eos]], 255)
    row1, at1 = _stopped(full[1], n, [span, across, [eos]], 255)
    assert (at0, at1) == (4, 2)  # row 0 on the span's second token, row 1 on eos
    np.testing.assert_array_equal(out[0], row0)
    np.testing.assert_array_equal(out[1], row1)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"stop_sequences": "\n\n"}, r"stop_sequences must be a sequence of token-id sequences; got '\\n\\n'.*tokenizer\.encode"),
        ({"stop_sequences": [13, 198]}, r"each stop sequence must be a sequence of token ids; got 13 \(a single stop id belongs in eos_token="),
        ({"stop_sequences": ["ab"]}, r"holds the string 'ab'; token ids are needed"),
        ({"stop_sequences": [[1, 2], []]}, r"stop_sequences holds an empty sequence, which would stop at once"),
        ({"stop_sequences": []}, r"stop_sequences is empty; pass None"),
        ({"stop_sequences": [[1, 256]]}, r"stop sequence \[1, 256\] holds ids \[256\] outside the model's vocabulary \[0, 256\)"),
        ({"stop_sequences": [[1, -1]]}, r"holds ids \[-1\] outside"),
        ({"stop_sequences": [[1, 2.0]]}, r"each id of stop sequence \[1, 2\.0\] must be an integer token id, got 2\.0"),
        ({"stop_sequences": [[1, True]]}, r"each id of stop sequence \[1, True\] must be an integer token id, got True"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be a finite number > 0 \(1\.0 is off; > 1 discourages repeats\), got 0\.0"),
        ({"repetition_penalty": float("inf")}, r"repetition_penalty must be a finite number > 0 .*got inf"),
        ({"repetition_penalty": None}, r"repetition_penalty must be a finite number > 0 .*got None"),
        ({"min_p": 1.5, "temperature": 1.0}, r"min_p must be a number in \[0, 1\] or None \(0 filters nothing\), got 1\.5"),
        ({"min_p": -0.1}, r"min_p must be a number in \[0, 1\] .*got -0\.1"),
    ],
)
def test_bad_penalty_min_p_and_stop_sequences_are_refused(llama, settings, match):
    with pytest.raises(ConfigError, match=match):
        eqzoo.generate(llama, PROMPT, max_new_tokens=2, key=jax.random.key(0), **settings)


# Every sampling float on, so that one compiled loop serves each call below (the values are arguments).
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.3}


@pytest.mark.parametrize(
    "name, whole, out_of_range, rule",
    [
        ("temperature", 1, -0.5, r"temperature must be a finite number >= 0 \(0 means greedy\)"),
        ("top_p", 1, 1.5, r"top_p must be in \(0, 1\] or None"),
        ("min_p", 1, 1.5, r"min_p must be a number in \[0, 1\] or None \(0 filters nothing\)"),
        ("repetition_penalty", 2, 0.0, r"repetition_penalty must be a finite number > 0 \(1\.0 is off; > 1 discourages repeats\)"),
        ("top_k", 3, 0, r"top_k must be a positive integer or None"),
    ],
)
def test_sampling_settings_take_python_numbers_and_0d_arrays_alike(llama, name, whole, out_of_range, rule):
    # min_p and repetition_penalty refused 0-d arrays that temperature and top_p took; now each
    # setting takes a Python number or a concrete 0-d integer or floating array, NumPy or JAX.
    # top_k refused 0-d integer arrays: it takes them too, and integers only (it sets a shape).
    def run(value):
        return eqzoo.generate(llama, PROMPT, max_new_tokens=3, key=jax.random.key(1), **SAMPLING | {name: value})

    integers = (whole, np.int64(whole), np.int32(whole), np.asarray(whole), jnp.asarray(whole, jnp.int32))
    if name == "top_k":
        want = run(whole)
        logits = jax.random.normal(jax.random.key(2), (64,))
        drawn = sample_logits(logits, jax.random.key(3), temperature=0.7, top_k=whole)
        for value in integers:
            k = top_k_setting(value)
            assert k == whole and type(k) is int, value  # handed on as a Python int: the same static setting
            np.testing.assert_array_equal(run(value), want, err_msg=f"{name}: {value!r}")
            assert int(sample_logits(logits, jax.random.key(3), temperature=0.7, top_k=value)) == int(drawn)
        not_whole = [
            (float(whole), rf"{rule}, got {float(whole)}"), (np.float32(whole), rf"{rule}, got .*dtype float32"),
            (jnp.asarray(float(whole)), rf"{rule}, got .*dtype float32"), (np.asarray(-1), rf"{rule}, got -1"),
        ]
        one, traced = "integer", r"top_k is traced here .*a shape, so it must be concrete"
    else:
        want = run(SAMPLING[name])
        for kind in (np.float32, np.float64, np.asarray, jnp.asarray, lambda v: np.asarray(v, np.float32)):
            np.testing.assert_array_equal(run(kind(SAMPLING[name])), want, err_msg=f"{name}: {kind}")  # float32 alike: exact
        # Integers, too: checked alike, and handed to the loop as the float would be (top_p=1 is off: no second compile here).
        want = traced_settings(**SAMPLING | {name: float(whole)})
        for value in integers:
            check_sampling(**SAMPLING | {name: value}, top_k=None)
            for got, expected in zip(traced_settings(**SAMPLING | {name: value}), want, strict=True):
                np.testing.assert_array_equal(got, expected, err_msg=f"{name}: {value!r}")
        not_whole = [
            (np.asarray(0.5 + 0j), rf"{rule}, got .*dtype complex128"), (float("nan"), rf"{rule}, got nan"),
            (np.float32("nan"), rf"{rule}, got nan"),
        ]
        one, traced = "number", rf"{name} is traced here .*call sample_logits, which takes a traced value"
    refused = not_whole + [
        (True, rf"{rule}, got True"), (np.bool_(True), rf"{rule}, got np\.True_"),
        (jnp.asarray(True), rf"{rule}, got .*dtype bool"), ("0.5", rf"{rule}, got '0\.5'"),
        (out_of_range, rf"{rule}, got {out_of_range}"), (jnp.asarray(out_of_range), rf"{rule}, got {out_of_range}"),
        (np.full(2, whole), rf"{name} must be one {one} \(a Python (float|int) or a 0-d (integer )?array\); got an array of shape \(2,\)"),
        (jnp.asarray([whole]), rf"{name} must be one {one} .*shape \(1,\)"),
    ]
    for value, match in refused:
        with pytest.raises(ConfigError, match=match):
            run(value)
    # Under the caller's own jax.jit the value is traced: said so (it raised TracerBoolConversionError).
    with pytest.raises(ConfigError, match=traced):
        jax.jit(run)(whole if name == "top_k" else SAMPLING[name])


def test_stop_ids_take_integer_0d_arrays_as_eos_token_does():
    # stop_sequences checked its ids apart from eos_token, and refused 0-d integer arrays that eos_token took.
    ids = [np.int64(1), np.asarray(2), jnp.asarray(3, jnp.int32)]
    assert check_stop_tokens(ids, 0, 256, "generate") == ((1, 2, 3), 0)
    assert check_stop_sequences([ids, [4]], 256, "generate") == ((1, 2, 3), (4,))


def test_speculative_decoding_refuses_penalty_and_stop_sequences(llama):
    for name, value in (("repetition_penalty", 1.3), ("stop_sequences", [[1, 2]])):
        with pytest.raises(ConfigError, match=rf"generate_speculative does not apply \['{name}'\].*Decode with eqzoo\.generation\.generate_batch"):
            eqzoo.generation.generate_speculative(llama, llama, PROMPT[None], max_new_tokens=2, **{name: value})


def test_numpy_inputs_are_checked_on_the_host_and_compile_nothing_new(llama, compile_log):
    # Serving loops call generate_batch per request. NumPy prompts, lengths and masks are checked
    # where they are and handed to the compiled loop as they are: no device round trip (reading
    # back an array the call computed, such as the default lengths, waited for whatever the
    # device was still running; the guard refuses such a read on accelerators, not on CPU, where
    # arrays live on the host) and no program that jax.Array inputs did not compile.
    prompts = np.stack([np.asarray(PROMPT), np.roll(np.asarray(PROMPT), 2)])
    lengths = np.array([5, 3])
    mask = (np.arange(5)[None, :] < lengths[:, None]).astype(np.int64)
    settings = dict(max_new_tokens=3, temperature=0.7, key=jax.random.key(0), eos_token=3)
    want = generate_batch(llama, jnp.asarray(prompts), jnp.asarray(lengths), **settings)
    one = eqzoo.generate(llama, jnp.asarray(prompts[0]), **settings)
    with compile_log() as log, jax.transfer_guard_device_to_host("disallow"):
        outs = [generate_batch(llama, prompts, lengths, **settings), generate_batch(llama, prompts, attention_mask=mask, **settings)]
        outs.append(eqzoo.generate(llama, prompts[0], **settings))
    assert log.compiled == []
    np.testing.assert_array_equal(outs[0], want)
    np.testing.assert_array_equal(outs[1], want)
    np.testing.assert_array_equal(outs[2], one)
    np.testing.assert_array_equal(one, generate_batch(llama, jnp.asarray(prompts[:1]), **settings)[0])
    # and the values of NumPy inputs are checked as those of jax.Arrays are
    with pytest.raises(ConfigError, match=r"prompt token ids \[300\] lie outside the model's vocabulary"):
        generate_batch(llama, np.where(np.arange(5) == 1, 300, prompts), lengths, **settings)
    with pytest.raises(ShapeError, match=r"each prompt length must be in \[1, 5\]; got \[5, 4294967299\]"):
        generate_batch(llama, prompts, np.array([5, 2**32 + 3]), **settings)  # not wrapped to 3 first
    with pytest.raises(ShapeError, match=r"prompt rows \[1\] look left-padded"):
        generate_batch(llama, np.roll(np.where(np.arange(5) < 3, prompts, 0), 2, axis=1), lengths, **settings)
    with pytest.raises(ShapeError, match=r"attention_mask rows \[1\] are not one run of tokens"):
        generate_batch(llama, prompts, attention_mask=np.array([[1] * 5, [1, 0, 1, 1, 1]]), **settings)
