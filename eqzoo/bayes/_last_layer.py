"""Bayesian last layer: a deterministic trunk's features, and a Bayesian linear head on them.

For a Gaussian head the posterior is exact and closed form (Bayesian linear regression, Bishop,
"Pattern Recognition and Machine Learning", §3.3 and, with unknown noise, the Normal-inverse-gamma
model of Murphy, "Machine Learning: a Probabilistic Perspective", §7.6.3). Other heads use NUTS or
SVI on the features only, so the trunk is run once however large it is.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Real, Shaped

from .._errors import ConfigError, ShapeError, check_positive_numbers, require, shape_str
from ._inference import run_nuts, run_svi
from ._likelihoods import AbstractLikelihood, Categorical, Gaussian
from ._model import BayesianModel, check_data
from ._posterior import Posterior, Prediction, _check_prob
from ._types import ArrayIn

dist = require("numpyro.distributions", "bayes")


def trunk_features(
    trunk: PyTree, x: Shaped[ArrayIn, "batch ..."], *, batch_size: int = 256
) -> Float[Array, "batch features"]:
    """Run a deterministic trunk over a dataset in chunks of `batch_size` examples.

    **Arguments:**

    - `trunk`: a module taking one example and returning a feature vector.
    - `x`: inputs, `(batch, ...)`.
    - `batch_size`: examples per vectorised chunk (bounds memory on large trunks).

    **Returns:** `(batch, features)`.
    """
    x = jnp.asarray(x)
    out = jax.eval_shape(jax.vmap(trunk), x)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 2:
        shape = getattr(out, "shape", out)
        raise ShapeError(
            f"the trunk must return one feature vector per example; vmapped over x it returned "
            f"{shape}. Flatten its output (e.g. end the trunk with jnp.ravel)."
        )
    return _features(trunk, x, batch_size)


@eqx.filter_jit
def _features(trunk: PyTree, x: Array, batch_size: int) -> Array:
    return jax.lax.map(trunk, x, batch_size=min(batch_size, x.shape[0]))


def _design(features: Array, use_bias: bool) -> Array:
    if not use_bias:
        return features
    return jnp.concatenate([features, jnp.ones((features.shape[0], 1), features.dtype)], axis=1)


def student_t_icdf(
    q: Float[ArrayIn, "*shape"], df: Float[ArrayIn, "*shape"]
) -> Float[Array, "*shape"]:
    """Quantile of the standard Student-t distribution, by bisection on its CDF.

    (`jax.scipy` has no inverse regularised incomplete beta function.)
    """

    q, df = jnp.asarray(q), jnp.asarray(df)

    def cdf(t: Array) -> Array:
        tail = 0.5 * jax.scipy.special.betainc(df / 2, jnp.full_like(df, 0.5), df / (df + t**2))
        return jnp.where(t > 0, 1 - tail, tail)

    def step(_: Any, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
        lo, hi = bounds
        mid = (lo + hi) / 2
        below = cdf(mid) < q
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    big = jnp.full(jnp.broadcast_shapes(q.shape, df.shape), 1e4, q.dtype)
    lo, hi = jax.lax.fori_loop(0, 100, step, (-big, big))
    return (lo + hi) / 2


class ConjugateGaussianHead(eqx.Module):
    """The exact posterior of a linear-Gaussian head `y = w^T phi(x) + b + noise`.

    With known noise `sigma` and prior `w ~ N(0, s^2 I)` the posterior is `N(mean, cov)`. With
    unknown noise (Normal-inverse-gamma prior `sigma^2 ~ InvGamma(a0, b0)`,
    `w | sigma^2 ~ N(0, sigma^2 s^2 I)`) it is `w | sigma^2 ~ N(mean, sigma^2 cov)`,
    `sigma^2 ~ InvGamma(concentration, rate)` (one rate per output), and the predictive is
    Student-t. Weights are `(features [+ 1 for the bias], outputs)`; outputs share `cov`.

    **Fields:** `mean` `(features, outputs)`, `cov` `(features, features)`, `noise_scale`
    (known noise) or `concentration`, `rate` `(outputs,)` (Normal-inverse-gamma).
    """

    mean: Float[Array, "features outputs"]
    cov: Float[Array, "features features"]
    noise_scale: Float[Array, ""] | None
    concentration: Float[Array, ""] | None
    rate: Float[Array, " outputs"] | None
    use_bias: bool = eqx.field(static=True)
    scalar_target: bool = eqx.field(static=True)

    @property
    def weight_covariance(self) -> Float[Array, "*outputs features features"]:
        """The marginal posterior covariance of the weights: `cov`, or per output
        `rate / (concentration - 1) * cov` under the Normal-inverse-gamma model."""
        if self.noise_scale is not None:
            return self.cov
        return (self.rate / (self.concentration - 1))[:, None, None] * self.cov

    def _loc_var(self, features: Array) -> tuple[Array, Array]:
        phi = _design(features, self.use_bias)
        loc = phi @ self.mean  # (batch, outputs)
        quad = jnp.einsum("bf,fg,bg->b", phi, self.cov, phi)[:, None]  # phi^T cov phi
        return loc, quad

    def _out(self, a: Array) -> Array:
        return a[..., 0] if self.scalar_target else a

    def predict(
        self,
        features: Float[ArrayIn, "batch features"],
        *,
        prob: float = 0.9,
        key: PRNGKeyArray | None = None,
        num_samples: int = 1000,
    ) -> Prediction:
        """The exact posterior predictive at `features`.

        **Arguments:**

        - `features`: trunk features, `(batch, features)`.
        - `prob`: the interval's probability mass.
        - `key`: if given, also draw `num_samples` weight samples (`function_samples`) and
          predictive draws (`samples`).

        **Returns:** a `Prediction` whose mean, std and interval are exact.
        """
        _check_prob(prob)
        loc, quad = self._loc_var(features)
        q = jnp.full((), (1 + prob) / 2, loc.dtype)
        if self.noise_scale is not None:
            var = self.noise_scale**2 + quad
            half = jnp.sqrt(var) * dist.Normal(jnp.zeros((), loc.dtype), 1.0).icdf(q)
            std = jnp.broadcast_to(jnp.sqrt(var), loc.shape)
        else:
            df = 2 * self.concentration
            scale2 = self.rate / self.concentration * (1 + quad)  # (batch, outputs)
            half = jnp.sqrt(scale2) * student_t_icdf(q, df)
            # infinite variance for df <= 2
            std = jnp.where(df > 2, jnp.sqrt(scale2 * df / jnp.maximum(df - 2, 1e-12)), jnp.inf)
        samples = fsamples = None
        if key is not None:
            fsamples, samples = _draw(self, features, key, num_samples)
            samples, fsamples = self._out(samples), self._out(fsamples)
        return Prediction(
            self._out(loc),
            self._out(std),
            self._out(loc - half),
            self._out(loc + half),
            samples,
            fsamples,
            prob,
        )

    def log_predictive_density(
        self, features: Float[ArrayIn, "batch features"], y: Real[ArrayIn, " batch *outputs"]
    ) -> Float[Array, " batch"]:
        """Exact `log p(y_i | x_i, data)` per example (summed over outputs)."""
        loc, quad = self._loc_var(features)
        y = y.reshape(loc.shape).astype(loc.dtype)
        if self.noise_scale is not None:
            lp = dist.Normal(loc, jnp.sqrt(self.noise_scale**2 + quad)).log_prob(y)
        else:
            scale = jnp.sqrt(self.rate / self.concentration * (1 + quad))
            lp = dist.StudentT(2 * self.concentration, loc, scale).log_prob(y)
        return lp.sum(-1)


def _draw(
    head: ConjugateGaussianHead, features: Array, key: PRNGKeyArray, num: int
) -> tuple[Array, Array]:
    phi = _design(features, head.use_bias)
    kw, kn, ks = jax.random.split(key, 3)
    chol = jnp.linalg.cholesky(head.cov)
    f_dim, k_dim = head.mean.shape
    z = jax.random.normal(kw, (num, f_dim, k_dim), phi.dtype)
    if head.noise_scale is not None:
        sigma = jnp.broadcast_to(head.noise_scale, (num, 1, k_dim))
    else:
        var = dist.InverseGamma(head.concentration, head.rate).sample(ks, (num,))  # (num, k)
        sigma = jnp.sqrt(var)[:, None, :]
    w = head.mean + jnp.einsum("fg,ngk->nfk", chol, z)
    if head.noise_scale is None:  # Normal-inverse-gamma: w | sigma^2 ~ N(mean, sigma^2 cov)
        w = head.mean + (w - head.mean) * sigma
    f = jnp.einsum("bf,nfk->nbk", phi, w)
    y = f + sigma * jax.random.normal(kn, f.shape, f.dtype)
    return f, y


def fit_conjugate_gaussian(
    features: Float[ArrayIn, "batch features"],
    y: Real[ArrayIn, " batch *outputs"],
    *,
    prior_scale: float = 1.0,
    noise_scale: float | None = None,
    noise_concentration: float = 1.0,
    noise_rate: float = 1.0,
    use_bias: bool = True,
    mask: Shaped[ArrayIn, " batch"] | None = None,
) -> ConjugateGaussianHead:
    """Closed-form Bayesian linear regression on fixed features.

    Known noise (`noise_scale` given): prior `w ~ N(0, prior_scale^2 I)`, posterior precision
    `I / prior_scale^2 + Phi^T Phi / sigma^2` and mean `cov Phi^T y / sigma^2`. Unknown noise
    (`noise_scale=None`): the Normal-inverse-gamma model with `sigma^2 ~ InvGamma(noise_concentration,
    noise_rate)` and `w | sigma^2 ~ N(0, sigma^2 prior_scale^2 I)`.

    **Arguments:**

    - `features`: `(batch, features)`; a constant column is appended when `use_bias`.
    - `y`: `(batch,)` or `(batch, outputs)` targets (outputs are independent, sharing `cov`).
    - `prior_scale`, `noise_scale`, `noise_concentration`, `noise_rate`: as above.
    - `mask`: `(batch,)` booleans; `False` rows are left out.

    **Returns:** a `ConjugateGaussianHead`.
    """
    check_positive_numbers("fit_conjugate_gaussian", prior_scale=prior_scale)
    if noise_scale is not None:
        check_positive_numbers("fit_conjugate_gaussian", noise_scale=noise_scale)
    if features.ndim != 2 or y.shape[:1] != features.shape[:1] or y.ndim > 2:
        raise ShapeError(
            f"expected features (batch, features) and y (batch,) or (batch, outputs) with the same "
            f"batch; got {shape_str(features.shape)} and {shape_str(y.shape)}."
        )
    dtype = features.dtype
    phi = _design(features, use_bias)
    y2 = y.reshape(y.shape[0], -1).astype(dtype)
    if mask is not None:
        if mask.shape != y.shape[:1]:
            raise ShapeError(
                f"a conjugate head takes a (batch,) mask; got {shape_str(mask.shape)}."
            )
        keep = mask[:, None]
        # where, not a product: unobserved targets may be NaN
        phi = jnp.where(keep, phi, jnp.zeros((), dtype))
        y2 = jnp.where(keep, y2, jnp.zeros((), dtype))
        n = mask.astype(jnp.int32).sum().astype(dtype)
    else:
        n = jnp.full((), y.shape[0], dtype)
    eye = jnp.eye(phi.shape[1], dtype=dtype)
    s0 = jnp.full((), prior_scale**-2, dtype)
    if noise_scale is not None:
        noise = jnp.full((), noise_scale, dtype)
        precision = s0 * eye + phi.T @ phi / noise**2
        chol = jax.scipy.linalg.cho_factor(precision, lower=True)
        cov = jax.scipy.linalg.cho_solve(chol, eye)
        mean = jax.scipy.linalg.cho_solve(chol, phi.T @ y2 / noise**2)
        return ConjugateGaussianHead(mean, cov, noise, None, None, use_bias, y.ndim == 1)
    precision = s0 * eye + phi.T @ phi
    chol = jax.scipy.linalg.cho_factor(precision, lower=True)
    cov = jax.scipy.linalg.cho_solve(chol, eye)
    mean = jax.scipy.linalg.cho_solve(chol, phi.T @ y2)
    conc = jnp.full((), noise_concentration, dtype) + n / 2
    # b_N = b_0 + (y^T y - m^T Lambda m) / 2 (prior mean 0)
    rate = noise_rate + 0.5 * ((y2**2).sum(0) - jnp.einsum("fk,fg,gk->k", mean, precision, mean))
    return ConjugateGaussianHead(mean, cov, None, conc, rate, use_bias, y.ndim == 1)


class BayesianLastLayer(eqx.Module):
    """A deterministic trunk with a Bayesian linear head on its features.

    Made by `fit_last_layer`. The head is a `ConjugateGaussianHead` (exact) or a `Posterior`
    over an `eqx.nn.Linear` applied to the features (NUTS or SVI).

    **Fields:** `trunk` (fixed), `head`, `shift` and `scale` (the head sees
    `(trunk(x) - shift) / scale`; 0 and 1 unless fitted with `standardize=True`), `batch_size`
    (examples per trunk chunk).
    """

    trunk: PyTree
    head: ConjugateGaussianHead | Posterior
    shift: Float[Array, " features"]
    scale: Float[Array, " features"]
    batch_size: int = eqx.field(static=True)

    def features(self, x: Shaped[ArrayIn, "batch ..."]) -> Float[Array, "batch features"]:
        """The head's inputs for `x`: trunk features (computed in chunks), standardised."""
        features = trunk_features(self.trunk, x, batch_size=self.batch_size)
        if features.shape[1] != self.shift.shape[0]:  # would fail as a bare broadcasting error
            raise ShapeError(
                f"the trunk gives {features.shape[1]} features per example for x of shape "
                f"{shape_str(jnp.shape(x))}, but the head was fitted on {self.shift.shape[0]}; "
                f"pass inputs shaped and preprocessed like the training inputs."
            )
        return (features - self.shift) / self.scale

    def predict(
        self,
        x: Shaped[ArrayIn, "batch ..."],
        *,
        key: PRNGKeyArray | None = None,
        prob: float = 0.9,
    ) -> Prediction:
        """The posterior predictive at `x` (see `Prediction`).

        A sampled head needs `key`; a conjugate head is exact without it and also draws
        samples when given one.
        """
        f = self.features(x)
        if isinstance(self.head, ConjugateGaussianHead):
            return self.head.predict(f, prob=prob, key=key)
        if key is None:
            raise ConfigError("a last layer fitted by NUTS or SVI needs key=... to predict.")
        return self.head.predict(f, key=key, prob=prob)

    def log_predictive_density(
        self, x: Shaped[ArrayIn, "batch ..."], y: Shaped[ArrayIn, "batch ..."]
    ) -> Float[Array, " batch"]:
        """`log p(y_i | x_i, data)` per example: exact (conjugate) or Monte Carlo (sampled)."""
        f = self.features(x)
        if isinstance(self.head, ConjugateGaussianHead):
            return self.head.log_predictive_density(f, jnp.asarray(y))
        return self.head.log_predictive_density(f, y)


def _conjugate_noise(likelihood: AbstractLikelihood) -> dict[str, Any] | None:
    if not isinstance(likelihood, Gaussian) or likelihood.heteroscedastic:
        return None
    if likelihood.scale is not None:
        return {"noise_scale": float(likelihood.scale)}  # an array field of the head
    prior = likelihood.variance_prior
    if isinstance(prior, dist.InverseGamma) and prior.batch_shape == ():
        return {"noise_concentration": float(prior.concentration), "noise_rate": float(prior.rate)}
    return None


def fit_last_layer(
    trunk: PyTree,
    x: Any,
    y: Any,
    likelihood: AbstractLikelihood,
    *,
    method: str = "auto",
    prior_scale: float = 1.0,
    num_outputs: int | None = None,
    use_bias: bool = True,
    standardize: bool = False,
    mask: Any = None,
    batch_size: int = 256,
    key: PRNGKeyArray | None = None,
    **inference_kwargs: Any,
) -> BayesianLastLayer:
    """Fit a Bayesian linear head on the features of a fixed, trained trunk.

    The trunk runs once over `x`; inference then only sees `(batch, features)` arrays, so this
    scales to large CNNs or transformers. `method="auto"` uses the closed form when
    `likelihood` is `Gaussian(scale=...)` (Normal posterior) or
    `Gaussian(variance_prior=dist.InverseGamma(a, b))` (Normal-inverse-gamma posterior), and
    NUTS otherwise.

    **Arguments:**

    - `trunk`: a module mapping one example to a feature vector (e.g. a trained network without
      its final layer).
    - `x`, `y`: training inputs and targets.
    - `likelihood`: the head's likelihood.
    - `method`: `"auto"`, `"conjugate"`, `"nuts"` or `"svi"`.
    - `prior_scale`: weights and bias get `Normal(0, prior_scale)` priors (times the noise scale
      in the closed-form Normal-inverse-gamma model; `method="nuts"` or `"svi"` with the same
      `variance_prior` keeps them `Normal(0, prior_scale)`, independent of the noise, so its
      posterior is not the closed form's).
    - `num_outputs`: classes of a `Categorical` head (default: `max(y) + 1`).
    - `use_bias`: give the head a bias.
    - `standardize`: rescale features to zero mean and unit variance on the training data
      (constant features are left unscaled). The prior then acts on standardised features,
      and samplers mix much better when feature scales differ.
    - `mask`: `(batch,)` booleans (or `y`'s shape for sampled heads): unobserved targets.
    - `batch_size`: examples per trunk chunk.
    - `key`: needed by NUTS and SVI.
    - `inference_kwargs`: passed to `run_nuts` or `run_svi` (`num_samples`, `num_chains`, ...);
      an error for the closed form, which samples nothing.

    **Returns:** a `BayesianLastLayer`.
    """
    feats = trunk_features(trunk, x, batch_size=batch_size)
    shift = jnp.zeros(feats.shape[1], feats.dtype)
    scale = jnp.ones(feats.shape[1], feats.dtype)
    if standardize:
        shift, std = feats.mean(0), feats.std(0)
        scale = jnp.where(std > 0, std, jnp.ones((), std.dtype))
        feats = (feats - shift) / scale
    y = jnp.asarray(y)
    conj = _conjugate_noise(likelihood)
    auto = method == "auto"
    if auto:
        method = "conjugate" if conj is not None else "nuts"
    if method == "conjugate":
        if conj is None:
            raise ConfigError(
                f"the closed-form last layer needs Gaussian(scale=...) or Gaussian(variance_prior="
                f"dist.InverseGamma(a, b)); got {likelihood!r}. Use method='nuts' or 'svi'."
            )
        if inference_kwargs:  # num_samples=, num_chains= ... were dropped silently
            raise ConfigError(
                f"fit_last_layer: the closed-form fit (method={'auto' if auto else 'conjugate'!r} "
                f"with {type(likelihood).__name__}) samples nothing, so "
                f"{', '.join(sorted(inference_kwargs))} would be ignored; they are settings of "
                f"run_nuts/run_svi. Drop them, or pass method='nuts' or method='svi' to sample."
            )
        target = tuple(y.shape[1:])
        feats, y, mask = check_data(
            lambda f: jnp.zeros(target, f.dtype), Gaussian(scale=1.0), feats, y, mask
        )
        head = fit_conjugate_gaussian(
            feats, y, prior_scale=prior_scale, use_bias=use_bias, mask=mask, **conj
        )
        return BayesianLastLayer(trunk, head, shift, scale, batch_size)
    if method not in ("nuts", "svi"):
        raise ConfigError(f"method must be 'auto', 'conjugate', 'nuts' or 'svi'; got {method!r}.")
    if key is None:
        raise ConfigError(f"method={method!r} samples: pass key=jax.random.key(...).")
    if isinstance(likelihood, Categorical) and num_outputs is None:
        num_outputs = int(np.max(np.asarray(y))) + 1
    init_key, run_key = jax.random.split(key)
    out_size = likelihood.head_shape(tuple(y.shape[1:]), num_outputs)
    linear = eqx.nn.Linear(
        feats.shape[1], out_size, use_bias=use_bias, key=init_key, dtype=feats.dtype
    )
    model = BayesianModel(linear, float(prior_scale), likelihood)
    run = run_nuts if method == "nuts" else run_svi
    posterior = run(model, feats, y, mask=mask, key=run_key, **inference_kwargs)
    return BayesianLastLayer(trunk, posterior, shift, scale, batch_size)
