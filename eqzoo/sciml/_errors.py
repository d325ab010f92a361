"""Errors raised by `eqzoo.sciml`, and the trace-time checks that raise them."""

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ConfigError, EqzooError, ShapeError, shape_str


class TimeGridError(EqzooError, ValueError):
    """Time points are not usable by a differential equation solver.

    Raised when the times are not a 1-d array of at least two points, are not strictly
    increasing, or hold NaN/inf. The value checks need concrete values: they run when the
    times are a NumPy or JAX array outside `jax.jit` (also inside `jax.vmap` when the times are
    not batched). When the times are traced, the same rule is checked at run time with
    `equinox.error_if` and the message is the same, raised as an `equinox.EquinoxRuntimeError`.
    """


class VectorFieldError(ShapeError):
    """A vector field cannot be called as `f(t, y, args)` or returns the wrong shape."""


class SolverError(EqzooError, RuntimeError):
    """The differential equation solver stopped before reaching the final time.

    Raised when a solve run outside `jax.jit`/`jax.vmap` fails, for example because
    `max_steps` was reached. Inside a transformation the same message is raised through
    `equinox.error_if` (an `equinox.EquinoxRuntimeError`). A layer built with `throw=False`
    (`NeuralODE`, `NeuralCDE`, `LatentODE`) raises neither: it returns `inf` at the times the
    solve did not reach.
    """


def is_traced(x) -> bool:
    """Whether `x` is a tracer (inside `jax.jit`, `jax.vmap`, `jax.grad`, ...)."""
    return isinstance(x, jax.core.Tracer)


def check_length(owner: str, length, times: int, *, name: str = "length", example: str = ""):
    """A number of valid rows `length` in `[1, times]`: returned as a Python int when concrete,
    as a default-int array wrapped in a run-time check when traced (one compile for every
    length). `example` shows the batched call in the error for a non-scalar `length`."""
    rule = (
        f"{owner}: {name} must be one integer, the number of valid rows of the series, "
        f"with 1 <= {name} <= times={times}"
    )
    if isinstance(length, bool) or not (
        isinstance(length, int) or jnp.issubdtype(jnp.result_type(length), jnp.integer)
    ) or jnp.shape(length) != ():
        shape = shape_str(jnp.shape(length))
        raise ConfigError(
            f"{rule}; got {type(length).__name__} of shape {shape}. For a batch of padded "
            f"series, map over an integer array of lengths{': ' + example if example else ''}."
        )
    if not is_traced(length):
        value = int(length)
        if not 1 <= value <= times:
            raise ConfigError(f"{rule}; got {name}={value}.")
        return value
    import equinox as eqx

    length = jnp.asarray(length).astype(jax.dtypes.canonicalize_dtype(jnp.int_))
    return eqx.error_if(
        length, (length < 1) | (length > times), f"{rule} (checked at run time: traced)."
    )


def check_times(ts, name: str = "ts", *, min_points: int = 2, length=None):
    """Check a grid of time points; returns `ts` (possibly wrapped by a runtime check).

    `min_points` is 2 where the grid itself sets the interval (`ts[0]` to `ts[-1]`) and 1 where
    the start time is given separately. Shape is always checked at trace time. Order and finiteness are checked on concrete values
    when `ts` is concrete, and with `equinox.error_if` when it is traced. With `length` (an
    integer, possibly traced, already checked to be in range) only `ts[:length]` is checked:
    the rest is padding.
    """
    shape = tuple(jnp.shape(ts))
    if len(shape) != 1 or shape[0] < min_points:
        raise TimeGridError(
            f"{name} must be a 1-d array of at least {min_points} strictly increasing time "
            f"point{'s' if min_points > 1 else ''}; got "
            f"shape {shape_str(shape)}. eqzoo sciml layers take one example: for a batch, wrap "
            f"the call in jax.vmap (with in_axes=None for times shared by every example)."
        )
    dtype = ts.dtype if hasattr(ts, "dtype") else np.asarray(ts).dtype
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TimeGridError(f"{name} must hold real numbers (integers or floats); got dtype {jnp.dtype(dtype).name}.")
    rule = f"{name} must be finite and strictly increasing"
    if length is not None:
        rule += f" up to {name}[length - 1]"
    if not (is_traced(ts) or is_traced(length)):
        values = np.asarray(ts)[: None if length is None else int(length)]
        bad = ~np.isfinite(values)
        if bad.any():
            raise TimeGridError(
                f"{rule}; got non-finite values {values[bad][:5].tolist()} at indices "
                f"{np.nonzero(bad)[0][:5].tolist()}. Drop or impute those observations "
                f"before the call (solvers cannot step to NaN/inf times)."
            )
        steps = np.diff(values)
        if (steps <= 0).any():
            i = int(np.nonzero(steps <= 0)[0][0])
            raise TimeGridError(
                f"{rule}; got {name}[{i}]={values[i].item()!r} followed by "
                f"{name}[{i + 1}]={values[i + 1].item()!r}. Sort the observations by time (e.g. "
                f"order = jnp.argsort(ts); ts, xs = ts[order], xs[order]) and merge duplicates."
            )
        return ts
    import equinox as eqx

    if length is None:
        ok = jnp.all(jnp.isfinite(ts)) & jnp.all(ts[1:] > ts[:-1])
    else:  # the padding past length - 1 may hold anything
        valid = jnp.arange(shape[0]) < length
        ok = jnp.all(jnp.isfinite(ts) | ~valid) & jnp.all((ts[1:] > ts[:-1]) | ~valid[1:])
    return eqx.error_if(
        ts,
        ~ok,
        f"{rule} (checked at run time because {name if length is None else name + ' or length'}"
        f" is traced). Sort the observations by "
        f"time and drop non-finite ones before the call.",
    )


def check_start(t0, ts, name: str = "ts"):
    """Check that the start time `t0` is finite and not after the first saving time; returns `ts`."""
    if jnp.shape(t0) != () or not jnp.issubdtype(jnp.result_type(t0), jnp.number):
        raise TimeGridError(
            f"t0 must be one time (a scalar); got shape {shape_str(jnp.shape(t0))} and dtype "
            f"{jnp.result_type(t0).name}. For a batch, wrap the call in jax.vmap."
        )
    rule = f"the start time t0 must not be after the first saving time {name}[0]"
    finite = "the start time t0 must be a finite number"
    if not (is_traced(t0) or is_traced(ts)):
        first, start = np.asarray(ts)[0].item(), np.asarray(t0).item()
        if not np.isfinite(start):  # NaN compares False both ways: not "after" ts[0]
            raise TimeGridError(
                f"{finite}; got t0={start!r}. Pass the time of the initial state (e.g. the first "
                f"observation time), or leave t0=None to start at {name}[0]."
            )
        if start > first:
            raise TimeGridError(
                f"{rule}; got t0={start!r} and {name}[0]={first!r}. Pass an earlier t0, or "
                f"leave t0=None to start at {name}[0]."
            )
        return ts
    import equinox as eqx

    traced = " (checked at run time: values are traced)."
    return eqx.branched_error_if(
        ts, ~(t0 <= ts[0]), jnp.where(jnp.isfinite(t0), 0, 1), [rule + traced, finite + traced]
    )


__all__ = ["TimeGridError", "VectorFieldError", "SolverError"]
