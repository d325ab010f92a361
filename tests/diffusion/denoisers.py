"""Hand-written denoisers for the diffusion tests: a tiny affine model and exact (oracle) noise
predictors for data distributions whose posterior mean is known in closed form."""

import jax.numpy as jnp
from jaxtyping import Array, Float

from eqzoo.diffusion import NoiseSchedule
from eqzoo.models import AbstractDenoiser


class Affine(AbstractDenoiser):
    """`w x + table[label] + c t`: every input matters, and the loss is computable by hand."""

    w: Float[Array, ""]
    c: Float[Array, ""]
    table: Float[Array, " classes"]  # the last row is the null class

    @property
    def null_label(self):
        return self.table.shape[0] - 1

    def __call__(self, x, t, label=None, *, key=None):
        label = self.null_label if label is None else label
        return self.w * x + self.table[label] + self.c * jnp.asarray(t, jnp.float32)


class GaussianOracle(AbstractDenoiser):
    """The exact noise predictor E[eps | x_t] when each class's data is N(mean[label], std^2 I):
    `x_t ~ N(sqrt(abar) mean, (abar std^2 + 1 - abar) I)` and `cov(eps, x_t) = sqrt(1 - abar)`.
    With `std = 0` the data is a single point per class and this is
    `(x_t - sqrt(abar) x0) / sqrt(1 - abar)`. Row `null_label` of `means` is the null class."""

    schedule: NoiseSchedule
    means: Float[Array, "classes channels height width"]
    std: float

    @property
    def null_label(self):
        return self.means.shape[0] - 1

    def __call__(self, x, t, label=None, *, key=None):
        label = self.null_label if label is None else label
        abar = self.schedule.alpha_bar(t)
        mean = self.means[label]
        return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * mean) / (abar * self.std**2 + 1 - abar)


class AsVelocity(AbstractDenoiser):
    """Turns a noise predictor into the matching v predictor: `v = sqrt(abar) eps - sqrt(1-abar) x0`."""

    inner: GaussianOracle

    @property
    def null_label(self):
        return self.inner.null_label

    def __call__(self, x, t, label=None, *, key=None):
        abar = self.inner.schedule.alpha_bar(t)
        eps = self.inner(x, t, label)
        x0 = (x - jnp.sqrt(1 - abar) * eps) / jnp.sqrt(abar)
        return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0
