"""NeuralODE: reference solutions, adjoints, batching and the errors it teaches."""

import contextlib

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
import pytest

import eqzoo.sciml as sciml
from eqzoo._errors import ConfigError, EqzooError, ShapeError


def _mlp(key, in_size=2, out_size=2, dtype=None):
    # Initialised under jit: eager initialisation compiles each small op separately.
    make = lambda k: eqx.nn.MLP(in_size, out_size, 8, 1, activation=jnp.tanh, key=k, dtype=dtype)
    return eqx.filter_jit(make)(key)


def _mlp_field(key, size=2, dtype=None):
    return sciml.Autonomous(_mlp(key, size, size, dtype))


def test_linear_field_matches_matrix_exponential():
    with jax.enable_x64(True):
        a = jnp.array([[-0.5, 2.0, 0.0], [-2.0, -0.3, 0.4], [0.1, 0.0, -1.0]])
        linear = eqx.nn.Linear(3, 3, use_bias=False, key=jax.random.key(0), dtype=jnp.float64)
        linear = eqx.tree_at(lambda m: m.weight, linear, a)
        model = sciml.NeuralODE(
            sciml.Autonomous(linear),
            solver=diffrax.Dopri8(),
            stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12),
        )
        y0 = jnp.array([1.0, -0.5, 2.0])
        ts = jnp.linspace(0.0, 3.0, 7)
        ys = model(y0, ts)
        expected = jnp.stack([jax.scipy.linalg.expm(a * t) @ y0 for t in ts])
        assert ys.dtype == jnp.float64
        np.testing.assert_allclose(ys, expected, atol=1e-5, rtol=0)  # stated tolerance: 1e-5
        assert float(jnp.max(jnp.abs(ys - expected))) < 1e-8  # and in fact much closer


def test_final_output_vmap_and_jit():
    field = _mlp_field(jax.random.key(1))
    traj = sciml.NeuralODE(field, solver=diffrax.Bosh3())
    final = sciml.NeuralODE(field, solver=diffrax.Bosh3(), output="final")
    ts = jnp.linspace(0.0, 1.0, 5)
    y0s = jax.random.normal(jax.random.key(2), (3, 2))

    @eqx.filter_jit
    def run(traj, final, y0s, ts_batch):
        ys = jax.vmap(traj, in_axes=(0, None))(y0s, ts)  # shared (untraced) times
        ends = jax.vmap(final, in_axes=(0, None))(y0s, ts)
        ys_b = jax.vmap(traj)(y0s, ts_batch)  # per-example (traced) times
        return ys, ends, ys_b

    ys, ends, ys_b = run(traj, final, y0s, jnp.tile(ts, (3, 1)))
    assert ys.shape == ys_b.shape == (3, 5, 2)
    assert ends.shape == (3, 2)
    np.testing.assert_allclose(ys[:, 0], y0s, atol=1e-6)
    np.testing.assert_allclose(ends, ys[:, -1], atol=1e-5)
    np.testing.assert_allclose(ys_b, ys, atol=1e-5)


def test_start_time_before_first_save():
    model = sciml.NeuralODE(
        lambda t, y, args: -y, stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-9)
    )
    ys = model(jnp.ones(1), jnp.array([1.0, 2.0]), t0=0.0)
    np.testing.assert_allclose(ys[:, 0], jnp.exp(-jnp.array([1.0, 2.0])), rtol=1e-5)
    with pytest.raises(sciml.TimeGridError, match="start time t0 must not be after"):
        model(jnp.ones(1), jnp.array([1.0, 2.0]), t0=1.5)
    with pytest.raises(sciml.TimeGridError, match=r"start time t0 must be a finite number; got t0=nan"):
        model(jnp.ones(1), jnp.array([1.0, 2.0]), t0=float("nan"))
    run = eqx.filter_jit(lambda t0: model(jnp.ones(1), jnp.array([1.0, 2.0]), t0=t0))
    with pytest.raises(Exception, match=r"t0 must be a finite number \(checked at run time"):
        jax.block_until_ready(run(jnp.asarray(jnp.nan)))
    with pytest.raises(Exception, match=r"t0 must not be after .* \(checked at run time"):
        jax.block_until_ready(run(jnp.asarray(1.5)))


def test_args_reach_the_vector_field():
    model = sciml.NeuralODE(lambda t, y, k: -k * y, output="final")
    y1 = model(jnp.ones(2), jnp.array([0.0, 1.0]), jnp.array(2.0))
    np.testing.assert_allclose(y1, jnp.exp(-2.0) * jnp.ones(2), rtol=1e-2)  # default rtol=1e-3


def test_solve_returns_diffrax_solution():
    model = sciml.NeuralODE(lambda t, y, args: -y, max_steps=5)
    sol = model.solve(jnp.ones(1), jnp.array([0.0, 100.0]))
    assert isinstance(sol, diffrax.Solution)
    assert sol.result == diffrax.RESULTS.max_steps_reached


def test_adjoints_agree_and_match_finite_differences():
    with jax.enable_x64(True):
        field = _mlp_field(jax.random.key(3), dtype=jnp.float64)
        params, static = eqx.partition(field, eqx.is_inexact_array)
        theta0, unravel = jax.flatten_util.ravel_pytree(params)
        y0 = jnp.array([0.3, -0.7])
        ts = jnp.linspace(0.0, 1.0, 4)

        def make_loss(adjoint):
            def loss(theta, y0):
                model = sciml.NeuralODE(
                    eqx.combine(unravel(theta), static),
                    adjoint=adjoint,
                    stepsize_controller=diffrax.PIDController(rtol=1e-9, atol=1e-11),
                    max_steps=32,  # a small budget (the solves take ~6 steps): DirectAdjoint's compile time grows with it
                )
                return jnp.sum(model(y0, ts) ** 2)

            return loss

        grads = {
            name: jnp.concatenate(jax.jit(jax.grad(make_loss(name), argnums=(0, 1)))(theta0, y0))
            for name in ["recursive", "backsolve", "direct"]
        }
        for name in ["backsolve", "direct"]:
            np.testing.assert_allclose(grads[name], grads["recursive"], atol=1e-4, rtol=0)

        # Central finite differences along a random direction of (parameters, y0).
        f = jax.jit(make_loss("recursive"))
        direction = jax.random.normal(jax.random.key(4), (theta0.size + 2,), jnp.float64)
        d_theta, d_y = direction[:-2], direction[-2:]
        eps = 1e-5
        fd = (
            f(theta0 + eps * d_theta, y0 + eps * d_y) - f(theta0 - eps * d_theta, y0 - eps * d_y)
        ) / (2 * eps)
        analytic = jnp.vdot(grads["recursive"], direction)
        np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-8)  # fd error ~ eps**2


def test_forward_mode_needs_direct_adjoint():
    model = sciml.NeuralODE(lambda t, y, args: -y, adjoint="direct", output="final")
    jac = jax.jacfwd(lambda y0: model(y0, jnp.array([0.0, 1.0])))(jnp.ones(2))
    np.testing.assert_allclose(jac, jnp.exp(-1.0) * jnp.eye(2), rtol=1e-3)


def test_forward_mode_through_a_reverse_only_adjoint_names_direct():
    # JAX's own message ("can't apply forward-mode autodiff (jvp) to a custom_vjp function")
    # named neither the layer nor the fix
    ts = jnp.array([0.0, 1.0])
    for adjoint in ("recursive", "backsolve"):
        model = sciml.NeuralODE(lambda t, y, args: -y, adjoint=adjoint, output="final")
        with pytest.raises(ConfigError, match=r'NeuralODE: forward-mode .* adjoint="direct"'):
            jax.jacfwd(lambda y0, m=model: m(y0, ts))(jnp.ones(2))
        with pytest.raises(ConfigError, match="forward-mode"):
            jax.jit(jax.hessian(lambda y0, m=model: m(y0, ts).sum()))(jnp.ones(2))
    # reverse mode is untouched: d(y0 e^-1)/dy0
    model = sciml.NeuralODE(lambda t, y, args: -y, output="final")
    grad = jax.grad(lambda y0: model(y0, ts).sum())(jnp.ones(2))
    np.testing.assert_allclose(grad, jnp.exp(-1.0) * jnp.ones(2), rtol=1e-3)  # solver rtol 1e-3


class _SecondOrder(eqx.Module):
    """x'' = a(x, x'): a learned acceleration, over the state {"x": position, "v": velocity}."""

    accel: eqx.nn.MLP

    def __call__(self, t, y, args):
        return {"x": y["v"], "v": self.accel(jnp.concatenate([y["x"], y["v"]]))}


def test_pytree_state_matches_diffrax():
    field = _SecondOrder(_mlp(jax.random.key(11), 4, 2))
    controller = diffrax.PIDController(rtol=1e-5, atol=1e-7)
    model = sciml.NeuralODE(field, solver=diffrax.Bosh3(), stepsize_controller=controller)
    y0 = {"x": jnp.array([1.0, -0.5]), "v": jnp.array([0.0, 0.3])}
    ts = jnp.linspace(0.0, 1.0, 5)

    @eqx.filter_jit
    def run(model, y0):
        ys = model(y0, ts)
        want = diffrax.diffeqsolve(  # the same solve written directly with Diffrax
            diffrax.ODETerm(model.vector_field),
            diffrax.Bosh3(),
            ts[0],
            ts[-1],
            None,
            y0,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=controller,
        ).ys
        batch = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), y0)
        return ys, want, jax.vmap(model, in_axes=(0, None))(batch, ts)

    ys, want, batched = run(model, y0)
    assert jax.tree.structure(ys) == jax.tree.structure(y0) and ys["x"].shape == (5, 2)
    for name in ("x", "v"):
        # the same steps and arithmetic: float32 rounding (stated tolerance 1e-6)
        np.testing.assert_allclose(ys[name], want[name], atol=1e-6, rtol=0)
        np.testing.assert_allclose(batched[name][0], ys[name], atol=1e-5, rtol=0)  # batched steps differ
    np.testing.assert_allclose(ys["x"][0], y0["x"])
    assert not np.allclose(batched["x"][1], batched["x"][0])


def test_pytree_state_final_output_and_throw_false():
    rotate = lambda t, y, args: (y[1], -y[0])  # a tuple state: x' = v, v' = -x
    y0 = (jnp.ones(2), jnp.zeros(2))
    final = sciml.NeuralODE(
        rotate,
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=0.1,
        max_steps=4,
        output="final",
        throw=False,
    )
    x, v = final(y0, jnp.array([0.0, 0.25]))  # 3 steps: reached
    np.testing.assert_allclose(x, np.cos(0.25), rtol=1e-5)  # Tsit5 at dt=0.1: ~1e-9 local error
    np.testing.assert_allclose(v, -np.sin(0.25), rtol=1e-5)
    # the solve stops at 0.4 of 1.0: every array of the final state is inf
    assert all(bool(jnp.all(jnp.isinf(a))) for a in final(y0, jnp.array([0.0, 1.0])))


def test_pytree_state_errors(unchecked):
    model = sciml.NeuralODE(lambda t, y, args: {"x": y["v"], "v": -y["x"]})
    ts = jnp.linspace(0.0, 1.0, 3)
    with unchecked():
        with pytest.raises(ShapeError, match=r"floating-point y0\['v'\]; got dtype int32\. Convert with jax\.tree\.map"):
            model({"x": jnp.ones(2), "v": jnp.zeros(2, jnp.int32)}, ts)
        with pytest.raises(ShapeError, match=r"takes y0\['v'\] as a JAX or NumPy array; got float"):
            model({"x": jnp.ones(2), "v": 0.0}, ts)
        with pytest.raises(
            ShapeError,
            match=r"share one floating dtype; got y0\['v'\]: bfloat16, y0\['x'\]: float32\. Diffrax would promote",
        ):
            model({"x": jnp.ones(2), "v": jnp.zeros(2, jnp.bfloat16)}, ts)
        with pytest.raises(ShapeError, match=r"the state y0 holds no arrays; got \{\}"):
            model({}, ts)
        wrong = sciml.NeuralODE(lambda t, y, args: {"x": y["v"]})
        with pytest.raises(
            sciml.VectorFieldError,
            match=r"structure of the state .*got state y0 with leaves \['v'\] \(2,\), \['x'\] \(3,\) and "
            r"f\(t, y, args\) with leaves \['x'\] \(2,\)\. Return one derivative per array",
        ):
            wrong({"x": jnp.ones(3), "v": jnp.zeros(2)}, ts)
        with pytest.raises(sciml.VectorFieldError, match=r"with leaves \['v'\] \(2,\), \['x'\] \(2,\) and f\(t, y, args\) of shape \(4,\)"):
            sciml.NeuralODE(lambda t, y, args: jnp.zeros(4))({"x": jnp.ones(2), "v": jnp.zeros(2)}, ts)


# ---------------------------------------------------------------- errors


def test_unsorted_times_raise():
    model = sciml.NeuralODE(_mlp_field(jax.random.key(5)))
    with pytest.raises(sciml.TimeGridError, match=r"strictly increasing; got ts\[1\]=2.0 followed"):
        model(jnp.ones(2), np.array([0.0, 2.0, 1.0]))
    with pytest.raises(sciml.TimeGridError, match="Sort the observations by time"):
        model(jnp.ones(2), jnp.array([0.0, 1.0, 1.0]))


def test_non_finite_times_raise():
    model = sciml.NeuralODE(_mlp_field(jax.random.key(5)))
    with pytest.raises(sciml.TimeGridError, match=r"non-finite values \[nan\] at indices \[1\]"):
        model(jnp.ones(2), np.array([0.0, np.nan, 1.0]))
    with pytest.raises(sciml.TimeGridError, match=r"non-finite values \[inf\]"):
        model(jnp.ones(2), jnp.array([0.0, 1.0, jnp.inf]))
    assert issubclass(sciml.TimeGridError, EqzooError)


def test_traced_bad_times_raise_at_run_time():
    model = sciml.NeuralODE(_mlp_field(jax.random.key(5)))
    with pytest.raises(Exception, match="checked at run time because ts is traced"):
        call = eqx.filter_jit(lambda m, y0, ts: m(y0, ts))
        jax.block_until_ready(call(model, jnp.ones(2), jnp.array([0.0, 2.0, 1.0])))


def test_vector_field_with_wrong_output_shape():
    field = sciml.Autonomous(_mlp(jax.random.key(6), 2, 3))
    with pytest.raises(
        sciml.VectorFieldError,
        match=r"state y0 of shape \(2,\) and f\(t, y, args\) of shape \(3,\)",
    ):
        sciml.NeuralODE(field)(jnp.ones(2), jnp.linspace(0.0, 1.0, 3))
    assert issubclass(sciml.VectorFieldError, ShapeError)


def test_state_only_module_needs_the_autonomous_wrapper():
    mlp = _mlp(jax.random.key(6))
    with pytest.raises(sciml.VectorFieldError, match=r"wrap it: eqzoo.sciml.Autonomous\(module\)"):
        sciml.NeuralODE(mlp)(jnp.ones(2), jnp.linspace(0.0, 1.0, 3))
    # Already wrapped, but the network takes another state size: the hint is about the state.
    wrapped = sciml.Autonomous(_mlp(jax.random.key(6), 3, 3))
    with pytest.raises(sciml.VectorFieldError, match=r"takes the state y0 as it is, of shape \(2,\)") as info:
        sciml.NeuralODE(wrapped)(jnp.ones(2), jnp.linspace(0.0, 1.0, 3))
    assert "Autonomous(module)" not in str(info.value)
    # A batch of states (2, 2) for an MLP of one state: the bias add fails as a ValueError, which
    # used to escape as JAX's bare "Incompatible shapes for broadcasting".
    with pytest.raises(sciml.VectorFieldError, match=r"failed with ValueError: Incompatible shapes.*of shape \(2, 2\) \(one trajectory: batch several with jax\.vmap"):
        sciml.NeuralODE(sciml.Autonomous(mlp))(jnp.ones((2, 2)), jnp.linspace(0.0, 1.0, 3))


def _decay(t, y, args):
    return -y


def _stiff(t, y, args):
    return -1000.0 * (y - jnp.cos(t))


def test_step_limit_with_explicit_solver_suggests_implicit():
    # float64: implicit solvers need it to converge at tight tolerances (see docs/sciml.md).
    with jax.enable_x64(True):
        controller = diffrax.PIDController(rtol=1e-5, atol=1e-7)
        model = sciml.NeuralODE(_stiff, max_steps=64, stepsize_controller=controller)
        ts = jnp.linspace(0.0, 10.0, 3)
        y0 = jnp.ones(1)
        with pytest.raises(
            sciml.SolverError,
            match=r"max_steps=64 was reached with the explicit solver Tsit5.*system is stiff.*"
            r"diffrax.Kvaerno5\(\).*max_steps=256",
        ):
            model(y0, ts)
        # Inside a transformation the same message comes from equinox.error_if.
        with pytest.raises(Exception, match=r"max_steps=64 was reached.*system is stiff"):
            batched = eqx.filter_jit(lambda m, y, t: jax.vmap(m, in_axes=(0, None))(y, t))
            jax.block_until_ready(batched(model, jnp.ones((2, 1)), ts))
        # The suggested fix works within the same step budget.
        fixed = sciml.NeuralODE(
            _stiff,
            solver=diffrax.Kvaerno5(),
            max_steps=64,
            stepsize_controller=controller,
            output="final",
        )
        # y(t) = cos(t) + O(1e-3) once the fast transient has decayed.
        assert abs(float(fixed(y0, ts)[0]) - float(jnp.cos(10.0))) < 1e-3


def test_step_limit_with_constant_step(unchecked):
    model = sciml.NeuralODE(
        lambda t, y, args: -y,
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=0.01,
        max_steps=10,
    )
    with pytest.raises(sciml.SolverError, match=r"max_steps=10 was reached with the constant step"):
        model(jnp.ones(1), jnp.array([0.0, 1.0]))
    # throw=False (for samplers): the states it reached, inf where it stopped short. Under jit
    # there was no way to get them but .solve(), which ignores output=.
    lenient = sciml.NeuralODE(
        lambda t, y, args: -y,
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=0.01,
        max_steps=10,
        throw=False,
    )
    ys = eqx.filter_jit(lenient)(jnp.ones(1), jnp.array([0.0, 0.05, 1.0]))
    np.testing.assert_allclose(ys[:2, 0], np.exp([0.0, -0.05]), rtol=1e-6)  # Tsit5, 5 steps of 0.01
    assert np.isinf(ys[2, 0])
    with unchecked(), pytest.raises(ConfigError, match=r"throw must be True or False; got throw='no'"):
        sciml.NeuralODE(lambda t, y, args: -y, throw="no")


def test_throw_false_gives_inf_where_the_solve_did_not_reach_under_jit_and_vmap():
    # ConstantStepSize(dt0=0.1) with max_steps=4: the series ending at 0.25 takes 3 steps and
    # succeeds, the one ending at 1.0 runs out. Batched times: one compiled program for both.
    def layer(output, throw):
        return sciml.NeuralODE(
            _decay,  # one function, so the eager calls below share Diffrax's compiled solve
            stepsize_controller=diffrax.ConstantStepSize(),
            dt0=0.1,
            max_steps=4,
            output=output,
            throw=throw,
        )

    ts = jnp.array([[0.0, 0.1, 0.25], [0.0, 0.1, 1.0]])
    y0s = jnp.ones((2, 1))
    # one program for both layers: compile time dominates
    run = eqx.filter_jit(lambda a, b, y0s, ts: (jax.vmap(a)(y0s, ts), jax.vmap(b)(y0s, ts)))
    ys, finals = run(layer("trajectory", False), layer("final", False), y0s, ts)
    # the series that succeeded is untouched (Tsit5: e^-t to 1e-6)
    np.testing.assert_allclose(ys[0, :, 0], np.exp([0.0, -0.1, -0.25]), rtol=1e-6)
    np.testing.assert_allclose(finals[0], ys[0, -1], rtol=1e-6)
    np.testing.assert_allclose(ys[1, :2, 0], np.exp([0.0, -0.1]), rtol=1e-6)  # reached
    assert np.isinf(ys[1, 2, 0])
    # "final" too: Diffrax alone returns the last state it reached (e^-0.4, at t=0.4), a
    # finite value that is not the state at ts[-1]
    assert np.isinf(finals[1, 0])
    assert np.isinf(layer("final", False)(jnp.ones(1), ts[1])[0])  # eagerly
    with pytest.raises(sciml.SolverError, match=r"max_steps=4 was reached .*max_steps=16"):
        layer("final", True)(jnp.ones(1), ts[1])


@pytest.mark.parametrize("layer", ["NeuralODE", "NeuralCDE", "LatentODE"])
def test_every_solving_layer_checks_throw(layer, unchecked):
    make = {
        "NeuralODE": lambda throw: sciml.NeuralODE(_decay, throw=throw),
        "NeuralCDE": lambda throw: sciml.NeuralCDE(2, 4, 3, throw=throw, key=jax.random.key(0)),
        "LatentODE": lambda throw: sciml.LatentODE(2, 3, 8, throw=throw, key=jax.random.key(0)),
    }[layer]
    with unchecked(), pytest.raises(
        ConfigError, match=rf"^{layer}: throw must be True or False; got throw=1\. True raises SolverError"
    ):
        make(1)


@pytest.mark.parametrize("layer", ["NeuralODE", "NeuralCDE", "LatentODE"])
def test_solver_without_error_estimate_needs_constant_steps(layer):
    # Euler has no error estimate, so the default adaptive controller cannot use it: Diffrax
    # refused only at the first call, with a bare RuntimeError naming neither layer nor fix.
    make = {
        "NeuralODE": lambda **kw: sciml.NeuralODE(_decay, **kw),
        "NeuralCDE": lambda **kw: sciml.NeuralCDE(2, 4, 3, key=jax.random.key(0), **kw),
        "LatentODE": lambda **kw: sciml.LatentODE(2, 3, 8, key=jax.random.key(0), **kw),
    }[layer]
    with pytest.raises(
        ConfigError,
        match=rf"^{layer}: the solver Euler has no error estimate, so the adaptive step-size controller "
        rf"PIDController \(a PIDController is the default .*stepsize_controller=diffrax\.ConstantStepSize\(\), dt0=<step>\)",
    ):
        make(solver=diffrax.Euler())
    make(solver=diffrax.Euler(), stepsize_controller=diffrax.ConstantStepSize(), dt0=0.1)


def test_vector_field_wider_than_the_state_is_refused():
    # Diffrax saves each step in the state's dtype: a float64 derivative for a float32 state
    # failed inside it with "buffer.at[i].set(value) ... must have a dtype that can be promoted".
    # Standard promotion, as users run: the suite's strict mode refuses the call itself.
    ts = jnp.linspace(0.0, 1.0, 3)
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        field = _mlp_field(jax.random.key(1), dtype=jnp.float64)  # what x64 gives by default
        with pytest.raises(
            sciml.VectorFieldError,
            match=r"^NeuralODE: the vector field returns dy/dt in float64 for a state y0 in float32; .*"
            r"pass y0 in float64 \(y0\.astype\(jnp\.float64\)\), or build the vector field in float32",
        ):
            sciml.NeuralODE(field)(jnp.ones(2, jnp.float32), ts)
        with pytest.raises(sciml.VectorFieldError, match=r"jax\.tree\.map\(lambda a: jnp\.asarray\(a, jnp\.float64\), y0\)"):
            sciml.NeuralODE(lambda t, y, args: {"x": field(t, y["x"], args)})({"x": jnp.ones(2, jnp.float32)}, ts)
    # float32 parameters on a bfloat16 state: the same failure without x64
    with jax.numpy_dtype_promotion("standard"), pytest.raises(
        sciml.VectorFieldError, match=r"returns dy/dt in float32 for a state y0 in bfloat16"
    ):
        sciml.NeuralODE(_mlp_field(jax.random.key(1)))(jnp.ones(2, jnp.bfloat16), ts)


def test_bad_configuration(unchecked):
    f = lambda t, y, args: -y
    # Diffrax refused this at the first call, with a ValueError about diffeqsolve's arguments
    with pytest.raises(ConfigError, match=r"NeuralODE: the implicit solver Kvaerno5 takes the tolerances of its nonlinear solve from an adaptive step-size controller, and ConstantStepSize has none.*stepsize_controller=diffrax\.PIDController"):
        sciml.NeuralODE(f, solver=diffrax.Kvaerno5(), stepsize_controller=diffrax.ConstantStepSize(), dt0=0.1)
    # a solver for SDEs or split systems: Diffrax's TermAndSolverIncompatible printed type structures
    with pytest.raises(ConfigError, match=r"NeuralODE: the solver SemiImplicitEuler does not solve this equation.*one term, ODETerm.*diffrax\.Tsit5\(\)"):
        sciml.NeuralODE(f, solver=diffrax.SemiImplicitEuler(), stepsize_controller=diffrax.ConstantStepSize(), dt0=0.1)(jnp.ones(1), jnp.array([0.0, 1.0]))
    with unchecked(), pytest.raises(ConfigError, match="adjoint must be one of"):
        sciml.NeuralODE(f, adjoint="adjoint")
    with pytest.raises(ConfigError, match="dt0=None with diffrax.ConstantStepSize"):
        sciml.NeuralODE(f, stepsize_controller=diffrax.ConstantStepSize())
    with pytest.raises(ConfigError, match="max_steps must be a positive int; got 0"):
        sciml.NeuralODE(f, max_steps=0)
    with unchecked(), pytest.raises(ConfigError, match="output must be 'trajectory' or 'final'"):
        sciml.NeuralODE(f, output="last")


def test_minimum_step_and_failed_implicit_solve():
    controller = diffrax.PIDController(rtol=1e-6, atol=1e-8, dtmin=0.01, force_dtmin=False)
    with pytest.raises(sciml.SolverError, match="step size reached the controller's dtmin"):
        sciml.NeuralODE(_stiff, stepsize_controller=controller)(jnp.ones(1), jnp.array([0.0, 1.0]))
    # y' = y² blows up at t = 1: Newton's iterations of the implicit step cannot converge.
    solver = diffrax.Kvaerno5(root_finder=diffrax.VeryChord(rtol=1e-6, atol=1e-8))
    blow_up = sciml.NeuralODE(
        lambda t, y, args: y**2,
        solver=solver,
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=0.5,
    )
    with pytest.raises(sciml.SolverError, match="the solver Kvaerno5 failed .*nonlinear solve"):
        blow_up(jnp.ones(1), jnp.array([0.0, 2.0]))


def test_implicit_solver_stalling_in_float32_names_float64_not_max_steps():
    # In float32 Kvaerno5 stalls at tight tolerances, rejecting step after step (Diffrax alone
    # does the same: compiled as users compile, at rtol=1e-4 it rejected 4091 of 4096 steps on
    # this system). Raising max_steps, the advice given before, only rejected more steps. The
    # tests compile at -O0, where the stall starts at tighter tolerances: 1e-10 is past float32's
    # resolution whatever the compiler does.
    controller = diffrax.PIDController(rtol=1e-10, atol=1e-12)
    stalled = sciml.NeuralODE(
        lambda t, y, args: -0.7 * y, solver=diffrax.Kvaerno3(), stepsize_controller=controller, max_steps=16
    )
    with pytest.raises(
        sciml.SolverError, match=r"implicit solver Kvaerno3 .* on a float32 state.*solve in float64.*rtol=1e-3"
    ):
        stalled(jnp.array([1.0, 2.0]), jnp.array([0.0, 2.0]))
    # A float64 state keeps the advice for a step budget that is really too small.
    from eqzoo.sciml._solve import failure_messages

    steps, _, _ = failure_messages("NeuralODE", diffrax.Kvaerno3(), controller, None, 16, jnp.float64)
    assert "Either raise the limit with NeuralODE(..., max_steps=64)" in steps and "float32" not in steps


def test_bad_solver_objects(unchecked):
    f = lambda t, y, args: -y
    with unchecked():
        with pytest.raises(ConfigError, match="solver must be a diffrax solver"):
            sciml.NeuralODE(f, solver="tsit5")
        with pytest.raises(ConfigError, match="stepsize_controller must be a diffrax step-size"):
            sciml.NeuralODE(f, stepsize_controller=1e-3)
        with pytest.raises(ConfigError, match="dt0 must be positive or None; got dt0=-0.1"):
            sciml.NeuralODE(f, dt0=-0.1)
        with pytest.raises(ConfigError, match="vector_field must be callable"):
            sciml.NeuralODE(3.0)


def test_missing_diffrax_names_the_extra(monkeypatch):
    import importlib
    import sys

    from eqzoo._errors import MissingDependencyError

    for name in [m for m in sys.modules if m == "eqzoo.sciml" or m.startswith("eqzoo.sciml.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffrax", None)  # makes `import diffrax` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'eqzoo\[sciml\]'"):
        importlib.import_module("eqzoo.sciml")


def test_time_grid_shape_error(unchecked):
    model = sciml.NeuralODE(lambda t, y, args: -y)
    with unchecked(), pytest.raises(sciml.TimeGridError, match=r"at least 2 .* got shape \(1,\)"):
        model(jnp.ones(1), jnp.array([0.0]))


@pytest.mark.parametrize("checked", [True, False])
def test_input_errors_are_eqzoos_in_both_modes(checked, unchecked):
    # With checking on, a generic 700-character jaxtyping error used to pre-empt these.
    model = sciml.NeuralODE(lambda t, y, args: -y)
    ts = jnp.linspace(0.0, 1.0, 3)
    with contextlib.nullcontext() if checked else unchecked():
        with pytest.raises(sciml.TimeGridError, match=r"got shape \(4, 3\)\. .*wrap the call in jax\.vmap"):
            model(jnp.ones(2), jnp.ones((4, 3)))
        with pytest.raises(ShapeError, match=r"floating-point y0; got dtype int32\. Convert with y0\.astype"):
            model(jnp.ones(2, jnp.int32), ts)  # unchecked, this used to integrate silently
        with pytest.raises(sciml.TimeGridError, match="ts must hold real numbers .*got dtype bool"):
            model(jnp.ones(2), jnp.array([False, True]))
        with pytest.raises(sciml.TimeGridError, match=r"t0 must be one time \(a scalar\); got shape \(2,\)"):
            model(jnp.ones(2), ts, t0=jnp.zeros(2))
        with pytest.raises(ShapeError, match=r"floating-point y0; got dtype int32"):
            model.solve(jnp.ones(2, jnp.int32), ts)
