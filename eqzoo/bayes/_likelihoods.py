"""Likelihood heads: how a module's output for one example becomes a distribution over targets.

Each head maps the batched module output to a NumPyro distribution whose batch shape is the
shape of the batched targets, so observation masks can switch off single entries.
"""

import abc
import math
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Shaped

from .._errors import ConfigError, ShapeError, check_positive_numbers, require, shape_str
from ._priors import with_array_params

numpyro = require("numpyro", "bayes")
dist = require("numpyro.distributions", "bayes")


class AbstractLikelihood(eqx.Module):
    """Base class of the likelihood heads.

    A head turns the model output (batched with `jax.vmap`) into a distribution over targets
    of the same batch, may declare global parameters of its own (a noise scale), and knows the
    mean and variance of the target given one set of parameters.
    """

    classifier: ClassVar[bool] = False
    """Whether the targets are class labels: predictive intervals then bound probabilities."""

    @property
    def site_names(self) -> tuple[str, ...]:
        """Names of the head's own sample sites (e.g. `("noise_scale",)`)."""
        return ()

    def sample_params(self) -> dict[str, Array]:
        """Inside a NumPyro model: sample the head's global parameters; `{}` if none."""
        return {}

    @abc.abstractmethod
    def target_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one example's target, given the shape of one example's output."""

    @abc.abstractmethod
    def distribution(self, output: Array, params: dict[str, Array]) -> Any:
        """The distribution of `y` for a batch of outputs; batch shape `(batch, *target)`."""

    @abc.abstractmethod
    def mean(self, output: Array, params: dict[str, Array]) -> Array:
        """`E[y | output]` per entry; class probabilities `(batch, classes)` for classifiers."""

    @abc.abstractmethod
    def variance(self, output: Array, params: dict[str, Array]) -> Array:
        """`Var[y | output]`, the same shape as `mean`."""

    def prepare_target(self, y: Array, dtype: Any) -> Array:
        """Cast targets to the dtype the distribution's `log_prob` expects."""
        return jnp.asarray(y, dtype)

    def check_target_values(self, observed: np.ndarray, output_shape: tuple[int, ...]) -> None:
        """Raise `ConfigError` for observed target values outside the distribution's support
        (`observed`: the concrete, finite, unmasked targets, flattened). Default: any value."""

    def head_shape(self, target_shape: tuple[int, ...], num_outputs: int | None) -> Any:
        """The `out_size` a linear head needs to produce for targets of `target_shape`."""
        if len(target_shape) > 1:
            raise ShapeError(
                f"a linear last layer handles scalar or vector targets; got targets of per-example "
                f"shape {shape_str(target_shape)}. Flatten them first."
            )
        return "scalar" if target_shape == () else target_shape[0]

    def observe(
        self,
        name: str,
        output: Array,
        params: dict[str, Array],
        y: Array | None,
        mask: Array | None,
    ) -> Array:
        """Inside a NumPyro model: the observation site `name` for a batch.

        `mask` is boolean of shape `(batch,)` or the targets' shape; masked entries contribute
        nothing to the log density (their target values are never read, so NaN is fine there).
        """
        d = self.distribution(output, params)
        if y is not None:
            y = self.prepare_target(y, output.dtype)
        if mask is not None:
            mask = jnp.asarray(mask, bool)
            mask = jnp.broadcast_to(
                mask.reshape(mask.shape + (1,) * (len(d.batch_shape) - mask.ndim)), d.batch_shape
            )
            d = d.mask(mask)
            if y is not None:
                y = jnp.where(mask, y, jnp.zeros((), y.dtype))
        return numpyro.sample(name, d.to_event(len(d.batch_shape) - 1), obs=y)


def _check_scale_mode(cls: str, scale: Any, priors: list[Any], heteroscedastic: bool) -> None:
    modes = (scale is not None) + sum(p is not None for p in priors) + bool(heteroscedastic)
    if modes > 1:
        raise ConfigError(
            f"{cls} takes one way to set the noise: a fixed `scale`, a prior on it, or "
            f"`heteroscedastic=True`; got {modes} of them."
        )
    if scale is not None:
        check_positive_numbers(cls, scale=scale)


def _check_noise_prior(cls: str, name: str, prior: Any, example: str) -> None:
    # Gaussian(scale_prior=0.5) failed inside the NumPyro model with "'Array' object has no
    # attribute 'batch_shape'"; a Normal over the noise scale or variance gave negative draws:
    # NaN log densities, which NUTS rejected as divergences and SVI reported as NumPyro's
    # "Normal distribution got invalid loc parameter", naming neither the head nor the prior.
    if prior is None:
        return
    if not isinstance(prior, dist.Distribution):
        raise ConfigError(
            f"{cls}: {name} is a prior, a NumPyro distribution over positive values such as "
            f"{example}; got {prior!r}. For a fixed noise scale, pass scale={prior!r} instead."
        )
    try:
        negative = bool(jnp.any(prior.support(jnp.asarray([-1e-6, -1e-3, -1.0, -1e3]))))
    except Exception:  # a support that cannot be probed with scalars (vector-valued, dependent)
        return
    if negative:
        raise ConfigError(
            f"{cls}: {name} must be a distribution over positive values (the noise is > 0), such "
            f"as {example}; got {type(prior).__name__}, whose support {prior.support} includes "
            f"negative values (a negative draw makes the log density NaN)."
        )


def _array_params(prior: Any) -> Any:
    # Arrays, not Python floats, so that a sweep over noise priors reuses run_svi's program.
    return None if prior is None else with_array_params(prior, jnp.result_type(float))


def _array_scalar(value: Any) -> Array:
    # An array field, not a static float: a sweep over a fixed scale (or df) reuses run_svi's
    # program instead of compiling the whole fit once per value.
    return jnp.asarray(value, jnp.result_type(float))


def _noise_site(prior: Any, name: str) -> Array:
    if prior.batch_shape != () or prior.event_shape != ():
        raise ConfigError(f"the prior for {name!r} must be a scalar distribution.")
    return numpyro.sample(name, prior)


class Gaussian(AbstractLikelihood):
    """Gaussian likelihood `y ~ Normal(output, scale)`.

    The noise is fixed (`scale=0.1`), learned with a prior on the scale
    (`scale_prior=dist.HalfNormal(1.0)`, the default) or on the variance
    (`variance_prior=dist.InverseGamma(a, b)`, which makes a linear last layer conjugate), or
    heteroscedastic: the module then outputs `(..., 2)` = (mean, raw scale) and the scale is
    `softplus(raw) + min_scale`.

    **Arguments:**

    - `scale`: fixed noise standard deviation (a float or scalar array, held as an array: fits
      that differ only in it reuse `run_svi`'s compiled program).
    - `scale_prior`: prior over the noise standard deviation (site `"noise_scale"`), a NumPyro
      distribution over positive values (others are a `ConfigError`).
    - `variance_prior`: prior over the noise variance (site `"noise_variance"`), likewise.
    - `heteroscedastic`: predict the scale per example.
    - `min_scale`: floor added to a heteroscedastic scale.
    """

    scale: Float[Array, ""] | None
    scale_prior: Any
    variance_prior: Any
    heteroscedastic: bool = eqx.field(static=True)
    min_scale: float = eqx.field(static=True)

    def __init__(
        self,
        scale: float | Float[Array, ""] | None = None,
        *,
        scale_prior: Any = None,
        variance_prior: Any = None,
        heteroscedastic: bool = False,
        min_scale: float = 1e-3,
    ):
        _check_scale_mode("Gaussian", scale, [scale_prior, variance_prior], heteroscedastic)
        _check_noise_prior("Gaussian", "scale_prior", scale_prior, "dist.HalfNormal(1.0)")
        _check_noise_prior("Gaussian", "variance_prior", variance_prior, "dist.InverseGamma(2.0, 1.0)")
        if not (isinstance(min_scale, int | float) and math.isfinite(min_scale) and min_scale >= 0):
            # a negative floor made softplus(raw) + min_scale a negative scale: NaN log densities
            raise ConfigError(
                f"Gaussian: min_scale is the floor of a heteroscedastic scale and must be a finite "
                f"number >= 0; got min_scale={min_scale!r}."
            )
        if scale is None and scale_prior is None and variance_prior is None and not heteroscedastic:
            scale_prior = dist.HalfNormal(1.0)
        self.scale = None if scale is None else _array_scalar(scale)
        self.scale_prior = _array_params(scale_prior)
        self.variance_prior = _array_params(variance_prior)
        self.heteroscedastic = heteroscedastic
        self.min_scale = float(min_scale)

    @property
    def site_names(self) -> tuple[str, ...]:
        """The noise site: `("noise_scale",)`, `("noise_variance",)`, or `()` if none."""
        if self.scale_prior is not None:
            return ("noise_scale",)
        if self.variance_prior is not None:
            return ("noise_variance",)
        return ()

    def sample_params(self) -> dict[str, Array]:
        """In a NumPyro model: sample the noise scale or variance if it has a prior; else `{}`."""
        if self.scale_prior is not None:
            return {"noise_scale": _noise_site(self.scale_prior, "noise_scale")}
        if self.variance_prior is not None:
            return {"noise_variance": _noise_site(self.variance_prior, "noise_variance")}
        return {}

    def target_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        """`output_shape`, without the last axis of 2 when heteroscedastic."""
        if self.heteroscedastic:
            if not output_shape or output_shape[-1] != 2:
                raise ShapeError(
                    f"a heteroscedastic Gaussian needs the module to output (..., 2) = (mean, raw "
                    f"scale) per example; got output shape {shape_str(output_shape)}."
                )
            return output_shape[:-1]
        return output_shape

    def _loc_scale(self, output: Array, params: dict[str, Array]) -> tuple[Array, Array]:
        if self.heteroscedastic:
            return output[..., 0], jax.nn.softplus(output[..., 1]) + self.min_scale
        if self.scale is not None:
            return output, self.scale.astype(output.dtype)
        if self.scale_prior is not None:
            return output, params["noise_scale"].astype(output.dtype)
        return output, jnp.sqrt(params["noise_variance"]).astype(output.dtype)

    def distribution(self, output: Array, params: dict[str, Array]) -> Any:
        """`Normal(mean, scale)`, batch shape `(batch, *target)`."""
        loc, scale = self._loc_scale(output, params)
        return dist.Normal(loc, jnp.broadcast_to(scale, loc.shape))

    def mean(self, output: Array, params: dict[str, Array]) -> Array:
        """The output (its first channel when heteroscedastic)."""
        return self._loc_scale(output, params)[0]

    def variance(self, output: Array, params: dict[str, Array]) -> Array:
        """The noise variance `scale**2`, broadcast to the mean's shape."""
        loc, scale = self._loc_scale(output, params)
        return jnp.broadcast_to(scale**2, loc.shape)

    def head_shape(self, target_shape: tuple[int, ...], num_outputs: int | None) -> Any:
        """The `out_size` of a linear head; `2` (mean, raw scale) when heteroscedastic."""
        if self.heteroscedastic:
            if target_shape != ():
                raise ShapeError(
                    f"a heteroscedastic linear last layer handles scalar targets; got per-example "
                    f"target shape {shape_str(target_shape)}."
                )
            return 2
        return super().head_shape(target_shape, num_outputs)


class StudentT(AbstractLikelihood):
    """Student-t likelihood `y ~ StudentT(df, output, scale)`, robust to outliers.

    **Arguments:**

    - `df`: degrees of freedom (fixed; held as an array, like `scale`).
    - `scale`: fixed scale; if `None`, learned with `scale_prior` (site `"noise_scale"`). A
      float or scalar array, held as an array: a sweep over it compiles `run_svi` once.
    - `scale_prior`: prior over the scale, a distribution over positive values;
      `HalfNormal(1.0)` by default.
    """

    df: Float[Array, ""]
    scale: Float[Array, ""] | None
    scale_prior: Any

    def __init__(
        self,
        df: float | Float[Array, ""] = 4.0,
        scale: float | Float[Array, ""] | None = None,
        *,
        scale_prior: Any = None,
    ):
        _check_scale_mode("StudentT", scale, [scale_prior], False)
        _check_noise_prior("StudentT", "scale_prior", scale_prior, "dist.HalfNormal(1.0)")
        check_positive_numbers("StudentT", df=df)
        if scale is None and scale_prior is None:
            scale_prior = dist.HalfNormal(1.0)
        self.df = _array_scalar(df)
        self.scale = None if scale is None else _array_scalar(scale)
        self.scale_prior = _array_params(scale_prior)

    @property
    def site_names(self) -> tuple[str, ...]:
        """`("noise_scale",)` when the scale has a prior, else `()`."""
        return () if self.scale_prior is None else ("noise_scale",)

    def sample_params(self) -> dict[str, Array]:
        """Inside a NumPyro model: sample the scale, if it has a prior; `{}` otherwise."""
        if self.scale_prior is None:
            return {}
        return {"noise_scale": _noise_site(self.scale_prior, "noise_scale")}

    def target_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output's shape: one target entry per output entry."""
        return output_shape

    def _scale(self, output: Array, params: dict[str, Array]) -> Array:
        if self.scale is not None:
            return jnp.broadcast_to(self.scale.astype(output.dtype), output.shape)
        return jnp.broadcast_to(params["noise_scale"].astype(output.dtype), output.shape)

    def distribution(self, output: Array, params: dict[str, Array]) -> Any:
        """`StudentT(df, output, scale)`, batch shape `(batch, *target)`."""
        return dist.StudentT(self.df.astype(output.dtype), output, self._scale(output, params))

    def mean(self, output: Array, params: dict[str, Array]) -> Array:
        """The output (the location; the mean exists for `df > 1`)."""
        return output

    def variance(self, output: Array, params: dict[str, Array]) -> Array:
        """`scale**2 * df / (df - 2)`; infinite for `df <= 2`."""
        df = self.df.astype(output.dtype)
        two = jnp.asarray(2, output.dtype)
        # where, not `if`: df is an array (possibly traced), not a Python float
        factor = jnp.where(df > two, df / jnp.maximum(df - two, jnp.finfo(output.dtype).tiny), jnp.inf)
        return self._scale(output, params) ** 2 * factor


class Bernoulli(AbstractLikelihood):
    """Bernoulli likelihood for binary targets; the module outputs logits of the target's shape."""

    classifier: ClassVar[bool] = True

    def target_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output's shape: one logit per binary target."""
        return output_shape

    def distribution(self, output: Array, params: dict[str, Array]) -> Any:
        """`BernoulliLogits(output)`, batch shape `(batch, *target)`."""
        return dist.BernoulliLogits(output)

    def check_target_values(self, observed: np.ndarray, output_shape: tuple[int, ...]) -> None:
        """Raise `ConfigError` for observed targets other than 0 and 1."""
        bad = np.unique(observed[(observed != 0) & (observed != 1)])
        if bad.size:
            raise ConfigError(f"a Bernoulli head takes targets 0 and 1; y also holds {bad[:8].tolist()}.")

    def mean(self, output: Array, params: dict[str, Array]) -> Array:
        """The probability of a 1, `sigmoid(output)`."""
        return jax.nn.sigmoid(output)

    def variance(self, output: Array, params: dict[str, Array]) -> Array:
        """`p * (1 - p)` with `p = sigmoid(output)`."""
        p = jax.nn.sigmoid(output)
        return p * (1 - p)


class Categorical(AbstractLikelihood):
    """Categorical likelihood; the module outputs `(..., classes)` logits, targets are ints."""

    classifier: ClassVar[bool] = True

    def target_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        """`output_shape` without its last (classes) axis."""
        if not output_shape:
            raise ShapeError(
                "a Categorical head needs the module to output (..., classes) logits per example; "
                "got a scalar output."
            )
        return output_shape[:-1]

    def prepare_target(self, y: Array, dtype: Any) -> Array:
        """The class labels as int32."""
        return jnp.asarray(y, jnp.int32)

    def check_target_values(self, observed: np.ndarray, output_shape: tuple[int, ...]) -> None:
        """Raise `ConfigError` for labels that are not integers in `[0, classes)`."""
        classes = output_shape[-1]
        bad = np.unique(observed[(observed != np.round(observed)) | (observed < 0) | (observed >= classes)])
        if bad.size:
            raise ConfigError(
                f"a Categorical head over {classes} classes takes integer labels in [0, {classes}); y also "
                f"holds {bad[:8].tolist()}. Give the module (or num_outputs) one output per class."
            )

    def distribution(self, output: Array, params: dict[str, Array]) -> Any:
        """`CategoricalLogits(output)`, batch shape `(batch, *target)`."""
        return dist.CategoricalLogits(output)

    def mean(self, output: Array, params: dict[str, Array]) -> Array:
        """The class probabilities, `softmax(output)` over the last axis."""
        return jax.nn.softmax(output, axis=-1)

    def variance(self, output: Array, params: dict[str, Array]) -> Array:
        """`p * (1 - p)` per class, with `p` the class probabilities."""
        p = jax.nn.softmax(output, axis=-1)
        return p * (1 - p)

    def head_shape(self, target_shape: tuple[int, ...], num_outputs: int | None) -> Any:
        """The `out_size` of a linear head: `num_outputs`, the number of classes."""
        if target_shape != ():
            raise ShapeError(
                f"a Categorical linear last layer takes one label per example; got per-example "
                f"target shape {shape_str(target_shape)}."
            )
        if num_outputs is None:
            raise ConfigError("a Categorical last layer needs num_outputs (the number of classes).")
        return num_outputs


class Poisson(AbstractLikelihood):
    """Poisson likelihood for counts; the module outputs the log rate."""

    def target_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output's shape: one log rate per count."""
        return output_shape

    def distribution(self, output: Array, params: dict[str, Array]) -> Any:
        """`Poisson(exp(output))`, batch shape `(batch, *target)`."""
        return dist.Poisson(jnp.exp(output))

    def prepare_target(self, y: Array, dtype: Any) -> Array:
        """The counts in the output's floating dtype (NumPyro's `Poisson` takes floats)."""
        # NumPyro's Poisson accepts float counts; keeping the output dtype avoids int/float mixing
        return jnp.asarray(y, dtype)

    def check_target_values(self, observed: np.ndarray, output_shape: tuple[int, ...]) -> None:
        """Raise `ConfigError` for negative observed counts."""
        bad = np.unique(observed[observed < 0])
        if bad.size:
            raise ConfigError(f"a Poisson head takes counts >= 0; y also holds {bad[:8].tolist()}.")

    def mean(self, output: Array, params: dict[str, Array]) -> Array:
        """The rate, `exp(output)`."""
        return jnp.exp(output)

    def variance(self, output: Array, params: dict[str, Array]) -> Array:
        """The rate, `exp(output)` (a Poisson's variance equals its mean)."""
        return jnp.exp(output)


def check_target_shape(
    likelihood: AbstractLikelihood,
    output_shape: tuple[int, ...],
    y: Shaped[Array, "..."],
    mask: Array | None,
) -> None:
    """Raise a `ShapeError` if batched targets (and mask) do not fit a batched output."""
    n = output_shape[0]
    expected = (n, *likelihood.target_shape(output_shape[1:]))
    if tuple(y.shape) != expected:
        raise ShapeError(
            f"observations y have shape {shape_str(y.shape)}, but the module outputs "
            f"{shape_str(output_shape[1:])} per example, so a {type(likelihood).__name__} head "
            f"expects y of shape {shape_str(expected)} for {n} examples. Reshape y (e.g. "
            f"y.reshape({', '.join(map(str, expected))})) or change the module's output size."
        )
    if mask is not None:
        mshape = tuple(mask.shape)
        if mshape != expected and mshape != (n,):
            raise ShapeError(
                f"the observation mask has shape {shape_str(mshape)}; it must be {shape_str((n,))}"
                f" (one flag per example) or {shape_str(expected)} (one per target entry)."
            )
