"""Saved sharded over one mesh, restored onto another (8 fake CPU devices, from tests/conftest)."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eqzoo import checkpoint


def _spec_for(leaf, axis):
    # Shard the first dimension over `axis` where it divides; replicate the rest.
    return P(axis) if leaf.ndim >= 1 and leaf.shape[0] % 4 == 0 else P()


@pytest.fixture
def sharded_state(state_factory):
    assert len(jax.devices()) >= 8
    state = state_factory(optax.adamw(1e-2))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    arrays = tuple(
        x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else jax.device_put(x, NamedSharding(mesh, _spec_for(x, "data")))
        for x in state.arrays
    )
    return state._with_arrays(arrays)


def test_restore_onto_another_mesh_via_target_shardings(sharded_state, ckpt_dir, open_checkpointer, same_state, mlp_config):
    assert any(len(x.sharding.device_set) == 8 for x in sharded_state.arrays)
    ckpt = open_checkpointer(ckpt_dir)
    ckpt.save(sharded_state)
    ckpt.wait()

    other = Mesh(np.array(jax.devices()[4:8]), ("fsdp",))
    abstract = checkpoint.abstract_state(mlp_config, optax.adamw(1e-2))
    # A TrainState is a pytree of its arrays: give each abstract leaf its target sharding.
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(other, _spec_for(x, "fsdp"))),
        abstract,
    )
    restored = ckpt.restore(target).state
    same_state(restored, sharded_state)
    for got, want in zip(restored.arrays, target.arrays, strict=True):
        assert got.sharding == want.sharding
        assert got.sharding.device_set == set(jax.devices()[4:8])
    weight = restored.model.net.layers[0].weight  # (8, 6): split over 4 devices along rows
    assert {s.data.shape for s in weight.addressable_shards} == {(2, 6)}


def test_restore_onto_another_mesh_via_shardings_argument(sharded_state, ckpt_dir, open_checkpointer, same_state, mlp_config):
    ckpt = open_checkpointer(ckpt_dir)
    ckpt.save(sharded_state)
    ckpt.wait()
    abstract = checkpoint.abstract_state(mlp_config, optax.adamw(1e-2))

    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    replicated = NamedSharding(mesh, P())
    one = ckpt.restore(abstract, shardings=replicated).state
    same_state(one, sharded_state)
    assert all(x.sharding == replicated for x in one.arrays if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))

    seen = []

    def by_name(name, leaf):
        seen.append(name)
        return NamedSharding(mesh, P("x") if name.endswith("0.weight") else P())

    two = ckpt.restore(abstract, shardings=by_name).state
    same_state(two, sharded_state)
    assert "model.net.layers.0.weight" in seen and "key" in seen
    assert two.model.net.layers[0].weight.sharding.spec == P("x")


def test_abstract_state_of_a_sharded_model_keeps_its_shardings(sharded_state, ckpt_dir, open_checkpointer, same_state):
    ckpt = open_checkpointer(ckpt_dir)
    ckpt.save(sharded_state)
    ckpt.wait()
    opt = optax.adamw(1e-2)
    # The sharded model itself as the template: every array back where the state had it (Adam's
    # moments as their parameters, the optimizer's count and the step replicated); the
    # shardings used to be dropped, and everything restored onto one device.
    restored = ckpt.restore(checkpoint.abstract_state(sharded_state.model, opt)).state
    same_state(restored, sharded_state)
    for got, want in zip(restored.arrays, sharded_state.arrays, strict=True):
        if not jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):  # the fixture left the key on one device
            assert got.sharding == want.sharding
    # Abstract leaves that carry shardings (on another mesh): restored there
    other = Mesh(np.array(jax.devices()[4:8]), ("fsdp",))
    model = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(other, _spec_for(x, "fsdp")))
        if isinstance(x, jax.Array) else x,
        sharded_state.model,
    )
    restored = ckpt.restore(checkpoint.abstract_state(model, opt)).state
    same_state(restored, sharded_state)
    assert all(x.sharding.device_set == set(jax.devices()[4:8]) for x in restored.arrays)
    assert restored.opt_state[0].mu.net.layers[0].weight.sharding.spec == P("fsdp")
    assert restored.step.sharding.spec == P()


def test_abstract_state_keeps_the_step_and_key_in_device_memory_when_the_first_leaf_is_offloaded(sharded_state):
    # The step, the key and the optimizer's scalars took the first sharded leaf's memory kind: a
    # model whose first leaf sat in host memory put them there too.
    opt = optax.adamw(1e-2)
    for offloaded in (
        lambda x: NamedSharding(x.sharding.mesh, x.sharding.spec, memory_kind="pinned_host"),
        lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[3], memory_kind="pinned_host"),
    ):
        leaves, treedef = jax.tree.flatten(sharded_state.model)
        first = next(i for i, x in enumerate(leaves) if isinstance(x, jax.Array))
        placed = []
        for i, x in enumerate(leaves):
            if isinstance(x, jax.Array):
                x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=offloaded(x) if i == first else x.sharding)
            placed.append(x)
        model = jax.tree.unflatten(treedef, placed)
        abstract = checkpoint.abstract_state(model, opt)
        assert jax.tree.leaves(abstract.model)[first].sharding.memory_kind == "pinned_host"  # its own, kept
        default = jax.devices()[0].default_memory().kind
        parts = abstract.parts()
        for scalar in (parts.step, parts.key, parts.opt_state[0].count):
            assert scalar.sharding.memory_kind == default, scalar.sharding
