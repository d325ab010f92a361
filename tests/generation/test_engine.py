"""Continuous batching (`DecodeEngine`, `serve`): each request's tokens are those it gets decoded
alone, whatever slot it lands in, whatever its neighbours do and in whichever order it arrives;
new prompts within a bucket and new settings compile nothing; bad requests are refused."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqzoo
from eqzoo import models
from eqzoo._errors import ConfigError, ShapeError
from eqzoo.generation import DecodeEngine, Request, generate_batch, serve

LENGTHS = (3, 7, 5, 12, 2, 9)
BUDGETS = (5, 9, 3, 11, 7, 4)  # prompt + budget <= 24 (max_len)


@eqx.filter_jit
def _scaled(name, seed, **overrides):
    # init_std 0.02 makes greedy decoding repeat one token: scaled up, the tokens vary.
    model = models.create(name, key=jax.random.key(seed), **overrides)
    return jax.tree.map(lambda a: 4 * a if eqx.is_inexact_array(a) else a, model)


def _engine(model):
    # one engine shape for every test: its programs compile once per model
    return DecodeEngine(model, slots=2, max_len=24, steps_per_call=3)


@pytest.fixture(scope="module")
def gpt2():
    return _scaled("tiny-gpt2", 0, max_seq=24)


def _prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).astype(np.int32) for n in LENGTHS]


def _padded(prompts):
    padded = np.zeros((len(prompts), max(len(p) for p in prompts)), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    return padded


def _served(engine, requests) -> dict:
    out = {}
    for event in serve(engine, requests):
        assert event.id not in out or not out[event.id][1], "a request produced tokens after it was done"
        tokens, _ = out.get(event.id, ([], False))
        out[event.id] = (tokens + event.tokens.tolist(), event.done)
    assert all(done for _, done in out.values())
    return {k: tokens for k, (tokens, _) in out.items()}


def _cut(row, eos, stop):
    """`row` up to and with its first `eos` or first end of the sequence `stop`."""
    ends = [i for i in range(len(row)) if row[i] == eos or row[: i + 1][-len(stop) :] == stop]
    return row[: ends[0] + 1] if ends else row


# Qwen3-MoE's shape in miniature: query/key norms, renormalised router weights, "capacity"
# experts (which the engine runs dropless: its reference is the dense model's generate).
QWEN3_MOE = dict(num_layers=1, qk_norm=True, normalize_router_weights=True, moe_implementation="capacity")


@pytest.mark.parametrize(
    "name, overrides",
    [("tiny-llama", {}), ("tiny-gemma2", dict(num_layers=2, sliding_window=4)), ("tiny-mixtral", QWEN3_MOE)],
    ids=["llama-gqa", "gemma2-window", "qwen3-moe-capacity"],
)
def test_greedy_serving_equals_decoding_each_prompt_alone(name, overrides, compile_log):
    """Grouped-query attention with RoPE at each slot's own positions; Gemma 2's windowed
    layers keep 4-slot rings, which the prompts and tokens run past; a mixture of experts whose
    capacity router would drop a padded prompt's assignments (and, over the slot batch, let
    neighbours and the free slots' dummy tokens take each other's room). Stop ids and
    per-request stop sequences end requests mid-way, checked on the device."""
    model, prompts = _scaled(name, 1, max_seq=24, **overrides), _prompts()
    reference = model.with_moe_implementation("dense") if "moe_implementation" in overrides else model
    # generate_batch's rows are generate's of each prompt alone (tests/generation/test_generate.py)
    ref = np.asarray(generate_batch(reference, _padded(prompts), np.asarray(LENGTHS), max_new_tokens=list(BUDGETS)))
    ref = [ref[i, n : n + b].tolist() for i, (n, b) in enumerate(zip(LENGTHS, BUDGETS, strict=True))]
    eos = ref[3][4]  # request 3 stops mid-way (others may too)
    stops = {i: [ref[i][j : j + 2]] for i, j in ((1, 3), (5, 1))}  # requests 1 and 5: a stop sequence mid-way
    want = {i: _cut(row, eos, stops.get(i, [[-1]])[0]) for i, row in enumerate(ref)}
    assert len(want[3]) < BUDGETS[3] and len(want[1]) < BUDGETS[1] and len(want[5]) < BUDGETS[5]
    requests = [
        Request(p, b, id=i, eos_token=[eos, 255], stop_sequences=stops.get(i, [[255, 255, 255]]))
        for i, (p, b) in enumerate(zip(prompts, BUDGETS, strict=True))
    ]
    engine = _engine(model)  # more requests than slots
    assert _served(engine, requests) == want
    with compile_log() as log:  # other slots, neighbours and prompt lengths (one bucket): nothing new
        assert _served(engine, [requests[i] for i in (4, 1, 5, 3, 0, 2)]) == want
    assert log.compiled == []


def test_each_request_follows_its_own_key_and_greedy_rows_match(gpt2):
    """Sampled tokens depend on the request's key and settings only (the draws of
    `eqzoo.generate` with them), not on its slot or neighbours; a greedy request among sampled
    ones decodes as alone."""
    prompts = _prompts(1)
    settings = [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9), dict(), dict(temperature=1.3, min_p=0.05)]
    requests = [
        Request(p, b, id=i, key=jax.random.key(10 + i), **settings[i % len(settings)])
        for i, (p, b) in enumerate(zip(prompts, BUDGETS, strict=True))
    ]
    first = _served(_engine(gpt2), requests)
    hot = Request(prompts[0], 6, id="hot", key=jax.random.key(99), temperature=2.0)  # a new neighbour
    second = _served(_engine(gpt2), [requests[i] for i in (4, 5, 1)] + [hot] + [requests[i] for i in (3, 2, 0)])
    assert {k: second[k] for k in first} == first
    assert first[0] != first[4][: len(first[0])]  # sampled: different keys, different tokens
    r = requests[1]
    alone = eqzoo.generate(gpt2, r.prompt, max_new_tokens=r.max_new_tokens, key=r.key, temperature=0.7, top_k=20, top_p=0.9)
    assert first[1] == np.asarray(alone)[len(r.prompt) :].tolist()
    ref = np.asarray(generate_batch(gpt2, prompts[2][None], max_new_tokens=BUDGETS[2]))  # request 2 is greedy
    assert first[2] == ref[0, LENGTHS[2] :].tolist()


def test_bad_requests_are_refused_with_the_fix(gpt2):
    model = gpt2
    engine = _engine(model)
    state = engine.init_state()
    prompt = np.arange(6, dtype=np.int32)
    with pytest.raises(ShapeError, match=r"prompt length 6 \+ max_new_tokens 19 = 25 exceeds the engine's max_len=24"):
        engine.insert(state, 0, prompt, max_new_tokens=19)
    with pytest.raises(ConfigError, match=r"slot must be an int in \[0, 2\), got 2"):
        engine.insert(state, 2, prompt, max_new_tokens=2)
    state = engine.insert(state, 0, prompt, max_new_tokens=8)
    with pytest.raises(ConfigError, match=r"slot 0 is still decoding a request; insert into a free slot \(free: \[1\]\)"):
        engine.insert(state, 0, prompt, max_new_tokens=2)
    with pytest.raises(ConfigError, match="top_p must be in"):
        engine.insert(state, 1, prompt, max_new_tokens=2, temperature=1.0, key=jax.random.key(0), top_p=1.5)
    with pytest.raises(ConfigError, match="temperature > 0 needs a PRNG key"):
        engine.insert(state, 1, prompt, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ConfigError, match="at most stop_ids=4; build it with a larger stop_ids"):
        engine.insert(state, 1, prompt, max_new_tokens=2, eos_token=[1, 2, 3, 4, 5])
    with pytest.raises(ConfigError, match=r"2 stop sequences of up to 9 tokens given, but the engine takes at most "
                       r"stop_sequence_count=4 of at most stop_sequence_length=8 tokens; build it with larger ones"):
        engine.insert(state, 1, prompt, max_new_tokens=2, stop_sequences=[[1, 2], list(range(9))])
    with pytest.raises(ConfigError, match="stop_sequences holds the string"):
        engine.insert(state, 1, prompt, max_new_tokens=2, stop_sequences=["\n\n"])
    with pytest.raises(ConfigError, match=r"outside the model's vocabulary \[0, 256\)"):
        engine.insert(state, 1, jnp.asarray([3, 256]), max_new_tokens=2)
    with pytest.raises(ShapeError, match=r"max_len=40 must lie in \[2, the model's max_seq=24\]"):
        DecodeEngine(model, slots=2, max_len=40)
    with pytest.raises(ConfigError, match="slots must be an integer >= 1, got 0"):
        DecodeEngine(model, slots=0, max_len=16)
    with pytest.raises(ConfigError, match=r"prompt_buckets must be integers in \[1, max_len - 1 = 15\]"):
        DecodeEngine(model, slots=2, max_len=16, prompt_buckets=(8, 16))
    assert DecodeEngine(model, slots=2, max_len=24, prompt_buckets=(8, 16)).bucket(9) == 16
    with pytest.raises(ShapeError, match=r"longer than the largest prompt bucket \(16\); pass prompt_buckets"):
        DecodeEngine(model, slots=2, max_len=24, prompt_buckets=(8, 16)).insert(state, 1, np.arange(17), max_new_tokens=2)
    with pytest.raises(ConfigError, match="serve: requests must be eqzoo.generation.Request objects; request 0"):
        next(serve(engine, [(prompt, 2)]))
    with pytest.raises(ConfigError, match="serve needs an eqzoo.generation.DecodeEngine, got GPT2"):
        next(serve(model, []))
    with pytest.raises(ShapeError, match=r"takes one prompt of at least one integer token id, shape \(seq,\); got \(2, 3\)"):
        engine.insert(state, 1, np.zeros((2, 3), np.int32), max_new_tokens=2)
