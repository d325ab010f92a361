"""Shared plumbing: resolve solver configuration, call `diffrax.diffeqsolve`, explain failures."""

import numbers
from typing import Any, Literal, TypeAlias

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ConfigError, as_flag, int_hint
from ._errors import SolverError, is_traced

AdjointLike: TypeAlias = diffrax.AbstractAdjoint | Literal["recursive", "backsolve", "direct"]
"""An adjoint object, or one of the names `"recursive"`, `"backsolve"`, `"direct"`."""

_ADJOINTS = {
    "recursive": diffrax.RecursiveCheckpointAdjoint,
    "backsolve": diffrax.BacksolveAdjoint,
    "direct": diffrax.DirectAdjoint,
}


def resolve_adjoint(adjoint: Any) -> diffrax.AbstractAdjoint:
    """Turn an adjoint name into the Diffrax object; pass adjoint objects through."""
    if isinstance(adjoint, diffrax.AbstractAdjoint):
        return adjoint
    if isinstance(adjoint, str) and adjoint in _ADJOINTS:
        return _ADJOINTS[adjoint]()
    raise ConfigError(
        f"adjoint must be one of {sorted(_ADJOINTS)} or a diffrax.AbstractAdjoint; got "
        f"{adjoint!r}. Use 'recursive' (exact gradients, memory O(log steps)), 'backsolve' "
        f"(memory O(1), approximate gradients) or 'direct' (needed for forward-mode autodiff)."
    )


def default_solver(solver: Any, stepsize_controller: Any) -> tuple[Any, Any]:
    """The solver and controller of every layer when not given: `Tsit5` with
    `PIDController(rtol=1e-3, atol=1e-6)`."""
    solver = diffrax.Tsit5() if solver is None else solver
    if stepsize_controller is None:
        stepsize_controller = diffrax.PIDController(rtol=1e-3, atol=1e-6)
    return solver, stepsize_controller


def validate_config(
    owner: str,
    solver: Any,
    stepsize_controller: Any,
    dt0: float | None,
    max_steps: int,
    throw: bool,
    *,
    step_arg: str = "dt0=<step>",
    adaptive_default: bool = True,
) -> None:
    """Check the solver configuration of a layer at construction time. `step_arg` is how the
    caller sets a constant step (`sample_ode` takes `steps=`, the layers `dt0=`);
    `adaptive_default` whether the caller's default controller is eqzoo's PIDController."""
    if as_flag(throw) is None:
        raise ConfigError(
            f"{owner}: throw must be True or False; got throw={throw!r}. True raises "
            f"SolverError when the solve stops early; False returns inf wherever the solve did "
            f"not reach (for samplers)."
        )
    if not isinstance(solver, diffrax.AbstractSolver):
        raise ConfigError(
            f"{owner}: solver must be a diffrax solver such as diffrax.Tsit5() or "
            f"diffrax.Kvaerno5(); got {solver!r}."
        )
    if not isinstance(stepsize_controller, diffrax.AbstractStepSizeController):
        raise ConfigError(
            f"{owner}: stepsize_controller must be a diffrax step-size controller such as "
            f"diffrax.PIDController(rtol=1e-3, atol=1e-6); got {stepsize_controller!r}."
        )
    if _is_adaptive(stepsize_controller) and not isinstance(solver, diffrax.AbstractAdaptiveSolver):
        # Diffrax refused it only when the layer was first called, with a RuntimeError that
        # named neither the layer nor the fix; the adaptive controller is usually eqzoo's default
        sname = type(solver).__name__
        raise ConfigError(
            f"{owner}: the solver {sname} has no error estimate, so the adaptive step-size "
            f"controller {type(stepsize_controller).__name__}"
            + (" (a PIDController is the default when stepsize_controller is not given)" if adaptive_default else "")
            + f" cannot choose its steps. Take constant steps: "
            f"{owner}(..., solver=diffrax.{sname}(), stepsize_controller="
            f"diffrax.ConstantStepSize(), {step_arg}), or use a solver with an error estimate "
            f"(diffrax.Heun(), diffrax.Tsit5())."
        )
    if _is_implicit(solver) and not _is_adaptive(stepsize_controller) and _tolerances_from_controller(solver):
        # Diffrax refused it at the first call, with a ValueError about diffeqsolve's arguments
        sname = type(solver).__name__
        raise ConfigError(
            f"{owner}: the implicit solver {sname} takes the tolerances of its nonlinear solve "
            f"from an adaptive step-size controller, and {type(stepsize_controller).__name__} "
            f"has none. Pass one: {owner}(..., solver=diffrax.{sname}(), stepsize_controller="
            f"diffrax.PIDController(rtol=1e-3, atol=1e-6)), or give the solver its own, e.g. "
            f"diffrax.{sname}(root_finder=diffrax.VeryChord(rtol=1e-3, atol=1e-6))."
        )
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ConfigError(f"{owner}: max_steps must be a positive int; got {max_steps!r}.")
    if dt0 is not None and not dt0 > 0:
        raise ConfigError(f"{owner}: dt0 must be positive or None; got dt0={dt0!r}.")
    if dt0 is None and isinstance(stepsize_controller, diffrax.ConstantStepSize):
        raise ConfigError(
            f"{owner}: a constant step size needs an initial step; got dt0=None with "
            f"diffrax.ConstantStepSize(). Pass dt0=<step>, or use an adaptive controller such "
            f"as diffrax.PIDController(rtol=1e-3, atol=1e-6), which picks its first step itself."
        )


def check_layer_sizes(owner: str, depth: Any, **sizes: Any) -> None:
    """Sizes must be integers >= 1 and `depth` an integer >= 0: a float size (or a negative
    depth) failed inside Equinox's layers, with a message that named neither."""
    for name, value, least in [*((n, v, 1) for n, v in sizes.items()), ("depth", depth, 0)]:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(
                f"{owner}: {name} must be an integer >= {least}; got {name}={value!r}."
                f"{int_hint(value)}"
            )
        if value < least:
            raise ConfigError(f"{owner}: {name} must be >= {least}; got {name}={value}.")


def _is_adaptive(controller: Any) -> bool:
    return isinstance(controller, diffrax.AbstractAdaptiveStepSizeController)


def _is_implicit(solver: Any) -> bool:
    return isinstance(solver, diffrax.AbstractImplicitSolver)


def _tolerances_from_controller(solver: Any) -> bool:
    """Whether an implicit solver's root finder reads rtol/atol/norm from the controller (Diffrax's
    default), which a constant step size cannot give."""
    try:
        from diffrax._root_finder import use_stepsize_tol
    except ImportError:  # another Diffrax layout: leave the check to Diffrax
        return False
    finder = getattr(solver, "root_finder", None)
    return any(getattr(finder, name, None) is use_stepsize_tol for name in ("rtol", "atol", "norm"))


def _low_precision(dtype: Any) -> bool:
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits <= 32


def failure_messages(
    owner: str,
    solver: Any,
    controller: Any,
    dt0: float | str | None,  # or the caller's words for its step
    max_steps: int,
    dtype: Any = None,
    *,
    larger_step: str = "pass a larger dt0",
    inspect: str = "Call .solve(...) on the layer to get the diffrax.Solution and inspect "
    "sol.result and sol.stats",
) -> tuple[str, str, str]:
    """Messages for (max steps reached, minimum step reached, other failure); `dtype` is the
    solve's state dtype (an implicit adaptive solve in float32 gets its own advice).
    `larger_step` and `inspect` are the caller's advice for fewer constant steps and for
    looking at a failed solve."""
    sname = type(solver).__name__
    cname = type(controller).__name__
    head = f"{owner}: the solver stopped before the final time: max_steps={max_steps} was reached"
    raise_it = f"raise the limit with {owner}(..., max_steps={4 * max_steps})"
    if not _is_adaptive(controller):
        steps = head + (
            f" with the constant step dt0={dt0} of {cname}. A constant step needs "
            f"(t1 - t0) / dt0 steps: {raise_it}, or {larger_step}."
        )
    elif _is_implicit(solver) and _low_precision(dtype):
        # Measured: Kvaerno5 on dy/dt = -0.7 y in float32 rejected 4091 of 4096 steps at
        # rtol=1e-4 (Diffrax alone does the same), so "raise max_steps" was the wrong advice.
        steps = head + (
            f" with the implicit solver {sname} and the adaptive controller {cname} on a "
            f"{jnp.dtype(dtype).name} state. In {jnp.dtype(dtype).name} an implicit solver's "
            f"nonlinear solve stalls at tolerances below about rtol=1e-3 (it rejects step after "
            f"step, and more steps do not help): solve in float64 (jax.config.update("
            f"'jax_enable_x64', True), a float64 state and vector field), or loosen the "
            f"controller to rtol=1e-3; if the rejected steps are few, {raise_it}."
        )
    elif _is_implicit(solver):
        steps = head + (
            f" with the implicit solver {sname} and the adaptive controller {cname}. Either "
            f"{raise_it}, or loosen rtol/atol of the controller; check that the vector field "
            f"does not blow up (a finite-time singularity stops every solver)."
        )
    else:
        steps = head + (
            f" with the explicit solver {sname} and the adaptive controller {cname}: the "
            f"accepted steps stayed tiny, which usually means the system is stiff. Use an "
            f"implicit solver, e.g. {owner}(..., solver=diffrax.Kvaerno5()) (keep the adaptive "
            f"controller; implicit solvers converge best in float64), or {raise_it}."
        )
    dt_min = (
        f"{owner}: the solver stopped because the step size reached the controller's dtmin. "
        f"The solution is probably singular or the system very stiff: try an implicit solver "
        f"such as diffrax.Kvaerno5(), or lower dtmin in {cname}."
    )
    other = (
        f"{owner}: the solver {sname} failed (for an implicit solver: its nonlinear solve "
        f"diverged). {inspect}; try a smaller step or tighter tolerances."
    )
    return steps, dt_min, other


def _succeeded(result):
    return (result == diffrax.RESULTS.successful) | (result == diffrax.RESULTS.event_occurred)


def check_result(ys, sol: diffrax.Solution, messages: tuple[str, str, str]):
    """Raise (eagerly) or attach a runtime error (traced) when `sol` did not succeed."""
    result = sol.result
    ok = _succeeded(result)
    if not is_traced(ok):
        if bool(ok):
            return ys
        index = (
            0
            if result == diffrax.RESULTS.max_steps_reached
            else (1 if result == diffrax.RESULTS.dt_min_reached else 2)
        )
        stats = {k: np.asarray(v).item() for k, v in sol.stats.items() if np.size(v) == 1}
        raise SolverError(
            f"{messages[index]} (diffrax result: {diffrax.RESULTS[result]}; stats: {stats})"
        )
    # Under jax.vmap equinox shows the message of the largest index in the batch: a solve that
    # succeeded must have the smallest, or its "other failure" hid another element's max_steps.
    index = jnp.where(
        ok,
        0,
        jnp.where(
            result == diffrax.RESULTS.max_steps_reached,
            1,
            jnp.where(result == diffrax.RESULTS.dt_min_reached, 2, 3),
        ),
    )
    return eqx.branched_error_if(ys, ~ok, index, ["(succeeded)", *messages])


def _fill(tree: Any, reached: Any, value: float) -> Any:
    """Every leaf of `tree` with the entries whose leading axes are not `reached` set to
    `value`; `reached` is a boolean array of those leading axes."""

    def fill(leaf):
        mask = reached.reshape(reached.shape + (1,) * (jnp.ndim(leaf) - reached.ndim))
        return jnp.where(mask, leaf, value)

    return jax.tree.map(fill, tree)


def unless_failed(tree: Any, sol: diffrax.Solution) -> Any:
    """`tree` (computed from a solve saved at `t1` only), every entry `inf` if the solve failed:
    what `throw=False` returns."""
    return _fill(tree, _succeeded(sol.result), jnp.inf)


def solved_states(sol: diffrax.Solution, owner: str, layer: Any, *, save_ts: bool):
    """The saved states `sol.ys` of a layer's solve, and which saved rows the solve reached.

    `layer` holds the configuration (`solver`, `stepsize_controller`, `dt0`, `max_steps`,
    `throw`) that the failure message names. With `layer.throw`, a failed solve raises
    `SolverError` (eagerly, or through `equinox.error_if` when traced) and `reached` is `None`.
    Without, every row the solve did not reach is `inf` in every leaf, and `reached` is a
    boolean array with one entry per saved row (shape `(1,)` for `save_ts=False`).
    """
    if layer.throw:
        dtype = jax.tree.leaves(sol.ys)[0].dtype
        messages = failure_messages(
            owner, layer.solver, layer.stepsize_controller, layer.dt0, layer.max_steps, dtype
        )
        return check_result(sol.ys, sol, messages), None
    if save_ts:
        reached = jnp.isfinite(sol.ts)  # Diffrax leaves the times it did not reach at inf
    else:
        # SaveAt(t1=True) holds the last state reached, at the time the solve stopped: a
        # finite value that is not the state at t1
        reached = jnp.reshape(_succeeded(sol.result), (1,))
    return _fill(sol.ys, reached, jnp.inf), reached


def apply_reached(fn: Any, states: Any, reached: Any) -> Any:
    """`fn(states)`, with the outputs of the rows the solve did not reach set to `inf`.

    `reached` is `None` (every row was reached) or a boolean array of the leading axes that
    `states` and `fn`'s output share (`()` for one state). `fn` sees 0 in the unreached rows,
    not inf: the backward pass of a matrix product multiplies the (zero) cotangent of those
    rows by the states, and 0 * inf is NaN in the gradients of `fn`'s parameters.
    """
    if reached is None:
        return fn(states)
    return _fill(fn(_fill(states, reached, 0.0)), reached, jnp.inf)


def diffeqsolve(
    terms: Any,
    solver: Any,
    ts: Any,
    y0: Any,
    args: Any,
    *,
    save_ts: bool,
    stepsize_controller: Any,
    adjoint: Any,
    dt0: float | jax.Array | None,  # sample_ode's is traced
    max_steps: int,
    t0: Any = None,
    t1: Any = None,
    owner: str = "the solve",
) -> diffrax.Solution:
    """`diffrax.diffeqsolve` from `t0` (default `ts[0]`) to `t1` (default `ts[-1]`), saving at
    `ts` or at the end.

    Never throws on a failed solve: the caller checks `sol.result` (see `check_result`). Raises
    `ConfigError` when forward-mode autodiff reaches an adjoint that only has a reverse rule.
    """
    saveat = diffrax.SaveAt(ts=ts) if save_ts else diffrax.SaveAt(t1=True)
    try:
        return diffrax.diffeqsolve(
            terms,
            solver,
            ts[0] if t0 is None else t0,
            ts[-1] if t1 is None else t1,
            dt0,
            y0,
            args,
            saveat=saveat,
            stepsize_controller=stepsize_controller,
            adjoint=adjoint,
            max_steps=max_steps,
            throw=False,
        )
    except ValueError as err:
        # Diffrax's TermAndSolverIncompatible (not exported) printed the term's and the solver's
        # type structures and named neither the layer nor a solver that fits.
        if type(err).__name__ != "TermAndSolverIncompatible":
            raise
        raise ConfigError(
            f"{owner}: the solver {type(solver).__name__} does not solve this equation: it is "
            f"a solver for SDEs or for split (several-term) systems, and this solve has one "
            f"term, {type(terms).__name__}. Use an ODE solver such as diffrax.Tsit5(), "
            f"diffrax.Heun() or, for stiff problems, diffrax.Kvaerno5()."
        ) from err
    except TypeError as err:
        # JAX's own message names neither the solve nor the fix. Trace time only: the reverse
        # path compiles to the same program. (Under `jax.jacfwd(jax.jit(f))` the JVP runs on
        # the traced program after this call returns, and JAX's message comes through as is.)
        if "forward-mode" not in str(err) or isinstance(adjoint, diffrax.DirectAdjoint):
            raise
        raise ConfigError(
            f"{owner}: forward-mode autodiff (jax.jvp, jax.jacfwd, jax.hessian) cannot go "
            f"through adjoint={type(adjoint).__name__}(), whose gradient is a reverse-mode-only "
            f"custom_vjp. Build the layer with adjoint=\"direct\" "
            f"(diffrax.DirectAdjoint), which supports forward and reverse mode (it costs more "
            f"memory and compile time)."
        ) from err
