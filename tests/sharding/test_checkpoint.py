"""A train state saved on one mesh restores onto other meshes, and onto one device, with the
same values and the requested shardings. Uses orbax's StandardCheckpointer directly (each
process writes and reads only its own shards)."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import SingleDeviceSharding

from eqzoo import sharding as sh
from eqzoo.train import TrainState


def _named(state: TrainState) -> dict:
    """The state's arrays as a flat {path: array} dict (PRNG key stored as its raw key data)."""
    parts = jax.tree.unflatten(state.structure.treedef, state.arrays)
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(parts)[0]:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x) if isinstance(x, jax.Array) else jax.ShapeDtypeStruct(
                x.shape + (2,), np.uint32, sharding=x.sharding
            )
        out[sh.path_str(path)] = x
    return out


def _from_named(like: TrainState, named: dict) -> TrainState:
    parts = jax.tree.unflatten(like.structure.treedef, like.arrays)
    leaves = []
    for path, x in jax.tree_util.tree_flatten_with_path(parts)[0]:
        y = named[sh.path_str(path)]
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            y = jax.random.wrap_key_data(y)
        leaves.append(y)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


@pytest.fixture(scope="module")
def saved(lab, tmp_path_factory):
    optimizer = optax.adamw(1e-3)
    state = TrainState.create(lab.build_model("gpt2", jax.random.key(0)), optimizer, key=jax.random.key(7))
    state = sh.shard_state(state, sh.make_mesh("data=4,tensor=2"))
    path = tmp_path_factory.mktemp("ckpt") / "state"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, _named(state))
    checkpointer.wait_until_finished()
    return state, path


@pytest.mark.parametrize("target", ["data=2,tensor=4", "data=8", "single-device"])
def test_restore_onto_another_layout(saved, target):
    state, path = saved
    if target == "single-device":
        device = SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
    else:
        abstract = sh.abstract_sharded(state, sh.make_mesh(target))
    restored = _from_named(state, ocp.StandardCheckpointer().restore(path, _named(abstract)))

    assert isinstance(restored, TrainState) and restored.structure is state.structure
    for got, want, spec in zip(restored.arrays, state.arrays, abstract.arrays, strict=True):
        assert got.sharding == spec.sharding
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    if target == "data=2,tensor=4":
        assert restored.model.embed.weight.addressable_shards[0].data.shape == (256 // 4, 64)


def test_checkpointer_restores_onto_a_mesh_by_the_default_rules(lab, tmp_path):
    # `shardings=mesh` places every array as shard_state would on that mesh. A Mesh is callable
    # (a context manager), so it used to be called as the (name, leaf) function and raised a
    # TypeError from inside JAX.
    from eqzoo import checkpoint

    optimizer = optax.adamw(1e-3)
    state = TrainState.create(lab.build_model("gpt2", jax.random.key(0)), optimizer, key=jax.random.key(7))
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False, handle_signals=False)
    ckpt.save(state, step=0)
    mesh = sh.make_mesh("data=2,tensor=4")
    restored = ckpt.restore(checkpoint.abstract_state(state.model, optimizer), shardings=mesh).state
    ckpt.close()
    want = sh.tree_shardings(state, mesh).arrays
    for got, expected, sharding in zip(restored.arrays, state.arrays, want, strict=True):
        assert got.sharding == sharding
        if jax.dtypes.issubdtype(expected.dtype, jax.dtypes.prng_key):
            got, expected = jax.random.key_data(got), jax.random.key_data(expected)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert restored.model.embed.weight.sharding.spec == jax.P("tensor", "fsdp")  # vocab-parallel
    assert restored.opt_state[0].mu.embed.weight.sharding.spec == jax.P("tensor", "fsdp")  # as its parameter
