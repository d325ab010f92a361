"""Training on from a restored step: what `fit` records of a run and the warnings of a resume
that changes it or goes on from an older step, and `optax.inject_hyperparams` values on restore
(`hyperparams=`)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eqzoo import checkpoint, models, train


def test_training_on_from_an_older_step_warns_at_once_of_the_newer_steps(ckpt_dir, open_checkpointer, state_factory):
    ckpt = open_checkpointer(ckpt_dir, save_every=5)
    for step in (5, 10):
        ckpt.save(state_factory(), step=step)
    ckpt.wait()
    resumed = open_checkpointer(ckpt_dir, save_every=5)
    state = resumed.restore(state_factory(), step=5).state
    with pytest.warns(UserWarning, match=r"goes on from step 5, but .* holds the newer committed step\(s\) \[10\]; saving any of them again raises"):
        assert not resumed.maybe_save(state, step=6)  # the first step after the restore: long before step 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.maybe_save(state, step=7)  # said once
        latest = open_checkpointer(ckpt_dir, save_every=5)
        latest.restore(state_factory())  # the newest step: nothing to say
        latest.maybe_save(state, step=11)
    with pytest.raises(checkpoint.CheckpointError, match="step 10 is already committed"):
        resumed.maybe_save(state, step=10)


@pytest.mark.filterwarnings("ignore:the batches .generator. have no state_dict")
def test_fit_records_its_run_and_a_resume_that_changes_it_warns_once(ckpt_dir, open_checkpointer, mlp_config):
    from eqzoo.train import _fit

    opt = optax.sgd(0.1)
    step = train.make_train_step(train.classification_loss, opt)

    def batches(size):
        while True:
            yield {"x": jnp.ones((size, 6)), "y": jnp.zeros((size,), jnp.int32)}

    state = train.TrainState.create(models.create(mlp_config, key=jax.random.key(0)), opt, key=jax.random.key(1))
    ckpt = open_checkpointer(ckpt_dir, save_every=2)
    first = train.fit(state, step, batches(4), num_steps=4, checkpointer=ckpt, run_config={"lr": 0.1, "sched": {"warmup": 2}})
    ckpt.wait()
    assert ckpt.meta(4).run == {"num_steps": 4, "batch": {"x": "float32(4, 6)", "y": "int32(4,)"},
                                "run_config": {"lr": 0.1, "sched": {"warmup": 2}}}
    resumed = open_checkpointer(ckpt_dir, save_every=2)
    state = resumed.restore(checkpoint.abstract_state(mlp_config, opt)).state
    with pytest.warns(UserWarning) as record:
        train.fit(state, step, batches(8), num_steps=6, checkpointer=resumed, run_config={"lr": 0.3, "sched": {"warmup": 2}})
    changed = [str(w.message) for w in record if "other settings" in str(w.message)]
    assert len(changed) == 1
    assert "training goes on from step 4 of" in changed[0] and "(3 changed)" in changed[0]
    for line in ("batch.x: saved 'float32(4, 6)', now 'float32(8, 6)'", "run_config.lr: saved 0.1, now 0.3"):
        assert f"  {line}\n" in changed[0]
    assert "num_steps" not in changed[0]
    resumed.wait()
    assert resumed.meta(6).run["run_config"] == {"lr": 0.3, "sched": {"warmup": 2}}
    # a run trained on for longer (only num_steps changed) is the usual resume: no warning, and
    # the new num_steps is recorded
    again = open_checkpointer(ckpt_dir, save_every=2)
    state = again.restore(checkpoint.abstract_state(mlp_config, opt)).state
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train.fit(state, step, batches(8), num_steps=8, checkpointer=again, run_config={"lr": 0.3, "sched": {"warmup": 2}})
    assert not [w for w in record if "other settings" in str(w.message)]
    again.wait()
    assert again.meta(8).run["num_steps"] == 8
    # a run_config that cannot be recorded fails before the first step
    with pytest.raises(checkpoint.CheckpointError, match="fit's run record \\(its run_config\\) must be JSON-able"):
        train.fit(first.state, step, batches(4), num_steps=9, checkpointer=open_checkpointer(ckpt_dir.with_name("b")), run_config={"opt": opt})
    assert _fit._run_record(3, {"x": np.zeros((2, 5), np.int8)}, None) == {"num_steps": 3, "batch": {"x": "int8(2, 5)"}, "run_config": {}}


def test_injected_hyperparameters_resume_as_saved_unless_the_target_is_asked_for(ckpt_dir, open_checkpointer, mlp_config, unchecked):
    # optax.inject_hyperparams keeps numeric hyperparameters as arrays of the optimizer state:
    # a restore takes the saved ones (exact resume), warns where a real target holds others,
    # and takes the target's with hyperparams="target". A scheduled one is never compared.
    schedule = optax.linear_schedule(1.0, 0.0, transition_steps=10)

    def optimizer(lr):
        return optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=schedule)

    def fresh(lr):
        return train.TrainState.create(models.create(mlp_config, key=jax.random.key(0)), optimizer(lr), key=jax.random.key(1))

    state = fresh(0.1).replace(step=jnp.asarray(3, jnp.int32))
    state = state.replace(opt_state=state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, "momentum": jnp.asarray(0.7)}))
    ckpt = open_checkpointer(ckpt_dir, async_save=False)
    ckpt.save(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same values, or an abstract target: nothing to say
        assert float(ckpt.restore(fresh(0.1)).state.opt_state.hyperparams["learning_rate"]) == np.float32(0.1)
        assert float(ckpt.restore(checkpoint.abstract_state(mlp_config, optimizer(0.5))).state.opt_state.hyperparams["learning_rate"]) == np.float32(0.1)
    with pytest.warns(UserWarning, match=r"values differ from the saved ones in 1 hyperparameter\(s\):\n  opt_state\.hyperparams\.learning_rate: saved 0\.1\d*, target 0\.5\nThe restored state keeps the saved values"):
        kept = ckpt.restore(fresh(0.5)).state
    chosen = ckpt.restore(fresh(0.5), hyperparams="target").state
    assert float(kept.opt_state.hyperparams["learning_rate"]) == np.float32(0.1)
    assert float(chosen.opt_state.hyperparams["learning_rate"]) == np.float32(0.5)
    assert float(chosen.opt_state.hyperparams["momentum"]) == np.float32(0.7)  # scheduled: the saved one
    # the next update uses them: SGD moves the weights 5 times as far with the target's 0.5
    step = train.make_train_step(train.classification_loss, optimizer(0.5), donate=False)
    batch = {"x": jnp.ones((4, 6)), "y": jnp.zeros((4,), jnp.int32)}
    w0 = np.asarray(kept.model.net.layers[0].weight)
    moved = [np.asarray(step(s, batch)[0].model.net.layers[0].weight) - w0 for s in (kept, chosen)]
    np.testing.assert_allclose(moved[1], 5 * moved[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(checkpoint.CheckpointError, match=r"hyperparams='target'\) takes the hyperparameters from the target, but the target's \['opt_state\.hyperparams\.learning_rate'\] have no values"):
        ckpt.restore(checkpoint.abstract_state(mlp_config, optimizer(0.5)), hyperparams="target")
    with unchecked(), pytest.raises(checkpoint.CheckpointError, match=r"must be 'saved', 'target' or a dict of values to set \(hyperparams=\{'learning_rate': 1e-4\}\); got 'new'"):
        ckpt.restore(fresh(0.5), hyperparams="new")


def _injected_adamw(lr):
    # a chain, so the injected state sits at opt_state.1; weight decay is scheduled
    decay = optax.constant_schedule(0.01)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=decay))


def test_restore_sets_named_injected_hyperparameters_into_abstract_real_and_sharded_targets(ckpt_dir, open_checkpointer, same_state, mlp_config, compile_log):
    # restore(hyperparams={name: value}) equals a restore of the saved values followed by setting
    # them by hand, whatever the target: abstract (no values), real (other values, no warning
    # for those named), or placed on a mesh.
    def fresh(lr, seed):
        return train.TrainState.create(models.create(mlp_config, key=jax.random.key(seed)), _injected_adamw(lr), key=jax.random.key(1))

    ckpt = open_checkpointer(ckpt_dir, async_save=False)
    ckpt.save(fresh(0.1, 0).replace(step=jnp.asarray(2, jnp.int32)))
    abstract = checkpoint.abstract_state(mlp_config, _injected_adamw(0.5))

    def by_hand(restored, lr):
        opt = restored.opt_state
        inner = opt[1]._replace(hyperparams={**opt[1].hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)})
        return restored.replace(opt_state=(opt[0], inner))

    want = by_hand(ckpt.restore(abstract).state, 1e-4)
    assert float(want.opt_state[1].hyperparams["learning_rate"]) == np.float32(1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for target in (abstract, fresh(0.5, 3)):
            same_state(ckpt.restore(target, hyperparams={"learning_rate": 1e-4}).state, want)
        # by path too, and a NumPy value of another float dtype is cast to the stored one
        path = "opt_state.1.hyperparams.learning_rate"
        same_state(ckpt.restore(abstract, hyperparams={path: np.float64(1e-4)}).state, want)
    # other injected values a real target holds are still compared with the saved ones
    other = fresh(0.5, 3)
    other = other.replace(opt_state=(other.opt_state[0], other.opt_state[1]._replace(
        hyperparams={**other.opt_state[1].hyperparams, "b1": jnp.asarray(0.5, jnp.float32)})))
    with pytest.warns(UserWarning, match=r"in 1 hyperparameter\(s\):\n  opt_state\.1\.hyperparams\.b1: saved "):
        ckpt.restore(other, hyperparams={"learning_rate": 1e-4})
    # a train step compiled for the saved values runs the set ones without compiling again (the
    # set value is committed to the restored array's device, as the by-hand jnp.asarray is not)
    step = train.make_train_step(train.classification_loss, _injected_adamw(0.5), donate=False)
    batch = {"x": jnp.ones((4, 6)), "y": jnp.zeros((4,), jnp.int32)}
    step(ckpt.restore(abstract).state, batch)
    with compile_log("flat_step") as log:
        step(ckpt.restore(abstract, hyperparams={"learning_rate": 1e-4}).state, batch)
    assert log.compiled == []
    # sharded: the set value is placed as the restored array is
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    placed = ckpt.restore(abstract, shardings=replicated, hyperparams={"learning_rate": 1e-4}).state
    lr = placed.opt_state[1].hyperparams["learning_rate"]
    assert lr.sharding == replicated and float(lr) == np.float32(1e-4)
    same_state(placed, want)


def test_restore_refuses_hyperparameters_it_cannot_set(ckpt_dir, open_checkpointer, state_factory, mlp_config):
    state = state_factory(_injected_adamw(0.1))
    ckpt = open_checkpointer(ckpt_dir, async_save=False)
    ckpt.save(state)
    abstract = checkpoint.abstract_state(mlp_config, _injected_adamw(0.1))
    with pytest.raises(checkpoint.CheckpointError, match=r"'lr' is not an optax.inject_hyperparams hyperparameter of the target's optimizer; "
                       r"its injected hyperparameters are: b1, b2, eps, eps_root, learning_rate, weight_decay \(scheduled\)\."):
        ckpt.restore(abstract, hyperparams={"lr": 1e-4})
    with pytest.raises(checkpoint.CheckpointError, match=r"'weight_decay' is scheduled .* Change the schedule in the optimizer instead"):
        ckpt.restore(abstract, hyperparams={"weight_decay": 0.0})
    with pytest.raises(checkpoint.CheckpointError, match=r"the value of 'learning_rate' must be a number, as the optimizer state holds it \(float32\); got '1e-4'"):
        ckpt.restore(abstract, hyperparams={"learning_rate": "1e-4"})
    with pytest.raises(checkpoint.CheckpointError, match=r"sets opt_state\.1\.hyperparams\.learning_rate twice"):
        ckpt.restore(abstract, hyperparams={"learning_rate": 1.0, "opt_state.1.hyperparams.learning_rate": 2.0})
    plain = open_checkpointer(ckpt_dir.with_name("plain"), async_save=False)
    plain.save(state_factory(optax.adamw(0.1)))
    with pytest.raises(checkpoint.CheckpointError, match=r"the target's optimizer injects none\. Wrap the optimizer, e\.g\. optax\.inject_hyperparams"):
        plain.restore(checkpoint.abstract_state(mlp_config, optax.adamw(0.1)), hyperparams={"learning_rate": 1e-4})
    # two parameter groups with a learning rate each: the bare name is ambiguous, a path is not
    groups = optax.multi_transform(
        {"a": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), "b": optax.inject_hyperparams(optax.sgd)(learning_rate=0.2)},
        lambda params: jax.tree.map(lambda x: "a" if x.ndim == 2 else "b", params),
    )
    both = open_checkpointer(ckpt_dir.with_name("groups"), async_save=False)
    both.save(state_factory(groups))
    target = checkpoint.abstract_state(mlp_config, groups)
    with pytest.raises(checkpoint.CheckpointError, match=r"'learning_rate' is injected in 2 places \['opt_state\.inner_states\.a\.inner_state\.hyperparams\.learning_rate', .*name the one to set by its path"):
        both.restore(target, hyperparams={"learning_rate": 1e-4})
    restored = both.restore(target, hyperparams={"opt_state.inner_states.b.inner_state.hyperparams.learning_rate": 1e-4}).state
    assert float(restored.opt_state.inner_states["b"].inner_state.hyperparams["learning_rate"]) == np.float32(1e-4)


@pytest.mark.filterwarnings("ignore:the batches .generator. have no state_dict")
def test_fit_records_injected_values_and_warns_when_a_resume_changes_them(ckpt_dir, open_checkpointer, mlp_config):
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    step = train.make_train_step(train.classification_loss, opt)

    def batches():
        while True:
            yield {"x": jnp.ones((4, 6)), "y": jnp.zeros((4,), jnp.int32)}

    def resume(num_steps, lr=None, **restore_kwargs):
        ckpt = open_checkpointer(ckpt_dir, save_every=2)
        state = ckpt.restore(checkpoint.abstract_state(mlp_config, opt), **restore_kwargs).state
        if lr is not None:  # set by hand after the restore: fit has no way to know it was meant
            opt_state = state.opt_state
            opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
            state = state.replace(opt_state=opt_state)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            train.fit(state, step, batches(), num_steps=num_steps, checkpointer=ckpt)
        ckpt.wait()
        return ckpt, [str(w.message) for w in record if "other settings" in str(w.message)]

    state = train.TrainState.create(models.create(mlp_config, key=jax.random.key(0)), opt, key=jax.random.key(1))
    ckpt = open_checkpointer(ckpt_dir, save_every=2)
    train.fit(state, step, batches(), num_steps=2, checkpointer=ckpt)
    ckpt.wait()
    assert ckpt.meta(2).run["hyperparams"] == {"learning_rate": 0.1}
    ckpt, changed = resume(4)  # the saved values: nothing changed
    assert changed == []
    ckpt, changed = resume(6, lr=0.03)
    assert len(changed) == 1 and "(1 changed):\n  hyperparams.learning_rate: saved 0.1, now 0.03\n" in changed[0]
    assert ckpt.meta(6).run["hyperparams"] == {"learning_rate": 0.03}
    # values the restore was told to set were changed on purpose: recorded, not warned about
    ckpt, changed = resume(8, hyperparams={"learning_rate": 0.01})
    assert changed == [] and ckpt.meta(8).run["hyperparams"] == {"learning_rate": 0.01}
    # a step whose record predates injected values (an older eqzoo's fit): nothing to compare
    older = open_checkpointer(ckpt_dir.with_name("older"), async_save=False)
    older.begin_run({"num_steps": 2, "batch": {"x": "float32(4, 6)", "y": "int32(4,)"}, "run_config": {}}, step=0)
    older.save(ckpt.restore(checkpoint.abstract_state(mlp_config, opt), hyperparams={"learning_rate": 0.5}).state, step=2)
    ckpt_dir = ckpt_dir.with_name("older")
    _, changed = resume(4)
    assert changed == []


def test_a_nan_setting_is_not_a_change():
    from eqzoo.checkpoint._run import run_differences

    saved = {"num_steps": 10, "run_config": {"clip": float("nan"), "lr": 0.1}}
    assert run_differences(saved, {"num_steps": 10, "run_config": {"clip": float("nan"), "lr": 0.1}}) == []
    assert run_differences(saved, {"num_steps": 10, "run_config": {"clip": 1.0, "lr": 0.1}}) == ["run_config.clip: saved nan, now 1.0"]
