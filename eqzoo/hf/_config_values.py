"""Reading single values out of a `config.json` dict, and the errors for ones eqzoo refuses."""

import math
from collections.abc import Mapping
from typing import Any

from ._errors import HFFormatError

_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _require(d: Mapping[str, Any], *keys: str) -> None:
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise HFFormatError(f"config.json of model_type {d.get('model_type')!r} lacks {missing}.")


_MISSING = object()


def _number(d: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    # d[key] (or d.get(key, default)) as `kind`; a null, a string or a fraction where an integer
    # belongs is a damaged config.json, named as such rather than failing inside int()/float().
    value = d[key] if default is _MISSING else d.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (kind is int and value != int(value)):
        raise HFFormatError(
            f"config.json has {key}={value!r}; it must be {'an integer' if kind is int else 'a finite number'}."
        )
    return kind(value)


def _int(d: Mapping[str, Any], key: str, default: Any = _MISSING) -> int:
    return _number(d, key, int, default)


def _float(d: Mapping[str, Any], key: str, default: Any = _MISSING) -> float:
    return _number(d, key, float, default)


def _unsupported(d: Mapping[str, Any], key: str, value: Any, why: str) -> HFFormatError:
    return HFFormatError(f"config.json has {key}={value!r}, which eqzoo does not support: {why}.")


def _sliding_window(d: Mapping[str, Any], default: int | None) -> int | None:
    # A key left out means transformers' default (4096 for Mistral, none for Mixtral); an
    # explicit null means full causal attention.
    window = d.get("sliding_window", default)
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise _unsupported(d, "sliding_window", window, "it must be a positive integer or null")
    return int(window)
