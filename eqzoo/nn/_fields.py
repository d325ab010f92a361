"""A copy of a module with some fields replaced, static ones included, without running `__init__`."""

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def with_fields(module: T, **changes: Any) -> T:
    """`module` with the fields in `changes` replaced (an `equinox.Module` is a frozen dataclass
    whose `__init__` takes other arguments, so `dataclasses.replace` cannot rebuild it)."""
    new = object.__new__(type(module))
    for field in dataclasses.fields(module):  # type: ignore[arg-type]
        object.__setattr__(new, field.name, changes.get(field.name, getattr(module, field.name)))
    return new
