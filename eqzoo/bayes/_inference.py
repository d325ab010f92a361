"""Posterior inference for a `BayesianModel`: NUTS (exact, small models) and SVI (scalable)."""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from .._errors import ConfigError, check_positive_numbers, check_sizes, require
from ._model import BayesianModel
from ._posterior import Posterior

numpyro = require("numpyro", "bayes")
infer = require("numpyro.infer", "bayes")
autoguide = require("numpyro.infer.autoguide", "bayes")
optim = require("numpyro.optim", "bayes")


def run_nuts(
    model: BayesianModel,
    x: Any,
    y: Any,
    *,
    mask: Any = None,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 1,
    chain_method: Literal["sequential", "parallel", "vectorized"] = "vectorized",
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    init: str = "uniform",
    progress_bar: bool = False,
    key: PRNGKeyArray,
) -> Posterior:
    """Sample the posterior with the No-U-Turn Sampler (Hoffman & Gelman, 2014).

    **Arguments:**

    - `model`: the `BayesianModel`.
    - `x`, `y`: inputs `(batch, ...)` and targets; `mask` optionally hides targets.
    - `num_warmup`, `num_samples`: adaptation and kept draws per chain.
    - `num_chains`, `chain_method`: as for `numpyro.infer.MCMC`. `"vectorized"` (default) runs
      the chains under one `vmap` and compiles once; `"sequential"` compiles per chain (costly
      for small models, where XLA compilation dominates); `"parallel"` needs a device per chain.
    - `target_accept_prob`, `max_tree_depth`, `dense_mass`: NUTS settings.
    - `init`: `"uniform"` starts each chain at a random point (NumPyro's `init_to_uniform`,
      overdispersed, which R-hat needs); `"module"` starts at the module's current values.
    - `progress_bar`: show NumPyro's progress bar while sampling.
    - `key`: a PRNG key.

    **Returns:** a `Posterior` with `(chains, draws, ...)` samples, divergence counts and the
    leapfrog steps of every draw.
    """
    if num_samples < 1 or num_warmup < 0 or num_chains < 1:
        raise ConfigError(
            f"run_nuts needs num_samples >= 1, num_warmup >= 0 and num_chains >= 1; got "
            f"{num_samples}, {num_warmup}, {num_chains}."
        )
    # max_tree_depth=0 failed inside NumPyro with "IndexError: index is out of bounds"
    check_sizes("run_nuts", max_tree_depth=max_tree_depth)
    if not 0 < target_accept_prob < 1:  # NUTS ran with 1.5 and adapted its step size to it
        raise ConfigError(f"run_nuts: target_accept_prob must be in (0, 1); got {target_accept_prob!r}.")
    x, y, mask = model.check_data(x, y, mask)
    if init == "module":
        strategy = infer.init_to_value(values=model.values())
    elif init == "uniform":
        strategy = infer.init_to_uniform
    else:
        raise ConfigError(f"init must be 'uniform' or 'module'; got {init!r}.")
    kernel = infer.NUTS(
        model.model,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        dense_mass=dense_mass,
        init_strategy=strategy,
    )
    mcmc = infer.MCMC(
        kernel,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method=chain_method,
        progress_bar=progress_bar,
    )
    # NumPyro's samplers mix int and float internally; they are written for standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        mcmc.run(key, x, y, mask=mask, extra_fields=("diverging", "num_steps"))
    samples = mcmc.get_samples(group_by_chain=True)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    return Posterior(
        model,
        {k: samples[k] for k in model.site_names},
        "nuts",
        divergences=extra["diverging"].sum(axis=1),
        num_steps=extra["num_steps"],
    )


def _make_guide(guide: Any, model: BayesianModel, init_scale: float, rank: int | None) -> Any:
    if guide == "normal":
        return autoguide.AutoNormal(model.model, init_scale=init_scale)
    if guide == "lowrank":
        return autoguide.AutoLowRankMultivariateNormal(
            model.model, init_scale=init_scale, rank=rank
        )
    if callable(guide):
        return guide(model.model)
    raise ConfigError(
        f"guide must be 'normal' (AutoNormal), 'lowrank' (AutoLowRankMultivariateNormal) or a "
        f"callable taking the NumPyro model and returning a guide; got {guide!r}."
    )


def run_svi(
    model: BayesianModel,
    x: Any,
    y: Any,
    *,
    mask: Any = None,
    num_steps: int = 2000,
    optimizer: optax.GradientTransformation | Callable[..., optax.GradientTransformation] | None = None,
    learning_rate: float | Float[Array, ""] | None = None,
    guide: str | Callable[[Callable[..., None]], Any] = "normal",
    rank: int | None = None,
    init_scale: float = 0.1,
    num_particles: int = 1,
    subsample_size: int | None = None,
    num_samples: int = 1000,
    key: PRNGKeyArray,
) -> Posterior:
    """Fit a variational posterior by stochastic variational inference, then sample it.

    Maximises the ELBO (`Trace_ELBO`) with an optax optimizer (through
    `numpyro.optim.optax_to_numpyro`). Initialisation, a `lax.scan` over the steps and the draws
    from the guide are one compiled program, cached: a later call with data of the same shapes
    and dtypes, a model of the same structure (new values are fine), the same `guide`,
    `optimizer` object and sizes, and any `key` reuses it instead of compiling again. The
    learning rate given as `learning_rate=` and prior scales are arguments of the program, not
    constants: a sweep over either compiles once.

    **Arguments:**

    - `model`: the `BayesianModel`.
    - `x`, `y`: inputs and targets; `mask` optionally hides targets.
    - `num_steps`: optimisation steps.
    - `optimizer`: an optax transformation; `optax.adam(1e-2)` by default. It is part of the
      compiled program: pass the same object again to reuse the program. With
      `learning_rate=`, an optax optimizer *factory* instead (`optax.adam`, the default, or
      `optax.adamw`, `optax.sgd`, ...), called as `optimizer(learning_rate)`.
    - `learning_rate`: a positive float or scalar array; it is passed to the compiled program as
      an argument, so fits that differ only in it (a learning-rate sweep) compile once.
    - `guide`: `"normal"` (mean-field `AutoNormal`), `"lowrank"`
      (`AutoLowRankMultivariateNormal` of rank `rank`) or a callable `model -> guide`.
    - `rank`: the rank of the `"lowrank"` guide (NumPyro's default when `None`); an error
      with any other guide.
    - `init_scale`: the guide's initial scale.
    - `num_particles`: ELBO samples per step.
    - `subsample_size`: minibatch size; the likelihood is rescaled to the full data.
    - `num_samples`: draws taken from the fitted guide.
    - `key`: a PRNG key.

    **Returns:** a `Posterior` with one "chain" of `num_samples` draws and the loss per step.
    """
    # num_particles=0 returned NaN losses, and num_steps=2.5 ran, without an error
    check_sizes("run_svi", num_steps=num_steps, num_samples=num_samples, num_particles=num_particles)
    check_positive_numbers("run_svi", init_scale=init_scale)
    x, y, mask = model.check_data(x, y, mask)
    if learning_rate is not None:
        check_positive_numbers("run_svi", learning_rate=learning_rate)
        if optimizer is None:
            optimizer = optax.adam
        elif isinstance(optimizer, optax.GradientTransformation) or not callable(optimizer):
            raise ConfigError(
                f"run_svi: with learning_rate=..., optimizer must be an optax optimizer factory "
                f"called as optimizer(learning_rate), e.g. optax.adam or optax.adamw; got "
                f"{type(optimizer).__name__}. Pass optax.adam rather than optax.adam(1e-2), or "
                f"drop learning_rate."
            )
        learning_rate = jnp.asarray(learning_rate, dtype=jnp.result_type(float))
    if subsample_size is not None and not 0 < subsample_size <= x.shape[0]:
        raise ConfigError(
            f"subsample_size must be in [1, {x.shape[0]}] (the number of examples); got "
            f"{subsample_size}."
        )
    if rank is not None and (callable(guide) or guide != "lowrank"):
        # NumPyro's AutoNormal has no rank: it was dropped silently, fitting mean-field
        raise ConfigError(
            f"run_svi: rank={rank!r} is the rank of guide='lowrank' "
            f"(AutoLowRankMultivariateNormal); guide={guide!r} does not use it. Pass "
            f"guide='lowrank' with it, or drop rank."
        )
    if not callable(guide):  # a bad name fails here, not while tracing
        _make_guide(guide, model, init_scale, rank)
    settings = dict(
        num_steps=num_steps,
        optimizer=optimizer if optimizer is not None else _DEFAULT_OPTIMIZER,
        learning_rate=learning_rate,  # an array (or None): a traced argument, not a constant
        guide=guide,
        rank=rank,
        init_scale=float(init_scale),
        num_particles=num_particles,
        subsample_size=subsample_size,
        num_samples=num_samples,
    )
    with jax.numpy_dtype_promotion("standard"):  # as in run_nuts
        losses, draws, finite = _svi_compiled(model, x, y, mask, key, **settings)
        if not finite:
            # NumPyro checks distribution parameters only outside `jit`: rerun eagerly so that a
            # model that is invalid at its initial values, or a fit that diverged, fails (or
            # returns) exactly as `SVI.run` does, with NumPyro's message.
            losses, draws = _svi_fit_and_sample(model, x, y, mask, key, **settings)
    samples = {k: jnp.expand_dims(draws[k], 0) for k in model.site_names}
    return Posterior(model, samples, "svi", losses=losses)


# One optax object for the default, so calls without `optimizer=` share a compiled program.
_DEFAULT_OPTIMIZER = optax.adam(1e-2)


def _svi_fit_and_sample(
    model: BayesianModel,
    x: Any,
    y: Any,
    mask: Any,
    key: PRNGKeyArray,
    *,
    num_steps: int,
    optimizer: Any,
    learning_rate: Any,
    guide: Any,
    rank: int | None,
    init_scale: float,
    num_particles: int,
    subsample_size: int | None,
    num_samples: int,
) -> tuple[Any, dict[str, Any]]:
    # What `SVI.run(progress_bar=False)` then `guide.sample_posterior` compute.
    g = _make_guide(guide, model, init_scale, rank)
    opt = optim.optax_to_numpyro(optimizer if learning_rate is None else optimizer(learning_rate))
    svi = infer.SVI(model.model, g, opt, loss=infer.Trace_ELBO(num_particles=num_particles))
    fit_key, sample_key = jax.random.split(key)
    data = dict(mask=mask, subsample_size=subsample_size)
    state = svi.init(fit_key, x, y, **data)

    def step(state: Any, _: None) -> tuple[Any, Any]:
        return svi.update(state, x, y, **data)

    state, losses = jax.lax.scan(step, state, None, length=num_steps)
    params = svi.get_params(state)
    draws = g.sample_posterior(sample_key, params, x, y, **data, sample_shape=(num_samples,))
    return losses, draws


@eqx.filter_jit
def _svi_compiled(
    model: BayesianModel, x: Any, y: Any, mask: Any, key: PRNGKeyArray, **settings: Any
) -> Any:
    # `SVI.run` builds a fresh step closure each call and runs its `lax.scan` outside `jit`, so
    # every call compiled anew; here the data, the model's arrays and the key are arguments, and
    # the rest (model structure, guide, optimizer object, sizes) is the compilation cache key.
    # The learning rate, when given, and the model's prior parameters are arrays: arguments.
    losses, draws = _svi_fit_and_sample(model, x, y, mask, key, **settings)
    finite = jnp.isfinite(losses).all()
    for d in jax.tree.leaves(draws):
        finite = finite & jnp.isfinite(d).all()
    return losses, draws, finite
