"""NUTS and SVI through the bridge; the posterior predictive; the regression example's checks."""

import importlib.util
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqzoo._errors as errors
import eqzoo.bayes as bayes

ROOT = Path(__file__).resolve().parents[2]


def _linear_problem(n=40, noise=0.3, seed=0, nan_at=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = (x @ np.array([1.0, -0.5]) + 0.3 + noise * rng.normal(size=n)).astype(np.float32)
    if nan_at is not None:
        y[nan_at] = np.nan
    return x, y


def _linear_model(noise=0.3):
    lin = eqx.nn.Linear(2, "scalar", key=jax.random.key(0))
    return bayes.BayesianModel(lin, 1.0, bayes.Gaussian(noise))


def test_svi_lowrank_matches_exact_posterior_mean():
    x, y = _linear_problem()
    exact = bayes.fit_conjugate_gaussian(jnp.asarray(x), jnp.asarray(y), noise_scale=0.3)
    post = bayes.run_svi(
        _linear_model(),
        x,
        y,
        guide="lowrank",
        rank=2,
        num_steps=1000,
        optimizer=optax.adam(2e-2),
        num_samples=2000,
        key=jax.random.key(0),
    )
    assert post.samples["weight"].shape == (1, 2000, 1, 2) and post.losses.shape == (1000,)
    flat = post.flat_samples()
    w = jnp.concatenate([flat["weight"].reshape(2000, 2), flat["bias"].reshape(2000, 1)], 1)
    sd = jnp.sqrt(jnp.diag(exact.cov))
    # the ELBO optimum of a Gaussian guide is the exact posterior here; SGD noise leaves < 1 sd
    assert (jnp.abs(w.mean(0) - exact.mean[:, 0]) < sd).all()
    assert (jnp.abs(w.std(0) / sd - 1) < 0.3).all()


def test_svi_mean_field_with_subsampling_and_masked_nans():
    x, y = _linear_problem(n=60, nan_at=[3, 17])
    mask = np.isfinite(y)
    model = _linear_model()
    post = bayes.run_svi(
        model,
        x,
        y,
        mask=mask,
        subsample_size=16,
        num_steps=1500,
        num_samples=500,
        key=jax.random.key(1),
    )
    assert jnp.isfinite(post.losses).all()
    exact = bayes.fit_conjugate_gaussian(
        jnp.asarray(x), jnp.asarray(np.nan_to_num(y)), noise_scale=0.3, mask=jnp.asarray(mask)
    )
    flat = post.flat_samples()
    w = jnp.concatenate([flat["weight"].reshape(500, 2), flat["bias"].reshape(500, 1)], 1)
    sd = jnp.sqrt(jnp.diag(exact.cov))
    # minibatch gradients are noisy: 3 posterior sd
    assert (jnp.abs(w.mean(0) - exact.mean[:, 0]) < 3 * sd).all()
    ll = post.log_likelihood(x, y, mask=mask)
    assert ll.shape == (500, 60) and jnp.isfinite(ll).all()


def _numpyro_svi(model, x, y, num_steps, num_samples, key):
    # run_svi's reference: NumPyro's own SVI.run, then draws from the fitted guide
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.optim import optax_to_numpyro

    guide = AutoNormal(model.model, init_scale=0.1)
    svi = SVI(model.model, guide, optax_to_numpyro(optax.adam(1e-2)), Trace_ELBO())
    fit_key, sample_key = jax.random.split(key)
    with jax.numpy_dtype_promotion("standard"):
        result = svi.run(fit_key, num_steps, x, y, progress_bar=False)
        draws = guide.sample_posterior(sample_key, result.params, x, y, sample_shape=(num_samples,))
    return result.losses, draws


def test_svi_refit_on_same_shaped_data_compiles_nothing_and_matches_numpyro(compile_log):
    x0, y0 = _linear_problem(n=32, seed=0)
    x1, y1 = _linear_problem(n=32, seed=1)
    first = _linear_model()
    # a new model of the same structure (other weights), as fit_last_layer builds on every call
    other = bayes.BayesianModel(
        eqx.nn.Linear(2, "scalar", key=jax.random.key(1)), 1.0, bayes.Gaussian(0.3)
    )
    key = jax.random.key(3)
    bayes.run_svi(first, x0, y0, num_steps=60, num_samples=500, key=jax.random.key(0))
    with compile_log() as log:
        post = bayes.run_svi(other, x1, y1, num_steps=60, num_samples=500, key=key)
    assert log.compiled == []
    losses, draws = _numpyro_svi(other, jnp.asarray(x1), jnp.asarray(y1), 60, 500, key)
    # the same optimisation, step for step (float32 rounding: measured up to 6.3e-7 relative
    # over 1,000 steps)
    np.testing.assert_allclose(post.losses, losses, rtol=1e-5)
    # NumPyro orders the guide's sites by name when it is traced, by model order outside `jit`,
    # so the draws use the sample key's stream in another order: compare their distributions,
    # Normal(loc, scale) with the same fitted parameters (500 draws: 5 standard errors)
    for site in ("weight", "bias"):
        got, want = post.samples[site][0], draws[site]
        se = want.std(0) / np.sqrt(500)
        assert (jnp.abs(got.mean(0) - want.mean(0)) < 5 * se).all()
        assert (jnp.abs(got.std(0) / want.std(0) - 1) < 0.15).all()


def test_svi_sweeps_over_learning_rate_and_prior_scales_compile_once(compile_log):
    # Each new optax object, and each prior scale given as a Python float, used to be a constant
    # of the compiled fit: one compilation (3-7 s on a 2-core CPU) per value of a sweep.
    import numpyro.distributions as dist

    x, y = _linear_problem(n=32)
    lin = eqx.nn.Linear(2, "scalar", key=jax.random.key(0))
    fit = dict(num_steps=50, num_samples=20, key=jax.random.key(0))
    model = _linear_model()
    bayes.run_svi(model, x, y, learning_rate=1e-2, **fit)
    with compile_log() as log:
        swept = bayes.run_svi(model, x, y, learning_rate=3e-2, **fit)
    assert log.compiled == []
    # the same fit as with the optimizer object optax.adam(3e-2), step for step (float32: 1e-6)
    direct = bayes.run_svi(model, x, y, optimizer=optax.adam(3e-2), **fit)
    np.testing.assert_allclose(swept.losses, direct.losses, rtol=1e-6)
    # another factory, and the learning rate as an array
    bayes.run_svi(model, x, y, optimizer=optax.sgd, learning_rate=1e-3, **fit)
    lr = jnp.asarray(2e-3, jnp.float32)
    with compile_log() as log:
        bayes.run_svi(model, x, y, optimizer=optax.sgd, learning_rate=lr, **fit)
    assert log.compiled == []
    specs = [
        lambda s: bayes.BayesianModel(lin, s, bayes.Gaussian(0.3)),
        lambda s: bayes.BayesianModel(lin, bayes.FanInNormal(s), bayes.Gaussian(0.3)),
        lambda s: bayes.BayesianModel(lin, {"weight": bayes.AroundValue(s), "bias": dist.Normal(0.0, s)}, bayes.Gaussian(0.3)),
        lambda s: bayes.BayesianModel(lin, 1.0, bayes.Gaussian(scale_prior=dist.HalfNormal(s))),
        # fixed likelihood parameters: static floats compiled the fit once per value (4-7 s)
        lambda s: bayes.BayesianModel(lin, 1.0, bayes.Gaussian(s)),
        lambda s: bayes.BayesianModel(lin, 1.0, bayes.StudentT(4.0, s)),
        lambda s: bayes.BayesianModel(lin, 1.0, bayes.StudentT(2.0 + s, 0.3)),
    ]
    for make in specs:
        first = bayes.run_svi(make(0.5), x, y, **fit)
        with compile_log() as log:
            second = bayes.run_svi(make(2.0), x, y, **fit)
        assert log.compiled == []
        assert not np.allclose(first.losses, second.losses)  # the new scale is used, not the old


class _NaNOutput(eqx.Module):
    w: jax.Array

    def __call__(self, x):
        return jnp.log(-jnp.abs(self.w * x).sum() - 1.0)


def test_svi_non_finite_fit_raises_numpyro_error_as_before():
    # NumPyro validates distribution parameters outside `jit` only; run_svi reruns eagerly when
    # its compiled fit is not finite, so an invalid model fails as it did with SVI.run
    model = bayes.BayesianModel(_NaNOutput(jnp.ones(2)), 1.0, bayes.Gaussian(0.3))
    x, y = np.ones((8, 2), np.float32), np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="Normal distribution got invalid loc parameter"):
        bayes.run_svi(model, x, y, num_steps=5, num_samples=3, key=jax.random.key(0))


def _fake_posterior(model, draws=6, chains=2, seed=0):
    # posterior draws near the module's values, to test the predictive without inference
    rng = np.random.default_rng(seed)
    samples = {}
    for site, v in model.values().items():
        noise = 0.1 * rng.normal(size=(chains, draws) + v.shape).astype(np.float32)
        samples[site] = jnp.asarray(v)[None, None] + noise
    for site in model.likelihood.site_names:
        samples[site] = jnp.full((chains, draws), 0.5, jnp.float32)
    return bayes.Posterior(model, samples, "nuts")


def test_predict_sweeps_over_interval_levels_compile_once(compile_log):
    # prob was a constant of the compiled predictive: 0.75 s per level of a calibration curve
    x, _ = _linear_problem(n=10)
    post = _fake_posterior(_linear_model(), draws=50)
    key = jax.random.key(0)
    wide = post.predict(x, key=key, prob=0.9)
    with compile_log() as log:
        narrow = post.predict(x, key=key, prob=0.5)
    assert log.compiled == []
    np.testing.assert_array_equal(narrow.samples, wide.samples)  # same key, same draws
    # the interval is the central 50% of the draws (float32 quantiles: 1e-5)
    np.testing.assert_allclose(narrow.lower, np.quantile(np.asarray(narrow.samples), 0.25, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(narrow.upper, np.quantile(np.asarray(narrow.samples), 0.75, axis=0), rtol=1e-5, atol=1e-6)
    assert (narrow.upper - narrow.lower < wide.upper - wide.lower).all() and narrow.prob == 0.5


LIKELIHOODS = {
    "gaussian": (bayes.Gaussian(), "scalar", lambda r, n: r.normal(size=n)),
    "hetero": (bayes.Gaussian(heteroscedastic=True), 2, lambda r, n: r.normal(size=n)),
    "student": (bayes.StudentT(5.0, 0.3), "scalar", lambda r, n: r.normal(size=n)),
    "bernoulli": (bayes.Bernoulli(), "scalar", lambda r, n: r.integers(0, 2, n).astype(float)),
    "poisson": (bayes.Poisson(), "scalar", lambda r, n: r.poisson(1.0, n).astype(float)),
    "categorical": (bayes.Categorical(), 4, lambda r, n: r.integers(0, 4, n)),
}


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_predictive_shapes_for_every_head(name):
    lik, out, draw = LIKELIHOODS[name]
    net = eqx.nn.MLP(3, out, 4, 1, key=jax.random.key(0))
    model = bayes.BayesianModel(net, 1.0, lik)
    post = _fake_posterior(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    y = draw(rng, 5)
    y = y.astype(np.int32) if name == "categorical" else y.astype(np.float32)
    pred = post.predict(x, key=jax.random.key(0), prob=0.8)
    mean_shape = (5, 4) if name == "categorical" else (5,)
    assert pred.mean.shape == pred.std.shape == pred.lower.shape == mean_shape
    assert pred.samples.shape == (12, 5) and pred.function_samples.shape == (12,) + mean_shape
    assert (pred.lower <= pred.upper).all() and jnp.isfinite(pred.std).all()
    lpd = post.log_predictive_density(x, y)
    assert lpd.shape == (5,) and jnp.isfinite(lpd).all()
    if name == "categorical":
        assert jnp.allclose(pred.mean.sum(-1), 1.0, atol=1e-5)
    diag = pred.function_space_diagnostics()
    assert set(diag) == {"r_hat_max", "ess_min"}
    assert post.module_at(3) is not None


def test_inference_argument_errors(unchecked):
    x, y = _linear_problem(n=10)
    model = _linear_model()
    with pytest.raises(errors.ConfigError, match=r"subsample_size must be in \[1, 10\]"):
        bayes.run_svi(model, x, y, subsample_size=50, key=jax.random.key(0))
    with pytest.raises(errors.ConfigError, match="guide must be 'normal'"):
        bayes.run_svi(model, x, y, guide="full", key=jax.random.key(0))
    with pytest.raises(errors.ConfigError, match=r"run_svi: with learning_rate=\.\.\., optimizer must be an optax optimizer factory .*got GradientTransformationExtraArgs\. Pass optax\.adam rather than optax\.adam\(1e-2\)"):
        bayes.run_svi(model, x, y, optimizer=optax.adam(1e-2), learning_rate=1e-2, key=jax.random.key(0))
    for bad in (0.0, float("nan"), jnp.asarray(-1.0)):
        with pytest.raises(errors.ConfigError, match=r"run_svi: learning_rate must be a positive number; got learning_rate="):
            bayes.run_svi(model, x, y, learning_rate=bad, key=jax.random.key(0))
    with pytest.raises(errors.ConfigError, match=r"FanInNormal: scale must be a positive number; got scale=inf"):
        bayes.FanInNormal(float("inf"))
    with pytest.raises(errors.ConfigError, match=r"StudentT: df must be a positive number; got df=0\.0"):
        bayes.StudentT(0.0)
    with pytest.raises(errors.ConfigError, match=r"Gaussian: scale must be a positive number; got scale=-0\.1"):
        bayes.Gaussian(-0.1)
    with pytest.raises(errors.ConfigError, match="init must be"):
        bayes.run_nuts(model, x, y, init="zeros", key=jax.random.key(0))
    with pytest.raises(errors.ConfigError, match="num_samples >= 1"):
        bayes.run_nuts(model, x, y, num_samples=0, key=jax.random.key(0))
    with pytest.raises(errors.ConfigError, match=r"run_nuts: target_accept_prob must be in \(0, 1\); got 1\.5"):
        bayes.run_nuts(model, x, y, target_accept_prob=1.5, key=jax.random.key(0))
    with pytest.raises(errors.ConfigError, match=r"run_nuts: max_tree_depth must be a positive integer; got max_tree_depth=0"):
        bayes.run_nuts(model, x, y, max_tree_depth=0, key=jax.random.key(0))
    with pytest.raises(errors.ConfigError, match=r"Gaussian: min_scale .* must be a finite number >= 0; got min_scale=-1\.0"):
        bayes.Gaussian(heteroscedastic=True, min_scale=-1.0)
    # num_particles=0 returned NaN losses and num_steps=2.5 ran: both without an error
    with pytest.raises(errors.ConfigError, match=r"run_svi: num_particles must be a positive integer; got num_particles=0"):
        bayes.run_svi(model, x, y, num_particles=0, key=jax.random.key(0))
    with unchecked(), pytest.raises(errors.ConfigError, match=r"run_svi: num_steps must be a positive integer; got num_steps=2\.5"):
        bayes.run_svi(model, x, y, num_steps=2.5, key=jax.random.key(0))
    with pytest.raises(errors.ConfigError, match=r"run_svi: init_scale must be a positive number; got init_scale=0\.0"):
        bayes.run_svi(model, x, y, init_scale=0.0, key=jax.random.key(0))
    # rank= with the mean-field guide was dropped silently (the fit stayed mean-field)
    with pytest.raises(errors.ConfigError, match=r"run_svi: rank=3 is the rank of guide='lowrank' .*guide='normal' does not use it"):
        bayes.run_svi(model, x, y, rank=3, key=jax.random.key(0))
    post = _fake_posterior(model)
    with pytest.raises(errors.ConfigError, match=r"probability mass, in \(0, 1\)"):
        post.predict(x, key=jax.random.key(0), prob=1.5)
    # one example: the module's own error said to wrap the call in jax.vmap, which predict does
    with pytest.raises(errors.ShapeError, match=r"inputs x of shape \(2,\) .*one example has shape \(\)\) failed: .*pass a single example as x\[None\]"):
        post.predict(x[0], key=jax.random.key(0))
    exact = bayes.fit_last_layer(eqx.nn.Identity(), x, y, bayes.Gaussian(0.3))
    with pytest.raises(errors.ConfigError, match="closed form"):
        exact.predict(x).function_space_diagnostics()


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_regression_example_smoke_run_converges_and_covers(tmp_path):
    summary = _load_example("bayesian_regression").main(
        ["--smoke", "--json", "--out", str(tmp_path)]
    )
    # held-out points (400) from the training distribution: binomial sd of coverage ~0.015
    assert 0.85 <= summary["coverage_90"] <= 0.95
    # function-space R-hat over the whole grid (gap and extrapolation included), 2 chains x 200
    # draws in smoke mode; the same threshold as the full run (which uses 4 chains x 500)
    assert summary["r_hat_max"] < 1.05
    assert summary["ess_min"] > 50
    assert summary["band_width_gap"] > 1.5 * summary["band_width_data"]
    assert summary["rmse"] < 0.3
    assert (tmp_path / "bayesian_regression.png").stat().st_size > 10_000
