"""User logits processors and `logit_bias`: steering each decoding step's logits inside the
compiled loop."""

import math
from collections.abc import Callable, Mapping
from typing import no_type_check

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._errors import ConfigError, ShapeError, shape_str
from ._builtin_processors import out_of_vocab
from ._sampling import as_token_id

LogitsProcessor = Callable[[Float[Array, " vocab"], Int[Array, " total"], Int[Array, ""], Int[Array, ""]], Float[Array, " vocab"]]
"""A function or `equinox.Module` that rewrites one row's logits at each decoding step:
`processor(logits, tokens, position, step) -> logits`, called inside the compiled loop, under the
`vmap` over rows (it sees one row; write it for one sequence, as an eqzoo layer is written).

- `logits`: float32 `(vocab,)`, the model's scores for the token being chosen, after the
  repetition penalty, `logit_bias` and the processors before this one (before all three for a
  processor wrapped in [`eqzoo.generation.BeforePenalty`][]: only the processors before it).
- `tokens`: int32 `(total,)` with `total = seq + max_new_tokens`: the row's prompt, then the
  tokens generated so far, then `pad_token`. `tokens[:position]` are real.
- `position`: int32 scalar, the index in `tokens` of the token being chosen (the row's prompt
  length plus `step`); `tokens[position - n + 1 : position]` (a `jax.lax.dynamic_slice`) are
  the last `n - 1` tokens, as a no-repeat-n-gram or banned-phrase processor reads them.
- `step`: int32 scalar, how many tokens this row has generated before this one (0 for the
  first), as a processor that forces a token at step `k` or holds back `eos` until step `k`
  reads it.

It returns float32 logits of shape `(vocab,)` (anything else is refused when the loop is
traced, with an error naming the processor); `-inf` bans a token (not every token: the row
would then have no distribution to draw from). The arguments are traced: branch with
`jnp.where` or `jax.lax.cond`, never Python `if`. A processor is stateless; one that follows a
grammar or a JSON schema recomputes its state from `tokens` (or keeps a table in an array
field and walks it from `tokens[position - 1]`).

A plain function is part of the compiled program: the same function object compiles once,
while a new `lambda` (or `functools.partial`) on every call compiles the loop again each
time. An `equinox.Module`'s array fields are traced instead: a new instance with arrays of the
same shapes and dtypes (another bias, another table) reuses the compiled loop."""


class BeforePenalty(eqx.Module):
    """Runs `processor` before the repetition penalty and `logit_bias`, where the decode loops
    run every other processor after them: transformers' place for its
    `SequenceBiasLogitsProcessor`, which adds `sequence_bias` before `repetition_penalty`
    divides (or multiplies) the logits of the ids a row holds.
    [`eqzoo.hf.GenerationConfig.logits_processors`][] wraps its
    [`SequenceBias`][eqzoo.generation.SequenceBias] in it, so a checkpoint setting both decodes as
    transformers decodes it. Without a `repetition_penalty` and a `logit_bias` the wrapper
    changes nothing.

    Wrapped processors go first in `logits_processors` (one after an unwrapped one is refused),
    so the list's order is the order they run in: the wrapped ones, the penalty, `logit_bias`,
    the others, then temperature and the filters.

    **Arguments:** `processor`, a [`eqzoo.generation.LogitsProcessor`][] (a function or an
    `equinox.Module`; a Module's array fields stay arguments of the compiled loop).
    """

    processor: LogitsProcessor

    @no_type_check  # validated here, with a message that says how to fix the call
    def __init__(self, processor: LogitsProcessor):
        if isinstance(processor, BeforePenalty):
            processor = processor.processor  # wrapping twice means what wrapping once does
        if not callable(processor):
            raise ConfigError(
                f"BeforePenalty wraps a logits processor, fn(logits, tokens, position, step) -> logits; got {processor!r}."
            )
        self.processor = processor

    def __call__(
        self, logits: Float[Array, " vocab"], tokens: Int[Array, " total"], position: Int[Array, ""], step: Int[Array, ""]
    ) -> Float[Array, " vocab"]:
        """What `processor` returns for these arguments."""
        return self.processor(logits, tokens, position, step)


@no_type_check  # validated here, with messages that say how to fix the call
def check_processors(processors, who: str, vocab_size: int | None = None) -> tuple:
    """`logits_processors` as the decode loop takes them: a tuple (empty for none) of callables.
    With `vocab_size`, the built-in processors' token ids are checked to lie in the vocabulary
    (inside a `BeforePenalty` too); a `BeforePenalty` after an unwrapped processor is refused."""
    if processors is None:
        return ()
    if callable(processors):
        raise ConfigError(
            f"{who}: logits_processors takes a sequence of processors; got one {_name(processors)}: "
            "pass logits_processors=[fn]."
        )
    if not isinstance(processors, list | tuple):
        raise ConfigError(f"{who}: logits_processors must be a list of callables, got {type(processors).__name__}.")
    for k, fn in enumerate(processors):
        if not callable(fn):
            raise ConfigError(
                f"{who}: logits_processors[{k}] is not callable (got {fn!r}); each is "
                "fn(logits, tokens, position, step) -> logits (see eqzoo.generation.LogitsProcessor)."
            )
        if isinstance(fn, BeforePenalty) and k and not isinstance(processors[k - 1], BeforePenalty):
            raise ConfigError(
                f"{who}: logits_processors[{k}] ({_name(fn)}) runs before the repetition penalty, but comes after "
                f"logits_processors[{k - 1}] ({_name(processors[k - 1])}), which runs after it; put the BeforePenalty "
                "processors first, so the list is the order they run in."
            )
        inner = fn.processor if isinstance(fn, BeforePenalty) else fn
        outside = [] if vocab_size is None else out_of_vocab(inner, vocab_size)
        if outside:
            raise ConfigError(
                f"{who}: logits_processors[{k}] ({_name(fn)}) holds ids {outside} outside the model's vocabulary "
                f"[0, {vocab_size}); it would ban or wait for tokens the model can never produce. Drop them."
            )
    return tuple(processors)


@no_type_check  # validated here, with messages that say how to fix the call
def logit_bias_vector(logit_bias, vocab_size: int, who: str) -> np.ndarray | None:
    """`logit_bias` (a mapping of token id to additive bias) as the decode loop takes it: a dense
    float32 `(vocab,)` NumPy array (a traced argument: other ids or values compile nothing new),
    or `None` for none. Ids must lie in the vocabulary; a bias may be any finite number or
    `-inf` (a ban), never NaN or `+inf`, and not every id may be banned."""
    if logit_bias is None:
        return None
    if not isinstance(logit_bias, Mapping):
        raise ConfigError(
            f"{who}: logit_bias must be a mapping of token id to bias, e.g. {{50256: -100.0}}; "
            f"got {type(logit_bias).__name__}."
        )
    if not logit_bias:
        return None
    bias = np.zeros((vocab_size,), np.float32)
    for tok, value in logit_bias.items():
        tok = as_token_id(tok, who, f"each logit_bias key (got {tok!r})")
        if not 0 <= tok < vocab_size:
            raise ConfigError(f"{who}: logit_bias holds id {tok}, outside the model's vocabulary [0, {vocab_size}).")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{who}: logit_bias[{tok}] must be a number, got {value!r}.") from None
        if math.isnan(value) or value == math.inf:
            raise ConfigError(
                f"{who}: logit_bias[{tok}] is {value}; a bias is a finite number or -inf (a ban). To force a "
                "token, give it a large bias (e.g. 100.0) or ban the others."
            )
        bias[tok] = value
    if np.all(bias == -np.inf):
        raise ConfigError(f"{who}: logit_bias bans all {vocab_size} token ids; no token could be drawn. Leave some allowed.")
    return bias


def _name(fn) -> str:
    if isinstance(fn, BeforePenalty):
        return f"BeforePenalty({_name(fn.processor)})"
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def apply_processors(
    logits: Array, tokens: Array, position: Array, step: Array, *, logit_bias: Array | None, processors: tuple,
    penalize: Callable[[Array], Array] | None = None,
) -> Array:
    """One row's `logits` in transformers' order: the processors wrapped in `BeforePenalty`,
    then `penalize` (the repetition penalty, a function of the logits; `None` when off), then
    `logit_bias`, then the other processors in order; float32. With none of these, `logits` as
    they are. Each processor's output is checked as the loop is traced."""
    if logit_bias is None and not processors and penalize is None:
        return logits
    logits = logits.astype(jnp.float32)
    first = 0
    while first < len(processors) and isinstance(processors[first], BeforePenalty):  # check_processors: first
        first += 1
    logits = _run(logits, tokens, position, step, processors, range(first))
    if penalize is not None:
        logits = penalize(logits)
    if logit_bias is not None:
        logits = logits + logit_bias
    return _run(logits, tokens, position, step, processors, range(first, len(processors)))


def _run(logits: Array, tokens: Array, position: Array, step: Array, processors: tuple, which: range) -> Array:
    """`logits` through `processors[k]` for each `k` in `which`, each output checked."""
    for k in which:
        fn = processors[k]
        out = fn(logits, tokens, position, step)
        shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
        if shape != logits.shape or dtype != jnp.float32:
            got = f"{type(out).__name__}" if shape is None else f"shape {shape_str(shape)} and dtype {dtype}"
            raise ShapeError(
                f"logits_processors[{k}] ({_name(fn)}) returned {got}; a processor takes one row's logits, "
                f"float32 of shape {shape_str(logits.shape)}, and returns logits of that shape and dtype "
                "(cast with .astype(logits.dtype)). It sees one row: the loop vmaps it over the batch."
            )
        logits = out
    return logits
