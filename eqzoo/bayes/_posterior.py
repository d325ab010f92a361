"""Posterior samples over a `BayesianModel`, and the posterior predictive computed from them."""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Shaped

from .._errors import ConfigError, require
from ._model import BayesianModel, module_output_shape
from ._types import ArrayIn

diagnostics = require("numpyro.diagnostics", "bayes")


class Prediction(eqx.Module):
    """A posterior predictive summary at a batch of inputs.

    For regression and count heads `lower`/`upper` bound draws of `y` (noise included). For
    classifiers (`Bernoulli`, `Categorical`) they bound the predicted probabilities over the
    posterior (a credible band on `mean`), since quantiles of labels say little.

    **Fields:**

    - `mean`: `E[y | x, data]`, `(batch, *target)`; class probabilities `(batch, classes)` for
      `Categorical`, the probability of `1` for `Bernoulli`.
    - `std`: the predictive standard deviation (law of total variance), shaped like `mean`.
    - `lower`, `upper`: the central `prob` interval, shaped like `mean`.
    - `samples`: draws of `y`, `(samples, batch, *target)`, or `None` when not drawn.
    - `function_samples`: the mean function `E[y | x, theta_s]` per posterior sample,
      `(samples, batch, ...)`, or `None` for closed-form predictions.
    - `prob`: the interval's probability mass.
    - `num_chains`: how many MCMC chains `function_samples` is made of (in order), if any.
    """

    mean: Array
    std: Array
    lower: Array
    upper: Array
    samples: Array | None
    function_samples: Array | None
    prob: float = eqx.field(static=True)
    num_chains: int | None = eqx.field(static=True, default=None)

    def function_space_diagnostics(self) -> dict[str, float]:
        """R-hat and effective sample size of the mean function at this prediction's inputs.

        Weight-space R-hat is uninformative for neural networks (permuting hidden units gives
        the same function), so convergence is judged on the predictions instead.

        **Returns:** `{"r_hat_max": float, "ess_min": float}` over all entries of the mean
        function (split-R-hat and ESS as in `numpyro.diagnostics`). For NUTS they judge the
        chains' mixing. An SVI posterior's draws are independent samples of the fitted guide,
        so its R-hat is ~1 and its ESS ~ the number of draws by construction: they say nothing
        about how well the guide fits (compare predictions on held-out data instead).
        """
        if self.function_samples is None or self.num_chains is None:
            raise ConfigError(
                "function-space diagnostics need a prediction from posterior samples (NUTS or "
                "SVI); this one is closed form."
            )
        f = np.asarray(self.function_samples)
        return dict(
            zip(
                ("r_hat_max", "ess_min"),
                rhat_ess(f.reshape((self.num_chains, -1) + f.shape[1:])),
                strict=True,
            )
        )


def _check_prob(prob: float) -> None:
    if not 0 < prob < 1:
        raise ConfigError(f"prob is the interval's probability mass, in (0, 1); got {prob}.")


def _quantiles(a: Array, prob: Float[Array, ""]) -> tuple[Array, Array]:
    q = jnp.quantile(a, jnp.stack([(1 - prob) / 2, (1 + prob) / 2]).astype(a.dtype), axis=0)
    return q[0], q[1]


@eqx.filter_jit
def _predict(
    model: BayesianModel,
    samples: dict[str, Array],
    x: Array,
    key: PRNGKeyArray,
    prob: Float[Array, ""],
) -> tuple[Array, ...]:
    lik = model.likelihood

    def one(values: dict[str, Array], k: PRNGKeyArray) -> tuple[Array, Array, Array]:
        out = model.outputs(values, x)
        params = {s: values[s] for s in lik.site_names}
        draw = lik.distribution(out, params).sample(k)
        return lik.mean(out, params), lik.variance(out, params), draw

    num = jax.tree_util.tree_leaves(samples)[0].shape[0]
    means, variances, draws = jax.vmap(one)(samples, jax.random.split(key, num))
    mean = means.mean(0)
    std = jnp.sqrt(variances.mean(0) + means.var(0))
    lower, upper = _quantiles(means if lik.classifier else draws.astype(mean.dtype), prob)
    return mean, std, lower, upper, draws, means


@eqx.filter_jit
def _log_likelihood(
    model: BayesianModel, samples: dict[str, Array], x: Array, y: Array, mask: Array | None
) -> Array:
    lik = model.likelihood

    def one(values: dict[str, Array]) -> Array:
        out = model.outputs(values, x)
        params = {s: values[s] for s in lik.site_names}
        d = lik.distribution(out, params)
        yy = lik.prepare_target(y, out.dtype)
        m = None
        if mask is not None:
            m = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (yy.ndim - mask.ndim)), yy.shape)
            yy = jnp.where(m, yy, jnp.zeros((), yy.dtype))
        lp = d.log_prob(yy)
        if m is not None:
            lp = jnp.where(m, lp, jnp.zeros((), lp.dtype))
        return lp.reshape(lp.shape[0], -1).sum(-1)

    return jax.vmap(one)(samples)


def rhat_ess(draws: np.ndarray) -> tuple[float, float]:
    """Worst split-R-hat and smallest effective sample size over all entries.

    **Arguments:**

    - `draws`: `(chains, draws, ...)` samples of any quantity.

    **Returns:** `(r_hat_max, ess_min)`; R-hat is NaN with fewer than 4 draws per chain.
    """
    draws = np.asarray(draws, np.float64)
    draws = draws.reshape(draws.shape[0], draws.shape[1], -1)
    if draws.shape[1] < 4:
        return math.nan, math.nan
    r_hat = diagnostics.split_gelman_rubin(draws)
    ess = diagnostics.effective_sample_size(draws)
    return float(np.nanmax(r_hat)), float(np.nanmin(ess))


class Posterior(eqx.Module):
    """Posterior samples of a `BayesianModel`, from `run_nuts` or `run_svi`.

    **Fields:**

    - `model`: the `BayesianModel`.
    - `samples`: site name -> `(chains, draws, *site_shape)` array (SVI: one chain).
    - `method`: `"nuts"` or `"svi"`.
    - `divergences`: NUTS divergent transitions per chain, or `None`.
    - `losses`: the SVI loss (negative ELBO) per step, or `None`.
    - `num_steps`: NUTS leapfrog steps per draw, `(chains, draws)`, or `None`.
    """

    model: BayesianModel
    samples: dict[str, Array]
    method: str = eqx.field(static=True)
    divergences: Array | None = None
    losses: Array | None = None
    num_steps: Array | None = None

    @property
    def num_chains(self) -> int:
        return int(jax.tree_util.tree_leaves(self.samples)[0].shape[0])

    @property
    def num_samples(self) -> int:
        """Total number of draws over all chains."""
        leaf = jax.tree_util.tree_leaves(self.samples)[0]
        return int(leaf.shape[0] * leaf.shape[1])

    def flat_samples(self) -> dict[str, Array]:
        """`samples` with chains and draws merged: site -> `(samples, *site_shape)`."""
        return {k: v.reshape((-1,) + v.shape[2:]) for k, v in self.samples.items()}

    def module_at(self, index: int) -> PyTree:
        """The module with its random leaves set to the `index`-th flat posterior draw."""
        return self.model.build({k: v[index] for k, v in self.flat_samples().items()})

    def function_samples(
        self, x: Shaped[ArrayIn, "batch ..."]
    ) -> Float[Array, "samples batch ..."]:
        """`E[y | x, theta_s]` for every posterior draw `theta_s` (the mean function)."""
        return self.predict(x, key=jax.random.key(0)).function_samples

    def predict(
        self, x: Shaped[ArrayIn, "batch ..."], *, key: PRNGKeyArray, prob: float = 0.9
    ) -> Prediction:
        """The posterior predictive at `x`: mean, std, central `prob` interval and draws.

        Computed with `jax.vmap` over posterior draws and over examples.

        **Arguments:**

        - `x`: inputs, `(batch, ...)`.
        - `key`: for drawing `y` once per posterior sample.
        - `prob`: the interval's probability mass.

        **Returns:** a `Prediction`.
        """
        _check_prob(prob)
        x = jnp.asarray(x)
        try:
            with jax.numpy_dtype_promotion("standard"):  # NumPyro's samplers assume it
                mean, std, lower, upper, draws, means = _predict(
                    # prob as an array: a sweep over interval levels (a calibration curve) compiles once
                    self.model, self.flat_samples(), x, key, jnp.asarray(prob, jnp.result_type(float))
                )
        except Exception:
            # A single example x of shape (features,) failed inside the module with its own
            # advice to wrap the call in jax.vmap, which predict already does: when the module
            # cannot take x's rows, say so (and to pass x[None]). Checked only on failure: the
            # check traces the module, which cost ~10 ms per call (half a small predict).
            module_output_shape(self.model.module, x)
            raise
        return Prediction(mean, std, lower, upper, draws, means, prob, self.num_chains)

    def log_likelihood(
        self,
        x: Shaped[ArrayIn, "batch ..."],
        y: Shaped[ArrayIn, "batch ..."],
        *,
        mask: Shaped[ArrayIn, "batch ..."] | None = None,
    ) -> Float[Array, "samples batch"]:
        """`log p(y_i | x_i, theta_s)` per draw and example (summed over target entries)."""
        x, y, mask = self.model.check_data(x, y, mask)
        with jax.numpy_dtype_promotion("standard"):  # as in predict
            return _log_likelihood(self.model, self.flat_samples(), x, y, mask)

    def log_predictive_density(
        self,
        x: Shaped[ArrayIn, "batch ..."],
        y: Shaped[ArrayIn, "batch ..."],
        *,
        mask: Shaped[ArrayIn, "batch ..."] | None = None,
    ) -> Float[Array, " batch"]:
        """`log p(y_i | x_i, data)`, the Monte Carlo posterior predictive density per example."""
        ll = self.log_likelihood(x, y, mask=mask)
        return jax.nn.logsumexp(ll, axis=0) - math.log(ll.shape[0])

    def diagnostics(self) -> dict[str, Any]:
        """Convergence diagnostics in parameter space.

        **Returns:** `{"r_hat_max", "ess_min", "sites": {site: {"r_hat_max", "ess_min"}}}`
        plus `"divergences"` for NUTS. R-hat is split-R-hat (Gelman et al., BDA3); with
        networks whose hidden units can be permuted prefer `function_space_diagnostics`.
        """
        sites = {
            k: dict(zip(("r_hat_max", "ess_min"), rhat_ess(np.asarray(v)), strict=True))
            for k, v in self.samples.items()
        }
        out: dict[str, Any] = {
            "r_hat_max": max((s["r_hat_max"] for s in sites.values()), default=math.nan),
            "ess_min": min((s["ess_min"] for s in sites.values()), default=math.nan),
            "sites": sites,
        }
        if self.divergences is not None:
            out["divergences"] = int(np.asarray(self.divergences).sum())
        return out

    def function_space_diagnostics(self, x: Shaped[ArrayIn, "batch ..."]) -> dict[str, float]:
        """R-hat and effective sample size of the mean function `E[y | x, theta]` at `x`.

        The same as `self.predict(x, ...).function_space_diagnostics()`; see there.
        """
        return self.predict(x, key=jax.random.key(0)).function_space_diagnostics()
