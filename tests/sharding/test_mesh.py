"""Meshes: named axes from the devices present, string shapes, -1 filling, clear errors."""

import jax
import pytest

from eqzoo import sharding as sh


def test_make_mesh_from_dict_and_string():
    a = sh.make_mesh({"stage": 1, "data": 2, "fsdp": 2, "expert": 1, "tensor": 2})
    b = sh.make_mesh("data=2,fsdp=2,tensor=2")
    assert a.axis_names == b.axis_names == ("stage", "data", "fsdp", "context", "expert", "tensor")
    assert sh.mesh_shape(a) == sh.mesh_shape(b) == {"stage": 1, "data": 2, "fsdp": 2, "context": 1, "expert": 1, "tensor": 2}
    assert a.devices.size == len(jax.devices()) == 8
    assert all(t == jax.sharding.AxisType.Auto for t in a.axis_types)


def test_missing_axes_have_size_one_and_minus_one_fills():
    assert sh.mesh_shape(sh.make_mesh("tensor=2,data=-1")) == {"stage": 1, "data": 4, "fsdp": 1, "context": 1, "expert": 1, "tensor": 2}
    assert sh.mesh_shape(sh.make_mesh()) == {"stage": 1, "data": 8, "fsdp": 1, "context": 1, "expert": 1, "tensor": 1}
    assert sh.mesh_shape(sh.make_mesh("fsdp=-1")) == {"stage": 1, "data": 1, "fsdp": 8, "context": 1, "expert": 1, "tensor": 1}
    assert sh.mesh_shape(sh.make_mesh("expert=4,fsdp=-1")) == {"stage": 1, "data": 1, "fsdp": 2, "context": 1, "expert": 4, "tensor": 1}


def test_context_axis_sits_between_fsdp_and_expert():
    # Context parallelism's axis: accepted in strings and dicts, placed inside data/fsdp and
    # outside expert/tensor; a context=1 mesh keeps the device order a mesh without it had.
    mesh = sh.make_mesh("data=2,context=4")
    assert sh.mesh_shape(mesh) == {"stage": 1, "data": 2, "fsdp": 1, "context": 4, "expert": 1, "tensor": 1}
    assert sh.parse_mesh_shape({"context": -1, "tensor": 2}) == {"stage": 1, "data": 1, "fsdp": 1, "context": -1, "expert": 1, "tensor": 2}
    assert sh.mesh_shape(sh.make_mesh("context=-1,tensor=2"))["context"] == 4
    # devices along `context` are the neighbours of the `expert`/`tensor` block, not of `data`
    assert [d.id for d in mesh.devices[0, 0, 0, :, 0, 0]] == [0, 1, 2, 3]
    plain = sh.make_mesh("data=2,fsdp=2,tensor=2")
    assert plain.devices.reshape(-1).tolist() == jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor")).devices.reshape(-1).tolist()


def test_subset_of_devices():
    mesh = sh.make_mesh("data=2", devices=jax.devices()[:2])
    assert mesh.devices.size == 2


def test_parse_mesh_shape():
    assert sh.parse_mesh_shape(" data = 2 , tensor=4 ") == {"stage": 1, "data": 2, "fsdp": 1, "context": 1, "expert": 1, "tensor": 4}
    assert sh.parse_mesh_shape("") == {"stage": 1, "data": 1, "fsdp": 1, "context": 1, "expert": 1, "tensor": 1}


def test_mesh_size_not_matching_devices():
    with pytest.raises(sh.ShardingError, match=r"stage=1,data=3,fsdp=1,context=1,expert=1,tensor=1 needs 3 devices but 8 are present"):
        sh.make_mesh("data=3")
    with pytest.raises(sh.ShardingError, match=r"cannot fill mesh axis 'data'.*3 devices.*8 devices"):
        sh.make_mesh("data=-1,tensor=3")


def test_unknown_axis_name():
    with pytest.raises(sh.ShardingError, match=r"unknown mesh axis 'model'.*\['stage', 'data', 'fsdp', 'context', 'expert', 'tensor'\]"):
        sh.make_mesh("data=4,model=2")
    with pytest.raises(sh.ShardingError, match=r"unknown mesh axis 'pipeline'"):
        sh.make_mesh({"pipeline": 8})


@pytest.mark.parametrize(
    "bad, match",
    [
        ("data:2", r"cannot read mesh item 'data:2'"),
        ("data=0", r"mesh axis 'data' has size 0"),
        ("data=-1,fsdp=-1", r"at most one mesh axis may be -1"),
        ("data=2,data=4", r"mesh axis 'data' is given twice"),
    ],
)
def test_malformed_shapes(bad, match):
    with pytest.raises(sh.ShardingError, match=match):
        sh.parse_mesh_shape(bad)


def test_explicit_axes_are_refused_where_a_mesh_is_taken():
    # jax.make_mesh makes Explicit axes by default; eqzoo's constraints need Auto ones. Placing
    # a model on such a mesh used to work and its forward pass then failed inside JAX (the
    # embedding lookup asks for an out_sharding), and the train step failed in its constraints.
    import numpy as np
    import optax

    import eqzoo
    from eqzoo.train import TrainState, lm_loss, make_eval_step, make_train_step

    explicit = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 3)
    model = eqzoo.models.create("tiny-llama", key=jax.random.key(0))
    match = r"the mesh's axes \{'data': 'Explicit', 'fsdp': 'Explicit', 'tensor': 'Explicit'\} are not AxisType.Auto.*make_mesh\('data=2,fsdp=2,tensor=2'\)"
    for call in (
        lambda: sh.shard(model, explicit),
        lambda: sh.tree_shardings(model, explicit),
        lambda: sh.shard_batch({"tokens": np.zeros((8, 4), np.int32)}, explicit),
        lambda: sh.make_global_batch({"tokens": np.zeros((8, 4), np.int32)}, explicit),
        lambda: sh.activation_sharding(explicit).__enter__(),
        lambda: make_train_step(lm_loss, optax.sgd(0.1), mesh=explicit),
        lambda: make_eval_step(lm_loss, mesh=explicit),
    ):
        with pytest.raises(sh.ShardingError, match=match):
            call()
    # A mesh shape where the mesh belongs (the type-checking hook refuses it earlier, with jaxtyping's error).
    from eqzoo.sharding._mesh import check_mesh

    with pytest.raises(sh.ShardingError, match=r"make_train_step: mesh must be a jax.sharding.Mesh.*got str \(pass eqzoo.sharding.make_mesh\('data=8'\)\)"):
        check_mesh("data=8", "make_train_step")
    # The same axes as Auto work: a state placed on them trains.
    auto = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    state = sh.shard_state(TrainState.create(model, optax.sgd(0.1), key=jax.random.key(1)), auto)
    tokens = np.zeros((8, 5), np.int32)
    _, metrics = make_train_step(lm_loss, optax.sgd(0.1), mesh=auto)(state, {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]})
    assert np.isfinite(float(metrics["loss"]))


def test_mesh_axes_eqzoo_does_not_name_warn_under_the_default_rules():
    # A mesh named as in another library ("dp", "model"): the default rules and the batch
    # placement name eqzoo's axes only, so "model" would replicate everything over its devices.
    import numpy as np

    import eqzoo

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
    model = eqzoo.models.create("tiny-llama", key=jax.random.key(0))
    with pytest.warns(UserWarning, match=r"mesh axis\(es\) \{'model': 2\} are not eqzoo axis names.*replicated over them.*make_mesh"):
        placed = sh.shard(model, mesh)
    assert placed.blocks.layers.attn.q_proj.weight.sharding.spec == jax.P(None, None, None)
    # Rules that name the axis are the user's own: no warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sh.shard(model, mesh, rules=[(r"q_proj\.weight$", jax.P(None, "model", None))])
