"""Sharded initialisation: arrays are born in their sharded layout, never whole on one device."""

import equinox as eqx
import jax
import numpy as np
import optax

import eqzoo
from eqzoo import sharding as sh
from eqzoo.train import TrainState

# Big enough that a whole embedding table (4 MiB) stands out against one device's share.
CONFIG = eqzoo.models.get_config("tiny-gpt2", vocab_size=4096, embed_dim=256, num_heads=4)


def _make(key):
    return eqzoo.models.GPT2(CONFIG, key=key)


def _nbytes(x) -> int:
    return x.size * x.dtype.itemsize


def test_sharded_init_layout_and_values():
    mesh = sh.make_mesh("fsdp=2,tensor=4")
    model = sh.sharded_init(_make, jax.random.key(0), mesh=mesh)
    abstract = eqx.filter_eval_shape(_make, jax.random.key(0))
    want = sh.tree_shardings(abstract, mesh)
    got = jax.tree.map(lambda x: x.sharding, eqx.filter(model, eqx.is_array))
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
    assert model.embed.weight.addressable_shards[0].data.shape == (4096 // 4, 256 // 2)
    assert model.config == CONFIG
    # The same bits as an eager (unsharded) initialisation and as `models.create`'s compiled
    # one: the PRNG is partitionable, and both compile without XLA's algebraic simplifier.
    eager = _make(jax.random.key(0))
    created = eqzoo.models.create(CONFIG, key=jax.random.key(0))
    arrays = [jax.tree.leaves(eqx.filter(t, eqx.is_array)) for t in (model, eager, created)]
    for a, b, c in zip(*arrays, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(c), np.asarray(b))


def test_sharded_init_never_materialises_a_whole_parameter():
    abstract = eqx.filter_eval_shape(_make, jax.random.key(0))
    sizes = [_nbytes(x) for x in jax.tree.leaves(abstract) if isinstance(x, jax.ShapeDtypeStruct)]
    total, largest = sum(sizes), max(sizes)  # the largest is the (4096, 256) embedding

    memory = sh.lower_sharded_init(_make, jax.random.key(0), mesh=sh.make_mesh("fsdp=8")).compile().memory_analysis()
    # Per device: an eighth of the parameters (plus the small replicated norms and biases), and
    # scratch space smaller than the one largest parameter.
    assert memory.output_size_in_bytes < 1.1 * total / 8
    assert memory.temp_size_in_bytes < largest


def test_sharded_init_of_a_whole_train_state():
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    optimizer = optax.adamw(1e-3)
    state = sh.sharded_init(
        lambda key: TrainState.create(_make(key), optimizer, key=key), jax.random.key(0), mesh=mesh
    )
    assert isinstance(state, TrainState)
    assert [a.sharding for a in state.arrays] == list(sh.tree_shardings(state, mesh).arrays)
    adam = state.opt_state[0]
    assert adam.mu.embed.weight.sharding == state.model.embed.weight.sharding
    assert adam.mu.embed.weight.addressable_shards[0].data.shape == (4096 // 2, 256 // 2)
    assert state.key.sharding.is_fully_replicated and int(state.step) == 0
