"""NoiseSchedule against closed-form float64 numpy formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo._errors import ConfigError
from eqzoo.diffusion import NoiseSchedule

RTOL = 1e-6  # float32 storage of float64 values: ~6e-8 relative; cumprod adds nothing (done in float64)


def test_linear_schedule_matches_ddpm_formulas():
    s = NoiseSchedule.linear(1000, 1e-4, 0.02)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1.0 - betas)
    assert s.num_timesteps == 1000 and s.betas.dtype == jnp.float32
    np.testing.assert_allclose(s.betas, betas, rtol=RTOL)
    np.testing.assert_allclose(s.alphas, 1.0 - betas, rtol=RTOL)
    np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=RTOL)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_allclose(s.alphas_cumprod_prev, abar_prev, rtol=RTOL)
    # float32 subtraction 1 - abar loses ~1e-7 absolute; relative to the smallest variance (1e-4)
    np.testing.assert_allclose(s.posterior_variance, betas * (1 - abar_prev) / (1 - abar), rtol=2e-3)
    assert abar[-1] == pytest.approx(4.04e-5, rel=1e-2)  # DDPM's x_T is almost pure noise


def test_cosine_schedule_is_the_telescoped_cosine():
    T, s = 1000, 0.008
    sched = NoiseSchedule.cosine(T, s=s)
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    # abar_t = prod (1 - beta) = f(t+1) / f(0) wherever no beta hit the 0.999 cap (all but the last).
    expected = np.array([f(t + 1) / f(0) for t in range(T - 1)])
    np.testing.assert_allclose(sched.alphas_cumprod[: T - 1], expected, rtol=1e-5)  # tail values ~1e-5
    assert float(sched.betas[-1]) == pytest.approx(0.999, rel=RTOL)
    assert float(jnp.max(sched.betas[:-1])) < 0.999


def test_forward_process_closed_forms():
    s = NoiseSchedule.linear(100)
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
    noise = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
    t = np.array([0, 50, 99], np.int32)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 100))[t].reshape(3, 1, 1, 1)
    np.testing.assert_allclose(s.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)),
                               np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.velocity(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)),
                               np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0, rtol=1e-5, atol=1e-6)


def test_continuous_time_interpolates_log_snr_and_inverts():
    s = NoiseSchedule.cosine(200)
    steps = jnp.arange(200, dtype=jnp.float32)
    np.testing.assert_allclose(s.alpha_bar(steps), s.alphas_cumprod, rtol=1e-4)  # exact at integers
    t = jnp.asarray([0.0, 3.25, 120.5, 198.9])
    np.testing.assert_allclose(s.timestep_of_log_snr(s.log_snr(t)), t, atol=1e-3)
    lam = np.log(np.asarray(s.alphas_cumprod, np.float64)) - np.log1p(-np.asarray(s.alphas_cumprod, np.float64))
    np.testing.assert_allclose(s.log_snr(jnp.float32(3.25)), 0.75 * lam[3] + 0.25 * lam[4], rtol=1e-4)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: NoiseSchedule(np.array([0.1, 1.0])), "every beta must lie in"),
        (lambda: NoiseSchedule(np.zeros((2, 2)) + 0.1), "non-empty 1-D"),
        (lambda: NoiseSchedule.linear(1), "num_timesteps must be >= 2"),
        (lambda: NoiseSchedule.linear(10, 0.1, 0.01), "beta_start <= beta_end"),
        (lambda: NoiseSchedule.cosine(10, max_beta=1.0), "max_beta"),
        # abar_T underflowed to 0 (or abar_0 rounded to 1) in float32: the log-SNR was infinite and
        # both samplers returned NaN, silently
        (lambda: NoiseSchedule.linear(1000, 0.4, 0.5), r"alphas_cumprod .* underflows to 0 in float32 at timestep 1\d\d, .*Use fewer timesteps or smaller betas"),
        (lambda: NoiseSchedule(np.array([1e-9, 0.1])), r"alphas_cumprod .* rounds to 1 in float32 at timestep 0, .*first beta at least 1e-7"),
    ],
)
def test_schedule_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_concrete_timesteps_outside_the_schedule_are_refused(unchecked):
    # JAX clamps an index past the end and wraps a negative one: t = T and t = -1 both read
    # abar_{T-1}, silently; a float index failed inside JAX. log_snr/alpha_bar clamped to the ends.
    s = NoiseSchedule.linear(10)
    x, noise = jnp.ones((2, 1, 2, 2)), jnp.zeros((2, 1, 2, 2))
    with unchecked():  # users' calls: the annotations (Int[Array]) would refuse 10 and 2.5 first
        _check_timesteps(s, x, noise)
    # the ends themselves are timesteps; traced values are not checked (the documented contract)
    np.testing.assert_allclose(s.add_noise(x, noise, jnp.array([0, 9]))[:, 0, 0, 0], np.sqrt(s.alphas_cumprod[jnp.array([0, 9])]), rtol=1e-6)
    np.testing.assert_allclose(s.alpha_bar(9.0), s.alphas_cumprod[9], rtol=1e-5)
    clamped = jax.jit(lambda t: s.add_noise(x, noise, t))(jnp.array([10, -1]))
    np.testing.assert_array_equal(clamped, s.add_noise(x, noise, jnp.array([9, 9])))


def _check_timesteps(s, x, noise):
    for t, got in [(jnp.array([3, 10]), r"got t=10 at index \(1,\)"), (jnp.array([-1, 0]), r"got t=-1 at index \(0,\)"), (10, r"got t=10\.")]:
        for name in ("add_noise", "velocity"):
            with pytest.raises(ConfigError, match=rf"NoiseSchedule\.{name}: timesteps must lie in \[0, 9\] \(the schedule has T=10 timesteps, T-1 the noisiest\); {got}.*off-by-one"):
                getattr(s, name)(x, noise, t)
    with pytest.raises(ConfigError, match=r"NoiseSchedule\.add_noise takes integer timesteps t in \[0, 9\] .*got dtype float32\. .*t\.astype\(jnp\.int32\)"):
        s.add_noise(x, noise, jnp.array([2.5, 0.0]))
    for name in ("log_snr", "alpha_bar"):
        for t in (9.5, -0.5, float("nan")):
            with pytest.raises(ConfigError, match=rf"NoiseSchedule\.{name}: timesteps must lie in \[0, 9\] .*clamped to the ends"):
                getattr(s, name)(jnp.float32(t))
