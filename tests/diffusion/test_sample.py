"""The samplers' mathematics, checked with exact (oracle) denoisers whose answers are known."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from eqzoo._errors import ConfigError, ShapeError
from eqzoo.diffusion import NoiseSchedule, guided_prediction, sample, sample_ode, sampling_timesteps
from eqzoo.sciml import SolverError

from .denoisers import AsVelocity, GaussianOracle

SCHED = NoiseSchedule.linear(1000)
SHAPE = (6, 1, 3, 3)


def _points(seed=0, classes=3):
    """Per-class data points in [-1, 1], plus the null class's (row `classes`)."""
    return jax.random.uniform(jax.random.key(seed), (classes + 1, 1, 3, 3), minval=-1, maxval=1)


LABELS = jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_point_data_is_recovered(method):
    # With a single data point per class the exact noise predictor makes every x0 estimate that
    # point, so both samplers must return it. fp32: 1e-4 (the x_T-side estimates divide by
    # sqrt(abar_T) = 6e-3).
    points = _points()
    oracle = GaussianOracle(SCHED, points, 0.0)
    out = sample(oracle, SCHED, key=jax.random.key(1), shape=SHAPE, labels=LABELS, steps=20, method=method)
    np.testing.assert_allclose(out, points[LABELS], atol=1e-4)
    # v-prediction of the same oracle gives the same DDIM trajectory.
    if method == "ddim":
        v_out = sample(AsVelocity(oracle), SCHED, key=jax.random.key(1), shape=SHAPE, labels=LABELS, steps=20, prediction="v")
        np.testing.assert_allclose(v_out, out, atol=1e-4)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_guidance_extrapolates_from_the_null_class(method, w):
    # x0 estimates are affine in the prediction, so guided sampling of point data lands exactly
    # on null + w (cond - null). fp32: 1e-4 (4e-4 at w = 3, three times larger values).
    points = _points()
    oracle = GaussianOracle(SCHED, points, 0.0)
    out = sample(oracle, SCHED, key=jax.random.key(2), shape=SHAPE, labels=LABELS, steps=20, method=method, guidance_scale=w)
    expected = points[-1] + w * (points[LABELS] - points[-1])
    np.testing.assert_allclose(out, expected, atol=1e-4 * max(w, 1.0))


def test_guided_prediction_at_scale_one_is_the_conditional_prediction():
    oracle = GaussianOracle(SCHED, _points(), 0.3)
    x, t, label = jax.random.normal(jax.random.key(0), (1, 3, 3)), jnp.int32(400), jnp.int32(1)
    cond, uncond = oracle(x, t, label), oracle(x, t, None)
    assert np.array_equal(guided_prediction(oracle, x, t, label, 1.0), cond)
    np.testing.assert_allclose(guided_prediction(oracle, x, t, label, 2.5), uncond + 2.5 * (cond - uncond), rtol=1e-6, atol=1e-6)
    assert not np.allclose(cond, uncond)


def _gaussian_case(std=0.3):
    means = _points(3, classes=1)
    return GaussianOracle(SCHED, means, std), means, std


def test_ddim_is_euler_on_the_probability_flow_ode():
    # Gaussian data N(mu, s^2): in y = x / sqrt(abar), sigma = sqrt((1 - abar) / abar), the exact
    # prediction is eps = sigma (y - mu) / (s^2 + sigma^2), and DDIM's update is the Euler step
    # y <- y + (sigma_next - sigma) eps (sigma = 0 after the last). Reference: that recursion in
    # float64 numpy. fp32 sampler: 1e-4 relative.
    oracle, means, std = _gaussian_case()
    labels = jnp.zeros((SHAPE[0],), jnp.int32)
    noise = jax.random.normal(jax.random.key(4), SHAPE)
    out = sample(oracle, SCHED, key=jax.random.key(5), shape=SHAPE, labels=labels, steps=30, initial_noise=noise)

    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    ts = sampling_timesteps(1000, 30)
    sigmas = list(np.sqrt((1 - abar[ts]) / abar[ts])) + [0.0]
    mu = np.asarray(means[0], np.float64)
    y = np.asarray(noise, np.float64) / np.sqrt(abar[ts[0]])
    for sig, nxt in zip(sigmas[:-1], sigmas[1:], strict=True):
        y = y + (nxt - sig) * sig * (y - mu) / (std**2 + sig**2)
    np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-4)


def test_ode_sampler_matches_the_exact_flow():
    # For N(mu, s^2) data the probability-flow ODE is solved in closed form:
    # y(sigma) - mu = (y_T - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2); the final denoising
    # step maps y to mu + (y - mu) s^2 / (s^2 + sigma_min^2). The solve starts at |y| ~ 150 and
    # ends at |y - mu| ~ 1, so relative solver errors are magnified ~150x.
    oracle, means, std = _gaussian_case()
    labels = jnp.zeros((SHAPE[0],), jnp.int32)
    noise = jax.random.normal(jax.random.key(6), SHAPE)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    sig_max, sig_min = np.sqrt((1 - abar[-1]) / abar[-1]), np.sqrt((1 - abar[0]) / abar[0])
    mu = np.asarray(means[0], np.float64)
    y_T = np.asarray(noise, np.float64) / np.sqrt(abar[-1])
    y = mu + (y_T - mu) * np.sqrt(std**2 + sig_min**2) / np.sqrt(std**2 + sig_max**2)
    expected = mu + (y - mu) * std**2 / (std**2 + sig_min**2)

    def solve(**kwargs):
        out = sample_ode(oracle, SCHED, key=jax.random.key(0), shape=SHAPE, labels=labels, initial_noise=noise, **kwargs)
        return np.abs(np.asarray(out, np.float64) - expected).max()

    # Adaptive Tsit5 at rtol = atol = 1e-6: 1e-5 (fp32 state).
    assert solve(solver=diffrax.Tsit5(), stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6)) < 1e-5
    # The default, Heun with constant steps, is second order: doubling the steps quarters the error.
    coarse, fine = solve(steps=40), solve(steps=80)
    assert fine < 0.02 and 3.0 < coarse / fine < 5.0, (coarse, fine)


def _ddpm_output_law(ts, std, eta=1.0):
    """Mean coefficient and variance of the sampler's output for N(mu, std^2) data, exactly:
    with the Gaussian oracle each step is x_s = A x_t + B mu + sigma z, so (float64 numpy)
    m <- A m + B, V <- A^2 V + sigma^2 from m = 0, V = 1 (m in units of mu)."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    a_t = abar[ts]
    a_s = np.concatenate([abar[ts[1:]], [1.0]])
    m, v = 0.0, 1.0
    for at, as_ in zip(a_t, a_s, strict=True):
        k = np.sqrt(1 - at) / (at * std**2 + 1 - at)  # eps_hat = k (x_t - sqrt(at) mu)
        sigma = eta * np.sqrt((1 - as_) / (1 - at)) * np.sqrt(1 - at / as_)
        d = np.sqrt(max(1 - as_ - sigma**2, 0.0))
        A = np.sqrt(as_) * (1 - np.sqrt(1 - at) * k) / np.sqrt(at) + d * k
        B = np.sqrt(as_) * np.sqrt(1 - at) * k - d * k * np.sqrt(at)
        m, v = A * m + B, A**2 * v + sigma**2
    return m, v


def test_ddpm_samples_the_predicted_distribution():
    # Ancestral sampling of N(mu, s^2) data with the exact predictor: the output law is Gaussian
    # with a mean and variance computable exactly (above). 9216 values: standard errors 0.003
    # on the mean and 0.002 on the standard deviation; tolerances 0.01.
    oracle, means, std = _gaussian_case()
    n, steps = 1024, 100
    labels = jnp.zeros((n,), jnp.int32)
    out = np.asarray(sample(oracle, SCHED, key=jax.random.key(7), shape=(n, 1, 3, 3), labels=labels, steps=steps, method="ddpm"))
    m, v = _ddpm_output_law(sampling_timesteps(1000, steps), std)
    centred = out - m * np.asarray(means[0])
    assert abs(centred.mean()) < 0.01, centred.mean()
    assert abs(centred.std() - np.sqrt(v)) < 0.01, (centred.std(), np.sqrt(v))
    # The law itself tends to the data's as the steps grow (respacing shrinks the variance).
    m_full, v_full = _ddpm_output_law(np.arange(999, -1, -1), std)
    assert abs(m_full - 1) < 1e-3 and abs(np.sqrt(v_full) - std) < 0.005
    # The same key gives the same samples.
    again = sample(oracle, SCHED, key=jax.random.key(7), shape=(n, 1, 3, 3), labels=labels, steps=steps, method="ddpm")
    assert np.array_equal(out, again)


TRACES = []


class CountingOracle(GaussianOracle):
    def __call__(self, x, t, label=None, *, key=None):
        TRACES.append(1)  # a Python side effect: once per trace, not per step
        return super().__call__(x, t, label)


def test_the_loop_is_one_scan_traced_once():
    oracle = CountingOracle(SCHED, _points(), 0.0)
    counts = []
    for steps in (5, 40):
        TRACES.clear()
        sample(oracle, SCHED, key=jax.random.key(0), shape=SHAPE, labels=LABELS, steps=steps, guidance_scale=2.0)
        counts.append(len(TRACES))
    assert counts[0] == counts[1] <= 2, counts  # the model is traced once, whatever the step count



def test_ode_sampler_from_a_capped_noise_level_matches_the_exact_flow():
    # sigma_max starts the solve at that noise level, from x_T * sqrt(1 + sigma_max^2): the same
    # closed form as above with sigma_T = sigma_max (adaptive Tsit5 at 1e-6: 1e-5).
    oracle, means, std = _gaussian_case()
    labels = jnp.zeros((SHAPE[0],), jnp.int32)
    noise = jax.random.normal(jax.random.key(6), SHAPE)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    sig_max, sig_min = 80.0, np.sqrt((1 - abar[0]) / abar[0])
    mu = np.asarray(means[0], np.float64)
    y_T = np.asarray(noise, np.float64) * np.sqrt(1 + sig_max**2)
    y = mu + (y_T - mu) * np.sqrt(std**2 + sig_min**2) / np.sqrt(std**2 + sig_max**2)
    expected = mu + (y - mu) * std**2 / (std**2 + sig_min**2)
    out = sample_ode(
        oracle, SCHED, key=jax.random.key(0), shape=SHAPE, labels=labels, initial_noise=noise, sigma_max=sig_max,
        solver=diffrax.Tsit5(), stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
    )
    assert np.abs(np.asarray(out, np.float64) - expected).max() < 1e-5


class Biased(GaussianOracle):
    """The exact predictor plus a constant noise error, which the cosine schedule's first x0
    estimate, (x - sqrt(1 - abar) eps) / sqrt(abar), multiplies by ~20,000."""

    def __call__(self, x, t, label=None, *, key=None):
        return super().__call__(x, t, label) + 0.05


def test_clip_x0_keeps_both_samplers_in_range(unchecked):
    # With clip_x0 every x0 estimate, and so the output, stays in [-clip_x0, clip_x0] whatever
    # the model's error; unclipped, the ODE sampler's first estimates here reach ~1,000.
    cosine = NoiseSchedule.cosine(1000)
    model = Biased(cosine, _points(), 0.0)
    args = dict(key=jax.random.key(0), shape=SHAPE, labels=LABELS)
    assert np.abs(np.asarray(sample(model, cosine, clip_x0=0.5, **args))).max() <= 0.5
    assert np.abs(np.asarray(sample_ode(model, cosine, clip_x0=0.5, **args))).max() <= 0.5 + 1e-6
    unclipped = np.abs(np.asarray(sample_ode(model, cosine, **args))).max()
    assert unclipped > 0.5, unclipped  # the clip did something
    # a NumPy or 0-d JAX scalar is the same setting (sample refused np.float32 once it checked
    # clip_x0); the annotation (float) refuses them under the hook before eqzoo's check
    with unchecked():
        for half in (np.float32(0.5), jnp.asarray(0.5)):
            np.testing.assert_array_equal(sample(model, cosine, clip_x0=half, **args), sample(model, cosine, clip_x0=0.5, **args))
            np.testing.assert_array_equal(sample_ode(model, cosine, clip_x0=half, **args), sample_ode(model, cosine, clip_x0=0.5, **args))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="euler"), ConfigError, "method must be one of"),
        (dict(method="ddpm", eta=0.5), ConfigError, "method='ddpm' is eta=1"),
        (dict(eta=2.0), ConfigError, r"eta must be in \[0, 1\]"),
        (dict(labels=None, guidance_scale=2.0), ConfigError, "guidance_scale != 1 needs labels"),
        (dict(labels=jnp.zeros((2,), jnp.int32)), ShapeError, r"labels must have shape \(6,\)"),
        (dict(steps=2000), ConfigError, "steps must be between 1 and"),
        (dict(shape=(1, 3, 3)), ShapeError, r"shape must be \(num_samples"),
        # these three ran: an MLIR verifier error, NaN samples, all-zero samples (sample only)
        (dict(shape=(-1, 1, 3, 3)), ShapeError, r"sizes >= 0; got \(-1, 1, 3, 3\)"),
        (dict(guidance_scale=float("nan")), ConfigError, r"guidance_scale must be a finite number, got nan"),
        (dict(clip_x0=0.0), ConfigError, r"clip_x0 must be a positive number or None, got 0\.0"),
        (dict(prediction="x0"), ConfigError, "prediction must be one of"),
        (dict(labels=jnp.asarray([0, 1, 2, 3, 4, -1], jnp.int32)), ConfigError, r"labels \[-1, 4\] are not classes of this model: they must be in \[0, 3\]"),
        (dict(labels=jnp.zeros((6,), jnp.float32)), (ConfigError, TypeCheckError), "labels must be integer class ids|labels"),
        # (the test suite's jaxtyping hook may see the batch size disagree with the labels' first)
        (dict(initial_noise=jnp.zeros((3, 1, 3, 3))), (ShapeError, TypeCheckError), r"initial_noise must have shape \(6, 1, 3, 3\); got \(3, 1, 3, 3\)|initial_noise"),
    ],
)
def test_sampler_errors(kwargs, error, match):
    args = dict(key=jax.random.key(0), shape=SHAPE, labels=LABELS)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sample(GaussianOracle(SCHED, _points(), 0.0), SCHED, **args)
    if "method" not in kwargs and "eta" not in kwargs and "steps" not in kwargs:  # sample_ode checks the same
        with pytest.raises(error, match=match):
            sample_ode(GaussianOracle(SCHED, _points(), 0.0), SCHED, **args)
    with pytest.raises(ConfigError, match="sigma_max must be a positive number or None, got 0.0"):
        sample_ode(GaussianOracle(SCHED, _points(), 0.0), SCHED, key=jax.random.key(0), shape=SHAPE, sigma_max=0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # Each of these failed inside Diffrax (EquinoxRuntimeError, RuntimeError,
        # TermAndSolverIncompatible, AttributeError, ValueError) or ran: a float steps=2.5 took
        # 3 steps, and a sigma_max below the schedule's smallest noise level solved from less
        # noise to more.
        (dict(max_steps=10), r"sample_ode: constant steps take steps=25 solver steps, more than max_steps=10.*max_steps >= steps"),
        (
            dict(solver=diffrax.Euler(), stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3)),
            r"sample_ode: the solver Euler has no error estimate, so the adaptive step-size controller PIDController "
            r"cannot choose its steps.*stepsize_controller=diffrax\.ConstantStepSize\(\), steps=25\)",
        ),
        (dict(solver=diffrax.SemiImplicitEuler()), r"sample_ode: the solver SemiImplicitEuler does not solve this equation.*diffrax\.Tsit5\(\)"),
        (dict(solver=diffrax.EulerHeun()), r"sample_ode: the solver EulerHeun does not solve this equation: it is a solver for SDEs"),
        (dict(solver=diffrax.Kvaerno3()), r"sample_ode: the implicit solver Kvaerno3 takes the tolerances .*ConstantStepSize has none.*PIDController"),
        (dict(solver="tsit5"), r"sample_ode: solver must be a diffrax solver .*got 'tsit5'"),
        (dict(stepsize_controller="pid"), r"sample_ode: stepsize_controller must be a diffrax step-size controller"),
        (dict(max_steps=0), r"sample_ode: max_steps must be a positive int; got 0"),
        (dict(max_steps=100.0), r"sample_ode: max_steps must be a positive int; got 100\.0"),
        (dict(max_steps=None), r"sample_ode: max_steps must be a positive int; got None"),
        (dict(steps=2.5), r"sample_ode: steps must be a positive integer; got steps=2\.5"),
        (dict(steps=True), r"sample_ode: steps must be a positive integer; got steps=True"),
        (dict(sigma_max=1e-3), r"sample_ode: sigma_max=0\.001 is not above the schedule's smallest noise level 0\.01 \(timestep 0\)"),
        (dict(throw="no"), r"sample_ode: throw must be True or False; got throw='no'"),
    ],
)
def test_ode_sampler_refuses_what_diffrax_failed_on(kwargs, match, unchecked):
    with unchecked(), pytest.raises(ConfigError, match=match):
        sample_ode(GaussianOracle(SCHED, _points(), 0.0), SCHED, key=jax.random.key(0), shape=SHAPE, **kwargs)


def test_ode_sampler_reports_a_solve_that_stops_early():
    # An adaptive solve out of steps: Diffrax's own EquinoxRuntimeError ("Try increasing
    # max_steps") named neither sample_ode nor its arguments; now the eqzoo message, eagerly as
    # SolverError and under jit through equinox's runtime error, or inf samples with throw=False.
    oracle = GaussianOracle(SCHED, _points(), 0.0)
    kw = dict(shape=SHAPE, solver=diffrax.Tsit5(), stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6), max_steps=3)
    message = r"sample_ode: the solver stopped before the final time: max_steps=3 was reached .*sample_ode\(\.\.\., max_steps=12\)"
    with pytest.raises(SolverError, match=message + r".*diffrax result"):
        sample_ode(oracle, SCHED, key=jax.random.key(0), **kw)
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        eqx.filter_jit(lambda k: sample_ode(oracle, SCHED, key=k, **kw))(jax.random.key(0))
    assert np.isinf(np.asarray(sample_ode(oracle, SCHED, key=jax.random.key(0), throw=False, **kw))).all()
    kw["max_steps"] = 4096  # a solve that succeeds is untouched by throw=False
    np.testing.assert_array_equal(
        sample_ode(oracle, SCHED, key=jax.random.key(0), throw=False, **kw), sample_ode(oracle, SCHED, key=jax.random.key(0), **kw)
    )


def test_sampler_refuses_a_step_count_that_is_not_an_integer(unchecked):
    # steps=2.5 failed inside np.linspace ("'float' object cannot be interpreted as an integer")
    # and steps=True ran one step.
    oracle = GaussianOracle(SCHED, _points(), 0.0)
    with unchecked():
        for steps in (2.5, True):
            with pytest.raises(ConfigError, match=rf"steps must be an integer number of denoising steps, got {steps!r}"):
                sample(oracle, SCHED, key=jax.random.key(0), shape=SHAPE, steps=steps)
        with pytest.raises(ConfigError, match=r"got Array\(3.*That is a JAX array, not a Python int"):
            sampling_timesteps(1000, jnp.int32(3))
        assert sampling_timesteps(1000, np.int64(3)).tolist() == [999, 500, 0]
