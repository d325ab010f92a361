"""Neural ordinary differential equations as an Equinox layer.

Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018.
"""

from collections.abc import Callable
from typing import Any, Literal, no_type_check

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree, Real

from .._errors import ConfigError, ShapeError, check_floating, shape_str
from ._errors import VectorFieldError, check_start, check_times
from ._solve import (
    AdjointLike,
    default_solver,
    diffeqsolve,
    resolve_adjoint,
    solved_states,
    validate_config,
)

_CAST = "jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), y0)"


class Autonomous(eqx.Module):
    """Adapt a module of the state alone, `f(y)`, to the vector-field convention `f(t, y, args)`.

    eqzoo's differential-equation layers call their vector field as `f(t, y, args)`, like
    Diffrax. Most networks (for example `equinox.nn.MLP`) take only the state; wrap them:
    `NeuralODE(Autonomous(eqx.nn.MLP(2, 2, 64, 2, key=key)))`. The time and `args` are ignored,
    so the system is autonomous.

    **Arguments:**

    - `module`: any callable (usually an `eqx.Module`) mapping the state to its time derivative,
      of the same shape (for a pytree state: the same structure and shapes).
    """

    module: Callable[..., Any]

    def __call__(self, t: Any, y: Any, args: Any) -> Any:
        """Return `module(y)`; `t` and `args` are ignored."""
        del t, args
        return self.module(y)


def _is_array(x: Any) -> bool:
    return hasattr(x, "dtype") and hasattr(x, "shape")


def check_state(owner: str, y0: Any) -> Any:
    """The state must be one floating array, or a pytree of floating arrays of one dtype (which
    the times then take); returns that dtype."""
    if _is_array(y0):
        check_floating(owner, y0, "y0", "Convert with y0.astype(jnp.float32).")
        return y0.dtype
    leaves = jax.tree_util.tree_leaves_with_path(y0)
    if not leaves:
        raise ShapeError(
            f"{owner}: the state y0 holds no arrays; got {y0!r}. Pass the initial state as an "
            f"array, or as a pytree of arrays (e.g. {{'x': x0, 'v': v0}})."
        )
    for path, leaf in leaves:
        check_floating(owner, leaf, f"y0{jax.tree_util.keystr(path)}", f"Convert with {_CAST}.")
    dtypes = {jnp.dtype(leaf.dtype) for _, leaf in leaves}
    if len(dtypes) > 1:
        got = ", ".join(f"y0{jax.tree_util.keystr(p)}: {jnp.dtype(a.dtype).name}" for p, a in leaves)
        raise ShapeError(
            f"{owner}: the arrays of the state y0 must share one floating dtype; got {got}. "
            f"Diffrax would promote every leaf to the widest one (and the times take the state's "
            f"dtype). Cast them to one, e.g. {_CAST}."
        )
    return dtypes.pop()


def _state_str(y: Any) -> str:
    """'of shape (2,)' for an array; 'with leaves ['x'] (2,), ['v'] (2,)' for a pytree."""
    if _is_array(y):
        return f"of shape {shape_str(y.shape)}"
    leaves = jax.tree_util.tree_leaves_with_path(y)
    if not leaves:
        return f"{y!r} (no arrays)"
    return "with leaves " + ", ".join(
        f"{jax.tree_util.keystr(p)} {shape_str(a.shape) if _is_array(a) else type(a).__name__}"
        for p, a in leaves
    )


def check_vector_field(owner: str, vector_field: Any, t0: Any, y0: Any, args: Any) -> None:
    """At trace time: `vector_field(t0, y0, args)` must run and return the shape of `y0` (for a
    pytree state, its structure and the shape of every leaf)."""
    try:
        out = eqx.filter_eval_shape(vector_field, t0, y0, args)
    except (TypeError, ValueError) as err:  # a batched y0 fails as a ValueError (broadcasting)
        arity = "positional argument" in str(err) and not isinstance(vector_field, Autonomous)
        hint = (
            "If your module takes only the state, wrap it: eqzoo.sciml.Autonomous(module)."
            if arity else
            f"Check that the network takes the state y0 as it is, {_state_str(y0)} "
            "(one trajectory: batch several with jax.vmap over the solve, not by a leading axis "
            "on y0)."
        )
        raise VectorFieldError(
            f"{owner}: the vector field is called as f(t, y, args) (Diffrax's convention) and "
            f"that call failed with {type(err).__name__}: {err}. {hint}"
        ) from err
    if not _is_array(y0):
        same = jax.tree.structure(out) == jax.tree.structure(y0) and all(
            _is_array(o) and o.shape == y.shape
            for o, y in zip(jax.tree.leaves(out), jax.tree.leaves(y0), strict=True)
        )
        if not same:
            raise VectorFieldError(
                f"{owner}: the vector field must return dy/dt with the structure of the state "
                f"and the shape of each of its arrays; got state y0 {_state_str(y0)} and "
                f"f(t, y, args) {_state_str(out)}. Return one "
                f"derivative per array of the state, in the same container (e.g. "
                f"{{'x': v, 'v': acceleration}} for the state {{'x': x, 'v': v}})."
            )
        _check_derivative_dtype(owner, out, y0)
        return
    out_shape = getattr(out, "shape", None)
    if out_shape != jnp.shape(y0):
        got = shape_str(out_shape) if out_shape is not None else type(out).__name__
        raise VectorFieldError(
            f"{owner}: the vector field must return dy/dt with the shape of the state; got "
            f"state y0 of shape {shape_str(jnp.shape(y0))} and f(t, y, args) of shape {got}. "
            f"Make the network's output size equal to the state size (e.g. "
            f"eqx.nn.MLP(in_size={int(np.prod(jnp.shape(y0)))}, "
            f"out_size={int(np.prod(jnp.shape(y0)))}, ...))."
        )
    _check_derivative_dtype(owner, out, y0)


def _check_derivative_dtype(owner: str, out: Any, y0: Any) -> None:
    """A derivative wider than the state (float64 parameters on a float32 state, float32 ones on
    a bfloat16 state) failed deep inside Diffrax with "buffer.at[i].set(value) ... must have a
    dtype that can be promoted": each step is saved in the state's dtype."""
    state = jnp.dtype(jax.tree.leaves(y0)[0].dtype)
    wider = sorted(
        {jnp.dtype(o.dtype).name for o in jax.tree.leaves(out)
         if jnp.dtype(o.dtype) != state and jnp.issubdtype(o.dtype, jnp.inexact)
         and jnp.finfo(o.dtype).bits > jnp.finfo(state).bits}
    )
    if wider:
        want = wider[-1]
        cast = f"y0.astype(jnp.{want})" if _is_array(y0) else _CAST.replace("float32", want)
        raise VectorFieldError(
            f"{owner}: the vector field returns dy/dt in {', '.join(wider)} for a state y0 in "
            f"{state.name}; the solver keeps the state in its own dtype and cannot store the "
            f"wider steps (the vector field's parameters are probably {want}: a module built "
            f"with jax_enable_x64 on is float64). Make the two agree: pass y0 in {want} "
            f"({cast}), or build the vector field in {state.name} (e.g. eqx.nn.MLP(..., "
            f"dtype=jnp.{state.name}))."
        )


class NeuralODE(eqx.Module):
    """A neural ODE layer: solve `dy/dt = f(t, y, args)` from `y0` over the times `ts`.

    `f` is any Equinox module called as `f(t, y, args)` (wrap a state-only network in
    [`Autonomous`][eqzoo.sciml.Autonomous]). The state is one floating array or a pytree of
    floating arrays of one dtype (e.g. `{"x": x, "v": v}` for a second-order system), and `f`
    returns a derivative of the same structure. Integration runs from `ts[0]` to `ts[-1]` with
    Diffrax; the solver, step-size controller, initial step, step budget and adjoint (how
    gradients are computed) are configuration. Like every eqzoo layer it handles one example:
    batch with `jax.vmap(model, in_axes=(0, None))(y0s, ts)`.

    Errors: `TimeGridError` for unsorted or non-finite `ts` (values are checked when `ts` is
    concrete; traced times are checked at run time), `VectorFieldError` when `f` does not
    return the state's shape (or returns a wider dtype: float64 parameters on a float32
    state), `SolverError` when the solve stops early (e.g. `max_steps` reached, with a hint to
    use an implicit solver when an explicit adaptive solve ran out of steps, the usual sign of
    stiffness). Under `jax.jit`/`jax.vmap` the solver failure is
    raised at run time through `equinox.error_if` with the same message.

    **Arguments:**

    - `vector_field`: the module `f(t, y, args) -> dy/dt`.
    - `solver`: a Diffrax solver; default `diffrax.Tsit5()`. Use an implicit one such as
      `diffrax.Kvaerno5()` for stiff systems.
    - `stepsize_controller`: default `diffrax.PIDController(rtol=1e-3, atol=1e-6)`;
      `diffrax.ConstantStepSize()` needs `dt0`.
    - `adjoint`: `"recursive"` (default; `diffrax.RecursiveCheckpointAdjoint`, exact gradient of
      the discretised solve), `"backsolve"` (`diffrax.BacksolveAdjoint`, O(1) memory, solves
      the adjoint ODE backwards), `"direct"` (`diffrax.DirectAdjoint`, supports forward mode),
      or any `diffrax.AbstractAdjoint`.
    - `dt0`: initial step size; `None` lets an adaptive controller choose it.
    - `max_steps`: the most solver steps per solve (default 4096).
    - `output`: `"trajectory"` returns the state at every time of `ts`; `"final"` returns only
      the state at `ts[-1]`.
    - `throw`: `True` (default) raises the `SolverError` above when the solve stops early.
      `False` returns the states anyway, `inf` at every time the solver did not reach (the
      times before it stopped hold their states): what a sampler needs when some parameter
      draws make the system too stiff to solve. Under `eqzoo.bayes.run_nuts` the non-finite
      log density is then a rejected, divergent proposal, where the error stopped the whole
      run. With `output="final"` a failed solve returns `inf` (Diffrax itself would return the
      last state it reached, at an earlier time).
    """

    vector_field: Callable[..., Any]
    solver: diffrax.AbstractSolver
    stepsize_controller: diffrax.AbstractStepSizeController
    adjoint: diffrax.AbstractAdjoint
    dt0: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    output: Literal["trajectory", "final"] = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        vector_field: Callable[..., Any],
        *,
        solver: diffrax.AbstractSolver | None = None,
        stepsize_controller: diffrax.AbstractStepSizeController | None = None,
        adjoint: AdjointLike = "recursive",
        dt0: float | None = None,
        max_steps: int = 4096,
        output: Literal["trajectory", "final"] = "trajectory",
        throw: bool = True,
    ):
        solver, stepsize_controller = default_solver(solver, stepsize_controller)
        validate_config("NeuralODE", solver, stepsize_controller, dt0, max_steps, throw)
        if output not in ("trajectory", "final"):
            raise ConfigError(
                f"NeuralODE: output must be 'trajectory' or 'final'; got output={output!r}."
            )
        if not callable(vector_field):
            raise ConfigError(
                f"NeuralODE: vector_field must be callable as f(t, y, args); got "
                f"{type(vector_field).__name__}."
            )
        self.vector_field = vector_field
        self.solver = solver
        self.stepsize_controller = stepsize_controller
        self.adjoint = resolve_adjoint(adjoint)
        self.dt0 = None if dt0 is None else float(dt0)
        self.max_steps = max_steps
        self.output = output
        self.throw = bool(throw)  # a NumPy bool too (validated above)

    @no_type_check  # checked below with messages that say how to fix the call
    def solve(
        self,
        y0: Float[Array, "*state"] | PyTree[Float[Array, "..."]],
        ts: Real[Array | np.ndarray, " times"],
        args: Any = None,
        *,
        t0: Real[Array | np.ndarray, ""] | float | None = None,
    ) -> diffrax.Solution:
        """Solve without checking the outcome and return the whole `diffrax.Solution`.

        Use it to inspect `sol.result` and `sol.stats` (step counts) yourself; `__call__` is
        this plus the checks that turn a failed solve into an error.

        **Arguments:** as for `__call__`.

        **Returns:** the `diffrax.Solution` (`sol.ys` has shape `(times, *state)` when `output`
        is `"trajectory"`, `(1, *state)` when it is `"final"`; for a pytree state, each of its
        arrays gets that leading axis). On a failed solve `sol.ys` is Diffrax's own: `inf` at
        the times not reached, and for `"final"` the last state reached.
        """
        dtype = check_state("NeuralODE", y0)
        ts = check_times(ts, min_points=2 if t0 is None else 1)
        if t0 is not None:
            ts = check_start(t0, ts)
            t0 = jnp.asarray(t0, dtype=dtype)
        ts = jnp.asarray(ts, dtype=dtype)
        check_vector_field("NeuralODE", self.vector_field, ts[0] if t0 is None else t0, y0, args)
        return diffeqsolve(
            diffrax.ODETerm(self.vector_field),
            self.solver,
            ts,
            y0,
            args,
            save_ts=self.output == "trajectory",
            stepsize_controller=self.stepsize_controller,
            adjoint=self.adjoint,
            dt0=self.dt0,
            max_steps=self.max_steps,
            t0=t0,
            owner="NeuralODE",
        )

    @no_type_check  # checked below with messages that say how to fix the call
    def __call__(
        self,
        y0: Float[Array, "*state"] | PyTree[Float[Array, "..."]],
        ts: Real[Array | np.ndarray, " times"],
        args: Any = None,
        *,
        t0: Real[Array | np.ndarray, ""] | float | None = None,
        key: Any = None,
    ) -> (
        Float[Array, " times *state"]
        | Float[Array, "*state"]
        | PyTree[Float[Array, "..."]]
    ):
        """Integrate from `y0` at `ts[0]` to `ts[-1]`.

        **Arguments:**

        - `y0`: the initial state of one example: a floating array of any shape, or a pytree
          (dict, tuple, ...) of floating arrays of one dtype.
        - `ts`: strictly increasing, finite times, at least two (one when `t0` is given);
          integration starts at `ts[0]` (or at `t0`) and ends at `ts[-1]`.
        - `args`: passed to the vector field unchanged.
        - `t0`: the time of `y0` when it is earlier than `ts[0]` (then the first saved state is
          already evolved); default `ts[0]`.
        - `key`: unused (the solve is deterministic); accepted for a uniform layer interface.

        **Returns:** the states at every time of `ts`, shape `(times, *state)`, when `output` is
        `"trajectory"`; the state at `ts[-1]`, shape `state`, when it is `"final"`. A pytree
        state gives the same pytree, each array with that shape. With `throw=False`, a failed
        solve gives `inf` at the times it did not reach.
        """
        del key
        sol = self.solve(y0, ts, args, t0=t0)
        ys, _ = solved_states(sol, "NeuralODE", self, save_ts=self.output == "trajectory")
        return ys if self.output == "trajectory" else jax.tree.map(lambda y: y[0], ys)
