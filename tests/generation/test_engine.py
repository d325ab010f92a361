"""Continuous batching (`DecodeEngine`, `serve`): each request's tokens are those it gets decoded
alone, whatever slot it lands in, whatever its neighbours do and in whichever order it arrives;
new prompts within a bucket and new settings compile nothing; bad requests are refused."""

import asyncio
import queue
import threading
import time

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


def _served(engine, requests, logprobs=None, errors=None, **options) -> dict:
    """Each request's tokens; each one's log-probabilities into `logprobs` and each refusal's
    message into `errors` (dicts by id), where given."""
    out = {}
    for event in serve(engine, requests, **options):
        assert event.id not in out or not out[event.id][1], "a request produced tokens after it was done"
        if event.error is not None:
            assert errors is not None, event.error
            assert event.done and event.tokens.shape == (0,) and event.id not in out and event.id not in errors
            errors[event.id] = event.error
            continue
        tokens, _ = out.get(event.id, ([], False))
        out[event.id] = (tokens + event.tokens.tolist(), event.done)
        if event.logprobs is not None:
            assert logprobs is not None and event.logprobs.shape == event.tokens.shape
            logprobs[event.id] = logprobs.get(event.id, []) + event.logprobs.tolist()
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


def test_stop_id_and_stop_sequence_widths_may_differ(gpt2):
    # The engine compared each token with (slots, stop_ids) eos ids and (slots,
    # stop_sequence_count) sequences in one broadcast: other widths than equal ones failed.
    prompts = _prompts()[:3]
    plain = _served(_engine(gpt2), [Request(p, 8, id=i) for i, p in enumerate(prompts)])
    eos, stop = plain[0][3], plain[1][2:4]  # request 0 ends at an eos id, request 1 at a sequence
    requests = [Request(p, 8, id=i, eos_token=[eos, 255], stop_sequences=[[255, 254], stop, [253, 252, 251]])
                for i, p in enumerate(prompts)]
    engine = DecodeEngine(gpt2, slots=2, max_len=24, steps_per_call=3, stop_ids=2, stop_sequence_count=3)
    got = _served(engine, requests)
    assert got == {i: _cut(row, eos, stop) for i, row in plain.items()}
    assert len(got[0]) <= 4 and len(got[1]) <= 4


def test_each_request_follows_its_own_key_and_greedy_rows_match(gpt2, compile_log):
    """Sampled tokens depend on the request's key and settings only (the draws of
    `eqzoo.generate` with them), not on its slot or neighbours; a greedy request among sampled
    ones decodes as alone. Log-probabilities (a sampled and a greedy request) are
    `generate`'s; a greedy request's repetition penalty and logit bias give `generate`'s
    tokens. Requests turning these on and off compile nothing."""
    prompts = _prompts(1)
    settings = [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9), dict(), dict(temperature=1.3, min_p=0.05)]
    requests = [
        Request(p, b, id=i, key=jax.random.key(10 + i), return_logprobs=i in (1, 2), **settings[i % len(settings)])
        for i, (p, b) in enumerate(zip(prompts, BUDGETS, strict=True))
    ]
    first_logprobs, second_logprobs = {}, {}
    first = _served(_engine(gpt2), requests, first_logprobs)
    hot = Request(prompts[0], 6, id="hot", key=jax.random.key(99), temperature=2.0)  # a new neighbour
    plain = Request(prompts[2], 12, id="plain", key=jax.random.key(0))  # greedy (the key unused), no penalty: it repeats tokens
    bias = {int(first[2][0]): -np.inf, 7: 1.5}  # bans plain's first token
    penalized = Request(prompts[2], 12, id="penalized", key=plain.key, repetition_penalty=1.5, logit_bias=bias)
    order = [requests[i] for i in (4, 5, 1)] + [hot, penalized] + [requests[i] for i in (3, 2, 0)] + [plain]
    with compile_log() as log:  # other slots and neighbours; penalty, bias, log-probabilities on and off
        second = _served(_engine(gpt2), order, second_logprobs)
    assert log.compiled == [], log.compiled
    assert {k: second[k] for k in first} == first
    for k, logp in first_logprobs.items():  # a prompt prefilled in another admission batch rounds its logits differently
        np.testing.assert_allclose(second_logprobs[k], logp, rtol=0, atol=1e-5)
    assert first[0] != first[4][: len(first[0])]  # sampled: different keys, different tokens
    r = requests[1]
    alone, logp = eqzoo.generate(gpt2, r.prompt, max_new_tokens=r.max_new_tokens, key=r.key, temperature=0.7, top_k=20,
                                 top_p=0.9, return_logprobs=True)
    assert first[1] == np.asarray(alone)[len(r.prompt) :].tolist()
    # fp32: the engine's logits are a slot batch's (another matmul shape than generate's one row), so
    # they round differently in the last bits; the tokens are equal, the log-probabilities within 1e-5
    np.testing.assert_allclose(first_logprobs[1], np.asarray(logp)[len(r.prompt) :], rtol=0, atol=1e-5)
    ref, logp = generate_batch(gpt2, prompts[2][None], max_new_tokens=BUDGETS[2], return_logprobs=True)  # request 2 is greedy
    assert first[2] == np.asarray(ref)[0, LENGTHS[2] :].tolist()
    np.testing.assert_allclose(first_logprobs[2], np.asarray(logp)[0, LENGTHS[2] :], rtol=0, atol=1e-5)
    assert set(first_logprobs) == {1, 2} and min(first_logprobs[1]) < -1.0  # sampled: not always the likeliest
    ref = eqzoo.generate(gpt2, prompts[2], max_new_tokens=12, repetition_penalty=1.5, logit_bias=bias)
    assert second["penalized"] == np.asarray(ref)[LENGTHS[2] :].tolist()
    assert len(set(second["plain"])) < 12 and len(set(second["penalized"])) == 12  # the penalty acts


def test_bad_requests_are_refused_with_the_fix(gpt2):
    model = gpt2
    engine = _engine(model)
    state = engine.init_state()
    prompt = np.arange(6, dtype=np.int32)
    with pytest.raises(ShapeError, match=r"prompt length 6 \+ max_new_tokens 19 = 25 exceeds the engine's max_len=24"):
        engine.insert(state, 0, prompt, max_new_tokens=19)
    with pytest.raises(ConfigError, match=r"slot must be an int in \[0, 2\), got 2"):
        engine.insert(state, 2, prompt, max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"key is a key<rbg> key, but the engine's slots hold key<fry> keys.*jax.random.key\(seed\)"):
        engine.insert(state, 1, prompt, max_new_tokens=2, key=jax.random.key(0, impl="rbg"), temperature=1.0)
    state = engine.insert(state, 0, prompt, max_new_tokens=8)
    with pytest.raises(ConfigError, match=r"slot 0 is still decoding a request; insert into a free slot \(free: \[1\]\)"):
        engine.insert(state, 0, prompt, max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"^DecodeEngine.insert: top_p must be in"):  # the shared check, named
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
    with pytest.raises(ShapeError, match=r"^DecodeEngine.insert: a prompt of 17 tokens is longer than the largest "
                       r"prompt bucket \(16\); pass prompt_buckets"):
        DecodeEngine(model, slots=2, max_len=24, prompt_buckets=(8, 16)).insert(state, 1, np.arange(17), max_new_tokens=2)
    with pytest.raises(ConfigError, match="at most logit_bias_ids=16; build it with a larger logit_bias_ids"):
        engine.insert(state, 1, prompt, max_new_tokens=2, logit_bias={i: 1.0 for i in range(17)})
    with pytest.raises(ConfigError, match="repetition_penalty must be a finite number > 0"):
        engine.insert(state, 1, prompt, max_new_tokens=2, repetition_penalty=0.0)
    with pytest.raises(ConfigError, match="serve: requests must be eqzoo.generation.Request objects; request 0"):
        next(serve(engine, [(prompt, 2)], on_error="raise"))
    with pytest.raises(ConfigError, match="serve: on_error must be 'event'"):
        next(serve(engine, [], on_error="skip"))
    with pytest.raises(ConfigError, match="serve: pipeline must be True or False, got 1"):
        next(serve(engine, [], pipeline=1))
    with pytest.raises(ConfigError, match="DecodeEngine.insert: return_logprobs must be True or False, got 'yes'"):
        engine.insert(state, 1, prompt, max_new_tokens=2, return_logprobs="yes")
    with pytest.raises(ConfigError, match="serve needs an eqzoo.generation.DecodeEngine, got GPT2"):
        next(serve(model, []))
    with pytest.raises(ShapeError, match=r"insert: a prompt is one sequence of at least one integer token id, shape "
                       r"\(seq,\); got \(2, 3\)"):
        engine.insert(state, 1, np.zeros((2, 3), np.int32), max_new_tokens=2)
    with pytest.raises(ShapeError, match=r"serve: a prompt is one.*got \(2, 3\)\. For several prompts, give each its own Request"):
        next(serve(engine, [Request(np.zeros((2, 3), np.int32), 2)], on_error="raise"))
    with pytest.raises(ShapeError, match=r"got dtype float32\. Token ids are integers.*astype\(np\.int32\)"):
        next(serve(engine, [Request(np.zeros((3,), np.float32), 2)], on_error="raise"))

    with pytest.raises(ShapeError, match=r"serve: the prompt is text \('hello'\), but the engine takes token ids: "
                       r"pass tokenizer.encode\(text\)"):
        next(serve(engine, [Request("hello", 2)], on_error="raise"))


@pytest.mark.parametrize("pipeline", [True, False])
def test_an_id_still_decoding_is_refused_and_free_again_once_its_request_ends(gpt2, pipeline):
    """A request whose id is that of a request still decoding is refused (its refusal carries
    its index, so the first request's events stay its own); once a request's budget runs out
    in the calls launched, its id serves a new request, whose events follow its last one."""
    engine, prompts = _engine(gpt2), _prompts(6)
    want = _served(engine, [Request(prompts[0], 9, id="a"), Request(prompts[2], 2, id="b"),
                            Request(prompts[3], 5, id="c")])
    requests = [Request(prompts[0], 9, id="a"), Request(prompts[1], 4, id="a"), Request(prompts[2], 2, id="b"),
                Request(prompts[3], 5, id="b")]  # the first "b" ends within the first call (3 steps)
    events = list(serve(engine, requests, pipeline=pipeline))
    refusals = [e for e in events if e.error is not None]
    assert [e.id for e in refusals] == [1], refusals
    assert refusals[0].error.startswith("serve: request 1's id 'a' is that of a request still decoding")
    assert "give each request in flight its own id" in refusals[0].error
    a = [e for e in events if e.id == "a"]
    assert sum((e.tokens.tolist() for e in a), []) == want["a"] and [e.done for e in a].count(True) == 1 and a[-1].done
    b = [e for e in events if e.id == "b"]
    first = next(i for i, e in enumerate(b) if e.done) + 1  # the first "b"'s events, then the second's
    assert sum((e.tokens.tolist() for e in b[:first]), []) == want["b"]
    assert sum((e.tokens.tolist() for e in b[first:]), []) == want["c"] and b[-1].done
    with pytest.raises(ConfigError, match=r"request 1's id 'a' is that of a request still decoding, .* its own id \(a counter "
                       r"or a uuid; ints of your own can collide with the indices of requests without one\)\.$"):
        list(serve(engine, requests[:2], on_error="raise"))
    # a request without an id whose index is the id of one in flight is told so
    errors = {}
    _served(engine, [Request(prompts[0], 9, id=1), Request(prompts[1], 4)], errors=errors)
    assert errors[1].startswith("serve: request 1 has no id, so its events would carry its index 1, the id of a request "
                                "still decoding")


def test_a_bad_request_mid_stream_is_refused_alone(gpt2):
    """Bad requests arriving while others decode each get one event with the reason (each
    starting "serve: ", the shared sampling checks' too); the requests in flight and after
    them decode as if they had not come."""
    engine, prompts = _engine(gpt2), _prompts(2)
    good = [Request(prompts[i], b, id=f"ok{i}") for i, b in ((0, 12), (1, 3), (2, 6))]
    bad = [
        Request(prompts[3], 20, id="long"),  # prompt 12 + 20 > max_len 24
        ("not", "a request"),  # no id: its index, 3
        Request(prompts[4], 2, id="hot", temperature=1.0),  # no key
        Request([3, 999], 2, id="oov"),  # an id outside the vocabulary
        Request(prompts[4], 2, id="top_p", temperature=1.0, key=jax.random.key(0), top_p=1.5),
        Request(prompts[4], 2, id=("x", [1])),  # not hashable (a Hashable tuple): its refusal carries its index, 7
    ]
    errors = {}
    # ok0 decodes while the bad ones arrive (ok1's slot frees first), ok2 after them
    served = _served(engine, good[:2] + bad + good[2:], errors=errors)
    assert served == _served(engine, good)
    assert set(errors) == {"long", 3, "hot", "oov", "top_p", 7}
    assert all(error.startswith("serve: ") for error in errors.values()), errors
    assert "prompt length 12 + max_new_tokens 20 = 32 exceeds the engine's max_len=24" in errors["long"]
    assert "request 3 is a tuple" in errors[3] and "needs a PRNG key" in errors["hot"]
    assert "outside the model's vocabulary [0, 256)" in errors["oov"]
    assert errors["top_p"] == "serve: top_p must be in (0, 1] or None, got 1.5."
    assert "request 7's id ('x', [1]) is not hashable (unhashable type: 'list')" in errors[7]


def test_serve_refuses_bad_requests_only_and_lets_its_own_faults_through(gpt2):
    """A fault that is no request's fault (here the engine's own state, broken after it was
    built: a TypeError from the request checks that read it) propagates out of `serve` even
    with `on_error="event"`, rather than being reported as a refusal of the request."""
    engine = _engine(gpt2)
    engine.prompt_buckets = None
    with pytest.raises(TypeError, match="^'NoneType' object is not iterable$"):  # raised as it is
        list(serve(engine, [Request(np.arange(3), 2)]))


def test_serve_launches_a_call_before_it_reads_the_last_unless_told_not_to(gpt2, monkeypatch):
    """With `pipeline=True` every step call but the first is launched before the previous
    one is read (the real calls, recorded in order); with `pipeline=False` each is read first,
    so a slot freed at an eos id takes the waiting request one call sooner."""
    engine, prompts, calls = _engine(gpt2), _prompts(3), []
    step, device_get = engine._step, jax.device_get
    monkeypatch.setattr(engine, "_step", lambda *a: calls.append("step") or step(*a))
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append("read") or device_get(x))
    eos = _served(engine, [Request(prompts[0], 1)])[0][0]
    requests = [Request(prompts[0], 9, eos_token=eos), Request(prompts[1], 9), Request(prompts[2], 6)]
    calls.clear()
    pipelined = _served(engine, requests)
    assert calls == ["step"] + ["step", "read"] * 3 + ["read"]  # request 0 ends in call 1; its slot idles in call 2
    calls.clear()
    assert _served(engine, requests, pipeline=False) == pipelined and pipelined[0] == [eos]
    assert calls == ["step", "read"] * 3  # request 2 takes the slot in call 2


def test_a_prefix_prefilled_once_serves_as_the_joined_prompt(compile_log):
    """Requests after a shared prefix (`prefill_prefix` once, `Request(..., prefix=)`) get the
    tokens of their joined prompt, mixed in one serving with requests without one and with
    another prefix, on Gemma 2's windowed layers (4-slot rings, which the prefixes and tokens
    run past). Prefix B (11 tokens) ends past `max_len - bucket` (24 - 16), so its requests'
    suffix chunks start inside it and recompute its last 3 positions. A repetition penalty
    counts the prefix's ids as prompt ids. Other prefixes of the same bucket compile nothing."""
    model = _scaled("tiny-gemma2", 1, max_seq=24, num_layers=2, sliding_window=4)
    engine, rng = _engine(model), np.random.default_rng(4)
    suffixes = [rng.integers(0, 256, n).astype(np.int32) for n in (4, 2, 5, 3, 5)]
    budgets, uses = (8, 6, 7, 5, 8), ("a", "b", None, "a", "b")  # first admission: a and b in one program

    def serving(a, b):
        prefixes = {"a": engine.prefill_prefix(a), "b": engine.prefill_prefix(b), None: None}
        requests = [Request(s, n, id=i, prefix=prefixes[u], repetition_penalty=1.3, return_logprobs=i == 1)
                    for i, (s, n, u) in enumerate(zip(suffixes, budgets, uses, strict=True))]
        logprobs = {}
        return _served(engine, requests, logprobs), logprobs

    def reference(a, b):
        joined = [s if u is None else np.concatenate([{"a": a, "b": b}[u], s]) for s, u in zip(suffixes, uses, strict=True)]
        lengths, padded = [len(j) for j in joined], np.zeros((len(joined), 16), np.int32)  # one width: one compile
        for row, j in zip(padded, joined, strict=True):
            row[: len(j)] = j
        ref, logp = generate_batch(model, padded, np.asarray(lengths), max_new_tokens=list(budgets),
                                   repetition_penalty=1.3, return_logprobs=True)
        rows = [(np.asarray(ref)[i, n : n + k].tolist(), np.asarray(logp)[i, n : n + k]) for i, (n, k) in enumerate(zip(lengths, budgets, strict=True))]
        return {i: tokens for i, (tokens, _) in enumerate(rows)}, rows[1][1]

    a, b = rng.integers(0, 256, 5).astype(np.int32), rng.integers(0, 256, 11).astype(np.int32)
    (served, logprobs), (want, want_logp) = serving(a, b), reference(a, b)
    assert served == want
    # fp32: the suffix runs through decode over the cache, the joined prompt through prefill: 1e-5
    np.testing.assert_allclose(logprobs[1], want_logp, rtol=0, atol=1e-5)
    c, d = rng.integers(0, 256, 7).astype(np.int32), rng.integers(0, 256, 9).astype(np.int32)
    want, _ = reference(c, d)
    with compile_log() as log:  # new prefixes (prefilled too), lengths 7 and 9, of the same bucket (16)
        served, _ = serving(c, d)
    assert log.compiled == [], log.compiled
    assert served == want


def test_bad_prefixes_are_refused_with_the_fix(gpt2):
    engine, other = _engine(gpt2), _engine(gpt2)
    state = engine.init_state()
    prefix = engine.prefill_prefix(np.arange(10))
    assert prefix.length == 10 and prefix.width == 16 and prefix.tokens.tolist() == list(range(10))
    with pytest.raises(ShapeError, match=r"prefix length 10 \+ prompt length 6 \+ max_new_tokens 9 = 25 exceeds the "
                       r"engine's max_len=24"):
        engine.insert(state, 0, np.arange(6), max_new_tokens=9, prefix=prefix)
    with pytest.raises(ConfigError, match=r"this prefix was made by another DecodeEngine .* make it with this engine's "
                       r"prefill_prefix"):
        other.insert(state, 0, np.arange(6), max_new_tokens=2, prefix=prefix)
    with pytest.raises(ConfigError, match=r"prefix must be an eqzoo.generation.Prefix from engine.prefill_prefix\(tokens\), "
                       "got ndarray"):
        engine.insert(state, 0, np.arange(6), max_new_tokens=2, prefix=np.arange(3))
    with pytest.raises(ShapeError, match=r"a prefix of 23 tokens is too long for this engine: at most 22 \(max_len=24"):
        engine.prefill_prefix(np.arange(23))
    with pytest.raises(ShapeError, match=r"takes one prefix of at least one integer token id, shape \(seq,\); got shape \(0,\)"):
        engine.prefill_prefix(np.zeros((0,), np.int32))
    with pytest.raises(ConfigError, match=r"the prefix holds ids outside the model's vocabulary \[0, 256\)"):
        engine.prefill_prefix([5, 300])
    errors = {}  # serve refuses it alone
    assert _served(other, [Request(np.arange(6), 2, id="x", prefix=prefix)], errors=errors) == {}
    assert "made by another DecodeEngine" in errors["x"]


class _CountingQueue(queue.Queue):
    """A real `queue.Queue` that counts the `get`s that may wait and those that may not."""

    def __init__(self):
        super().__init__()
        self.gets = {True: 0, False: 0}

    def get(self, block=True, timeout=None):
        self.gets[block] += 1
        return super().get(block, timeout)


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_queue_admits_requests_that_arrive_while_others_decode(gpt2, pipeline):
    """Requests put on a `queue.Queue` while another decodes join it in the running batch (the
    queue is polled, not waited on, while a request is in flight): their events interleave with
    the first request's, their tokens are those a list gives, a bad one is refused alone, and a
    `None` ends serving once the requests in flight are done, leaving what follows it queued."""
    prompts = _prompts(4)
    first, late = Request(prompts[0], 18, id="first"), Request(prompts[2], 6, id="late")
    want = _served(_engine(gpt2), [first, late])
    requests = _CountingQueue()
    watchdog = threading.Timer(60, requests.put, [None])  # a serve that waits with a request in flight ends
    watchdog.start()
    requests.put(first)
    order, tokens, errors = [], {}, {}
    try:
        for event in serve(_engine(gpt2), requests, pipeline=pipeline):
            order.append((event.id, event.done))
            if event.error is not None:
                errors[event.id] = event.error
                continue
            tokens[event.id] = tokens.get(event.id, []) + event.tokens.tolist()
            if order == [("first", False)]:  # the first request is decoding: two more arrive
                requests.put(Request(prompts[1], 99, id="too-long"))
                requests.put(late)
            if event.id == "late" and event.done:
                requests.put(None)
                requests.put(Request(prompts[3], 2, id="after-the-end"))
    finally:
        watchdog.cancel()
    assert tokens == want
    assert order.index(("late", True)) < order.index(("first", True)), order  # served beside "first"
    assert "max_new_tokens 99" in errors["too-long"] and errors["too-long"].startswith("serve: ")
    assert requests.get_nowait().id == "after-the-end" and requests.empty()
    assert requests.gets[True] == 1, requests.gets  # waited only before the first request


def test_an_idle_serve_waits_on_its_queue_and_refusals_do_not_end_it(gpt2):
    """With nothing in flight, `serve` waits on the queue (one blocking `get` per arrival,
    not a busy poll); a refused request's event comes at once and serving goes on."""
    prompts = _prompts(5)
    want = _served(_engine(gpt2), [Request(prompts[0], 4, id="a")])
    requests = _CountingQueue()
    events = []

    def feed():
        for item in (("not", "a request"), Request(prompts[0], 4, id="a"), None):
            time.sleep(0.3)
            requests.put(item)

    feeder = threading.Thread(target=feed)
    feeder.start()
    for event in serve(_engine(gpt2), requests):
        events.append(event)
    feeder.join()
    assert events[0].id == 0 and events[0].done and "request 0 is a tuple" in events[0].error
    assert {"a": sum((e.tokens.tolist() for e in events[1:]), [])} == want
    # one wait each for the refusal, the request and the None, and a few polls while "a" decodes
    assert requests.gets[True] <= 4 and sum(requests.gets.values()) < 20, requests.gets  # a busy poll: thousands


def test_serve_refuses_an_asyncio_queue_with_the_fix(gpt2):
    with pytest.raises(ConfigError, match=r"requests is an asyncio.Queue, but serve is a blocking generator; run it in "
                       r"a thread .* queue.Queue"):
        next(serve(_engine(gpt2), asyncio.Queue()))
