"""Shared pieces of the checkpoint tests: small training states and exact comparisons."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqzoo import checkpoint, models, train

MLP_CONFIG = models.MLPConfig(in_features=6, out_features=3, width=8, depth=1)


def _bits(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x)), f"key<{jax.random.key_impl(x)}>"
    return np.asarray(x), np.dtype(x.dtype).name


def assert_same_state(a: train.TrainState, b: train.TrainState) -> None:
    """Bitwise-equal arrays, equal dtypes, and the identical tree structure (NamedTuple types,
    tuples vs lists, None leaves) of the structured parts."""
    pa, pb = a.parts(), b.parts()
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    la = jax.tree.leaves(eqx.filter(pa, eqx.is_array))
    lb = jax.tree.leaves(eqx.filter(pb, eqx.is_array))
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        (vx, dx), (vy, dy) = _bits(x), _bits(y)
        assert dx == dy and vx.shape == vy.shape
        assert vx.tobytes() == vy.tobytes()


def make_state(optimizer=None, *, config=MLP_CONFIG, seed=0, dtype=None):
    """A TrainState of a small MLP whose float arrays (parameters and optimizer moments) hold
    random values drawn on the host, so nothing is compiled and no leaf is trivially zero."""
    optimizer = optimizer or optax.adamw(1e-2)
    model = models.create(config, key=jax.random.key(seed))
    if dtype is not None:
        model = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model)
    state = train.TrainState.create(model, optimizer, key=jax.random.key(seed + 1))
    rng = np.random.default_rng(seed)

    def fill(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(rng.standard_normal(x.shape).astype(np.float32)).astype(x.dtype)
        return x

    state = state._with_arrays(tuple(fill(x) for x in state.arrays))
    return state.replace(step=jnp.asarray(2, jnp.int32))


@pytest.fixture(autouse=True)
def standard_promotion():
    # optax's bias correction raises a Python float to an int32 count, which the suite's strict
    # dtype promotion rejects; checkpointing itself does no arithmetic.
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture
def ckpt_dir(tmp_path):
    return tmp_path / "ckpt"


@pytest.fixture
def open_checkpointer():
    """Make Checkpointers (without signal handlers, which belong to the test runner) and close
    them after the test."""
    made = []

    def make(directory, **kwargs):
        kwargs.setdefault("handle_signals", False)
        c = checkpoint.Checkpointer(directory, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def same_state():
    return assert_same_state


@pytest.fixture
def state_factory():
    return make_state


@pytest.fixture
def mlp_config():
    return MLP_CONFIG
