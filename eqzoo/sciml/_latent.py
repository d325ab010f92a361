"""Latent ODE for forecasting irregularly sampled series.

Rubanova, Chen, Duvenaud, "Latent ODEs for Irregularly-Sampled Time Series", NeurIPS 2019;
the variational form follows Chen et al., "Neural Ordinary Differential Equations", 2018.
"""

import numbers
from typing import no_type_check

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Real

from .._errors import ConfigError, ShapeError, check_floating, check_positive_numbers, shape_str
from .._typing import PRNGKey
from ._errors import TimeGridError, check_length, check_start, check_times, is_traced
from ._node import Autonomous, NeuralODE
from ._solve import (
    AdjointLike,
    apply_reached,
    check_layer_sizes,
    default_solver,
    diffeqsolve,
    solved_states,
    validate_config,
)

_LENGTH_EXAMPLE = (
    "jax.vmap(lambda t, x, n: model.loss(t, x, t, x, key=key, length=n, target_length=n))"
    "(ts, xs, lengths)"
)


class LatentODE(eqx.Module):
    """Encoder → initial latent state → neural ODE → decoder, for interpolation and forecasting.

    A GRU reads the observations of one series backwards in time, each observation with the
    time gap to the next one, so its final state summarises the whole series as seen from the
    first observation time `ts_obs[0]`. A linear map gives the mean and log standard deviation
    of the latent initial state `z0`; `z0` follows an autonomous neural ODE in latent space,
    and an MLP decodes each latent state back to an observation. Prediction times may lie past
    the observations (forecasting). One series per call; batch with `jax.vmap`. Every series
    of a batch must have the same number of rows: pad the shorter ones at the end and pass
    `length=` (and `target_length=` to `loss`), so the padding changes neither the encoding
    nor the loss. The model computes in its parameters' dtype: observations, times and latent
    states of another dtype are cast to it.

    **Arguments:**

    - `data_size`: channels of each observation.
    - `latent_size`: size of the latent state.
    - `hidden_size`: size of the GRU encoder state.
    - `width`, `depth`: width and number of hidden layers of the latent vector field and of
      the decoder MLPs.
    - `solver`, `stepsize_controller`, `adjoint`, `dt0`, `max_steps`: passed to the latent
      [`NeuralODE`][eqzoo.sciml.NeuralODE].
    - `throw`: as for [`NeuralODE`][eqzoo.sciml.NeuralODE] (and stored on the latent
      `NeuralODE`, `model.ode.throw`): `True` (default) raises `SolverError` when the decoding
      solve stops early (under `jax.jit`/`jax.vmap`, at run time through `equinox.error_if`);
      `False` returns anyway, with `inf` in every predicted row whose time the solve did not
      reach (the earlier rows hold their predictions), so `loss` is `inf`. The decoder sees zeros
      in place of the unreached states, so no NaN reaches the gradients.
    - `key`: PRNG key for the initial parameters.
    """

    encoder: eqx.nn.GRUCell
    to_latent: eqx.nn.Linear
    ode: NeuralODE
    decoder: eqx.nn.MLP
    data_size: int = eqx.field(static=True)
    latent_size: int = eqx.field(static=True)

    def __init__(
        self,
        data_size: int,
        latent_size: int,
        hidden_size: int,
        *,
        width: int = 64,
        depth: int = 2,
        solver: diffrax.AbstractSolver | None = None,
        stepsize_controller: diffrax.AbstractStepSizeController | None = None,
        adjoint: AdjointLike = "recursive",
        dt0: float | None = None,
        max_steps: int = 4096,
        throw: bool = True,
        key: PRNGKey,
    ):
        check_layer_sizes(
            "LatentODE",
            depth,
            data_size=data_size,
            latent_size=latent_size,
            hidden_size=hidden_size,
            width=width,
        )
        # checked here so that the errors name LatentODE, not the NeuralODE built below
        solver, stepsize_controller = default_solver(solver, stepsize_controller)
        validate_config("LatentODE", solver, stepsize_controller, dt0, max_steps, throw)
        k_enc, k_lat, k_ode, k_dec = jax.random.split(key, 4)
        # Input of the GRU: an observation and the time gap to the next one.
        self.encoder = eqx.nn.GRUCell(data_size + 1, hidden_size, key=k_enc)
        self.to_latent = eqx.nn.Linear(hidden_size, 2 * latent_size, key=k_lat)
        field = eqx.nn.MLP(
            latent_size,
            latent_size,
            width,
            depth,
            activation=jax.nn.softplus,
            final_activation=jnp.tanh,
            key=k_ode,
        )
        self.ode = NeuralODE(
            Autonomous(field),
            solver=solver,
            stepsize_controller=stepsize_controller,
            adjoint=adjoint,
            dt0=dt0,
            max_steps=max_steps,
            output="trajectory",
            throw=throw,
        )
        self.decoder = eqx.nn.MLP(
            latent_size, data_size, width, depth, activation=jax.nn.softplus, key=k_dec
        )
        self.data_size = data_size
        self.latent_size = latent_size

    @property
    def _dtype(self) -> jnp.dtype:
        """The dtype the model computes in: its parameters', at least float32 (a bfloat16 model,
        as `Precision.bf16()` casts it, still solves in float32: bfloat16 times and states would
        be too coarse for an adaptive solve). Observations, times and latent states are cast to
        it (float32 data into a model built in float64, say)."""
        return jnp.promote_types(self.encoder.weight_ih.dtype, jnp.float32)

    @no_type_check  # checked below with messages that say how to fix the call
    def encode(
        self,
        ts: Real[Array | np.ndarray, " times"],
        xs: Float[Array, "times channels"],
        *,
        length: int | Int[ArrayLike, ""] | None = None,
    ) -> tuple[Float[Array, " latent"], Float[Array, " latent"]]:
        """The approximate posterior of the latent state at `ts[0]`.

        **Arguments:**

        - `ts`: observation times, strictly increasing and finite (up to `ts[length - 1]`).
        - `xs`: observations, shape `(times, data_size)`.
        - `length`: the number of valid rows of a series padded at the end (for batching
          series of different lengths), an integer in `[1, times]`, possibly traced (an array
          under `jax.vmap` or `jax.jit`, which compiles once for every length). The encoder
          skips the rows from `length` on, whatever they hold, so the result is that of
          `ts[:length], xs[:length]`. `None` (default): every row is an observation.

        **Returns:** `(mean, log_std)`, each of shape `(latent,)`.
        """
        check_floating("LatentODE", xs, "xs_obs", "Convert with xs_obs.astype(jnp.float32).")
        if length is not None:
            if jnp.ndim(ts) != 1:
                check_times(ts, "ts_obs", min_points=1)  # raises the shape error
            length = check_length("LatentODE", length, jnp.shape(ts)[0], example=_LENGTH_EXAMPLE)
        ts = jnp.asarray(check_times(ts, "ts_obs", min_points=1, length=length), dtype=self._dtype)
        if xs.ndim != 2 or xs.shape != (ts.shape[0], self.data_size):
            raise ShapeError(
                f"LatentODE takes one series: ts_obs of shape (times,) and xs_obs of shape "
                f"(times, data_size={self.data_size}); got ts_obs {shape_str(ts.shape)} and "
                f"xs_obs {shape_str(xs.shape)}. For a batch, wrap the call in jax.vmap."
            )
        # NumPy, not jnp: inside `jit` a jnp op on concrete (closed-over) data returns a tracer
        # with a traced length the padding is unknown: it may hold anything, NaN included
        if not (is_traced(xs) or is_traced(length)) and not np.isfinite(
            np.asarray(xs)[:length]
        ).all():
            # caught here: downstream the NaN surfaces thousands of solver steps later as "stiff"
            bad = np.argwhere(~np.isfinite(np.asarray(xs)[:length]))[:3].tolist()
            raise ShapeError(
                f"LatentODE: xs_obs holds NaN or infinity (first at {bad}); drop those observation "
                "times (each series may have its own ts_obs) rather than passing gaps as NaN."
            )
        xs = jnp.asarray(xs, self._dtype)  # float32 data into a float64 model broke the GRU's scan
        h0 = jnp.zeros((self.encoder.hidden_size,), self._dtype)
        if length is None:
            gaps = jnp.concatenate([ts[1:] - ts[:-1], jnp.zeros((1,), ts.dtype)])  # (times,)
            inputs = jnp.concatenate([xs, gaps[:, None]], axis=1)[::-1]  # latest first

            def step(h, x):
                return self.encoder(x, h), None

            h, _ = jax.lax.scan(step, h0, inputs)
        else:
            valid = jnp.arange(ts.shape[0]) < length  # (times,)
            # Padding replaced before use, not only skipped: a NaN there would reach the
            # gradient through the unselected branch of the `where` below (0 * NaN).
            xs = jnp.where(valid[:, None], xs, 0)
            ts = jnp.where(valid, ts, ts[length - 1])  # the gap after the last valid row is 0
            gaps = jnp.concatenate([ts[1:] - ts[:-1], jnp.zeros((1,), ts.dtype)])  # (times,)
            inputs = jnp.concatenate([xs, gaps[:, None]], axis=1)[::-1]  # latest first

            def step(h, x_and_valid):
                x, v = x_and_valid
                return jnp.where(v, self.encoder(x, h), h), None  # padded rows keep h

            h, _ = jax.lax.scan(step, h0, (inputs, valid[::-1]))
        stats = self.to_latent(h)
        return stats[: self.latent_size], stats[self.latent_size :]

    @no_type_check  # checked below with messages that say how to fix the call
    def decode(
        self,
        z0: Float[Array | np.ndarray, " latent"],
        t0: Real[Array | np.ndarray, ""] | float,
        ts: Real[Array | np.ndarray, " times"],
    ) -> Float[Array, "times channels"]:
        """Evolve `z0` from time `t0` and decode at every time of `ts` (all `>= t0`).

        **Arguments:**

        - `z0`: one latent state, shape `(latent_size,)` (e.g. the mean from `encode`).
        - `t0`: the time of `z0` (the first observation time), a scalar.
        - `ts`: strictly increasing decoding times, none before `t0`.

        **Returns:** predicted observations, shape `(times, data_size)`.
        """
        check_floating("LatentODE.decode", z0, "z0", "Convert with z0.astype(jnp.float32).")
        if tuple(jnp.shape(z0)) != (self.latent_size,):
            raise ShapeError(
                f"LatentODE.decode takes one latent state z0 of shape (latent_size={self.latent_size},); "
                f"got shape {shape_str(jnp.shape(z0))}. For a batch, wrap the call in jax.vmap "
                "(in_axes=(0, None, None) when every series shares t0 and ts)."
            )
        t0_dtype = getattr(t0, "dtype", None)
        if t0_dtype is None and isinstance(t0, numbers.Real) and not isinstance(t0, bool):
            t0_dtype = np.asarray(t0).dtype
        if jnp.shape(t0) != () or t0_dtype is None or not jnp.issubdtype(t0_dtype, jnp.number) or jnp.issubdtype(t0_dtype, jnp.complexfloating):
            got = f"shape {shape_str(jnp.shape(t0))}" + (f" and dtype {jnp.dtype(t0_dtype).name}" if t0_dtype is not None else f" ({type(t0).__name__})")
            raise TimeGridError(
                f"LatentODE.decode: t0 must be one real time (a scalar: the first observation time "
                f"ts_obs[0]); got {got}. For a batch, wrap the call in jax.vmap."
            )
        if not is_traced(t0) and not np.isfinite(np.asarray(t0)):
            raise TimeGridError(
                f"LatentODE.decode: t0 must be a finite time (the first observation time "
                f"ts_obs[0]); got t0={np.asarray(t0).item()!r}."
            )
        return self._decode(z0, t0, ts, "ts")

    def _decode(self, z0, t0, ts, name: str, length=None):
        # checked under the caller's name; one time is fine
        ts = check_times(ts, name, min_points=1, length=length)
        z0 = jnp.asarray(z0, self._dtype)  # the solve's state, in the vector field's dtype
        # a non-finite t0 is left to check_start below, which says so (inf would read here
        # as "every time is before t0", NaN as "no time is")
        if (
            not (is_traced(ts) or is_traced(t0))
            and np.isfinite(np.asarray(t0))
            and np.asarray(ts)[0] < np.asarray(t0)
        ):
            raise TimeGridError(
                f"LatentODE: {name}[0]={np.asarray(ts)[0].item()!r} is before the first observation "
                f"time {np.asarray(t0).item()!r}; the latent state is inferred at the first "
                f"observation and evolved forward from there. Drop the earlier {name} values."
            )
        if length is None:
            ts = jnp.asarray(check_start(t0, ts, name), dtype=z0.dtype)
            t1 = None  # ts[-1]
        else:
            # Padded times are saved at the last valid time and the solve ends there, so the
            # steps, hence the valid rows, are those of the unpadded grid.
            ts = jnp.asarray(ts, dtype=z0.dtype)
            valid = jnp.arange(ts.shape[0]) < length
            ts = jnp.where(valid, ts, ts[length - 1])  # (times,), non-decreasing
            ts = check_start(t0, ts, name)
            t1 = ts[length - 1]
        ode = self.ode
        sol = diffeqsolve(
            diffrax.ODETerm(ode.vector_field),
            ode.solver,
            ts,
            z0,
            None,
            save_ts=True,
            stepsize_controller=ode.stepsize_controller,
            adjoint=ode.adjoint,
            dt0=ode.dt0,
            max_steps=ode.max_steps,
            t0=jnp.asarray(t0, dtype=z0.dtype),
            t1=t1,
            owner="LatentODE",
        )
        # (times, latent); reached: None, or which rows the solve reached (throw=False)
        zs, reached = solved_states(sol, "LatentODE", ode, save_ts=True)
        return apply_reached(jax.vmap(self.decoder), zs, reached)

    @no_type_check  # checked below with messages that say how to fix the call
    def __call__(
        self,
        ts_obs: Real[Array | np.ndarray, " obs_times"],
        xs_obs: Float[Array, "obs_times channels"],
        ts_pred: Real[Array | np.ndarray, " pred_times"],
        *,
        length: int | Int[ArrayLike, ""] | None = None,
        key: PRNGKey | None = None,
    ) -> Float[Array, "pred_times channels"]:
        """Predict the series at `ts_pred` from its observations.

        **Arguments:**

        - `ts_obs`, `xs_obs`: observation times `(obs_times,)` and values
          `(obs_times, data_size)` of one series.
        - `ts_pred`: strictly increasing prediction times, none before `ts_obs[0]`; they may
          extend past `ts_obs[-1]` (forecasting).
        - `length`: the number of valid observation rows of a padded series, as for
          `encode`.
        - `key`: when given, sample `z0` from the approximate posterior; when `None`, use its
          mean (deterministic prediction).

        **Returns:** predicted observations at `ts_pred`, shape `(pred_times, data_size)`.
        """
        mean, log_std = self.encode(ts_obs, xs_obs, length=length)
        z0 = (
            mean
            if key is None
            else mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)
        )
        return self._decode(z0, jnp.asarray(ts_obs, dtype=self._dtype)[0], ts_pred, "ts_pred")

    @no_type_check  # checked below with messages that say how to fix the call
    def loss(
        self,
        ts_obs: Real[Array | np.ndarray, " obs_times"],
        xs_obs: Float[Array, "obs_times channels"],
        ts_target: Real[Array | np.ndarray, " target_times"],
        xs_target: Float[Array, "target_times channels"],
        *,
        key: PRNGKey,
        obs_std: float | Float[Array, ""] = 0.1,
        kl_weight: float | Float[Array, ""] = 1.0,
        length: int | Int[ArrayLike, ""] | None = None,
        target_length: int | Int[ArrayLike, ""] | None = None,
    ) -> Float[Array, ""]:
        """The negative evidence lower bound of one series, per target value.

        `(Σ -log N(xs_target | decoded, obs_std²) + kl_weight · KL(q(z0) ‖ N(0, I)))
        / xs_target.size`, with one reparameterised sample of `z0` (with `target_length`, the
        sum and the size count the valid target rows only). Targets may include the
        observations themselves (reconstruction) and later times (forecasting).

        **Arguments:**

        - `ts_obs`, `xs_obs`: what the encoder sees.
        - `ts_target`, `xs_target`: where the prediction is scored, shape
          `(target_times, data_size)`.
        - `key`: PRNG key for the posterior sample.
        - `obs_std`: standard deviation of the Gaussian observation noise: a positive number, or
          a scalar array (a traced one too, e.g. `jnp.exp(log_std)` of a learned noise level;
          its value is then not checked).
        - `kl_weight`: weight of the KL term (anneal it from 0 to 1 to help early training).
        - `length`: the number of valid rows of padded observations, as for
          `encode`.
        - `target_length`: the number of valid rows of padded targets, an integer in
          `[1, target_times]`, possibly traced; the rows from `target_length` on are not
          scored, whatever they hold. Required with `length` (pass `target_length=length` when
          the targets are the observations, `ts_target.shape[0]` when none is padded), so that
          padded targets are never scored by accident. `None`: every target row is scored.

        **Returns:** a scalar, equal (to float rounding) to the loss of the unpadded series.
        """
        # a traced obs_std (a learned noise scale) passes: its value is unknown at trace time
        check_positive_numbers("LatentODE.loss", obs_std=obs_std)
        if length is not None and target_length is None:
            raise ConfigError(
                "LatentODE.loss: got length= (padded observations) but no target_length=, so "
                "every target row would be scored, padding included. Pass "
                "target_length=length when the targets are the observations (reconstruction), "
                "or target_length=<valid target rows> (ts_target.shape[0] when none is padded)."
            )
        if target_length is not None:
            if jnp.ndim(ts_target) != 1:
                check_times(ts_target, "ts_target", min_points=1)  # raises the shape error
            target_length = check_length(
                "LatentODE.loss",
                target_length,
                jnp.shape(ts_target)[0],
                name="target_length",
                example=_LENGTH_EXAMPLE,
            )
        mean, log_std = self.encode(ts_obs, xs_obs, length=length)
        eps = jax.random.normal(key, mean.shape, mean.dtype)
        z0 = mean + jnp.exp(log_std) * eps
        t0 = jnp.asarray(ts_obs, dtype=self._dtype)[0]
        pred = self._decode(z0, t0, ts_target, "ts_target", target_length)
        check_floating("LatentODE.loss", xs_target, "xs_target", "Convert with xs_target.astype(jnp.float32).")
        if tuple(jnp.shape(xs_target)) != tuple(pred.shape):  # would broadcast, over the wrong size
            raise ShapeError(
                f"LatentODE.loss: xs_target has shape {shape_str(jnp.shape(xs_target))}, but the model "
                f"predicts {shape_str(pred.shape)} at the {pred.shape[0]} target times; pass one row "
                "of data_size values per target time."
            )
        std = jnp.asarray(obs_std, dtype=pred.dtype)
        residual = pred - jnp.asarray(xs_target, pred.dtype)  # (target_times, channels)
        if target_length is None:
            size = xs_target.size
        else:
            valid = jnp.arange(pred.shape[0]) < target_length  # (target_times,)
            residual = jnp.where(valid[:, None], residual, 0)  # padding may hold NaN
            size = jnp.asarray(target_length * self.data_size, dtype=pred.dtype)
        nll = 0.5 * jnp.sum((residual / std) ** 2) + size * (
            jnp.log(std) + 0.5 * jnp.log(jnp.asarray(2 * np.pi, dtype=pred.dtype))
        )
        kl = 0.5 * jnp.sum(jnp.exp(2 * log_std) + mean**2 - 1.0 - 2 * log_std)
        return (nll + jnp.asarray(kl_weight, dtype=pred.dtype) * kl) / size
