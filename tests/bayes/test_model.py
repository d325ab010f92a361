"""BayesianModel: its joint log density against hand-written NumPyro models, and prior selection."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density

import eqzoo.bayes as bayes

TOL = 1e-6  # absolute, on float64 log densities


def _mlp(key, out_size="scalar"):
    return eqx.nn.MLP(2, out_size, 3, 1, activation=jnp.tanh, key=key, dtype=jnp.float64)


def _forward(w0, b0, w1, b1, x):
    # the same network as eqx.nn.MLP(2, out, 3, 1, tanh), written on a batch by hand
    return jnp.tanh(x @ w0.T + b0) @ w1.T + b1


def _hand_model(likelihood_fn, classes=None):
    out = (1,) if classes is None else (classes,)

    def model(x, y, mask=None):
        # FanInNormal(1.0): scale 1/sqrt(fan_in) on weights; biases Normal(0, 2)
        w0 = numpyro.sample(
            "layers[0].weight", dist.Normal(0.0, 1 / np.sqrt(2)).expand((3, 2)).to_event(2)
        )
        b0 = numpyro.sample("layers[0].bias", dist.Normal(0.0, 2.0).expand((3,)).to_event(1))
        w1 = numpyro.sample(
            "layers[1].weight", dist.Normal(0.0, 1 / np.sqrt(3)).expand(out + (3,)).to_event(2)
        )
        if classes is None:
            b1 = numpyro.sample("layers[1].bias", dist.Normal(0.0, 2.0))
        else:
            b1 = numpyro.sample("layers[1].bias", dist.Normal(0.0, 2.0).expand(out).to_event(1))
        f = _forward(w0, b0, w1, b1, x)
        likelihood_fn(f[:, 0] if classes is None else f, y, mask)

    return model


def _data(n=7, classes=None, counts=False, binary=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2))
    if classes is not None:
        y = rng.integers(0, classes, size=n)
    elif counts:
        y = rng.poisson(2.0, size=n).astype(np.float64)
    elif binary:
        y = rng.integers(0, 2, size=n).astype(np.float64)
    else:
        y = rng.normal(size=n)
    return jnp.asarray(x), jnp.asarray(y)


PRIORS = {"*.weight": bayes.FanInNormal(1.0), "*.bias": 2.0}


def _gauss_learned(out, y, mask):
    s = numpyro.sample("noise_scale", dist.HalfNormal(1.0))
    with numpyro.plate("data", out.shape[0]):
        numpyro.sample("obs", dist.Normal(out, s), obs=y)


def _gauss_fixed(out, y, mask):
    with numpyro.plate("data", out.shape[0]):
        numpyro.sample("obs", dist.Normal(out, 0.3), obs=y)


def _gauss_masked(out, y, mask):
    s = numpyro.sample("noise_scale", dist.HalfNormal(1.0))
    with numpyro.plate("data", out.shape[0]), numpyro.handlers.mask(mask=mask):
        numpyro.sample("obs", dist.Normal(out, s), obs=jnp.where(mask, y, 0.0))


def _student(out, y, mask):
    s = numpyro.sample("noise_scale", dist.HalfNormal(1.0))
    with numpyro.plate("data", out.shape[0]):
        numpyro.sample("obs", dist.StudentT(3.0, out, s), obs=y)


def _bernoulli(out, y, mask):
    with numpyro.plate("data", out.shape[0]):
        numpyro.sample("obs", dist.Bernoulli(logits=out), obs=y)


def _poisson(out, y, mask):
    with numpyro.plate("data", out.shape[0]):
        numpyro.sample("obs", dist.Poisson(jnp.exp(out)), obs=y)


def _categorical(out, y, mask):
    with numpyro.plate("data", out.shape[0]):
        numpyro.sample("obs", dist.Categorical(logits=out), obs=y)


def _variance(out, y, mask):
    v = numpyro.sample("noise_variance", dist.InverseGamma(2.0, 1.0))
    with numpyro.plate("data", out.shape[0]):
        numpyro.sample("obs", dist.Normal(out, jnp.sqrt(v)), obs=y)


CASES = {
    "gaussian-learned": (lambda: bayes.Gaussian(), _gauss_learned, {}),
    "gaussian-fixed": (lambda: bayes.Gaussian(0.3), _gauss_fixed, {}),
    "gaussian-variance": (
        lambda: bayes.Gaussian(variance_prior=dist.InverseGamma(2.0, 1.0)),
        _variance,
        {},
    ),
    "gaussian-masked": (lambda: bayes.Gaussian(), _gauss_masked, {"mask": True}),
    "student-t": (lambda: bayes.StudentT(3.0), _student, {}),
    "bernoulli": (lambda: bayes.Bernoulli(), _bernoulli, {"binary": True}),
    "poisson": (lambda: bayes.Poisson(), _poisson, {"counts": True}),
    "categorical": (lambda: bayes.Categorical(), _categorical, {"classes": 3}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_log_density_matches_hand_written_numpyro(case):
    make_lik, lik_fn, opts = CASES[case]
    with jax.enable_x64(True):
        classes = opts.get("classes")
        x, y = _data(
            classes=classes, counts=opts.get("counts", False), binary=opts.get("binary", False)
        )
        mask = None
        if opts.get("mask"):
            mask = jnp.array([True, False, True, True, False, True, True])
            y = y.at[1].set(jnp.nan)  # masked entries are never read
        net = _mlp(jax.random.key(1), "scalar" if classes is None else classes)
        bm = bayes.BayesianModel(net, PRIORS, make_lik())
        rng = np.random.default_rng(2)
        values = {k: jnp.asarray(rng.normal(size=v.shape)) for k, v in bm.values().items()}
        for site in bm.likelihood.site_names:
            values[site] = jnp.asarray(0.7)
        ours = bm.log_density(values, x, y, mask=mask)
        with jax.numpy_dtype_promotion("standard"):  # NumPyro's own code assumes it
            ref, _ = log_density(_hand_model(lik_fn, classes), (x, y), {"mask": mask}, values)
        assert jnp.isfinite(ours)
        assert abs(float(ours) - float(ref)) < TOL, (float(ours), float(ref))


def test_heteroscedastic_gaussian_log_density():
    with jax.enable_x64(True):
        x, y = _data()
        net = _mlp(jax.random.key(1), 2)
        bm = bayes.BayesianModel(net, 1.0, bayes.Gaussian(heteroscedastic=True, min_scale=1e-3))
        values = {k: v + 0.1 for k, v in bm.values().items()}
        m = bm.build(values)
        out = jax.vmap(m)(x)
        ref = sum(dist.Normal(0.0, 1.0).log_prob(v).sum() for v in values.values())
        ref = ref + dist.Normal(out[:, 0], jax.nn.softplus(out[:, 1]) + 1e-3).log_prob(y).sum()
        assert abs(float(bm.log_density(values, x, y)) - float(ref)) < TOL


def test_partial_model_keeps_other_leaves_fixed():
    net = eqx.nn.MLP(2, "scalar", 4, 2, key=jax.random.key(0))
    bm = bayes.BayesianModel(net, {bayes.Subtree(lambda m: m.layers[-1]): 1.0}, bayes.Gaussian(0.1))
    assert bm.paths == ("layers[2].weight", "layers[2].bias")
    new = bm.build({p: jnp.zeros_like(v) for p, v in bm.values().items()})
    assert (new.layers[0].weight == net.layers[0].weight).all()
    assert (new.layers[2].weight == 0).all()


def test_pattern_kinds_and_first_match_wins():
    class Block(eqx.Module):
        linear: eqx.nn.Linear
        norm: eqx.nn.LayerNorm

        def __init__(self, key):
            self.linear = eqx.nn.Linear(3, 3, key=key)
            self.norm = eqx.nn.LayerNorm(3)

        def __call__(self, x):
            return self.norm(self.linear(x)).sum()

    block = Block(jax.random.key(0))
    every_weight_not_norms = bayes.BayesianModel(
        block, {"norm.*": None, "*.weight": 1.0}, bayes.Gaussian(0.1)
    )
    assert every_weight_not_norms.paths == ("linear.weight",)
    regex = bayes.BayesianModel(block, {re.compile(r"bias$"): 0.5}, bayes.Gaussian(0.1))
    assert regex.paths == ("linear.bias", "norm.bias")
    pred = bayes.BayesianModel(
        block, [(lambda path, leaf: leaf.ndim == 2, dist.Laplace(0.0, 1.0))], bayes.Gaussian(0.1)
    )
    assert pred.paths == ("linear.weight",)
    # per-path scale: the site distribution carries it
    scaled = bayes.BayesianModel(block, {"linear.weight": 0.25, "*": 3.0}, bayes.Gaussian(0.1))
    sd = {
        p: float(jnp.ravel(jnp.asarray(_base(d).scale))[0])
        for p, d in zip(scaled.paths, scaled.priors, strict=True)
    }
    assert sd["linear.weight"] == 0.25 and sd["norm.weight"] == 3.0
    around = bayes.BayesianModel(
        block, {"linear.weight": bayes.AroundValue(0.1)}, bayes.Gaussian(0.1)
    )
    assert (_base(around.priors[0]).loc == block.linear.weight).all()


def _base(d):
    while hasattr(d, "base_dist"):
        d = d.base_dist
    return d


def test_sample_module_inside_a_custom_numpyro_model():
    net = eqx.nn.MLP(2, "scalar", 3, 1, key=jax.random.key(0))
    bm = bayes.BayesianModel(net, 1.0, bayes.Gaussian(0.1))

    def model(x):
        m = bm.sample_module()
        numpyro.deterministic("f", jax.vmap(m)(x))

    tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(jnp.ones((5, 2)))
    assert set(bm.paths) <= set(tr) and tr["f"]["value"].shape == (5,)


def test_prior_matching_nothing_is_an_error():
    net = eqx.nn.MLP(2, "scalar", 3, 1, key=jax.random.key(0))
    with pytest.raises(
        bayes_errors().ConfigError, match=r"match no parameter.*layers\[0\]\.weight"
    ):
        bayes.BayesianModel(net, {"encoder.*": 1.0}, bayes.Gaussian(0.1))
    with pytest.raises(bayes_errors().ConfigError, match="match no parameter"):
        bayes.BayesianModel(net, {"*": 1.0, "*.bias": 2.0}, bayes.Gaussian(0.1))
    with pytest.raises(bayes_errors().ConfigError, match="select no parameter"):
        bayes.BayesianModel(net, {"*": None}, bayes.Gaussian(0.1))
    with pytest.raises(bayes_errors().ConfigError, match="does not broadcast"):
        bayes.BayesianModel(
            net, {"layers[0].weight": dist.Normal(jnp.zeros(5), 1.0)}, bayes.Gaussian(0.1)
        )
    with pytest.raises(bayes_errors().ConfigError, match="one way to set the noise"):
        bayes.Gaussian(0.1, scale_prior=dist.HalfNormal(1.0))


def test_noise_priors_must_be_distributions_over_positive_values():
    # A float failed inside the NumPyro model ("'Array' object has no attribute 'batch_shape'");
    # a Normal gave negative scales or variances: NaN log densities, which NUTS rejected as
    # divergences and SVI reported as NumPyro's "Normal distribution got invalid loc parameter".
    errors = bayes_errors()
    with pytest.raises(errors.ConfigError, match=r"^Gaussian: scale_prior is a prior, a NumPyro distribution .*got 0\.5\. For a fixed noise scale, pass scale=0\.5 instead"):
        bayes.Gaussian(scale_prior=0.5)
    with pytest.raises(errors.ConfigError, match=r"^Gaussian: scale_prior must be a distribution over positive values .*dist\.HalfNormal\(1\.0\); got Normal, whose support Real\(\) includes negative values"):
        bayes.Gaussian(scale_prior=dist.Normal(0.0, 1.0))
    with pytest.raises(errors.ConfigError, match=r"^Gaussian: variance_prior must be .*dist\.InverseGamma\(2\.0, 1\.0\); got Uniform"):
        bayes.Gaussian(variance_prior=dist.Uniform(-1.0, 1.0))
    with pytest.raises(errors.ConfigError, match=r"^StudentT: scale_prior must be a distribution over positive values"):
        bayes.StudentT(scale_prior=dist.Cauchy(0.0, 1.0))
    for prior in (dist.HalfNormal(1.0), dist.HalfCauchy(1.0), dist.Exponential(1.0), dist.LogNormal(0.0, 1.0),
                  dist.Gamma(2.0, 1.0), dist.Uniform(0.0, 2.0), dist.TruncatedNormal(0.5, 1.0, low=0.0)):
        bayes.Gaussian(scale_prior=prior)
    bayes.Gaussian(variance_prior=dist.InverseGamma(2.0, 1.0))


def test_empty_data_is_an_error():
    # NumPyro failed on it with a bare AssertionError: "size of plate should be positive"
    bm = bayes.BayesianModel(eqx.nn.MLP(2, "scalar", 3, 1, key=jax.random.key(0)), 1.0, bayes.Gaussian(0.1))
    with pytest.raises(bayes_errors().ShapeError, match=r"x and y hold no examples \(x of shape \(0, 2\), y of shape \(0,\)\)"):
        bayes.run_nuts(bm, np.zeros((0, 2), np.float32), np.zeros(0, np.float32), key=jax.random.key(0))


def test_shape_mismatched_observations_are_an_error():
    net = eqx.nn.MLP(2, "scalar", 3, 1, key=jax.random.key(0))
    bm = bayes.BayesianModel(net, 1.0, bayes.Gaussian(0.1))
    x = np.zeros((6, 2), np.float32)
    with pytest.raises(
        bayes_errors().ShapeError, match=r"y have shape \(6, 1\).*expects y of shape \(6,\)"
    ):
        bm.check_data(x, np.zeros((6, 1), np.float32))
    with pytest.raises(bayes_errors().ShapeError, match="same length"):
        bm.check_data(x, np.zeros(5, np.float32))
    with pytest.raises(bayes_errors().ShapeError, match="one example has shape"):
        bm.check_data(np.zeros((6, 3), np.float32), np.zeros(6, np.float32))
    with pytest.raises(bayes_errors().ShapeError, match="mask has shape"):
        bm.check_data(x, np.zeros(6, np.float32), np.ones(3, bool))
    cat = bayes.BayesianModel(
        eqx.nn.MLP(2, "scalar", 3, 1, key=jax.random.key(0)), 1.0, bayes.Categorical()
    )
    with pytest.raises(bayes_errors().ShapeError, match=r"\(\.\.\., classes\) logits"):
        cat.check_data(x, np.zeros(6, np.int32))


def test_non_finite_data_is_an_error():
    net = eqx.nn.MLP(2, "scalar", 3, 1, key=jax.random.key(0))
    bm = bayes.BayesianModel(net, 1.0, bayes.Gaussian(0.1))
    x = np.zeros((4, 2), np.float32)
    y = np.array([0.0, np.nan, 1.0, 2.0], np.float32)
    with pytest.raises(bayes.NonFiniteDataError, match=r"y contain NaN or infinity.*mask=") as err:
        bm.check_data(x, y)
    assert isinstance(err.value, ValueError)
    bm.check_data(x, y, np.array([True, False, True, True]))  # masked NaN is fine
    x_bad = x.copy()
    x_bad[2, 1] = np.inf
    with pytest.raises(bayes.NonFiniteDataError, match=r"inputs x contain NaN or infinity"):
        bayes.run_nuts(bm, x_bad, np.zeros(4, np.float32), key=jax.random.key(0))


def test_targets_outside_the_likelihoods_support_are_named():
    # Labels past the module's classes, negative ones, fractions, or Bernoulli targets other
    # than 0/1 made NumPyro fail with "Cannot find valid initial parameters".
    x = np.zeros((5, 2), np.float32)
    cat = bayes.BayesianModel(eqx.nn.MLP(2, 3, 4, 1, key=jax.random.key(0)), 1.0, bayes.Categorical())
    with pytest.raises(bayes_errors().ConfigError, match=r"Categorical head over 3 classes takes integer labels in \[0, 3\); y also holds \[-1, 4\]"):
        cat.check_data(x, np.array([0, 1, 2, 4, -1]))
    with pytest.raises(bayes_errors().ConfigError, match=r"y also holds \[1.5\]"):
        cat.check_data(x, np.array([0, 1, 2, 1.5, 0], np.float32))
    cat.check_data(x, np.array([0, 1, 2, 9, 0]), np.array([True, True, True, False, True]))  # masked out: fine
    ber = bayes.BayesianModel(eqx.nn.MLP(2, "scalar", 4, 1, key=jax.random.key(0)), 1.0, bayes.Bernoulli())
    with pytest.raises(bayes_errors().ConfigError, match=r"Bernoulli head takes targets 0 and 1; y also holds \[2.0\]"):
        ber.check_data(x, np.array([0, 1, 2, 1, 0], np.float32))
    poisson = bayes.BayesianModel(eqx.nn.MLP(2, "scalar", 4, 1, key=jax.random.key(0)), 1.0, bayes.Poisson())
    with pytest.raises(bayes_errors().ConfigError, match=r"Poisson head takes counts >= 0; y also holds \[-3.0\]"):
        poisson.check_data(x, np.array([0, 1, -3, 1, 0], np.float32))


def bayes_errors():
    import eqzoo._errors as errors

    return errors


def test_fixed_likelihood_parameters_are_arrays_read_under_jit():
    # scale and df are array leaves (not static floats), so they are traced under jit: the
    # moments must not branch on them in Python
    variance = eqx.filter_jit(lambda lik, out: lik.variance(out, {}))
    out = jnp.zeros(3, jnp.float32)
    got = variance(bayes.StudentT(4.0, 0.5), out)
    np.testing.assert_allclose(got, 0.25 * 4.0 / 2.0, rtol=1e-6)  # scale**2 * df / (df - 2)
    assert got.dtype == jnp.float32
    for df in (2.0, 1.5):
        assert jnp.isinf(variance(bayes.StudentT(df, 0.5), out)).all()
    np.testing.assert_allclose(variance(bayes.Gaussian(0.3), out), 0.09, rtol=1e-6)
    with jax.enable_x64(True):
        out64 = jnp.zeros(2, jnp.float64)
        assert variance(bayes.Gaussian(0.3), out64).dtype == jnp.float64
    with pytest.raises(bayes_errors().ConfigError, match="scale must be a positive number"):
        bayes.Gaussian(0.0)
    with pytest.raises(bayes_errors().ConfigError, match="df must be a positive number"):
        bayes.StudentT(jnp.asarray(-1.0))
