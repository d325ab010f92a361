"""Physics-informed losses: PDE residuals by automatic differentiation, boundary and initial terms,
collocation sampling.

Raissi, Perdikaris, Karniadakis, "Physics-informed neural networks", J. Comput. Phys. 2019.

Conventions: a field `u` maps one point `x` of shape `(dim,)` (for time-dependent problems the
time is one of the coordinates, by convention the first) to a scalar or a vector; a PDE is a
function `pde(u, x)` returning the residual at `x`, written with `gradient`, `laplacian`,
`jax.jacfwd` or `jax.hessian` on `u`. Points are stacked as `(points, dim)`.
"""

import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias, no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Real

from .._errors import ConfigError, ShapeError, shape_str
from .._typing import PRNGKey
from ._errors import is_traced

Field: TypeAlias = Callable[[Float[Array, " dim"]], Any]
"""A function (usually an `eqx.Module`) of one point `x: (dim,)`."""

Target: TypeAlias = Real[Array, "..."] | Callable[[Float[Array, " dim"]], Any]
"""Condition values: an array with one row per point, or a function of one point."""


def _check_point(name: str, x: Any) -> None:
    # Checked here, not left to jaxtyping: with checking off a stack of points (points, dim) would
    # be differentiated as one point and give a plausible-looking wrong value.
    shape, dtype = jnp.shape(x), getattr(x, "dtype", None)
    if len(shape) != 1 or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        got = f"shape {shape_str(shape)}" + ("" if dtype is None else f" and dtype {jnp.dtype(dtype).name}")
        raise ShapeError(
            f"{name} takes one point x, a floating-point array of shape (dim,); got {got}. For "
            f"several points, vmap over them: jax.vmap(lambda x: {name}(u, x))(points) (or "
            f"pinn_residual); convert integers with x.astype(jnp.float32)."
        )


def _field_output(name: str, fn: Field, x: Any) -> Any:
    # A network built for another dim failed deep inside its first layer with JAX's own
    # "dot_general requires contracting dimensions to have the same shape", naming neither the
    # field nor the points.
    try:
        return eqx.filter_eval_shape(fn, x)
    except (TypeError, ValueError) as err:
        dim = jnp.shape(x)[0]
        raise ShapeError(
            f"{name}: calling the field u on one point x of shape ({dim},) failed with "
            f"{type(err).__name__}: {err}. The field takes one point with the points' {dim} "
            f"coordinates (time included, when it is one of them); build the network for that "
            f"input size (e.g. eqx.nn.MLP(in_size={dim}, ...)) or pass points with the "
            f"coordinates it expects."
        ) from err


def _describe(out: Any) -> str:
    """'of shape (2,) and dtype float32' for an array, the type's name for anything else."""
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape is None or dtype is None:
        return f"a {type(out).__name__}, not an array"
    return f"of shape {shape_str(shape)} and dtype {jnp.dtype(dtype).name}"


def _is_real_floating(out: Any) -> bool:
    dtype = getattr(out, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _scalar_check(name: str, fn: Field, x: Any) -> None:
    _check_point(name, x)
    out = _field_output(name, fn, x)
    if getattr(out, "shape", None) != () or not _is_real_floating(out):
        # An integer or bool field differentiated to JAX's "grad requires real-valued outputs"
        # (a rounded network has zero derivatives anyway); a complex one asked for holomorphic=True.
        raise ShapeError(
            f"{name} needs a scalar field u(x) -> (); got u(x) {_describe(out)} for x of "
            f"shape {shape_str(jnp.shape(x))}. The field must return one real floating-point "
            f"number: use a scalar network (eqx.nn.MLP(..., out_size='scalar')) or pick one "
            f"component, lambda x: u(x)[i]; not rounded (integer) or complex values."
        )


@no_type_check  # checked below with messages that say how to fix the call
def gradient(fn: Field, x: Float[Array, " dim"]) -> Float[Array, " dim"]:
    """The gradient `∇u(x)` of a scalar field at one point.

    **Arguments:**

    - `fn`: the scalar field `u(x) -> ()`.
    - `x`: the point, shape `(dim,)`.

    **Returns:** `(∂u/∂x_1, ..., ∂u/∂x_dim)`, shape `(dim,)`.
    """
    _scalar_check("gradient", fn, x)
    return jax.grad(fn)(x)


@no_type_check  # checked below with messages that say how to fix the call
def laplacian(
    fn: Field, x: Float[Array, " dim"], dims: Sequence[int] | None = None
) -> Float[Array, ""]:
    """The Laplacian `Δu(x) = Σ_i ∂²u/∂x_i²` of a scalar field at one point.

    Computed as the trace of `jax.hessian` (forward-over-reverse), which is cheapest for the
    low dimensions of PDE problems.

    **Arguments:**

    - `fn`: the scalar field `u(x) -> ()`.
    - `x`: the point, shape `(dim,)`.
    - `dims`: the coordinates to sum over, e.g. `(1, 2)` for the spatial Laplacian when
      coordinate 0 is time; default all.

    **Returns:** a scalar.
    """
    _scalar_check("laplacian", fn, x)
    if dims is not None:
        dim = x.shape[0]
        bad = [d for d in dims if not _is_int(d) or not -dim <= d < dim]
        # dims=(0, 0), or (1, -1) on 2-d points, summed that second derivative twice, silently
        if bad or len(dims) == 0 or len({int(d) % dim for d in dims}) != len(dims):
            raise ConfigError(
                f"laplacian: dims must be a non-empty list of coordinates of x (dim={dim}), "
                f"distinct and each in [-{dim}, {dim}); got dims={list(dims)}."
            )
    hess = jax.hessian(fn)(x)  # (dim, dim)
    diag = jnp.diagonal(hess)
    return jnp.sum(diag if dims is None else diag[jnp.asarray(list(dims))])


@no_type_check  # checked below with messages that say how to fix the call
def divergence(fn: Field, x: Float[Array, " dim"]) -> Float[Array, ""]:
    """The divergence `∇·v(x) = Σ_i ∂v_i/∂x_i` of a vector field `v(x) -> (dim,)` at one point.

    **Arguments:**

    - `fn`: the vector field `v(x) -> (dim,)`, real floating-point, one value per coordinate.
    - `x`: the point, shape `(dim,)`.

    **Returns:** a scalar.

    **Raises:** `ShapeError` when `x` is not one floating-point point, or when `v` cannot be
    called on it or does not return a real floating-point array of the shape of `x` (checked at
    trace time).
    """
    _check_point("divergence", x)
    out = _field_output("divergence", fn, x)
    if getattr(out, "shape", None) != x.shape or not _is_real_floating(out):
        # An integer field's jacfwd is all zeros, so its divergence was 0, silently; a complex
        # one gave a complex number.
        raise ShapeError(
            f"divergence needs a vector field v(x) with the shape of x; got x of shape "
            f"{shape_str(x.shape)} and v(x) {_describe(out)}. The field must return real "
            f"floating-point values, one per coordinate: build the network with out_size="
            f"{x.shape[0]} (the points' dim); for a scalar potential phi, the divergence of its "
            f"gradient is laplacian(phi, x)."
        )
    return jnp.trace(jax.jacfwd(fn)(x))


def _check_points(name: str, points: Any, dim: int | None = None) -> None:
    shape = jnp.shape(points)
    if len(shape) != 2 or shape[0] < 1 or (dim is not None and shape[1] != dim):
        want = "(points, dim)" if dim is None else f"(points, {dim}) (the interior points' dim)"
        raise ShapeError(
            f"{name} must be a stack of points of shape {want}; got shape {shape_str(shape)}. "
            f"A single point x of shape (dim,) is points[None]."
        )
    dtype = getattr(points, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ShapeError(
            f"{name} must be floating point (derivatives need it); got "
            f"{type(points).__name__ if dtype is None else jnp.dtype(dtype).name}. Convert with "
            f"points.astype(jnp.float32)."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@no_type_check  # checked below with messages that say how to fix the call
def pinn_residual(
    pde: Callable[[Field, Float[Array, " dim"]], Any],
    u: Field,
    points: Float[Array, "points dim"],
) -> Float[Array, " points *residual"]:
    """The residual of a PDE for the field `u` at every collocation point.

    **Arguments:**

    - `pde`: `pde(u, x)` returns the residual at one point `x` (zero where `u` solves the PDE),
      e.g. Poisson `-Δu = f`: `lambda u, x: laplacian(u, x) + f(x)`.
    - `u`: the field, usually a network (an `eqx.Module`) of one point.
    - `points`: collocation points, shape `(points, dim)`.

    **Returns:** the residuals, shape `(points,)` for a scalar PDE or `(points, *residual)`
    for a system.
    """
    _check_points("pinn_residual: points", points)
    if not (callable(pde) and callable(u)):
        raise ConfigError(
            f"pinn_residual takes pde(u, x) and the field u, both callable; got pde of type "
            f"{type(pde).__name__} and u of type {type(u).__name__}."
        )
    return _residual("pinn_residual", pde, u, points)


def _residual(who: str, pde: Any, u: Field, points: Any) -> Array:
    points = jnp.asarray(points)
    _field_output(who, u, jax.ShapeDtypeStruct(points.shape[1:], points.dtype))
    return jax.vmap(lambda x: jnp.asarray(pde(u, x)))(points)


def _condition_error(who: str, u: Field, condition: Any, name: str, dim: int) -> Float[Array, ""]:
    if not (isinstance(condition, tuple) and len(condition) == 2):
        raise ConfigError(
            f"{who}: {name} must be a pair (points, target) with points of shape "
            f"(points, dim) and target an array of values or a function of one point; got "
            f"{type(condition).__name__}."
        )
    points, target = condition
    _check_points(f"{who}: {name} points", points, dim)
    pred = jax.vmap(u)(jnp.asarray(points))
    if callable(target):
        values = jax.vmap(lambda x: jnp.asarray(target(x)))(jnp.asarray(points))
    else:
        values = jnp.asarray(target)
    if not (jnp.issubdtype(values.dtype, jnp.floating) or jnp.issubdtype(values.dtype, jnp.integer)):
        raise ShapeError(f"{who}: {name} target must hold real numbers; got dtype {values.dtype.name}.")
    if values.shape != pred.shape:
        raise ShapeError(
            f"{who}: {name} target must have one value per point with the shape of "
            f"u(x); got u at {points.shape[0]} points of shape {shape_str(pred.shape)} and "
            f"target of shape {shape_str(values.shape)}."
        )
    return jnp.mean((pred - values.astype(pred.dtype)) ** 2)


def _check_weight(who: str, name: str, weight: Any) -> None:
    # A negative weight rewards the optimiser for violating that term: the loss is unbounded
    # below and training "converges" to garbage.
    if is_traced(weight):
        if jnp.shape(weight) != ():
            raise ConfigError(f"{who}: {name} must be a scalar; got shape {shape_str(jnp.shape(weight))}.")
        return
    value = np.asarray(weight) if hasattr(weight, "dtype") else weight
    ok_type = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(value, np.ndarray):
        ok_type = value.shape == () and (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer))
    if not ok_type or not (np.isfinite(value) and value >= 0):
        raise ConfigError(
            f"{who}: {name} must be a finite number >= 0 (a float, or a scalar array when it is "
            f"scheduled under jit); got {name}={weight!r}."
        )


def _loss_terms(who: str, u: Any, pde: Any, interior: Any, boundary: Any, initial: Any) -> dict[str, Any]:
    _check_points(f"{who}: interior", interior)
    if not (callable(u) and callable(pde)):
        raise ConfigError(
            f"{who} takes the field u and pde(u, x), both callable (u first); got u of type "
            f"{type(u).__name__} and pde of type {type(pde).__name__}."
        )
    dim = jnp.shape(interior)[1]
    residual = _residual(who, pde, u, interior)
    terms = {"pde": jnp.mean(residual**2)}
    if boundary is not None:
        terms["boundary"] = _condition_error(who, u, boundary, "boundary", dim)
    if initial is not None:
        terms["initial"] = _condition_error(who, u, initial, "initial", dim)
    return terms


@no_type_check  # checked below with messages that say how to fix the call
def pinn_loss_terms(
    u: Field,
    pde: Callable[[Field, Float[Array, " dim"]], Any],
    interior: Float[Array, "points dim"],
    *,
    boundary: tuple[Float[Array, "bpoints dim"], Target] | None = None,
    initial: tuple[Float[Array, "ipoints dim"], Target] | None = None,
) -> dict[str, Float[Array, ""]]:
    """Each term of the physics-informed loss: the mean squared residual and condition errors.

    **Arguments:** as for [`pinn_loss`][eqzoo.sciml.pinn_loss], without the weights.

    **Returns:** a dict with `"pde"` and, when given, `"boundary"` and `"initial"`, each a
    scalar mean squared error.
    """
    return _loss_terms("pinn_loss_terms", u, pde, interior, boundary, initial)


@no_type_check  # checked below with messages that say how to fix the call
def pinn_loss(
    u: Field,
    pde: Callable[[Field, Float[Array, " dim"]], Any],
    interior: Float[Array, "points dim"],
    *,
    boundary: tuple[Float[Array, "bpoints dim"], Target] | None = None,
    initial: tuple[Float[Array, "ipoints dim"], Target] | None = None,
    pde_weight: float | Float[Array, ""] = 1.0,
    boundary_weight: float | Float[Array, ""] = 1.0,
    initial_weight: float | Float[Array, ""] = 1.0,
) -> Float[Array, ""]:
    """The physics-informed loss: weighted mean squared PDE residual plus condition errors.

    `pde_weight · mean(pde(u, x)²) + boundary_weight · mean((u(xb) - gb)²)
    + initial_weight · mean((u(xi) - gi)²)` over interior, boundary and initial points.
    Differentiate it with respect to the network (`eqx.filter_value_and_grad`).

    **Arguments:**

    - `u`: the field, a network of one point `x: (dim,)`.
    - `pde`: `pde(u, x)`, the residual at one point.
    - `interior`: collocation points, shape `(points, dim)` (see `sample_collocation`).
    - `boundary`: `(points, target)` where `u` must equal `target` (Dirichlet); `target` is an
      array of shape `(bpoints, *out)` or a function of one point.
    - `initial`: `(points, target)` for an initial condition, same form (points at `t = t0`).
    - `pde_weight`, `boundary_weight`, `initial_weight`: weights of the terms, finite and
      `>= 0`; a scalar array (traced under `jit`) schedules a weight without recompiling.

    **Returns:** a scalar.

    **Raises:** `ShapeError` for points that are not a floating `(points, dim)` stack (boundary
    and initial points must have the interior's `dim`) or a target of the wrong shape;
    `ConfigError` for a malformed condition or a negative or non-finite weight. These are
    checked by eqzoo itself, with or without jaxtyping's runtime checking.
    """
    weights = {"pde": pde_weight, "boundary": boundary_weight, "initial": initial_weight}
    for name, weight in weights.items():
        _check_weight("pinn_loss", f"{name}_weight", weight)
    terms = _loss_terms("pinn_loss", u, pde, interior, boundary, initial)
    dtype = terms["pde"].dtype
    return sum((jnp.asarray(weights[k], dtype) * v for k, v in terms.items()), start=jnp.zeros((), dtype))


def _box(name: str, lower: Any, upper: Any) -> tuple[np.ndarray, np.ndarray]:
    lo = np.atleast_1d(np.asarray(lower, dtype=float))
    hi = np.atleast_1d(np.asarray(upper, dtype=float))
    if lo.ndim != 1 or lo.shape != hi.shape:
        raise ShapeError(
            f"{name}: lower and upper must be 1-d and of the same length (one bound per "
            f"coordinate); got lower {shape_str(lo.shape)} and upper {shape_str(hi.shape)}."
        )
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo < hi)):
        raise ConfigError(
            f"{name}: the box needs finite bounds with lower < upper in every coordinate; got "
            f"lower={lo.tolist()} and upper={hi.tolist()}."
        )
    return lo, hi


def _float_dtype(name: str, dtype: Any) -> Any:
    """JAX's default float for `None`; a floating dtype as given; `ConfigError` otherwise (JAX's
    "dtype argument to `uniform` must be a float dtype" named neither function nor fix)."""
    if dtype is None:
        return jnp.result_type(float)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ConfigError(
            f"{name}: dtype must be a floating dtype (points are differentiated); got "
            f"{jnp.dtype(dtype).name}. Pass dtype=jnp.float32, or None for JAX's default float."
        )
    return jnp.dtype(dtype)


def _check_num(name: str, num: int) -> int:
    if not _is_int(num) or num < 1:  # NumPy integers are fine
        raise ConfigError(f"{name}: num must be a positive int; got num={num!r}.")
    return int(num)  # a Python int: a shape for the jitted samplers, not a traced argument


@eqx.filter_jit
def _unit_box(key, num: int, dim: int, method: str, dtype):
    if method == "uniform":
        return jax.random.uniform(key, (num, dim), dtype)
    k_perm, k_jit = jax.random.split(key)
    perms = jax.vmap(lambda k: jax.random.permutation(k, num))(jax.random.split(k_perm, dim))
    offsets = jax.random.uniform(k_jit, (num, dim), dtype)
    return (perms.T.astype(dtype) + offsets) / num  # (num, dim): one point per stratum


def sample_collocation(
    key: PRNGKey,
    num: int,
    lower: Sequence[float] | Float[Array, " dim"] | float,
    upper: Sequence[float] | Float[Array, " dim"] | float,
    *,
    method: Literal["uniform", "latin"] = "uniform",
    dtype: Any = None,
) -> Float[Array, "points dim"]:
    """Sample collocation points inside the box `[lower, upper]`.

    **Arguments:**

    - `key`: PRNG key.
    - `num`: how many points.
    - `lower`, `upper`: the box's corners, one bound per coordinate.
    - `method`: `"uniform"` (independent uniform points) or `"latin"` (Latin hypercube: each
      coordinate has exactly one point in each of `num` equal strata, which covers the box
      more evenly; resample every few steps either way).
    - `dtype`: floating dtype; default JAX's default float.

    **Returns:** points of shape `(num, dim)`.
    """
    lo, hi = _box("sample_collocation", lower, upper)
    num = _check_num("sample_collocation", num)
    if method not in ("uniform", "latin"):
        raise ConfigError(
            f"sample_collocation: method must be 'uniform' or 'latin'; got method={method!r}."
        )
    dtype = _float_dtype("sample_collocation", dtype)
    unit = _unit_box(key, num, lo.shape[0], method, dtype)
    return jnp.asarray(lo, dtype) + unit * jnp.asarray(hi - lo, dtype)


@eqx.filter_jit
def _on_faces(key, lo, hi, dims: tuple[int, ...], probs, num: int):
    dim = lo.shape[0]
    k_face, k_pos = jax.random.split(key)
    face = jax.random.choice(k_face, len(dims) * 2, (num,), p=probs)
    points = lo + jax.random.uniform(k_pos, (num, dim), lo.dtype) * (hi - lo)
    normal = jnp.asarray(dims)[face // 2]  # (num,) the coordinate pinned to a bound
    bound = jnp.where(face % 2 == 0, lo[normal], hi[normal])
    pinned = jax.nn.one_hot(normal, dim, dtype=jnp.bool_)  # (num, dim)
    return jnp.where(pinned, bound[:, None], points)


def sample_boundary(
    key: PRNGKey,
    num: int,
    lower: Sequence[float] | Float[Array, " dim"] | float,
    upper: Sequence[float] | Float[Array, " dim"] | float,
    *,
    dims: Sequence[int] | None = None,
    dtype: Any = None,
) -> Float[Array, "points dim"]:
    """Sample points uniformly on the faces of the box `[lower, upper]`.

    Each point picks a face with probability proportional to its area, then a uniform point
    on it.

    **Arguments:**

    - `key`: PRNG key.
    - `num`: how many points.
    - `lower`, `upper`: the box's corners, one bound per coordinate.
    - `dims`: which coordinates have boundary faces; default all. For a time-dependent problem
      with time as coordinate 0, pass the spatial ones (`dims=(1,)`) and sample the initial
      slice separately.
    - `dtype`: floating dtype; default JAX's default float.

    **Returns:** points of shape `(num, dim)`.
    """
    lo, hi = _box("sample_boundary", lower, upper)
    num = _check_num("sample_boundary", num)
    dim = lo.shape[0]
    if dims is not None:
        # `d % dim` alone turned dims=(2,) on a 2-d box (coordinates counted from 1) into the
        # faces of coordinate 0, silently.
        bad = [d for d in dims if not _is_int(d) or not -dim <= d < dim]
        if bad or len({int(d) % dim for d in dims}) != len(dims):
            raise ConfigError(
                f"sample_boundary: dims must be distinct coordinates of the box, each in "
                f"[-{dim}, {dim}) (counted from 0); got dims={list(dims)}."
            )
    dims = tuple(range(dim)) if dims is None else tuple(int(d) % dim for d in dims)
    if not dims:
        raise ConfigError("sample_boundary: dims must name at least one coordinate; got [].")
    dtype = _float_dtype("sample_boundary", dtype)
    width = hi - lo
    # A face normal to coordinate d has area prod(width) / width[d] (1 for a 1-d box).
    areas = np.array([np.prod(width) / width[d] for d in dims for _ in (0, 1)])
    probs = jnp.asarray(areas / areas.sum(), dtype)
    return _on_faces(key, jnp.asarray(lo, dtype), jnp.asarray(hi, dtype), dims, probs, num)
