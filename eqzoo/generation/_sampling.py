"""Turning next-token logits into a token: greedy, temperature, top-k and top-p (nucleus)."""

import math
import operator
from typing import no_type_check

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._errors import ConfigError, ShapeError, shape_str
from .._typing import PRNGKey


@no_type_check  # it validates these itself, with messages that say how to fix the call
def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise `ConfigError` for sampling settings outside their valid ranges."""
    if not (temperature >= 0 and math.isfinite(temperature)):  # NaN fails every comparison
        raise ConfigError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1):
        raise ConfigError(f"top_k must be a positive integer or None, got {top_k!r}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1] or None, got {top_p}.")


def check_stop_tokens(eos_token, pad_token, vocab_size: int, where: str) -> tuple[tuple[int, ...] | None, int]:
    """`(eos, pad)`: `eos_token` as a tuple of token ids (or `None`) and `pad_token` as an int,
    both static values, after checking them. `eos_token` is one id or a sequence of ids (as a
    `generation_config.json`'s `eos_token_id` may list several), each in `[0, vocab_size)`."""

    def as_id(x, what):
        try:
            if isinstance(x, bool):
                raise TypeError
            return operator.index(x)  # ints, NumPy integers, integer 0-d arrays
        except TypeError:
            raise ConfigError(f"{where}: {what} must be an integer token id, got {x!r}.") from None

    pad = as_id(pad_token, "pad_token")
    if not -(2**31) <= pad < 2**31:
        raise ConfigError(f"{where}: pad_token must fit in int32 (the tokens' dtype); got {pad}.")
    if eos_token is None:
        return None, pad
    if getattr(eos_token, "ndim", None) == 1:  # a NumPy or JAX array of ids (not traced: ids are static)
        eos_token = np.asarray(eos_token).tolist()
    many = isinstance(eos_token, list | tuple | range)
    ids = tuple(as_id(e, "each eos_token") for e in eos_token) if many else (as_id(eos_token, "eos_token"),)
    if not ids:
        raise ConfigError(f"{where}: eos_token is an empty sequence; pass None to decode without a stop token.")
    outside = [e for e in ids if not 0 <= e < vocab_size]
    if outside:
        raise ConfigError(
            f"{where}: eos_token {outside} lies outside the model's vocabulary [0, {vocab_size}); "
            "it could never be produced."
        )
    return ids, pad


def traced_stop_tokens(eos: tuple[int, ...] | None, pad: int) -> tuple[Array | None, Array]:
    """`check_stop_tokens`'s values as a decode loop takes them: int32 arrays, which a compiled
    loop reads as arguments (other stop or pad ids compile nothing new; only the number of
    stop ids is part of the program). `None` (no stop token) stays static."""
    return (None if eos is None else jnp.asarray(eos, jnp.int32)), jnp.asarray(pad, jnp.int32)


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
) -> Int[Array, ""]:
    """Choose the next token from one position's logits.

    **Arguments:**

    - `logits`: unnormalised scores over the vocabulary, shape `(vocab,)` (one position; for a
      batch, `jax.vmap` it with one key per row, `jax.random.split(key, batch)`).
    - `key`: PRNG key; needed unless `temperature == 0`.
    - `temperature`: 0 picks the most likely token (greedy); otherwise logits are divided by it.
      A traced value (an argument of your own `jax.jit`ted step): one compile serves every value;
      it is not range-checked, and a value `<= 0` picks the greedy token; a key is then needed.
    - `top_k`: keep only the `k` most likely tokens (and those tied with the `k`-th).
    - `top_p`: keep the smallest set of most likely tokens whose probability reaches `p`
      (Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration"); it may be
      traced, too (not range-checked then).

    **Returns:** the chosen token id, an int32 scalar.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 1:
        raise ShapeError(
            f"sample_logits takes one position's logits, shape (vocab,); got {shape_str(logits.shape)}. "
            "For a batch, jax.vmap(sample_logits)(logits, jax.random.split(key, batch))."
        )
    traced_t, traced_p = (isinstance(v, jax.core.Tracer) for v in (temperature, top_p))
    check_sampling(1.0 if traced_t else temperature, top_k, None if traced_p else top_p)
    greedy = jnp.argmax(logits.astype(jnp.float32)).astype(jnp.int32)
    if not traced_t and temperature == 0.0:
        return greedy
    if key is None:
        raise ConfigError(
            "sampling with temperature > 0 needs a PRNG key: pass key=jax.random.key(seed)"
            + (" (a traced temperature may be > 0)." if traced_t else ".")
        )
    if not traced_t:
        return draw(logits, key, temperature, top_k, top_p)
    temperature = jnp.asarray(temperature, jnp.float32)
    sampled = draw(logits, key, jnp.where(temperature > 0, temperature, 1.0), top_k, top_p)
    return jnp.where(temperature > 0, sampled, greedy)


def traced_settings(temperature: float, top_p: float | None) -> tuple[Array | None, Array | None]:
    """`(temperature, top_p)` as the decode loops take them, after `check_sampling`: `None` for
    greedy decoding and for no top-p filter (static: they change the program), otherwise
    float32 arrays, which a compiled loop reads as arguments, so that a new value does not
    compile the loop again."""
    greedy = float(temperature) == 0.0
    return (
        None if greedy else jnp.asarray(temperature, jnp.float32),
        None if greedy or top_p is None or top_p >= 1.0 else jnp.asarray(top_p, jnp.float32),
    )


def draw(logits, key, temperature, top_k, top_p):
    """One token from `logits`: the argmax when `temperature` is `None`, else a sample of the
    filtered logits (`temperature` and `top_p` may be traced; see `traced_settings`)."""
    if temperature is None:
        return jnp.argmax(logits.astype(jnp.float32)).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


def filter_logits(
    logits: Float[Array, " vocab"],
    temperature: float | Float[Array, ""],
    top_k: int | None,
    top_p: float | Float[Array, ""] | None,
) -> Float[Array, " vocab"]:
    """The float32 logits `sample_logits` samples from when `temperature > 0`: less their
    largest, divided by the temperature, with the tokens top-k / top-p removes at float32's lowest value (their
    softmax is the sampling distribution)."""
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
    return logits
