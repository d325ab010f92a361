"""A model's non-array settings (static fields such as `temp`, `num_heads`, `eps`), recorded in
a step's metadata and compared with the restore target's: the arrays' shapes cannot tell a
softmax temperature or a norm's epsilon apart."""

import dataclasses
import json
import math
from typing import Any

import equinox as eqx
import jax

from ._config import config_from_dict, is_config
from ._errors import CheckpointMismatchError, list_items

MAX_STATICS = 2000
"""At most this many settings are recorded per step; a model with more records the first ones
(in field order) and marks the record truncated."""

_MAX_CHARS = 200  # a longer string (a prompt template, say) is left out rather than stored

RUNTIME_STATICS: frozenset[str] = frozenset({"backend", "remat", "scan", "implementation", "capacity_factor", "inference"})
"""Layer settings that only say how a model runs (attention kernel, rematerialisation, scan or
unrolled layers, mixture-of-experts dispatch, `eqx.nn.inference_mode`'s flag): like `RESTORE_MAY_CHANGE`'s config fields, they
may differ between a saved run and its restore target."""


_TRAINING_ONLY: tuple[tuple[type, frozenset[str]], ...] = (
    (eqx.nn.Dropout, frozenset({"p"})),
    (eqx.nn.BatchNorm, frozenset({"momentum"})),
)
"""Fields of these layers that only shape training (a dropout rate, a running-statistics
momentum), not what the weights compute at inference: fine-tuning may change them, so they are
not recorded."""


def _value(v: Any) -> tuple[bool, Any]:
    """`(True, JSON form)` for numbers, strings, bools, None and tuples of them; else `(False, None)`."""
    if v is None or isinstance(v, bool | int):
        return True, v
    if isinstance(v, float):
        return True, v if math.isfinite(v) else {"__float__": repr(v)}
    if isinstance(v, str):
        return len(v) <= _MAX_CHARS, v
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        parts = [_value(x) for x in v]
        return all(ok for ok, _ in parts), {"__tuple__": [p for _, p in parts]}
    return False, None


def _walk(obj: Any, path: str, out: dict[str, Any]) -> bool:
    """Record `obj`'s settings under `path` into `out`; `False` once `MAX_STATICS` is reached."""
    if len(out) >= MAX_STATICS:
        return False
    if isinstance(obj, eqx.Module):
        skip = next((names for cls, names in _TRAINING_ONLY if isinstance(obj, cls)), frozenset())
        for f in dataclasses.fields(obj):
            if f.name in skip:
                continue
            if not _walk(getattr(obj, f.name, None), f"{path}.{f.name}", out):
                return False
        return True
    if eqx.is_array(obj) or isinstance(obj, jax.ShapeDtypeStruct) or is_config(obj):
        return True  # arrays are checked by shape and dtype, configs field by field
    ok, value = _value(obj)
    if ok:
        out[path] = value
        return True
    if isinstance(obj, list | tuple):
        return all(_walk(v, f"{path}.{i}", out) for i, v in enumerate(obj))
    if isinstance(obj, dict):
        return all(_walk(v, f"{path}.{k}", out) for k, v in obj.items() if isinstance(k, str))
    return True  # functions, enums, objects: no JSON form, not recorded


def describe_statics(model: Any) -> dict[str, Any]:
    """`{"fields": {"model.head.temp": 2.0, ...}, "truncated": bool}`: the JSON-able non-array
    settings of `model` (static fields and non-array leaves of its modules), keyed by path."""
    fields: dict[str, Any] = {}
    complete = _walk(model, "model", fields)
    return {"fields": json.loads(json.dumps(fields)), "truncated": not complete}


def statics_differences(saved: Any, target: dict[str, Any], sides: tuple[str, str] = ("saved", "target")) -> list[str]:
    """`"path: saved X, target Y"` (the two words are `sides`) for each recorded setting both sides hold with another value,
    other than those in `RUNTIME_STATICS`. Empty for a step written before settings were
    recorded. A path only one side holds is a structural difference, which the arrays' check
    or the config's reports."""
    if not isinstance(saved, dict) or not isinstance(saved.get("fields"), dict):
        return []
    mine = target["fields"]
    differ = []
    for path, value in saved["fields"].items():
        if path in mine and path.rsplit(".", 1)[-1] not in RUNTIME_STATICS and mine[path] != value:
            differ.append(f"{path}: {sides[0]} {_shown(value)}, {sides[1]} {_shown(mine[path])}")
    return differ


def check_statics(saved: Any, target_model: Any, *, where: str) -> None:
    """Raise `CheckpointMismatchError` listing every non-array setting of `target_model` that
    differs from the one recorded at save time (`saved`, `describe_statics`'s form)."""
    if saved is None:
        return
    differ = statics_differences(saved, describe_statics(target_model))
    if differ:
        raise CheckpointMismatchError(
            f"{where} was saved from a model whose non-array settings differ from the restore "
            f"target's in {len(differ)} field(s); the restored model would keep the target's values "
            "and compute something else than the saved one:\n" + list_items(differ)
            + "\nBuild the target with the saved values, or pass allow_config_change=True to restore "
            "into the other settings on purpose."
        )


def _shown(value: Any) -> str:
    try:
        return repr(config_from_dict(value))
    except Exception:  # an encoded form this eqzoo cannot rebuild: show it as stored
        return repr(value)


class StaticsCache:
    """`describe_statics(state.model)` of a `TrainState`, described once per structure: every
    state a compiled step returns shares its structure."""

    def __init__(self):
        self._cached: tuple[Any, dict[str, Any]] | None = None

    def __call__(self, state: Any) -> dict[str, Any]:
        cached = self._cached
        if cached is None or cached[0] is not state.structure:
            cached = self._cached = (state.structure, describe_statics(state.model))
        return cached[1]
