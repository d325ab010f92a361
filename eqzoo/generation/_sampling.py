"""Turning next-token logits into a token: greedy, temperature, top-k, top-p (nucleus) and
min-p; the repetition penalty and multi-token stop sequences the decode loops apply."""

import math
import operator
from typing import no_type_check

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._errors import ConfigError, ShapeError, shape_str
from .._typing import PRNGKey


def _check_0d(value, name: str, what: str) -> None:
    """Raise `ConfigError` unless the array `value` is 0-d (`what`: what `name` must be)."""
    if value.shape != ():
        raise ConfigError(
            f"{name} must be {what}; got an array of shape {shape_str(value.shape)}. One setting applies "
            "to every row of a batch."
        )


def _setting(value, name: str, rule: str, valid) -> float:
    """A sampling setting as a Python float, after checking it: a Python int or float, or a
    concrete 0-d integer or floating NumPy or JAX array (`np.float32(0.9)`, `jnp.array(0.9)`),
    for which `valid(float)` holds. Bools, NaN, other types and shapes, and traced values are
    refused with a message naming `name` and its `rule`."""
    if isinstance(value, jax.core.Tracer):
        raise ConfigError(
            f"{name} is traced here (an argument of your own jax.jit): the decode loops compile their own program "
            f"and take {name} as a concrete value, and a new value compiles nothing new. Call them outside "
            "jax.jit, or call sample_logits, which takes a traced value, in a step of your own."
        )
    if isinstance(value, np.ndarray | np.generic | jax.Array):
        _check_0d(value, name, "one number (a Python float or a 0-d array)")
        if not (jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)):
            raise ConfigError(f"{name} must be {rule}, got {value!r} (dtype {value.dtype}).")
        number, shown = float(value), float(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float64: out of every range here
            number = math.inf if value > 0 else -math.inf
        shown = value
    else:
        raise ConfigError(f"{name} must be {rule}, got {value!r}.")
    if math.isnan(number) or not valid(number):  # NaN fails every comparison; checked by name all the same
        raise ConfigError(f"{name} must be {rule}, got {shown!r}.")
    return number


def top_k_setting(value) -> int | None:
    """`top_k` as a Python int (or `None`), after checking it: a Python int, or a concrete 0-d
    integer NumPy or JAX array (`np.int64(40)`, `jnp.array(40)`), at least 1. Bools, floats,
    other shapes and traced values are refused: top-k sets a shape (how many logits
    `jax.lax.top_k` keeps), so it is a compile-time constant, never an array the loop traces."""
    if value is None:
        return None
    rule = "top_k must be a positive integer or None"
    if isinstance(value, jax.core.Tracer):
        raise ConfigError(
            "top_k is traced here (an argument of your own jax.jit): it sets how many logits are kept, a "
            "shape, so it must be concrete. Pass it as a Python int, or mark it static "
            "(jax.jit(..., static_argnames='top_k'))."
        )
    if isinstance(value, np.ndarray | np.generic | jax.Array):
        _check_0d(value, "top_k", "one integer (a Python int or a 0-d integer array)")
        if not jnp.issubdtype(value.dtype, jnp.integer):
            raise ConfigError(f"{rule}, got {value!r} (dtype {value.dtype}).")
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise ConfigError(f"{rule}, got {value!r}.")
    if number < 1:
        raise ConfigError(f"{rule}, got {number}" + (" (None turns top-k off, as transformers' 0 does)." if number == 0 else "."))
    return number


@no_type_check  # it validates these itself, with messages that say how to fix the call
def check_sampling(
    temperature: float, top_k: int | None, top_p: float | None, min_p: float | None = None, repetition_penalty: float = 1.0
) -> None:
    """Raise `ConfigError` for sampling settings outside their valid ranges. Each float
    setting may be a Python number or a concrete 0-d real NumPy or JAX array (see `_setting`),
    and `top_k` a Python int or a concrete 0-d integer array (see `top_k_setting`)."""
    t = _setting(temperature, "temperature", "a finite number >= 0 (0 means greedy)", lambda t: 0 <= t < math.inf)
    if 0 < t < np.finfo(np.float32).tiny:
        # the loops carry it as float32, where it is 0, or subnormal, which GPUs flush to 0
        # (greedy to some decoders, a division by zero to the samplers: speculative decoding
        # then emitted token 0 over and over)
        raise ConfigError(
            f"temperature {t!r} is 0 or subnormal in float32, which the decoders compute in; pass 0 for greedy "
            "decoding, or a temperature that sharpens without vanishing, such as 1e-3."
        )
    top_k_setting(top_k)
    if top_p is not None:
        _setting(top_p, "top_p", "in (0, 1] or None", lambda p: 0.0 < p <= 1.0)
    if min_p is not None:
        _setting(min_p, "min_p", "a number in [0, 1] or None (0 filters nothing)", lambda m: 0.0 <= m <= 1.0)
    _setting(
        repetition_penalty, "repetition_penalty", "a finite number > 0 (1.0 is off; > 1 discourages repeats)",
        lambda r: 0 < r < math.inf,
    )


def as_token_id(x, where: str, what: str) -> int:
    """`x` as a Python int token id: an int, a NumPy integer or a concrete integer 0-d array
    (not a bool); `what` names it in the error."""
    if not isinstance(x, bool | np.bool_) and getattr(x, "dtype", None) != np.bool_:
        try:
            return operator.index(x)
        except TypeError:
            pass
    raise ConfigError(f"{where}: {what} must be an integer token id, got {x!r}.")


def token_ids(values, vocab_size: int, where: str, what: str, each: str) -> tuple[int, ...]:
    """`values` (token ids) as a tuple of Python ints, each checked by `as_token_id` (named
    `each` in its error) and to lie in `[0, vocab_size)` (the ids named `what` in that error):
    the one id check behind `eos_token` and `stop_sequences`."""
    ids = tuple(as_token_id(x, where, each) for x in values)
    outside = [x for x in ids if not 0 <= x < vocab_size]
    if outside:
        raise ConfigError(
            f"{where}: {what} {list(ids)} holds ids {outside} outside the model's vocabulary [0, {vocab_size}); "
            "it could never be produced."
        )
    return ids


def check_stop_tokens(eos_token, pad_token, vocab_size: int, where: str) -> tuple[tuple[int, ...] | None, int]:
    """`(eos, pad)`: `eos_token` as a tuple of token ids (or `None`) and `pad_token` as an int,
    both static values, after checking them. `eos_token` is one id or a sequence of ids (as a
    `generation_config.json`'s `eos_token_id` may list several), each in `[0, vocab_size)`."""

    pad = as_token_id(pad_token, where, "pad_token")
    if not -(2**31) <= pad < 2**31:
        raise ConfigError(f"{where}: pad_token must fit in int32 (the tokens' dtype); got {pad}.")
    if eos_token is None:
        return None, pad
    if getattr(eos_token, "ndim", None) == 1:  # a NumPy or JAX array of ids (not traced: ids are static)
        eos_token = np.asarray(eos_token).tolist()
    if isinstance(eos_token, list | tuple | range):
        ids = token_ids(eos_token, vocab_size, where, "eos_token", "each eos_token")
    else:
        ids = token_ids((eos_token,), vocab_size, where, "eos_token", "eos_token")
    if not ids:
        raise ConfigError(f"{where}: eos_token is an empty sequence; pass None to decode without a stop token.")
    return ids, pad


def traced_stop_tokens(eos: tuple[int, ...] | None, pad: int) -> tuple[np.ndarray | None, np.ndarray]:
    """`check_stop_tokens`'s values as a decode loop takes them: int32 arrays, which a compiled
    loop reads as arguments (other stop or pad ids compile nothing new; only the number of
    stop ids is part of the program). `None` (no stop token) stays static. NumPy arrays: the
    compiled loop transfers them with its call, where a `jax.Array` would cost a dispatch of
    its own on every call."""
    return (None if eos is None else np.asarray(eos, np.int32)), np.asarray(pad, np.int32)


@no_type_check  # it validates these itself, with messages that say how to fix the call
def check_stop_sequences(stop_sequences, vocab_size: int, where: str) -> tuple[tuple[int, ...], ...] | None:
    """`stop_sequences` as a tuple of tuples of token ids (static values), after checking
    them: a sequence (list, tuple or 1-D arrays) of non-empty sequences of ids in
    `[0, vocab_size)`; `None` for none."""
    if stop_sequences is None:
        return None
    how = "pass a list of token-id lists, e.g. stop_sequences=[[13, 198]] (tokenizer.encode(text, add_special_tokens=False) for a stop string)"
    if isinstance(stop_sequences, str | bytes) or not isinstance(stop_sequences, list | tuple) and getattr(stop_sequences, "ndim", None) != 2:
        raise ConfigError(f"{where}: stop_sequences must be a sequence of token-id sequences; got {stop_sequences!r}; {how}.")
    out = []
    for seq in list(stop_sequences):
        if isinstance(seq, str | bytes):
            raise ConfigError(f"{where}: stop_sequences holds the string {seq!r}; token ids are needed: {how}.")
        if getattr(seq, "ndim", None) == 1:  # a NumPy or JAX array of ids (not traced: ids are static)
            seq = np.asarray(seq).tolist()
        if not isinstance(seq, list | tuple | range):
            raise ConfigError(
                f"{where}: each stop sequence must be a sequence of token ids; got {seq!r} (a single stop id "
                f"belongs in eos_token=; otherwise {how})."
            )
        if not seq:
            raise ConfigError(f"{where}: stop_sequences holds an empty sequence, which would stop at once; drop it.")
        ids = token_ids(seq, vocab_size, where, "stop sequence", f"each id of stop sequence {list(seq)!r}")
        out.append(tuple(ids))
    if not out:
        raise ConfigError(f"{where}: stop_sequences is empty; pass None to decode without stop sequences.")
    return tuple(out)


def traced_stop_sequences(stops: tuple[tuple[int, ...], ...] | None) -> np.ndarray | None:
    """`check_stop_sequences`'s value as a decode loop takes it: an int32 `(n, longest)` array,
    each sequence at the end of its row after `-1`s (which match anything). Only its shape is
    part of the compiled program: other ids of the same lengths compile nothing new."""
    if stops is None:
        return None
    width = max(len(s) for s in stops)
    return np.asarray([(-1,) * (width - len(s)) + s for s in stops], np.int32)  # NumPy, as traced_stop_tokens


def ends_with_stop(recent: Array, stops: Array) -> Array:
    """Whether `recent`, the last `longest` generated tokens (oldest first; `-1` before the
    first), ends with one of `stops` (`traced_stop_sequences`' array)."""
    return jnp.any(jnp.all((stops < 0) | (recent[None, :] == stops), axis=-1))


def penalize_repeats(logits: Array, seen: Array, penalty: Array | None) -> Array:
    """The repetition penalty (Keskar et al., 2019, "CTRL"), as transformers'
    `RepetitionPenaltyLogitsProcessor` applies it: for each token id `seen` (already in the
    prompt or generated), a positive logit is divided by `penalty` and a negative one
    multiplied by it. `penalty` `None` leaves `logits` as they are."""
    if penalty is None:
        return logits
    logits = logits.astype(jnp.float32)
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def is_eos(tokens: Array, eos: Array | tuple[int, ...]) -> Array:
    """Where `tokens` is one of the stop tokens `eos` (a `(n,)` array or a tuple of ids)."""
    eos = jnp.asarray(eos, jnp.int32)
    return jnp.any(tokens[..., None] == eos, axis=-1)


@no_type_check  # it validates its arguments itself, with messages that say how to fix the call
def sample_logits(
    logits: Float[Array, " vocab"],
    key: PRNGKey | None,
    *,
    temperature: float | Float[Array, ""] = 0.0,
    top_k: int | None = None,
    top_p: float | Float[Array, ""] | None = None,
    min_p: float | Float[Array, ""] | None = None,
) -> Int[Array, ""]:
    """Choose the next token from one position's logits.

    **Arguments:**

    - `logits`: unnormalised scores over the vocabulary, shape `(vocab,)` (one position; for a
      batch, `jax.vmap` it with one key per row, `jax.random.split(key, batch)`).
    - `key`: PRNG key; needed unless `temperature == 0`.
    - `temperature`: 0 picks the most likely token (greedy); otherwise logits are divided by it.
      A traced value (an argument of your own `jax.jit`ted step): one compile serves every value;
      it is not range-checked, and a value `<= 0` picks the greedy token; a key is then needed.
    - `top_k`: keep only the `k` most likely tokens (and those tied with the `k`-th): a Python
      int or a concrete 0-d integer NumPy or JAX array (never traced: it sets a shape).
    - `top_p`: keep the smallest set of most likely tokens whose probability reaches `p`
      (Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration"); it may be
      traced, too (not range-checked then).
    - `min_p`: keep only tokens whose probability is at least `min_p` times the most likely
      token's (Nguyen et al., 2024, "Turning Up the Heat: Min-p Sampling"); may be traced.

    `temperature`, `top_p` and `min_p` may each be a Python number or a concrete 0-d integer or
    floating NumPy or JAX array (as the decode loops take them, `repetition_penalty` too); bools,
    NaN and arrays of other shapes are refused.

    The filters apply in transformers' order: temperature, then top-k, then top-p, then min-p
    (each on what the previous ones kept; min-p after temperature, so temperature changes which
    tokens it keeps). A repetition penalty needs the tokens so far: the decode loops
    ([`eqzoo.generate`][]) apply it to the logits before all of these.

    **Returns:** the chosen token id, an int32 scalar.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 1:
        raise ShapeError(
            f"sample_logits takes one position's logits, shape (vocab,); got {shape_str(logits.shape)}. "
            "For a batch, jax.vmap(sample_logits)(logits, jax.random.split(key, batch))."
        )
    traced_t, traced_p, traced_m = (isinstance(v, jax.core.Tracer) for v in (temperature, top_p, min_p))
    check_sampling(1.0 if traced_t else temperature, top_k, None if traced_p else top_p, None if traced_m else min_p)
    top_k = top_k_setting(top_k)  # a Python int: jax.lax.top_k takes k as a shape
    greedy = jnp.argmax(logits.astype(jnp.float32)).astype(jnp.int32)
    if not traced_t and temperature == 0.0:
        return greedy
    if key is None:
        raise ConfigError(
            "sampling with temperature > 0 needs a PRNG key: pass key=jax.random.key(seed)"
            + (" (a traced temperature may be > 0)." if traced_t else ".")
        )
    if not traced_t:
        return draw(logits, key, temperature, top_k, top_p, min_p)
    temperature = jnp.asarray(temperature, jnp.float32)
    sampled = draw(logits, key, jnp.where(temperature > 0, temperature, 1.0), top_k, top_p, min_p)
    return jnp.where(temperature > 0, sampled, greedy)


# A sampling float as `check_sampling` takes it: a Python number or a 0-d real array.
Setting = float | int | np.number | np.ndarray | Array


def traced_settings(
    temperature: Setting, top_p: Setting | None, min_p: Setting | None = None, repetition_penalty: Setting = 1.0
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """`(temperature, top_p, min_p, repetition_penalty)` as the decode loops take them, after
    `check_sampling`: `None` for greedy decoding, for no top-p or min-p filter and for no
    penalty (1.0) (static: they change the program), otherwise float32 arrays, which a
    compiled loop reads as arguments, so that a new value does not compile the loop again (NumPy
    arrays, as `traced_stop_tokens` gives).
    Greedy decoding drops the filters (the most likely token survives them all) but keeps the
    penalty, as transformers does."""
    # Python floats first: each may be a 0-d NumPy or JAX array (check_sampling takes them alike).
    temperature, repetition_penalty = float(temperature), float(repetition_penalty)
    top_p, min_p = (None if v is None else float(v) for v in (top_p, min_p))
    greedy = temperature == 0.0
    return (
        None if greedy else np.asarray(temperature, np.float32),
        None if greedy or top_p is None or top_p >= 1.0 else np.asarray(top_p, np.float32),
        None if greedy or min_p is None or min_p <= 0.0 else np.asarray(min_p, np.float32),
        None if float(repetition_penalty) == 1.0 else np.asarray(repetition_penalty, np.float32),
    )


def draw(logits, key, temperature, top_k, top_p, min_p=None):
    """One token from `logits`: the argmax when `temperature` is `None`, else a sample of the
    filtered logits (`temperature`, `top_p` and `min_p` may be traced; see `traced_settings`)."""
    if temperature is None:
        return jnp.argmax(logits.astype(jnp.float32)).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p, min_p)).astype(jnp.int32)


def filter_logits(
    logits: Float[Array, " vocab"],
    temperature: float | Float[Array, ""],
    top_k: int | None,
    top_p: float | Float[Array, ""] | None,
    min_p: float | Float[Array, ""] | None = None,
) -> Float[Array, " vocab"]:
    """The float32 logits `sample_logits` samples from when `temperature > 0`: less their
    largest, divided by the temperature, with the tokens top-k / top-p / min-p remove (in
    that order, as transformers applies them) at float32's lowest value (their softmax is the
    sampling distribution)."""
    logits = logits.astype(jnp.float32)
    # Shifted by the largest first (the softmax is unchanged): a tiny temperature then sends the
    # others to -inf and the largest to 0, where dividing the raw logits overflowed to inf - inf.
    logits = (logits - jnp.max(logits)) / temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if top_k is not None and top_k < logits.shape[0]:
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None and (isinstance(top_p, jax.Array) or top_p < 1.0):  # an array: maybe traced
        order = jnp.argsort(-logits)
        sorted_logits = logits[order]
        probs = jax.nn.softmax(sorted_logits)
        # Keep a token if the mass strictly before it is below p (so the first is always kept).
        keep_sorted = (jnp.cumsum(probs) - probs) < top_p
        keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg_inf)
    if min_p is not None and (isinstance(min_p, jax.Array) or min_p > 0.0):
        # In probabilities, as transformers' MinPLogitsWarper compares them; the most likely
        # token always passes (probs <= its own).
        probs = jax.nn.softmax(logits)
        logits = jnp.where(probs < min_p * jnp.max(probs), neg_inf, logits)
    return logits


def warp_logprobs(
    logp: Float[Array, " vocab"],
    temperature: Float[Array, ""],
    top_k: int | None,
    top_p: Float[Array, ""] | None,
    min_p: Float[Array, ""] | None,
    keep: int,
) -> Float[Array, " vocab"]:
    """One beam's (processed) log-probabilities through transformers' sampling warpers, as its
    beam sampling applies them: divided by `temperature`, then top-k, top-p and min-p, each
    keeping at least the `keep` best tokens (transformers' `min_tokens_to_keep`, the number of
    eos ids plus one and at least 2, so that a beam always has a continuation that does not
    stop); removed tokens at `-inf`.

    Unlike `filter_logits`, the scores are not shifted by their largest: beam sampling adds them
    to each beam's running score and compares them across beams. Top-p follows transformers'
    formula (a token is removed when the mass of the tokens no more likely than it is at most
    `1 - top_p`), summed from the least likely, as transformers sums it."""
    x = logp.astype(jnp.float32) / temperature
    vocab = x.shape[0]
    order = jnp.argsort(-x)  # best first; the `keep` best survive every filter below
    rank = jnp.zeros((vocab,), jnp.int32).at[order].set(jnp.arange(vocab, dtype=jnp.int32))
    if top_k is not None and top_k < vocab:
        kth = jax.lax.top_k(x, min(max(top_k, keep), vocab))[0][-1]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p is not None:
        probs = jax.nn.softmax(x[order])  # best first
        tail = jnp.cumsum(probs[::-1])[::-1]  # each token's mass and that of the tokens after it
        remove = jnp.zeros((vocab,), bool).at[order].set(tail <= 1 - top_p)
        x = jnp.where(remove & (rank >= keep), -jnp.inf, x)
    if min_p is not None:
        probs = jax.nn.softmax(x)
        x = jnp.where((probs < min_p * jnp.max(probs)) & (rank >= keep), -jnp.inf, x)
    return x
