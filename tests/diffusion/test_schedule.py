"""NoiseSchedule against closed-form float64 numpy formulas."""

import math

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
    ],
)
def test_schedule_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
