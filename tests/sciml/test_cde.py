"""NeuralCDE and LatentODE: shapes, batching, gradients and input errors."""

import contextlib

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqzoo.sciml as sciml
from eqzoo._errors import ConfigError, ShapeError


def _series(key, batch=3, times=9, channels=2):
    k_t, k_x = jax.random.split(key)
    ts = jnp.sort(jax.random.uniform(k_t, (batch, times)), axis=1)
    ts = ts.at[:, 0].set(0.0)
    xs = jax.random.normal(k_x, (batch, times, channels))
    return ts, xs


def _finite(tree):
    return all(
        bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    )


@pytest.fixture(scope="module")
def cde(build_module):
    # Tight tolerances so that batched and unbatched solves (whose adaptive steps differ) agree.
    # Bosh3: fewer stages than the default Tsit5, so less to compile.
    controller = diffrax.PIDController(rtol=1e-5, atol=1e-7)
    return build_module(
        sciml.NeuralCDE,
        jax.random.key(0),
        2,
        4,
        3,
        width=8,
        depth=1,
        solver=diffrax.Bosh3(),
        stepsize_controller=controller,
    )


# One compiled single-series call, shared by the tests that use the `cde` fixture.
_call = eqx.filter_jit(lambda model, ts, xs: model(ts, xs))


def test_cde_shapes_vmap_and_grad(cde):
    ts, xs = _series(jax.random.key(1))

    @eqx.filter_jit
    def run(model):
        def loss(m):
            out = jax.vmap(m)(ts, xs)  # different irregular times per series
            return jnp.mean(out**2), out

        (_, out), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        return out, grads

    out, grads = run(cde)
    single = _call(cde, ts[1], xs[1])
    assert out.shape == (3, 3)
    np.testing.assert_allclose(out[1], single, atol=1e-3)  # batched steps differ: solver tolerance
    assert _finite(grads)
    assert float(jnp.abs(grads.vector_field.mlp.layers[0].weight).sum()) > 0


def test_cde_trajectory_linear_and_backsolve(build):
    ts, xs = _series(jax.random.key(2), batch=1)
    model = build(
        sciml.NeuralCDE,
        jax.random.key(3),
        2,
        4,
        3,
        width=8,
        depth=1,
        interpolation="linear",
        output="trajectory",
        adjoint="backsolve",
        solver=diffrax.Bosh3(),
    )

    def loss(m):
        out = m(ts[0], xs[0])
        return jnp.sum(out), out

    (value, out), grads = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(model)
    assert bool(jnp.isfinite(value)) and _finite(grads)
    assert out.shape == (9, 3)
    # The first output is the readout of the initial state: no integration yet.
    z0 = model.initial(jnp.concatenate([ts[0, :1], xs[0, 0]]))
    np.testing.assert_allclose(out[0], model.readout(z0), atol=1e-5)


def test_cde_missing_values_are_interpolated(cde):
    ts, xs = _series(jax.random.key(4), batch=1)
    xs_missing = xs[0].at[4, 1].set(jnp.nan).at[-1, 0].set(jnp.nan)
    out = _call(cde, ts[0], xs_missing)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_linear_cde_fills_missing_values_like_the_docs_say(build):
    # A NaN stayed in the linear path: the solver rejected every step until max_steps and the
    # error blamed stiffness.
    ts, xs = _series(jax.random.key(4), batch=1)
    ts, xs = ts[0], xs[0]
    model = build(sciml.NeuralCDE, jax.random.key(3), 2, 4, 3, width=8, depth=1, interpolation="linear", solver=diffrax.Bosh3())
    missing = xs.at[4, 1].set(jnp.nan).at[-1, 0].set(jnp.nan)
    w = (ts[4] - ts[3]) / (ts[5] - ts[3])
    filled = xs.at[4, 1].set((1 - w) * xs[3, 1] + w * xs[5, 1]).at[-1, 0].set(xs[-2, 0])
    got, want = model.control(ts, missing), model.control(ts, filled)
    for t in (ts[4], (ts[4] + ts[5]) / 2, ts[-1]):
        np.testing.assert_allclose(got.evaluate(t), want.evaluate(t), atol=1e-6)  # float32
    out = _call(model, ts, missing)
    assert out.shape == (3,) and bool(jnp.all(jnp.isfinite(out)))


def test_cde_input_errors(cde, unchecked):
    ts, xs = _series(jax.random.key(5), batch=1, channels=3)
    with pytest.raises(
        ShapeError, match=r"xs of shape \(times, in_channels=2\); got ts \(9,\) and xs \(9, 3\)"
    ):
        cde(ts[0], xs[0])
    ts, xs = _series(jax.random.key(5), batch=1)
    with pytest.raises(ShapeError, match=r"first observation xs\[0\] must be fully observed"):
        cde(ts[0], xs[0].at[0, 1].set(jnp.nan))
    # traced (the usual training call): was a max_steps error blaming stiffness
    with pytest.raises(Exception, match=r"xs\[0\] must be fully observed .*checked at run time"):
        jax.block_until_ready(_call(cde, ts[0], xs[0].at[0, 1].set(jnp.nan)))
    with pytest.raises(sciml.TimeGridError, match="strictly increasing"):
        cde(ts[0][::-1], xs[0])
    with pytest.raises(sciml.TimeGridError, match="non-finite"):
        cde(ts[0].at[3].set(jnp.nan), xs[0])
    with unchecked(), pytest.raises(ConfigError, match="interpolation must be 'cubic' or 'linear'"):
        sciml.NeuralCDE(2, 4, 3, interpolation="spline", key=jax.random.key(0))


def _pad(ts, xs, rows, t_pad, x_pad):
    """Pad one series at the end to `rows` rows with times `t_pad` and values `x_pad`."""
    extra = rows - ts.shape[0]
    return (
        jnp.concatenate([ts, jnp.full(extra, t_pad, ts.dtype)]),
        jnp.concatenate([xs, jnp.full((extra, xs.shape[1]), x_pad, xs.dtype)]),
    )


def test_cde_padded_batch_with_length_matches_unpadded_series(cde, compile_log):
    # Padding with later times and NaN moved the readout (0.522 unpadded, 0.389 padded to t=2,
    # 0.294 padded to t=5, for one model): the time channel kept growing through the padding
    # and the readout was taken at ts[-1].
    ts, xs = _series(jax.random.key(12), batch=3)
    # Two padded series of one length: the unpadded reference calls (`single`, a compiled solve
    # and its gradient per series length) then compile for two lengths, not three.
    lengths = jnp.array([9, 5, 5])
    xs = xs.at[1, 4, 0].set(jnp.nan)  # missing at the last valid row: carried forward as unpadded
    # pad each series whatever way: later times and NaN, zeros, repeated last time and NaN
    padding = [(2.0, jnp.nan), (0.0, 0.0), (float(ts[2, 4]), jnp.nan)]
    padded = [_pad(ts[i, :n], xs[i, :n], 9, *padding[i]) for i, n in enumerate(lengths.tolist())]
    ts_pad, xs_pad = (jnp.stack(a) for a in zip(*padded, strict=True))

    @eqx.filter_jit
    def batch(model, ts, xs, lengths):
        def loss(m):
            out = jax.vmap(lambda t, x, n: m(t, x, length=n))(ts, xs, lengths)  # (batch, out)
            return jnp.sum(out[:, 0]), out

        return eqx.filter_value_and_grad(loss, has_aux=True)(model)

    @eqx.filter_jit
    def single(model, ts, xs):
        # the whole output rides along as aux: the unpadded call below, without another compile
        def loss(m):
            out = m(ts, xs)
            return out[0], out

        return eqx.filter_value_and_grad(loss, has_aux=True)(model)

    (_, out), grads = batch(cde, ts_pad, xs_pad, lengths)
    want = [single(cde, ts[i, :n], xs[i, :n]) for i, n in enumerate(lengths.tolist())]
    # batched and unbatched solves take slightly different steps (rtol=1e-5): 1e-4
    np.testing.assert_allclose(out[:, 0], [float(v) for (v, _), _ in want], atol=1e-4)
    for got_leaf, *want_leaves in zip(
        jax.tree.leaves(eqx.filter(grads, eqx.is_array)),
        *(jax.tree.leaves(eqx.filter(g, eqx.is_array)) for _, g in want),
        strict=True,
    ):
        np.testing.assert_allclose(got_leaf, sum(want_leaves), atol=1e-4)
    # one series alone: the padded call with length is the unpadded call, to float32 rounding
    (_, one), _ = want[1]
    np.testing.assert_allclose(cde(ts_pad[1], xs_pad[1], length=5), one, atol=1e-6)
    # the lengths are traced: other lengths reuse the compiled step
    with compile_log("batch") as log:
        batch(cde, ts_pad, xs_pad, jnp.array([4, 5, 2]))
    assert log.compiled == []


def test_cde_trajectory_with_length_repeats_the_final_readout(build):
    ts, xs = _series(jax.random.key(13), batch=1)
    ts, xs = ts[0], xs[0]
    model = build(sciml.NeuralCDE, jax.random.key(3), 2, 4, 3, width=8, depth=1, interpolation="linear", output="trajectory", solver=diffrax.Bosh3())
    full = _call(model, ts[:6], xs[:6])  # (6, 3)
    got = model(*_pad(ts[:6], xs[:6], 9, 5.0, jnp.nan), length=6)  # (9, 3)
    np.testing.assert_allclose(got[:6], full, atol=1e-6)  # float32: the same solve
    np.testing.assert_allclose(got[6:], jnp.broadcast_to(full[-1], (3, 3)), atol=1e-6)


def test_cde_padding_without_length_is_refused(cde):
    ts, xs = _series(jax.random.key(14), batch=1)
    ts, xs = _pad(ts[0, :6], xs[0, :6], 9, 5.0, jnp.nan)
    ts = ts.at[6:].set(jnp.array([2.0, 3.0, 5.0]))
    with pytest.raises(ShapeError, match=r"last row of xs has no observed value, which looks like padding.*Pass length="):
        cde(ts, xs)
    with pytest.raises(Exception, match=r"looks like padding.*Pass length=.*Checked at run time because xs is traced"):
        jax.block_until_ready(_call(cde, ts, xs))
    # one missing channel in the last row is a missing value, not padding
    assert bool(jnp.all(jnp.isfinite(cde(ts[:6], xs[:6].at[-1, 0].set(jnp.nan)))))


def test_cde_length_errors(cde, unchecked):
    ts, xs = _series(jax.random.key(15), batch=1)
    ts, xs = ts[0], xs[0]
    with pytest.raises(ConfigError, match=r"length must be one integer.*1 <= length <= times=9; got length=10"):
        cde(ts, xs, length=10)
    with pytest.raises(ConfigError, match=r"1 <= length <= times=9; got length=0"):
        cde(ts, xs, length=0)
    with unchecked(), pytest.raises(ConfigError, match=r"length must be one integer.*got ndarray of shape \(3,\).*jax\.vmap\(lambda t, x, n"):
        cde(ts, xs, length=np.array([9, 5, 3]))
    with unchecked(), pytest.raises(ConfigError, match=r"length must be one integer.*got float"):
        cde(ts, xs, length=4.0)
    # series closed over by a jitted function: the xs[0] check raised TracerArrayConversionError
    run = eqx.filter_jit(lambda m, n: m(ts, xs, length=n))
    with pytest.raises(Exception, match=r"1 <= length <= times=9 \(checked at run time"):
        jax.block_until_ready(run(cde, jnp.asarray(12)))
    np.testing.assert_allclose(run(cde, jnp.asarray(9)), _call(cde, ts, xs), atol=1e-6)  # float32
    # only the valid rows must be increasing; a decrease before length is still refused
    with pytest.raises(sciml.TimeGridError, match=r"strictly increasing up to ts\[length - 1\]; got ts\[2\]"):
        cde(ts.at[3].set(0.0), xs, length=5)
    assert cde(ts.at[6].set(0.0), xs, length=5).shape == (3,)


def test_cde_step_limit(build):
    ts, xs = _series(jax.random.key(6), batch=1)

    def make(throw, key):
        return sciml.NeuralCDE(
            2,
            4,
            3,
            width=8,
            depth=1,
            max_steps=2,
            solver=diffrax.Bosh3(),
            stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
            throw=throw,
            key=key,
        )

    strict, lenient = build(lambda key: (make(True, key), make(False, key)), jax.random.key(0))
    with pytest.raises(
        sciml.SolverError, match=r"NeuralCDE: .*max_steps=2 was reached.*NeuralCDE\(\.\.\., max_steps=8\)"
    ):
        strict(ts[0], xs[0])
    # throw=False returns: the readout at ts[-1], which the solve did not reach, is inf (Diffrax
    # alone gives the last state reached, which the readout turned into a finite, wrong answer)
    out = lenient(ts[0], xs[0])
    assert out.shape == (3,) and bool(jnp.all(jnp.isinf(out)))


def _two_horizons(key, times=4, channels=2):
    """Two series: one over [0, 0.25], one over [0, 1]. With ConstantStepSize(dt0=0.1) and
    max_steps=4 the first solve succeeds (3 steps) and the second stops at t=0.4."""
    ts = jnp.stack([jnp.linspace(0.0, 0.25, times), jnp.linspace(0.0, 1.0, times)])
    return ts, jax.random.normal(key, (2, times, channels))


def test_cde_throw_false_under_jit_and_vmap(build):
    ts, xs = _two_horizons(jax.random.key(6))
    model = build(
        sciml.NeuralCDE,
        jax.random.key(0),
        2,
        4,
        3,
        width=8,
        depth=1,
        output="trajectory",
        solver=diffrax.Euler(),  # the cheapest to compile
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=0.1,
        max_steps=4,
        throw=False,
    )

    @eqx.filter_jit
    def run(model):
        def loss(m):  # a loss that skips what the failed solve did not reach
            out = jax.vmap(m)(ts, xs)
            return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0) ** 2), out

        return eqx.filter_value_and_grad(loss, has_aux=True)(model)

    (_, rows), grads = run(model)
    assert rows.shape == (2, 4, 3)
    # the successful series is whole; the failed one holds its readouts at the times the solve
    # reached (0 and 1/3) and inf from there on
    assert bool(jnp.all(jnp.isfinite(rows[0]))) and bool(jnp.all(jnp.isfinite(rows[1, :2])))
    assert bool(jnp.all(jnp.isinf(rows[1, 2:])))
    # the readout never saw the inf states, so no NaN reached the gradients
    assert _finite(grads)
    assert float(jnp.abs(grads.readout.weight).sum()) > 0


@pytest.fixture(scope="module")
def latent(build_module):
    return build_module(
        sciml.LatentODE, jax.random.key(7), 2, 3, 8, width=8, depth=1, solver=diffrax.Bosh3()
    )


def test_latent_ode_forecast_shapes_vmap_and_grad(latent):
    ts, xs = _series(jax.random.key(8))
    ts_pred = jnp.linspace(0.0, 2.0, 6)  # beyond the observations: forecasting
    keys = jax.random.split(jax.random.key(9), 3)

    @eqx.filter_jit
    def run(model):
        preds = jax.vmap(model, in_axes=(0, 0, None))(ts, xs, ts_pred)
        sampled = jax.vmap(lambda t, x, k: model(t, x, ts_pred, key=k))(ts, xs, keys)
        mean, log_std = model.encode(ts[0], xs[0])

        def loss(m):
            return jnp.mean(jax.vmap(lambda t, x, k: m.loss(t, x, t, x, key=k))(ts, xs, keys))

        return preds, sampled, mean, log_std, *eqx.filter_value_and_grad(loss)(model)

    preds, sampled, mean, log_std, value, grads = run(latent)
    assert preds.shape == sampled.shape == (3, 6, 2)
    assert not np.allclose(sampled, preds)  # a key samples z0; no key uses the posterior mean
    assert mean.shape == log_std.shape == (3,)
    assert value.shape == () and bool(jnp.isfinite(value))
    assert _finite(grads)
    assert float(jnp.abs(grads.ode.vector_field.module.layers[0].weight).sum()) > 0


def _latent_pair(build):
    """The same LatentODE with throw=True and throw=False, initialised in one compile."""

    def make(throw, key):
        return sciml.LatentODE(
            2,
            3,
            8,
            width=8,
            depth=1,
            solver=diffrax.Euler(),  # the cheapest to compile
            stepsize_controller=diffrax.ConstantStepSize(),
            dt0=0.1,
            max_steps=4,
            throw=throw,
            key=key,
        )

    return build(lambda key: (make(True, key), make(False, key)), jax.random.key(7))


def test_latent_step_limit_names_latent_ode(build):
    # The error named NeuralODE and told to build a NeuralODE(..., max_steps=16).
    ts_pred, xs = _two_horizons(jax.random.key(8))
    ts_obs = jnp.linspace(0.0, 0.2, 4)
    strict, lenient = _latent_pair(build)
    with pytest.raises(
        sciml.SolverError, match=r"^LatentODE: .*max_steps=4 was reached.*LatentODE\(\.\.\., max_steps=16\)"
    ):
        strict(ts_obs, xs[1], ts_pred[1])
    # throw=False returns: the rows the solve reached (times 0 and 1/3) hold predictions, the
    # others inf
    pred = lenient(ts_obs, xs[1], ts_pred[1])
    assert bool(jnp.all(jnp.isfinite(pred[:2]))) and bool(jnp.all(jnp.isinf(pred[2:])))


def test_latent_throw_under_jit_and_vmap(build):
    ts_pred, xs = _two_horizons(jax.random.key(8))
    ts_obs = jnp.linspace(0.0, 0.2, 4)
    keys = jax.random.split(jax.random.key(9), 2)
    lengths = jnp.array([3, 4])  # padded targets: the solve ends at ts_pred[length - 1]

    @eqx.filter_jit
    def losses(model):
        loss = lambda x, t, k, n: model.loss(ts_obs, x, t, x, key=k, target_length=n)
        return jax.vmap(loss)(xs, ts_pred, keys, lengths)

    strict, lenient = _latent_pair(build)
    # throw=False: the series whose solve failed has an infinite loss, the other a finite one
    values = losses(lenient)
    assert bool(jnp.isfinite(values[0])) and bool(jnp.isinf(values[1]))
    # throw=True: the failed element's message, not "the solver Euler failed" of the element that
    # succeeded (equinox shows the message of the largest index in the batch)
    with pytest.raises(Exception, match=r"LatentODE: .*max_steps=4 was reached"):
        jax.block_until_ready(losses(strict))


def test_latent_ode_takes_one_observation_and_one_prediction_time(latent):
    ts, xs = _series(jax.random.key(8), batch=1)
    ts_pred = jnp.linspace(float(ts[0, 0]), 2.0, 5)
    many = latent(ts[0], xs[0], ts_pred)
    # one prediction time is the matching row of a longer grid (the solver saves at each time)
    for i in (0, 4):
        one = latent(ts[0], xs[0], ts_pred[i : i + 1])
        assert one.shape == (1, 2)
        np.testing.assert_allclose(one[0], many[i], atol=1e-5)  # adaptive steps differ slightly
    # a series of one observation is encoded too (the encoder reads it; no interval is needed)
    first = latent(ts[0][:1], xs[0][:1], ts_pred)
    assert first.shape == (5, 2) and bool(jnp.all(jnp.isfinite(first)))


def test_latent_ode_errors(latent, unchecked):
    ts, xs = _series(jax.random.key(10), batch=1)
    with pytest.raises(sciml.TimeGridError, match=r"ts_pred\[0\]=0.5 is before the first observation"):
        latent(ts[0] + 1.0, xs[0], jnp.array([0.5, 1.0]))
    with pytest.raises(sciml.TimeGridError, match=r"ts_target\[0\]=0.5 is before the first observation"):
        latent.loss(ts[0] + 1.0, xs[0], jnp.array([0.5, 1.0]), xs[0][:2], key=jax.random.key(0))
    with pytest.raises(sciml.TimeGridError, match="ts_pred must be a 1-d array of at least 1 strictly"):
        latent(ts[0], xs[0], jnp.zeros((0,)))
    with pytest.raises(sciml.TimeGridError, match=r"ts_obs must be finite and strictly increasing"):
        latent(ts[0][::-1], xs[0], jnp.array([1.0, 2.0]))
    with pytest.raises(ShapeError, match=r"xs_obs of shape \(times, data_size=2\)"):
        latent.encode(ts[0], jnp.ones((9, 5)))
    with pytest.raises(ConfigError, match="obs_std must be a positive number; got obs_std=0.0"):
        latent.loss(ts[0], xs[0], ts[0], xs[0], key=jax.random.key(0), obs_std=0.0)
    with pytest.raises(ConfigError, match="obs_std must be a positive number"):
        latent.loss(ts[0], xs[0], ts[0], xs[0], key=jax.random.key(0), obs_std=jnp.full(2, 0.1))
    # a target of the wrong width broadcast against the prediction, scaled by the wrong size
    with unchecked(), pytest.raises(ShapeError, match=r"xs_target has shape \(9, 1\), but the model predicts \(9, 2\)"):
        latent.loss(ts[0], xs[0], ts[0], xs[0][:, :1], key=jax.random.key(0))
    with pytest.raises(ShapeError, match=r"xs_obs holds NaN or infinity \(first at \[\[3, 1\]\]\)"):
        latent.encode(ts[0], xs[0].at[3, 1].set(jnp.nan))


def test_size_errors(unchecked):
    key = jax.random.key(0)
    with pytest.raises(ConfigError, match="NeuralCDE: hidden_size must be >= 1; got hidden_size=0"):
        sciml.NeuralCDE(2, 0, 3, key=key)
    with pytest.raises(ConfigError, match="NeuralCDE: depth must be >= 0"):
        sciml.NeuralCDE(2, 4, 3, depth=-1, key=key)
    with unchecked(), pytest.raises(ConfigError, match="output must be 'final' or 'trajectory'"):
        sciml.NeuralCDE(2, 4, 3, output="last", key=key)
    with pytest.raises(ConfigError, match="LatentODE: latent_size must be >= 1; got latent_size=0"):
        sciml.LatentODE(2, 0, 8, key=key)
    # these failed inside Equinox: IndexError for depth=-1, "Shapes must be 1D sequences of
    # concrete values of integer type" for a float size
    with pytest.raises(ConfigError, match="LatentODE: depth must be >= 0; got depth=-1"):
        sciml.LatentODE(2, 3, 8, depth=-1, key=key)
    with unchecked(), pytest.raises(ConfigError, match="LatentODE: data_size must be an integer >= 1; got data_size=1.5"):
        sciml.LatentODE(1.5, 3, 8, key=key)
    with unchecked(), pytest.raises(ConfigError, match="NeuralCDE: in_channels must be an integer >= 1; got in_channels=2.0"):
        sciml.NeuralCDE(2.0, 4, 3, key=key)


def test_latent_ode_computes_in_its_parameters_dtype(build):
    # With x64 on the model is float64; float32 observations made the GRU's scan fail ("carry
    # input and carry output must have equal types"), and a float32 z0 the latent solve.
    # Standard promotion, as users run (the suite's strict mode refuses float32 with float64).
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        model = build(sciml.LatentODE, jax.random.key(7), 2, 3, 8, width=8, depth=1, solver=diffrax.Bosh3())
        ts, xs = _series(jax.random.key(8), batch=1, times=4)
        ts, xs = np.asarray(ts[0], np.float64), np.asarray(xs[0], np.float64)
        ts_pred = np.array([0.0, 0.5, 1.5], np.float32)
        z0 = jnp.zeros(3, jnp.float32)
        both = eqx.filter_jit(lambda m, t, x, z: (m(t, x, ts_pred), m.decode(z, 0.0, ts_pred)))
        forecast, decoded = both(model, ts.astype(np.float32), xs.astype(np.float32), z0)
        assert forecast.dtype == decoded.dtype == jnp.float64 and forecast.shape == (3, 2)
        # the encoding is that of the same series, rounded to float32 on the way in
        want = model.encode(ts, xs)[0]
        np.testing.assert_allclose(model.encode(ts.astype(np.float32), xs.astype(np.float32))[0], want, atol=1e-6)


@pytest.mark.parametrize("checked", [True, False])
def test_batch_and_dtype_errors_are_eqzoos_in_both_modes(cde, latent, checked, unchecked):
    # With checking on, a generic 650-860 character jaxtyping error used to pre-empt these.
    ts, xs = _series(jax.random.key(5), batch=3)
    with contextlib.nullcontext() if checked else unchecked():
        with pytest.raises(sciml.TimeGridError, match=r"ts must be .*got shape \(3, 9\)\..*wrap the call in jax\.vmap"):
            cde(ts, xs)
        with pytest.raises(ShapeError, match=r"NeuralCDE takes one series: .*got ts \(9,\) and xs \(3, 9, 2\)\. .*jax\.vmap"):
            cde(ts[0], xs)
        with pytest.raises(ShapeError, match=r"NeuralCDE takes floating-point xs; got dtype int32"):
            cde(ts[0], xs[0].astype(jnp.int32))
        with pytest.raises(sciml.TimeGridError, match=r"ts_obs must be .*got shape \(3, 9\)\..*wrap the call in jax\.vmap"):
            latent(ts, xs, jnp.array([1.0, 2.0]))
        with pytest.raises(ShapeError, match=r"LatentODE takes floating-point xs_obs; got dtype int32"):
            latent(ts[0], xs[0].astype(jnp.int32), jnp.array([1.0, 2.0]))
        with pytest.raises(ShapeError, match=r"LatentODE\.loss takes floating-point xs_target; got dtype int32"):
            latent.loss(ts[0], xs[0], ts[0], xs[0].astype(jnp.int32), key=jax.random.key(0))


@pytest.mark.parametrize("checked", [True, False])
def test_latent_decode_errors_are_eqzoos_in_both_modes(latent, checked, unchecked):
    # Unchecked, a batch of z0 or a z0 of the wrong size surfaced as a VectorFieldError about the
    # network, and a vector t0 as NumPy's "truth value of an array ... is ambiguous".
    ts = jnp.linspace(0.0, 1.0, 4)
    with contextlib.nullcontext() if checked else unchecked():
        with pytest.raises(ShapeError, match=r"LatentODE\.decode takes one latent state z0 of shape \(latent_size=3,\); got shape \(2, 3\)\..*jax\.vmap"):
            latent.decode(jnp.zeros((2, 3)), 0.0, ts)
        with pytest.raises(ShapeError, match=r"z0 of shape \(latent_size=3,\); got shape \(5,\)"):
            latent.decode(jnp.zeros(5), 0.0, ts)
        with pytest.raises(ShapeError, match=r"LatentODE\.decode takes floating-point z0; got dtype int32"):
            latent.decode(jnp.zeros(3, jnp.int32), 0.0, ts)
        with pytest.raises(sciml.TimeGridError, match=r"LatentODE\.decode: t0 must be one real time .*got shape \(2,\) and dtype float32"):
            latent.decode(jnp.zeros(3), jnp.zeros(2), ts)
        with pytest.raises(sciml.TimeGridError, match=r"t0 must be one real time .*got shape \(\) \(str\)"):
            latent.decode(jnp.zeros(3), "0", ts)
        with pytest.raises(sciml.TimeGridError, match=r"ts must be a 1-d array .*got shape \(1, 4\)"):
            latent.decode(jnp.zeros(3), 0.0, ts[None])
        # NaN was reported as "t0 must not be after the first saving time", inf as "ts[0] is
        # before the first observation time inf"
        for bad in (jnp.nan, np.inf):
            with pytest.raises(sciml.TimeGridError, match=rf"LatentODE\.decode: t0 must be a finite time .*got t0={bad}"):
                latent.decode(jnp.zeros(3), jnp.asarray(bad), ts)
    # NumPy z0 and an integer t0 are fine in both modes, and match the JAX call to 1e-6
    out = latent.decode(np.zeros(3, np.float32), 0, ts)
    np.testing.assert_allclose(out, latent.decode(jnp.zeros(3), 0.0, ts), atol=1e-6)
    assert out.shape == (4, 2)


def test_latent_loss_takes_a_traced_noise_scale_and_closed_over_data(latent):
    # A learned obs_std (traced) failed with TracerBoolConversionError, and so did series
    # closed over by a jitted function (encode's NaN check ran jnp on them under the trace).
    ts, xs = _series(jax.random.key(11), batch=1)
    ts, xs = ts[0], xs[0]
    key = jax.random.key(0)

    @eqx.filter_jit
    def loss_and_grad(model, std):
        return jax.value_and_grad(lambda s: model.loss(ts, xs, ts, xs, key=key, obs_std=s))(std)

    stds = (0.2, 0.5)
    values = [loss_and_grad(latent, jnp.asarray(s)) for s in stds]
    eager = latent.loss(ts, xs, ts, xs, key=key, obs_std=0.2)
    np.testing.assert_allclose(values[0][0], eager, rtol=1e-5)  # float32, jit against eager
    # per target value the loss is a / s**2 + log(s) + c (a: half the mean squared error, the
    # KL term is constant in s): solve for a from the two values, then d/ds = -2a/s**3 + 1/s
    (l1, g1), (l2, _) = values
    a = (l1 - l2 - np.log(stds[0] / stds[1])) / (stds[0] ** -2 - stds[1] ** -2)
    np.testing.assert_allclose(g1, -2 * a / stds[0] ** 3 + 1 / stds[0], rtol=1e-4)
    assert float(a) > 0


def test_latent_padded_series_with_length_matches_unpadded_series(latent, compile_log):
    # Padding changed the encoding silently: the GRU read the padded rows (and their gaps)
    # first, and loss scored the padded targets.
    ts, xs = (np.asarray(a) for a in _series(jax.random.key(16), batch=3))  # NumPy: no compiles
    lengths = [9, 5, 3]
    ts_pad, xs_pad = ts.copy(), xs.copy()
    ts_pad[1, 5:], xs_pad[1, 5:] = 2.0 + np.arange(4), np.nan  # later times and NaN
    ts_pad[2, 3:], xs_pad[2, 3:] = 0.0, 0.0  # zeros
    keys = jax.random.split(jax.random.key(17), 3)

    @eqx.filter_jit
    def batch(model, ts, xs, lengths):
        encoded = jax.vmap(lambda t, x, n: model.encode(t, x, length=n))(ts, xs, lengths)
        losses = jax.vmap(
            lambda t, x, n, k: model.loss(t, x, t, x, key=k, length=n, target_length=n)
        )(ts, xs, lengths, keys)
        return encoded, losses

    (means, log_stds), losses = batch(latent, ts_pad, xs_pad, jnp.asarray(lengths))
    encode = eqx.filter_jit(lambda model, ts, xs: model.encode(ts, xs))
    for i, n in enumerate(lengths):
        mean, log_std = encode(latent, ts[i, :n], xs[i, :n])
        # the encoder has no adaptive steps: batched and single agree to float32 rounding
        np.testing.assert_allclose(means[i], mean, atol=1e-6)
        np.testing.assert_allclose(log_stds[i], log_std, atol=1e-6)
    # the decoding solve is adaptive: batched steps may round differently (measured: 1e-7)
    loss = eqx.filter_jit(lambda model, ts, xs, key: model.loss(ts, xs, ts, xs, key=key))
    np.testing.assert_allclose(losses[1], loss(latent, ts[1, :5], xs[1, :5], keys[1]), rtol=1e-4)
    # the lengths are traced: other lengths reuse the compiled program
    with compile_log("batch") as log:
        jax.block_until_ready(batch(latent, ts_pad, xs_pad, jnp.array([4, 5, 2])))
    assert log.compiled == []


def test_latent_length_errors(latent, unchecked):
    ts, xs = _series(jax.random.key(18), batch=1)
    ts, xs = ts[0], xs[0]
    key = jax.random.key(0)
    with pytest.raises(ConfigError, match=r"LatentODE: length must be one integer.*1 <= length <= times=9; got length=10"):
        latent.encode(ts, xs, length=10)
    with pytest.raises(ConfigError, match=r"1 <= length <= times=9; got length=0"):
        latent(ts, xs, ts, length=0)
    with unchecked(), pytest.raises(ConfigError, match=r"length must be one integer.*got float.*map over an integer array of lengths: jax\.vmap"):
        latent.encode(ts, xs, length=4.0)
    with unchecked(), pytest.raises(ConfigError, match=r"length must be one integer.*got ndarray of shape \(3,\)"):
        latent.encode(ts, xs, length=np.array([9, 5, 3]))
    with pytest.raises(ConfigError, match=r"got length= \(padded observations\) but no target_length=.*target_length=length"):
        latent.loss(ts, xs, ts, xs, key=key, length=5)
    with pytest.raises(ConfigError, match=r"LatentODE\.loss: target_length must be one integer.*1 <= target_length <= times=4; got target_length=5"):
        latent.loss(ts, xs, ts[:4], xs[:4], key=key, target_length=5)
    # traced: checked at run time
    run = eqx.filter_jit(lambda m, n: m.encode(ts, xs, length=n))
    with pytest.raises(Exception, match=r"1 <= length <= times=9 \(checked at run time"):
        jax.block_until_ready(run(latent, jnp.asarray(12)))
    # only the valid rows must be increasing and finite; the padding may hold anything
    with pytest.raises(sciml.TimeGridError, match=r"ts_obs must be finite and strictly increasing up to ts_obs\[length - 1\]; got ts_obs\[2\]"):
        latent.encode(ts.at[3].set(0.0), xs, length=5)
    with pytest.raises(ShapeError, match=r"xs_obs holds NaN or infinity \(first at \[\[3, 1\]\]\)"):
        latent.encode(ts, xs.at[3, 1].set(jnp.nan), length=5)
    with pytest.raises(sciml.TimeGridError, match=r"ts_target must be finite and strictly increasing up to ts_target\[length - 1\]"):
        latent.loss(ts, xs, ts.at[1].set(ts[2]), xs, key=key, target_length=5)
    mean, _ = latent.encode(ts.at[6].set(jnp.nan), xs.at[7].set(jnp.nan), length=5)
    assert bool(jnp.all(jnp.isfinite(mean)))
