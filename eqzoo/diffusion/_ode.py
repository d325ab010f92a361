"""Sampling by solving the probability-flow ODE with Diffrax (needs the `sciml` extra)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Integer

from .._errors import ConfigError, check_sizes, not_positive, require
from .._typing import PRNGKey
from ..models import AbstractDenoiser
from ._sample import _check_sample_args, guided_prediction, to_epsilon_and_x0
from ._schedule import NoiseSchedule, check_prediction


def sample_ode(
    model: AbstractDenoiser,
    schedule: NoiseSchedule,
    *,
    key: PRNGKey,
    shape: tuple[int, ...],  # checked below, with a clearer message than the type checker's
    labels: Integer[Array, " batch"] | None = None,
    guidance_scale: float = 1.0,
    prediction: str = "epsilon",
    steps: int = 25,
    solver: Any = None,
    stepsize_controller: Any = None,
    max_steps: int = 4096,
    initial_noise: Float[Array, "batch channels height width"] | None = None,
    clip_x0: float | None = None,
    sigma_max: float | None = None,
    throw: bool = True,
) -> Float[Array, "batch channels height width"]:
    """Generate images by integrating the probability-flow ODE with a Diffrax solver.

    The diffusion's deterministic twin (Song et al., 2021, "Score-Based Generative Modeling
    through SDEs") is simplest in the scaled state `y = x / sqrt(abar)` and the noise level
    `sigma = sqrt((1 - abar) / abar)`: there `dy/dsigma = eps(x, t)`, the model's noise
    prediction (DDIM is this ODE's Euler method). It is solved in `u = log sigma`,
    `dy/du = sigma eps`, from the schedule's largest noise level (timestep `T-1`) down to its
    smallest (timestep 0), the timestep of each `sigma` read off the schedule's interpolated
    log-SNR ([`eqzoo.diffusion.NoiseSchedule.log_snr`][]); a last model call then removes the
    remaining noise (`x0 = y - sigma_min eps`). The whole solve is one compiled program.

    **Arguments:**

    - `model`, `schedule`, `key`, `shape`, `labels`, `guidance_scale`, `prediction`: as for
      [`eqzoo.diffusion.sample`][]. The initial noise is `jax.random.normal(key, shape)`.
    - `steps`: number of solver steps (Heun's method: two model calls each), evenly spaced in
      `log sigma`; with an adaptive `stepsize_controller`, only the first step's size.
    - `solver`: a Diffrax solver (default `diffrax.Heun()`).
    - `stepsize_controller`: a Diffrax step-size controller (default constant steps), e.g.
      `diffrax.PIDController(rtol=1e-3, atol=1e-3)`.
    - `max_steps`: the solver's step limit, a positive int; with constant steps at least
      `steps`.
    - `initial_noise`: start from this `x_T` instead of drawing it from `key`.
    - `clip_x0`: as for [`eqzoo.diffusion.sample`][]: each `x0` estimate the vector field
      uses is clipped to `[-clip_x0, clip_x0]` and the noise re-derived from it.
    - `sigma_max`: start the solve at this noise level when the schedule's largest is higher
      (the state `x_T * sqrt(1 + sigma_max^2)`, as if the diffusion ended there). The cosine
      schedule's largest is ~20,000, where the model's noise error, multiplied by `sigma`,
      swamps the image; 80 (Karras et al., 2022) loses nothing visible from data of unit scale
      and bounds that error. It must lie above the schedule's smallest noise level (timestep
      0), where the solve ends. `None`: the schedule's own.
    - `throw`: `True` raises `eqzoo.sciml.SolverError` when the solver stops before the end
      (e.g. `max_steps` reached by an adaptive controller); under `jax.jit` the same message
      comes through `equinox.error_if` at run time. `False` returns `inf` samples instead (one
      solve carries the whole batch, so every sample is `inf`).

    **Returns:** the samples, float32, of shape `shape`.

    **Raises:** `MissingDependencyError` without Diffrax (`pip install 'eqzoo[sciml]'`);
    `ConfigError` for `steps` or `max_steps` that are not positive ints (or `max_steps < steps`
    with constant steps), a `sigma_max` or `clip_x0` that is not positive, a `sigma_max` at or
    below the schedule's smallest noise level, and a solver or step-size controller that does
    not suit this ODE (the same checks and messages as [`eqzoo.sciml.NeuralODE`][]);
    `SolverError` as said under `throw`.
    """
    diffrax = require("diffrax", "sciml")
    from ..sciml._solve import validate_config

    check_prediction(prediction)
    check_sizes("sample_ode", steps=steps)
    for name, value in (("sigma_max", sigma_max), ("clip_x0", clip_x0)):
        if value is not None and not_positive(value):  # a Python number or a concrete 0-d array, finite and > 0
            raise ConfigError(f"sample_ode: {name} must be a positive number or None, got {value!r}.")
    shape, labels = _check_sample_args(model, shape, labels, guidance_scale, initial_noise)
    solver = diffrax.Heun() if solver is None else solver
    controller = diffrax.ConstantStepSize() if stepsize_controller is None else stepsize_controller
    # dt0 is (t1 - t0) / steps, never given: 1.0 stands for "a positive step" in the check
    validate_config("sample_ode", solver, controller, 1.0, max_steps, throw, step_arg=f"steps={steps}",
                    adaptive_default=False)
    if isinstance(controller, diffrax.ConstantStepSize) and max_steps < steps:
        raise ConfigError(
            f"sample_ode: constant steps take steps={steps} solver steps, more than max_steps="
            f"{max_steps}; the solve would stop early. Pass max_steps >= steps (e.g. "
            f"max_steps={steps + 1}) or fewer steps."
        )
    if sigma_max is not None and not isinstance(schedule.alphas_cumprod, jax.core.Tracer):
        # Below the schedule's smallest noise level the solve ran forwards, adding noise.
        abar0 = float(schedule.alphas_cumprod[0])
        sigma_min = ((1.0 - abar0) / abar0) ** 0.5
        if not sigma_max > sigma_min:
            raise ConfigError(
                f"sample_ode: sigma_max={sigma_max!r} is not above the schedule's smallest noise "
                f"level {sigma_min:.4g} (timestep 0), where the solve ends; the solve would run "
                f"from less noise to more. Pass a larger sigma_max (80.0 for data of unit scale) "
                f"or None for the schedule's largest."
            )
    x_T = jax.random.normal(key, shape, jnp.float32) if initial_noise is None else jnp.asarray(initial_noise, jnp.float32)
    w = jnp.float32(guidance_scale) if labels is not None and guidance_scale != 1.0 else None
    x0, solution = _solve(
        model, schedule, x_T, labels, w, solver, controller, steps=steps, max_steps=max_steps, prediction=prediction,
        clip_x0=None if clip_x0 is None else float(clip_x0), sigma_max=None if sigma_max is None else float(sigma_max),
    )
    return _checked(x0, solution, solver, controller, steps=steps, max_steps=max_steps, throw=throw)


def _checked(x0, solution, solver, controller, *, steps, max_steps, throw):
    """`x0`, or `SolverError` (eager) / `equinox.error_if` (traced) when the solve stopped early;
    `inf` for a failed solve with `throw=False`."""
    from ..sciml._solve import check_result, failure_messages, unless_failed

    if not throw:
        return unless_failed(x0, solution)
    messages = failure_messages(
        "sample_ode", solver, controller, "(t1 - t0) / steps", max_steps, jnp.float32,
        larger_step="pass fewer steps",
        inspect="Try sample_ode(..., throw=False) to get inf samples instead of this error",
    )
    return check_result(x0, solution, messages)


@eqx.filter_jit
def _solve(model, schedule, x_T, labels, w, solver, controller, *, steps, max_steps, prediction, clip_x0, sigma_max):
    import diffrax

    from ..sciml._solve import diffeqsolve

    log_sigma = lambda t: -0.5 * schedule.log_snr(t)  # noqa: E731
    u_start, u_end = log_sigma(schedule.num_timesteps - 1), log_sigma(0)
    if sigma_max is not None:
        u_start = jnp.minimum(u_start, jnp.log(jnp.float32(sigma_max)))

    def epsilon(y, u):
        t = schedule.timestep_of_log_snr(-2.0 * u)
        abar = jax.nn.sigmoid(-2.0 * u)  # = 1 / (1 + sigma^2)
        x = y * jnp.sqrt(abar)
        t_batch = jnp.full((x.shape[0],), t)
        if labels is None:
            pred = jax.vmap(lambda xi, ti: guided_prediction(model, xi, ti, None, 1.0))(x, t_batch)
        else:
            pred = jax.vmap(lambda xi, ti, li: guided_prediction(model, xi, ti, li, 1.0 if w is None else w))(x, t_batch, labels)
        eps, x0 = to_epsilon_and_x0(prediction, pred, x, abar)
        if clip_x0 is not None:
            eps = (x - jnp.sqrt(abar) * jnp.clip(x0, -clip_x0, clip_x0)) / jnp.sqrt(1.0 - abar)
        return eps

    def vector_field(u, y, args):
        return jnp.exp(u) * epsilon(y, u)

    y0 = x_T / jnp.sqrt(jax.nn.sigmoid(-2.0 * u_start))
    # eqzoo's wrapper: never throws (sample_ode checks the result), explains a solver for
    # another kind of equation
    solution = diffeqsolve(
        diffrax.ODETerm(vector_field), solver, None, y0, None, save_ts=False, stepsize_controller=controller,
        adjoint=diffrax.RecursiveCheckpointAdjoint(), dt0=(u_end - u_start) / steps, max_steps=max_steps,
        t0=u_start, t1=u_end, owner="sample_ode",
    )
    y = solution.ys[0]
    x0 = y - jnp.exp(u_end) * epsilon(y, u_end)
    # the clipped estimate, less its rounding
    return (x0 if clip_x0 is None else jnp.clip(x0, -clip_x0, clip_x0)), solution
