"""Probabilistic scores against direct computations and known values."""

import contextlib
import math

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import scipy.stats

import eqzoo._errors as errors
import eqzoo.bayes as bayes


def test_nlpd_is_a_log_mean_exp_over_samples():
    rng = np.random.default_rng(0)
    ll = jnp.asarray(rng.normal(size=(50, 7)).astype(np.float32))
    ref = -np.mean(np.log(np.mean(np.exp(np.asarray(ll, np.float64)), axis=0)))
    assert abs(float(bayes.negative_log_predictive_density(ll)) - ref) < 1e-5
    assert float(bayes.negative_log_predictive_density(ll[0])) == pytest.approx(
        -float(ll[0].mean())
    )
    with pytest.raises(errors.ShapeError, match=r"\(samples, batch\) or \(batch,\)"):
        bayes.negative_log_predictive_density(jnp.zeros((2, 3, 4)))


def test_interval_coverage():
    y = jnp.array([0.0, 1.0, 2.0, 3.0])
    assert float(bayes.interval_coverage(y, y - 0.5, jnp.array([0.5, 0.5, 2.5, 2.0]))) == 0.5


def test_expected_calibration_error():
    rng = np.random.default_rng(0)
    n = 20000
    # calibrated by construction: the label is drawn from the stated probabilities
    logits = 2.0 * rng.normal(size=(n, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in probs], np.int32)
    probs = jnp.asarray(probs.astype(np.float32))
    labels = jnp.asarray(labels)
    assert float(bayes.expected_calibration_error(probs, labels)) < 0.02
    # always 95% sure, right half of the time: ECE is about 0.45
    sure = jnp.tile(jnp.array([[0.95, 0.05]], jnp.float32), (1000, 1))
    half = jnp.asarray(np.arange(1000) % 2, jnp.int32)
    assert float(bayes.expected_calibration_error(sure, half)) == pytest.approx(0.45, abs=1e-4)
    conf, acc, count = bayes.reliability_diagram(sure, half, num_bins=10)
    assert int(count.sum()) == 1000 and int(count[9]) == 1000
    assert float(acc[9]) == pytest.approx(0.5) and float(conf[9]) == pytest.approx(0.95, abs=1e-4)
    # binary probabilities (batch,) are accepted too
    assert float(bayes.expected_calibration_error(sure[:, 1], half)) == pytest.approx(
        0.45, abs=1e-4
    )
    with pytest.raises(errors.ShapeError, match=r"probs must be \(batch, classes\)"):
        bayes.expected_calibration_error(jnp.ones((4, 2, 2)) / 2, half[:4])

@pytest.mark.parametrize("checked", [True, False])
def test_calibration_errors_are_eqzoos_in_both_modes(checked, unchecked):
    # With checking on, a generic ~700-character jaxtyping error used to pre-empt these.
    sure = jnp.tile(jnp.array([[0.95, 0.05]], jnp.float32), (1000, 1))
    half = jnp.asarray(np.arange(1000) % 2, jnp.int32)
    with contextlib.nullcontext() if checked else unchecked():
        for fn in (bayes.expected_calibration_error, bayes.reliability_diagram):
            with pytest.raises(errors.ShapeError, match=r"labels must be \(1000,\), one per row of probs \(1000, 2\); got \(10,\)"):
                fn(sure, half[:10])
            with pytest.raises(errors.ShapeError, match=r"labels must be integer class ids; got dtype float32"):
                fn(sure, half.astype(jnp.float32))  # unchecked, these were truncated silently
            with pytest.raises(errors.ShapeError, match=r"probs must be floating-point probabilities; got dtype int32"):
                fn(jnp.ones((1000, 2), jnp.int32), half)
            with pytest.raises(errors.ConfigError, match="num_bins must be a positive integer; got num_bins=0"):
                fn(sure, half, num_bins=0)


@pytest.mark.parametrize("checked", [True, False])
def test_interval_coverage_and_crps_take_integer_counts(checked, unchecked):
    # Poisson counts: rejected by the Float annotation with checking on, while they worked off.
    counts = jnp.array([0, 1, 2, 5], jnp.int32)
    floats = counts.astype(jnp.float32)
    lower, upper = jnp.array([0.0, 1.5, 0.5, 4.0]), jnp.array([1.0, 2.0, 2.0, 6.0])
    mean, std = jnp.array([0.5, 1.0, 2.5, 4.0]), jnp.array([1.0, 0.5, 2.0, 1.5])
    with contextlib.nullcontext() if checked else unchecked():
        assert float(bayes.interval_coverage(counts, lower, upper)) == 0.75
        assert float(bayes.interval_coverage(np.asarray(counts), lower, upper)) == 0.75
        got = bayes.crps_gaussian(counts, mean, std)
    assert float(got) == pytest.approx(float(bayes.crps_gaussian(floats, mean, std)), abs=0)


def test_crps_gaussian_known_value_and_sample_estimate():
    # CRPS(N(0, 1), 0) = 2 phi(0) - 1/sqrt(pi) = sqrt(2/pi) - 1/sqrt(pi)
    zero = jnp.zeros(1)
    exact = math.sqrt(2 / math.pi) - 1 / math.sqrt(math.pi)
    assert float(bayes.crps_gaussian(zero, zero, jnp.ones(1))) == pytest.approx(exact, abs=1e-6)
    y = jnp.array([0.3, -1.0, 2.5])
    mean = jnp.array([0.0, 0.5, 2.0])
    std = jnp.array([1.0, 0.5, 2.0])
    draws = mean + std * jax.random.normal(jax.random.key(0), (40000, 3))
    assert float(bayes.crps_samples(y, draws)) == pytest.approx(
        float(bayes.crps_gaussian(y, mean, std)), abs=1e-2
    )
    # against the definition: integral of (F(t) - 1{t >= y})^2 dt
    t = np.linspace(-10, 10, 200001)
    integrand = (scipy.stats.norm.cdf(t, 0.5, 0.5) - (t >= -1.0)) ** 2
    direct = float(np.sum(integrand) * (t[1] - t[0]))
    assert float(bayes.crps_gaussian(y[1:2], mean[1:2], std[1:2])) == pytest.approx(
        direct, abs=1e-4
    )
    with pytest.raises((errors.ShapeError, jaxtyping.TypeCheckError), match="samples"):
        bayes.crps_samples(y, draws[:, :2])


def test_calibration_takes_unsigned_labels():
    # uint8 labels (an image data set's) were rejected by the annotation when type checking
    # was on and worked when it was off; with strict promotion the comparison needs int32 too.
    sure = jnp.tile(jnp.array([[0.95, 0.05]], jnp.float32), (1000, 1))
    half = np.arange(1000) % 2
    want = bayes.expected_calibration_error(sure, jnp.asarray(half, jnp.int32))
    for dtype in (np.uint8, np.int64):
        got = bayes.expected_calibration_error(sure, jnp.asarray(half.astype(dtype)))
        assert float(got) == pytest.approx(float(want), abs=0)


@pytest.mark.parametrize("checked", [True, False])
def test_metrics_refuse_logits_bad_labels_and_broadcasting_shapes(checked, unchecked):
    # Each of these used to return a plausible number with checking off: ECE of logits 1.24 (it
    # lies in [0, 1]), labels counted from 1 scored as wrong, and y (5,) against bounds (5, 1)
    # broadcast to (5, 5) for a coverage of 0.2 where every target is inside its interval.
    probs = jnp.tile(jnp.array([[0.7, 0.2, 0.1]], jnp.float32), (6, 1))
    labels = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
    y = jnp.arange(5.0)
    with contextlib.nullcontext() if checked else unchecked():
        for fn in (bayes.expected_calibration_error, bayes.reliability_diagram):
            with pytest.raises(errors.ShapeError, match=r"probs must be probabilities, each row summing to 1; got values in \[-2\.303, -0\.3567\].*jax\.nn\.softmax"):
                fn(jnp.log(probs), labels)
            with pytest.raises(errors.ShapeError, match=r"labels must be class ids in \[0, 3\) for probs with 3 columns; got labels in \[1, 3\]"):
                fn(probs, labels + 1)
            with pytest.raises(errors.ShapeError, match=r"labels must be class ids in \[0, 2\)"):
                fn(jnp.full((6,), 0.5), labels)  # binary: probability of class 1
        with pytest.raises(errors.ShapeError, match=r"interval_coverage: y, lower, upper must have the same shape, one entry per target; got y \(5,\), lower \(5, 1\), upper \(5, 1\)"):
            bayes.interval_coverage(y, (y - 0.5)[:, None], (y + 0.5)[:, None])
        with pytest.raises(errors.ShapeError, match=r"crps_gaussian: y, mean, std must have the same shape.*got y \(5,\), mean \(5, 1\), std \(5, 1\)"):
            bayes.crps_gaussian(y, y[:, None], jnp.ones((5, 1)))
        assert float(bayes.interval_coverage(y, y - 0.5, y + 0.5)) == 1.0
        # a scalar std is shared by every target: the same value as a full array of it (exact)
        shared = bayes.crps_gaussian(y, y + 0.3, jnp.asarray(0.5))
        assert float(shared) == float(bayes.crps_gaussian(y, y + 0.3, jnp.full((5,), 0.5)))
        # within tolerance of a sum of 1: accepted, and ECE stays in [0, 1]
        assert 0.0 <= float(bayes.expected_calibration_error(probs * (1 + 5e-4), labels)) <= 1.0
