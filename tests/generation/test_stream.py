"""Streaming decoding: the chunks are generate_batch's tokens, one compiled chunk program, donation."""

import gc
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo import models
from eqzoo._errors import ConfigError
from eqzoo.generation import StreamChunk, generate_batch, generate_stream
from eqzoo.generation._stream import _stream_chunk

NEW = 8
PROMPTS = np.array([[5, 17, 42, 7, 99], [3, 1, 0, 0, 0]], np.int32)
LENGTHS = np.array([5, 2])


@pytest.fixture(scope="module")
def llama():
    model = models.create("tiny-llama", key=jax.random.key(0), max_seq=24)
    # init_std is 0.02: scaled up so greedy decoding does not just repeat one token
    return jax.tree.map(lambda a: 8 * a if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating) else a, model)


def _joined(chunks, prompts, lengths, pad):
    """generate_batch's layout from the chunks: row i's prompt, its generated tokens, padding."""
    gen = np.concatenate([c.tokens for c in chunks], axis=1)
    out = np.full((prompts.shape[0], prompts.shape[1] + NEW), pad, np.int32)
    for r, n in enumerate(lengths):
        out[r, :n] = prompts[r, :n]
        out[r, n : n + gen.shape[1]] = gen[r]
    return out


@pytest.fixture(scope="module")
def greedy(llama):
    return np.asarray(generate_batch(llama, PROMPTS, LENGTHS, max_new_tokens=NEW))


@pytest.mark.parametrize("case", ["greedy", "stops, left padding", "sampled, penalty, logprobs"])
def test_chunks_are_generate_batchs_tokens(llama, greedy, case):
    prompts, settings = PROMPTS, dict(lengths=LENGTHS)
    if case == "stops, left padding":
        eos = int(greedy[1, 2 + 4])  # row 1 stops at its fifth token (or earlier, where it repeats)
        stop = [int(greedy[0, 5 + 1]), int(greedy[0, 5 + 2])]  # row 0 at its third
        prompts = np.stack([PROMPTS[0], np.roll(PROMPTS[1], 3)])  # row 1 left-padded, with its mask
        settings = dict(attention_mask=np.array([[1] * 5, [0, 0, 0, 1, 1]]), eos_token=eos, stop_sequences=[stop], pad_token=255)
    elif case == "sampled, penalty, logprobs":
        settings.update(temperature=0.9, top_p=0.95, key=jax.random.key(1), repetition_penalty=1.4, return_logprobs=True)
    want = greedy if case == "greedy" else generate_batch(llama, prompts, max_new_tokens=NEW, **settings)
    want, want_logps = want if case.startswith("sampled") else (want, None)
    # greedy: the length as a generation config's max_length (the prompts' width + NEW)
    length = dict(max_length=PROMPTS.shape[1] + NEW) if case == "greedy" else dict(max_new_tokens=NEW)
    chunks = list(generate_stream(llama, prompts, chunk_size=3, **length, **settings))
    assert all(isinstance(c, StreamChunk) and isinstance(c.tokens, np.ndarray) for c in chunks)
    pad = settings.get("pad_token", 0)
    np.testing.assert_array_equal(_joined(chunks, PROMPTS, LENGTHS, pad), want)
    if case == "stops, left padding":  # row 0 stops in the first chunk, row 1 in the second: no third
        assert len(chunks) == 2 and chunks[0].done.tolist() == [True, False] and chunks[1].done.all()
        assert [c.tokens.shape[1] for c in chunks] == [3, 3]
        assert chunks[0].counts[0] == 3  # up to and with the stop, then padding
        gen = np.concatenate([c.tokens for c in chunks], axis=1)
        np.testing.assert_array_equal(sum(c.counts for c in chunks), (gen != pad).sum(-1))
    else:
        assert [c.tokens.shape[1] for c in chunks] == [3, 3, 2]  # the last chunk shorter
        assert [c.counts.tolist() for c in chunks] == [[3, 3], [3, 3], [2, 2]]
        assert not any(c.done.any() for c in chunks)
    if want_logps is not None:  # the same computation: equal to float32 rounding
        logps = np.concatenate([c.logprobs for c in chunks], axis=1)
        for r, n in enumerate(LENGTHS):
            np.testing.assert_allclose(logps[r], np.asarray(want_logps)[r, n : n + NEW], rtol=0, atol=1e-6)
    else:
        assert chunks[0].logprobs is None


def test_without_the_cache_too(llama):
    settings = dict(max_new_tokens=NEW, use_cache=False, temperature=0.8, key=jax.random.key(2))
    want = generate_batch(llama, PROMPTS, LENGTHS, **settings)
    chunks = list(generate_stream(llama, PROMPTS, LENGTHS, chunk_size=5, **settings))
    np.testing.assert_array_equal(_joined(chunks, PROMPTS, LENGTHS, 0), want)


def test_one_chunk_program_and_new_settings_compile_nothing(llama, compile_log):
    def run(**settings):
        return list(generate_stream(llama, PROMPTS, LENGTHS, max_new_tokens=NEW, chunk_size=3, key=jax.random.key(0),
                                    **settings))

    before = _stream_chunk._cache_size()
    run(temperature=0.7, top_p=0.9, min_p=0.1, repetition_penalty=1.2, pad_token=7, eos_token=[1, 2], stop_sequences=[[3, 4]])
    assert _stream_chunk._cache_size() == before + 1  # three chunks, the last shorter: one program
    with compile_log() as log:
        run(top_p=0.5, min_p=0.3, repetition_penalty=1.7, pad_token=9, eos_token=[5, 6], stop_sequences=[[8, 9]], temperature=1.3)
    assert log.compiled == []


def test_chunks_donate_the_state_in_place(llama):
    # Each chunk's input state (the KV cache included) is donated, with no "donated buffers were
    # not usable" warning: every buffer is aliased to the chunk's output state.
    # (chunk_size 2: four chunks, so that the second next() dispatches one more, pipelined or not)
    stream = generate_stream(llama, PROMPTS, LENGTHS, max_new_tokens=NEW, chunk_size=2, eos_token=3, return_logprobs=True)
    frame = stream.gi_frame
    next(stream)
    state = frame.f_locals["state"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        next(stream)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    assert "cache" in state


def test_the_next_chunk_is_dispatched_before_this_one_is_read(llama, greedy, monkeypatch):
    # Pipelined, chunk k + 1 is already queued when chunk k (k >= 1) is handed over, and its
    # tokens (read after chunk k + 1 took over the donated state) are still generate_batch's;
    # the first chunk, and every chunk with pipeline=False, is read back before the next is
    # dispatched. Either way, the same chunks.
    from eqzoo.generation import _stream

    dispatched = []
    real = _stream._stream_chunk
    monkeypatch.setattr(_stream, "_stream_chunk", lambda *a, **kw: dispatched.append(a[2]) or real(*a, **kw))
    chunks = {}
    for pipeline in (True, False):
        dispatched.clear()
        stream = generate_stream(llama, PROMPTS, LENGTHS, max_new_tokens=NEW, chunk_size=3, pipeline=pipeline)
        chunks[pipeline] = [next(stream)]
        assert dispatched == [0]
        chunks[pipeline].append(next(stream))
        assert dispatched == ([0, 3, 6] if pipeline else [0, 3])
        chunks[pipeline] += list(stream)
        assert dispatched == [0, 3, 6]
    np.testing.assert_array_equal(_joined(chunks[True], PROMPTS, LENGTHS, 0), greedy)
    for a, b in zip(chunks[True], chunks[False], strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.counts, b.counts)


def test_a_chunk_dispatched_after_every_row_stopped_is_never_yielded(llama, greedy, monkeypatch):
    # Every row stops in the second chunk: the pipelined stream has dispatched the third (all
    # padding) by then, and drops it unread: the same two chunks as without pipelining.
    from eqzoo.generation import _stream

    dispatched = []
    real = _stream._stream_chunk
    monkeypatch.setattr(_stream, "_stream_chunk", lambda *a, **kw: dispatched.append(a[2]) or real(*a, **kw))
    stops = [[int(greedy[0, 5 + 3])], [int(greedy[1, 2 + 4])]]  # row 0 at its fourth token, row 1 its fifth
    settings = dict(max_new_tokens=NEW, chunk_size=3, stop_sequences=stops, pad_token=255)
    two = list(generate_stream(llama, PROMPTS, LENGTHS, **settings))
    assert dispatched == [0, 3, 6] and len(two) == 2 and not two[0].done.any() and two[1].done.all()
    np.testing.assert_array_equal(two[1].counts, [1, 2])
    np.testing.assert_array_equal(two[1].tokens, [[greedy[0, 8], 255, 255], [*greedy[1, 5:7], 255]])
    unpipelined = list(generate_stream(llama, PROMPTS, LENGTHS, pipeline=False, **settings))
    assert len(unpipelined) == 2
    for a, b in zip(two, unpipelined, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_dropping_a_stream_with_a_chunk_in_flight(llama, greedy):
    # A client that leaves while the next chunk is still running: the generator is closed (or
    # collected) with that chunk's state unread; nothing waits on it, and the next stream works.
    for leave in ("close", "collect"):
        stream = generate_stream(llama, PROMPTS, LENGTHS, max_new_tokens=NEW, chunk_size=2)
        next(stream), next(stream)
        held = stream.gi_frame.f_locals["held"]
        assert held is not None  # the third chunk, dispatched and unread
        if leave == "close":
            stream.close()
        del stream, held
        gc.collect()
    chunks = list(generate_stream(llama, PROMPTS, LENGTHS, max_new_tokens=NEW, chunk_size=2))
    np.testing.assert_array_equal(_joined(chunks, PROMPTS, LENGTHS, 0), greedy)


def test_closing_early_leaves_the_next_stream_working(llama, greedy):
    stream = generate_stream(llama, PROMPTS, LENGTHS, max_new_tokens=NEW, chunk_size=2)
    for chunk in stream:  # a client that leaves after the first chunk
        first = chunk.tokens
        break
    np.testing.assert_array_equal(first, [greedy[0, 5:7], greedy[1, 2:4]])
    stream.close()
    chunks = list(generate_stream(llama, PROMPTS, LENGTHS, max_new_tokens=NEW, chunk_size=2))
    np.testing.assert_array_equal(_joined(chunks, PROMPTS, LENGTHS, 0), greedy)


@pytest.mark.parametrize("chunk_size", [0, -2, 2.5, True, None])
def test_bad_chunk_size_is_refused_at_the_call(llama, chunk_size):
    with pytest.raises(ConfigError, match=rf"generate_stream: chunk_size must be an integer >= 1, got {chunk_size!r}"):
        generate_stream(llama, PROMPTS, LENGTHS, max_new_tokens=NEW, chunk_size=chunk_size)  # not iterated


def test_arguments_are_checked_at_the_call(llama):
    with pytest.raises(ConfigError, match="sampling with temperature > 0 needs a PRNG key"):
        generate_stream(llama, PROMPTS, LENGTHS, max_new_tokens=NEW, temperature=0.5)
    with pytest.raises(ConfigError, match="generate_stream needs an eqzoo language model"):
        generate_stream(PROMPTS, llama, max_new_tokens=NEW)
    # flags that were read by truth value ("False" pipelined, use_cache="no" used the cache), and
    # the checks generate_stream shares with generate_batch, named for it (they said "generate:")
    for bad, match in ((dict(pipeline="False"), "pipeline must be True or False, got 'False'"),
                       (dict(use_cache="no"), "use_cache must be True or False, got 'no'"),
                       (dict(eos_token=10**6), r"eos_token \[1000000\] holds ids \[1000000\] outside"),
                       (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0")):
        with pytest.raises(ConfigError, match=f"generate_stream: {match}"):
            generate_stream(llama, PROMPTS, LENGTHS, **{"max_new_tokens": NEW, **bad})
