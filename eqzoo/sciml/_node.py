"""Neural ordinary differential equations as an Equinox layer.

Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018.
"""

from collections.abc import Callable
from typing import Any, Literal, no_type_check

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Real

from .._errors import ConfigError, check_floating, shape_str
from ._errors import VectorFieldError, check_start, check_times
from ._solve import (
    AdjointLike,
    check_result,
    diffeqsolve,
    failure_messages,
    resolve_adjoint,
    validate_config,
)


class Autonomous(eqx.Module):
    """Adapt a module of the state alone, `f(y)`, to the vector-field convention `f(t, y, args)`.

    eqzoo's differential-equation layers call their vector field as `f(t, y, args)`, like
    Diffrax. Most networks (for example `equinox.nn.MLP`) take only the state; wrap them:
    `NeuralODE(Autonomous(eqx.nn.MLP(2, 2, 64, 2, key=key)))`. The time and `args` are ignored,
    so the system is autonomous.

    **Arguments:**

    - `module`: any callable (usually an `eqx.Module`) mapping the state to its time derivative,
      of the same shape.
    """

    module: Callable[..., Any]

    def __call__(self, t: Any, y: Any, args: Any) -> Any:
        """Return `module(y)`; `t` and `args` are ignored."""
        del t, args
        return self.module(y)


def check_vector_field(owner: str, vector_field: Any, t0: Any, y0: Any, args: Any) -> None:
    """At trace time: `vector_field(t0, y0, args)` must run and return the shape of `y0`."""
    try:
        out = eqx.filter_eval_shape(vector_field, t0, y0, args)
    except (TypeError, ValueError) as err:  # a batched y0 fails as a ValueError (broadcasting)
        arity = "positional argument" in str(err) and not isinstance(vector_field, Autonomous)
        hint = (
            "If your module takes only the state, wrap it: eqzoo.sciml.Autonomous(module)."
            if arity else
            f"Check that the network takes the state y0 as it is, of shape {shape_str(jnp.shape(y0))} "
            "(one trajectory: batch several with jax.vmap over the solve, not by a leading axis "
            "on y0)."
        )
        raise VectorFieldError(
            f"{owner}: the vector field is called as f(t, y, args) (Diffrax's convention) and "
            f"that call failed with {type(err).__name__}: {err}. {hint}"
        ) from err
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


class NeuralODE(eqx.Module):
    """A neural ODE layer: solve `dy/dt = f(t, y, args)` from `y0` over the times `ts`.

    `f` is any Equinox module called as `f(t, y, args)` (wrap a state-only network in
    [`Autonomous`][eqzoo.sciml.Autonomous]). Integration runs from `ts[0]` to `ts[-1]` with
    Diffrax; the solver, step-size controller, initial step, step budget and adjoint (how
    gradients are computed) are configuration. Like every eqzoo layer it handles one example:
    batch with `jax.vmap(model, in_axes=(0, None))(y0s, ts)`.

    Errors: `TimeGridError` for unsorted or non-finite `ts` (values are checked when `ts` is
    concrete; traced times are checked at run time), `VectorFieldError` when `f` does not
    return the state's shape, `SolverError` when the solve stops early (e.g. `max_steps`
    reached, with a hint to use an implicit solver when an explicit adaptive solve ran out of
    steps, the usual sign of stiffness). Under `jax.jit`/`jax.vmap` the solver failure is
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
      `False` returns the states anyway, `inf` at every time the solver did not reach
      (Diffrax's `throw=False`): what a sampler needs when some parameter draws make the
      system too stiff to solve. Under `eqzoo.bayes.run_nuts` the non-finite log density is
      then a rejected, divergent proposal, where the error stopped the whole run.
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
        solver = diffrax.Tsit5() if solver is None else solver
        if stepsize_controller is None:
            stepsize_controller = diffrax.PIDController(rtol=1e-3, atol=1e-6)
        validate_config("NeuralODE", solver, stepsize_controller, dt0, max_steps)
        if output not in ("trajectory", "final"):
            raise ConfigError(
                f"NeuralODE: output must be 'trajectory' or 'final'; got output={output!r}."
            )
        if not isinstance(throw, bool):
            raise ConfigError(f"NeuralODE: throw must be True or False; got throw={throw!r}.")
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
        self.throw = throw

    @no_type_check  # checked below with messages that say how to fix the call
    def solve(
        self,
        y0: Float[Array, "*state"],
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
        is `"trajectory"`, `(1, *state)` when it is `"final"`).
        """
        check_floating("NeuralODE", y0, "y0", "Convert with y0.astype(jnp.float32).")
        ts = check_times(ts, min_points=2 if t0 is None else 1)
        if t0 is not None:
            ts = check_start(t0, ts)
            t0 = jnp.asarray(t0, dtype=y0.dtype)
        ts = jnp.asarray(ts, dtype=y0.dtype)
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
        y0: Float[Array, "*state"],
        ts: Real[Array | np.ndarray, " times"],
        args: Any = None,
        *,
        t0: Real[Array | np.ndarray, ""] | float | None = None,
        key: Any = None,
    ) -> Float[Array, " times *state"] | Float[Array, "*state"]:
        """Integrate from `y0` at `ts[0]` to `ts[-1]`.

        **Arguments:**

        - `y0`: the initial state of one example, any shape.
        - `ts`: strictly increasing, finite times, at least two (one when `t0` is given);
          integration starts at `ts[0]` (or at `t0`) and ends at `ts[-1]`.
        - `args`: passed to the vector field unchanged.
        - `t0`: the time of `y0` when it is earlier than `ts[0]` (then the first saved state is
          already evolved); default `ts[0]`.
        - `key`: unused (the solve is deterministic); accepted for a uniform layer interface.

        **Returns:** the states at every time of `ts`, shape `(times, *state)`, when `output` is
        `"trajectory"`; the state at `ts[-1]`, shape `state`, when it is `"final"`.
        """
        del key
        sol = self.solve(y0, ts, args, t0=t0)
        ys = sol.ys  # inf at the times a failed solve did not reach
        if self.throw:
            messages = failure_messages(
                "NeuralODE", self.solver, self.stepsize_controller, self.dt0, self.max_steps, sol.ys.dtype
            )
            ys = check_result(ys, sol, messages)
        return ys if self.output == "trajectory" else ys[0]
