"""Ready-made logits processors: transformers' n-gram, banned-phrase, sequence-bias,
minimum-length and suppression processors, as `equinox.Module`s for `logits_processors=`."""

import operator
from collections.abc import Mapping, Sequence
from typing import no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._errors import ConfigError, int_hint

# Their token-id arrays are NumPy: `eqx.filter_jit` traces them (another list of the same shape
# compiles nothing new), and `generate` checks them against the vocabulary on the host (no
# device read) before the loop is traced.


@no_type_check  # validated here, with messages that say how to fix the call
def _ids(values, who: str, what: str, *, empty_ok: bool) -> np.ndarray:
    """`values` (one token id or a sequence of them) as an int32 `(n,)` NumPy array."""
    if isinstance(values, int | np.integer) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, np.ndarray | jax.Array):
        values = np.asarray(values).reshape(-1).tolist() if np.asarray(values).ndim <= 1 else None
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise ConfigError(f"{who}: {what} must be a token id or a list of token ids, got {values!r}.")
    out = []
    for v in values:
        if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer) or v < 0:
            raise ConfigError(f"{who}: {what} must hold token ids (integers >= 0); got {list(values)!r}.")
        out.append(operator.index(v))
    if not out and not empty_ok:
        raise ConfigError(f"{who}: {what} is empty; give at least one token id.")
    return np.asarray(out, np.int32)


@no_type_check
def _count(value, who: str, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ConfigError(f"{who}: {what} must be an integer >= {low}, got {value!r}.{int_hint(value)}")
    return operator.index(value)


def _ban(logits: Array, ids: Array | np.ndarray, where: Array | bool = True) -> Array:
    """`logits` with the ids `ids` set to `-inf` where `where` holds (ids outside the vocabulary
    are dropped)."""
    vocab = logits.shape[0]
    mask = jnp.zeros((vocab,), bool).at[ids].set(True, mode="drop") & where
    return jnp.where(mask, -jnp.inf, logits)


@no_type_check  # validated here, with messages that say how to fix the call
def _padded(sequences, who: str, pad_to) -> tuple[np.ndarray, np.ndarray]:
    """`sequences` (non-empty token-id lists) right-aligned in an int32 `(count, longest)` array,
    each ending in the last column, and their int32 `(count,)` lengths (0 for a padding row);
    `pad_to` a larger `(count, longest)` to pad to, or `None`."""
    if isinstance(sequences, np.ndarray | jax.Array) or not isinstance(sequences, Sequence) or not sequences:
        raise ConfigError(f"{who}: sequences must be a non-empty list of token-id lists, e.g. [[318, 257], [42]]; got {sequences!r}.")
    seqs = [_ids(s, who, f"sequences[{k}]", empty_ok=False) for k, s in enumerate(sequences)]
    count, longest = len(seqs), max(len(s) for s in seqs)
    if pad_to is not None:
        rule = f"{who}: pad_to must be a (count, longest) tuple of ints at least ({count}, {longest}) for these sequences; got {pad_to!r}."
        if not (isinstance(pad_to, tuple) and len(pad_to) == 2):
            raise ConfigError(rule)
        want = tuple(_count(x, who, "each pad_to entry", 1) for x in pad_to)
        if want[0] < count or want[1] < longest:
            raise ConfigError(rule)
        count, longest = want
    padded = np.zeros((count, longest), np.int32)
    lengths = np.zeros((count,), np.int32)
    for k, s in enumerate(seqs):
        padded[k, longest - len(s) :], lengths[k] = s, len(s)
    return padded, lengths


def _completes(
    sequences: Int[Array | np.ndarray, "count longest"], lengths: Int[Array | np.ndarray, " count"],
    tokens: Int[Array, " total"], position: Int[Array, ""],
) -> Array:
    """Which sequences (right-aligned, as `_padded` holds them) the token at `position` would
    complete: the row's tokens before it end with the sequence less its last token (always, for
    a one-token sequence; never for a padding row or a sequence longer than the row so far).
    A bool `(count,)`."""
    longest = sequences.shape[1]
    # the row's last `longest - 1` tokens, aligned with the sequences' prefixes
    idx = position - (longest - 1) + jnp.arange(longest - 1)  # (longest - 1,)
    context = jnp.where(idx >= 0, tokens[jnp.maximum(idx, 0)], -1)  # -1 before the row: matches no id
    used = jnp.arange(longest - 1)[None, :] >= longest - lengths[:, None]  # (count, longest - 1)
    return jnp.all(~used | (sequences[:, :-1] == context[None, :]), axis=1) & (lengths > 0)


def out_of_vocab(processor, vocab_size: int) -> list[int]:
    """The token ids a built-in processor holds that lie outside `[0, vocab_size)` (empty for
    any other processor): `generate` refuses them before tracing the loop."""
    if isinstance(processor, MinNewTokens | MinLength):
        arrays = [processor.eos_tokens]
    elif isinstance(processor, SuppressTokens | SuppressTokensAtBegin):
        arrays = [processor.ids]
    elif isinstance(processor, BannedSequences | SequenceBias):
        arrays = [processor.sequences]
    else:
        return []
    return sorted({int(x) for a in arrays for x in np.asarray(a).reshape(-1) if x >= vocab_size})


class NoRepeatNGram(eqx.Module):
    """Bans every token that would complete an `n`-gram already present in the row: any token
    that followed an earlier occurrence of the row's last `n - 1` tokens (with `n = 1`, every
    token already in the row). The row is its prompt and the tokens generated so far, as
    transformers' `NoRepeatNGramLogitsProcessor` (a `generation_config.json`'s
    `no_repeat_ngram_size`) counts them for a decoder-only model; a left-padded batch row is
    read as transformers reads that prompt alone (its padding is never part of an n-gram).

    Vectorised: the last `n - 1` tokens are compared with every window of the row's token
    buffer at once (windows past the current position masked), `O(total * n)` per step.

    **Arguments:** `n`, the n-gram size, an integer >= 1 (static: another `n` compiles anew).
    """

    n: int = eqx.field(static=True)

    @no_type_check  # validated here, with a message that says how to fix the call
    def __init__(self, n: int):
        self.n = _count(n, "NoRepeatNGram", "n", 1)

    def __call__(
        self, logits: Float[Array, " vocab"], tokens: Int[Array, " total"], position: Int[Array, ""], step: Int[Array, ""]
    ) -> Float[Array, " vocab"]:
        """One row's `logits` with the banned tokens at `-inf` (see the class docstring)."""
        n, total = self.n, tokens.shape[0]
        if total < n:
            return logits
        windows = total - n + 1  # window w is tokens[w : w + n]
        # window w is complete before `position` when w + n <= position
        match = jnp.arange(windows) <= position - n  # (windows,)
        prefix = jax.lax.dynamic_slice(tokens, (jnp.maximum(position - (n - 1), 0),), (n - 1,))  # (n - 1,)
        for j in range(n - 1):  # over the n-gram's offsets, not over positions
            match = match & (tokens[j : j + windows] == prefix[j])
        last = jnp.where(match, tokens[n - 1 : n - 1 + windows], logits.shape[0])  # the id each window bans
        return _ban(logits, last)


class MinNewTokens(eqx.Module):
    """Bans the end-of-sequence ids until the row has generated `min_new_tokens` tokens (while
    `step < min_new_tokens`), as transformers' `MinNewTokensLengthLogitsProcessor`
    (`min_new_tokens` in a `generation_config.json`).

    **Arguments:**

    - `min_new_tokens`: an integer >= 0 (traced: another value compiles nothing new).
    - `eos_tokens`: one id or a list of ids (traced: other ids, as many, compile nothing new);
      usually `generate`'s `eos_token`. Checked against the vocabulary when `generate` runs.
    """

    min_new_tokens: Int[np.ndarray, ""]
    eos_tokens: Int[np.ndarray, " eos"]

    @no_type_check  # validated here, with messages that say how to fix the call
    def __init__(self, min_new_tokens: int, eos_tokens: int | Sequence[int]):
        self.min_new_tokens = np.asarray(_count(min_new_tokens, "MinNewTokens", "min_new_tokens", 0), np.int32)
        self.eos_tokens = _ids(eos_tokens, "MinNewTokens", "eos_tokens", empty_ok=False)

    def __call__(
        self, logits: Float[Array, " vocab"], tokens: Int[Array, " total"], position: Int[Array, ""], step: Int[Array, ""]
    ) -> Float[Array, " vocab"]:
        """One row's `logits`, the eos ids at `-inf` while `step < min_new_tokens`."""
        return _ban(logits, self.eos_tokens, step < self.min_new_tokens)


class MinLength(eqx.Module):
    """Bans the end-of-sequence ids until the row, prompt included, holds `min_length` tokens
    (while `position < min_length`), as transformers' `MinLengthLogitsProcessor` (`min_length`
    in a `generation_config.json`) for a decoder-only model decoding that prompt alone.

    **Arguments:**

    - `min_length`: an integer >= 0, counting the prompt (traced).
    - `eos_tokens`: one id or a list of ids (traced), as in [`eqzoo.generation.MinNewTokens`][].
    """

    min_length: Int[np.ndarray, ""]
    eos_tokens: Int[np.ndarray, " eos"]

    @no_type_check  # validated here, with messages that say how to fix the call
    def __init__(self, min_length: int, eos_tokens: int | Sequence[int]):
        self.min_length = np.asarray(_count(min_length, "MinLength", "min_length", 0), np.int32)
        self.eos_tokens = _ids(eos_tokens, "MinLength", "eos_tokens", empty_ok=False)

    def __call__(
        self, logits: Float[Array, " vocab"], tokens: Int[Array, " total"], position: Int[Array, ""], step: Int[Array, ""]
    ) -> Float[Array, " vocab"]:
        """One row's `logits`, the eos ids at `-inf` while `position < min_length`."""
        return _ban(logits, self.eos_tokens, position < self.min_length)


class BannedSequences(eqx.Module):
    """Bans the last token of each banned sequence wherever the row's previous tokens (prompt
    included) equal the rest of it; a one-token sequence is banned at every step. A sequence
    longer than the row so far bans nothing yet. As transformers' `NoBadWordsLogitsProcessor`
    (`bad_words_ids` in a `generation_config.json`), except that transformers' `generate` drops
    one-token sequences that are an eos id (so that banning never blocks the stop);
    [`eqzoo.hf.GenerationConfig`][] does the same when it builds one from the file.

    The sequences are held padded, as an int32 `(count, longest)` array and their lengths, both
    traced: another list with the same padded shape compiles nothing new (`pad_to` fixes that
    shape for a server that swaps lists).

    **Arguments:**

    - `sequences`: a non-empty list of non-empty lists of token ids (checked against the
      vocabulary when `generate` runs).
    - `pad_to`: `(count, longest)` to pad to (the padding bans nothing), or `None` for the
      list's own.
    """

    sequences: Int[np.ndarray, "count longest"]  # right-aligned: each sequence ends in the last column
    lengths: Int[np.ndarray, " count"]  # 0 for a padding row

    @no_type_check  # validated here, with messages that say how to fix the call
    def __init__(self, sequences: Sequence[Sequence[int]], *, pad_to: tuple[int, int] | None = None):
        self.sequences, self.lengths = _padded(sequences, "BannedSequences", pad_to)

    def __call__(
        self, logits: Float[Array, " vocab"], tokens: Int[Array, " total"], position: Int[Array, ""], step: Int[Array, ""]
    ) -> Float[Array, " vocab"]:
        """One row's `logits` with each sequence's last token at `-inf` where the row ends with
        the rest of it."""
        match = _completes(self.sequences, self.lengths, tokens, position)
        return _ban(logits, jnp.where(match, self.sequences[:, -1], logits.shape[0]))


class SuppressTokens(eqx.Module):
    """Bans the ids `ids` at every step, as transformers' `SuppressTokensLogitsProcessor`
    (`suppress_tokens` in a `generation_config.json`); the same as a `logit_bias` of `-inf`
    for each, as a processor.

    **Arguments:** `ids`, one id or a list of them (traced: other ids, as many, compile nothing
    new; checked against the vocabulary when `generate` runs).
    """

    ids: Int[np.ndarray, " ids"]

    @no_type_check  # validated here, with messages that say how to fix the call
    def __init__(self, ids: int | Sequence[int]):
        self.ids = _ids(ids, "SuppressTokens", "ids", empty_ok=True)

    def __call__(
        self, logits: Float[Array, " vocab"], tokens: Int[Array, " total"], position: Int[Array, ""], step: Int[Array, ""]
    ) -> Float[Array, " vocab"]:
        """One row's `logits` with `ids` at `-inf`."""
        return _ban(logits, self.ids)


class SuppressTokensAtBegin(eqx.Module):
    """Bans the ids `ids` at the first generated token only (`step == 0`), as transformers'
    `SuppressTokensAtBeginLogitsProcessor` (`begin_suppress_tokens` in a
    `generation_config.json`, e.g. so a reply never opens with a blank or an eos).

    **Arguments:** `ids`, one id or a list of them (traced, as in
    [`eqzoo.generation.SuppressTokens`][]).
    """

    ids: Int[np.ndarray, " ids"]

    @no_type_check  # validated here, with messages that say how to fix the call
    def __init__(self, ids: int | Sequence[int]):
        self.ids = _ids(ids, "SuppressTokensAtBegin", "ids", empty_ok=True)

    def __call__(
        self, logits: Float[Array, " vocab"], tokens: Int[Array, " total"], position: Int[Array, ""], step: Int[Array, ""]
    ) -> Float[Array, " vocab"]:
        """One row's `logits` with `ids` at `-inf` at step 0."""
        return _ban(logits, self.ids, step == 0)


class SequenceBias(eqx.Module):
    """Adds a bias to the last token of each sequence wherever the row's previous tokens (prompt
    included) equal the rest of it; a one-token sequence's bias applies at every step. Where
    several sequences end in the same token and match, their biases add. A sequence longer than
    the row so far biases nothing yet. As transformers' `SequenceBiasLogitsProcessor`
    (`sequence_bias` in a `generation_config.json`, or `generate(sequence_bias=...)`); a bias
    of `-inf` bans, as [`eqzoo.generation.BannedSequences`][] does.

    The sequences are held padded as in `BannedSequences` (traced, with their float32 biases:
    another mapping with the same padded shape compiles nothing new; `pad_to` fixes that shape).

    **Arguments:**

    - `sequence_bias`: a non-empty mapping of token-id sequence (a tuple) to bias (a number),
      `{(318, 257): -2.0, (42,): 1.5}`, or a list of `(ids, bias)` pairs, as transformers takes
      it (a sequence given twice keeps its last bias). Ids are checked against the vocabulary
      when `generate` runs.
    - `pad_to`: `(count, longest)` to pad to (the padding biases nothing), or `None`.
    """

    sequences: Int[np.ndarray, "count longest"]  # right-aligned: each sequence ends in the last column
    lengths: Int[np.ndarray, " count"]  # 0 for a padding row
    biases: Float[np.ndarray, " count"]  # 0 for a padding row

    @no_type_check  # validated here, with messages that say how to fix the call
    def __init__(self, sequence_bias: Mapping | Sequence, *, pad_to: tuple[int, int] | None = None):
        who = "SequenceBias"
        rule = (
            f"{who}: sequence_bias must be a non-empty mapping of token-id tuple to bias, e.g. "
            f"{{(318, 257): -2.0, (42,): 1.5}}, or a list of (ids, bias) pairs; got {sequence_bias!r}."
        )
        if isinstance(sequence_bias, Mapping):
            pairs = list(sequence_bias.items())
        elif isinstance(sequence_bias, Sequence) and not isinstance(sequence_bias, str):
            pairs = list(sequence_bias)
        else:
            raise ConfigError(rule)
        if not pairs or not all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in pairs):
            raise ConfigError(rule)
        merged = {}
        for k, (ids, bias) in enumerate(pairs):
            if isinstance(bias, bool | np.bool_) or not isinstance(bias, int | float | np.integer | np.floating) or np.isnan(bias):
                raise ConfigError(f"{who}: the bias of {ids!r} must be a number (not NaN), got {bias!r}.")
            key = tuple(_ids(ids, who, f"sequence {k}", empty_ok=False).tolist())
            merged[key] = float(bias)
        self.sequences, self.lengths = _padded([list(ids) for ids in merged], who, pad_to)
        self.biases = np.zeros(self.lengths.shape, np.float32)
        self.biases[: len(merged)] = list(merged.values())

    def __call__(
        self, logits: Float[Array, " vocab"], tokens: Int[Array, " total"], position: Int[Array, ""], step: Int[Array, ""]
    ) -> Float[Array, " vocab"]:
        """One row's `logits` plus the bias of each sequence the next token would complete."""
        match = _completes(self.sequences, self.lengths, tokens, position)
        bias = jnp.zeros_like(logits).at[self.sequences[:, -1]].add(jnp.where(match, self.biases, 0.0), mode="drop")
        # The summed bias is added once, as transformers adds it: without the barrier XLA may
        # scatter each bias into the logits in turn, rounding after each.
        return logits + jax.lax.optimization_barrier(bias)
