"""Choosing which leaves of a module are random, and the prior each one gets.

A prior specification is a list of rules `(pattern, prior)`. Each inexact-array leaf of the module
takes the prior of the first rule whose pattern matches its path; leaves no rule matches (and
leaves whose first match has prior `None`) stay fixed at their current value.
"""

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._errors import ConfigError, check_positive_numbers, require

dist = require("numpyro.distributions", "bayes")


class Subtree(eqx.Module):
    """Selects every leaf inside the part of a module picked out by `where`.

    Use it as a prior pattern when paths are awkward to write, e.g. only the last layer of an
    `eqx.nn.MLP`: `Subtree(lambda m: m.layers[-1])`. `where` is the same kind of function as
    the one `eqx.tree_at` takes.

    **Arguments:**

    - `where`: a function from the module to a sub-pytree of it (a layer, a list of layers ...).
    """

    where: Callable[[Any], PyTree] = eqx.field(static=True)

    def __init__(self, where: Callable[[Any], PyTree]):
        self.where = where


class FanInNormal(eqx.Module):
    """A zero-mean Normal prior whose scale shrinks with the leaf's fan-in.

    For a weight of shape `(out, in, *kernel)` the scale is `scale / sqrt(in * prod(kernel))`;
    for a vector (a bias) it is `scale`. This keeps the prior over a layer's outputs roughly
    independent of its width (Neal, "Bayesian Learning for Neural Networks", 1996).

    **Arguments:**

    - `scale`: the scale before fan-in normalisation.
    """

    scale: float = eqx.field(static=True)

    def __init__(self, scale: float = 1.0):
        check_positive_numbers("FanInNormal", scale=scale)
        self.scale = float(scale)

    def __call__(self, path: str, leaf: Array) -> Any:
        fan_in = math.prod(leaf.shape[1:]) if leaf.ndim >= 2 else 1
        return dist.Normal(jnp.zeros((), leaf.dtype), self.scale / math.sqrt(fan_in))


class AroundValue(eqx.Module):
    """A Normal prior centred on the leaf's current value (e.g. pre-trained weights).

    Useful for a partial Bayesian treatment of a trained model: the posterior explores a
    neighbourhood of the trained solution instead of starting from scratch.

    **Arguments:**

    - `scale`: the prior standard deviation around the current value.
    """

    scale: float = eqx.field(static=True)

    def __init__(self, scale: float = 0.1):
        check_positive_numbers("AroundValue", scale=scale)
        self.scale = float(scale)

    def __call__(self, path: str, leaf: Array) -> Any:
        return dist.Normal(leaf, self.scale)


Pattern: TypeAlias = str | re.Pattern | Subtree | Callable[[str, Array], bool]
"""A glob on leaf paths (`*` and `?` wildcards, everything else literal: `layers[0].*`), a
compiled regular expression (matched with `search`), a `Subtree`, or a predicate
`(path, leaf) -> bool`."""

PriorLike: TypeAlias = Any
"""A NumPyro distribution (scalar, broadcast to the leaf's shape, or of the leaf's exact shape),
a positive float `s` meaning `Normal(0, s)`, a callable `(path, leaf) -> distribution`, or
`None` to keep the leaf fixed."""

PriorSpec: TypeAlias = Mapping[Any, PriorLike] | Sequence[tuple[Any, PriorLike]] | PriorLike
"""Either `{pattern: prior}` / `[(pattern, prior), ...]` (first match wins) or one prior for
every inexact-array leaf."""


def leaf_path(path: tuple) -> str:
    """`jax.tree_util.keystr` of a leaf path without the leading dot: `layers[0].weight`."""
    s = jtu.keystr(path)
    return s[1:] if s.startswith(".") else s


def _glob_regex(glob: str) -> re.Pattern:
    # fnmatch would read `[0]` as a character class; eqzoo paths contain brackets, so only
    # `*` and `?` are wildcards here.
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)
    return re.compile("".join(parts) + r"\Z", flags=re.S)


def _is_prior_value(value: Any) -> bool:
    return (
        value is None
        or isinstance(value, dist.Distribution)
        or isinstance(value, int | float)
        or isinstance(value, FanInNormal | AroundValue)
    )


def _as_rules(priors: PriorSpec) -> list[tuple[Any, PriorLike]]:
    if _is_prior_value(priors):
        return [("*", priors)]
    if isinstance(priors, Mapping):
        return list(priors.items())
    if isinstance(priors, Sequence) and not isinstance(priors, str):
        rules = list(priors)
        for rule in rules:
            if not (isinstance(rule, tuple) and len(rule) == 2):
                raise ConfigError(
                    f"priors given as a sequence must hold (pattern, prior) pairs; got {rule!r}."
                )
        return rules
    if callable(priors):
        return [("*", priors)]
    raise ConfigError(
        f"priors must be a distribution, a float scale, a callable (path, leaf) -> distribution, "
        f"a dict {{pattern: prior}} or a list of (pattern, prior) pairs; got {type(priors)}."
    )


def _matcher(pattern: Any, module: Any) -> Callable[[str, Array], bool]:
    if isinstance(pattern, str):
        regex = _glob_regex(pattern)
        return lambda path, leaf: regex.match(path) is not None
    if isinstance(pattern, re.Pattern):
        return lambda path, leaf: pattern.search(path) is not None
    if isinstance(pattern, Subtree):
        ids = {id(x) for x in jtu.tree_leaves(pattern.where(module))}
        return lambda path, leaf: id(leaf) in ids
    if callable(pattern):
        return lambda path, leaf: bool(pattern(path, leaf))
    raise ConfigError(
        f"a prior pattern must be a glob string, a compiled regex, a Subtree or a predicate "
        f"(path, leaf) -> bool; got {pattern!r}."
    )


def _as_distribution(prior: PriorLike, path: str, leaf: Array) -> Any:
    if isinstance(prior, int | float) and not isinstance(prior, bool):
        if not prior > 0:
            raise ConfigError(
                f"a float prior is a Normal(0, scale) scale and must be > 0; "
                f"got {prior} for {path!r}."
            )
        prior = dist.Normal(jnp.zeros((), leaf.dtype), float(prior))
    elif not isinstance(prior, dist.Distribution) and callable(prior):
        prior = prior(path, leaf)
    if not isinstance(prior, dist.Distribution):
        raise ConfigError(f"the prior for {path!r} is not a NumPyro distribution: {prior!r}.")
    prior = with_array_params(prior, leaf.dtype)
    if prior.event_shape != ():
        raise ConfigError(
            f"the prior for {path!r} has event shape {prior.event_shape}; use a univariate "
            f"distribution (it is applied independently to every entry of the leaf)."
        )
    shape = tuple(leaf.shape)
    try:
        batch = jnp.broadcast_shapes(prior.batch_shape, shape)
    except ValueError:
        batch = None
    if batch != shape:
        raise ConfigError(
            f"the prior for {path!r} has batch shape {prior.batch_shape}, which does not "
            f"broadcast to the leaf's shape {shape}."
        )
    return prior.expand(shape).to_event(len(shape))


def with_array_params(distribution: Any, dtype: Any) -> Any:
    """`distribution` with its Python-float parameters turned into arrays of `dtype`.

    `eqx.filter_jit` (and so `run_svi`'s compiled program) treats a Python float in a pytree as
    a constant of the program and an array as an argument: with floats, every new prior scale
    compiled the whole fit again.
    """
    return jtu.tree_map(
        lambda v: jnp.asarray(v, dtype) if isinstance(v, float) else v, distribution
    )


def resolve_priors(
    module: Any, priors: PriorSpec
) -> tuple[tuple[int, ...], tuple[str, ...], tuple[Any, ...], tuple[str, ...]]:
    """Match prior rules against a module's leaves.

    **Returns:** `(indices, paths, distributions, all_paths)`: positions (in `jtu.tree_leaves`
    order) and paths of the random leaves, their per-leaf distributions (event shape equal to
    the leaf shape), and the paths of every inexact-array leaf (for error messages).
    """
    rules = _as_rules(priors)
    if not rules:
        raise ConfigError("priors is empty: give at least one (pattern, prior) rule.")
    with_path = jtu.tree_leaves_with_path(module)
    candidates = [
        (i, leaf_path(p), leaf)
        for i, (p, leaf) in enumerate(with_path)
        if eqx.is_inexact_array(leaf)
    ]
    all_paths = tuple(path for _, path, _ in candidates)
    matchers = [_matcher(pattern, module) for pattern, _ in rules]
    used = [False] * len(rules)
    indices, paths, dists = [], [], []
    for i, path, leaf in candidates:
        for r, ((_, prior), match) in enumerate(zip(rules, matchers, strict=True)):
            if match(path, leaf):
                used[r] = True
                if prior is not None:
                    indices.append(i)
                    paths.append(path)
                    dists.append(_as_distribution(prior, path, leaf))
                break
    unused = [rules[r][0] for r in range(len(rules)) if not used[r]]
    if unused:
        shown = ", ".join(all_paths[:12]) + (" ..." if len(all_paths) > 12 else "")
        raise ConfigError(
            f"prior pattern(s) {unused!r} match no parameter of the module (or only ones an "
            f"earlier rule already took). Parameter paths are: {shown}. Globs use `*` and `?` "
            f"only, e.g. 'layers[-1]' is not a path; write 'layers[2].*' or use Subtree."
        )
    if not indices:
        raise ConfigError("the priors select no parameter: every matching rule has prior None.")
    return tuple(indices), tuple(paths), tuple(dists), all_paths
