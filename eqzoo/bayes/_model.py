"""`BayesianModel`: an Equinox module with priors on some of its leaves, plus a likelihood head."""

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, PyTree, Shaped

from .._errors import ConfigError, EqzooError, ShapeError, require, shape_str
from ._likelihoods import AbstractLikelihood, check_target_shape
from ._priors import PriorSpec, resolve_priors
from ._types import ArrayIn

numpyro = require("numpyro", "bayes")


class NonFiniteDataError(EqzooError, ValueError):
    """Inputs or observed targets contain NaN or infinity where they are used."""


OBS_SITE = "obs"
DATA_PLATE = "data"


class BayesianModel(eqx.Module):
    """A NumPyro model made from any Equinox module: priors on chosen leaves, the rest fixed.

    Each random leaf becomes one NumPyro sample site named by its path (e.g.
    `"layers[2].weight"`); the likelihood head's own parameters are sites too (e.g.
    `"noise_scale"`), and the observations are the site `"obs"` inside the plate `"data"`.
    The module is called on one example and batched with `jax.vmap`.

    ```python
    net = eqx.nn.MLP(1, "scalar", 16, 2, activation=jnp.tanh, key=key)
    bnn = BayesianModel(net, {"*.weight": FanInNormal(1.0), "*.bias": 1.0}, Gaussian())
    posterior = run_nuts(bnn, x, y, key=key)
    ```

    **Arguments:**

    - `module`: any Equinox module (or pytree callable) taking one example.
    - `priors`: which leaves are random and their priors: one prior for every floating leaf, or
      `{pattern: prior}` / `[(pattern, prior), ...]` with the first matching rule winning.
      Patterns are globs on paths (`"*.weight"`, `"layers[2].*"`), compiled regexes, `Subtree`s
      or predicates `(path, leaf) -> bool`; priors are NumPyro distributions (broadcast to the
      leaf), floats `s` for `Normal(0, s)`, callables `(path, leaf) -> distribution` such as
      `FanInNormal` or `AroundValue`, or `None` to keep matching leaves fixed.
    - `likelihood`: the likelihood head (`Gaussian`, `StudentT`, `Bernoulli`, `Categorical`,
      `Poisson`).
    """

    module: PyTree
    likelihood: AbstractLikelihood
    priors: tuple[Any, ...]
    paths: tuple[str, ...] = eqx.field(static=True)
    indices: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, module: PyTree, priors: PriorSpec, likelihood: AbstractLikelihood):
        if not isinstance(likelihood, AbstractLikelihood):
            raise ConfigError(
                f"likelihood must be an eqzoo.bayes likelihood head (Gaussian, StudentT, "
                f"Bernoulli, Categorical, Poisson); got {likelihood!r}."
            )
        indices, paths, dists, _ = resolve_priors(module, priors)
        clash = set(paths) & ({OBS_SITE, DATA_PLATE} | set(likelihood.site_names))
        if clash:
            raise ConfigError(f"parameter path(s) {sorted(clash)} clash with reserved site names.")
        self.module = module
        self.likelihood = likelihood
        self.priors = dists
        self.paths = paths
        self.indices = indices

    @property
    def site_names(self) -> tuple[str, ...]:
        """Every latent site of the model: the random leaves' paths, then the head's sites."""
        return self.paths + self.likelihood.site_names

    def values(self) -> dict[str, Array]:
        """The module's current values of the random leaves, keyed by site name."""
        leaves = jtu.tree_leaves(self.module)
        return {p: leaves[i] for p, i in zip(self.paths, self.indices, strict=True)}

    def build(self, values: Mapping[str, Array]) -> PyTree:
        """The module with its random leaves replaced by `values` (keyed by path)."""
        leaves, treedef = jtu.tree_flatten(self.module)
        for path, i in zip(self.paths, self.indices, strict=True):
            leaves[i] = values[path]
        return jtu.tree_unflatten(treedef, leaves)

    def sample_module(self) -> PyTree:
        """Inside a NumPyro model: sample every random leaf from its prior; return the module.

        Usable on its own to put this module inside a hand-written NumPyro model.
        """
        return self.build(
            {p: numpyro.sample(p, d) for p, d in zip(self.paths, self.priors, strict=True)}
        )

    def model(
        self,
        x: Shaped[ArrayIn, "batch ..."],
        y: Shaped[ArrayIn, "batch ..."] | None = None,
        *,
        mask: Shaped[ArrayIn, "batch ..."] | None = None,
        subsample_size: int | None = None,
    ) -> None:
        """The NumPyro model: priors, then `y[i] ~ likelihood(module(x[i]))` in plate `"data"`.

        **Arguments:**

        - `x`: inputs, one example per row.
        - `y`: observed targets, or `None` to sample them (prior predictive).
        - `mask`: boolean, `(batch,)` or `y`'s shape; `False` entries are not observed.
        - `subsample_size`: if set, each evaluation uses a random minibatch of that many
          examples and scales its log likelihood by `batch / subsample_size` (for SVI).
        """
        module = self.sample_module()
        params = self.likelihood.sample_params()
        n = x.shape[0]
        with numpyro.plate(DATA_PLATE, n, subsample_size=subsample_size) as idx:
            if subsample_size is not None:
                x = x[idx]
                y = None if y is None else y[idx]
                mask = None if mask is None else mask[idx]
            output = jax.vmap(module)(x)
            self.likelihood.observe(OBS_SITE, output, params, y, mask)

    def outputs(self, values: Mapping[str, Array], x: Shaped[ArrayIn, "batch ..."]) -> Array:
        """The batched module output with the random leaves set to `values`."""
        return jax.vmap(self.build(values))(x)

    def log_density(
        self,
        values: Mapping[str, Array],
        x: Shaped[ArrayIn, "batch ..."],
        y: Shaped[ArrayIn, "batch ..."],
        *,
        mask: Shaped[ArrayIn, "batch ..."] | None = None,
    ) -> Float[Array, ""]:
        """The joint log density `log p(values, y | x)` (priors plus likelihood).

        **Arguments:**

        - `values`: a value for every latent site (see `site_names`).
        - `x`, `y`, `mask`: as for `model`.

        **Returns:** a scalar.
        """
        from numpyro.infer.util import log_density

        with jax.numpy_dtype_promotion("standard"):  # NumPyro's internals assume it
            lp, _ = log_density(self.model, (x, y), {"mask": mask}, dict(values))
        return lp

    def check_data(
        self,
        x: Any,
        y: Any,
        mask: Any = None,
    ) -> tuple[Array, Array, Array | None]:
        """Validate data before inference and return it as JAX arrays.

        Raises `ShapeError` when `y` (or `mask`) does not fit the module's output and the head,
        and `NonFiniteDataError` when `x` or an observed entry of `y` is NaN or infinite.
        """
        return check_data(self.module, self.likelihood, x, y, mask)


def module_output_shape(module: Any, x: Array) -> tuple[int, ...]:
    try:
        out = jax.eval_shape(jax.vmap(module), x)
    except Exception as err:  # the module's own error, with the batching rule added
        raise ShapeError(
            f"calling the module on inputs x of shape {shape_str(x.shape)} (vmapped over the "
            f"first axis, so one example has shape {shape_str(x.shape[1:])}) failed: {err} "
            f"(eqzoo.bayes batches x itself, one example per row: pass a single example as "
            f"x[None].)"
        ) from err
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ShapeError(f"the module must return one array per example; got {out}.")
    return tuple(out.shape)


def check_data(
    module: Any, likelihood: AbstractLikelihood, x: Any, y: Any, mask: Any = None
) -> tuple[Array, Array, Array | None]:
    """Validate `(x, y, mask)` for `module` and `likelihood`; see `BayesianModel.check_data`."""
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    mask = None if mask is None else jnp.asarray(mask)
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ShapeError(
            f"x and y need a leading batch axis of the same length; got x of shape "
            f"{shape_str(x.shape)} and y of shape {shape_str(y.shape)}."
        )
    if x.shape[0] == 0:  # NumPyro failed on it with a bare "size of plate should be positive"
        raise ShapeError(
            f"x and y hold no examples (x of shape {shape_str(x.shape)}, y of shape "
            f"{shape_str(y.shape)}); a posterior needs data: check the split or filter that "
            f"made them."
        )
    if mask is not None and mask.dtype != jnp.bool_:
        raise ShapeError(f"the observation mask must be boolean; got dtype {mask.dtype}.")
    output_shape = module_output_shape(module, x)
    check_target_shape(likelihood, output_shape, y, mask)
    if isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer):
        return x, y, mask
    if jnp.issubdtype(x.dtype, jnp.inexact) and not np.isfinite(np.asarray(x)).all():
        bad = np.argwhere(~np.isfinite(np.asarray(x)))[:3].tolist()
        raise NonFiniteDataError(
            f"inputs x contain NaN or infinity (first at indices {bad}); clean or impute them "
            f"— a mask only hides targets."
        )
    if jnp.issubdtype(y.dtype, jnp.inexact):
        finite = np.isfinite(np.asarray(y))
        if mask is not None:
            m = np.asarray(mask).reshape(mask.shape + (1,) * (y.ndim - mask.ndim))
            finite = finite | ~np.broadcast_to(m, y.shape)
        if not finite.all():
            bad = np.argwhere(~finite)[:3].tolist()
            raise NonFiniteDataError(
                f"observed targets y contain NaN or infinity (first at indices {bad}); drop those "
                f"examples or pass mask=... with False there to leave them unobserved."
            )
    observed = np.ones(y.shape, bool)
    if mask is not None:
        observed = np.broadcast_to(np.asarray(mask).reshape(mask.shape + (1,) * (y.ndim - mask.ndim)), y.shape)
    likelihood.check_target_values(np.asarray(y)[observed], output_shape[1:])
    return x, y, mask
