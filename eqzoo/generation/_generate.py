"""Autoregressive decoding with a KV cache, compiled as one program."""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Integer

from .._errors import ConfigError, ShapeError, as_flag, holds_deleted, int_hint, shape_str
from .._typing import PRNGKey
from ..models._lm import AbstractLM
from ..nn._attention import check_cache_dtype
from ..nn._fields import with_fields
from ._processors import LogitsProcessor, apply_processors, check_processors, logit_bias_vector
from ._prompts import as_prompts, host_values, prompt_batch
from ._sampling import (
    check_sampling,
    check_stop_sequences,
    check_stop_tokens,
    draw,
    ends_with_stop,
    is_eos,
    penalize_repeats,
    traced_settings,
    traced_stop_sequences,
    traced_stop_tokens,
)


class _RowLoop(NamedTuple):
    """The pieces of the token loop over a batch, shared by `generate_batch` (one program) and
    `generate_stream` (a prefill program, then one program per chunk of steps):

    - `start(prompts, lengths, keys)`: each row's state, prefilled (with the cache);
    - `step(i, state, lengths)`: emit token `i` of every row (and decode it, with the cache);
    - `steps`: how many `step`s: with the cache the last token needs no decode after it, so
      `max_new_tokens - 1`, and `finish` emits it;
    - `finish(state, lengths)`: the state after the loop (with the cache: token
      `max_new_tokens - 1` emitted; without: as it is);
    - `stops`: whether a row can stop early (the loop is then a `while_loop`)."""

    start: Callable
    step: Callable
    steps: int
    finish: Callable
    stops: bool


def _row_loop(model, shape, **settings) -> _RowLoop:
    """The token loop over a batch of prompts of `shape`, each row at its own position (the
    phases of one row: `_RowDecoder`). Each step's work is per row (`vmap`); the token loop runs
    outside the `vmap`, so that with `eos_token` its stop test is one scalar: a `while_loop`
    under `vmap` would keep or discard each row's whole carry, the KV cache included, by a
    select on every step, and the cache could no longer be updated in place."""
    rows = _RowDecoder(model, shape, **settings)
    per_row = functools.partial(jax.vmap, in_axes=(None, 0, 0))  # (step, per-row state, length)
    steps = rows.max_new_tokens - 1 if rows.use_cache else rows.max_new_tokens
    return _RowLoop(rows.start, per_row(rows.step), steps, rows.finish, rows.stops)


class _RowDecoder:
    """One row's decoding, phase by phase, for `_row_loop`: `start_row` (its state, prefilled),
    `emit` (draw one token and record it), `step` (emit, then decode it with the cache) and
    `finish` (the last token, which needs no decode after it). The settings are those of
    `generate_batch`'s loop (see `prepare_batch`): static values and traced arrays.

    With a `repetition_penalty` each row carries a `(vocab,)` bool of the ids it has seen, set
    once from the prompt and by one scatter per token (no rescan of the sequence); with
    `stop_sequences`, its last `longest` generated tokens; with `count`, how many tokens it has
    generated (up to its stop)."""

    def __init__(
        self, model, shape, *, max_new_tokens, temperature, top_k, top_p, eos_token, pad_token, use_cache,
        cache_dtype=None, return_logprobs=False, min_p=None, repetition_penalty=None, stop_sequences=None,
        count=False, logit_bias=None, processors=(), row_limits=None,
    ):
        self.model = model
        self.batch, self.prompt_len = shape  # static: lets MoE layers read only the chosen experts
        self.max_new_tokens, self.total = max_new_tokens, self.prompt_len + max_new_tokens
        self.vocab = model.config.vocab_size
        self.sample = functools.partial(draw, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        self.eos_token, self.pad_token, self.stop_sequences, self.row_limits = eos_token, pad_token, stop_sequences, row_limits
        self.use_cache, self.cache_dtype, self.return_logprobs, self.count = use_cache, cache_dtype, return_logprobs, count
        self.repetition_penalty, self.logit_bias, self.processors = repetition_penalty, logit_bias, processors
        self.stops = eos_token is not None or stop_sequences is not None

    def start(self, prompts, lengths, keys):
        """Every row's state (see `start_row`), with its key and its own limit."""
        state = {**jax.vmap(self.start_row)(prompts, lengths), "key": keys}
        if self.row_limits is not None:
            state["limit"] = jnp.asarray(self.row_limits, jnp.int32)
        return state

    def start_row(self, prompt, length):
        """One row's state before its first token: its output buffer (the prompt, then
        padding), its done flag, the trackers its settings need and, with the cache, the
        prefill's cache and last logits."""
        max_new_tokens, total, pad_token, vocab = self.max_new_tokens, self.total, self.pad_token, self.vocab
        buf = jnp.concatenate([prompt, jnp.full((max_new_tokens,), pad_token, jnp.int32)])
        buf = jnp.where(jnp.arange(total) < length, buf, pad_token)
        state = {"out": (buf, jnp.zeros((total,), jnp.float32) if self.return_logprobs else None), "done": jnp.zeros((), bool)}
        if self.repetition_penalty is not None:  # the prompt's real tokens; its padding (index vocab) is dropped
            real = jnp.where(jnp.arange(self.prompt_len) < length, prompt, vocab)
            state["seen"] = jnp.zeros((vocab,), bool).at[real].set(True, mode="drop")
        if self.stop_sequences is not None:  # -1: no generated token there yet (matches no stop id)
            state["recent"] = jnp.full((self.stop_sequences.shape[1],), -1, jnp.int32)
        if self.count:
            state["count"] = jnp.zeros((), jnp.int32)
        if not self.use_cache:
            return state
        return {**state, **self.prefill(prompt, length)}

    def prefill(self, prompt, length):
        """`{"cache", "last"}` after one row's prompt. A sliding-window ring keeps the prompt's
        real positions, not its padding, and the padding is read as token 0 (it may hold any
        id: one outside the vocabulary would embed as NaN, and attention multiplies even
        masked-out values by zero)."""
        prompt = jnp.where(jnp.arange(self.prompt_len) < length, prompt, 0)
        cache = self.model.init_cache(self.total, dtype=self.cache_dtype)
        last, cache = self.model.prefill(prompt, cache, batch_size=self.batch, valid_length=length)
        return {"cache": cache, "last": last}

    def emit(self, i, state, logits, length):
        """Token `i` after the prompt, drawn from `logits` (the position before it) with
        `state["key"]`, written into `state["out"]` = (tokens, log-probabilities or None). A
        row already done gets padding."""
        (buf, logps), done = state["out"], state["done"]
        key, sub = jax.random.split(state["key"])
        state = dict(state)
        scores = self.scores(i, state, logits, buf, length)
        tok = jnp.where(done, self.pad_token, self.sample(scores, sub))
        if self.repetition_penalty is not None:
            state["seen"] = state["seen"].at[jnp.where(done, self.vocab, tok)].set(True, mode="drop")
        buf = buf.at[length + i].set(tok)
        if logps is not None:  # under the decoding model's own distribution: no penalty, no temperature, no filtering
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))[tok]
            logps = logps.at[length + i].set(jnp.where(done, 0.0, logp))
        if self.count:
            state["count"] = state["count"] + (~done).astype(jnp.int32)
        return {**self.stop_test(i, state, tok, done), "out": (buf, logps), "key": key}, tok

    def scores(self, i, state, logits, buf, length):
        """The logits token `i` is drawn from, in transformers' order: BeforePenalty
        processors, the penalty, then (eqzoo's) the bias and the other processors (temperature
        and the filters follow, in `draw`)."""
        penalize = None
        if self.repetition_penalty is not None:
            penalize = lambda s: penalize_repeats(s, state["seen"], self.repetition_penalty)  # noqa: E731
        return apply_processors(logits, buf, length + i, jnp.asarray(i, jnp.int32), logit_bias=self.logit_bias,
                                processors=self.processors, penalize=penalize)

    def stop_test(self, i, state, tok, done):
        """`state` with `done` set once the row has stopped: at an eos id, at the end of a stop
        sequence (its recent tokens updated with `tok`), or at its own `max_new_tokens`."""
        finished = done
        if self.eos_token is not None:
            finished = finished | is_eos(tok, self.eos_token)
        if self.stop_sequences is not None:
            state["recent"] = jnp.concatenate([state["recent"][1:], tok[None]])
            finished = finished | ends_with_stop(state["recent"], self.stop_sequences)
        if self.row_limits is not None:  # this row's own max_new_tokens reached
            finished = finished | (i + 1 >= state["limit"])
        return {**state, "done": finished}

    def step(self, i, state, length):
        """Emit token `i` of one row and, with the cache, decode it (its logits are the next
        step's); without, the full causal forward pass up to it."""
        if not self.use_cache:  # rows past the position unused (the padding read as token 0:
            # pad_token may lie outside the vocabulary, as in prefill)
            buf = state["out"][0]
            tokens = jnp.where(jnp.arange(self.total) < length + i, buf, 0)
            return self.emit(i, state, self.model._forward(tokens)[length + i - 1], length)[0]
        state, tok = self.emit(i, state, state["last"], length)
        logits, cache = self.model.decode(tok[None], state["cache"], length + i, batch_size=self.batch)
        return {**state, "cache": cache, "last": logits[0]}

    def finish(self, state, lengths):
        """The state after the token loop: with the cache, the last token (`max_new_tokens -
        1`) emitted, which needs no decode after it; without, as it is."""
        if not self.use_cache:
            return state
        last = lambda i, state, length: self.emit(i, state, state["last"], length)[0]  # noqa: E731
        return jax.vmap(last, in_axes=(None, 0, 0))(self.max_new_tokens - 1, state, lengths)


def _generate_rows(model, prompts, lengths, keys, **settings):
    """Decode the batch (see `_row_loop`): `(tokens, logprobs)` with `return_logprobs`, else the tokens."""
    loop = _row_loop(model, prompts.shape, **settings)
    state = _token_loop(loop.step, loop.start(prompts, lengths, keys), lengths, loop.steps, loop.stops)
    state = loop.finish(state, lengths)
    return state["out"] if settings.get("return_logprobs") else state["out"][0]


def _token_loop(step, state, lengths, steps, stops, first=0):
    """`state = step(i, state, lengths)` for `i` in `first .. steps - 1`: a `fori_loop`, or
    with `stops` a `while_loop` that ends early once every row's `state["done"]` is set (a
    row done before the others is stepped on, emitting padding). `first` and `steps` may be
    traced (a chunk of the loop, in `generate_stream`)."""
    if not stops:
        return jax.lax.fori_loop(first, steps, lambda i, state: step(i, state, lengths), state)

    def cond(carry):
        i, state = carry
        return (i < steps) & ~jnp.all(state["done"])

    def body(carry):
        i, state = carry
        return i + 1, step(i, state, lengths)

    return jax.lax.while_loop(cond, body, (jnp.asarray(first, jnp.int32), state))[1]


UNROLL_DECODE_DEFAULTS: dict[str, bool] = {"cpu": False, "gpu": True, "tpu": False}
"""What `unroll_layers="auto"` does on each JAX backend (unknown backends: `False`).

Inside the token loop, a scan over layers slices every layer's weights out of the stacked arrays
on every token, and where the matrix product cannot read the slice in place (a batched product
on CPU; a cuBLAS call on GPU) XLA copies the weights first. Decoding is bound by memory traffic,
so on GPU that copy triples the bytes moved per token. Unrolled decoding slices each layer out
of the stack once, before the loop ([`eqzoo.nn.Stacked.unstacked`][]): the compiled loop body
holds no weight slices at all. On CPU, XLA instead transposes each weight matrix inside the loop
for the batch-1 matrix-vector products, and the unrolled loop compiles ~3.7x slower, so CPU
keeps the scan. See docs/performance.md."""


def resolve_unroll(unroll_layers: bool | str, backend: str | None = None) -> bool:
    """Whether decoding unrolls the layer loop for this `unroll_layers` setting on `backend`.

    **Arguments:** `unroll_layers`, `True`, `False` or `"auto"` (look up
    `UNROLL_DECODE_DEFAULTS`); `backend` defaults to `jax.default_backend()`.
    """
    if (flag := as_flag(unroll_layers)) is not None:
        return flag
    if not (isinstance(unroll_layers, str) and unroll_layers == "auto"):
        raise ConfigError(f"unroll_layers must be True, False or 'auto', got {unroll_layers!r}.")
    return UNROLL_DECODE_DEFAULTS.get(jax.default_backend() if backend is None else backend, False)


def decoding_model(model, unroll_layers: bool):
    """`model` as a decode loop runs it. With `unroll_layers`, each layer's weights are sliced out
    of the stack here, once, outside the token loop (sliced inside it, even unrolled, XLA:CPU
    copies them on every token). And without remat: nothing is differentiated, and under
    `jax.checkpoint` an unrolled layer's index would be traced (a mixed sliding-window stack
    then writes both its caches rather than routing at trace time)."""
    blocks = model.blocks.unstacked() if unroll_layers else model.blocks
    return eqx.tree_at(lambda m: m.blocks, model, with_fields(blocks, remat="none"))


@eqx.filter_jit
def _generate_batch_jit(model, prompts, lengths, key, *, unroll_layers, **static):
    model = decoding_model(model, unroll_layers)
    keys = jax.random.split(key, prompts.shape[0])  # one per row; split here, not in a dispatch of its own
    return _generate_rows(model, prompts, lengths, keys, **static)


def loop_settings(temperature, top_k, top_p, min_p=None, repetition_penalty=1.0) -> dict:
    """The sampling settings as a decode loop takes them: temperature, top-p, min-p and the
    repetition penalty as arguments (a new value compiles nothing); greedy decoding, top-k (it
    sets a shape) and whether each filter and the penalty is on, static."""
    temperature, top_p, min_p, repetition_penalty = traced_settings(temperature, top_p, min_p, repetition_penalty)
    # A Python int: `eqx.filter_jit` would trace a NumPy integer (an array to it) as an argument.
    top_k = None if temperature is None or top_k is None else int(top_k)
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)


def check_model(model, who: str) -> None:
    """Raise `ConfigError` unless `model` is an eqzoo language model (checked first: a model
    and prompt passed the other way round would otherwise fail on the prompt's shape)."""
    if not isinstance(model, AbstractLM):
        raise ConfigError(
            f"{who} needs an eqzoo language model (GPT2, Llama, Mixtral, Gemma) as its first argument; got "
            f"{type(model).__name__}. A model of your own decodes by subclassing eqzoo.models.AbstractLM "
            "(its docstring lists what a subclass provides)."
        )
    # A subclass of the user's own: decoding reads these two config fields.
    config = getattr(model, "config", None)
    missing = [name for name in ("vocab_size", "max_seq") if not isinstance(getattr(config, name, None), int)]
    if missing:
        raise ConfigError(
            f"{who}: {type(model).__name__}.config must have integer fields vocab_size and max_seq (decoding "
            f"reads them); its config ({type(config).__name__}) lacks {missing}."
        )


def refuse_deleted_model(model, err: Exception, who: str) -> None:
    """After a decode call failed with `err`: a `ConfigError` (from it) when `model` holds
    deleted arrays, as a model does once a train step has taken the state built from it
    (JAX says only "Array has been deleted", which `err` must say); otherwise nothing (the
    caller re-raises `err`).
    Checked after a failure only, so a working call pays nothing."""
    if "deleted" in str(err) and holds_deleted(model):
        raise ConfigError(
            f"{who}: the model's arrays were deleted. A train step donates the state it is given, and "
            "TrainState.create(model, ...) holds model's own arrays, so after the first step model is gone: "
            "decode with the trained one, state.model (or fit(...).state.model)."
        ) from err


def check_key(key, who: str) -> None:
    """Raise `ConfigError` unless `key` is `None` or a PRNG key (typed, or a legacy uint32 pair)."""
    if key is None:
        return
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and key.shape == ()
    legacy = dtype == jnp.uint32 and len(getattr(key, "shape", ())) == 1  # threefry (2,), rbg (4,)
    if legacy:
        try:
            jax.random.wrap_key_data(key)  # the default PRNG implementation's key shape
        except (TypeError, ValueError):
            legacy = False
    if not (typed or legacy):
        raise ConfigError(f"{who}: key must be one PRNG key, jax.random.key(seed); got {key!r}.")


@functools.cache
def _unused_key():
    """The key greedy decoding passes (it never draws from it), made once rather than on every
    call (a dispatch); concrete even when first asked for under a trace."""
    with jax.ensure_compile_time_eval():
        return jax.random.key(0)


def loop_key(key):
    """`key` (after `check_key`) as the decode loops take it: a typed key, which they split
    into one per row; for `None` (greedy decoding: never used), one constant key."""
    return _unused_key() if key is None else typed_key(key)


def typed_key(key):
    """`key` as a typed PRNG key: a legacy uint32 key (after `check_key`) wrapped, so that
    the decode loops see one key type and a legacy key does not compile them again."""
    if key is not None and getattr(key, "dtype", None) == jnp.uint32:
        return jax.random.wrap_key_data(key)
    return key


def check_count(value, name: str, who: str) -> None:
    """Raise `ConfigError` unless `value` is an integer >= 1 (not a bool or a float)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{who}: {name} must be an integer >= 1, got {value!r}.{int_hint(value)}")


def resolve_new_tokens(max_new_tokens, max_length, prompts, who: str):
    """`max_new_tokens`, or, when only `max_length` is given (prompt and new tokens together,
    as a `generation_config.json` may set it), what it leaves after the prompts' padded width,
    as transformers counts it. With both, `max_new_tokens` wins, as in transformers. The
    prompts are read through `as_prompts` first, so that ragged or malformed prompts get its
    `ShapeError` (call `check_model` before this: a model passed as the prompts would get the
    prompts' message)."""
    if max_new_tokens is not None:
        return max_new_tokens
    if max_length is None:
        raise ConfigError(
            f"{who} needs max_new_tokens=N (how many tokens to add), or max_length=N (prompt and new "
            "tokens together)."
        )
    check_count(max_length, "max_length", who)
    shape = as_prompts(prompts, who).shape
    width = shape[-1] if shape else 0
    if max_length <= width:
        raise ConfigError(
            f"{who}: max_length={max_length} counts the prompt too, and the prompt is {width} tokens wide, "
            f"so no token is left to generate; pass max_new_tokens=N instead, or a max_length above {width}."
        )
    return int(max_length) - width


def _validate(model, prompts, max_new_tokens, key, temperature, top_k, top_p, use_cache, min_p=None, repetition_penalty=1.0,
              who="generate"):
    check_count(max_new_tokens, "max_new_tokens", who)
    check_key(key, who)
    check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    if key is None and temperature > 0:
        raise ConfigError(f"{who}: sampling with temperature > 0 needs a PRNG key: pass key=jax.random.key(seed).")
    if as_flag(use_cache) is None:
        raise ConfigError(f"{who}: use_cache must be True or False, got {use_cache!r}.")
    if not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ShapeError(f"prompt token ids must be integers; got dtype {prompts.dtype}.")
    total = prompts.shape[-1] + max_new_tokens
    if total > model.max_seq:
        raise ShapeError(
            f"prompt length {prompts.shape[-1]} + max_new_tokens {max_new_tokens} = {total} exceeds the "
            f"model's max_seq={model.max_seq}; shorten the prompt or ask for fewer tokens."
        )


@no_type_check  # validated below with messages that say how to fix the call
def generate_batch(
    model: AbstractLM,
    prompts: Integer[Array, "batch seq"],
    lengths: Integer[Array, " batch"] | None = None,
    *,
    max_new_tokens: int | Sequence[int] | Integer[Array, " batch"] | None = None,
    max_length: int | None = None,
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
) -> Int[Array, "batch total"] | tuple[Int[Array, "batch total"], Float[Array, "batch total"]]:
    """Continue a batch of prompts of different lengths, in one compiled program.

    **Arguments:**

    - `model`: an eqzoo language model ([`eqzoo.models.AbstractLM`][]: GPT-2, Llama, Mixtral,
      Gemma).
    - `prompts`: right-padded prompts; row `i` holds `lengths[i]` real tokens. (Or padded on
      either side, with `attention_mask`.)
    - `lengths`: real length of each prompt (default: all `seq`). Each must be >= 1. A row
      that looks left-padded (it starts with `pad_token` and holds other ids past its
      length) is refused: read as right-padded, its prompt would lose its last tokens.
    - `attention_mask`: instead of `lengths`, a tokenizer's 0/1 mask of `prompts`' shape
      (1 for a token), padded on the left (`padding_side="left"`, transformers' habit for
      decoding) or on the right, row by row. The output is right-padded either way: row `i`
      starts with its prompt's tokens.
    - `max_new_tokens`: as in [`eqzoo.generate`][], or one limit per row (a list or 1-D
      array of `batch` ints >= 1): the loop is compiled for the largest, and row `i` stops
      after its own `max_new_tokens[i]` tokens (as at `eos_token`: `pad_token` after them).
      Other limits with the same largest compile nothing new.
    - `max_length`: instead of `max_new_tokens`, the prompt and new tokens together, as a
      `generation_config.json` may give it (and [`eqzoo.hf.GenerationConfig.kwargs`][] passes
      it on): `max_length - seq` new tokens, `seq` the prompts' padded width, as transformers
      counts it. `max_new_tokens` wins when both are given.
    - `key`, `temperature`, `top_k`, `top_p`, `min_p`,
      `repetition_penalty`: as in [`eqzoo.generate`][]. Each row's penalty counts its own
      prompt's real tokens and its generated ones, never the padding (transformers' batched
      `generate` counts a left-padded row's pad id as seen; eqzoo decodes such a row as
      transformers decodes that prompt alone).
    - `eos_token`: a stop token id, or a sequence (or 1-D array) of them (a
      `generation_config.json` may list several): once a row produces one, the rest of that row is `pad_token`; the loop stops
      once every row has (without it, it runs all `max_new_tokens` steps).
    - `stop_sequences`: multi-token stops, a list of token-id sequences (a stop string
      pre-tokenized: `tokenizer.encode(text, add_special_tokens=False)`): once a row's
      generated tokens end with one of them, that row stops as at `eos_token` (the stop's
      tokens are kept, then `pad_token`). Only generated tokens match: a stop that begins in
      the prompt does not. Both may be given; either stops a row.
    - `pad_token`: fills positions after each row's prompt + generated tokens.
    - `use_cache`: decode with the KV cache (default) or recompute the whole prefix each step.
    - `unroll_layers`: `True` slices the layers out of the stack once and runs them unrolled
      inside the decode loop, whatever the model's `scan_layers` (no per-token slicing of
      stacked weights; compiles longer, one copy of the layer per depth); `False` keeps the
      model's own layer loop; `"auto"` (default) follows
      [`eqzoo.generation.UNROLL_DECODE_DEFAULTS`][] for the backend.
    - `cache_dtype`: the KV cache's dtype: default the model's attention parameters'; a
      floating dtype (`jnp.bfloat16` halves an fp32 model's cache); or `jnp.int8`, codes with
      one scale per position and head ([`eqzoo.nn.QuantizedKV`][]), about a quarter of fp32.
      Only with `use_cache=True`.
    - `return_logprobs`: also return each generated token's log-probability under the
      decoding model's own distribution (the log-softmax of its logits, in float32, before
      `repetition_penalty`, `temperature`, `top_k`, `top_p` and `min_p`): the score an RL or evaluation loop needs. With a
      cache in the model's dtype it is what `jax.nn.log_softmax(model(tokens))` gives at the
      position before the token, to rounding; with a narrower `cache_dtype` it includes that
      cache's rounding, as the tokens do. `logit_bias` and `logits_processors` do not change
      them either: a banned token the model favours still has its own high log-probability.
    - `logits_processors`: a sequence of [`eqzoo.generation.LogitsProcessor`][]s, functions
      or `equinox.Module`s `fn(logits, tokens, position, step) -> logits` applied to each
      row's logits at each step, in order, inside the compiled loop: after the repetition
      penalty and `logit_bias` (before them, wrapped in [`eqzoo.generation.BeforePenalty`][]),
      before temperature and the filters (greedy decoding takes the argmax of what they
      return). A processor sees one row. The same function object compiles once; a new `lambda` per call compiles the loop again every time; a Module's
      array fields are arguments of the compiled loop (a new value compiles nothing).
    - `logit_bias`: a mapping of token id to a bias added to its logit at every step (the
      OpenAI API's `logit_bias`): `-inf` (or a large negative number) bans a token, a large
      positive one all but forces it. Passed as a dense `(vocab,)` float32 argument: other ids,
      values or numbers of entries compile nothing new. Ids must lie in the vocabulary; NaN,
      `+inf` and a bias that bans every id are refused.

    The loop is compiled once per prompt shape, `max_new_tokens` (the largest, per row), number of stop tokens,
    number and longest length of the stop sequences, `top_k`, whether it samples at all,
    whether it filters by `top_p` and by `min_p`, and whether `repetition_penalty` is 1.0: a new
    `temperature`, `top_p`, `min_p` or penalty value, stop or pad id, `logit_bias` (per request,
    say) reuses the compiled program; each plain-function processor is part of it. The order
    on each step's logits: the `BeforePenalty` processors, the repetition penalty, then
    `logit_bias` and the other `logits_processors`, then temperature, top-k, top-p, min-p
    (transformers' order, for those it has). Padding past
    each row's length may hold any id, even one outside the vocabulary; it is never read. Under `"capacity"` mixture-of-experts layers the prompt
    is routed as training routes it, with a capacity per sequence set by the padded width,
    so a prompt's first logits may differ slightly with how far it is padded when
    assignments are dropped (decoding steps drop nothing); `"dense"` or `"ragged"` layers
    ([`eqzoo.models.Mixtral.with_moe_implementation`][]) never drop.

    **Returns:** `(batch, seq + max_new_tokens)` tokens (the largest, with per-row limits): row
    `i` is its prompt, then its generated tokens, then padding. With `return_logprobs`, `(tokens,
    logprobs)`: float32 of the same shape, 0 at the prompt's positions and at padding
    (after eos, too).
    """
    check_model(model, "generate_batch")
    max_new_tokens = resolve_new_tokens(max_new_tokens, max_length, prompts, "generate_batch")
    prompts, lengths, key, settings = prepare_batch(
        model, prompts, lengths, "generate_batch", max_new_tokens=max_new_tokens, attention_mask=attention_mask, key=key,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
        eos_token=eos_token, stop_sequences=stop_sequences, pad_token=pad_token, use_cache=use_cache,
        cache_dtype=cache_dtype, return_logprobs=return_logprobs, logits_processors=logits_processors,
        logit_bias=logit_bias,
    )
    try:
        return _generate_batch_jit(model, prompts, lengths, key, unroll_layers=resolve_unroll(unroll_layers), **settings)
    except Exception as err:
        refuse_deleted_model(model, err, "generate")
        raise


def prepare_batch(
    model, prompts, lengths, who: str, *, max_new_tokens, attention_mask, key, temperature, top_k, top_p, min_p,
    repetition_penalty, eos_token, stop_sequences, pad_token, use_cache, cache_dtype, return_logprobs,
    logits_processors=None, logit_bias=None,
) -> tuple:
    """`generate_batch`'s arguments checked and as its compiled loop takes them: `(prompts,
    lengths, key, settings)`, `settings` the loop's keyword arguments (static values and NumPy
    arrays: see `loop_settings`) but `unroll_layers`. `who` names the caller in errors."""
    check_model(model, who)
    caller = who  # `who` may become "generate" below, for the messages generate_batch has always given
    named = "generate" if who == "generate_batch" else who  # the argument checks' (generate_stream's its own)
    prompts = as_prompts(prompts, who)
    if prompts.ndim != 2:
        raise ShapeError(f"{who} takes prompts of shape (batch, seq); got {shape_str(prompts.shape)}.")
    max_new_tokens, row_limits = _row_limits(max_new_tokens, prompts.shape[0], who)
    _validate(model, prompts, max_new_tokens, key, temperature, top_k, top_p, use_cache, min_p, repetition_penalty, named)
    if cache_dtype is not None:
        if not use_cache:
            raise ConfigError("cache_dtype sets the KV cache's dtype, but use_cache=False decodes without one; drop one of them.")
        cache_dtype = check_cache_dtype(cache_dtype, None)  # one static value: "int8" and jnp.int8 compile once
    if as_flag(return_logprobs) is None:
        raise ConfigError(f"return_logprobs must be True or False, got {return_logprobs!r}.")
    eos_token, pad_token = check_stop_tokens(eos_token, pad_token, model.config.vocab_size, named)
    stop_sequences = check_stop_sequences(stop_sequences, model.config.vocab_size, named)
    if who == "generate_batch" and attention_mask is None:
        who = "generate"  # the messages generate_batch has always given (eqzoo.generate's too)
    prompts, lengths = prompt_batch(prompts, lengths, attention_mask, model.config.vocab_size, who, pad_token)
    settings = dict(
        max_new_tokens=int(max_new_tokens),  # static: a Python int
        **loop_settings(temperature, top_k, top_p, min_p, repetition_penalty),
        **dict(zip(("eos_token", "pad_token"), traced_stop_tokens(eos_token, pad_token), strict=True)),
        stop_sequences=traced_stop_sequences(stop_sequences),
        use_cache=bool(use_cache), cache_dtype=cache_dtype, return_logprobs=bool(return_logprobs),
        logit_bias=logit_bias_vector(logit_bias, model.config.vocab_size, caller),
        processors=check_processors(logits_processors, caller, model.config.vocab_size), row_limits=row_limits,
    )
    return prompts, lengths, loop_key(key), settings


def _per_row(max_new_tokens) -> bool:
    """Whether `max_new_tokens` gives one limit per row (a list, tuple or 1-D array)."""
    return isinstance(max_new_tokens, list | tuple) or getattr(max_new_tokens, "ndim", 0) == 1


@no_type_check  # validated here, with messages that say how to fix the call
def _row_limits(max_new_tokens, batch: int, who: str) -> tuple:
    """`(max_new_tokens, row_limits)`: an int `max_new_tokens` as it is, with `None`; a sequence
    or 1-D array of one int >= 1 per row as its largest (the loop's static length) and an int32
    `(batch,)` NumPy array (traced: other limits with the same largest compile nothing new)."""
    if _per_row(max_new_tokens):
        if isinstance(max_new_tokens, jax.core.Tracer):
            raise ConfigError(f"{who}: per-row max_new_tokens must be concrete (a list or NumPy array), not traced.")
        limits = list(np.asarray(max_new_tokens).tolist()) if hasattr(max_new_tokens, "ndim") else list(max_new_tokens)
        if len(limits) != batch:
            raise ConfigError(
                f"{who}: max_new_tokens holds {len(limits)} limits for a batch of {batch} prompts; give one per row "
                "(or one int for all)."
            )
        for n in limits:
            if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
                raise ConfigError(f"{who}: each per-row max_new_tokens must be an integer >= 1, got {limits}.")
        return max(limits), np.asarray(limits, np.int32)
    return max_new_tokens, None


@no_type_check  # validated below with messages that say how to fix the call
def generate(
    model: AbstractLM,
    prompt: Integer[Array, " seq"],
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
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
) -> Int[Array, " total"] | tuple[Int[Array, " total"], Float[Array, " total"]]:
    """Continue one prompt with up to `max_new_tokens` tokens, decoding with the KV cache.

    The whole loop (prefill, then one token per step) runs inside one compiled program.

    **Arguments:**

    - `model`: an eqzoo language model ([`eqzoo.models.AbstractLM`][]: GPT-2, Llama, Mixtral,
      Gemma).
    - `prompt`: token ids of one sequence (at least one token).
    - `max_new_tokens`: how many tokens to generate.
    - `max_length`: instead of `max_new_tokens`, the prompt and new tokens together (a
      `generation_config.json`'s setting): `max_length - seq` new tokens.
    - `key`: PRNG key for sampling (unused when greedy).
    - `temperature`: 0 (default) is greedy decoding; higher is more random.
    - `top_k`, `top_p`: optional top-k / nucleus filtering when sampling (greedy decoding
      ignores them); tokens tied with the `k`-th most likely are kept too.
    - `min_p`: when sampling, keep only tokens whose probability (after temperature, top-k
      and top-p) is at least `min_p` times the most likely one's (greedy decoding ignores it;
      `None` or 0 is off).
    - `repetition_penalty`: transformers' penalty on repeats (Keskar et al., 2019): for every
      token id already in the prompt or generated so far, a positive logit is divided by it
      and a negative one multiplied (1.0, the default, is off; > 1 discourages repeats).
      Applied before temperature and the filters, in greedy decoding too.

      Each of these settings is a Python number or a concrete 0-d NumPy/JAX array (an integer
      one for `top_k`); a value traced under your own `jax.jit` is refused: call `generate`
      outside it (it compiles its own loop), or draw with [`eqzoo.generation.sample_logits`][].
    - `eos_token`: stop token id (or a sequence of them); after it the output is `pad_token`,
      and decoding stops.
    - `stop_sequences`: multi-token stops, token-id sequences: once the generated tokens end
      with one, decoding stops as at `eos_token` (the stop is kept); see
      [`eqzoo.generation.generate_batch`][].
    - `use_cache`: `False` recomputes the whole prefix each step (slower; for checking).
    - `unroll_layers`, `cache_dtype`, `return_logprobs`, `logits_processors`, `logit_bias`: as
      in [`eqzoo.generation.generate_batch`][] (a processor sees the one row, `(vocab,)`).

    **Returns:** the prompt followed by the generated tokens, `seq + max_new_tokens` long;
    with `return_logprobs`, `(tokens, logprobs)`, the generated tokens' log-probabilities at
    their positions and 0 elsewhere.
    """
    check_model(model, "generate")
    if _per_row(max_new_tokens):
        raise ConfigError(
            f"generate decodes one prompt: max_new_tokens must be one int, got {max_new_tokens!r} (per-row limits "
            "are eqzoo.generation.generate_batch's)."
        )
    prompt = as_prompts(prompt, "generate")
    if prompt.ndim != 1:
        raise ShapeError(
            f"generate takes one prompt of shape (seq,); got {shape_str(prompt.shape)}. "
            "For several prompts use eqzoo.generation.generate_batch."
        )
    if prompt.shape[0] < 1:
        raise ShapeError("generate needs a prompt of at least one token.")
    # One prompt on one device: its host copy (made once, and cached on the array) is the batch
    # of one, so that the checks read no new array back (prompt[None] would be one, computed
    # after whatever the device is still running).
    if not isinstance(prompt, jax.core.Tracer) and isinstance(prompt, jax.Array) and len(prompt.sharding.device_set) == 1:
        prompt = host_values(prompt)
    out = generate_batch(
        model, prompt[None], None, max_new_tokens=resolve_new_tokens(max_new_tokens, max_length, prompt, "generate"), key=key, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, eos_token=eos_token,
        stop_sequences=stop_sequences, pad_token=pad_token, use_cache=use_cache,
        unroll_layers=unroll_layers, cache_dtype=cache_dtype, return_logprobs=return_logprobs,
        logits_processors=logits_processors, logit_bias=logit_bias,
    )
    return jax.tree.map(lambda a: a[0], out)
