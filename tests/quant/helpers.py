"""Helpers shared by the quantization tests."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


@eqx.filter_jit
def _fwd(model, x):
    # One compiled forward per model structure (eager whole-model calls are slower on CPU).
    return model(x)


def _tokens(n=64, seed=10):
    return jax.random.randint(jax.random.key(seed), (n,), 0, 256, dtype=jnp.int32)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _of_type(tree, cls):
    return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]
