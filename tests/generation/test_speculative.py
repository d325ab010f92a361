"""Speculative decoding: the model's own greedy tokens, whatever the draft proposes; when
sampling, the model's own distribution over continuations."""

import functools
import itertools
import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo import models
from eqzoo._errors import ConfigError, ShapeError
from eqzoo.generation import _generate, _speculative, generate_batch, generate_speculative
from eqzoo.generation._sampling import filter_logits

NEW = 12


def _scaled(preset, seed, **overrides):
    # init_std is 0.02: scale the weights up so greedy decoding does not just repeat one token.
    model = models.create(preset, key=jax.random.key(seed), max_seq=40, **overrides)
    return jax.tree.map(lambda a: 4 * a if eqx.is_inexact_array(a) else a, model)


@eqx.filter_jit
def _batched(model, tokens):
    """`jax.vmap(model)(tokens)` compiled once per model structure and shape (called eagerly,
    the layer stack runs op by op)."""
    return jax.vmap(model)(tokens)


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


def test_left_padded_prompts_take_an_attention_mask(llama):
    # As generate_batch: left padding read through lengths lost the prompts' ends silently; it is
    # refused, and attention_mask= (left or right padding) gives the right-padded greedy output.
    prompts, lengths = _prompts()
    reference = generate_batch(llama, prompts, lengths, max_new_tokens=NEW, pad_token=11)
    seq = prompts.shape[1]
    left = jnp.stack([jnp.roll(jnp.where(jnp.arange(seq) < n, row, 11), seq - n) for row, n in zip(prompts, lengths, strict=True)])
    mask = jnp.arange(seq)[None, :] >= (seq - lengths)[:, None]
    out = generate_speculative(llama, llama, left, max_new_tokens=NEW, attention_mask=mask, pad_token=11, num_draft=2)
    np.testing.assert_array_equal(out, reference)
    with pytest.raises(ShapeError, match=r"prompt rows \[1, 2\] look left-padded"):
        generate_speculative(llama, llama, left, lengths, max_new_tokens=NEW, pad_token=11)


def test_numpy_integer_counts_and_inputs(llama, compile_log):
    # max_new_tokens and num_draft set shapes: NumPy integers are taken as the ints they hold.
    draft = eqx.tree_at(lambda m: m.blocks, llama, llama.blocks.first(1))
    prompts, lengths = _prompts()
    want = generate_speculative(llama, draft, prompts, lengths, max_new_tokens=NEW, num_draft=3)
    got = generate_speculative(llama, draft, prompts, lengths, max_new_tokens=np.int64(NEW), num_draft=np.int32(3))
    np.testing.assert_array_equal(got, want)
    # NumPy prompts and lengths are checked on the host and passed on as they are (as in
    # generate_batch: no device round trip, nothing new compiled)
    host_prompts = np.asarray(prompts)
    with compile_log() as log, jax.transfer_guard_device_to_host("disallow"):
        got = generate_speculative(llama, draft, host_prompts, np.asarray(lengths), max_new_tokens=NEW, num_draft=3)
        # a generation_config.json's max_length counts the prompts' padded width (7 here)
        np.testing.assert_array_equal(generate_speculative(llama, draft, host_prompts, np.asarray(lengths), max_length=7 + NEW, num_draft=3), want)
        with pytest.raises(ShapeError, match=r"each prompt length must be in \[1, 7\]"):
            generate_speculative(llama, draft, host_prompts, np.array([0, 1, 2]), max_new_tokens=NEW, num_draft=3)
    assert log.compiled == []
    np.testing.assert_array_equal(got, want)


def test_padding_and_pad_token_may_hold_any_id(llama):
    # Padding outside the vocabulary embedded as NaN and ruined the row (rows 1 and 2 here).
    prompts, lengths = _prompts()
    draft = eqx.tree_at(lambda m: m.blocks, llama, llama.blocks.first(1))
    want = generate_speculative(llama, draft, prompts, lengths, max_new_tokens=NEW, num_draft=3)
    padded = jnp.where(jnp.arange(7) < lengths[:, None], prompts, 10**6)
    got = generate_speculative(llama, draft, padded, lengths, max_new_tokens=NEW, num_draft=3, pad_token=-1)
    real = np.arange(7 + NEW) < (lengths[:, None] + NEW)
    np.testing.assert_array_equal(np.where(real, want, -1), got)


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


def test_min_p_one_samples_the_greedy_tokens_and_min_p_is_an_argument(llama, compile_log):
    # min_p 1.0 keeps only the most likely token, in the draft's q and the model's p alike: the
    # output is the model's greedy decoding, whatever the key (exact: the limit needs no
    # statistics). Another min_p value, or another temperature, compiles nothing new.
    draft = eqx.tree_at(lambda m: m.blocks, llama, llama.blocks.first(1))
    prompts, lengths = _prompts()
    reference = generate_batch(llama, prompts, lengths, max_new_tokens=NEW)
    run = functools.partial(generate_speculative, llama, draft, prompts, lengths, max_new_tokens=NEW, num_draft=3)
    np.testing.assert_array_equal(run(temperature=1.5, min_p=1.0, key=jax.random.key(3)), reference)
    with compile_log() as log:
        other = run(temperature=0.7, min_p=0.9, key=jax.random.key(4))
    assert log.compiled == []
    np.testing.assert_array_equal(other, reference)  # 0.9: the runner-up is never that close here
    with pytest.raises(ConfigError, match=r"min_p must be a number in \[0, 1\] .*got 1\.5"):
        run(temperature=1.0, min_p=1.5, key=jax.random.key(0))


def test_bad_calls(llama):
    prompts, _ = _prompts()
    with pytest.raises(ConfigError, match=r"draft's vocabulary \(512\) differs from the model's \(256\)"):
        generate_speculative(llama, _scaled("tiny-llama", 1, vocab_size=512), prompts, max_new_tokens=4)
    with pytest.raises(ConfigError, match=r"generate_speculative: num_draft must be an integer >= 1, got 0"):
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
    with pytest.raises(ConfigError, match=r"generate_speculative: max_new_tokens must be an integer >= 1, got 0"):
        generate_speculative(llama, llama, prompts, max_new_tokens=0)
    with pytest.raises(ShapeError, match=r"integer prompts of shape \(batch, seq\); got \(7,\)"):
        generate_speculative(llama, llama, prompts[0], max_new_tokens=4)
    with pytest.raises(ConfigError, match=r"temperature > 0 needs a PRNG key"):
        generate_speculative(llama, llama, prompts, max_new_tokens=4, temperature=0.7)
    with pytest.raises(ConfigError, match=r"top_k must be a positive integer"):
        generate_speculative(llama, llama, prompts, max_new_tokens=4, temperature=0.7, top_k=0, key=jax.random.key(0))
    with pytest.raises(ConfigError, match=r"MoE implementation must be one of .* got 'sparse'"):
        _scaled("tiny-mixtral", 0).blocks.layers.mlp.with_implementation("sparse")


@pytest.mark.parametrize("temperature,top_k,min_p", [(1.0, None, None), (0.8, 4, None), (1.0, None, 0.05)])
def test_sampling_draws_the_models_distribution(temperature, top_k, min_p):
    # A 6-token vocabulary: every 3-token continuation's probability under the model's (filtered)
    # sampling is computed exactly, and 20,000 speculative samples, with a draft of other
    # weights (so proposals are often rejected and the residual max(p - q, 0) is drawn from),
    # must match it. Total variation distance bound 0.025: these samples measured 0.0077 and
    # 0.0044; drawing the replacement token from p instead of the residual gave 0.078 and 0.039.
    # With min_p 0.05 (it removes a total variation of 0.23 from this model's distribution; the
    # draft's q and the model's p filtered alike): measured 0.0021; min_p left out of the
    # model's p in the check gave 0.196, left out of the prefill's first token 0.042.
    vocab, new, n = 6, 3, 20_000

    def make(seed, layers):
        m = models.create("tiny-llama", key=jax.random.key(seed), vocab_size=vocab, max_seq=16, num_layers=layers)
        return jax.tree.map(lambda a: 6 * a if eqx.is_inexact_array(a) else a, m)

    model, draft = make(0, 2), make(1, 1)
    prompt = jnp.array([1, 2, 3], jnp.int32)
    seqs = np.array(list(itertools.product(range(vocab), repeat=new)), np.int32)
    full = jnp.concatenate([jnp.broadcast_to(prompt, (len(seqs), 3)), jnp.asarray(seqs)], axis=1)
    probs = jax.nn.softmax(jax.vmap(jax.vmap(lambda x: filter_logits(x, temperature, top_k, None, min_p)))(_batched(model, full)))
    exact = np.prod([np.asarray(probs[np.arange(len(seqs)), 2 + t, seqs[:, t]]) for t in range(new)], axis=0)
    out, stats = generate_speculative(
        model, draft, jnp.broadcast_to(prompt, (n, 3)), max_new_tokens=new, num_draft=2,
        key=jax.random.key(7), temperature=temperature, top_k=top_k, min_p=min_p, return_stats=True,
    )
    assert float(jnp.mean(stats["rounds"])) < new - 1  # some rounds kept a proposal
    index = (np.asarray(out[:, 3:]) * vocab ** np.arange(new - 1, -1, -1)).sum(axis=1)
    empirical = np.bincount(index, minlength=vocab**new) / n
    tv = 0.5 * np.abs(empirical - exact).sum()
    assert tv < 0.025, f"total variation {tv:.3f} from the model's own distribution"


@pytest.mark.parametrize("sampled", [False, True])
def test_logprobs_are_the_models_own_scores(llama, sampled):
    # Each generated token's log-probability equals the full forward pass's log-softmax at the
    # position before it (fp32; tolerance 2e-5, the one-pass check's rounding against the full
    # pass: measured at most 8.6e-6), for tokens that came from the prefill, from kept proposals and from the model's own
    # token of a round; 0 over the prompt and after eos. The tokens and stats are unchanged.
    prompts, lengths = _prompts()
    draft = eqx.tree_at(lambda m: m.blocks, llama, llama.blocks.first(1))  # agrees often: rounds of several tokens
    kw = dict(max_new_tokens=NEW, num_draft=3, return_stats=True)
    if sampled:
        kw |= dict(temperature=1.5, top_k=20, key=jax.random.key(3))
    tokens, stats = generate_speculative(llama, draft, prompts, lengths, **kw)
    eos = int(tokens[1, 2 + 5])  # row 1's 6th new token: the rest of that row is padding
    tokens, stats = generate_speculative(llama, draft, prompts, lengths, eos_token=eos, **kw)
    scored, logps, scored_stats = generate_speculative(llama, draft, prompts, lengths, eos_token=eos, return_logprobs=True, **kw)
    np.testing.assert_array_equal(scored, tokens)
    np.testing.assert_array_equal(scored_stats["rounds"], stats["rounds"])
    assert logps.shape == tokens.shape and logps.dtype == jnp.float32
    assert (np.asarray(stats["rounds"]) < NEW - 1).any()  # some round kept a proposal
    full = _batched(llama, tokens[:, :-1])  # each row's full forward pass
    for row, n in enumerate(np.asarray(lengths)):
        want = jnp.take_along_axis(jax.nn.log_softmax(full[row]), tokens[row, 1:, None], axis=-1)[:, 0]
        toks = np.asarray(tokens[row])
        first_eos = n + int(np.argmax(toks[n:] == eos)) if eos in toks[n:].tolist() else n + NEW - 1
        np.testing.assert_allclose(logps[row, n : first_eos + 1], want[n - 1 : first_eos], rtol=0, atol=2e-5)
        assert (np.asarray(logps[row, :n]) == 0).all() and (np.asarray(logps[row, first_eos + 1 :]) == 0).all()
    assert int(np.asarray(tokens[1, 2 + 5])) == eos and (np.asarray(logps[1, 2 + 6 :]) == 0).all()
    with pytest.raises(ConfigError, match=r"return_logprobs must be True or False, got 1"):
        generate_speculative(llama, draft, prompts, max_new_tokens=4, return_logprobs=1)
    only = generate_speculative(llama, draft, prompts, lengths, eos_token=eos, return_logprobs=True, **{**kw, "return_stats": False})
    np.testing.assert_array_equal(only[1], logps)


def _largest_select(compiled_text: str) -> int:
    # Elements in the largest `select` of a compiled program's HLO.
    shapes = re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} select\(", compiled_text)
    return max(math.prod(int(d) for d in s.split(",") if d) for s in shapes)


@pytest.mark.parametrize("loop", ["speculative", "generate_batch with eos"])
def test_the_decoding_loops_never_select_a_whole_kv_cache(llama, loop):
    # A `while_loop` under `vmap` keeps or discards each row's carry by a select on every
    # iteration, the KV caches included, so they are copied instead of updated in place. The
    # loops run their stop test outside the `vmap`: no select in the program is as large as one
    # layer's cache over the batch (the largest left are attention's masks). Mutation check: a
    # `while_loop` inside the `vmap` (the structure before) selects the whole stacked cache.
    batch, prompt_len, new = 4, 7, 20
    prompts = jnp.zeros((batch, prompt_len), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    common = dict(max_new_tokens=new, eos_token=(3,), pad_token=0, temperature=0.0, top_k=None, top_p=None,
                  unroll_layers=False, cache_dtype=None)
    if loop == "speculative":
        lowered = _speculative._speculate_batch.lower(llama, llama, prompts, lengths, jax.random.key(0), num_draft=3, **common)
        slots = prompt_len + new + 3 - 1
    else:
        lowered = _generate._generate_batch_jit.lower(llama, prompts, lengths, jax.random.key(0), use_cache=True, **common)
        slots = prompt_len + new
    one_layer = batch * math.prod(llama.init_cache(slots).keys.shape[1:])  # (slots, kv heads, head dim)
    assert _largest_select(lowered.compile().compiled.as_text()) < one_layer
