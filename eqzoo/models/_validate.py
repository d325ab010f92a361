"""Input checks shared by the models: they run at trace time and say how to fix the call."""

import dataclasses
import numbers
import types
import typing

import jax
import jax.numpy as jnp

from .._errors import ConfigError, ShapeError, as_flag, int_hint, shape_str


def check_tokens(tokens, *, max_seq: int, model: str) -> None:
    """Raise `ShapeError` unless `tokens` is one 1-D integer sequence no longer than `max_seq`."""
    shape = getattr(tokens, "shape", None)
    dtype = getattr(tokens, "dtype", None)
    if shape is None or dtype is None:
        raise ShapeError(f"{model} takes a JAX array of token ids; got {type(tokens).__name__}.")
    if len(shape) != 1:
        hint = (
            " eqzoo models take one sequence — wrap the call in jax.vmap(model) for a batch."
            if len(shape) == 2
            else ""
        )
        raise ShapeError(f"{model} takes tokens of shape (seq,); got {shape_str(shape)}.{hint}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ShapeError(
            f"{model} takes integer token ids; got dtype {jnp.dtype(dtype).name}. "
            "Convert with tokens.astype(jnp.int32)."
        )
    if shape[0] > max_seq:
        raise ShapeError(
            f"{model} got a sequence of length {shape[0]} but its config allows at most "
            f"max_seq={max_seq}; truncate the input or build the model with a larger max_seq."
        )
    if shape[0] == 0:
        raise ShapeError(f"{model} got an empty sequence; pass at least one token.")


def check_cache_span(seq: int, index, valid_length, cache_positions: int, model: str) -> None:
    """Raise `ShapeError` when `seq` tokens written at `index` fall outside a cache of
    `cache_positions` positions, or `valid_length` is not in `[1, seq]`. Checked on concrete
    values only (inside `jit` they are traced): past its end the cache write would be clamped
    and the logits silently wrong."""
    if not isinstance(index, jax.core.Tracer):
        start = int(index)
        if start < 0 or start + seq > cache_positions:
            raise ShapeError(
                f"{model}: {seq} token(s) at index {start} need cache positions {start} .. {start + seq - 1}, "
                f"but the cache holds positions 0 .. {cache_positions - 1}; build a longer one with "
                f"model.init_cache({max(start + seq, 1)}) (at most the config's max_seq), or start "
                "a new sequence."
            )
    if valid_length is not None and not isinstance(valid_length, jax.core.Tracer):
        n = int(valid_length)
        if not 1 <= n <= seq:
            raise ShapeError(f"{model}: valid_length must be in [1, {seq}] (the tokens given); got {n}.")


def check_positions(positions, max_seq: int, model: str) -> None:
    """Raise `ShapeError` when concrete `positions` fall outside `[0, max_seq)` (a learned
    position table has no row for them). Traced positions (inside `jit` or `vmap`) are data and
    pass unchecked."""
    if isinstance(positions, jax.core.Tracer) or positions.size == 0:
        return
    lo, hi = int(jnp.min(positions)), int(jnp.max(positions))
    if lo < 0 or hi >= max_seq:
        raise ShapeError(
            f"{model}: positions must lie in [0, max_seq={max_seq}) (one learned embedding "
            f"each); got positions from {lo} to {hi}. Count positions from 0 within each "
            "document (eqzoo.data.pack_documents does), or build the model with a larger max_seq."
        )


def check_integer_fields(config) -> None:
    """Raise `ConfigError` naming every field of the config dataclass `config` annotated `int`
    (or `int | None`, or `tuple[int, ...]`) whose value is not an integer: `num_layers=2.5`
    would otherwise pass the positivity checks and fail later, far from its cause. Fields
    annotated `bool` must be `True` or `False` (a NumPy bool is stored as the `bool`, which the
    config's JSON record needs)."""
    bad, flags = {}, {}
    for field in dataclasses.fields(config):
        value, kind = getattr(config, field.name), field.type
        optional = isinstance(kind, types.UnionType) and set(typing.get_args(kind)) == {int, type(None)}
        if kind is bool:
            if (flag := as_flag(value)) is None:
                flags[field.name] = value
            else:
                object.__setattr__(config, field.name, flag)  # frozen: set in __post_init__
            continue
        if kind is int or (optional and value is not None):
            ok = _is_int(value)
        elif typing.get_origin(kind) is tuple and typing.get_args(kind) == (int, ...):
            ok = isinstance(value, tuple) and all(_is_int(v) for v in value)
        else:
            continue
        if not ok:
            bad[field.name] = value
    if bad:
        hints = "".join(dict.fromkeys(int_hint(v) for v in bad.values()))
        raise ConfigError(f"{type(config).__name__}: these must be integers, got {bad}.{hints}")
    if flags:
        each = "; ".join(f"{name} must be True or False, got {value!r}" for name, value in flags.items())
        raise ConfigError(f"{type(config).__name__}: {each}.")


def check_scan_layers(value, config: str) -> bool | str:
    """A config's `scan_layers` as stored: `True`, `False` (a NumPy bool as a `bool`) or
    `"auto"`; `ConfigError` for anything else (`1` included: it would only compare equal)."""
    if (flag := as_flag(value)) is not None:
        return flag
    if isinstance(value, str) and value == "auto":
        return "auto"
    raise ConfigError(f"{config}: scan_layers must be True, False or 'auto', got {value!r}.")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


IMAGE_FIX = "Convert with x.astype(jnp.float32) / 255 (or the scaling the model was trained with)."
"""The fix `eqzoo._errors.check_floating` names for integer (uint8) images."""
