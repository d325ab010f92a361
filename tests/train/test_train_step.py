"""The compiled train step: gradient accumulation, dynamic loss scaling, frozen leaves,
`TrainState`, and the errors that tell a user how to fix a call."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqzoo import models, train
from eqzoo._errors import ConfigError, ShapeError


def _copy(tree):
    # Train steps donate their input state; keep independent copies of what tests compare against.
    return jax.tree.map(lambda a: np.array(a) if eqx.is_array(a) else a, tree)


def _arrays(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


# ------------------------------------------------------------------------------ grad accumulation


@pytest.fixture(scope="module")
def lm(create):
    return create("tiny-gpt2", key=jax.random.key(0), max_seq=16, num_layers=1)


def _lm_batch(n=8, seq=8):
    tokens = jax.random.randint(jax.random.key(5), (n, seq + 1), 0, 256, dtype=jnp.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


def test_grad_accumulation_equals_large_batch(lm):
    optimizer = optax.sgd(0.5)
    batch = _lm_batch()
    results = {}
    for k in (1, 4):
        state = train.TrainState.create(_fresh(lm), optimizer, key=jax.random.key(0))
        step = train.make_train_step(train.lm_loss, optimizer, grad_accum_steps=k)
        state, metrics = step(state, batch)
        results[k] = (jax.tree.map(np.asarray, eqx.filter(state.model, eqx.is_array)), jax.tree.map(float, metrics))
    (params1, m1), (params4, m4) = results[1], results[4]
    np.testing.assert_allclose(m4["loss"], m1["loss"], atol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params4), jax.tree.leaves(params1), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)  # params after one SGD step with lr 0.5
    assert not np.allclose(jax.tree.leaves(params1)[0], np.asarray(jax.tree.leaves(eqx.filter(lm, eqx.is_array))[0]))


def test_grad_accumulation_weights_micro_batches_by_counted_tokens(lm):
    """Rows counting 1..8 positions (as masks or packed rows do): the accumulated loss, gradient
    and token count are those of the whole batch, not an equal-weight mean of micro-batches."""
    optimizer = optax.sgd(0.5)
    batch = _lm_batch()
    batch["mask"] = jnp.arange(8)[None, :] < jnp.arange(1, 9)[:, None]  # row r counts r + 1
    results = {}
    for k in (1, 4):
        state = train.TrainState.create(_fresh(lm), optimizer, key=jax.random.key(0))
        state, metrics = train.make_train_step(train.lm_loss, optimizer, grad_accum_steps=k)(state, batch)
        results[k] = (jax.tree.map(np.asarray, eqx.filter(state.model, eqx.is_array)), jax.tree.map(float, metrics))
    (params1, m1), (params4, m4) = results[1], results[4]
    assert m1["tokens"] == m4["tokens"] == 36
    np.testing.assert_allclose(m4["loss"], m1["loss"], atol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params4), jax.tree.leaves(params1), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _fresh(model):
    return jax.tree.map(lambda a: jnp.array(a, copy=True) if eqx.is_array(a) else a, model)


def test_grad_accumulation_needs_divisible_batch(lm):
    optimizer = optax.sgd(0.1)
    state = train.TrainState.create(_fresh(lm), optimizer, key=jax.random.key(0))
    step = train.make_train_step(train.lm_loss, optimizer, grad_accum_steps=3)
    with pytest.raises(ShapeError, match=r"leading axis divisible by 3; got an array of shape \(8, 8\)"):
        step(state, _lm_batch())
    with pytest.raises(ConfigError, match="grad_accum_steps must be an integer >= 1, got 0"):
        train.make_train_step(train.lm_loss, optimizer, grad_accum_steps=0)


# ------------------------------------------------------------------------------ fp16 loss scaling


@pytest.fixture(scope="module")
def mlp(create):
    return create("mlp-small", key=jax.random.key(0))


def _mlp_batch(mult=1.0):
    x = jax.random.normal(jax.random.key(1), (8, 64))
    y = jax.random.randint(jax.random.key(2), (8,), 0, 10, dtype=jnp.int32)
    return {"x": x, "y": y, "mult": jnp.float32(mult)}


def _scaled_loss(model, batch, key):
    loss, aux = train.classification_loss(model, {"x": batch["x"], "y": batch["y"]}, key)
    return loss * batch["mult"], aux


def test_dynamic_loss_scaling_skips_overflowing_steps(mlp):
    # fp16 on the MLP preset only: XLA's CPU dot has no fp16 attention.
    precision = train.Precision.fp16()
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = train.TrainState.create(_fresh(mlp), optimizer, key=jax.random.key(0), precision=precision)
    step = train.make_train_step(_scaled_loss, optimizer, precision=precision)

    # fp32 reference gradient norm for the same batch
    ref_step = train.make_train_step(_scaled_loss, optimizer)
    _, ref = ref_step(train.TrainState.create(_fresh(mlp), optimizer, key=jax.random.key(0)), _mlp_batch())

    state, m = step(state, _mlp_batch())
    assert float(m["loss_scale"]) == 2.0**15  # finite gradients: scale kept (grows after 2000 steps)
    # gradients were unscaled before the update: fp16 tolerance
    np.testing.assert_allclose(float(m["grad_norm"]), float(ref["grad_norm"]), rtol=1e-2)

    before = _copy((state.model, state.opt_state))
    # The loss times 1e30 times the scale overflows fp16 in the backward pass.
    state, m = step(state, _mlp_batch(mult=1e30))
    assert not np.isfinite(float(m["grad_norm"]))
    assert float(m["loss_scale"]) == 2.0**14  # halved
    after = (state.model, state.opt_state[0])
    for a, b in zip(_arrays(after), _arrays((before[0], before[1][0])), strict=True):
        np.testing.assert_array_equal(a, b)  # update skipped: params and momentum untouched
    assert step.num_compilations == 1

    state, m = step(state, _mlp_batch())
    assert np.isfinite(float(m["grad_norm"])) and float(m["loss_scale"]) == 2.0**14
    assert not np.array_equal(_arrays(state.model)[0], _arrays(before[0])[0])  # training resumed


def test_num_compilations_counts_batch_shapes_without_compile_events(mlp, monkeypatch):
    # One executable per batch shape; the input state's buffers are donated (deleted). Where
    # JAX emits no compile event (another release), the count comes from the traces.
    from eqzoo.train import _step

    optimizer = optax.sgd(0.1)
    step = train.make_train_step(train.classification_loss, optimizer)
    state = train.TrainState.create(_fresh(mlp), optimizer, key=jax.random.key(0))
    batch = {"x": _mlp_batch()["x"], "y": _mlp_batch()["y"]}
    first = state
    state, _ = step(state, batch)
    assert all(a.is_deleted() for a in first.arrays)
    state, _ = step(state, batch)
    state, _ = step(state, {k: v[:4] for k, v in batch.items()})
    assert step.num_compilations == 2
    monkeypatch.setattr(_step, "_compile_events_seen", False)
    assert step.num_compilations == 2


def test_dynamic_loss_scale_grows_after_period():
    scale = train.DynamicLossScale.init(initial=8.0, period=2)
    scale = scale.adjust(jnp.bool_(True))
    assert float(scale.scale) == 8.0 and int(scale.good_steps) == 1
    scale = scale.adjust(jnp.bool_(True))
    assert float(scale.scale) == 16.0 and int(scale.good_steps) == 0
    scale = scale.adjust(jnp.bool_(False))
    assert float(scale.scale) == 8.0 and int(scale.good_steps) == 0
    floor = train.DynamicLossScale.init(initial=1.0).adjust(jnp.bool_(False))
    assert float(floor.scale) == 1.0  # never below 1


def test_precision_errors(mlp):
    with pytest.raises(ConfigError, match=r"float16 compute needs loss scaling.*Precision\.fp16\(\)"):
        train.Precision(compute_dtype="float16")
    with pytest.raises(ConfigError, match=r"compute_dtype must be one of .*got 'fp8'"):
        train.Precision(compute_dtype="fp8")
    precision = train.Precision.fp16()
    optimizer = optax.sgd(0.1)
    state = train.TrainState.create(_fresh(mlp), optimizer, key=jax.random.key(0))  # no precision
    step = train.make_train_step(_scaled_loss, optimizer, precision=precision)
    with pytest.raises(ConfigError, match=r"TrainState\.create\(\.\.\., precision=precision\)"):
        step(state, _mlp_batch())


def test_precision_param_dtype_is_the_trainable_parameters_dtype(mlp, unchecked):
    # Precision(param_dtype=...) was recorded and never applied: parameters stayed float32.
    precision = train.Precision(param_dtype=jnp.bfloat16, compute_dtype="bfloat16")  # a dtype is a name
    assert precision.param_dtype == "bfloat16"
    optimizer = optax.sgd(1e-2, momentum=0.9)
    model = _fresh(mlp)
    spec = jax.tree.map(eqx.is_inexact_array, model)
    spec = eqx.tree_at(lambda m: m.net.layers[0].weight, spec, replace=False)  # one frozen leaf
    state = train.TrainState.create(model, optimizer, key=jax.random.key(0), precision=precision, trainable=spec)
    state, _ = train.make_train_step(train.classification_loss, optimizer, precision=precision)(state, _mlp_batch())
    assert state.model.net.layers[0].weight.dtype == jnp.float32  # frozen: kept as it was
    assert {x.dtype for x in _arrays(state.model.net.layers[1:])} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in _arrays(state.opt_state) if x.ndim} == {jnp.dtype(jnp.bfloat16)}
    # widening a bf16 model to float32 master weights doubles its memory: said, not silent
    bf16_model = train.cast_floating(_fresh(mlp), jnp.dtype(jnp.bfloat16))
    with pytest.warns(UserWarning, match=r"trainable \['bfloat16'\] parameters are cast to float32.*Precision\(param_dtype='bfloat16'"):
        widened = train.TrainState.create(bf16_model, optimizer, key=jax.random.key(0), precision=train.Precision.bf16())
    assert {x.dtype for x in _arrays(widened.model)} == {jnp.dtype(jnp.float32)}
    with unchecked():
        with pytest.raises(ConfigError, match=r"make_train_step: precision must be an eqzoo\.train\.Precision, e\.g\. Precision\.bf16\(\); got 'bf16'"):
            train.make_train_step(train.classification_loss, optimizer, precision="bf16")
        with pytest.raises(ConfigError, match=r"TrainState\.create: precision must be"):
            train.TrainState.create(model, optimizer, key=jax.random.key(0), precision="bf16")
        with pytest.raises(ConfigError, match=r"grad_accum_steps must be an integer >= 1, got 2\.0"):
            train.make_train_step(train.classification_loss, optimizer, grad_accum_steps=2.0)


def test_a_step_with_another_optimizer_than_the_state_is_refused(mlp):
    # The step's optimizer won silently: SGD stepped on with Adam's moments carried along unused.
    state = train.TrainState.create(_fresh(mlp), optax.adam(1e-2), key=jax.random.key(0))
    step = train.make_train_step(train.classification_loss, optax.sgd(0.1, momentum=0.9))
    with pytest.raises(ConfigError, match=r"optimizer state does not match the train step's optimizer.*makes \(TraceState, EmptyState\); the state holds \(ScaleByAdamState, EmptyState\)"):
        step(state, _mlp_batch())


def test_a_step_given_a_model_or_a_used_state_says_what_it_takes(mlp, unchecked):
    # Both reached JAX's own errors: "'MLP' object has no attribute 'structure'", and for a state a
    # train step had donated, "Invalid buffer passed to Execute() ... Buffer has been deleted or donated".
    optimizer = optax.sgd(0.1)
    step = train.make_train_step(train.classification_loss, optimizer)
    model = _fresh(mlp)
    with unchecked(), pytest.raises(ConfigError, match=r"called as step\(state, batch\) with a TrainState; got a MLP\. .*TrainState\.create\(model, optimizer"):
        step(model, _mlp_batch())
    state = train.TrainState.create(model, optimizer, key=jax.random.key(0))
    new, _ = step(state, _mlp_batch())
    with pytest.raises(ConfigError, match=r"train step was given a state whose arrays were deleted.*state, metrics = step\(state, batch\)"):
        step(state, _mlp_batch())
    evaluate = train.make_eval_step(train.classification_loss)
    with pytest.raises(ConfigError, match=r"eval step was given a state whose arrays were deleted"):
        evaluate(state, _mlp_batch())
    with unchecked(), pytest.raises(ConfigError, match=r"eval step is called as step\(state, batch\) with a TrainState; got a MLP"):
        evaluate(new.model, _mlp_batch())
    assert np.isfinite(float(evaluate(new, _mlp_batch())["loss"]))  # the returned state goes on


def test_grad_accum_steps_takes_numpy_integers_and_says_how_to_pass_a_jax_one(unchecked):
    optimizer = optax.sgd(0.1)
    with unchecked():  # the annotation says int: checking on, beartype refuses a NumPy integer itself
        train.make_train_step(train.classification_loss, optimizer, grad_accum_steps=np.int64(2))  # was refused
    with unchecked(), pytest.raises(ConfigError, match=r"grad_accum_steps must be an integer >= 1, got Array\(2, dtype=int32\)\. That is a JAX array, not a Python int: pass int\(x\)"):
        train.make_train_step(train.classification_loss, optimizer, grad_accum_steps=jnp.int32(2))


# ------------------------------------------------------------------------------ TrainState


def test_trainable_filter_freezes_leaves(mlp):
    model = _fresh(mlp)
    spec = jax.tree.map(lambda _: False, model)
    spec = eqx.tree_at(lambda m: (m.net.layers[-1].weight, m.net.layers[-1].bias), spec, replace=(True, True))
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = train.TrainState.create(model, optimizer, key=jax.random.key(0), trainable=spec)
    # optimizer state only for the trainable leaves (the momentum of the last layer)
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) == 10 * 128 + 10
    before = _copy(state.model)
    step = train.make_train_step(train.classification_loss, optimizer)
    state, _ = step(state, _mlp_batch())
    state, _ = step(state, _mlp_batch())
    for i, layer in enumerate(state.model.net.layers):
        same = np.array_equal(layer.weight, before.net.layers[i].weight)
        assert same == (i < len(state.model.net.layers) - 1), f"layer {i}"


def test_state_parts_and_replace(mlp, create):
    optimizer = optax.sgd(0.1)
    state = train.TrainState.create(_fresh(mlp), optimizer, key=jax.random.key(3))
    assert int(state.step) == 0 and state.model_state is None
    assert np.array_equal(jax.random.key_data(state.key), jax.random.key_data(jax.random.key(3)))
    other = create("mlp-small", key=jax.random.key(9))
    replaced = state.replace(model=other, step=jnp.int32(7))
    assert int(replaced.step) == 7 and int(state.step) == 0  # the original is unchanged
    for a, b in zip(_arrays(replaced.model), _arrays(other), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jax.random.key_data(replaced.key), jax.random.key_data(state.key))
    step = train.make_train_step(train.classification_loss, optimizer)
    replaced, _ = step(replaced, _mlp_batch())
    assert int(replaced.step) == 8
    with pytest.raises(ConfigError, match=r"TrainState has no part\(s\) \['modle'\]; parts are \['model'"):
        state.replace(modle=other)


def test_legacy_prng_key_is_rejected(mlp):
    with pytest.raises(ConfigError, match=r"typed PRNG key; make one with jax\.random\.key\(seed\)"):
        train.TrainState.create(mlp, optax.sgd(0.1), key=jax.random.PRNGKey(0))


def test_a_stateful_models_pair_is_refused_as_the_model(create):
    # models.create returns (model, model_state) for a stateful preset; the pair was taken as the
    # model and the first step failed with "Expected a callable value, got (CNN(...), State(...))"
    pair = create(models.get_config("cnn-digits", widths=(4, 8)), key=jax.random.key(0))
    with pytest.raises(ConfigError, match=r"got a \(model, model_state\) pair \(CNN, State\).*Unpack it: model, model_state = models\.create"):
        train.TrainState.create(pair, optax.sgd(0.1), key=jax.random.key(1))
    train.TrainState.create(pair[0], optax.sgd(0.1), key=jax.random.key(1), model_state=pair[1])


def test_non_scalar_loss_is_rejected(mlp):
    optimizer = optax.sgd(0.1)
    state = train.TrainState.create(_fresh(mlp), optimizer, key=jax.random.key(0))

    def per_example_loss(model, batch, key):
        return jax.vmap(model)(batch["x"])[:, 0]  # forgot the mean

    step = train.make_train_step(per_example_loss, optimizer)
    with pytest.raises(ShapeError, match=r"scalar loss; got shape \(8,\)\. Reduce it with jnp\.mean"):
        step(state, _mlp_batch())
    constant = train.make_train_step(lambda model, batch, key: 1.0, optimizer)
    with pytest.raises(ShapeError, match=r"a JAX scalar computed from the model; got a float \(1\.0\)"):
        constant(state, _mlp_batch())


def test_eval_step_matches_loss(mlp):
    state = train.TrainState.create(_fresh(mlp), optax.sgd(0.1), key=jax.random.key(0))
    metrics = train.make_eval_step(train.classification_loss)(state, _mlp_batch())
    loss, aux = train.classification_loss(mlp, {"x": _mlp_batch()["x"], "y": _mlp_batch()["y"]})
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], aux["accuracy"])


def test_loss_arity_must_match_whether_the_state_has_a_model_state(mlp):
    optimizer = optax.sgd(0.1)

    def stateful_loss(model, model_state, batch, key):
        return train.classification_loss(model, batch)[0], model_state

    stateless = train.TrainState.create(_fresh(mlp), optimizer, key=jax.random.key(0))
    with pytest.raises(ConfigError, match=r"make_train_step: stateful_loss needs 4 positional arguments .*pass model_state= to TrainState.create"):
        train.make_train_step(stateful_loss, optimizer)(stateless, _mlp_batch())
    with pytest.raises(ConfigError, match=r"make_eval_step: stateful_loss needs 4 positional arguments"):
        train.make_eval_step(stateful_loss)(stateless, _mlp_batch())
    with_state = train.TrainState.create(_fresh(mlp), optimizer, key=jax.random.key(0), model_state={"n": jnp.zeros(())})
    with pytest.raises(ConfigError, match=r"holds a model_state, so the loss is called as classification_loss\(model, model_state, batch, key\), but classification_loss takes at most 3"):
        train.make_train_step(train.classification_loss, optimizer)(with_state, _mlp_batch())
    # a loss that takes the state (or *args) still runs
    state, metrics = train.make_train_step(stateful_loss, optimizer)(with_state, _mlp_batch())
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_an_equal_state_structure_reuses_the_compiled_step(mlp):
    # state.replace (like from_parts, shard_state, a restore) makes a new structure object; an
    # equal one must not trace and compile the step again.
    optimizer = optax.sgd(0.1)
    traces = []

    def loss(model, batch, key):
        traces.append(1)  # runs once per trace
        return train.classification_loss(model, batch)

    step = train.make_train_step(loss, optimizer)
    evaluate = train.make_eval_step(loss)
    state = train.TrainState.create(_fresh(mlp), optimizer, key=jax.random.key(0))
    state, _ = step(state, _mlp_batch())
    evaluate(state, _mlp_batch())
    for i in range(3):
        state = state.replace(key=jax.random.key(i))
        state, _ = step(state, _mlp_batch())
        evaluate(state, _mlp_batch())
    assert len(traces) == 2 and step.num_compilations == 1
    # another trainable filter is another step
    frozen = train.TrainState.from_parts(state.parts(), trainable=lambda x: False)
    before = np.asarray(jax.tree.leaves(frozen.model)[0])
    frozen, _ = step(frozen, _mlp_batch())
    assert len(traces) == 3  # traced anew, with the new filter: nothing trains
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(frozen.model)[0]), before)
