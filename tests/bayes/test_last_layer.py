"""Bayesian last layer: the closed form against textbook formulas, NUTS, and calibration."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
import scipy.stats

import eqzoo._errors as errors
import eqzoo.bayes as bayes

TOL = 1e-6  # float64, closed form against closed form


def _linear_data(n, f, noise, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f))
    w = rng.normal(size=f)
    y = x @ w + 0.5 + noise * rng.normal(size=n)
    return jnp.asarray(x.astype(dtype)), jnp.asarray(y.astype(dtype))


def test_known_noise_posterior_matches_closed_form():
    with jax.enable_x64(True):
        x, y = _linear_data(25, 3, 0.3, 0)
        s, sigma = 1.5, 0.3
        head = bayes.fit_conjugate_gaussian(x, y, prior_scale=s, noise_scale=sigma)
        phi = jnp.concatenate([x, jnp.ones((25, 1))], axis=1)
        # Bishop (2006) eq. 3.53-3.54 with prior precision 1/s^2 and noise precision 1/sigma^2
        cov = jnp.linalg.inv(jnp.eye(4) / s**2 + phi.T @ phi / sigma**2)
        mean = cov @ phi.T @ y / sigma**2
        assert head.mean.dtype == jnp.float64
        assert jnp.abs(head.mean[:, 0] - mean).max() < TOL
        assert jnp.abs(head.cov - cov).max() < TOL
        # through fit_last_layer with an identity trunk and a fixed-noise Gaussian head
        last = bayes.fit_last_layer(eqx.nn.Identity(), x, y, bayes.Gaussian(sigma), prior_scale=s)
        assert isinstance(last.head, bayes.ConjugateGaussianHead)
        assert jnp.abs(last.head.mean[:, 0] - mean).max() < TOL
        pred = last.predict(x[:5])
        var = sigma**2 + jnp.einsum("bf,fg,bg->b", phi[:5], cov, phi[:5])
        assert jnp.abs(pred.mean - phi[:5] @ mean).max() < TOL
        assert jnp.abs(pred.std - jnp.sqrt(var)).max() < TOL
        z = scipy.stats.norm.ppf(0.95)
        assert jnp.abs(pred.upper - (pred.mean + z * jnp.sqrt(var))).max() < 1e-5
        lpd = last.log_predictive_density(x[:5], y[:5])
        ref = scipy.stats.norm.logpdf(np.asarray(y[:5]), np.asarray(pred.mean), np.sqrt(var))
        assert np.abs(np.asarray(lpd) - ref).max() < TOL


def test_normal_inverse_gamma_posterior_matches_closed_form():
    with jax.enable_x64(True):
        x, y = _linear_data(30, 2, 0.5, 1)
        y2 = jnp.stack([y, -2 * y + 1], axis=1)  # two outputs share the covariance
        s, a0, b0 = 2.0, 3.0, 1.5
        lik = bayes.Gaussian(variance_prior=dist.InverseGamma(a0, b0))
        last = bayes.fit_last_layer(eqx.nn.Identity(), x, y2, lik, prior_scale=s)
        head = last.head
        phi = jnp.concatenate([x, jnp.ones((30, 1))], axis=1)
        # Murphy (2012) §7.6.3 with m0 = 0, V0 = s^2 I
        prec = jnp.eye(3) / s**2 + phi.T @ phi
        v = jnp.linalg.inv(prec)
        m = v @ phi.T @ y2
        a = a0 + 30 / 2
        b = b0 + 0.5 * (jnp.sum(y2**2, 0) - jnp.einsum("fk,fg,gk->k", m, prec, m))
        assert jnp.abs(head.mean - m).max() < TOL
        assert jnp.abs(head.cov - v).max() < TOL
        assert abs(float(head.concentration) - a) < TOL
        assert jnp.abs(head.rate - b).max() < TOL
        assert jnp.abs(head.weight_covariance - (b / (a - 1))[:, None, None] * v).max() < TOL
        pred = last.predict(x[:4], prob=0.8)
        scale = jnp.sqrt(
            (b / a)[None] * (1 + jnp.einsum("bf,fg,bg->b", phi[:4], v, phi[:4]))[:, None]
        )
        q = scipy.stats.t.ppf(0.9, 2 * a)
        assert jnp.abs(pred.upper - (pred.mean + q * scale)).max() < 1e-5
        assert jnp.abs(pred.std - scale * jnp.sqrt(2 * a / (2 * a - 2))).max() < TOL


def test_student_t_quantile():
    with jax.enable_x64(True):
        q = jnp.array([0.01, 0.3, 0.5, 0.95, 0.999])
        for df in (1.0, 2.5, 30.0):
            ours = bayes.student_t_icdf(q, jnp.full(q.shape, df))
            assert np.abs(np.asarray(ours) - scipy.stats.t.ppf(np.asarray(q), df)).max() < 1e-6


def test_nuts_agrees_with_conjugate_posterior_within_monte_carlo_error():
    x, y = _linear_data(30, 2, 0.4, 2, dtype=np.float32)
    exact = bayes.fit_last_layer(eqx.nn.Identity(), x, y, bayes.Gaussian(0.4), prior_scale=1.0)
    nuts = bayes.fit_last_layer(
        eqx.nn.Identity(),
        x,
        y,
        bayes.Gaussian(0.4),
        prior_scale=1.0,
        method="nuts",
        num_warmup=300,
        num_samples=500,
        num_chains=2,
        init="module",
        key=jax.random.key(0),
    )
    assert nuts.head.samples["weight"].shape == (2, 500, 1, 2)
    assert nuts.head.samples["bias"].shape == (2, 500, 1)
    flat = nuts.head.flat_samples()
    num = flat["weight"].shape[0]
    w = jnp.concatenate([flat["weight"].reshape(num, -1), flat["bias"].reshape(num, -1)], 1)
    diag = nuts.head.diagnostics()
    assert set(diag["sites"]) == {"weight", "bias"} and diag["divergences"] == 0
    assert diag["r_hat_max"] < 1.05
    ess = diag["ess_min"]
    exact_mean = exact.head.mean[:, 0]
    exact_sd = jnp.sqrt(jnp.diag(exact.head.cov))
    # Monte Carlo standard error of a posterior mean is sd / sqrt(ESS); allow 4 of them
    assert (jnp.abs(w.mean(0) - exact_mean) < 4 * exact_sd / np.sqrt(ess)).all()
    # a sample sd from >= ~200 effective draws is within ~20% with overwhelming probability
    assert (jnp.abs(w.std(0) / exact_sd - 1) < 0.2).all()
    emp_cov = jnp.cov(w.T)
    assert jnp.abs(emp_cov - exact.head.cov).max() < 0.2 * float(exact_sd.max()) ** 2


@pytest.mark.parametrize("noise", ["known", "nig"])
def test_held_out_coverage_on_synthetic_data(noise):
    # a known nonlinear model: y = g(x) @ w + noise with g a fixed random-feature trunk
    trunk = eqx.nn.MLP(1, 8, 16, 1, activation=jnp.tanh, key=jax.random.key(3))
    rng = np.random.default_rng(3)
    w_true = rng.normal(size=8).astype(np.float32)

    def sample(n):
        x = rng.uniform(-2, 2, size=(n, 1)).astype(np.float32)
        f = np.asarray(jax.vmap(trunk)(x))
        return x, (f @ w_true + 0.2 * rng.normal(size=n)).astype(np.float32)

    x, y = sample(200)
    x_test, y_test = sample(4000)
    lik = (
        bayes.Gaussian(0.2)
        if noise == "known"
        else bayes.Gaussian(variance_prior=dist.InverseGamma(2.0, 0.1))
    )
    last = bayes.fit_last_layer(trunk, x, y, lik, prior_scale=1.0, use_bias=False)
    pred = last.predict(x_test, prob=0.9)
    coverage = float(bayes.interval_coverage(y_test, pred.lower, pred.upper))
    # 4000 points: the binomial sd of the coverage is 0.005, so 85-95% is a loose, honest band
    assert 0.85 <= coverage <= 0.95, coverage


def test_classification_last_layer_with_svi():
    rng = np.random.default_rng(0)
    centers = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]], np.float32)
    labels = rng.integers(0, 3, size=150)
    x = (centers[labels] + 0.7 * rng.normal(size=(150, 2))).astype(np.float32)
    trunk = eqx.nn.Lambda(lambda v: jnp.concatenate([v, v**2]))
    last = bayes.fit_last_layer(
        trunk,
        x,
        labels,
        bayes.Categorical(),
        method="svi",
        num_steps=400,
        num_samples=200,
        standardize=True,
        key=jax.random.key(0),
    )
    pred = last.predict(x, key=jax.random.key(1))
    assert pred.mean.shape == (150, 3)
    assert jnp.allclose(pred.mean.sum(-1), 1.0, atol=1e-5)
    # classifier intervals bound the class probabilities over the posterior
    assert (0 <= pred.lower).all() and (pred.lower <= pred.upper).all() and (pred.upper <= 1).all()
    assert float((pred.mean.argmax(-1) == labels).mean()) > 0.9
    assert float(bayes.expected_calibration_error(pred.mean, labels)) < 0.1
    assert last.log_predictive_density(x[:7], labels[:7]).shape == (7,)


def test_last_layer_errors():
    x, y = _linear_data(10, 2, 0.1, 0, dtype=np.float32)
    with pytest.raises(errors.ConfigError, match="closed-form last layer needs Gaussian"):
        bayes.fit_last_layer(eqx.nn.Identity(), x, y, bayes.StudentT(), method="conjugate")
    with pytest.raises(errors.ConfigError, match="pass key="):
        bayes.fit_last_layer(eqx.nn.Identity(), x, y, bayes.StudentT(), method="nuts")
    # the closed form dropped sampler settings silently
    with pytest.raises(errors.ConfigError, match=r"closed-form fit \(method='auto' with Gaussian\) samples nothing, so num_chains, num_samples would be ignored"):
        bayes.fit_last_layer(eqx.nn.Identity(), x, y, bayes.Gaussian(0.1), num_samples=10, num_chains=2)
    with pytest.raises(errors.ShapeError, match="one feature vector per example"):
        bayes.fit_last_layer(eqx.nn.Lambda(lambda v: v.sum()), x, y, bayes.Gaussian(0.1))
    with pytest.raises(
        errors.ShapeError, match=r"y \(batch,\) or \(batch, outputs\).*\(10, 1, 1\)"
    ):
        bayes.fit_last_layer(eqx.nn.Identity(), x, y[:, None, None], bayes.Gaussian(0.1))
    bad = y.at[3].set(jnp.inf)
    with pytest.raises(bayes.NonFiniteDataError, match="NaN or infinity"):
        bayes.fit_last_layer(eqx.nn.Identity(), x, bad, bayes.Gaussian(0.1))
    # inputs with another number of features failed in predict as a bare broadcasting error
    last = bayes.fit_last_layer(eqx.nn.Identity(), x, y, bayes.Gaussian(0.1))
    with pytest.raises(
        errors.ShapeError,
        match=r"the trunk gives 3 features per example for x of shape \(4, 3\), but the head was fitted on 2",
    ):
        last.predict(jnp.zeros((4, 3)))


def test_conjugate_mask_equals_dropping_rows():
    with jax.enable_x64(True):
        x, y = _linear_data(20, 2, 0.2, 4)
        keep = np.ones(20, bool)
        keep[[2, 11]] = False
        y_nan = y.at[2].set(jnp.nan).at[11].set(jnp.nan)
        masked = bayes.fit_last_layer(eqx.nn.Identity(), x, y_nan, bayes.Gaussian(0.2), mask=keep)
        dropped = bayes.fit_last_layer(eqx.nn.Identity(), x[keep], y[keep], bayes.Gaussian(0.2))
        assert jnp.abs(masked.head.mean - dropped.head.mean).max() < TOL
        assert jnp.abs(masked.head.cov - dropped.head.cov).max() < TOL
        with pytest.raises(errors.ShapeError, match="mask must be boolean"):
            bayes.fit_last_layer(eqx.nn.Identity(), x, y, bayes.Gaussian(0.2), mask=keep * 1)


def test_conjugate_fit_takes_integer_targets():
    # Integer regression targets (counts, grades) worked with type checking off and failed in
    # fit_conjugate_gaussian's annotation (Float) with it on.
    x, y = _linear_data(30, 2, 0.2, 5, dtype=np.float32)
    y_int = jnp.round(y * 10).astype(jnp.int32)
    got = bayes.fit_last_layer(eqx.nn.Identity(), x, y_int, bayes.Gaussian(0.2))
    want = bayes.fit_last_layer(eqx.nn.Identity(), x, y_int.astype(jnp.float32), bayes.Gaussian(0.2))
    np.testing.assert_allclose(got.head.mean, want.head.mean, rtol=0, atol=0)
