"""Reading traced programs: whether a jaxpr holds a primitive, sub-programs included."""

from collections.abc import Collection
from typing import Any


def holds_primitive(jaxpr: Any, names: Collection[str], *, skip: Collection[str] = ()) -> bool:
    """Whether `jaxpr` (a `Jaxpr`) or one of its sub-programs (the `Jaxpr`s and `ClosedJaxpr`s
    in its equations' parameters) holds an equation whose primitive is named in `names`; the
    sub-programs of primitives named in `skip` are not looked into."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            return True
        if eqn.primitive.name in skip:
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns") and holds_primitive(inner, names, skip=skip):
                    return True
    return False
