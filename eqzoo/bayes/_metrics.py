"""Scores of probabilistic predictions: NLPD, interval coverage, calibration error, CRPS."""

import math
from typing import no_type_check

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Integer, Real, Shaped

from .._errors import ShapeError, check_sizes, shape_str
from ._types import ArrayIn


def negative_log_predictive_density(
    log_likelihood: Float[ArrayIn, "*samples batch"],
) -> Float[Array, ""]:
    """Negative log predictive density, averaged over examples (lower is better).

    `-mean_i log( (1/S) sum_s p(y_i | x_i, theta_s) )`, computed stably with `logsumexp`.

    **Arguments:**

    - `log_likelihood`: `(samples, batch)` values `log p(y_i | x_i, theta_s)` (e.g.
      `Posterior.log_likelihood`), or `(batch,)` predictive log densities already averaged over
      the posterior (e.g. a conjugate head's `log_predictive_density`).

    **Returns:** a scalar.
    """
    log_likelihood = jnp.asarray(log_likelihood)
    if log_likelihood.ndim == 1:
        return -log_likelihood.mean()
    if log_likelihood.ndim != 2:
        raise ShapeError(
            f"log_likelihood must be (samples, batch) or (batch,); got "
            f"{shape_str(log_likelihood.shape)}."
        )
    lpd = jax.nn.logsumexp(log_likelihood, axis=0) - math.log(log_likelihood.shape[0])
    return -lpd.mean()


def _check_same_shape(who: str, **arrays: Array) -> None:
    # Trace-time: y of shape (batch,) against bounds of shape (batch, 1) would broadcast to
    # (batch, batch) and average over every pair, silently (coverage 0.2 instead of 1.0).
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        got = ", ".join(f"{name} {shape_str(shape)}" for name, shape in shapes.items())
        raise ShapeError(
            f"{who}: {', '.join(shapes)} must have the same shape, one entry per target; got "
            f"{got}. They would broadcast against each other and score the wrong pairs; reshape "
            f"one to match (e.g. y.reshape(lower.shape))."
        )


@no_type_check  # checked below, with messages that name the mismatch
def interval_coverage(
    y: Real[ArrayIn, " batch *target"],
    lower: Float[ArrayIn, " batch *target"],
    upper: Float[ArrayIn, " batch *target"],
) -> Float[Array, ""]:
    """The fraction of targets inside `[lower, upper]`; near `prob` when calibrated. `y` may be
    integer (counts, for a Poisson likelihood)."""
    lower, upper = jnp.asarray(lower), jnp.asarray(upper)
    _check_same_shape("interval_coverage", y=jnp.asarray(y), lower=lower, upper=upper)
    y = jnp.asarray(y).astype(lower.dtype)  # integer counts compare as floats (strict promotion)
    inside = (y >= lower) & (y <= upper)
    return inside.astype(lower.dtype).mean()


def _as_class_probs(probs: Array) -> Array:
    if probs.ndim == 1:  # Bernoulli: the probability of class 1
        return jnp.stack([1 - probs, probs], axis=-1)
    if probs.ndim != 2:
        raise ShapeError(
            f"probs must be (batch, classes), or (batch,) for a binary problem; got "
            f"{shape_str(probs.shape)}."
        )
    return probs


def _check_probs_and_labels(probs: np.ndarray, labels: np.ndarray) -> None:
    # Concrete values only. Logits, or labels counted from 1, bin and score without error: ECE on
    # logits came out as 1.24 (it lies in [0, 1]) and labels + 1 as 0.93 on a 97%-accurate head.
    tol = 1e-2 if probs.dtype.itemsize < 4 else 1e-3
    p = probs.astype(np.float32)
    if p.min() < -tol or p.max() > 1 + tol or np.abs(p.sum(-1) - 1).max() > tol:
        raise ShapeError(
            f"probs must be probabilities, each row summing to 1; got values in "
            f"[{p.min():.4g}, {p.max():.4g}] and row sums in [{p.sum(-1).min():.4g}, "
            f"{p.sum(-1).max():.4g}]. For logits, pass jax.nn.softmax(logits, axis=-1) (or "
            f"jax.nn.sigmoid for a binary head)."
        )
    classes = probs.shape[-1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ShapeError(
            f"labels must be class ids in [0, {classes}) for probs with {classes} columns; got "
            f"labels in [{labels.min()}, {labels.max()}]. Labels counted from 1 need labels - 1."
        )


@no_type_check  # checked below, with messages that name the mismatch
def reliability_diagram(
    probs: Float[ArrayIn, " batch *classes"],
    labels: Integer[ArrayIn, " batch"],
    *,
    num_bins: int = 10,
) -> tuple[Float[Array, " bins"], Float[Array, " bins"], Int[Array, " bins"]]:
    """Confidence-binned accuracy: the data behind a reliability diagram.

    Predictions are binned by confidence (the top class probability) into `num_bins` equal-width
    bins over `[0, 1]`.

    **Arguments:**

    - `probs`: `(batch, classes)` predicted probabilities, or `(batch,)` for binary problems.
    - `labels`: `(batch,)` integer labels.
    - `num_bins`: number of bins.

    **Returns:** `(confidence, accuracy, count)` per bin; empty bins have confidence and
    accuracy 0.
    """
    check_sizes("reliability_diagram", num_bins=num_bins)
    probs, labels = _as_class_probs(jnp.asarray(probs)), jnp.asarray(labels)
    if not jnp.issubdtype(probs.dtype, jnp.floating):
        raise ShapeError(f"probs must be floating-point probabilities; got dtype {probs.dtype.name}.")
    if labels.shape != probs.shape[:1]:
        raise ShapeError(
            f"labels must be ({probs.shape[0]},), one per row of probs {shape_str(probs.shape)}; got "
            f"{shape_str(labels.shape)}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):  # float labels would be truncated silently
        raise ShapeError(
            f"labels must be integer class ids; got dtype {labels.dtype.name}. Convert with "
            "labels.astype(jnp.int32)."
        )
    if not (isinstance(probs, jax.core.Tracer) or isinstance(labels, jax.core.Tracer)):
        _check_probs_and_labels(np.asarray(probs), np.asarray(labels))
    labels = labels.astype(jnp.int32)  # uint8 labels compare with argmax's int32 under strict promotion
    confidence = probs.max(-1)
    correct = (probs.argmax(-1) == labels).astype(probs.dtype)
    bins = jnp.clip(jnp.floor(confidence * num_bins).astype(jnp.int32), 0, num_bins - 1)
    count = jnp.zeros(num_bins, jnp.int32).at[bins].add(1)
    conf_sum = jnp.zeros(num_bins, probs.dtype).at[bins].add(confidence)
    acc_sum = jnp.zeros(num_bins, probs.dtype).at[bins].add(correct)
    denom = jnp.maximum(count, 1).astype(probs.dtype)
    return conf_sum / denom, acc_sum / denom, count


@no_type_check  # checked in reliability_diagram, with messages that name the mismatch
def expected_calibration_error(
    probs: Float[ArrayIn, " batch *classes"],
    labels: Integer[ArrayIn, " batch"],
    *,
    num_bins: int = 10,
) -> Float[Array, ""]:
    """Expected calibration error (Guo et al., 2017): `sum_b (n_b / n) |acc_b - conf_b|`.

    **Arguments:**

    - `probs`: `(batch, classes)` predicted probabilities, or `(batch,)` for binary problems.
    - `labels`: `(batch,)` integer labels.
    - `num_bins`: equal-width confidence bins.

    **Returns:** a scalar in `[0, 1]` (0 is perfectly calibrated).
    """
    conf, acc, count = reliability_diagram(probs, labels, num_bins=num_bins)
    weight = count.astype(conf.dtype) / count.sum().astype(conf.dtype)
    return (weight * jnp.abs(acc - conf)).sum()


@no_type_check  # checked below, with messages that name the mismatch
def crps_gaussian(
    y: Real[ArrayIn, " batch *target"],
    mean: Float[ArrayIn, " batch *target"],
    std: Float[ArrayIn, " batch *target"],
) -> Float[Array, ""]:
    """Continuous ranked probability score of Gaussian predictions, averaged (lower is better).

    Closed form (Gneiting & Raftery, 2007): `std * (z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi))`
    with `z = (y - mean) / std`. `y` may be integer (counts); `std` may be one scalar shared by
    every target.
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)
    _check_same_shape("crps_gaussian", y=jnp.asarray(y), mean=mean, **({} if std.ndim == 0 else {"std": std}))
    y = jnp.asarray(y).astype(mean.dtype)  # integer counts (strict promotion needs the cast)
    z = (y - mean) / std
    cdf = jax.scipy.stats.norm.cdf(z)
    pdf = jax.scipy.stats.norm.pdf(z)
    crps = std * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))
    return crps.mean()


def crps_samples(
    y: Shaped[ArrayIn, " batch *target"],
    samples: Shaped[ArrayIn, " samples batch *target"],
) -> Float[Array, ""]:
    """CRPS estimated from predictive draws, averaged over targets (lower is better).

    `E|X - y| - E|X - X'| / 2`, with the pairwise term from sorted draws in `O(S log S)`.

    **Arguments:**

    - `y`: targets, `(batch, ...)`.
    - `samples`: draws of the prediction, `(samples, batch, ...)` (e.g. `Prediction.samples`).
    """
    y, samples = jnp.asarray(y), jnp.asarray(samples)
    if samples.shape[1:] != y.shape:
        raise ShapeError(
            f"samples must be (samples, *y.shape) = (S, {', '.join(map(str, y.shape))}); got "
            f"{shape_str(samples.shape)}."
        )
    floats = [d for d in (samples.dtype, y.dtype) if jnp.issubdtype(d, jnp.floating)]
    dtype = floats[0] if floats else jnp.dtype(jnp.float32)
    s = jnp.sort(samples.astype(dtype), axis=0)
    n = s.shape[0]
    term1 = jnp.abs(s - y.astype(dtype)).mean(0)
    # sum_{i,j} |x_i - x_j| = 2 sum_i (2i - n - 1) x_(i) for sorted x, i = 1..n
    w = (2 * jnp.arange(1, n + 1) - n - 1).astype(dtype).reshape((n,) + (1,) * (s.ndim - 1))
    term2 = (w * s).sum(0) / (n * n)
    return (term1 - term2).mean()
