"""The prompts a decode loop takes, checked on the host.

Serving loops call the decoders once per request, so the checks cost what they cost on every
call. Each check that reads values reads them from one host copy: a NumPy input is already
one (it is checked where it is and handed to the compiled loop as it is, with no device round
trip), and a concrete `jax.Array` is copied once (a copy that waits on nothing new: no array
the call computes is read back, since one would wait behind the previous call's decoding).
Traced values, or values spread over processes, keep the checks that need no values.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._errors import ConfigError, ShapeError, shape_str


def as_prompts(prompts, who: str) -> Array | np.ndarray:
    """`prompts` as an array: a `jax.Array` (or tracer) as it is, anything else as a NumPy
    array (on the host, where the checks read it). Prompts of different lengths (a ragged
    list) get a message that says how to batch them."""
    if isinstance(prompts, dict) or hasattr(prompts, "keys"):  # a tokenizer's BatchEncoding, say
        raise ShapeError(
            f"{who}: prompts must be token ids, an integer array; got a {type(prompts).__name__} with keys "
            f"{sorted(prompts.keys())[:6]} (a tokenizer's output? pass its 'input_ids' as prompts "
            "and its 'attention_mask' as attention_mask= (left or right padding))."
        )
    if isinstance(prompts, jax.Array):  # tracers too
        return prompts
    try:
        out = np.asarray(prompts)
    except (TypeError, ValueError) as err:
        out, reason = None, str(err)
    else:
        reason = "they hold Python objects"
    if out is None or out.dtype == object:
        raise ShapeError(
            f"{who}: the prompts do not form one array ({reason}). Right-pad prompts of different lengths "
            "into one (batch, seq) array and pass their real lengths as `lengths`."
        ) from None
    return out


def host_values(x) -> np.ndarray | None:
    """`x`'s values as a NumPy array (a NumPy input itself; a `jax.Array` copied once, the copy
    cached on the array), or `None` where they cannot be read here: traced, or spread over
    processes."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array):
        return np.asarray(x) if x.is_fully_addressable else None
    return np.asarray(x)


def _as_int32(x):
    """`x` as int32: NumPy on the host, a `jax.Array` on its device (no work when it already is)."""
    if isinstance(x, np.ndarray):
        return x.astype(np.int32, copy=False)
    return x if x.dtype == jnp.int32 else x.astype(jnp.int32)


def prompt_batch(prompts, lengths, attention_mask, vocab_size: int, who: str, pad_token: int | None = None):
    """`(prompts, lengths)` as the decode loops take them, checked: int32 `(batch, seq)`
    right-padded prompts and int32 `(batch,)` lengths, each NumPy where the input was (the
    compiled loop transfers it with the call) and a `jax.Array` where the prompts were one
    (kept on their devices, with their sharding).

    `lengths` defaults to all `seq`. Or `attention_mask`, a tokenizer's 0/1 mask of `prompts`'
    shape (then `lengths` must be `None`): the lengths are its row sums, and a left-padded row
    (padding, then its tokens) is rotated so that its tokens come first. Each mask row must be
    one run of ones, at its start or at its end.

    Always: the shapes and dtypes. When the values are concrete (read once, on the host): each
    length is in `[1, seq]`, and every real prompt token (padding past each length may hold
    anything) is in `[0, vocab_size)`: the embedding lookup would read NaN for an id past the
    vocabulary and another token's row for a negative one, without a word. With `pad_token`
    (and `lengths`), a row that looks left-padded (shorter than `seq`, its first `seq - length`
    ids all `pad_token` and some id past its length another) is refused: read as right-padded,
    its padding would be part of its prompt and its last tokens cut off.
    """
    batch, seq = prompts.shape
    host = host_values(prompts)
    if attention_mask is not None:
        if lengths is not None:
            raise ConfigError(f"{who}: pass lengths or attention_mask, not both (the lengths are the mask's row sums).")
        prompts, lengths, host, host_lengths = _from_attention_mask(prompts, host, attention_mask, who)
        pad_token = None  # the mask says where the padding is
    else:
        if lengths is None:
            lengths = np.full((batch,), seq, np.int32)
        elif not isinstance(lengths, jax.Array):
            lengths = np.asarray(lengths)
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ShapeError(f"lengths must be integers (each prompt's real length); got dtype {lengths.dtype}.")
        if lengths.shape != (batch,):
            raise ShapeError(f"lengths must have shape ({batch},) to match prompts; got {shape_str(lengths.shape)}.")
        host_lengths = host_values(lengths)
    if host is not None and host_lengths is not None:
        _check_values(host, host_lengths.astype(np.int64), vocab_size, who, pad_token)
    return _as_int32(prompts), _as_int32(lengths)


def _from_attention_mask(prompts, host, attention_mask, who: str):
    """`(prompts, lengths, host prompts, host lengths)` read from `attention_mask`, the host
    values `None` where they cannot be read; see `prompt_batch`."""
    mask = attention_mask if isinstance(attention_mask, jax.Array) else np.asarray(attention_mask)
    if mask.shape != prompts.shape:
        raise ShapeError(f"{who}: attention_mask must have the prompts' shape {shape_str(prompts.shape)}; got {shape_str(mask.shape)}.")
    if not (jnp.issubdtype(mask.dtype, jnp.integer) or mask.dtype == jnp.bool_):
        raise ShapeError(f"{who}: attention_mask must hold 0/1 integers or booleans; got dtype {mask.dtype}.")
    host_mask = host_values(mask)
    if host_mask is None:
        return (*_right_align(prompts, mask), None, None)
    host_mask = host_mask.astype(np.int64)
    if not np.isin(host_mask, (0, 1)).all():
        raise ShapeError(f"{who}: attention_mask must hold only 0 (padding) and 1 (token); got {sorted(set(host_mask.ravel().tolist()))[:8]}.")
    seq = prompts.shape[1]
    ones, first = host_mask.sum(-1), host_mask.argmax(-1)
    pos = np.arange(seq)[None, :]
    run = (pos >= first[:, None]) & (pos < (first + ones)[:, None])
    bad = np.flatnonzero((ones == 0) | (run != host_mask.astype(bool)).any(-1) | ((first > 0) & (first + ones < seq)))
    if bad.size:
        raise ShapeError(
            f"{who}: attention_mask rows {bad.tolist()[:8]} are not one run of tokens padded on the left or "
            "on the right (every row needs at least one token, and no padding in its middle)."
        )
    if host is not None:  # the rotation of _right_align, on the host copy
        host = np.take_along_axis(host, (pos + first[:, None]) % seq, axis=1)
    if isinstance(prompts, np.ndarray):
        return host, ones, host, ones
    return (*_right_align(prompts, mask), host, ones)  # on the prompts' devices; checked on the host copy


@jax.jit  # one dispatch (and one compilation per shape), not one per operation
def _right_align(prompts, mask):
    mask = mask.astype(bool)
    first = jnp.argmax(mask, axis=-1)  # the first real token: 0 for right padding
    rotate = (jnp.arange(prompts.shape[1])[None, :] + first[:, None]) % prompts.shape[1]
    return jnp.take_along_axis(prompts, rotate, axis=1), mask.sum(-1, dtype=jnp.int32)


def _check_values(host, host_lengths, vocab_size: int, who: str, pad_token: int | None) -> None:
    """`prompt_batch`'s checks of concrete values: the lengths' range, the real tokens'
    vocabulary and, with `pad_token`, rows that look left-padded."""
    seq = host.shape[1]
    if (host_lengths < 1).any() or (host_lengths > seq).any():
        raise ShapeError(f"each prompt length must be in [1, {seq}]; got {host_lengths.tolist()}.")
    host = host.astype(np.int64)  # uint8 ids: 256 would wrap to 0
    full = bool((host_lengths == seq).all())  # no padding (the common case): nothing to mask, nothing left-padded
    outside = (host < 0) | (host >= vocab_size)
    if not full:
        outside &= np.arange(seq)[None, :] < host_lengths[:, None]
    if outside.any():
        bad = sorted({int(v) for v in host[outside].tolist()})[:8]
        raise ConfigError(
            f"{who}: prompt token ids {bad} lie outside the model's vocabulary [0, {vocab_size}); "
            "was the prompt encoded with another tokenizer? (eqzoo.models.resize_vocab grows the "
            "model for tokens added to its tokenizer.)"
        )
    if pad_token is not None and not full:
        pos = np.arange(seq)[None, :]
        head = pos < (seq - host_lengths)[:, None]  # where a left-padded row's padding would be
        tail = pos >= host_lengths[:, None]  # where a right-padded row's padding is
        left = (host_lengths < seq) & np.where(head, host == pad_token, True).all(-1) & (tail & (host != pad_token)).any(-1)
        if left.any():
            raise ShapeError(
                f"{who}: prompt rows {np.flatnonzero(left).tolist()[:8]} look left-padded: they start with "
                f"pad_token {pad_token} and hold other ids past their lengths, but row i's prompt is its first "
                "lengths[i] ids (right padding). Pass the tokenizer's attention_mask as attention_mask= instead "
                "of lengths (left or right padding), or pad on the right (padding_side='right')."
            )
