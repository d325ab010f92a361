"""Streaming decoding: `generate_batch`'s token loop cut into compiled chunks, each handing its
tokens to the host as it ends."""

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple, no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Integer

from .._errors import ConfigError, as_flag
from .._typing import PRNGKey
from ..models._lm import AbstractLM
from ._generate import (
    _row_loop,
    _token_loop,
    check_count,
    check_model,
    decoding_model,
    prepare_batch,
    resolve_new_tokens,
    resolve_unroll,
)
from ._processors import LogitsProcessor


class StreamChunk(NamedTuple):
    """One chunk of [`eqzoo.generation.generate_stream`][]: host NumPy arrays.

    - `tokens`: `(batch, n)` int32, the next `n` generated tokens of every row (`n` is the
      stream's `chunk_size`, or fewer in the last chunk). A row that stopped (at `eos_token`
      or a stop sequence, both kept, or at its own per-row `max_new_tokens`) has `pad_token`
      after its stop.
    - `logprobs`: `(batch, n)` float32 log-probabilities of `tokens`, as `generate_batch`'s
      `return_logprobs` gives them (0 after a stop); `None` unless `return_logprobs=True`.
    - `counts`: `(batch,)` int32, how many of this chunk's tokens each row generated (up to
      and with its stop or its own per-row `max_new_tokens`; `n` for a row still going): row `i`'s new tokens are
      `tokens[i, :counts[i]]`.
    - `done`: `(batch,)` bool, which rows have stopped, in this chunk or before.
    """

    tokens: np.ndarray
    logprobs: np.ndarray | None
    counts: np.ndarray
    done: np.ndarray


@eqx.filter_jit
def _stream_start(model, prompts, lengths, key, *, unroll_layers, **settings):
    """The prefill program: every row's loop state (see `_row_loop`), with the row lengths in it."""
    model = decoding_model(model, unroll_layers)
    keys = jax.random.split(key, prompts.shape[0])  # as _generate_batch_jit splits it
    loop = _row_loop(model, prompts.shape, count=True, **settings)
    # the lengths travel in the carried state: copied here (a new buffer, never the caller's
    # array), since each chunk donates the whole state
    return {**loop.start(prompts, lengths, keys), "lengths": jnp.array(lengths, jnp.int32, copy=True)}


def _split_model(model) -> tuple:
    """`(arrays, skeleton)`: `model`'s array leaves, and the rest (its tree structure and other
    leaves), hashable: a chunk program's static argument. Split once per stream, so that each
    chunk's call is `jax.jit`'s own dispatch of a list of arrays (`eqx.filter_jit` would
    partition the whole model again on every chunk)."""
    leaves, treedef = jax.tree.flatten(model)
    arrays = [leaf for leaf in leaves if eqx.is_array(leaf)]
    return arrays, (treedef, tuple(None if eqx.is_array(leaf) else leaf for leaf in leaves))


def _join_model(arrays, skeleton):
    treedef, leaves = skeleton
    arrays = iter(arrays)
    return jax.tree.unflatten(treedef, [next(arrays) if leaf is None else leaf for leaf in leaves])


@functools.partial(jax.jit, static_argnames=("skeleton", "shape", "chunk_size", "unroll_layers", "static"), donate_argnums=0)
def _stream_chunk(state, arrays, first, traced, *, skeleton, shape, chunk_size, unroll_layers, static):
    """Steps `first .. first + chunk_size - 1` of the token loop. `state` is donated (the KV
    cache is updated in place); the model (`arrays` and `skeleton`, see `_split_model`), `first`
    and the traced settings are not. `first` is traced, so every chunk of a stream, the last
    and shorter one too, runs one compiled program. Returns the state and the chunk's tokens,
    log-probabilities (or `None`), counts and done flags."""
    model = decoding_model(_join_model(arrays, skeleton), unroll_layers)
    settings = {**dict(static), **traced}
    # the processors' arrays traced, the rest (functions, static fields) part of the program
    settings["processors"] = _join_model(settings.pop("processor_arrays"), settings.pop("processor_skeleton"))
    loop = _row_loop(model, shape, count=True, **settings)
    lengths, max_new = state["lengths"], settings["max_new_tokens"]
    before = state["count"]
    state = _token_loop(loop.step, state, lengths, jnp.minimum(first + chunk_size, loop.steps), loop.stops, first)
    if loop.steps < max_new:  # with the cache, the last token is emitted after the loop: in the chunk that holds it
        last = loop.finish(state, lengths)
        ends = first + chunk_size >= max_new
        # only the small per-row leaves change: the cache is neither read nor selected
        state = {k: (v if k in ("cache", "last") else jax.tree.map(lambda a, b: jnp.where(ends, a, b), last[k], v)) for k, v in state.items()}
    at = jnp.minimum(lengths[:, None] + first + jnp.arange(chunk_size), shape[1] + max_new - 1)  # (batch, chunk)
    buf, logps = state["out"]
    tokens = jnp.take_along_axis(buf, at, axis=1)
    logps = None if logps is None else jnp.take_along_axis(logps, at, axis=1)
    return state, (tokens, logps, state["count"] - before, state["done"])


@no_type_check  # validated below with messages that say how to fix the call
def generate_stream(
    model: AbstractLM,
    prompts: Integer[Array, "batch seq"],
    lengths: Integer[Array, " batch"] | None = None,
    *,
    max_new_tokens: int | Sequence[int] | Integer[Array, " batch"] | None = None,
    max_length: int | None = None,
    chunk_size: int = 16,
    attention_mask: Integer[Array, "batch seq"] | Bool[Array, "batch seq"] | None = None,
    key: PRNGKey | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token: int | Sequence[int] | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    pad_token: int = 0,
    use_cache: bool = True,
    unroll_layers: bool | str = "auto",
    cache_dtype=None,
    return_logprobs: bool = False,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    logit_bias: Mapping[int, float] | None = None,
    pipeline: bool = True,
) -> Iterator[StreamChunk]:
    """Continue a batch of prompts as [`eqzoo.generation.generate_batch`][] does, yielding the
    tokens a chunk at a time as they are decoded (for a server or a chat UI).

    The prefill runs as one compiled program, then each chunk of `chunk_size` token steps as
    one more, which carries the whole loop state (the KV cache, each row's key, done flag,
    seen ids and recent tokens) and donates it, so the cache is updated in place as inside
    `generate_batch`'s one program. The host waits once per chunk (to hand its tokens over),
    never per token, and (pipelined) while the next chunk runs. The stream ends after
    `max_new_tokens` tokens, or after the chunk in
    which every row has stopped (at `eos_token`, a stop sequence or its own limit, when
    `max_new_tokens` gives one per row: the stream runs for the largest).

    Concatenated, the chunks' tokens are `generate_batch`'s generated tokens with the same
    arguments and `key`, token for token (the same loop runs, in pieces); row `i`'s
    `generate_batch` output is its prompt's `lengths[i]` tokens, the chunks' row `i`, then
    `pad_token` up to `seq + max_new_tokens`. Log-probabilities agree to float32 rounding.

    **Arguments:** those of [`eqzoo.generation.generate_batch`][], and:

    - `chunk_size`: token steps per chunk (default 16): smaller reaches the first tokens
      sooner, larger costs fewer host round trips. Each chunk is the same compiled program,
      the last (shorter) one included; it compiles once per prompt shape, `max_new_tokens`,
      `chunk_size` and the static settings `generate_batch` lists (a new `temperature`,
      `top_p`, `min_p`, penalty, stop or pad id, `logit_bias`, per-row limits with the same
      largest, or array fields of a Module processor compiles nothing; a new plain-function
      processor compiles the chunk program again).
    - `pipeline`: from the second chunk on, dispatch chunk k + 1 before reading chunk k's
      tokens back (default), so the device computes while the host hands them over; the first
      chunk is read at once, so it comes no later. When every row has stopped in chunk k, the
      chunk already dispatched after it is dropped unread (at most one chunk of wasted work).
      `False` reads each chunk back before dispatching the next.

    The arguments are checked when `generate_stream` is called, before the first chunk.
    Closing the stream early (`break`) drops its state (and a chunk still running): nothing
    else is held. To turn the tokens into text, push each row's new tokens
    (`tokens[i, :counts[i]]`) to a tokenizer's [`eqzoo.data.StreamDecoder`][].

    **Returns:** an iterator of [`eqzoo.generation.StreamChunk`][]s: each chunk's `(batch, n)`
    tokens (with `return_logprobs`, their log-probabilities), how many of them each row
    generated, and which rows are done, as host NumPy arrays.
    """
    check_model(model, "generate_stream")
    check_count(chunk_size, "chunk_size", "generate_stream")
    if (pipeline_flag := as_flag(pipeline)) is None:
        raise ConfigError(f"generate_stream: pipeline must be True or False, got {pipeline!r}.")
    pipeline = pipeline_flag
    max_new_tokens = resolve_new_tokens(max_new_tokens, max_length, prompts, "generate_stream")
    prompts, lengths, key, settings = prepare_batch(
        model, prompts, lengths, "generate_stream", max_new_tokens=max_new_tokens, attention_mask=attention_mask,
        key=key, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, eos_token=eos_token, stop_sequences=stop_sequences,
        pad_token=pad_token, use_cache=use_cache, cache_dtype=cache_dtype, return_logprobs=return_logprobs,
        logits_processors=logits_processors, logit_bias=logit_bias,
    )
    unroll = resolve_unroll(unroll_layers)
    return _stream(model, prompts, lengths, key, min(int(chunk_size), settings["max_new_tokens"]), unroll, settings,
                   pipeline)


def _stream(model, prompts, lengths, key, chunk_size, unroll, settings, pipeline):
    settings = dict(settings)
    processor_arrays, processor_skeleton = _split_model(settings.pop("processors"))
    state = _stream_start(model, prompts, lengths, key, unroll_layers=unroll, **settings)  # the prefill: no processors
    # The settings the loop reads as arguments stay arguments (not donated); the rest is static.
    traced = {k: v for k, v in settings.items() if isinstance(v, np.ndarray)}
    static = tuple(sorted((k, v) for k, v in settings.items() if k not in traced))
    traced["processor_arrays"] = processor_arrays
    static = (*static, ("processor_skeleton", processor_skeleton))
    arrays, skeleton = _split_model(model)
    max_new = settings["max_new_tokens"]
    held = None  # (first, out): the chunk dispatched but not yet read back
    for first in range(0, max_new, chunk_size):
        state, out = _stream_chunk(
            state, arrays, np.asarray(first, np.int32), traced,
            skeleton=skeleton, shape=prompts.shape, chunk_size=chunk_size, unroll_layers=unroll, static=static,
        )
        # Pipelined, the chunk just dispatched runs while the one before it is read and handed
        # over. Not the first: it is read at once, so that the first tokens come no later.
        if pipeline and first > 0:
            previous, held = held, (first, out)
            if previous is None:
                continue
            first, out = previous
        chunk = _read(out, min(chunk_size, max_new - first))
        yield chunk
        if chunk.done.all():  # a chunk dispatched after it (pipelined) is dropped unread
            return
    if held is not None:
        yield _read(held[1], min(chunk_size, max_new - held[0]))


def _read(out, n) -> StreamChunk:
    tokens, logps, counts, done = jax.device_get(out)  # the one wait of the chunk
    return StreamChunk(tokens[:, :n], None if logps is None else logps[:, :n], counts, done)
