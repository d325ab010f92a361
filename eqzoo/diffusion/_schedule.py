"""The forward (noising) process: a discrete variance schedule and the closed forms built on it."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Real

from .._errors import ConfigError

PREDICTIONS = ("epsilon", "v")
"""What a denoiser can be trained to predict: the noise (`"epsilon"`, Ho et al., 2020) or the
velocity `v = sqrt(abar) eps - sqrt(1 - abar) x0` (`"v"`, Salimans & Ho, 2022)."""


def check_prediction(prediction: str) -> None:
    """Raise `ConfigError` unless `prediction` is one of `PREDICTIONS`."""
    if prediction not in PREDICTIONS:
        raise ConfigError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")


def _concrete(t: object) -> np.ndarray | None:
    """The values of `t` on the host, or `None` when it is traced (inside `jit`/`vmap`)."""
    return None if isinstance(t, jax.core.Tracer) else np.asarray(t)


def check_timesteps(schedule: "NoiseSchedule", who: str, t: ArrayLike, *, real: bool = False) -> None:
    """Raise `ConfigError` unless `t` holds timesteps of `schedule`: integers in
    `[0, T-1]` (indices into its tables), or with `real=True` any real numbers in that
    interval. Only the dtype is checked when `t` is traced; the values, when concrete."""
    values = _concrete(t)
    dtype = jnp.result_type(t) if values is None else values.dtype
    last = schedule.num_timesteps - 1
    if real:
        ok_dtype = jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
        if not ok_dtype:
            raise ConfigError(f"{who} takes real timesteps t in [0, {last}]; got dtype {jnp.dtype(dtype).name}.")
    elif not jnp.issubdtype(dtype, jnp.integer):
        # A float index failed inside JAX ("Indexer must have integer or boolean type").
        raise ConfigError(
            f"{who} takes integer timesteps t in [0, {last}] (indices into the schedule's "
            f"tables); got dtype {jnp.dtype(dtype).name}. Convert whole values with "
            f"t.astype(jnp.int32); for a time between two steps use alpha_bar(t) or log_snr(t), "
            f"which interpolate."
        )
    if values is None or values.size == 0:
        return
    bad = ~((values >= 0) & (values <= last))  # NaN is bad too
    if bad.any():
        first = values[bad].ravel()[0].item()
        where = f" at index {tuple(int(i) for i in np.argwhere(bad)[0])}" if values.ndim else ""
        raise ConfigError(
            f"{who}: timesteps must lie in [0, {last}] (the schedule has T={schedule.num_timesteps} "
            f"timesteps, T-1 the noisiest); got t={first!r}{where}"
            + (f" and {int(bad.sum()) - 1} more" if bad.sum() > 1 else "")
            + (
                ". Outside, the interpolation is clamped to the ends, silently."
                if real
                else f". Outside, JAX clamps {last + 1} to {last} and wraps -1 to {last}, silently: "
                f"check for an off-by-one (t = T) or timesteps counted from 1."
            )
        )


def _bcast(a: Array, like: Array) -> Array:
    """Per-example coefficients `(batch,)` (or a scalar) shaped to broadcast against `like`."""
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


class NoiseSchedule(eqx.Module):
    """A discrete diffusion schedule: `betas[t]` for timesteps `t = 0 .. T-1` and the products
    `alphas_cumprod[t] = prod_{s <= t} (1 - betas[s])` (written `abar_t`).

    The forward process noises clean data `x0` as `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`
    with `eps ~ N(0, I)` (Ho et al., 2020). The arrays are computed in float64 and stored in
    float32. Build one with [`eqzoo.diffusion.NoiseSchedule.linear`][] or
    [`eqzoo.diffusion.NoiseSchedule.cosine`][], or from any `betas` in (0, 1).
    """

    betas: Float[Array, " timesteps"]
    alphas_cumprod: Float[Array, " timesteps"]

    def __init__(self, betas: ArrayLike):
        """**Arguments:** `betas`, a 1-D array of per-step noise variances, each in (0, 1).

        **Raises:** `ConfigError` for an empty array, a value outside (0, 1), or betas whose
        cumulative product `alphas_cumprod` reaches 0 or 1 in float32 (an infinite log-SNR).
        """
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or b.size == 0:
            raise ConfigError(f"NoiseSchedule: betas must be a non-empty 1-D array, got shape {b.shape}.")
        if not np.all((b > 0) & (b < 1)):
            raise ConfigError(
                f"NoiseSchedule: every beta must lie in (0, 1); got values in [{b.min()}, {b.max()}]."
            )
        abar = np.cumprod(1.0 - b).astype(np.float32)
        # abar_t must stay strictly inside (0, 1) in float32: at 0 (an underflow) or 1 (a beta below
        # float32's resolution) the log-SNR is infinite and the samplers divide by zero; both
        # returned NaN samples, silently.
        tiny = np.finfo(np.float32).tiny
        if abar[-1] < tiny or abar[0] >= 1.0:
            t = int(np.argmax(abar < tiny)) if abar[-1] < tiny else 0
            value, fix = (
                ("underflows to 0", "Use fewer timesteps or smaller betas (DDPM's are 1e-4 to 0.02 over 1000).")
                if abar[-1] < tiny
                else ("rounds to 1", "Make the first beta at least 1e-7 (DDPM's is 1e-4).")
            )
            raise ConfigError(
                f"NoiseSchedule: alphas_cumprod (the product of 1 - beta up to t) {value} in "
                f"float32 at timestep {t}, where the log signal-to-noise ratio is infinite and "
                f"the samplers return NaN; got betas in [{b.min():.3g}, {b.max():.3g}] over "
                f"{b.size} timesteps. {fix}"
            )
        self.betas = jnp.asarray(b, jnp.float32)
        self.alphas_cumprod = jnp.asarray(abar)

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """Betas evenly spaced from `beta_start` to `beta_end` (DDPM's schedule; its values
        are the defaults, for 1000 steps)."""
        if num_timesteps < 2:
            raise ConfigError(f"NoiseSchedule.linear: num_timesteps must be >= 2, got {num_timesteps}.")
        if not 0 < beta_start <= beta_end < 1:
            raise ConfigError(
                f"NoiseSchedule.linear: need 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}."
            )
        return cls(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """The cosine schedule of Nichol & Dhariwal (2021): `abar_t = f(t+1) / f(0)` with
        `f(u) = cos((u/T + s) / (1 + s) * pi/2)^2`, each beta capped at `max_beta` (only the last
        steps reach the cap)."""
        if num_timesteps < 2:
            raise ConfigError(f"NoiseSchedule.cosine: num_timesteps must be >= 2, got {num_timesteps}.")
        if not s >= 0 or not 0 < max_beta < 1:
            raise ConfigError(f"NoiseSchedule.cosine: need s >= 0 and 0 < max_beta < 1, got s={s}, max_beta={max_beta}.")
        u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        f = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        return cls(np.minimum(1.0 - f[1:] / f[:-1], max_beta))

    @property
    def num_timesteps(self) -> int:
        """`T`, the number of timesteps."""
        return self.betas.shape[0]

    @property
    def alphas(self) -> Float[Array, " timesteps"]:
        """`1 - betas`."""
        return 1.0 - self.betas

    @property
    def alphas_cumprod_prev(self) -> Float[Array, " timesteps"]:
        """`abar_{t-1}`, with `abar_{-1} = 1`."""
        return jnp.concatenate([jnp.ones((1,), self.alphas_cumprod.dtype), self.alphas_cumprod[:-1]])

    @property
    def posterior_variance(self) -> Float[Array, " timesteps"]:
        """The variance of `q(x_{t-1} | x_t, x0)`: `betas * (1 - abar_{t-1}) / (1 - abar_t)`."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    def add_noise(
        self, x0: Float[Array, "*shape"], noise: Float[Array, "*shape"], t: Int[Array, "*batch"]
    ) -> Float[Array, "*shape"]:
        """`x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`. `t` is a scalar or one timestep per
        leading entry of `x0` (a batch), integers in `[0, T-1]`; others raise `ConfigError` when
        `t` is concrete. A traced `t` (under `jax.jit` or `jax.vmap`) is not checked: JAX clamps
        an index past the end to `T-1` and wraps a negative one, silently."""
        check_timesteps(self, "NoiseSchedule.add_noise", t)
        abar = _bcast(self.alphas_cumprod[t], x0)
        return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise

    def velocity(
        self, x0: Float[Array, "*shape"], noise: Float[Array, "*shape"], t: Int[Array, "*batch"]
    ) -> Float[Array, "*shape"]:
        """The v-prediction target `sqrt(abar_t) noise - sqrt(1 - abar_t) x0`; `t` as for
        `add_noise`."""
        check_timesteps(self, "NoiseSchedule.velocity", t)
        abar = _bcast(self.alphas_cumprod[t], x0)
        return jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0

    def log_snr(self, t: Real[ArrayLike, "*batch"]) -> Float[Array, "*batch"]:
        """The log signal-to-noise ratio `log(abar_t / (1 - abar_t))`, interpolated linearly
        between integer timesteps, so any real `t` in `[0, T-1]` has one (the continuous time
        of [`eqzoo.diffusion.sample_ode`][]). A concrete `t` outside that interval raises
        `ConfigError`; a traced one is clamped to it."""
        check_timesteps(self, "NoiseSchedule.log_snr", t, real=True)
        return self._log_snr(t)

    def _log_snr(self, t: Real[ArrayLike, "*batch"]) -> Float[Array, "*batch"]:
        abar = self.alphas_cumprod
        table = jnp.log(abar) - jnp.log1p(-abar)
        return jnp.interp(jnp.asarray(t, jnp.float32), jnp.arange(self.num_timesteps, dtype=jnp.float32), table)

    def alpha_bar(self, t: Real[ArrayLike, "*batch"]) -> Float[Array, "*batch"]:
        """`abar_t` for real `t` in `[0, T-1]` (`sigmoid(log_snr(t))`; equal to `alphas_cumprod[t]`
        at integers). A concrete `t` outside raises `ConfigError`; a traced one is clamped."""
        check_timesteps(self, "NoiseSchedule.alpha_bar", t, real=True)
        return jax.nn.sigmoid(self._log_snr(t))

    def timestep_of_log_snr(self, log_snr: Float[ArrayLike, "*batch"]) -> Float[Array, "*batch"]:
        """The inverse of `log_snr`: the real timestep with that log-SNR (clamped to `[0, T-1]`)."""
        abar = self.alphas_cumprod
        table = jnp.log(abar) - jnp.log1p(-abar)  # decreasing in t; interp needs increasing xs
        steps = jnp.arange(self.num_timesteps, dtype=jnp.float32)
        return jnp.interp(jnp.asarray(log_snr, jnp.float32), table[::-1], steps[::-1])
