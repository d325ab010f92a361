"""Exception types raised by eqzoo, and helpers that write their messages."""

import importlib
from types import ModuleType
from typing import no_type_check


class EqzooError(Exception):
    """Base class of every error eqzoo raises on purpose."""


class ConfigError(EqzooError, ValueError):
    """A configuration is invalid (for example heads that do not divide the width)."""


class ShapeError(EqzooError, ValueError):
    """An array has the wrong shape or dtype for the layer or model it was given to."""


class MissingDependencyError(EqzooError, ImportError):
    """An optional dependency of an eqzoo extra is not installed."""


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise `MissingDependencyError` naming the extra that provides it.

    **Arguments:**

    - `module`: the module to import, e.g. `"numpyro"`.
    - `extra`: the eqzoo extra that installs it, e.g. `"bayes"`.

    **Returns:** the imported module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{module!r} is not installed; it is needed by eqzoo's {extra!r} extra. "
            f"Install it with `pip install 'eqzoo[{extra}]'`."
        ) from err


def as_flag(value) -> bool | None:
    """`value` as a Python `bool` when it is one or a NumPy bool (`np.True_`, which NumPy
    comparisons and a boolean array's items give); `None` for anything else (`1`, `"yes"`, an
    array), which the caller refuses with a message of its own. Callers store the returned
    `bool`, so that a NumPy bool does not reach a static field or a JSON record."""
    import numpy as np

    return bool(value) if isinstance(value, bool | np.bool_) else None


def holds_deleted(tree) -> bool:
    """Whether `tree` holds a concrete JAX array whose buffer is gone (donated to a train step,
    or deleted); tracers have no buffer to ask about. For error paths: it walks every leaf."""
    import jax

    return any(
        isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and a.is_deleted() for a in jax.tree.leaves(tree)
    )


def int_hint(value) -> str:
    """What to say after "must be an integer, got ..." when `value` holds one but is an array:
    a JAX scalar such as `jnp.int32(3)` (or a 0-d NumPy array) is refused where eqzoo needs a
    Python int, and its repr alone reads like an integer. Empty for anything else."""
    import jax
    import numpy as np

    if isinstance(value, jax.core.Tracer):
        return (
            " It is traced (inside jax.jit or another transformation), but it sets a size that must be known "
            "before tracing: pass it as a Python int from outside, e.g. as a static argument."
        )
    if (isinstance(value, jax.Array | np.ndarray) and value.shape == () and isinstance(value.dtype, np.dtype)
            and np.issubdtype(value.dtype, np.integer)):  # a typed PRNG key's dtype is no NumPy dtype
        kind = "a NumPy" if isinstance(value, np.ndarray) else "a JAX"
        return f" That is {kind} array, not a Python int: pass int(x)."
    return ""


def check_sizes(who: str, **sizes) -> None:
    """Raise `ConfigError` naming the first size that is not a positive integer (a bool, a
    float, zero or a negative number would fail later, deep inside JAX)."""
    import numbers

    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"{who}: {name} must be a positive integer; got {name}={value!r}.{int_hint(value)}")


def not_positive(value) -> bool:
    """Whether `value` is not a finite positive real number: a Python number (not a bool) or a
    concrete scalar array of a real dtype. A traced scalar passes (its value is unknown)."""
    import math
    import numbers

    import jax
    import numpy as np

    if isinstance(value, jax.core.Tracer):
        return value.shape != ()
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        real = np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)
        if value.shape != () or not real:
            return True
        value = value.item()
    return isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0)


def check_positive_numbers(who: str, **values) -> None:
    """Raise `ConfigError` naming the first value that is not a finite positive number (a rotary
    base of 0 makes NaN, for one). Concrete scalar arrays are read; traced ones pass."""
    for name, value in values.items():
        if not_positive(value):
            raise ConfigError(f"{who}: {name} must be a positive number; got {name}={value!r}.")


def check_positive(who: str, **values) -> None:
    """Raise `ConfigError` naming every value that is not a finite positive number (for config
    dataclasses, where several fields may be wrong at once)."""
    bad = {k: v for k, v in values.items() if not_positive(v)}
    if bad:
        raise ConfigError(f"{who}: these must be positive, got {bad}.")


def check_floating(who: str, x, what: str = "inputs", fix: str = "") -> None:
    """Raise `ShapeError` unless `x` is an array (JAX or NumPy) of a floating dtype: integer
    pixels, features or states would be cast as they are, silently. `fix` ends the message."""
    import jax.numpy as jnp

    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise ShapeError(f"{who} takes {what} as a JAX or NumPy array; got {type(x).__name__}.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ShapeError(f"{who} takes floating-point {what}; got dtype {jnp.dtype(dtype).name}." + (f" {fix}" if fix else ""))


def check_last_axis(who: str, x, size: int) -> None:
    """Raise `ShapeError` unless `x` is a floating-point array whose last axis has `size`
    entries (a size-1 axis would broadcast silently; integers would be cast)."""
    check_floating(who, x)
    if x.ndim == 0 or x.shape[-1] != size:
        raise ShapeError(f"{who} takes inputs whose last axis has {size} entries; got shape {shape_str(x.shape)}.")


def shape_str(shape: tuple[int, ...]) -> str:
    """Format a shape the way error messages show it: `(8, 128)`."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


@no_type_check  # a type-checking wrapper would add frames of its own
def user_stacklevel() -> int:
    """The `stacklevel` for `warnings.warn` that points at the first frame outside eqzoo (and
    outside the type-checking wrappers jaxtyping and beartype put around its functions, and the
    equinox and JAX machinery that builds modules and traces functions in between)."""
    import sys

    skip = ("eqzoo", "jaxtyping", "beartype", "equinox", "jax")
    frame, level = sys._getframe(1), 1  # the caller of this function is level 1
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] not in skip:
            return level
        frame, level = frame.f_back, level + 1
    return level
