"""PINN helpers: derivatives, residuals, losses, collocation sampling, and the Poisson example."""

import contextlib
import importlib.util
import json
import re
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqzoo.sciml as sciml
from eqzoo._errors import ConfigError, ShapeError

PI = float(np.pi)
ROOT = Path(__file__).resolve().parents[2]


def exact(x):
    return jnp.sin(PI * x[0]) * jnp.sin(PI * x[1])


def poisson(u, x):
    return sciml.laplacian(u, x) + 2 * PI**2 * exact(x)


def test_derivatives_match_analytic():
    x = jnp.array([0.3, 0.7, -0.2])
    u = lambda x: x[0] ** 2 * x[1] + jnp.sin(x[2])
    v = lambda x: jnp.stack([x[0] ** 2, x[0] * x[1], jnp.exp(x[2])])

    @jax.jit
    def derivatives(x):
        return (
            sciml.gradient(u, x),
            sciml.laplacian(u, x),
            sciml.laplacian(u, x, dims=(0, 1)),
            sciml.divergence(v, x),
        )

    grad, lap, lap_01, div = derivatives(x)
    np.testing.assert_allclose(
        grad, jnp.array([2 * x[0] * x[1], x[0] ** 2, jnp.cos(x[2])]), rtol=1e-6
    )
    np.testing.assert_allclose(lap, 2 * x[1] - jnp.sin(x[2]), rtol=1e-5)
    np.testing.assert_allclose(lap_01, 2 * x[1], rtol=1e-5)
    np.testing.assert_allclose(div, 3 * x[0] + jnp.exp(x[2]), rtol=1e-5)


def test_residual_of_exact_solution_is_zero():
    points = sciml.sample_collocation(jax.random.key(0), 64, [0.0, 0.0], [1.0, 1.0])
    boundary = sciml.sample_boundary(jax.random.key(1), 32, [0.0, 0.0], [1.0, 1.0])

    @jax.jit
    def check(points, boundary):
        residual = sciml.pinn_residual(poisson, exact, points)
        terms = sciml.pinn_loss_terms(exact, poisson, points, boundary=(boundary, jnp.zeros(32)))
        return residual, terms

    residual, terms = check(points, boundary)
    assert residual.shape == (64,)
    assert float(jnp.max(jnp.abs(residual))) < 1e-4  # fp32 against |f| up to 2π² ≈ 20
    assert float(terms["pde"]) < 1e-8 and float(terms["boundary"]) < 1e-10


def test_pinn_loss_weights_terms_and_differentiates(build):
    key = jax.random.key(2)
    net = build(eqx.nn.MLP, key, 2, "scalar", 8, 2, activation=jnp.tanh)
    interior = sciml.sample_collocation(key, 16, [0.0, 0.0], [1.0, 1.0], method="latin")
    boundary = sciml.sample_boundary(key, 8, [0.0, 0.0], [1.0, 1.0])
    conditions = dict(
        boundary=(boundary, jnp.zeros(8)), initial=(boundary[:4], lambda x: jnp.sin(x[0]))
    )

    @eqx.filter_jit
    def run(net):
        terms = sciml.pinn_loss_terms(net, poisson, interior, **conditions)
        loss, grads = eqx.filter_value_and_grad(
            lambda m: sciml.pinn_loss(
                m, poisson, interior, **conditions, boundary_weight=10.0, initial_weight=0.5
            )
        )(net)
        return terms, loss, grads

    terms, loss, grads = run(net)
    expected = terms["pde"] + 10.0 * terms["boundary"] + 0.5 * terms["initial"]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_collocation_sampling():
    lo, hi = np.array([0.0, -1.0, 2.0]), np.array([1.0, 1.0, 5.0])
    for method in ["uniform", "latin"]:
        pts = sciml.sample_collocation(
            jax.random.key(3), 50, lo.tolist(), hi.tolist(), method=method
        )
        assert pts.shape == (50, 3) and pts.dtype == jnp.float32
        pts = np.asarray(pts)
        assert np.all((pts >= lo) & (pts <= hi))
    # Latin hypercube: exactly one point per stratum in every coordinate.
    pts = np.asarray(
        sciml.sample_collocation(jax.random.key(4), 10, [0.0, 0.0], [1.0, 1.0], method="latin")
    )
    for d in range(2):
        assert sorted(np.floor(pts[:, d] * 10).astype(int).tolist()) == list(range(10))
    bnd = np.asarray(sciml.sample_boundary(jax.random.key(5), 200, lo.tolist(), hi.tolist()))
    assert np.all((np.isclose(bnd, lo) | np.isclose(bnd, hi)).any(axis=1))
    assert np.all((bnd >= lo - 1e-6) & (bnd <= hi + 1e-6))
    spatial = np.asarray(
        sciml.sample_boundary(jax.random.key(6), 100, [0.0, 0.0], [1.0, 1.0], dims=(1,))
    )
    assert np.all((spatial[:, 1] == 0.0) | (spatial[:, 1] == 1.0))


def test_pinn_errors(unchecked):
    vec = lambda x: jnp.stack([x[0], x[1]])
    with pytest.raises(
        ShapeError, match=r"needs a scalar field u\(x\) -> \(\); got u\(x\) of shape \(2,\)"
    ):
        sciml.laplacian(vec, jnp.ones(2))
    with pytest.raises(
        ConfigError, match=r"lower < upper in every coordinate; got lower=\[0.0, 1.0\]"
    ):
        sciml.sample_collocation(jax.random.key(0), 10, [0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ShapeError, match="one bound per coordinate"):
        sciml.sample_boundary(jax.random.key(0), 10, [0.0, 0.0], [1.0])
    with pytest.raises(ConfigError, match="num must be a positive int; got num=0"):
        sciml.sample_collocation(jax.random.key(0), 0, 0.0, 1.0)
    with unchecked(), pytest.raises(ConfigError, match="method must be 'uniform' or 'latin'"):
        sciml.sample_collocation(jax.random.key(0), 4, 0.0, 1.0, method="sobol")
    pts = jnp.ones((4, 2))
    with pytest.raises(
        ShapeError, match=r"boundary target must have one value per point.*target of shape \(3,\)"
    ):
        sciml.pinn_loss(exact, poisson, pts, boundary=(pts, jnp.zeros(3)))
    with pytest.raises(
        ConfigError, match=r"dims must be a non-empty list of coordinates of x \(dim=2\)"
    ):
        sciml.laplacian(exact, jnp.ones(2), dims=(5,))


def _load_example(name):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_pinn_example_meets_its_target_in_smoke_mode(tmp_path, capsys, optimized):
    example = _load_example("pinn_poisson")
    with jax.numpy_dtype_promotion("standard"):  # examples run with JAX's default promotion
        example.main(["--smoke", "--json", "--out", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Target 1e-2 (the full run reaches ~3e-4); the smoke run, ~5e-3 here, is held to a looser 3e-2.
    assert summary["rel_l2_error"] < 3e-2
    assert (tmp_path / "pinn_poisson.png").stat().st_size > 1000


def test_more_pinn_errors(unchecked):
    with pytest.raises(
        ShapeError, match=r"divergence needs a vector field v\(x\) with the shape of x"
    ):
        sciml.divergence(lambda x: jnp.sum(x), jnp.ones(2))
    with unchecked():  # the annotations reject these first when checking is on
        with pytest.raises(ShapeError, match=r"pinn_residual: points must be a stack of points"):
            sciml.pinn_residual(poisson, exact, jnp.ones((2, 2, 2)))
        with pytest.raises(ConfigError, match=r"boundary must be a pair \(points, target\)"):
            sciml.pinn_loss(exact, poisson, jnp.ones((4, 2)), boundary=jnp.ones((4, 2)))
    with pytest.raises(ConfigError, match="dims must name at least one coordinate"):
        sciml.sample_boundary(jax.random.key(0), 4, [0.0, 0.0], [1.0, 1.0], dims=())
    # dims=(2,) on a 2-d box used to wrap to coordinate 0 (its faces x = 0 and x = 1), silently
    with pytest.raises(ConfigError, match=r"dims must be distinct coordinates of the box, each in \[-2, 2\) \(counted from 0\); got dims=\[2\]"):
        sciml.sample_boundary(jax.random.key(0), 4, [0.0, 0.0], [1.0, 1.0], dims=(2,))
    with pytest.raises(ConfigError, match=r"got dims=\[0, -2\]"):
        sciml.sample_boundary(jax.random.key(0), 4, [0.0, 0.0], [1.0, 1.0], dims=(0, -2))
    # NumPy integers are sizes too (the int annotation refuses them when checking is on); dims=(-1,)
    # is the last coordinate (its faces y = 0 and y = 2)
    with unchecked():
        pts = sciml.sample_boundary(jax.random.key(0), np.int64(50), [0.0, 0.0], [1.0, 2.0], dims=(-1,))
    assert pts.shape == (50, 2) and set(np.unique(np.asarray(pts[:, 1]))) <= {0.0, 2.0}


@pytest.mark.parametrize("checked", [True, False])
@pytest.mark.parametrize("name", ["gradient", "laplacian", "divergence"])
def test_derivatives_refuse_a_stack_of_points_in_both_modes(name, checked, unchecked):
    # Unchecked, laplacian(u, points) returned one scalar for 3 points (and gradient a (3, 2)
    # array): the sum over the stack, differentiated as one point.
    u = (lambda x: x) if name == "divergence" else (lambda x: jnp.sum(x**2))
    with contextlib.nullcontext() if checked else unchecked():
        with pytest.raises(ShapeError, match=rf"{name} takes one point x, .*\(dim,\); got shape \(3, 2\) and dtype float32\..*jax\.vmap"):
            getattr(sciml, name)(u, jnp.ones((3, 2)))
        with pytest.raises(ShapeError, match=r"got shape \(2,\) and dtype int32.*x\.astype\(jnp\.float32\)"):
            getattr(sciml, name)(u, jnp.ones((2,), jnp.int32))


@pytest.mark.parametrize("checked", [True, False])
def test_pinn_residual_errors_are_eqzoos_in_both_modes(checked, unchecked):
    pde = lambda u, x: sciml.laplacian(u, x)
    u = lambda x: jnp.sum(x**2)
    with contextlib.nullcontext() if checked else unchecked():
        with pytest.raises(ShapeError, match=r"points must be a stack of points of shape \(points, dim\); got shape \(3,\)"):
            sciml.pinn_residual(pde, u, jnp.ones((3,)))
        with pytest.raises(ShapeError, match=r"points must be floating point .*got int32"):
            sciml.pinn_residual(pde, u, jnp.ones((3, 2), jnp.int32))
        with pytest.raises(ShapeError, match=r"pinn_residual: calling the field u on one point x of shape \(3,\) failed"):
            sciml.pinn_residual(pde, lambda x: jnp.dot(jnp.ones(2), x), jnp.ones((4, 3)))
        with pytest.raises(ConfigError, match=r"laplacian: dims must be .*got dims=\[0.5\]"):
            sciml.laplacian(u, jnp.ones((2,)), dims=[0.5])
    np.testing.assert_allclose(sciml.pinn_residual(pde, u, np.ones((3, 2), np.float32)), np.full(3, 4.0), rtol=1e-6)


@pytest.mark.parametrize("checked", [True, False])
def test_pinn_loss_errors_are_eqzoos_in_both_modes(checked, unchecked):
    # Unchecked, boundary points of another dim than the interior's were evaluated silently (u
    # read only the coordinates it indexes) and a negative weight made the loss unbounded below;
    # checked, these were 1,100-1,400 character jaxtyping errors.
    u = lambda x: x[0] ** 2 + x[1] ** 2
    pde = lambda u, x: sciml.laplacian(u, x) - 4.0
    pts = jnp.ones((5, 2))
    with contextlib.nullcontext() if checked else unchecked():
        for fn in (sciml.pinn_loss, sciml.pinn_loss_terms):
            name = fn.__name__
            with pytest.raises(ShapeError, match=rf"{name}: interior must be a stack of points of shape \(points, dim\); got shape \(2,\)"):
                fn(u, pde, jnp.ones(2))
            with pytest.raises(ShapeError, match=rf"{name}: interior must be floating point .*got int32"):
                fn(u, pde, jnp.ones((5, 2), jnp.int32))
            with pytest.raises(ShapeError, match=rf"{name}: boundary points must be .*\(points, 3\) \(the interior points' dim\); got shape \(4, 2\)"):
                fn(u, pde, jnp.ones((5, 3)), boundary=(jnp.ones((4, 2)), jnp.zeros(4)))
            with pytest.raises(ShapeError, match=rf"{name}: initial points must be floating point .*got int32"):
                fn(u, pde, pts, initial=(jnp.ones((4, 2), jnp.int32), jnp.zeros(4)))
            with pytest.raises(ShapeError, match=rf"{name}: boundary target must have one value per point.*got u at 4 points of shape \(4,\) and target of shape \(3,\)"):
                fn(u, pde, pts, boundary=(jnp.ones((4, 2)), jnp.zeros(3)))
            with pytest.raises(ConfigError, match=rf"{name} takes the field u and pde\(u, x\), both callable"):
                fn(u, "poisson", pts)
            # a field built for 2 coordinates on 1-d points: JAX's dot_general error before
            with pytest.raises(ShapeError, match=rf"{name}: calling the field u on one point x of shape \(1,\) failed .*dot_general.*MLP\(in_size=1"):
                fn(lambda x: jnp.dot(jnp.ones(2), x), pde, jnp.ones((5, 1)))
        with pytest.raises(ConfigError, match=r"pinn_loss: boundary_weight must be a finite number >= 0 .*got boundary_weight=-1\.0"):
            sciml.pinn_loss(u, pde, pts, boundary_weight=-1.0)
        with pytest.raises(ConfigError, match=r"pde_weight must be a finite number >= 0 .*got pde_weight=nan"):
            sciml.pinn_loss(u, pde, pts, pde_weight=float("nan"))
        with pytest.raises(ConfigError, match=r"initial_weight must be a finite number >= 0 .*got initial_weight='10'"):
            sciml.pinn_loss(u, pde, pts, initial_weight="10")
        # NumPy points, an integer target and a weight given as an array (e.g. a schedule traced
        # under jit) are accepted in both modes: u = 2 on the boundary, so the term is 4 per point.
        bnd = (np.ones((4, 2), np.float32), np.zeros(4, np.int32))
        loss = eqx.filter_jit(lambda w: sciml.pinn_loss(u, pde, pts, boundary=bnd, boundary_weight=w))(jnp.asarray(10.0))
        np.testing.assert_allclose(loss, 40.0, rtol=1e-6)
        terms = sciml.pinn_loss_terms(u, pde, np.asarray(pts), boundary=bnd)
        np.testing.assert_allclose([terms["pde"], terms["boundary"]], [0.0, 4.0], atol=1e-5)


def test_divergence_refuses_fields_that_are_not_real_vector_fields():
    # An integer field's divergence was 0 (jacfwd of a rounded output), a complex one's a complex
    # number, both silently; a field that failed on the point raised JAX's dot_general error.
    x = jnp.array([0.3, 0.7])
    for v, got in [
        (lambda x: (x * 3).astype(jnp.int32), r"v\(x\) of shape \(2,\) and dtype int32"),
        (lambda x: x.astype(jnp.complex64), r"v\(x\) of shape \(2,\) and dtype complex64"),
        (lambda x: (x, x), r"v\(x\) a tuple, not an array"),
        (lambda x: x[:1], r"v\(x\) of shape \(1,\) and dtype float32"),
    ]:
        with pytest.raises(ShapeError, match=rf"divergence needs a vector field .*; got x of shape \(2,\) and {got}\..*out_size=2"):
            sciml.divergence(v, x)
    with pytest.raises(ShapeError, match=r"divergence: calling the field u on one point x of shape \(2,\) failed .*in_size=2"):
        sciml.divergence(lambda x: jnp.ones((3, 3)) @ x, x)
    np.testing.assert_allclose(sciml.divergence(lambda x: x**2, x), 2.0, rtol=1e-6)  # 2 * 0.3 + 2 * 0.7


@pytest.mark.parametrize("name", ["gradient", "laplacian"])
def test_scalar_derivatives_refuse_integer_and_complex_fields(name):
    # JAX's own "grad requires real-valued outputs" named neither the field nor the fix.
    x = jnp.array([0.3, 0.7])
    for dtype in (jnp.int32, jnp.bool_, jnp.complex64):
        with pytest.raises(ShapeError, match=rf"{name} needs a scalar field u\(x\) -> \(\); got u\(x\) of shape \(\) and dtype {jnp.dtype(dtype).name} .*one real floating-point number"):
            getattr(sciml, name)(lambda x, dtype=dtype: jnp.sum(x).astype(dtype), x)


def test_laplacian_refuses_repeated_dims():
    # dims=(0, 0) summed d2u/dx0^2 twice (and (1, -1) on 2-d points the same), silently.
    u = lambda x: x[0] ** 2 + 3 * x[1] ** 2
    x = jnp.array([0.3, 0.7])
    for dims in [(0, 0), (1, -1)]:
        with pytest.raises(ConfigError, match=r"laplacian: dims must be a non-empty list of coordinates of x \(dim=2\), distinct and each in \[-2, 2\); got dims=" + re.escape(str(list(dims)))):
            sciml.laplacian(u, x, dims=dims)
    np.testing.assert_allclose(sciml.laplacian(u, x, dims=(-1,)), 6.0, rtol=1e-6)


def test_samplers_refuse_an_integer_dtype():
    # JAX's "dtype argument to `uniform` must be a float dtype" named neither function nor fix
    with pytest.raises(ConfigError, match=r"sample_collocation: dtype must be a floating dtype .*got int32\. Pass dtype=jnp\.float32"):
        sciml.sample_collocation(jax.random.key(0), 4, 0.0, 1.0, dtype=jnp.int32)
    with pytest.raises(ConfigError, match=r"sample_boundary: dtype must be a floating dtype .*got int32"):
        sciml.sample_boundary(jax.random.key(0), 4, [0.0, 0.0], [1.0, 1.0], dtype=jnp.int32)
    assert sciml.sample_boundary(jax.random.key(0), 4, [0.0, 0.0], [1.0, 1.0], dtype=jnp.bfloat16).dtype == jnp.bfloat16
