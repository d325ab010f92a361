"""Model configs as JSON: a dataclass becomes a dict with a type tag, nested dataclasses too."""

import dataclasses
import importlib
import math
import sys
import warnings
from typing import Any

import equinox as eqx

from .._errors import user_stacklevel
from ._errors import CheckpointError

_TYPE = "__dataclass__"
_TUPLE = "__tuple__"
_FLOAT = "__float__"


def is_config(obj: Any) -> bool:
    """Whether `obj` is a config: a dataclass instance that is not an `eqx.Module` (a model)."""
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type) and not isinstance(obj, eqx.Module)


def model_config(model: Any) -> Any:
    """`model.config` when it is a config dataclass (eqzoo's models hold theirs), else `None`."""
    config = getattr(model, "config", None)
    return config if is_config(config) else None


def config_to_dict(config: Any) -> Any:
    """Encode a config (a dataclass, possibly nesting others) as JSON-able data.

    A dataclass becomes `{"__dataclass__": "module:QualName", "fields": {...}}`; tuples become
    `{"__tuple__": [...]}` (so hashable configs come back hashable); non-finite floats become
    `{"__float__": "inf"}`; dicts need string keys. `None`, bools, ints, floats, strings and
    lists pass through.

    **Arguments:** `config`, e.g. a [`eqzoo.models.GPT2Config`][].

    **Returns:** the JSON-able form, which [`eqzoo.checkpoint.config_from_dict`][] inverts.

    **Raises:** `CheckpointError` naming the field whose value has no JSON form.
    """
    return _encode(config, "config")


def _encode(value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {
            f.name: _encode(getattr(value, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(value)
            if f.init
        }
        return {_TYPE: f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_FLOAT: repr(value)}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise CheckpointError(
        f"cannot store {where} = {value!r} (a {type(value).__name__}) as JSON; configs may hold "
        "dataclasses, None, bools, ints, floats, strings, tuples, lists and dicts with string keys."
    )


def config_from_dict(data: Any) -> Any:
    """Rebuild a config from [`eqzoo.checkpoint.config_to_dict`][]'s output.

    A tagged class is looked up only among modules already imported (eqzoo's own modules may be
    imported); nothing else is imported or executed on the checkpoint's say-so. The class's own
    `__init__`/`__post_init__` runs, so its validation applies.

    **Arguments:** `data`, the JSON-able form.

    **Returns:** the config object.

    **Raises:** `CheckpointError` if a tagged class cannot be found or is not a dataclass.
    """
    if isinstance(data, list):
        return [config_from_dict(v) for v in data]
    if isinstance(data, dict):
        if _TYPE in data:
            cls = _resolve(data[_TYPE])
            return cls(**{k: config_from_dict(v) for k, v in data.get("fields", {}).items()})
        if _TUPLE in data:
            return tuple(config_from_dict(v) for v in data[_TUPLE])
        if _FLOAT in data:
            return float(data[_FLOAT])
        return {k: config_from_dict(v) for k, v in data.items()}
    return data


def _resolve(tag: Any) -> type:
    if not isinstance(tag, str) or ":" not in tag:
        raise CheckpointError(f"malformed config type tag {tag!r}; expected 'module:QualName'.")
    module_name, qualname = tag.split(":", 1)
    module = sys.modules.get(module_name)
    if module is None and (module_name == "eqzoo" or module_name.startswith("eqzoo.")):
        module = importlib.import_module(module_name)
    if module is None:
        raise CheckpointError(
            f"the checkpoint's config is a {tag}, but module {module_name!r} is not imported; "
            "import it before restoring (checkpoints never import modules themselves)."
        )
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise CheckpointError(f"the checkpoint's config type {tag} is not a dataclass in module {module_name!r}.")
    return obj


def decode_config(data: Any) -> Any:
    """`config_from_dict`, but warn and return the raw dict if the class cannot be rebuilt."""
    try:
        return config_from_dict(data)
    except (CheckpointError, TypeError, ValueError) as err:
        warnings.warn(f"could not rebuild the checkpoint's config ({err}); returning its dict form.", stacklevel=user_stacklevel())
        return data
