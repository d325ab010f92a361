"""Neural controlled differential equations for irregularly sampled time series.

Kidger, Morrill, Foster, Lyons, "Neural Controlled Differential Equations for Irregular Time
Series", NeurIPS 2020. The control path is a Hermite cubic spline with backward differences
(Morrill, Kidger, Yang, Lyons, "Neural CDEs for Online Prediction Tasks", 2021).
"""

from typing import Literal, no_type_check

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Real

from .._errors import ConfigError, ShapeError, check_floating, shape_str
from .._typing import PRNGKey
from ._errors import check_length, check_times, is_traced
from ._solve import (
    AdjointLike,
    apply_reached,
    check_layer_sizes,
    default_solver,
    diffeqsolve,
    resolve_adjoint,
    solved_states,
    validate_config,
)

_PADDING = (
    "NeuralCDE: the last row of xs has no observed value, which looks like padding: padded "
    "rows would move the readout (the time channel keeps growing through them, and the "
    "readout is taken at ts[-1]). Pass length=<number of valid rows> (an integer array under "
    "jax.vmap, e.g. jax.vmap(lambda t, x, n: cde(t, x, length=n))(ts, xs, lengths)), or drop "
    "the rows that hold no observation."
)
_RUNTIME = " (Checked at run time because xs is traced.)"


class _CDEField(eqx.Module):
    """`f(t, z, args)` returning the `(hidden, channels)` matrix that multiplies `dX/dt`."""

    mlp: eqx.nn.MLP
    hidden_size: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    def __call__(self, t, z, args):
        del t, args
        return self.mlp(z).reshape(self.hidden_size, self.channels)


class NeuralCDE(eqx.Module):
    """A neural CDE: `dz = f(z) dX(t)` driven by an interpolation of irregular observations.

    The observations `(ts, xs)` of one series are turned into a continuous control path `X`
    (a Hermite cubic spline with backward differences, or a linear interpolation), optionally
    with time as an extra channel so the model sees the sampling times. The hidden state starts
    at `z(ts[0]) = initial(X(ts[0]))`, evolves by `dz/dt = f(z) dX/dt` with `f` an MLP whose
    output is reshaped to `(hidden, channels)`, and a linear readout maps `z` to the output.
    One series per call; every series in a `jax.vmap` batch must have the same number of
    rows (their times may differ): pad shorter series at the end and pass `length=`, the number
    of valid rows, so that the solve stops at the last valid time. `NaN` in `xs` marks a missing
    value (cubic interpolation fills it from its neighbours); the first row must be observed,
    and without `length` the last row must hold an observed value (an all-`NaN` last row is
    refused as padding).

    **Arguments:**

    - `in_channels`: channels of each observation (without the time channel).
    - `hidden_size`: size of the hidden state `z`.
    - `out_size`: size of the readout (for example the number of classes).
    - `width`, `depth`: width and number of hidden layers of the vector-field MLP.
    - `use_time_channel`: prepend `t` as a channel of the control path (recommended: without
      it the model cannot see how fast the series was sampled).
    - `interpolation`: `"cubic"` (smooth; adaptive solvers step efficiently) or `"linear"`
      (kinks at every observation, which the step-size controller is told about).
    - `output`: `"final"` returns the readout at the last valid time (`ts[-1]`, or
      `ts[length - 1]`); `"trajectory"` at every `ts`.
    - `solver`, `stepsize_controller`, `adjoint`, `dt0`, `max_steps`: as for
      [`NeuralODE`][eqzoo.sciml.NeuralODE].
    - `throw`: as for [`NeuralODE`][eqzoo.sciml.NeuralODE]: `True` (default) raises
      `SolverError` when the solve stops early (under `jax.jit`/`jax.vmap`, at run time through
      `equinox.error_if`); `False` returns anyway, with `inf` in every output value whose time
      the solve did not reach: the whole readout for `"final"`, the rows from there on for
      `"trajectory"` (the earlier rows hold their readouts). The readout sees zeros in
      place of the unreached states, so no NaN reaches the gradients.
    - `key`: PRNG key for the initial parameters.
    """

    initial: eqx.nn.Linear
    vector_field: _CDEField
    readout: eqx.nn.Linear
    solver: diffrax.AbstractSolver
    stepsize_controller: diffrax.AbstractStepSizeController
    adjoint: diffrax.AbstractAdjoint
    in_channels: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)
    use_time_channel: bool = eqx.field(static=True)
    interpolation: Literal["cubic", "linear"] = eqx.field(static=True)
    output: Literal["final", "trajectory"] = eqx.field(static=True)
    dt0: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        hidden_size: int,
        out_size: int,
        *,
        width: int = 64,
        depth: int = 2,
        use_time_channel: bool = True,
        interpolation: Literal["cubic", "linear"] = "cubic",
        output: Literal["final", "trajectory"] = "final",
        solver: diffrax.AbstractSolver | None = None,
        stepsize_controller: diffrax.AbstractStepSizeController | None = None,
        adjoint: AdjointLike = "recursive",
        dt0: float | None = None,
        max_steps: int = 4096,
        throw: bool = True,
        key: PRNGKey,
    ):
        check_layer_sizes(
            "NeuralCDE",
            depth,
            in_channels=in_channels,
            hidden_size=hidden_size,
            out_size=out_size,
            width=width,
        )
        if interpolation not in ("cubic", "linear"):
            raise ConfigError(
                f"NeuralCDE: interpolation must be 'cubic' or 'linear'; got {interpolation!r}."
            )
        if output not in ("final", "trajectory"):
            raise ConfigError(
                f"NeuralCDE: output must be 'final' or 'trajectory'; got output={output!r}."
            )
        solver, stepsize_controller = default_solver(solver, stepsize_controller)
        validate_config("NeuralCDE", solver, stepsize_controller, dt0, max_steps, throw)
        channels = in_channels + int(use_time_channel)
        k_init, k_field, k_out = jax.random.split(key, 3)
        self.initial = eqx.nn.Linear(channels, hidden_size, key=k_init)
        mlp = eqx.nn.MLP(
            hidden_size,
            hidden_size * channels,
            width,
            depth,
            activation=jax.nn.softplus,
            # tanh keeps the vector field bounded, so the solution cannot blow up.
            final_activation=jnp.tanh,
            key=k_field,
        )
        self.vector_field = _CDEField(mlp, hidden_size, channels)
        self.readout = eqx.nn.Linear(hidden_size, out_size, key=k_out)
        self.solver = solver
        self.stepsize_controller = stepsize_controller
        self.adjoint = resolve_adjoint(adjoint)
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.out_size = out_size
        self.use_time_channel = use_time_channel
        self.interpolation = interpolation
        self.output = output
        self.dt0 = None if dt0 is None else float(dt0)
        self.max_steps = max_steps
        self.throw = bool(throw)  # a NumPy bool too (validated above)

    def _check_length(self, length, times: int):
        """`length` as a Python int (concrete) or a default-int array (traced, checked at run time)."""
        return check_length(
            "NeuralCDE",
            length,
            times,
            example="jax.vmap(lambda t, x, n: cde(t, x, length=n))(ts, xs, lengths)",
        )

    def _check_inputs(self, ts, xs, length) -> None:
        check_floating("NeuralCDE", xs, "xs", "Convert with xs.astype(jnp.float32).")
        if xs.ndim != 2 or xs.shape[1] != self.in_channels or xs.shape[0] != jnp.shape(ts)[0]:
            raise ShapeError(
                f"NeuralCDE takes one series: ts of shape (times,) and xs of shape (times, "
                f"in_channels={self.in_channels}); got ts {shape_str(jnp.shape(ts))} and xs "
                f"{shape_str(xs.shape)}. For a batch, wrap the call in jax.vmap."
            )
        if is_traced(xs):
            return  # checked at run time in `control`
        # NumPy before indexing: a JAX array closed over by a jitted function is concrete, but
        # indexing it under the trace gives a tracer
        first, final = np.asarray(xs)[0], np.asarray(xs)[-1]
        if not np.all(np.isfinite(first)):
            raise ShapeError(
                f"NeuralCDE: the first observation xs[0] must be fully observed (it sets the "
                f"initial hidden state); got xs[0]={first.tolist()}. Fill its "
                f"missing channels (e.g. with the channel mean) before the call."
            )
        if length is None and not np.any(np.isfinite(final)):
            raise ShapeError(f"{_PADDING} Got xs[-1]={final.tolist()}.")

    @no_type_check  # checked below with messages that say how to fix the call
    def control(
        self,
        ts: Real[Array | np.ndarray, " times"],
        xs: Float[Array, "times channels"],
        *,
        length: int | Int[ArrayLike, ""] | None = None,
    ) -> diffrax.AbstractPath:
        """The continuous control path `X` through the observations (time channel first).

        **Arguments:** `ts`, `xs`, `length` as for `__call__`. With `length`, the rows from
        `length` on are replaced before interpolating (increasing times after
        `ts[length - 1]`, the last observed value of each channel carried forward), so the path
        up to `ts[length - 1]` is that of the unpadded series.

        **Returns:** a `diffrax.CubicInterpolation` or `diffrax.LinearInterpolation`.
        """
        if length is not None:
            if jnp.ndim(ts) != 1:
                check_times(ts)  # raises the shape error
            length = self._check_length(length, jnp.shape(ts)[0])
        ts = check_times(ts, length=length)
        self._check_inputs(ts, xs, length)  # before the cast: integer xs would make times integer
        ts, xs = jnp.asarray(ts, dtype=xs.dtype), jnp.asarray(xs)
        if length is not None:
            # Padding is replaced, whatever it held (zeros, NaN, repeated or later times), so
            # that the path up to ts[length - 1] is the unpadded one: the interpolation of an
            # interval looks ahead to the next observed value of each channel, which must not be
            # in the padding.
            index = jnp.arange(ts.shape[0])
            valid = index < length  # (times,)
            # each channel's values after its last observed valid row carry that row forward
            # (what the unpadded path does with missing values at the end), padding included
            observed = jnp.isfinite(xs) & valid[:, None]  # (times, channels)
            last = jnp.max(jnp.where(observed, index[:, None], 0), axis=0)  # (channels,)
            carried = jnp.take_along_axis(xs, last[None, :], axis=0)  # (1, channels)
            xs = jnp.where(index[:, None] > last, carried, xs)
            t_last = ts[length - 1]
            # a step that float rounding cannot lose, so the padded times stay increasing
            step = jnp.maximum(
                jnp.maximum(t_last - ts[0], 1.0), 8 * jnp.finfo(ts.dtype).eps * jnp.abs(t_last)
            )
            ts = jnp.where(valid, ts, t_last + (index - (length - 1)).astype(ts.dtype) * step)
        if is_traced(xs) and length is None:  # padding made the readout drift silently
            xs = eqx.error_if(xs, ~jnp.any(jnp.isfinite(xs[-1])), _PADDING + _RUNTIME)
        if is_traced(xs):  # under jit/vmap a NaN here surfaced as max_steps, blamed on stiffness
            xs = eqx.error_if(
                xs,
                ~jnp.all(jnp.isfinite(xs[0])),
                "NeuralCDE: the first observation xs[0] must be fully observed (it sets the "
                "initial hidden state; checked at run time because xs is traced). Fill its "
                "missing channels (e.g. with the channel mean) before the call.",
            )
        if self.use_time_channel:
            xs = jnp.concatenate([ts[:, None], xs], axis=1)  # (times, 1 + channels)
        if self.interpolation == "cubic":
            coeffs = diffrax.backward_hermite_coefficients(ts, xs, fill_forward_nans_at_end=True)
            return diffrax.CubicInterpolation(ts, coeffs)
        # missing values filled along the line between their neighbours (trailing ones carried
        # forward), as the cubic path fills them: a NaN left in the path made the solver reject
        # every step until max_steps, reported as stiffness
        xs = diffrax.linear_interpolation(ts, xs, fill_forward_nans_at_end=True)
        return diffrax.LinearInterpolation(ts, xs)

    @no_type_check  # checked below with messages that say how to fix the call
    def __call__(
        self,
        ts: Real[Array | np.ndarray, " times"],
        xs: Float[Array, "times channels"],
        *,
        length: int | Int[ArrayLike, ""] | None = None,
        key: PRNGKey | None = None,
    ) -> Float[Array, " out"] | Float[Array, "times out"]:
        """Run the CDE over one irregularly sampled series.

        **Arguments:**

        - `ts`: the observation times, strictly increasing and finite.
        - `xs`: the observations, shape `(times, in_channels)`; `NaN` marks a missing value.
        - `length`: the number of valid rows of a series padded at the end (for batching
          series of different lengths), an integer in `[1, times]`, possibly traced (an array
          under `jax.vmap` or `jax.jit`, which compiles once for every length). The solve
          stops at `ts[length - 1]`; the padded rows of `ts` and `xs` are ignored whatever they
          hold. `None` (default): every row is valid, and an all-`NaN` last row is refused as
          padding.
        - `key`: unused (deterministic); accepted for a uniform layer interface.

        **Returns:** the readout at the last valid time (`ts[-1]`, or `ts[length - 1]`), shape
        `(out,)`, when `output` is `"final"`; at every time of `ts`, shape `(times, out)`, when
        it is `"trajectory"` (rows from `length` on repeat the final readout). With
        `throw=False`, a failed solve gives `inf` at the times it did not reach.
        """
        del key
        path = self.control(ts, xs, length=length)
        ts = path.ts  # padding replaced by increasing times after the last valid one
        t_end = ts[-1] if length is None else ts[length - 1]
        # with length, the padded rows are saved at the final time
        saved = ts if length is None else jnp.minimum(ts, t_end)
        z0 = self.initial(path.evaluate(ts[0]))
        term = diffrax.ControlTerm(self.vector_field, path).to_ode()
        controller = self.stepsize_controller
        if self.interpolation == "linear" and isinstance(
            controller, diffrax.AbstractAdaptiveStepSizeController
        ):
            # The linear path has a kink at every observation: step exactly onto them.
            controller = diffrax.ClipStepSizeController(controller, jump_ts=ts)
        sol = diffeqsolve(
            term,
            self.solver,
            saved,
            z0,
            None,
            save_ts=self.output == "trajectory",
            stepsize_controller=controller,
            adjoint=self.adjoint,
            dt0=self.dt0,
            max_steps=self.max_steps,
            t1=t_end,
            owner="NeuralCDE",
        )
        # (times or 1, hidden); reached: None, or which rows the solve reached (throw=False)
        zs, reached = solved_states(sol, "NeuralCDE", self, save_ts=self.output == "trajectory")
        if self.output == "final":
            return apply_reached(self.readout, zs[-1], None if reached is None else reached[-1])
        return apply_reached(jax.vmap(self.readout), zs, reached)
